# A ~125M-parameter InternLM2-shaped model (grouped-query attention) for throughput benchmarks:
#     python tools/benchmark.py --config configs/bench_100m.py --compare hf
# It trains on generated tokens (no data folders); see doc/train_performance.md.
# Parameters: embedding and head 2 x 32000 x 768 = 49.2M, 12 layers x 6.29M = 75.5M.
JOB_NAME = "bench_100m"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 1024
HIDDEN_SIZE = 768
NUM_LAYER = 12
NUM_ATTENTION_HEAD = 12
NUM_KV_ATTENTION_HEAD = 4
VOCAB_SIZE = 32000
MLP_RATIO = 8 / 3  # FFN width 2048
TOTAL_STEPS = 1000

model = dict(
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    vocab_size=VOCAB_SIZE,
    mlp_ratio=MLP_RATIO,
    multiple_of=256,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=1000000,
    max_position_embeddings=SEQ_LEN,
    tie_word_embeddings=False,
    checkpoint=False,
    num_chunks=1,
    use_flash_attn=True,  # only used on CUDA when flash-attn is installed
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=1,
    micro_bsz=1,
    valid_every=0,
    total_steps=TOTAL_STEPS,
    train_folder=None,  # generated tokens
    valid_folder=None,
)

hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

adam = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)

lr_scheduler = dict(total_steps=TOTAL_STEPS, warmup_ratio=0.01, eta_min=3e-5)

parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1),
)

ckpt = dict(enable_save_ckpt=False)

monitor = dict(log_every=1)

seed = 1024
