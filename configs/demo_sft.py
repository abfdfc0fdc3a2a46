# Finetune the demo model (configs/demo.py's shape) on chat data with loss masks: what
# `python tools/demo.py --sft` runs after pretraining. The data is raw .jsonl chat records, read and
# tokenized on the fly (data.type="streaming"); only the assistant turns carry loss.
import os

_base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
exec(open(_base).read())  # the demo model, optimizer and parallel settings  # noqa: S102

JOB_NAME = "demo_sft"
TOTAL_STEPS = 200

data = dict(
    type="streaming",
    format="chat",
    seq_len=SEQ_LEN,  # noqa: F821 (from demo.py)
    micro_num=2,
    micro_bsz=4,
    total_steps=TOTAL_STEPS,
    valid_every=0,
    train_folder="demo_data/sft/train",
    tokenizer_path="demo_data/tokenizer/tokenizer.model",
)

adam = dict(lr=1e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)
lr_scheduler = dict(total_steps=TOTAL_STEPS, warmup_ratio=0.05, eta_min=1e-4)

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="runs/demo_sft/ckpt",
    checkpoint_every=TOTAL_STEPS,
    keep_last=1,
    # the pretrained demo model; weights only (a new optimizer, schedule and data position). With
    # auto_resume (default True) a restarted job resumes runs/demo_sft/ckpt instead; this path is used
    # when there is nothing to resume and it exists (doc/checkpoint.md#resuming)
    load_ckpt_info=dict(path="runs/demo/ckpt/300", content=("model",), ckpt_type="internlm"),
)

monitor = dict(log_every=10, run_folder="runs/demo_sft")
