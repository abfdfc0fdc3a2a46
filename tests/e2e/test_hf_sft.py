"""Hugging Face in, Hugging Face out: finetune an HF Llama-architecture folder on chat .jsonl with loss
masks through `train.py --config configs/tiny_hf_sft.py`, export it with `tools/convert2hf.py`, and use
it in transformers with no remote code: `apply_chat_template` gives our prompt ids and `generate` our
greedy answer, stopping at <|im_end|>."""
from __future__ import annotations

import json

import pytest
import torch

from tests import launcher
from tests.helpers import ROOT, run_python

pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

CONFIG = ROOT / "configs" / "tiny_hf_sft.py"
QUESTIONS = ["what is two plus two?", "name a prime number", "say hello", "count to three"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, spm_model):
    """A random HF Llama of configs/tiny_hf_sft.py's shape with our tokenizer files, and chat data."""
    from internlm.hf.tokenizer_files import write_tokenizer_files

    root = tmp_path_factory.mktemp("hf_sft")
    conf = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(str(root / "base"))
    write_tokenizer_files(spm_model, root / "base")
    (root / "chat").mkdir()
    with open(root / "chat" / "chat.jsonl", "w") as f:
        for i in range(200):
            q = QUESTIONS[i % len(QUESTIONS)]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{q} ({i})"},
                                             {"role": "assistant", "content": f"answer {i % 7}"}]}) + "\n")
    return root


def test_finetune_hf_and_export_with_chat_template(base, tmp_path):
    from internlm.data.chat import ChatEncoder
    from internlm.inference import generate, load_model

    ckpt = tmp_path / "ckpt"
    run = launcher.run(1, [f"ckpt.load_ckpt_info.path={str(base / 'base')!r}",
                           f"data.train_folder={str(base / 'chat')!r}",
                           f"data.tokenizer_path={str(base / 'base' / 'tokenizer.model')!r}",
                           f"ckpt.save_ckpt_folder={str(ckpt)!r}"], tmp_path / "work", 240.0, config=CONFIG)
    assert run.returncode == 0, run.tail()
    assert "loaded Hugging Face weights from" in run.out
    steps = run.by_step()
    assert sorted(steps) == list(range(1, 9))
    # masks: only the answers (and their <|im_end|>) carry loss, a small share of the tokens
    assert 0 < steps[8]["num_loss_tokens"] < 0.5 * steps[8]["num_consumed_tokens"]
    assert steps[8]["loss"] < steps[1]["loss"]

    out = tmp_path / "hf_out"
    proc = run_python([ROOT / "tools" / "convert2hf.py", "--src", ckpt / "8", "--tgt", out], timeout=240)
    assert proc.returncode == 0, proc.stderr
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "8" / "tokenizer.model"))
    encoder = ChatEncoder(sp, ckpt / "8" / "tokenizer.model")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hello (3)"}]
    ours = encoder.encode_prompt(messages)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == ours

    model = load_model(ckpt / "8")
    stop = [encoder.end, sp.eos_id()]
    want = generate(model, ours, max_new_tokens=12, greedy=True, eos_token_id=stop)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert encoder.end in hf.generation_config.eos_token_id
    with torch.no_grad():
        got = hf.generate(torch.tensor([ours]), max_new_tokens=12, do_sample=False)[0, len(ours):].tolist()
    assert got == want
