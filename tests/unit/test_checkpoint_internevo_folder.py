"""ckpt_type="internevo" on InternEvo's own checkpoint folders (model_tp{t}_pp{p}.pt per rank).

The fixture writer follows InternEvo's save_model_checkpoint and model code as read there (not the
loader): each pipeline stage numbers its layers from 0; column-parallel weights (wqkv, w1, w3, the head)
are cut along dim 0, row-parallel ones (wo, w2) along dim 1, the embedding (Embedding1D) along dim 1;
InternLM2's wqkv holds, per kv head, [q_0 .. q_{g-1}, k, v] rows of head_dim; InternLM v1's Wqkv on a tp
rank is (three, local heads, head_dim). isp folders (model_tp{t}_wp{w}_pp{p}.pt, InternEvo's isp branch of
save_model_checkpoint): every block linear is an ISPLinear (a ColumnParallelLinearTorch over the weight
group), its weight and bias cut along dim 0 over wp, whole over the sequence-parallel ranks t; the
embedding and the head are cut over t as in mtp; only the (t, w) pairs of saving ranks are written.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from internlm.checkpoint import manager as manager_mod
from internlm.checkpoint.internevo_format import is_internevo_dir, load_internevo_into_parts
from internlm.checkpoint.layout import CheckpointError
from internlm.checkpoint.manager import CheckpointManager
from internlm.config import config_from_dict
from tests.helpers import tiny_config, tiny_model_args


def random_model(seed=0, **overrides):
    from internlm.model.internlm import InternLM

    torch.manual_seed(seed)
    model = InternLM(tiny_model_args(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_internevo_folder(model, folder: Path, tp: int, pp: int, prefix: str = "", wp: int = 0,
                           pairs=None) -> Path:
    """Our model's weights as InternEvo's checkpoint manager writes them (tp x pp files; with wp > 0, an
    isp folder of the (tp rank, wp rank) `pairs`, default all)."""
    if wp:
        return _write_isp_folder(model, folder, tp, wp, pp, pairs or [(t, w) for t in range(tp) for w in range(wp)])
    a = model.args
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    v1 = a.model_type in ("INTERNLM", "INTERNLM_MoE")
    kv, hd, h = a.num_kv_attention_heads, a.head_dim, a.hidden_size
    group = a.num_attention_heads // kv
    n = a.num_layers // pp
    folder.mkdir(parents=True)
    experts = {}  # MoE: (layer, expert, tp rank) -> that file's state dict (try_save_moe_checkpoint)
    for p in range(pp):
        shards = [{} for _ in range(tp)]

        def put(name, full, dim, shards=shards):
            parts = full.chunk(tp, dim=dim) if dim is not None else [full] * tp
            for t in range(tp):
                shards[t][prefix + name] = parts[t].clone()

        if p == 0:
            put("embedding.weight" if v1 else "tok_embeddings.weight", sd["tok_embeddings.weight"], 1)
        for local in range(n):
            i = p * n + local
            ours = f"layers.{i}."
            if v1:
                base = f"blocks.{local}."
                for kind in ("weight", "bias"):
                    q, k, v = (sd[ours + f"attention.{w}.{kind}"].chunk(tp, dim=0) for w in ("wq", "wk", "wv"))
                    for t in range(tp):  # each rank: its heads' q, then k, then v
                        shards[t][prefix + base + f"mixer.Wqkv.{kind}"] = torch.cat([q[t], k[t], v[t]], dim=0)
                put(base + "mixer.out_proj.weight", sd[ours + "attention.wo.weight"], 1)
                put(base + "mixer.out_proj.bias", sd[ours + "attention.wo.bias"], None)
                put(base + "norm1.weight", sd[ours + "attention_norm.weight"], None)
                put(base + "norm2.weight", sd[ours + "ffn_norm.weight"], None)
                mlp = base + "mlp."
            else:
                base = f"layers.{local}."
                q = sd[ours + "attention.wq.weight"].reshape(kv, group, hd, h)
                k = sd[ours + "attention.wk.weight"].reshape(kv, 1, hd, h)
                v = sd[ours + "attention.wv.weight"].reshape(kv, 1, hd, h)
                put(base + "attention.wqkv.weight", torch.cat([q, k, v], dim=1).reshape(-1, h), 0)
                put(base + "attention.wo.weight", sd[ours + "attention.wo.weight"], 1)
                put(base + "attention_norm.weight", sd[ours + "attention_norm.weight"], None)
                put(base + "ffn_norm.weight", sd[ours + "ffn_norm.weight"], None)
                put(base + "attention.rotary_emb.inv_freq", torch.ones(hd // 2), None)  # a buffer InternEvo keeps
                mlp = base + "feed_forward."
            if a.num_experts:  # modeling_moe.py: mlp.moe_layer.{gate.wg, experts.wrapped_experts.E.w*}
                put(mlp + "moe_layer.gate.wg.weight", sd[ours + "feed_forward.gate.weight"], None)
                for e in range(a.num_experts):
                    for w, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
                        parts = sd[ours + f"feed_forward.experts.{w}"][e].chunk(tp, dim=dim)
                        for t in range(tp):
                            key = f"{base}mlp.moe_layer.experts.wrapped_experts.{e}.{w}.weight"
                            experts.setdefault((i, e, t), {})[key] = parts[t].clone()
                if a.moe_use_residual:
                    for w, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
                        put(mlp + f"residual_mlp.{w}.weight", sd[ours + f"feed_forward.residual_mlp.{w}.weight"], dim)
                    for kind in ("weight", "bias"):
                        put(mlp + f"coefficient.{kind}", sd[ours + f"feed_forward.coefficient.{kind}"], None)
                continue
            put(mlp + "w1.weight", sd[ours + "feed_forward.w1.weight"], 0)
            put(mlp + "w3.weight", sd[ours + "feed_forward.w3.weight"], 0)
            put(mlp + "w2.weight", sd[ours + "feed_forward.w2.weight"], 1)
        if p == pp - 1:
            put("norm.weight", sd["norm.weight"], None)
            put("head.weight" if v1 else "output.weight", sd["output.weight"], 0)
        for t in range(tp):
            torch.save(shards[t], folder / f"model_tp{t}_pp{p}.pt")
    for (i, e, t), expert_sd in experts.items():
        torch.save(expert_sd, folder / f"model_moe_layer{i}_expert{e}_tp{t}.pt")
    torch.save({"num_layers": a.num_layers, "adapt_hf": True}, folder / "model_config.pt")
    return folder


def _write_isp_folder(model, folder: Path, tp: int, wp: int, pp: int, pairs) -> Path:
    a = model.args
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    v1 = a.model_type in ("INTERNLM", "INTERNLM_MoE")
    kv, hd, h = a.num_kv_attention_heads, a.head_dim, a.hidden_size
    group = a.num_attention_heads // kv
    n = a.num_layers // pp
    folder.mkdir(parents=True)
    for p in range(pp):
        files = {pair: {} for pair in pairs}

        def top(name, full, dim, files=files):  # over the sequence-parallel (tensor) ranks
            for (t, _), shard in files.items():
                shard[name] = (full.chunk(tp, dim=dim)[t] if dim is not None else full).clone()

        def block(name, full, split=True, files=files):  # ISPLinear: rows over the weight-parallel ranks
            for (_, w), shard in files.items():
                shard[name] = (full.chunk(wp, dim=0)[w] if split else full).clone()

        if p == 0:
            top("embedding.weight" if v1 else "tok_embeddings.weight", sd["tok_embeddings.weight"], 1)
        for local in range(n):
            ours = f"layers.{p * n + local}."
            att = {w: sd[ours + f"attention.{w}.weight"] for w in ("wq", "wk", "wv")}
            if v1:
                base = f"blocks.{local}."
                block(base + "mixer.Wqkv.weight", torch.cat([att["wq"], att["wk"], att["wv"]]))
                bias = torch.cat([sd[ours + f"attention.{n}.bias"] for n in ("wq", "wk", "wv")])
                block(base + "mixer.Wqkv.bias", bias)
                block(base + "mixer.out_proj.weight", sd[ours + "attention.wo.weight"])
                block(base + "mixer.out_proj.bias", sd[ours + "attention.wo.bias"])
                block(base + "norm1.weight", sd[ours + "attention_norm.weight"], split=False)
                block(base + "norm2.weight", sd[ours + "ffn_norm.weight"], split=False)
                mlp = base + "mlp."
            else:
                base = f"layers.{local}."
                q, k, v = (att[w].reshape(kv, -1, hd, h) for w in ("wq", "wk", "wv"))
                block(base + "attention.wqkv.weight", torch.cat([q, k, v], dim=1).reshape(-1, h))
                block(base + "attention.wo.weight", sd[ours + "attention.wo.weight"])
                block(base + "attention_norm.weight", sd[ours + "attention_norm.weight"], split=False)
                block(base + "ffn_norm.weight", sd[ours + "ffn_norm.weight"], split=False)
                mlp = base + "feed_forward."
            for w in ("w1", "w3", "w2"):
                block(mlp + f"{w}.weight", sd[ours + f"feed_forward.{w}.weight"])
        if p == pp - 1:
            top("norm.weight", sd["norm.weight"], None)
            top("head.weight" if v1 else "output.weight", sd["output.weight"], 0)
        for (t, w), shard in files.items():
            torch.save(shard, folder / f"model_tp{t}_wp{w}_pp{p}.pt")
    assert group >= 1
    return folder


def assert_same(ref, model):
    ref_sd, got = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == got.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got[k]), k
    ids = torch.randint(0, ref.args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(ids), model(ids))


@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 1)])
def test_internlm2_folder_merges_tp_and_pp(tmp_path, tp, pp):
    ref = random_model(0)
    folder = write_internevo_folder(ref, tmp_path / "evo", tp, pp, prefix="model." if tp == 1 else "")
    assert is_internevo_dir(folder)
    fresh = random_model(1)
    filled = load_internevo_into_parts(fresh, folder)
    assert len(filled) == len(list(fresh.parameters()))
    assert_same(ref, fresh)


def test_internlm_v1_folder_merges_tp_and_pp(tmp_path):
    kw = dict(model_type="INTERNLM", num_kv_attention_heads=4, qkv_bias=True, o_bias=True)
    ref = random_model(0, **kw)
    folder = write_internevo_folder(ref, tmp_path / "evo", 2, 2)
    fresh = random_model(1, **kw)
    load_internevo_into_parts(fresh, folder)
    assert_same(ref, fresh)


def test_interleaved_pipeline_folder_puts_chunks_in_virtual_stage_order(tmp_path):
    """num_chunks=2 on pp=2: each stage file holds a ModuleList of two chunks ("0.layers...", "1.layers..."),
    chunk c of rank p being virtual stage c * pp + p (InternEvo's partition_uniform)."""
    ref = random_model(0)
    four = write_internevo_folder(ref, tmp_path / "four", 2, 4)  # one file per virtual stage
    folder = tmp_path / "evo"
    folder.mkdir()
    for t in range(2):
        for p in range(2):
            merged = {}
            for c in range(2):
                sd = torch.load(four / f"model_tp{t}_pp{c * 2 + p}.pt", weights_only=True)
                merged.update({f"{c}.{k}": v for k, v in sd.items()})
            torch.save(merged, folder / f"model_tp{t}_pp{p}.pt")
    fresh = random_model(1)
    load_internevo_into_parts(fresh, folder)
    assert_same(ref, fresh)


@pytest.mark.parametrize("residual", [False, True])
def test_moe_folder_merges_experts_over_tp_and_pp(tmp_path, residual):
    """INTERNLM_MoE: the router and a residual MoE's dense FFN and mixing weights from the model files, each
    expert from its own model_moe_layer{L}_expert{E}_tp{t}.pt; a missing expert file is named."""
    kw = dict(model_type="INTERNLM_MoE", num_kv_attention_heads=4, qkv_bias=True, o_bias=True, num_experts=4,
              moe_use_residual=residual)
    ref = random_model(0, **kw)
    folder = write_internevo_folder(ref, tmp_path / "evo", 2, 2)
    assert (folder / "model_moe_layer3_expert2_tp1.pt").is_file()
    fresh = random_model(1, **kw)
    filled = load_internevo_into_parts(fresh, folder)
    assert len(filled) == len(list(fresh.parameters()))
    assert_same(ref, fresh)
    (folder / "model_moe_layer1_expert3_tp0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model_moe_layer1_expert3_tp0\.pt is missing"):
        load_internevo_into_parts(random_model(1, **kw), folder)


@pytest.mark.parametrize("model_type,tp,wp,pp,pairs", [
    # InternEvo's 7B_isp_sft.py on 8 GPUs: isp 2, weight 4: each weight group spans two isp groups, so
    # the saving ranks are (tp rank, wp rank) = (w % 2, w)
    ("INTERNLM2_PUBLIC", 2, 4, 2, [(w % 2, w) for w in range(4)]),
    ("INTERNLM2_PUBLIC", 2, 1, 1, None),  # isp without weight parallelism: blocks whole in every file
    ("INTERNLM", 1, 2, 2, None),  # InternLM v1 with wp 2: Wqkv cut by plain rows
])
def test_isp_folder_merges_wp_tp_and_pp(tmp_path, model_type, tp, wp, pp, pairs):
    kw = dict(model_type="INTERNLM", num_kv_attention_heads=4, qkv_bias=True, o_bias=True) \
        if model_type == "INTERNLM" else {}
    ref = random_model(0, **kw)
    folder = write_internevo_folder(ref, tmp_path / "evo", tp, pp, wp=wp, pairs=pairs)
    assert is_internevo_dir(folder)
    fresh = random_model(1, **kw)
    filled = load_internevo_into_parts(fresh, folder)
    assert len(filled) == len(list(fresh.parameters()))
    assert_same(ref, fresh)


def test_isp_folder_errors_name_the_rank(tmp_path):
    ref, fresh = random_model(0), random_model(1)
    folder = write_internevo_folder(ref, tmp_path / "a", 2, 1, wp=4, pairs=[(w % 2, w) for w in range(4)])
    (folder / "model_tp0_wp2_pp0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model_tp0_wp2_pp0\.pt is missing: no file of pipeline stage 0 holds "
                                              r"wp rank 2"):
        load_internevo_into_parts(fresh, folder)
    folder = write_internevo_folder(ref, tmp_path / "a2", 2, 1, wp=4, pairs=[(w % 2, w) for w in range(4)])
    (folder / "model_tp1_wp3_pp0.pt").unlink()  # the last rank gone: the merged shapes say so
    with pytest.raises(CheckpointError, match=r"has 96 rows merged from 3 wp shard\(s\); the model expects 128"):
        load_internevo_into_parts(fresh, folder)
    folder = write_internevo_folder(ref, tmp_path / "b", 2, 1, wp=2)
    torch.save({}, folder / "model_tp0_pp0.pt")
    with pytest.raises(CheckpointError, match=r"mixes isp and mtp model files"):
        load_internevo_into_parts(fresh, folder)
    folder = write_internevo_folder(ref, tmp_path / "c", 1, 1, wp=2)
    sd = torch.load(folder / "model_tp0_wp1_pp0.pt", weights_only=True)
    sd.pop("layers.0.attention.wo.weight")
    torch.save(sd, folder / "model_tp0_wp1_pp0.pt")
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attention\.wo\.weight' is in model_tp0_wp0_pp0\.pt but "
                                              r"missing from the wp rank 1 files"):
        load_internevo_into_parts(fresh, folder)


