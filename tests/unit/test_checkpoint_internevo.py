"""InternEvo's checkpoint semantics (issue 15): what a run starts from (auto_resume against
load_ckpt_info), load_ckpt_info with path=None, the legacy keys, the ckpt_type aliases, and Meta's
consolidated Llama checkpoints (ckpt_type="llama") checked against transformers' logits."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from internlm.checkpoint import manager as manager_mod
from internlm.checkpoint.layout import CheckpointError
from internlm.checkpoint.manager import ALL_CONTENT, CheckpointManager
from internlm.config import ConfigError, config_from_dict, config_to_yaml_str, load_config
from tests import helpers
from tests.helpers import TRAIN, run_python, tiny_config, write_config


def ckpt_cfg(**ckpt):
    return config_from_dict(tiny_config(ckpt=ckpt))


# ---- config: path=None, ckpt_type aliases, legacy keys ---------------------------------------------

def test_path_none_means_train_from_scratch():
    cfg = ckpt_cfg(load_ckpt_info=dict(path=None, content=("model",), ckpt_type="internevo"))
    assert cfg.ckpt.load_ckpt_info == {"path": None, "content": ["model"], "ckpt_type": "internlm"}
    with pytest.raises(ConfigError, match=r"'ckpt\.load_ckpt_info\.path' must name the checkpoint"):
        ckpt_cfg(load_ckpt_info=dict(content=("model",)))
    with pytest.raises(ConfigError, match=r"'ckpt\.load_ckpt_info\.path' must be a path string or None"):
        ckpt_cfg(load_ckpt_info=dict(path=3))


@pytest.mark.parametrize("written,kind", [("internevo", "internlm"), ("internlm", "internlm"), ("hf", "hf"),
                                          ("hf_llama", "hf"), ("HF_LLAMA", "hf"), ("llama", "llama")])
def test_ckpt_type_aliases(written, kind):
    cfg = ckpt_cfg(load_ckpt_info=dict(path="/w", content=("model",), ckpt_type=written))
    assert cfg.ckpt.load_ckpt_info["ckpt_type"] == kind


def test_ckpt_type_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'ckpt\.load_ckpt_info\.ckpt_type' must be .*'llama'.*got 'megatron'"):
        ckpt_cfg(load_ckpt_info=dict(path="/w", ckpt_type="megatron"))
    with pytest.raises(ConfigError, match=r"'ckpt\.load_ckpt_info\.content' must be \('model',\) with "
                                          r"ckpt_type='llama'"):
        ckpt_cfg(load_ckpt_info=dict(path="/w", content=("model", "optimizer"), ckpt_type="llama"))


def test_legacy_load_ckpt_folder_is_mapped_with_a_notice():
    cfg = ckpt_cfg(load_ckpt_folder="local:/old/ckpt/40")
    assert cfg.ckpt.load_ckpt_info == {"path": "/old/ckpt/40", "content": ["model", "sampler", "optimizer"],
                                       "ckpt_type": "internlm"}
    assert cfg.ckpt.auto_resume is True and cfg.ckpt.load_ckpt_folder is None
    assert len(cfg.notices) == 1 and cfg.notices[0].startswith("ckpt.load_ckpt_folder is deprecated")
    assert "load_ckpt_info=dict(path='/old/ckpt/40'" in cfg.notices[0]
    # the resolved config, dumped and read back, is the same run and prints no notice
    back = config_from_dict(cfg)
    assert back.ckpt == cfg.ckpt and back.notices == ()
    assert "load_ckpt_folder" not in config_to_yaml_str(cfg)
    cfg = ckpt_cfg(load_ckpt_folder="/old/ckpt/40", load_optimizer=False)
    assert cfg.ckpt.load_ckpt_info["content"] == ["model", "sampler"]
    cfg = ckpt_cfg(load_model_only_folder="/old/ckpt/40")
    assert cfg.ckpt.load_ckpt_info["content"] == ["model"] and "load_model_only_folder" in cfg.notices[0]
    with pytest.raises(ConfigError, match="'ckpt.load_ckpt_folder' and 'ckpt.load_model_only_folder' are both set"):
        ckpt_cfg(load_ckpt_folder="/a", load_model_only_folder="/b")


def test_legacy_keys_give_way_to_the_current_ones():
    """InternEvo's stock 7B_sft.py sets load_ckpt_folder and load_ckpt_info: load_ckpt_info wins."""
    cfg = ckpt_cfg(load_ckpt_folder="local:llm_ckpts/", auto_resume=True,
                   load_ckpt_info=dict(path="local:llm_ckpts/xxxx", content=("model",), ckpt_type="internevo"))
    assert cfg.ckpt.load_ckpt_info == {"path": "llm_ckpts/xxxx", "content": ["model"], "ckpt_type": "internlm"}
    assert cfg.notices == ("ckpt.load_ckpt_folder is deprecated (InternEvo's legacy key) and ignored: "
                           "ckpt.load_ckpt_info is set",)


