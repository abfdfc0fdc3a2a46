"""Hugging Face interoperability: export, import, tokenizer files, load_model and generation.

Every check compares against transformers itself (no remote code), in fp32 on CPU.
"""
import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from internlm import hf  # noqa: E402
from internlm.builders import model_args  # noqa: E402
from internlm.config import config_from_dict, dump_yaml, load_config  # noqa: E402
from internlm.inference import _filter_top_p, generate, load_model  # noqa: E402
from internlm.model.internlm import InternLM, ModelArgs  # noqa: E402
from tests.helpers import random_hf_llama, run_python  # noqa: E402

VOCAB = 96
TOL = 1e-4


def _tool(name):
    return importlib.import_module(f"internlm.cli.{name}")


def tiny_config(model_type, seq_len=16, **model_kw):
    model = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, multiple_of=16,
                 dtype="torch.float32", max_position_embeddings=64)
    model.update(model_kw)
    return config_from_dict({"model_type": model_type, "model": model, "data": {"seq_len": seq_len}})


def random_model(cfg, seed=0):
    """Our model with random weights (norms and biases too, so a mapping mistake cannot hide)."""
    args = model_args(cfg)
    torch.manual_seed(seed)
    model = InternLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            else:
                p.copy_(0.3 * torch.randn(p.shape))
    return model.eval()


def write_ckpt(model, cfg, folder):
    """A checkpoint in the training contract: DCP with keys model.<name>, config.yaml, meta.json."""
    import torch.distributed.checkpoint as dcp

    sd = {f"model.{k}": v for k, v in model.state_dict().items()}  # the head too when tied, as the trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=str(folder), no_dist=True)
    dump_yaml(cfg, Path(folder) / "config.yaml")
    step = int(Path(folder).name) if Path(folder).name.isdigit() else 5
    (Path(folder) / "meta.json").write_text(json.dumps({"step": step}))
    (Path(folder) / "COMPLETE").write_text("")  # written last, as the checkpoint manager does
    return folder


def hf_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


