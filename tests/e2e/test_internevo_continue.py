"""Continuing an InternEvo run: `ckpt_type="internevo"` with content ("model", "sampler", "scheduler")
loads an InternEvo checkpoint folder's weights, its step and tokens (context.pt), its data position
(context.pt, sampler.pt's epoch) and its schedule position (schedulder.pt), through `python train.py`.

The folder is made from one of our own runs at step 3, as InternEvo's checkpoint manager would write it
(tp=2 model files, context.pt, sampler.pt with numpy's RNG state, schedulder.pt). The continued run's
first step then sees the same weights and the same rows as the uninterrupted run's step 4, under the
same LR: equal loss and gradient norm (its AdamW moments restart, so later steps differ)."""

import enum
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from internlm.checkpoint.internevo_optim import MOMENTS
from internlm.checkpoint.layout import CheckpointError
from tests import launcher
from tests.helpers import read_metrics, tiny_model_args, write_config
from tests.unit.test_checkpoint_internevo_folder import write_internevo_folder


def _internevo_folder(ours, folder, step: int, tokens: int, rows: int, lr: float, wp: int = 0, pairs=None):
    from internlm.checkpoint.reader import load_ckpt_into_parts
    from internlm.model.internlm import InternLM

    model = InternLM(tiny_model_args())
    load_ckpt_into_parts([model], ours)
    write_internevo_folder(model, folder, tp=2, pp=1, wp=wp, pairs=pairs)
    # InternEvo's TrainState.state_dict() and StaticBatchSampler.state_dict()
    torch.save({"batch_count": step - 1, "num_consumed_samples_in_epoch": rows, "num_consumed_tokens": tokens,
                "inf_nan_skip_batches": 0, "step_count": step, "tensorboard_folder": None}, folder / "context.pt")
    rng = np.random.RandomState(1024)
    torch.save({"batch_size": 8, "raw_rampup_batch_size": None, "rng_state": rng.get_state(), "epoch": 0,
                "seed": 1024, "data_world_size": 1, "num_consumed_samples_in_epoch": rows, "batch_count": step,
                "indices": rng.permutation(100)}, folder / "sampler.pt")
    torch.save({"base_lrs": [lr], "last_epoch": step, "_step_count": step + 1, "warmup_epochs": 2},
               folder / "schedulder.pt")
    return folder


def test_a_run_continues_an_internevo_folder_at_its_step_rows_and_lr(tmp_path):
    cfg = write_config(tmp_path, data=dict(total_steps=6),
                       ckpt=dict(save_ckpt_folder=str(tmp_path / "ckpt"), checkpoint_every=3))
    ref = launcher.run(1, [], tmp_path / "ref", config=cfg, timeout=180)
    assert ref.returncode == 0, ref.tail()
    by_step = {r["step"]: r for r in ref.records}
    rows_per_step = 4 * 2  # micro_num x micro_bsz (one data-parallel rank)
    tokens = sum(by_step[s]["tokens"] for s in (1, 2, 3)) if "tokens" in by_step[1] else 3 * rows_per_step * 64
    evo = _internevo_folder(tmp_path / "ckpt" / "3", tmp_path / "evo", 3, tokens, 3 * rows_per_step, 1e-3)

    info = dict(path=str(evo), content=("model", "sampler", "scheduler"), ckpt_type="internevo")
    run = launcher.run(1, [f"ckpt.load_ckpt_info={info!r}", "ckpt.auto_resume=False",
                           f"ckpt.save_ckpt_folder={str(tmp_path / 'ckpt2')!r}"], tmp_path / "cont", config=cfg,
                       timeout=180)
    assert run.returncode == 0, run.tail()
    records = read_metrics(tmp_path / "cont" / "run") or run.records
    assert [r["step"] for r in records] == [4, 5, 6]
    first, same = records[0], by_step[4]
    assert first["lr"] == same["lr"]
    assert first["loss"] == pytest.approx(same["loss"], rel=1e-6)
    assert first["grad_norm"] == pytest.approx(same["grad_norm"], rel=1e-5)
    assert "loaded from InternEvo folder" in run.out and "step 3" in run.out
    assert "optimizer moments start fresh" in run.out


