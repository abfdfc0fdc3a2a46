# InternLM3-8B: 48 layers, grouped-query attention with only 2 key/value heads (head_dim 128),
# no biases, rope base 5e7 with dynamic NTK scaling (factor 6) beyond 32768 positions, 128512 tokens.
# The shape matches the published internlm3-8b config, so `ckpt.load_ckpt_info` with ckpt_type="hf"
# can start from those weights.
JOB_NAME = "8b_internlm3_train"
model_type = "INTERNLM3"

VOCAB_SIZE = 128512
SEQ_LEN = 4096
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
NUM_KV_ATTENTION_HEAD = 2
HEAD_DIM = 128
INTERMEDIATE_SIZE = 10240  # = 2.5 * HIDDEN_SIZE
NUM_LAYER = 48

TRAIN_FOLDER = None  # "/path/to/dataset/train"
VALID_FOLDER = None
TOKENIZER_PATH = None
MODEL_ONLY_FOLDER = None  # a Hugging Face internlm3-8b folder to start from
SAVE_CKPT_FOLDER = "local:llm_ckpts"
CHECKPOINT_EVERY = 50
TOTAL_STEPS = 20000

model = dict(
    checkpoint=True,  # recompute activations in backward: 48 layers at 4096 tokens need it on 80 GB
    num_chunks=1,
    num_attention_heads=NUM_ATTENTION_HEAD,
    num_kv_attention_heads=NUM_KV_ATTENTION_HEAD,
    head_dim=HEAD_DIM,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    intermediate_size=INTERMEDIATE_SIZE,
    no_bias=True,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=50000000,
    rope_scaling=dict(type="dynamic", factor=6.0),
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    use_flash_attn=True,
    qk_interleaved=False,
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,
    micro_bsz=1,
    valid_micro_num=4,
    valid_every=0,
    pack_sample_into_one=False,
    total_steps=TOTAL_STEPS,
    skip_batches="",
    rampup_batch_size="",
    min_length=50,
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    tokenizer_path=TOKENIZER_PATH,
)

grad_scaler = dict(
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True,
    overlap_sync_param=True,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(total_steps=TOTAL_STEPS, init_steps=0, warmup_ratio=0.01, eta_min=1e-5, last_epoch=-1)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

# InternEvo's layout for this model: isp with every weight sharded 16 ways (weight parallelism; beyond
# the isp group of 1 that is zero1 sharding, raised to 16 or to the data-parallel size), gathered for
# each use. For long sequences raise tensor.size (sequence parallelism) and turn on sequence_2D: with 2
# key/value heads the head degree stops at 2, the context degree takes the rest (doc/parallel.md).
parallel = dict(
    zero1=dict(size=1),
    tensor=dict(size=1, mode="isp"),
    pipeline=dict(size=1, interleaved_overlap=True, mode="1f1b"),
    weight=dict(size=16, overlap=True),
    sequence_2D=dict(enable=False, head_size=2, context_size=4, window_size=1,
                     device_placement_strategy=dict(head_first=True, interleaved=False)),
)

ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    # e.g. dict(path=MODEL_ONLY_FOLDER, content=("model",), ckpt_type="hf") with auto_resume=False
    load_ckpt_info=None,
    auto_resume=False,
    checkpoint_every=CHECKPOINT_EVERY,
    oss_snapshot_freq=CHECKPOINT_EVERY // 2,
)

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(tensorboard=dict(queue_max_length=10))