CASES = {
    # name: (model_type, model overrides, transformers target)
    "internlm_v1": ("INTERNLM", {}, "llama"),
    "internlm2": ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2), "llama"),
    "internlm3": ("INTERNLM3", dict(num_kv_attention_heads=2, head_dim=32), "internlm3"),
    "internlm3_as_llama": ("INTERNLM3", dict(num_kv_attention_heads=2, head_dim=32), "llama"),
    "llama2": ("LLAMA2", dict(num_kv_attention_heads=1, rope_base=500000.0, layer_norm_epsilon=1e-6), "llama"),
    "tied": ("LLAMA2", dict(num_kv_attention_heads=2, tie_word_embeddings=True), "llama"),
    # InternEvo's norm_head: exported as the normalised output matrix
    "norm_head": ("INTERNLM2_PUBLIC", dict(num_kv_attention_heads=2, norm_head=True), "llama"),
    "dynamic_rope": ("INTERNLM3", dict(num_kv_attention_heads=2, head_dim=16, max_position_embeddings=16,
                                       rope_scaling=dict(type="dynamic", factor=4.0)), "internlm3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_logits(case, tmp_path, capsys):
    model_type, kw, target = CASES[case]
    cfg = tiny_config(model_type, **kw)
    model = random_model(cfg)
    ckpt = write_ckpt(model, cfg, tmp_path / "ckpt" / "5")
    out = tmp_path / "hf"
    rc = _tool("convert2hf").main(["--src", str(tmp_path / "ckpt"), "--tgt", str(out), "--dtype", "float32",
                                   "--max_shard", "30KB", "--model_type", target, "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    assert ckpt.exists()
    # the config loads with no remote code and says what it is
    config = AutoConfig.from_pretrained(str(out))
    assert config.model_type == target
    assert config.num_key_value_heads == model.args.num_kv_attention_heads
    assert config.head_dim == model.args.head_dim
    assert config.tie_word_embeddings == model.args.tie_word_embeddings
    # sharded with an index naming every file
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert ("lm_head.weight" in index["weight_map"]) != model.args.tie_word_embeddings
    # 40 positions: beyond max_position_embeddings=16 for the dynamic-rope case, so the scaling is exercised
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(out, ids)
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit diff| = {diff:.3e}")
    assert diff < TOL
    assert ours.abs().max() > 0.1  # non-trivial logits


def test_dynamic_rope_is_really_used(tmp_path):
    """The dynamic-rope export differs from the same weights without scaling on long inputs."""
    model_type, kw, target = CASES["dynamic_rope"]
    cfg = tiny_config(model_type, **kw)
    model = random_model(cfg)
    hf.export_model_to_hf(model, tmp_path / "hf", target=target, dtype=torch.float32, progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0}
    model.args.rope_scaling = None
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        assert (model(ids) - hf_logits(tmp_path / "hf", ids)).abs().max() > 1e-3


def test_export_bf16_and_config_fields(tmp_path):
    cfg = tiny_config("INTERNLM2_PUBLIC", num_kv_attention_heads=2, rope_base=1e6, layer_norm_epsilon=1e-6,
                      max_position_embeddings=128)
    model = random_model(cfg)
    write_ckpt(model, cfg, tmp_path / "ckpt")
    report = hf.export_ckpt_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    assert report.target == "llama" and report.shards == 1
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key, value in dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=128, num_key_value_heads=2,
                           intermediate_size=model.args.intermediate_size, vocab_size=VOCAB, torch_dtype="bfloat16",
                           attention_bias=False, tie_word_embeddings=False).items():
        assert config[key] == value, key
    with safe_open(str(tmp_path / "hf" / "model-00001-of-00001.safetensors"), "pt") as f:
        t = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert t.dtype == torch.bfloat16
    torch.testing.assert_close(t, model.layers["1"].feed_forward.w2.weight.detach().to(torch.bfloat16))
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("model_type,kw,target,words", [
    ("INTERNLM", {}, "internlm3", "attention_bias"),
    ("INTERNLM3", dict(num_attention_heads=3, num_kv_attention_heads=1, head_dim=16), "llama", "multiple"),
])
def test_export_refuses_what_target_cannot_express(model_type, kw, target, words, tmp_path, capsys):
    cfg = tiny_config(model_type, **kw)
    write_ckpt(random_model(cfg), cfg, tmp_path / "ckpt")
    rc = _tool("convert2hf").main(["--src", str(tmp_path / "ckpt"), "--tgt", str(tmp_path / "hf"),
                                   "--model_type", target, "--no_progress"])
    assert rc == 2
    assert words in capsys.readouterr().err


def test_export_names_a_missing_tensor(tmp_path):
    cfg = tiny_config("LLAMA2")
    model = random_model(cfg)
    write_ckpt(model, cfg, tmp_path / "ckpt")
    cfg2 = tiny_config("LLAMA2", num_layers=3)  # the config promises a layer the weights lack
    dump_yaml(cfg2, tmp_path / "ckpt" / "config.yaml")
    with pytest.raises(hf.ConversionError, match="model.layers.2"):
        hf.export_ckpt_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)


# ------------------------------------------------------------------------------------------ import

def random_llama(tmp_path, name="llama", **kw):
    model = random_hf_llama(VOCAB, **kw)
    folder = tmp_path / name
    model.save_pretrained(str(folder), max_shard_size="40KB")
    return model, folder


def test_llama_round_trip_identical_tensors(tmp_path, capsys):
    ref, folder = random_llama(tmp_path, attention_bias=True, num_key_value_heads=4)
    assert (folder / "model.safetensors.index.json").exists()  # a sharded input
    ckpt = tmp_path / "ckpt"
    rc = _tool("convert_hf2internlm").main(["--src", str(folder), "--tgt", str(ckpt), "--config",
                                            str(tmp_path / "train.yaml"), "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    cfg = load_config(ckpt / "config.yaml")
    assert cfg.model_type == "INTERNLM"  # MHA with q/k/v/o biases is InternLM v1
    assert json.loads((ckpt / "meta.json").read_text())["source"] == "huggingface"
    train_cfg = load_config(tmp_path / "train.yaml")
    assert train_cfg.ckpt.load_ckpt_info == {"path": str(ckpt), "content": ["model"], "ckpt_type": "internlm"}
    out = tmp_path / "back"
    assert _tool("convert2hf").main(["--src", str(ckpt), "--tgt", str(out), "--dtype", "float32",
                                     "--no_progress"]) == 0
    original = hf.HFWeights(folder)
    exported = hf.HFWeights(out)
    assert set(original.keys()) == set(exported.keys())
    for key in original.keys():
        assert torch.equal(original.get(key), exported.get(key)), key
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_model(ckpt)(ids), ref(ids).logits, atol=TOL, rtol=0)


def test_imported_checkpoint_is_complete_for_the_checkpoint_module(tmp_path):
    from internlm.checkpoint import layout
    from internlm.checkpoint import state as ckpt_tensors

    ref, folder = random_llama(tmp_path, tie_word_embeddings=True)
    info = hf.import_hf_to_ckpt(folder, tmp_path / "ckpt", progress=False)
    assert layout.check_checkpoint(tmp_path / "ckpt").step == 0
    args = model_args(load_config(tmp_path / "ckpt" / "config.yaml"))
    assert args.tie_word_embeddings and args.model_type == "LLAMA2" and info["tensors"] == args.num_layers * 9 + 3
    model = InternLM(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_tensors.load_model([model], tmp_path / "ckpt")  # what load_ckpt_info(content=("model",)) runs
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=TOL, rtol=0)
    with pytest.raises(hf.ConversionError, match="already holds"):
        hf.import_hf_to_ckpt(folder, tmp_path / "ckpt", progress=False)


def test_import_pytorch_bin_and_tied(tmp_path):
    ref, _ = random_llama(tmp_path, tie_word_embeddings=True)
    folder = tmp_path / "bin"
    folder.mkdir()
    ref.config.save_pretrained(str(folder))
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, folder / "pytorch_model.bin")
    model = load_model(folder)
    assert model.args.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=TOL, rtol=0)