def test_errors_name_the_file_or_tensor(tmp_path):
    ref = random_model(0)
    fresh = random_model(1)
    folder = write_internevo_folder(ref, tmp_path / "a", 2, 2)
    (folder / "model_tp1_pp0.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model_tp1_pp0\.pt is missing"):
        load_internevo_into_parts(fresh, folder)

    folder = write_internevo_folder(ref, tmp_path / "b", 2, 2)
    sd = torch.load(folder / "model_tp0_pp1.pt", weights_only=True)
    sd.pop("norm.weight")
    torch.save(sd, folder / "model_tp0_pp1.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.weight' is in model_tp1_pp1\.pt but missing from the "
                                              r"tp rank 0 files"):
        load_internevo_into_parts(fresh, folder)

    folder = write_internevo_folder(ref, tmp_path / "c", 2, 2)
    for t in range(2):
        sd = torch.load(folder / f"model_tp{t}_pp1.pt", weights_only=True)
        sd.pop("output.weight")
        torch.save(sd, folder / f"model_tp{t}_pp1.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'output\.weight' is missing from the InternEvo checkpoint"):
        load_internevo_into_parts(fresh, folder)

    folder = write_internevo_folder(ref, tmp_path / "d", 2, 2)
    for t in range(2):
        sd = torch.load(folder / f"model_tp{t}_pp0.pt", weights_only=True)
        sd["layers.1.feed_forward.w1.weight"] = sd["layers.1.feed_forward.w1.weight"][:-1]
        torch.save(sd, folder / f"model_tp{t}_pp0.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.feed_forward\.w1\.weight' .* has shape \(190, 64\)"):
        load_internevo_into_parts(fresh, folder)

    # a planted pickle is refused (weights_only), naming the file
    folder = write_internevo_folder(ref, tmp_path / "e", 1, 1)
    with open(folder / "model_tp0_pp0.pt", "wb") as f:
        pickle.dump({"x": Path("/")}, f)
    with pytest.raises(CheckpointError, match=r"cannot read .*model_tp0_pp0\.pt \(read with torch\.load\(weights_only"):
        load_internevo_into_parts(fresh, folder)

    # a folder that is neither format
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not is_internevo_dir(empty)
    with pytest.raises(CheckpointError, match=r"neither one of our checkpoints .* nor an InternEvo checkpoint"):
        load_internevo_into_parts(fresh, empty)


