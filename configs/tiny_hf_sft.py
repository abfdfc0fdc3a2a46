# The HF-to-HF finetuning walkthrough at toy size (doc/finetune.md; tests/e2e/test_hf_sft.py runs it):
# load a Hugging Face Llama-architecture folder, finetune it on chat .jsonl with loss masks, save, then
# `tools/convert2hf.py` exports it with the chat template. The same shape as configs/7B_internlm2_sft.py
# with a model small enough for a CPU. Paths are set on the command line:
#     python train.py --config configs/tiny_hf_sft.py ckpt.load_ckpt_info.path=HF_DIR \
#         data.train_folder=CHAT_DIR data.tokenizer_path=HF_DIR/tokenizer.model
JOB_NAME = "tiny_hf_sft"
model_type = "LLAMA2"

HF_MODEL = "runs/tiny_hf/base"
TOTAL_STEPS = 8

model = dict(
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=640,
    hidden_size=64,
    num_layers=2,
    intermediate_size=96,
    dtype="torch.float32",
    layer_norm_epsilon=1e-5,
    rope_base=10000,
    max_position_embeddings=256,
)

data = dict(
    type="streaming",
    format="chat",
    seq_len=64,
    micro_num=2,
    micro_bsz=2,
    total_steps=TOTAL_STEPS,
    valid_every=0,
    train_folder="runs/tiny_hf/chat",
    tokenizer_path=HF_MODEL + "/tokenizer.model",
)

adam = dict(lr=1e-3, weight_decay=0.0)
lr_scheduler = dict(total_steps=TOTAL_STEPS, warmup_ratio=0.25, eta_min=1e-4)

ckpt = dict(
    enable_save_ckpt=True,
    save_ckpt_folder="runs/tiny_hf/sft_ckpt",
    checkpoint_every=TOTAL_STEPS,
    auto_resume=True,  # a restarted job resumes its checkpoints; the first start loads HF_MODEL
    load_ckpt_info=dict(path=HF_MODEL, content=("model",), ckpt_type="hf"),
)

monitor = dict(log_every=1)