def _our_moments(ckpt) -> dict[str, dict[str, torch.Tensor]]:
    """{"exp_avg"|"exp_avg_sq": {our name: full tensor}} and AdamW's step of one of our checkpoints."""
    from internlm.checkpoint import safe_dcp
    from internlm.checkpoint.reader import quiet_dcp
    from internlm.checkpoint.state import load_tensors

    meta = safe_dcp.read_metadata(ckpt).state_dict_metadata
    flat = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
            if k.startswith("optim.state.") and hasattr(v, "size")}
    with quiet_dcp():
        load_tensors(flat, ckpt, no_dist=True)
    out = {"exp_avg": {}, "exp_avg_sq": {}, "step": set()}
    for k, v in flat.items():
        name, what = k[len("optim.state."):].rsplit(".", 1)
        if what == "step":
            out["step"].add(float(v))
        else:
            out[what][name] = v
    return out


def _reference(tmp_path, *overrides):
    """Our uninterrupted 6-step run, saving at step 3: (its config, {step: record}, tokens of steps 1-3)."""
    cfg = write_config(tmp_path, data=dict(total_steps=6),
                       ckpt=dict(save_ckpt_folder=str(tmp_path / "ckpt"), checkpoint_every=3))
    ref = launcher.run(1, list(overrides), tmp_path / "ref", config=cfg, timeout=180)
    assert ref.returncode == 0, ref.tail()
    by_step = {r["step"]: r for r in ref.records}
    tokens = sum(by_step[s]["tokens"] for s in (1, 2, 3)) if "tokens" in by_step[1] else 3 * 8 * 64
    return cfg, by_step, tokens


def _continues_equal(tmp_path, cfg, evo: Path, by_step: dict, nproc: int = 1, overrides=(), rel=(1e-6, 1e-5),
                     name: str = "cont") -> list[dict]:
    """Continue from the InternEvo folder `evo` with content "all" (AdamW's state included): every step,
    4 to 6, equals the uninterrupted run's in loss and gradient norm."""
    info = dict(path=str(evo), content=("all",), ckpt_type="internevo")
    run = launcher.run(nproc, [*overrides, f"ckpt.load_ckpt_info={info!r}", "ckpt.auto_resume=False",
                               f"ckpt.save_ckpt_folder={str(tmp_path / f'{name}_ckpt')!r}"], tmp_path / name,
                       config=cfg, timeout=180)
    assert run.returncode == 0, run.tail()
    assert "AdamW state at its step 3" in run.out and "start fresh" not in run.out
    records = read_metrics(tmp_path / name / "run") or run.records
    assert [r["step"] for r in records] == [4, 5, 6]
    for r in records:
        same = by_step[r["step"]]
        assert r["lr"] == same["lr"]
        assert r["loss"] == pytest.approx(same["loss"], rel=rel[0]), (nproc, r["step"])
        assert r["grad_norm"] == pytest.approx(same["grad_norm"], rel=rel[1]), (nproc, r["step"])
    return records


def _moment_folders(ours, root: Path, args=None, **layout) -> dict[str, Path]:
    """{"exp_avg" | "exp_avg_sq": an InternEvo model folder (write_internevo_folder with `layout`) whose
    tensors are those AdamW moments of `ours` (one of our checkpoints)}, and AdamW's step."""
    from internlm.checkpoint.reader import load_ckpt_into_parts
    from internlm.model.internlm import InternLM

    moments = _our_moments(ours)
    out = {}
    for what in MOMENTS:
        model = InternLM(args or tiny_model_args())
        load_ckpt_into_parts([model], ours)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(moments[what][name])
        out[what] = write_internevo_folder(model, root / f"moments_{what}", **layout)
    (step,) = moments["step"]
    return out, step


class ParallelMode(enum.Enum):  # pickled as InternEvo's (its param groups hold it)
    ZERO1 = "zero1"
    DATA = "data"
    EXPERT_DATA = "expert_data"


