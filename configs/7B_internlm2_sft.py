# Finetune a Hugging Face InternLM2 / InternLM2.5 7B (e.g. internlm2_5-7b or internlm2_5-7b-chat) on chat or
# instruction data with loss masks (only the assistant turns carry loss). The .jsonl files are read and
# tokenized on the fly (data.type="streaming"); the weights come from the HF folder (ckpt_type="hf").
# Set HF_MODEL and TRAIN_FOLDER, or override them on the command line:
#     torchrun --nproc_per_node 8 train.py --config configs/7B_internlm2_sft.py \
#         ckpt.load_ckpt_info.path=/models/internlm2_5-7b data.train_folder=/data/chat \
#         data.tokenizer_path=/models/internlm2_5-7b/tokenizer.model
# then export with the chat template: python tools/convert2hf.py --src runs/7b_sft/ckpt/<step> --tgt hf_sft
# (doc/finetune.md walks through it with a tiny model).
JOB_NAME = "7b_internlm2_sft"
model_type = "INTERNLM2_PUBLIC"

HF_MODEL = "/path/to/internlm2_5-7b"  # config.json, *.safetensors, tokenizer.model (+ tokenizer_config.json)
TRAIN_FOLDER = "/path/to/chat_data"  # .jsonl/.json/.parquet files or a datasets save_to_disk folder
SAVE_CKPT_FOLDER = "runs/7b_sft/ckpt"
TOTAL_STEPS = 2000

# InternLM2.5-7B's shape (checked against the HF config.json when the weights load)
model = dict(
    checkpoint=True,  # finetuning at 4096 tokens: recompute activations
    num_attention_heads=32,
    num_kv_attention_heads=8,
    vocab_size=92544,
    hidden_size=4096,
    num_layers=32,
    intermediate_size=14336,
    no_bias=True,
    dtype="torch.bfloat16",
    norm_type="rmsnorm",
    layer_norm_epsilon=1e-5,
    rope_base=1000000,
    max_position_embeddings=32768,
    use_flash_attn=True,
)

data = dict(
    type="streaming",
    format="auto",  # chat ("messages") or instruction (alpaca) records, detected per file
    seq_len=4096,
    micro_num=4,
    micro_bsz=1,
    total_steps=TOTAL_STEPS,
    valid_every=0,
    num_worker=2,  # tokenizer processes
    train_folder=TRAIN_FOLDER,
    tokenizer_path=HF_MODEL + "/tokenizer.model",
)

hybrid_zero_optimizer = dict(clip_grad_norm=1.0)

adam = dict(lr=2e-5, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.0)

lr_scheduler = dict(total_steps=TOTAL_STEPS, warmup_ratio=0.03, eta_min=2e-6)

parallel = dict(
    zero1=dict(size=-1),
    tensor=dict(size=1, mode="mtp"),
    pipeline=dict(size=1),
)

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder=SAVE_CKPT_FOLDER,
    checkpoint_every=500,
    auto_resume=True,  # a restarted job resumes its own checkpoints first
    # the HF weights, when there is nothing to resume (weights only: a fresh optimizer and data position);
    # unlike InternEvo, which ignores load_ckpt_info under auto_resume (doc/checkpoint.md#resuming)
    load_ckpt_info=dict(path=HF_MODEL, content=("model",), ckpt_type="hf"),
)

monitor = dict(log_every=10)