def fuse_internlm2(ref: LlamaForCausalLM, folder: Path):
    """Write the weights of a HF llama model in InternLM2's published layout (fused, GQA-interleaved wqkv)."""
    c = ref.config
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    group = heads // kv
    sd = ref.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].reshape(kv, group, hd, -1)
        k = sd[p + "self_attn.k_proj.weight"].reshape(kv, 1, hd, -1)
        v = sd[p + "self_attn.v_proj.weight"].reshape(kv, 1, hd, -1)
        out[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    config = dict(model_type="internlm2", architectures=["InternLM2ForCausalLM"], vocab_size=c.vocab_size,
                  hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                  rope_theta=c.rope_parameters["rope_theta"], rope_scaling=None, bias=False,
                  hidden_act="silu", tie_word_embeddings=False, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))


def test_internlm2_fused_wqkv_import_matches_llama(tmp_path):
    ref, _ = random_llama(tmp_path, num_attention_heads=8, num_key_value_heads=2)
    fuse_internlm2(ref, tmp_path / "internlm2")
    model = load_model(tmp_path / "internlm2")
    assert model.args.model_type == "INTERNLM2_PUBLIC" and model.args.num_kv_attention_heads == 2
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff < TOL
    # and it exports to a llama folder holding the very same q/k/v as the original
    hf.export_model_to_hf(model, tmp_path / "out", dtype=torch.float32, progress=False)
    back = hf.HFWeights(tmp_path / "out")
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.1.self_attn.{name}.weight"
        assert torch.equal(back.get(key), ref.state_dict()[key])


def test_hf_config_mapping_of_other_families():
    v1 = dict(model_type="internlm", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, bias=True, rotary={"base": 20000, "type": "dynamic", "scaling_factor": 1.0})
    args = hf.model_args_from_hf_config(v1)
    assert args.model_type == "INTERNLM" and args.qkv_bias and args.o_bias and args.num_kv_attention_heads == 4
    assert args.rope_base == 20000 and args.rope_scaling == {"type": "dynamic", "factor": 1.0}
    published_internlm3 = dict(model_type="internlm3", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                               qkv_bias=False, bias=False, rope_theta=5e7,
                               rope_scaling={"rope_type": "dynamic", "factor": 6.0})
    args = hf.model_args_from_hf_config(published_internlm3)
    assert args.model_type == "INTERNLM3" and not args.qkv_bias and args.head_dim == 32
    assert args.rope_base == 5e7 and args.rope_scaling == {"type": "dynamic", "factor": 6.0}
    llama = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 5e5})
    args = hf.model_args_from_hf_config(llama)
    assert args.model_type == "LLAMA2" and args.rope_base == 5e5 and args.rope_scaling is None
    for bad, words in ((dict(llama, mlp_bias=True), "mlp_bias"), (dict(llama, hidden_act="gelu"), "gelu"),
                       (dict(llama, rope_scaling={"rope_type": "yarn", "factor": 2.0}), "yarn"),
                       (dict(llama, model_type="mistral"), "mistral")):
        with pytest.raises(hf.ConversionError, match=words):
            hf.model_args_from_hf_config(bad)