THEIR_MODULES = ("internlm.core", "internlm.core.context", "internlm.core.context.process_group_initializer")
ParallelMode.__module__ = THEIR_MODULES[-1]


def _their_parallel_mode(monkeypatch) -> None:
    """ParallelMode importable under InternEvo's module path, so that it pickles as InternEvo's does."""
    for name in THEIR_MODULES:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules[THEIR_MODULES[-1]], "ParallelMode", ParallelMode, raising=False)


def _deal(tensors: dict, ranks: int) -> tuple[list, list]:
    """HybridZeroOptimizer's partition: the tensors sorted by size (stable), each to the rank holding the
    fewest elements so far: (plan ids per rank, "{index}_{dims}", and the names per rank)."""
    numel, ids, per = [0] * ranks, [[] for _ in range(ranks)], [[] for _ in range(ranks)]
    for i, k in enumerate(sorted(tensors, key=lambda k: tensors[k].numel(), reverse=True)):
        z = numel.index(min(numel))
        numel[z] += tensors[k].numel()
        ids[z].append("_".join([str(i), *map(str, tensors[k].shape)]))
        per[z].append(k)
    return ids, per


def _write_internevo_optimizer(ours, folder: Path, tp: int, zero: int, monkeypatch):
    """HybridZeroOptimizer.state_dict() files of `ours` (one of our checkpoints) for InternEvo's model files
    in `folder` (tp ranks, one stage): two groups (matrices; norms), each sorted by size (stable), dealt to
    the `zero` ranks one at a time to the emptiest, flattened per rank, with the plan of ids."""
    files, step = _moment_folders(ours, folder.parent, tp=tp, pp=1)
    _their_parallel_mode(monkeypatch)
    for t in range(tp):
        w = torch.load(folder / f"model_tp{t}_pp0.pt", weights_only=True)
        m = {k: torch.load(files[k] / f"model_tp{t}_pp0.pt", weights_only=True) for k in files}
        groups = [[k for k in w if w[k].dim() >= 2], [k for k in w if w[k].dim() < 2]]
        plans, per_rank = [], [[] for _ in range(zero)]
        for keys in groups:
            ids, per = _deal({k: w[k] for k in keys}, zero)
            plans.append(ids)
            for z in range(zero):
                per_rank[z].append(per[z])
        for z in range(zero):
            state, param_groups, flats = {}, [], {}
            for g, keys in enumerate(per_rank[z]):
                flats[g] = torch.cat([w[k].float().flatten() for k in keys])
                state[g] = {"step": torch.tensor(step), **{k: torch.cat([m[k][n].flatten() for n in keys])
                                                            for k in files}}
                param_groups.append({"params": [g], "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8,
                                     "weight_decay": 0.01 if g == 0 else 0.0, "name": "default" if g == 0 else "fp32",
                                     "dtype": torch.float32, "optimizer_mode": ParallelMode.ZERO1})
            torch.save({"grad_scaler": {"_scale": torch.tensor(1.0), "_growth_step": 0, "_hysteresis_step": 0},
                        "base_optim_states": {"state": state, "param_groups": param_groups},
                        "flat_fp32_weights": flats, "zero_devide_optim_plan": plans},
                       folder / f"optimizer_tp{t}_pp0_zo{z}.pt")


@pytest.mark.parametrize("nproc, layout", [(1, ()), (2, ("parallel.zero1.size=2", "data.micro_num=2"))],
                         ids=["one_process", "dp2_zero1-2"])
def test_a_run_continues_an_internevo_folder_with_its_optimizer_state(tmp_path, monkeypatch, nproc, layout):
    """content="all": AdamW's moments and step come from InternEvo's optimizer files (tp=2, ZeRO over 2
    ranks, two param groups), so every continued step equals the uninterrupted run's, not only the first;
    also with the moments sharded by FSDP over two ranks."""
    cfg, by_step, tokens = _reference(tmp_path)
    evo = _internevo_folder(tmp_path / "ckpt" / "3", tmp_path / "theirs" / "evo", 3, tokens, 3 * 8, 1e-3)
    _write_internevo_optimizer(tmp_path / "ckpt" / "3", evo, tp=2, zero=2, monkeypatch=monkeypatch)
    _continues_equal(tmp_path, cfg, evo, by_step, nproc, layout)