@pytest.mark.parametrize("given,auto,expected", [(True, None, False), (False, None, True), (None, None, True),
                                                 (True, True, True), (None, False, False)])
def test_legacy_load_given_ckpt_sets_auto_resume_unless_it_is_set(given, auto, expected):
    cfg = ckpt_cfg(load_given_ckpt=given, auto_resume=auto)
    assert cfg.ckpt.auto_resume is expected and cfg.ckpt.load_given_ckpt is None
    if given is None:
        assert cfg.notices == ()
    else:
        assert len(cfg.notices) == 1 and "ckpt.load_given_ckpt is deprecated" in cfg.notices[0]
        assert ("ignored" in cfg.notices[0]) == (auto is not None)


# ---- what a run starts from --------------------------------------------------------------------------

@pytest.fixture
def internlm_log(caplog):
    logger = logging.getLogger("internlm")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="internlm")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def bare_manager(monkeypatch, tmp_path, latest=None, **ckpt):
    """A CheckpointManager with only what resume() reads; every loader records its call."""
    mgr = CheckpointManager.__new__(CheckpointManager)
    mgr.cfg = ckpt_cfg(save_ckpt_folder=str(tmp_path / "save"), **ckpt)
    mgr.folder, mgr.rank, mgr.world_size = tmp_path / "save", 0, 1
    calls = []
    monkeypatch.setattr(mgr, "_find_latest", lambda: latest)
    monkeypatch.setattr(mgr, "load", lambda info, content: calls.append(("load", info, set(content))))
    monkeypatch.setattr(mgr, "_load_hf", lambda p: calls.append(("hf", p)))
    monkeypatch.setattr(mgr, "_load_meta_llama", lambda p: calls.append(("llama", p)))
    return mgr, calls


def test_auto_resume_takes_the_newest_checkpoint_over_load_ckpt_info(monkeypatch, tmp_path):
    mgr, calls = bare_manager(monkeypatch, tmp_path, latest="/save/6", load_ckpt_info=dict(path=str(tmp_path)))
    monkeypatch.setattr(manager_mod.layout, "check_checkpoint", lambda p: ("checked", p))
    mgr.resume()
    assert calls == [("load", ("checked", "/save/6"), set(ALL_CONTENT))]


def test_auto_resume_with_nothing_to_resume_and_a_missing_path_trains_from_scratch(monkeypatch, tmp_path,
                                                                                  internlm_log):
    """InternEvo's stock configs: auto_resume=True with load_ckpt_info at llm_ckpts/xxxx."""
    missing = str(tmp_path / "llm_ckpts" / "xxxx")
    mgr, calls = bare_manager(monkeypatch, tmp_path, load_ckpt_info=dict(path=missing, ckpt_type="internevo"))
    mgr.resume()
    assert calls == []
    assert f"ckpt.load_ckpt_info.path={missing!r} does not exist: training from scratch" in internlm_log.text


@pytest.mark.parametrize("kind,call", [("internlm", "load"), ("hf_llama", "hf"), ("llama", "llama")])
def test_auto_resume_with_nothing_to_resume_loads_an_existing_path(monkeypatch, tmp_path, internlm_log, kind,
                                                                   call):
    """Our extension, which the shipped SFT configs rely on: a restarted job resumes its own checkpoints,
    the first start loads the weights named in load_ckpt_info."""
    there = tmp_path / "weights"
    there.mkdir()
    mgr, calls = bare_manager(monkeypatch, tmp_path, load_ckpt_info=dict(path=str(there), ckpt_type=kind))
    monkeypatch.setattr(manager_mod.verify, "check", lambda p, **kw: type("F", (), dict(model_only=True, path=p)))
    mgr.resume()
    assert [c[0] for c in calls] == [call]
    assert "InternEvo would ignore it" in internlm_log.text


