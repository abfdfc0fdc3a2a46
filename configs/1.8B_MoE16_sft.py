# InternEvo's 1.8B_MoE16 shape (INTERNLM_MoE; 2.1B parameters with embedding and head, 0.5B active per
# token): 24 layers of width 1024, 16
# experts per layer (FFN width 1536 each), 2 experts per token with GShard routing (capacity factor 1,
# tokens beyond an expert's capacity dropped), the load-balancing loss weighted 0.1. It inherits the
# run settings of 7B_sft.py (_base_: dicts merge key by key). no_bias=True keeps the attention
# Mixtral-shaped, so tools/convert2hf.py exports it as MixtralForCausalLM (doc/moe.md).
_base_ = "7B_sft.py"

JOB_NAME = "1.8b_moe_sft"
model_type = "INTERNLM_MoE"

model = dict(
    num_attention_heads=16,
    vocab_size=92544,
    hidden_size=1024,
    num_layers=24,
    mlp_ratio=1.5,
    multiple_of=128,
    no_bias=True,
    num_experts=16,
    moe_type="GShard",  # or "Dropless": every token reaches its top_k experts
    moe_use_residual=False,
)

moe = dict(top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, drop_tokens=True)

loss = dict(label_smoothing=0, moe_loss_coeff=0.1)

# experts are replicated on every rank and sharded by zero1 like the other weights (expert
# parallelism, parallel.expert.size > 1, is not built yet)
parallel = dict(zero1=dict(size=-1), expert=dict(size=1))