def _write_isp_optimizer(ours, folder: Path, monkeypatch):
    """HybridZeroOptimizer.state_dict() files of `ours` for the isp folder `folder`, as InternEvo's
    7B_isp_sft.py lays out 8 ranks (sequence parallel 2, weight parallel 4, data parallel 4, zero1 2):
    rank r is tp (sequence) rank r % 2, wp rank r % 4, dp rank r // 2 and ZeRO rank r // 4 (its weight-data
    group [w, w + 4]). Every rank writes optimizer_tp{t}_wp{w}_pp0_dp{d}.pt: group 0 "default" (the wp
    shard's block linears and the norms) ZeRO-sharded over [w, w + 4], group 1 "embed_head" (the
    embedding and head of sequence rank t) sharded over the 4 data ranks (two of them get nothing),
    group 2 "fp32" empty. The plan (zero_devide_optim_plan): even ranks hold it in the file and in the
    gpus-8_wp-*_tp-*_dp-*_pp-0_zo-*.pt file InternEvo writes beside it; ranks 1, 5 and 7 only in that file;
    rank 3 only in its own file, so its ZeRO rank must be told by its master weights."""
    src, step = _moment_folders(ours, folder.parent, tp=2, pp=1, wp=4)
    _their_parallel_mode(monkeypatch)
    top = ("tok_embeddings.weight", "output.weight")

    for r in range(8):
        t, w_rank, d, z = r % 2, r % 4, r // 2, r // 4
        name = f"model_tp{t}_wp{w_rank}_pp0.pt"
        w = torch.load(folder / name, weights_only=True)
        m = {k: torch.load(src[k] / name, weights_only=True) for k in src}
        (ids0, per0) = _deal({k: v for k, v in w.items() if k not in top}, 2)
        (ids1, per1) = _deal({k: w[k] for k in top}, 4)
        plan = [ids0, ids1, [[], []]]
        state, flats, param_groups = {}, {}, []
        for g, (keys, gname, mode) in enumerate([(per0[z], "default", ParallelMode.ZERO1),
                                                 (per1[d], "embed_head", ParallelMode.DATA), ([], "fp32", None)]):
            group = {"params": [g] if keys else [], "lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "name": gname,
                     "weight_decay": 0.01, "optimizer_mode": mode or ParallelMode.ZERO1}
            param_groups.append(group)
            if keys:
                flats[g] = torch.cat([w[k].float().flatten() for k in keys])
                state[g] = {"step": torch.tensor(step), **{k: torch.cat([m[k][n].flatten() for n in keys])
                                                            for k in src}}
        states = {"grad_scaler": {"_scale": torch.tensor(1.0), "_growth_step": 0, "_hysteresis_step": 0},
                  "base_optim_states": {"state": state, "param_groups": param_groups}, "flat_fp32_weights": flats}
        if r % 2 == 0:
            states["zero_devide_optim_plan"] = plan
        if r != 3:  # rank 3's ZeRO rank is found from its master weights alone
            torch.save(plan, folder / f"gpus-8_wp-{w_rank}_tp-{t}_dp-{d}_pp-0_zo-{z}.pt")
        else:
            states["zero_devide_optim_plan"] = plan
        torch.save(states, folder / f"optimizer_tp{t}_wp{w_rank}_pp0_dp{d}.pt")


def test_a_run_continues_an_internevo_isp_folder_with_its_optimizer_state(tmp_path, monkeypatch):
    """An isp folder (sequence 2 x weight 4 x data 4, zero1 2: eight optimizer files, three groups, the
    embedding and head sharded over the data ranks) continues with every step equal to the uninterrupted
    run's."""
    cfg, by_step, tokens = _reference(tmp_path)
    evo = _internevo_folder(tmp_path / "ckpt" / "3", tmp_path / "theirs" / "evo", 3, tokens, 3 * 8, 1e-3,
                            wp=4, pairs=[(w % 2, w) for w in range(4)])
    _write_isp_optimizer(tmp_path / "ckpt" / "3", evo, monkeypatch)
    _continues_equal(tmp_path, cfg, evo, by_step)