def _scores(q: torch.Tensor, k: torch.Tensor, group: int) -> torch.Tensor:
    """q.k of every query head with its kv head, [heads, T, T], for q [T, heads, d] and k [T, kv, d]."""
    return torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, dim=1))


def test_adapt_hf_false_folder_gives_internevos_attention_scores(tmp_path):
    """adapt_hf=False (model_config.pt): InternEvo's InternLM2 attention splits its wqkv into q, k, v per kv
    group, puts each head's even dims of q and k before the odd ones, then applies the rotate-half rotary.
    The folder loaded here gives the same q.k at every pair of positions, and the same v; read as an
    adapt_hf=True folder it does not."""
    from internlm.model.ops import apply_rope, rope_cos_sin

    ref = random_model(0)
    a = ref.args
    folder = write_internevo_folder(ref, tmp_path / "evo", 2, 1)
    torch.save({"num_layers": a.num_layers, "adapt_hf": False}, folder / "model_config.pt")
    group, hd, T = a.num_attention_heads // a.num_kv_attention_heads, a.head_dim, 12
    wqkv = torch.cat([torch.load(folder / f"model_tp{t}_pp0.pt", weights_only=True)["layers.1.attention.wqkv.weight"]
                      for t in range(2)])
    torch.manual_seed(3)
    x = torch.randn(T, a.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(T)[None], hd, a.rope_base, None, a.max_position_embeddings)
    rope = lambda t: apply_rope(t[None], cos, sin)[0]  # noqa: E731 - [T, heads, d]

    qkv = (x @ wqkv.T).reshape(T, a.num_kv_attention_heads, group + 2, hd)  # InternEvo's forward
    q, k, v = qkv[:, :, :group].reshape(T, -1, hd), qkv[:, :, -2], qkv[:, :, -1]
    q, k = (torch.cat([t[..., ::2], t[..., 1::2]], dim=-1) for t in (q, k))
    theirs = _scores(rope(q), rope(k), group)

    def ours(model):
        att = model.layers["1"].attention
        q = (x @ att.wq.weight.T).reshape(T, -1, hd)
        k = (x @ att.wk.weight.T).reshape(T, -1, hd)
        return _scores(rope(q), rope(k), group), (x @ att.wv.weight.T).reshape(T, -1, hd)

    fresh = random_model(1)
    load_internevo_into_parts(fresh, folder)
    scores, values = ours(fresh)
    torch.testing.assert_close(scores, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, v)
    assert not torch.allclose(ours(ref)[0], theirs, atol=1e-3)  # the same rows without the reordering


