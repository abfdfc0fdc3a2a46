"""Hugging Face weights under parallel layouts, through the real trainer (train.py under torchrun).

1. Import: a random HF model, loaded with `ckpt.load_ckpt_info=dict(path=HF_DIR, ckpt_type="hf")`,
   trains the same first steps under tp=2 (from InternLM2's fused-wqkv layout of the same weights)
   and under dp=2 with FSDP as in one process (from the llama layout), and so does the checkpoint
   that tools/convert_hf2internlm.py writes, loaded with ckpt_type="internlm".
2. Export: a model trained under tp=2 x pp=2 and saved as a sharded DCP checkpoint converts to a
   transformers folder whose logits equal `load_model`'s and the checkpoint module's own loading.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from tests import launcher
from tests.helpers import tiny_model_args

transformers = pytest.importorskip("transformers")

STEPS = 2
TOL = 1e-4
# the tiny model of the launcher's runs (INTERNLM2_PUBLIC, hidden 64, 4 heads / 2 kv heads, 4 layers,
# vocab 128, FFN 192) as a transformers config
_TINY = tiny_model_args()
HF_SHAPE = dict(vocab_size=_TINY.vocab_size, hidden_size=_TINY.hidden_size, intermediate_size=_TINY.intermediate_size,
                num_hidden_layers=_TINY.num_layers, num_attention_heads=_TINY.num_attention_heads,
                num_key_value_heads=_TINY.num_kv_attention_heads, max_position_embeddings=_TINY.max_position_embeddings,
                rms_norm_eps=_TINY.norm_eps, tie_word_embeddings=False)


def _convert2hf():
    return importlib.import_module("internlm.cli.convert2hf")


def random_hf_llama(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if name.endswith("norm.weight") else 0.05 * torch.randn(p.shape))
    model.save_pretrained(str(folder))
    return model


def write_internlm2_layout(ref, folder: Path):
    """The same weights in InternLM2's published layout: per kv group [q.., k, v] heads fused in wqkv."""
    from safetensors.torch import save_file

    c = ref.config
    kv, group, hd = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads, c.head_dim
    sd = ref.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        qkv = [sd[p + f"self_attn.{n}_proj.weight"].reshape(kv, -1, hd, c.hidden_size) for n in "qkv"]
        out[p + "attention.wqkv.weight"] = torch.cat(qkv, dim=1).reshape(-1, c.hidden_size)
        for ours, theirs in (("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                             ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"),
                             ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            out[p + ours + ".weight"] = sd[p + theirs + ".weight"]
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    config = dict(model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False, hidden_act="silu",
                  rope_theta=10000.0, rope_scaling=None, torch_dtype="float32", **HF_SHAPE)
    (folder / "config.json").write_text(json.dumps(config))
    assert group * kv == c.num_attention_heads


def load_hf(path: Path) -> list[str]:
    return [f"ckpt.load_ckpt_info={{'path': {str(path)!r}, 'content': ['model'], 'ckpt_type': 'hf'}}",
            "ckpt.auto_resume=False"]


def test_hf_import_tp2_trains_like_one_process(tmp_path):
    ref = random_hf_llama(tmp_path / "llama")
    write_internlm2_layout(ref, tmp_path / "internlm2")
    steps = f"data.total_steps={STEPS}"
    single = launcher.run(1, [f"data.micro_num={launcher.GLOBAL_MICRO}", steps, *load_hf(tmp_path / "llama")],
                         tmp_path / "single")
    assert single.returncode == 0, single.tail()
    from internlm.hf import import_hf_to_ckpt

    import_hf_to_ckpt(tmp_path / "internlm2", tmp_path / "imported", progress=False)  # convert_hf2internlm
    from_ckpt = [f"ckpt.load_ckpt_info={{'path': {str(tmp_path / 'imported')!r}, 'content': ['model'], "
                 f"'ckpt_type': 'internlm'}}", "ckpt.auto_resume=False"]
    layouts = {
        "tp2 (InternLM2 fused layout)": [f"data.micro_num={launcher.GLOBAL_MICRO}", *load_hf(tmp_path / "internlm2"),
                                         "parallel.tensor.size=2"],
        "dp2 fsdp (llama layout)": [f"data.micro_num={launcher.GLOBAL_MICRO // 2}", *load_hf(tmp_path / "llama"),
                                    "parallel.zero1.size=-1", "parallel.zero1.fsdp=True"],
        "tp2 msp (imported checkpoint)": [f"data.micro_num={launcher.GLOBAL_MICRO}", *from_ckpt,
                                          "parallel.tensor.size=2", "parallel.tensor.mode='msp'"],
    }
    for i, (name, overrides) in enumerate(layouts.items()):
        got = launcher.run(2, [steps, *overrides], tmp_path / f"layout{i}")
        assert got.returncode == 0, got.tail()
        assert ("loaded Hugging Face weights" in got.stdout) != ("imported" in name), got.tail()
        parity = launcher.compare(single, got, STEPS)
        print(f"HF import, {name} vs one process: {parity}")
        assert parity.loss <= TOL and parity.grad_norm <= TOL, (name, parity)
    # the weights really came from the HF folder: the same run from the seeded init starts elsewhere
    init = launcher.run(1, [f"data.micro_num={launcher.GLOBAL_MICRO}", "data.total_steps=1"], tmp_path / "init")
    assert init.returncode == 0 and init.records, init.tail()
    assert abs(init.records[0]["loss"] - single.records[0]["loss"]) > 1e-3


def test_train_tp2_pp2_then_export_matches_load_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from internlm.builders import model_args
    from internlm.checkpoint import state as ckpt_tensors
    from internlm.config import load_config
    from internlm.inference import load_model
    from internlm.model.internlm import InternLM

    ckpt_root = tmp_path / "ckpt"
    run = launcher.run(4, [f"data.micro_num={launcher.GLOBAL_MICRO}", "data.total_steps=2",
                          "parallel.tensor.size=2", "parallel.pipeline.size=2", "ckpt.enable_save_ckpt=True",
                          f"ckpt.save_ckpt_folder={str(ckpt_root)!r}", "ckpt.checkpoint_every=2"],
                      tmp_path / "train", timeout=600)
    assert run.returncode == 0, run.tail()
    assert (ckpt_root / "2" / "COMPLETE").is_file(), run.tail()

    out = tmp_path / "hf"
    assert _convert2hf().main(["--src", str(ckpt_root), "--tgt", str(out), "--dtype", "float32",
                               "--max_shard", "100KB", "--no_progress"]) == 0
    ids = torch.randint(0, _TINY.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ours = load_model(ckpt_root)
    with torch.no_grad():
        logits = ours(ids)
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    diff = (logits - theirs).abs().max().item()
    print(f"tp2 x pp2 checkpoint -> HF: max |logit diff| = {diff:.3e}")
    assert diff < TOL
    # the checkpoint module's own (DCP resharding) load gives the same model
    direct = InternLM(model_args(load_config(ckpt_root / "2" / "config.yaml",
                                                        ["data.train_folder=None", "data.valid_folder=None"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_tensors.load_model([direct], ckpt_root / "2")
    with torch.no_grad():
        torch.testing.assert_close(direct.eval()(ids), logits, atol=0, rtol=0)