@pytest.mark.parametrize("auto", [True, False])
def test_path_none_loads_nothing(monkeypatch, tmp_path, auto):
    mgr, calls = bare_manager(monkeypatch, tmp_path, auto_resume=auto, load_ckpt_info=dict(path=None))
    mgr.resume()
    assert calls == []


def test_without_auto_resume_a_missing_path_stops_the_run_naming_it(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "40"
    mgr, calls = bare_manager(monkeypatch, tmp_path, latest="/save/6", auto_resume=False,
                              load_ckpt_info=dict(path=str(missing)))
    with pytest.raises(CheckpointError, match=str(missing)):
        mgr.resume()
    assert calls == []


def test_internevo_stock_ckpt_section_trains_from_scratch(tmp_path):
    """A real run with InternEvo's 7B_sft.py ckpt section (legacy folder, a load_ckpt_info path that does not
    exist, auto_resume=True): it starts, trains and saves instead of stopping on llm_ckpts/xxxx."""
    cfg = write_config(tmp_path, ckpt=dict(enable_save_ckpt=True, save_ckpt_folder="local:llm_ckpts",
                                           load_ckpt_folder="local:llm_ckpts/", auto_resume=True, checkpoint_every=50,
                                           load_ckpt_info=dict(path="local:llm_ckpts/xxxx", content=("model",),
                                                               ckpt_type="internevo")),
                       data=dict(total_steps=1), monitor=dict(run_folder=str(tmp_path / "run")))
    proc = run_python([TRAIN, "--config", cfg], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ckpt.load_ckpt_info.path='llm_ckpts/xxxx' does not exist: training from scratch" in out
    assert "ckpt.load_ckpt_folder is deprecated" in out
    assert (tmp_path / "llm_ckpts" / "1" / "COMPLETE").is_file()


# ---- Meta's consolidated Llama checkpoints ---------------------------------------------------------------

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")


def random_hf_llama(**kw):
    return helpers.random_hf_llama(96, **dict(dict(rope_theta=10000.0), **kw))


def write_meta_consolidated(hf_model, folder: Path, shards: int = 2, embed_dim: int = 1) -> Path:
    """hf_model in Meta's layout: our names, interleaved rotary rows in wq/wk, fairscale's split over
    `shards` model-parallel ranks (embed_dim 1: Llama 1/2's ParallelEmbedding, 0: Llama 3's vocab split)."""
    from internlm.hf.mapping import from_hf_name
    from internlm.hf.meta_llama import rotate_half_to_meta

    c = hf_model.config
    full = {}
    for hf_name, t in hf_model.state_dict().items():
        name = from_hf_name(hf_name)
        if name is None:
            continue
        if name.endswith("attention.wq.weight"):
            t = rotate_half_to_meta(t, c.num_attention_heads)
        elif name.endswith("attention.wk.weight"):
            t = rotate_half_to_meta(t, c.num_key_value_heads)
        full[name] = t.clone()
    dim0 = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight")
    folder.mkdir(parents=True)
    for r in range(shards):
        sd = {"rope.freqs": torch.ones(8)}
        for name, t in full.items():
            if name.endswith(dim0):
                d = 0
            elif name.endswith(("wo.weight", "w2.weight")):
                d = 1
            elif name == "tok_embeddings.weight":
                d = embed_dim
            else:
                sd[name] = t.clone()
                continue
            sd[name] = t.chunk(shards, dim=d)[r].clone()
        torch.save(sd, folder / f"consolidated.{r:02d}.pth")
    (folder / "params.json").write_text(json.dumps(dict(
        dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, vocab_size=-1, multiple_of=32, norm_eps=c.rms_norm_eps,
        rope_theta=getattr(c, "rope_parameters", None) and c.rope_parameters.get("rope_theta")
        or getattr(c, "rope_theta", 10000.0))))  # (transformers 5 keeps it in rope_parameters)
    return folder


def our_model_for(hf_model):
    from internlm.hf.mapping import model_args_from_hf_config
    from internlm.model.internlm import InternLM

    conf = hf_model.config.to_dict()
    conf["model_type"] = "llama"
    args = model_args_from_hf_config(conf)
    model = InternLM(args)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval()


@needs_transformers
@pytest.mark.parametrize("shards,embed_dim", [(2, 1), (2, 0), (1, 1)])
def test_meta_llama_checkpoint_gives_transformers_logits(tmp_path, shards, embed_dim):
    from internlm.hf.meta_llama import load_meta_llama_into_parts

    ref = random_hf_llama()
    folder = write_meta_consolidated(ref, tmp_path / "llama-2-tiny", shards, embed_dim)
    ours = our_model_for(ref)
    filled = load_meta_llama_into_parts(ours, folder)
    assert len(filled) == len(list(ours.parameters()))
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


@needs_transformers
def test_meta_llama_errors_name_the_file(tmp_path):
    from internlm.errors import ConversionError
    from internlm.hf.meta_llama import load_meta_llama_into_parts

    ref = random_hf_llama()
    folder = write_meta_consolidated(ref, tmp_path / "llama", 2)
    ours = our_model_for(ref)
    # params.json of another shape
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "n_heads": 8}))
    with pytest.raises(ConversionError, match=r"num_attention_heads=4 but .*params\.json says 8"):
        load_meta_llama_into_parts(ours, folder)
    (folder / "params.json").write_text(json.dumps(params))
    # a tensor missing from one shard
    shard1 = folder / "consolidated.01.pth"
    sd = torch.load(shard1, weights_only=True)
    del sd["layers.1.feed_forward.w2.weight"]
    torch.save(sd, shard1)
    with pytest.raises(ConversionError, match=r"'layers\.1\.feed_forward\.w2\.weight' is missing from .*"
                                              r"consolidated\.01\.pth"):
        load_meta_llama_into_parts(ours, folder)
    # a pickle that would run code is refused, never run
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shard1.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ConversionError, match=r"cannot read .*consolidated\.01\.pth as a tensor file"):
        load_meta_llama_into_parts(ours, folder)
    assert not marker.exists()
    # no shards at all
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="has no consolidated.NN.pth file"):
        load_meta_llama_into_parts(ours, empty)


