# InternLM-7B finetuning in InternEvo's isp layout: 7B_sft.py with sequence parallelism of 2
# (tensor.mode="isp": activations split along the sequence, attention head-parallel between two
# all-to-alls) and every weight sharded 4 ways (weight parallelism: 2 within the isp group, the rest by
# zero1), gathered for each use. Only the differences from the base are written here (mmengine's
# _base_: dicts merge key by key). doc/parallel.md explains the layout; doc/finetune.md the data.
_base_ = "7B_sft.py"

JOB_NAME = "7b_isp_sft"

parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=2, mode="isp"),
    weight=dict(size=4, overlap=True, memory_pool=True),
)

ckpt = dict(
    # InternEvo's finetuning start: a model folder loaded once, then auto_resume takes over from the
    # run's own checkpoints; ckpt_type="internevo" reads InternEvo's model_tp*_pp*.pt folders too
    load_ckpt_info=dict(path=None, content=("model",), ckpt_type="internevo"),
    auto_resume=True,
)
