# The shape of InternLM2-1.8B (hidden 2048, 24 layers, 16 query / 8 KV heads, FFN 8192, vocab 92544)
# at 4096 tokens per sequence, bf16, for GPU throughput benchmarks:
#     python tools/benchmark.py --config configs/bench_1.8b.py --compare hf
#     python tools/gpu_check.py            # runs it with and without compile / selective checkpointing
# Trains on generated tokens (no data folders). Parameters: embedding and head 2 x 92544 x 2048 =
# 379M, 24 layers x 62.9M = 1.51B; 1.89B in all. See doc/train_performance.md.
JOB_NAME = "bench_1.8b"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 4096
HIDDEN_SIZE = 2048
NUM_LAYER = 24
NUM_ATTENTION_HEAD = 16
NUM_KV_ATTENTION_HEAD = 8
VOCAB_SIZE = 92544
TOTAL_STEPS = 1000

model = dict(
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    vocab_size=VOCAB_SIZE,
    intermediate_size=8192,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=1000000,
    max_position_embeddings=SEQ_LEN,
    tie_word_embeddings=False,
    checkpoint=False,
    num_chunks=1,
    use_flash_attn=True,  # flash-attn when installed; else PyTorch's varlen flash kernel on CUDA
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,  # 4 x 4096 = 16384 tokens per optimizer step
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