def test_fsdp_folder_of_sharded_tensors_merges_dp_tp_and_pp(tmp_path):
    """parallel.zero1.fsdp=True folders: model_tp{t}_pp{p}_dp{d}.pt written by FSDP v1 itself (2 ranks,
    SHARDED_STATE_DICT, one unit per block) from a tp2 x pp2 folder; the ShardedTensors are read under
    weights_only by stand-ins and merged over dp, then over tp and pp."""
    from internlm.checkpoint.internevo_fsdp import merge_fsdp_files
    from tests import launcher

    ref = random_model(0)
    src = write_internevo_folder(ref, tmp_path / "mtp", 2, 2)
    fsdp = tmp_path / "fsdp"
    done = launcher.start_script(2, Path(__file__).parents[1] / "fsdp_v1_writer.py", [str(src), str(fsdp)],
                                 tmp_path / "work").wait(120)
    assert done.returncode == 0, done.tail()
    assert sorted(f.name for f in fsdp.glob("model_tp*")) == [f"model_tp{t}_pp{p}_dp{d}.pt" for t in range(2)
                                                              for p in range(2) for d in range(2)]
    with pytest.raises(Exception, match="ShardedTensor"):  # the real format: plain weights_only refuses it
        torch.load(fsdp / "model_tp0_pp0_dp0.pt", weights_only=True)
    assert is_internevo_dir(fsdp)
    fresh = random_model(1)
    filled = load_internevo_into_parts(fresh, fsdp)
    assert len(filled) == len(list(fresh.parameters()))
    assert_same(ref, fresh)

    from internlm.checkpoint.internevo_optim import read_moments

    with pytest.raises(CheckpointError, match=r"fsdp holds no optimizer_tp\{t\}_pp\{p\}_zo\{z\}\.pt file"):
        read_moments(fsdp, fresh.args)
    # each dp file holds half of a tensor: one alone is named as incomplete
    with pytest.raises(CheckpointError, match=r"cover \d+ of its \d+ elements: a data-parallel rank's file"):
        merge_fsdp_files([fsdp / "model_tp0_pp0_dp0.pt"])
    (fsdp / "model_tp1_pp1_dp1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model_tp1_pp1_dp1\.pt is missing \(the folder has fsdp files up to"):
        load_internevo_into_parts(fresh, fsdp)
    # the stand-ins admit nothing else: a planted pickle in an fsdp file is refused, naming the file
    torch.save({"x": _Evil()}, fsdp / "model_tp1_pp1_dp1.pt")
    with pytest.raises(CheckpointError, match=r"cannot read .*model_tp1_pp1_dp1\.pt .*GLOBAL posix\.system"):
        load_internevo_into_parts(fresh, fsdp)
    torch.save({}, fsdp / "model_tp0_pp0.pt")
    with pytest.raises(CheckpointError, match=r"mixes fsdp and mtp model files"):
        load_internevo_into_parts(fresh, fsdp)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled",))


