# A tiny InternLM2-shaped model (grouped-query attention) that trains on CPU in minutes.
# The demo script builds demo_data/ (token files and a 4000-piece tokenizer) before training with it;
# to load this config without that data, pass `data.train_folder=None data.valid_folder=None`.
JOB_NAME = "demo"
model_type = "INTERNLM2_PUBLIC"

SEQ_LEN = 256
HIDDEN_SIZE = 256
NUM_LAYER = 4
NUM_ATTENTION_HEAD = 8
NUM_KV_ATTENTION_HEAD = 2
VOCAB_SIZE = 4000  # must match demo_data/tokenizer/tokenizer.model
MLP_RATIO = 8 / 3
TOTAL_STEPS = 300

model = dict(
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    vocab_size=VOCAB_SIZE,
    mlp_ratio=MLP_RATIO,
    multiple_of=64,  # FFN width 704
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=10000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    checkpoint=False,  # activation checkpointing: True/False or the fraction of layers
    num_chunks=1,
    use_flash_attn=True,  # only used on CUDA when flash-attn is installed
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=2,  # micro-batches per optimizer step (gradient accumulation)
    micro_bsz=4,  # packed length = micro_bsz * seq_len tokens
    valid_micro_num=8,
    valid_every=100,
    total_steps=TOTAL_STEPS,
    min_length=0,
    train_folder="demo_data/train",
    valid_folder="demo_data/valid",
    tokenizer_path="demo_data/tokenizer/tokenizer.model",
)

hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

adam = dict(lr=2e-3, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(total_steps=TOTAL_STEPS, warmup_ratio=0.05, eta_min=2e-4)

parallel = dict(
    zero1=dict(size=-1),  # shard optimizer state over all data-parallel ranks
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1),
)

ckpt = dict(
    enable_save_ckpt=True,  # the tour exports, inspects and samples the final checkpoint
    save_ckpt_folder="runs/demo/ckpt",
    checkpoint_every=100,
    keep_last=2,
)

monitor = dict(log_every=10)

seed = 1024