def test_ckpt_type_llama_in_a_config(tmp_path):
    """The config reads ckpt_type='llama'; the manager wraps a loader error into one CheckpointError line."""
    cfg = load_config(write_config(tmp_path, ckpt=dict(auto_resume=False, load_ckpt_info=dict(
        path=str(tmp_path / "meta"), content=("model",), ckpt_type="llama"))))
    assert cfg.ckpt.load_ckpt_info["ckpt_type"] == "llama"
    mgr = CheckpointManager.__new__(CheckpointManager)
    mgr.cfg, mgr.folder, mgr.rank, mgr.world_size, mgr.model_parts = cfg, None, 0, 1, []
    with pytest.raises(CheckpointError, match=r"cannot load the Meta Llama checkpoint .*meta: .* is not a folder"):
        mgr.resume()


def test_meta_rotary_layout_is_the_interleaved_one():
    """The permutation against Meta's own rotary convention (complex numbers over interleaved pairs, as
    in Meta's llama/model.py), independent of the loader: attention scores of q under Meta's rotation of
    Meta's rows equal those under the rotate-half rotation of the permuted rows."""
    from internlm.hf.meta_llama import meta_to_rotate_half

    heads, d, hidden, t = 2, 8, 16, 5
    torch.manual_seed(0)
    w_meta = torch.randn(heads * d, hidden, dtype=torch.float64)
    x = torch.randn(t, hidden, dtype=torch.float64)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)  # [t, d/2]
    q = (x @ w_meta.T).view(t, heads, d)
    q_c = torch.view_as_complex(q.reshape(t, heads, d // 2, 2).contiguous())
    meta = torch.view_as_real(q_c * torch.polar(torch.ones_like(angles), angles)[:, None, :]).flatten(2)
    q = (x @ meta_to_rotate_half(w_meta, heads).T).view(t, heads, d)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None, :], torch.cat([angles.sin()] * 2, -1)[:, None, :]
    half = torch.cat([-q[..., d // 2:], q[..., : d // 2]], dim=-1) * sin + q * cos
    torch.testing.assert_close(torch.einsum("ihd,jhd->hij", half, half), torch.einsum("ihd,jhd->hij", meta, meta))