def test_load_hf_into_parts_errors_name_the_key(tmp_path):
    ref, folder = random_llama(tmp_path)
    args = hf.model_args_from_hf_config(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        model = InternLM(args)
    model.to_empty(device="cpu")
    # a mis-shaped tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:-1].clone()
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(hf.ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
        hf.load_hf_into_parts([model], bad)
    # a missing one
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(hf.ConversionError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*missing"):
        hf.load_hf_into_parts([model], bad)
    # a model of another shape
    other = InternLM(ModelArgs(**{**args.to_dict(), "num_layers": 3}))
    with pytest.raises(hf.ConversionError, match="num_layers"):
        hf.load_hf_into_parts(other, folder)


def test_load_hf_into_pipeline_stages(tmp_path):
    """Two stage modules of a split model (as a pipeline rank may hold) are filled like the whole model."""
    from internlm.pipeline import build_stage_module

    ref, folder = random_llama(tmp_path, num_hidden_layers=4)
    args = hf.model_args_from_hf_config(json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        full = InternLM(args)
    stages = [build_stage_module(full, sid, 4) for sid in (1, 3)]
    for stage in stages:
        stage.to_empty(device="cpu")
    filled = hf.load_hf_into_parts(stages, folder)
    assert sorted(n.split(".")[1] for n in filled if n.startswith("layers.")) == ["1"] * 9 + ["3"] * 9
    assert "output.weight" in filled and "tok_embeddings.weight" not in filled
    torch.testing.assert_close(stages[1].output.weight, ref.lm_head.weight, rtol=0, atol=0)


# --------------------------------------------------------------------------------------- tokenizer

CODE = '''def fib(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


class Point:
\tdef __init__(self, x, y):
\t\tself.x, self.y = x, y
'''
TEXTS = [
    "Hello world, this is a test.",
    "  two leading spaces",
    "    indented = True\n        deeper()\n",
    CODE,
    "\n\nstarts with newlines and ends with spaces   ",
    "unicode: café, 中文, emoji 😀 and rare ǅ",
    " ",
    "",
    "chat pieces are atomic in both: <|im_start|>user\nhi<|im_end|>\n",
]


@pytest.mark.parametrize("target", ["llama", "internlm3"])
def test_tokenizer_files_reproduce_sentencepiece_ids(spm_model, target, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    cfg = tiny_config("INTERNLM3" if target == "internlm3" else "LLAMA2", num_kv_attention_heads=2,
                      vocab_size=sp.get_piece_size())
    write_ckpt(random_model(cfg), cfg, tmp_path / "ckpt")
    hf.export_ckpt_to_hf(tmp_path / "ckpt", tmp_path / "hf", target=target, tokenizer=spm_model, progress=False)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        assert (tmp_path / "hf" / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in TEXTS:
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text), repr(text)
        assert tok.decode(tok(text)["input_ids"][1:]) == text
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # generation stops at the end of a chat turn too
    im_end = sp.piece_to_id("<|im_end|>")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, im_end]
    # as in InternLM's released tokenizers, bos/eos strings in a text are the special tokens in
    # transformers (its chat template spells bos as text), while sentencepiece keeps them as text
    assert tok("a</s>")["input_ids"] == [1] + sp.encode("a") + [2]
    assert sp.encode("a</s>") != sp.encode("a") + [2]


# ----------------------------------------------------------------------------- load_model / generate

def test_load_model_from_ckpt_root_picks_newest_step(tmp_path):
    cfg = tiny_config("INTERNLM2_PUBLIC", num_kv_attention_heads=2)
    old, new = random_model(cfg, seed=1), random_model(cfg, seed=2)
    write_ckpt(old, cfg, tmp_path / "ckpt" / "9")
    write_ckpt(new, cfg, tmp_path / "ckpt" / "10")
    model = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert not model.training and model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.source_path.endswith("10")
    torch.testing.assert_close(model.tok_embeddings.weight.float(),
                               new.tok_embeddings.weight.detach().to(torch.bfloat16).float())


def test_generate_greedy_matches_argmax_of_transformers(tmp_path):
    cfg = tiny_config("LLAMA2", num_kv_attention_heads=2)
    model = random_model(cfg)
    hf.export_model_to_hf(model, tmp_path / "hf", dtype=torch.float32, progress=False)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    prompt = [1, 5, 7, 9]
    ours = generate(model, prompt, max_new_tokens=8, greedy=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, ref(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ours == ids[0, len(prompt):].tolist()
    # sampling is reproducible with a seeded generator
    a = generate(model, prompt, 6, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 6, generator=torch.Generator().manual_seed(3))
    assert a == b


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    out = _filter_top_p(probs, 0.7)
    assert out[0] == 0 and out[3] == 0 and out[1] > 0 and out[2] > 0
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))
    assert _filter_top_p(probs, 0.4)[1] == 1.0  # the top token alone


def test_generate_tool_prints_a_continuation(spm_model, tmp_path, capsys):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    cfg = tiny_config("INTERNLM2_PUBLIC", num_kv_attention_heads=2, vocab_size=sp.get_piece_size())
    write_ckpt(random_model(cfg), cfg, tmp_path / "ckpt")
    tool = _tool("generate")
    argv = ["--ckpt", str(tmp_path / "ckpt"), "--prompt", "def fib(n):", "--tokenizer", str(spm_model),
            "--max_new_tokens", "5", "--top_p", "0.9", "--temperature", "0.8", "--seed", "7"]
    assert tool.main(argv) == 0
    first = capsys.readouterr().out
    assert tool.main(argv) == 0
    assert capsys.readouterr().out == first and first.strip("\n") != ""
    assert tool.main(["--ckpt", str(tmp_path / "ckpt"), "--prompt", "x"]) == 2  # no tokenizer anywhere
    assert "tokenizer" in capsys.readouterr().err


def test_import_internlm_stays_light():
    code = "import sys, internlm; assert 'torch' not in sys.modules; assert callable(internlm.load_model)"
    proc = run_python(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sizes_and_shard_plan():
    assert hf.parse_size("10GB") == 10 * 10**9
    assert hf.parse_size("2GiB") == 2 * 2**30
    assert hf.parse_size("500 mb") == 500 * 10**6
    with pytest.raises(hf.ConversionError):
        hf.parse_size("ten gigs")
    assert hf.plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]


def test_generate_stops_at_any_stop_id():
    model = random_model(tiny_config("INTERNLM2_PUBLIC", num_kv_attention_heads=2))
    free = generate(model, [1, 5, 7], max_new_tokens=8, greedy=True)
    k = next(i for i, t in enumerate(free) if t not in free[:i])  # a token not generated before position k
    stopped = generate(model, [1, 5, 7], max_new_tokens=8, greedy=True, eos_token_id=[10**6, free[k]])
    assert stopped == free[:k + 1]


def test_generate_chat_keeps_the_conversation(spm_model, tmp_path, capsys, monkeypatch):
    """--chat: each stdin line is a user turn; the model sees the template with the earlier answers,
    and an answer ends at <|im_end|> (not printed)."""
    import io

    import sentencepiece as spm

    import internlm.inference as inference
    from internlm.data.chat import ChatEncoder

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    cfg = tiny_config("INTERNLM2_PUBLIC", num_kv_attention_heads=2, vocab_size=sp.get_piece_size())
    write_ckpt(random_model(cfg), cfg, tmp_path / "ckpt")
    enc = ChatEncoder(sp, spm_model)
    answers = [sp.encode("first answer") + [enc.end], sp.encode("second") + [enc.end]]
    seen = []

    def fake_generate(model, ids, max_new_tokens, eos_token_id=None, **kw):
        seen.append((list(ids), list(eos_token_id)))
        return answers[len(seen) - 1]

    monkeypatch.setattr(inference, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nand then?\n"))
    tool = _tool("generate")
    assert tool.main(["--ckpt", str(tmp_path / "ckpt"), "--tokenizer", str(spm_model), "--chat",
                      "--system", "Be brief.", "--greedy"]) == 0
    assert capsys.readouterr().out == "first answer\nsecond\n"
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert seen[0] == (enc.encode_prompt(history), [enc.end, sp.eos_id()])
    history += [{"role": "assistant", "content": "first answer"}, {"role": "user", "content": "and then?"}]
    assert seen[1][0] == enc.encode_prompt(history)