# InternLM v1's attention (InternEvo's MoE model): one kv head per head
MOE = ("model_type='INTERNLM_MoE'", "model.num_experts=4", "loss.moe_loss_coeff=0.1", "model.num_kv_attention_heads=4")


def _write_moe_folder(ours, folder: Path, args, monkeypatch) -> Path:
    """An INTERNLM_MoE folder of `ours` (tp=2: model_tp{t}_pp0.pt and model_moe_layer{L}_expert{E}_tp{t}.pt)
    with the optimizer files InternEvo writes for tp 2 x dp 4, expert parallel 2 (zero1 over the 4 data
    ranks): data rank z holds the experts of its expert rank z % 2 (two of the four), ZeRO-sharded over its
    expert-data group (rank z // 2 of 2) in group 2 "moe_ep_size_2" (moe=True); the dense parameters in
    group 0, sharded over the 4 data ranks; group 1 "fp32" empty."""
    from internlm.checkpoint.reader import load_ckpt_into_parts
    from internlm.model.internlm import InternLM

    model = InternLM(args)
    load_ckpt_into_parts([model], ours)
    write_internevo_folder(model, folder, tp=2, pp=1)
    src, step = _moment_folders(ours, folder.parent, args, tp=2, pp=1)
    _their_parallel_mode(monkeypatch)

    def expert_files(root: Path, t: int, experts) -> dict:  # {(file, key): tensor} of those experts
        return {(f.name, k): v for f in sorted(root.glob(f"model_moe_layer*_expert*_tp{t}.pt"))
                if int(f.name.split("_expert")[1].split("_")[0]) in experts
                for k, v in torch.load(f, weights_only=True).items()}

    for t in range(2):
        name = f"model_tp{t}_pp0.pt"
        w = torch.load(folder / name, weights_only=True)
        m = {k: torch.load(src[k] / name, weights_only=True) for k in src}
        dense_ids, dense_per = _deal(w, 4)
        for z in range(4):
            mine = (2 * (z % 2), 2 * (z % 2) + 1)
            ew = expert_files(folder, t, mine)
            em = {k: expert_files(src[k], t, mine) for k in src}
            expert_ids, expert_per = _deal(ew, 2)
            plan = [dense_ids, [[] for _ in range(4)], expert_ids]
            state, flats, param_groups = {}, {}, []
            for g, (keys, values, mom, gname) in enumerate([(dense_per[z], w, m, "default"), ([], w, m, "fp32"),
                                                             (expert_per[z // 2], ew, em, "moe_ep_size_2")]):
                group = {"params": [g] if keys else [], "lr": 1e-3, "name": gname, "weight_decay": 0.01,
                         "optimizer_mode": ParallelMode.ZERO1}
                if gname.startswith("moe"):
                    group.update(moe=True, optimizer_mode=ParallelMode.EXPERT_DATA)
                param_groups.append(group)
                if keys:
                    flats[g] = torch.cat([values[k].float().flatten() for k in keys])
                    state[g] = {"step": torch.tensor(step),
                                **{k: torch.cat([mom[k][n].flatten() for n in keys]) for k in MOMENTS}}
            torch.save({"grad_scaler": {"_scale": torch.tensor(1.0), "_growth_step": 0, "_hysteresis_step": 0},
                        "base_optim_states": {"state": state, "param_groups": param_groups},
                        "flat_fp32_weights": flats, "zero_devide_optim_plan": plan},
                       folder / f"optimizer_tp{t}_pp0_zo{z}.pt")
    return folder


def test_a_run_continues_an_internevo_moe_folder_with_its_optimizer_state(tmp_path, monkeypatch):
    """INTERNLM_MoE (tp 2 x dp 4, expert parallel 2, each expert's state ZeRO-sharded over its two
    expert-data ranks): the experts' AdamW state comes from the expert groups, so every continued step,
    on one process and on ep=2, equals the uninterrupted run's."""
    from internlm.builders import model_args
    from internlm.config.load import load_config

    cfg, by_step, tokens = _reference(tmp_path, *MOE)
    evo = _write_moe_folder(tmp_path / "ckpt" / "3", tmp_path / "theirs" / "evo",
                            model_args(load_config(cfg, MOE)), monkeypatch)
    torch.save({"batch_count": 2, "num_consumed_samples_in_epoch": 24, "num_consumed_tokens": tokens,
                "step_count": 3}, evo / "context.pt")
    for nproc, layout in ((1, ()), (2, ("parallel.expert.size=2", "data.micro_num=2"))):
        records = _continues_equal(tmp_path, cfg, evo, by_step, nproc, (*MOE, *layout), rel=(1e-5, 1e-4),
                                   name=f"cont{nproc}")
        assert [r["moe_load"] for r in records] == [by_step[r["step"]]["moe_load"] for r in records]


def test_a_run_continues_an_internevo_fsdp_folder_with_its_optimizer_state(tmp_path):
    """parallel.zero1.fsdp=True: model_tp{t}_pp{p}_dp{d}.pt and FSDPadaptOptimizer files written by FSDP v1
    itself on two gloo ranks (tests/fsdp_v1_writer.py; tp=2) from our run at step 3; the continued run's
    every step equals the uninterrupted run's."""
    cfg, by_step, tokens = _reference(tmp_path)
    ours = tmp_path / "ckpt" / "3"
    mtp = _internevo_folder(ours, tmp_path / "theirs" / "mtp", 3, tokens, 3 * 8, 1e-3)
    folders, step = _moment_folders(ours, tmp_path / "theirs", tp=2, pp=1)
    evo = tmp_path / "theirs" / "fsdp"
    writer = Path(__file__).parents[1] / "fsdp_v1_writer.py"
    done = launcher.start_script(2, writer, [str(mtp), str(evo), *map(str, folders.values()), str(step)],
                                 tmp_path / "w").wait(120)
    assert done.returncode == 0, done.tail()
    assert (evo / "model_tp1_pp0_dp1.pt").is_file() and (evo / "optimizer_tp1_pp0_zo1.pt").is_file()
    assert not (evo / "model_tp0_pp0.pt").exists()
    _continues_equal(tmp_path, cfg, evo, by_step)


def test_internevo_optimizer_errors_name_the_file(tmp_path, monkeypatch):
    from internlm.checkpoint import internevo_optim
    from internlm.model.internlm import InternLM

    args = tiny_model_args()
    model = InternLM(args)
    evo = write_internevo_folder(model, tmp_path / "evo", tp=2, pp=1)
    with pytest.raises(CheckpointError, match=r"holds no optimizer_tp\{t\}_pp\{p\}_zo\{z\}\.pt file"):
        internevo_optim.read_moments(evo, args)
    torch.save({"base_optim_states": {"state": {}, "param_groups": []}, "flat_fp32_weights": {}},
               evo / "optimizer_tp0_pp0_zo0.pt")
    torch.save({"base_optim_states": {"state": {}, "param_groups": []}}, evo / "optimizer_tp1_pp0_zo1.pt")
    with pytest.raises(CheckpointError, match=r"optimizer_tp1_pp0_zo0\.pt is missing"):
        internevo_optim.read_moments(evo, args)
    (evo / "optimizer_tp1_pp0_zo1.pt").rename(evo / "optimizer_tp1_pp0_zo0.pt")
    with pytest.raises(CheckpointError, match=r"optimizer_tp0_pp0_zo0\.pt has no zero_devide_optim_plan"):
        internevo_optim.read_moments(evo, args)
    # a folder whose optimizer files are of another step: the master weights match no model tensor
    other = tmp_path / "other"
    _write_plain_optimizer(evo, other, monkeypatch)
    with torch.no_grad():
        sd = torch.load(evo / "model_tp0_pp0.pt", weights_only=True)
        key = next(k for k in sd if k.endswith("w2.weight"))
        sd[key] += 1.0
        torch.save(sd, evo / "model_tp0_pp0.pt")
    for f in other.iterdir():
        f.replace(evo / f.name)
    with pytest.raises(CheckpointError, match=r"optimizer_tp0_pp0_zo0\.pt: parameter \d+ of group 0 .* matches no "
                                              r"tensor of model_tp0_pp0\.pt"):
        internevo_optim.read_moments(evo, args)
    # isp: its files are optimizer_tp{t}_wp{w}_pp{p}_dp{d}.pt
    isp = write_internevo_folder(model, tmp_path / "isp", tp=2, pp=1, wp=2)
    with pytest.raises(CheckpointError, match=r"isp.* holds no optimizer_tp\{t\}_wp\{w\}_pp\{p\}_dp\{d\}\.pt file"):
        internevo_optim.read_moments(isp, args)
    # MoE: optimizer files without an expert group leave the experts without state
    from tests.unit.test_checkpoint_internevo_folder import random_model

    moe = random_model(0, model_type="INTERNLM_MoE", num_kv_attention_heads=4, qkv_bias=True, o_bias=True,
                       num_experts=4)
    folder = write_internevo_folder(moe, tmp_path / "moe_src", tp=2, pp=1)
    _write_plain_optimizer(folder, tmp_path / "moe_optim", monkeypatch)
    for f in (tmp_path / "moe_optim").iterdir():
        f.replace(folder / f.name)
    with pytest.raises(CheckpointError, match=r"no optimizer state for '.*wrapped_experts\.0\.w\d\.weight' of "
                                              r"model_moe_layer0_expert0_tp0\.pt in any expert group"):
        internevo_optim.read_moments(folder, moe.args)


def _write_plain_optimizer(evo: Path, out: Path, monkeypatch):
    """One group per file, one ZeRO rank, moments of zeros: the optimizer files of `evo`'s weights."""
    out.mkdir()
    for t in range(2):
        w = torch.load(evo / f"model_tp{t}_pp0.pt", weights_only=True)
        keys = sorted(w, key=lambda k: w[k].numel(), reverse=True)
        flat = torch.cat([w[k].float().flatten() for k in keys])
        ids = ["_".join([str(i), *map(str, w[k].shape)]) for i, k in enumerate(keys)]
        torch.save({"base_optim_states": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(flat),
                                                        "exp_avg_sq": torch.zeros_like(flat)}},
                                          "param_groups": [{"params": [0]}]},
                    "flat_fp32_weights": {0: flat}, "zero_devide_optim_plan": [[ids]]},
                   out / f"optimizer_tp{t}_pp0_zo0.pt")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo unpickled",))


def test_internevo_progress_errors_name_the_file(tmp_path):
    from internlm.checkpoint import internevo_state

    with pytest.raises(CheckpointError, match=r"has no context\.pt .*content=\('model',\)"):
        internevo_state.read_progress(tmp_path)
    torch.save({"batch_count": 2}, tmp_path / "context.pt")
    with pytest.raises(CheckpointError, match=r"context\.pt has no 'num_consumed_samples_in_epoch'"):
        internevo_state.read_progress(tmp_path)
    torch.save({"step_count": 2, "num_consumed_samples_in_epoch": 4, "num_consumed_tokens": 9}, tmp_path / "context.pt")
    (tmp_path / "sampler.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"cannot read .*sampler\.pt \(read with torch\.load\(weights_only"):
        internevo_state.read_progress(tmp_path)
    torch.save({"epoch": 1, "hook": _Evil()}, tmp_path / "sampler.pt")  # numpy is allowed there, nothing else
    with pytest.raises(CheckpointError, match=r"sampler\.pt .*GLOBAL posix\.system"):
        internevo_state.read_progress(tmp_path)
    (tmp_path / "sampler.pt").unlink()
    assert internevo_state.read_progress(tmp_path).step == 2
    with pytest.raises(CheckpointError, match=r"content may hold .*got content=\('model', 'weights'\)"):
        internevo_state.check_content(tmp_path, ("model", "weights"))
