# InternLM-7B (the first InternLM): multi-head attention with q/k/v and output biases, 103168 tokens.
# Set TRAIN_FOLDER / VALID_FOLDER (tokenized .bin/.bin.meta folders) and TOKENIZER_PATH before training,
# or override them on the command line: data.train_folder=/path/to/train
JOB_NAME = "7b_train"
model_type = "INTERNLM"

SEQ_LEN = 2048
HIDDEN_SIZE = 4096
NUM_ATTENTION_HEAD = 32
MLP_RATIO = 8 / 3
NUM_LAYER = 32
VOCAB_SIZE = 103168

TRAIN_FOLDER = None  # "/path/to/dataset/train"
VALID_FOLDER = None  # "/path/to/dataset/valid"
TOKENIZER_PATH = None  # "/path/to/tokenizer.model"
SAVE_CKPT_FOLDER = "local:llm_ckpts"
CHECKPOINT_EVERY = 50
TOTAL_STEPS = 50000

model = dict(
    checkpoint=False,  # True/False, or the fraction of layers to recompute in backward
    num_attention_heads=NUM_ATTENTION_HEAD,
    embed_split_hidden=True,
    vocab_size=VOCAB_SIZE,
    embed_grad_scale=1,
    parallel_output=True,
    hidden_size=HIDDEN_SIZE,
    num_layers=NUM_LAYER,
    mlp_ratio=MLP_RATIO,  # FFN width 11008
    multiple_of=256,
    apply_post_layer_norm=False,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    use_flash_attn=True,
    num_chunks=1,  # model chunks per pipeline rank; > 1 selects an interleaved schedule
)

data = dict(
    seq_len=SEQ_LEN,
    micro_num=4,  # micro-batches per optimizer step
    micro_bsz=2,  # packed length = micro_bsz * SEQ_LEN
    valid_micro_num=4,
    valid_every=50,  # 0 disables evaluation
    pack_sample_into_one=False,
    total_steps=TOTAL_STEPS,
    skip_batches="",
    rampup_batch_size="",
    min_length=50,  # drop documents shorter than this many tokens
    train_folder=TRAIN_FOLDER,
    valid_folder=VALID_FOLDER,
    tokenizer_path=TOKENIZER_PATH,
    empty_cache_and_diag_interval=200,
    diag_outlier_ratio=1.1,
)

grad_scaler = dict(  # used only with dtype="torch.float16"
    fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000),
    growth_factor=2,
    backoff_factor=0.5,
    max_scale=2**24,
    hysteresis=2,  # overflows tolerated before the scale is lowered
)

hybrid_zero_optimizer = dict(
    overlap_sync_grad=True,
    overlap_sync_param=False,
    reduce_bucket_size=512 * 1024 * 1024,
    clip_grad_norm=1.0,
)

loss = dict(label_smoothing=0)

adam = dict(lr=1e-4, adam_beta1=0.9, adam_beta2=0.95, adam_beta2_c=0, adam_eps=1e-8, weight_decay=0.01)

lr_scheduler = dict(
    total_steps=TOTAL_STEPS,
    init_steps=0,
    warmup_ratio=0.01,
    eta_min=1e-5,
    last_epoch=-1,
)

beta2_scheduler = dict(init_beta2=adam["adam_beta2"], c=adam["adam_beta2_c"], cur_iter=-1)

# zero1.size: ranks that shard parameters, gradients and optimizer state; -1 = all data-parallel ranks,
# 1 = plain replication, 8 = shard within a node and replicate across nodes.
parallel = dict(
    zero1=dict(size=8, fsdp=False),
    tensor=dict(size=1, mode="mtp"),  # "msp" adds sequence parallelism
    pipeline=dict(size=1, interleaved_overlap=True, mode="1f1b"),
    weight=dict(size=1, overlap=True, memory_pool=True),
)

ckpt = dict(
    enable_save_ckpt=False,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    # To start from another model's weights: load_ckpt_info=dict(path=..., content=("model",), ckpt_type="hf")
    # (or "llama" for Meta's consolidated.*.pth). With auto_resume=True it is used when there is nothing to
    # resume and the path exists (InternEvo would ignore it); auto_resume=False makes a missing path an error.
    load_ckpt_info=None,
    auto_resume=True,  # resume from the latest checkpoint in save_ckpt_folder if there is one
    checkpoint_every=CHECKPOINT_EVERY,
    oss_snapshot_freq=CHECKPOINT_EVERY // 2,
)

cudnn_deterministic = False
cudnn_benchmark = False

monitor = dict(
    alert=dict(enable_feishu_alert=False, feishu_alert_address=None, light_monitor_address=None),
    tensorboard=dict(queue_max_length=10),
)