def test_manager_dispatches_internevo_folders(monkeypatch, tmp_path):
    ref = random_model(0)
    folder = write_internevo_folder(ref, tmp_path / "evo", 2, 2)
    fresh = random_model(1)
    mgr = CheckpointManager.__new__(CheckpointManager)
    mgr.cfg = config_from_dict(tiny_config(ckpt=dict(
        auto_resume=False, load_ckpt_info=dict(path=str(folder), content=("model",), ckpt_type="internevo"))))
    mgr.folder, mgr.rank, mgr.world_size, mgr.model_parts = None, 0, 1, [fresh]
    monkeypatch.setattr(manager_mod.verify, "check", lambda *a, **k: pytest.fail("read as our format"))
    mgr.resume()
    assert_same(ref, fresh)
    info = dict(path=str(folder), content=("model", "optimizer"), ckpt_type="internevo")
    mgr.cfg = config_from_dict(tiny_config(ckpt=dict(auto_resume=False, load_ckpt_info=info)))
    torch.save({"step_count": 4, "num_consumed_samples_in_epoch": 8, "num_consumed_tokens": 512},
               folder / "context.pt")
    mgr.optimizer = SimpleNamespace(part_optimizers=[None], grad_scaler=None)
    with pytest.raises(CheckpointError, match=r"holds no optimizer_tp\{t\}_pp\{p\}_zo\{z\}\.pt file: InternEvo "
                                              r"saved no optimizer state there"):
        mgr.resume()


def test_convert2hf_exports_an_internevo_isp_folder(tmp_path, capsys):
    """tools/convert2hf.py takes an InternEvo folder with the config it was trained with; the Hugging Face
    model gives our model's logits."""
    from transformers import AutoModelForCausalLM

    from internlm.cli import convert2hf
    from tests.helpers import write_config

    ref = random_model(0)
    folder = write_internevo_folder(ref, tmp_path / "evo", 2, 2, wp=2, pairs=[(0, 0), (1, 1)])
    out = tmp_path / "hf"
    assert convert2hf.main(["--src", str(folder), "--tgt", str(out), "--no_progress"]) == 2
    assert "pass the InternEvo config it was trained with" in capsys.readouterr().err
    config = write_config(tmp_path, "evo_config.py")
    rc = convert2hf.main(["--src", str(folder), "--tgt", str(out), "--dtype", "float32", "--no_progress",
                          "--config", str(config), "parallel.tensor.mode='isp'"])
    assert rc == 0, capsys.readouterr().err
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.randint(0, ref.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (hf(ids).logits - ref(ids)).abs().max().item()
    assert diff < 1e-4, diff
