"""tools/plan.py: per-rank shapes read off the real parallelized model, the memory/time model, the
published figures it is held to, and the CLI's answers to mistakes."""
import json

import pytest
import torch

from internlm.config import load_config
from internlm.model.internlm import InternLM
from internlm.parallel_dims import ParallelDims
from internlm.plan import GPUS, plan, stage_shapes
from internlm.plan.layouts import LayoutError, candidate_layouts, layout_overrides, parse_layout, planned_config
from tests.helpers import ROOT, run_python, write_config

NO_DATA = ["data.train_folder=None", "data.valid_folder=None"]
TP_SHARDED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "tok_embeddings", "output")


def _tiny(tmp_path, *overrides):
    return load_config(write_config(tmp_path), list(overrides))


def _reference_numel(cfg, tp: int, layers=None) -> tuple[int, int]:
    """(elements of the tp-sharded parameters, of the replicated ones) of a plain model, counted by name."""
    from internlm import builders

    with torch.device("meta"):
        model = InternLM(builders.model_args(cfg))
    sharded = replicated = 0
    for name, p in model.named_parameters():
        if layers is not None and name.startswith("layers.") and int(name.split(".")[1]) not in layers:
            continue
        if any(f"{k}." in name for k in TP_SHARDED):
            sharded += p.numel()
        else:
            replicated += p.numel()
    return sharded, replicated


@pytest.mark.parametrize("tp,zero1,world", [(1, -1, 4), (2, -1, 8), (2, 1, 4), (2, 2, 8)])
def test_stage_shapes_follow_the_trainers_sharding(tmp_path, tp, zero1, world):
    cfg = _tiny(tmp_path, f"parallel.tensor.size={tp}", f"parallel.zero1.size={zero1}")
    dims = ParallelDims.from_config(cfg, world)
    (s,) = stage_shapes(cfg, dims)
    sharded, replicated = _reference_numel(cfg, tp)
    # a forward uses the tp shard of the split matrices and every replicated parameter whole
    assert s.compute_numel == sharded // tp + replicated
    # stored: additionally sharded over zero1's ranks (FSDP pads a dim-0 shard by at most one row)
    assert s.stored_numel == pytest.approx(s.compute_numel / dims.dp_shard, rel=0.05)
    assert s.num_layers == 4 and s.first and s.last


def test_stage_shapes_split_the_pipeline(tmp_path):
    cfg = _tiny(tmp_path, "parallel.pipeline.size=2", "model.num_chunks=2")
    stages = stage_shapes(cfg, ParallelDims.from_config(cfg, 4))
    assert [s.num_layers for s in stages] == [2, 2]
    # interleaved: rank 0 holds stages 0 and 2 (the embedding), rank 1 stages 1 and 3 (the head)
    assert [s.stage_ids for s in stages] == [[0, 2], [1, 3]]
    assert (stages[0].first, stages[0].last, stages[1].first, stages[1].last) == (True, False, False, True)
    assert not any("output" in n for n in stages[0].param_names)
    assert not any("tok_embeddings" in n for n in stages[1].param_names)
    sharded, replicated = _reference_numel(cfg, 1)
    assert sum(s.compute_numel for s in stages) == sharded + replicated


@pytest.mark.parametrize("pp", [2, 4])
def test_pipeline_activations_follow_the_schedule_object(pp):
    """The micro-batches a pipeline rank holds at its peak come from walking the trainer's schedule: the
    closed forms of 1F1B, GPipe and interleaved 1F1B, and the zero-bubble schedules' 1F1B-sized peak on
    every rank (held until the weight-gradient half; ZBV balances its V, which the interleaved form did
    not)."""
    from internlm.plan.schedule import schedule_in_flight

    m = 4 * pp
    for rank in range(pp):
        assert schedule_in_flight(pp, 1, "1f1b", rank, m) == pp - rank
        assert schedule_in_flight(pp, 1, "gpipe", rank, 1) == 1
        assert schedule_in_flight(pp, 1, "gpipe", rank, m) == m
        assert schedule_in_flight(pp, 2, "1f1b", rank, m) == ((pp - rank - 1) * 2 + pp + 1) / 2
        assert schedule_in_flight(pp, 2, "zbh1", rank, m) == pp
        assert schedule_in_flight(pp, 2, "zbv", rank, m) == pp


def test_gradients_and_activations_peak_apart_with_one_micro_batch(tmp_path):
    """A step starts without gradients and a backward frees activations as it makes gradients: with one
    micro-batch the peak holds the larger of the two, with more a later micro-batch runs over the earlier
    ones' gradients (and so does rank 0 of a 1F1B pipeline only once it has more micro-batches than stages)."""
    from internlm.plan.schedule import schedule_memory_states

    assert schedule_memory_states(1, 1, "1f1b", 0, 1) == ((1.0, 0.0, True), (0.0, 1.0, False))
    assert (1.0, 1.0, True) in schedule_memory_states(1, 1, "1f1b", 0, 2)
    assert max(a + g for a, g, _ in schedule_memory_states(2, 1, "1f1b", 0, 2)) == 2
    assert max(a + g for a, g, _ in schedule_memory_states(2, 1, "1f1b", 0, 3)) == 3
    one, two = (plan(_tiny(tmp_path, f"data.micro_num={m}"), 1, GPUS["H100-80GB"]).memory_gib for m in (1, 2))
    assert one["gradients"] == 0 and one["activations"] == two["activations"] > two["gradients"] > 0
    assert one["total"] == pytest.approx(two["total"] - two["gradients"])
    # full checkpointing: the activations are small, the peak is the last layer's backward, when the
    # gradients are there and the recomputed block is live
    ck = plan(_tiny(tmp_path, "data.micro_num=1", "model.checkpoint=True"), 1, GPUS["H100-80GB"]).memory_gib
    assert ck["gradients"] == two["gradients"] and 0 < ck["activations"] < one["activations"]


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_pipeline_bubble_replays_the_schedule(pp):
    """Replaying every rank's actions with the stage dependencies gives the textbook bubbles: (pp-1)/m for
    GPipe and 1F1B, halved by two interleaved chunks; the zero-bubble schedules fill two thirds of the
    interleaved one with weight-gradient work once m >= 2 pp, less with fewer micro-batches."""
    from internlm.plan.schedule import schedule_bubble

    for m in (pp, 2 * pp, 4 * pp):
        one_f_one_b = (pp - 1) / m
        assert schedule_bubble(pp, 1, "1f1b", m) == pytest.approx(one_f_one_b)
        assert schedule_bubble(pp, 1, "gpipe", m) == pytest.approx(one_f_one_b)
        assert schedule_bubble(pp, 2, "1f1b", m) == pytest.approx(one_f_one_b / 2)
        zero_bubble = [schedule_bubble(pp, 2, mode, m) for mode in ("zbh1", "zbv")]
        assert all(z < one_f_one_b / 2 for z in zero_bubble)
        if m >= 2 * pp:
            assert zero_bubble == pytest.approx([one_f_one_b / 6] * 2)


def test_zero1_shards_what_the_optimizer_holds(tmp_path):
    one = plan(_tiny(tmp_path, "parallel.zero1.size=1"), 8, GPUS["H100-80GB"])
    eight = plan(_tiny(tmp_path, "parallel.zero1.size=8"), 8, GPUS["H100-80GB"])
    for key in ("parameters", "gradients", "optimizer_states"):
        assert eight.memory_gib[key] == pytest.approx(one.memory_gib[key] / 8, rel=0.05)
    assert eight.comm_bytes["dp_shard/reduce_scatter"] > 0 and "dp_replicate/all_reduce" not in eight.comm_bytes
    # activations do not depend on how the weights are sharded
    assert eight.memory_gib["activations"] == pytest.approx(one.memory_gib["activations"])


def test_checkpointing_trades_activation_memory_for_time(tmp_path):
    base = ["data.seq_len=256", "model.dtype=torch.bfloat16", "model.num_layers=8"]
    off = plan(_tiny(tmp_path, *base), 8, GPUS["A100-80GB"])
    sel = plan(_tiny(tmp_path, *base, "model.checkpoint=True", "model.checkpoint_policy=selective"), 8,
               GPUS["A100-80GB"])
    op = plan(_tiny(tmp_path, *base, "model.checkpoint=True", "model.checkpoint_policy=selective_op"), 8,
              GPUS["A100-80GB"])  # torchtitan's: every other matmul again too
    full = plan(_tiny(tmp_path, *base, "model.checkpoint=True"), 8, GPUS["A100-80GB"])
    assert full.memory_gib["activations"] < op.memory_gib["activations"] < sel.memory_gib["activations"] \
        < off.memory_gib["activations"]
    assert off.time_s["recompute"] == 0 < sel.time_s["recompute"] < op.time_s["recompute"] \
        < full.time_s["recompute"]
    assert full.tgs < op.tgs < sel.tgs < off.tgs


# ---- against published runs (doc/plan.md) -----------------------------------------------------------
INTERNEVO_7B = ["parallel.zero1.size=8"]


@pytest.mark.parametrize("overrides,published", [
    ([], 4078),  # InternEvo doc/en/train_performance.md: 8 x A100-80GB, tp=1 zero1=8, micro_bsz 2 x 4
    (["model.checkpoint=True", "data.micro_bsz=8", "data.micro_num=1"], 3314),  # same, activation checkpointing
])
def test_internevo_7b_on_a100_within_20_percent(overrides, published):
    cfg = load_config(ROOT / "configs/7B_sft.py", NO_DATA + INTERNEVO_7B + overrides)
    p = plan(cfg, 8, GPUS["A100-80GB"])
    assert p.fits
    assert abs(p.tgs / published - 1) < 0.20, (p.tgs, published)


LLAMA3_8B = ["VOCAB_SIZE=128256", "model.vocab_size=128256", "data.seq_len=8192", "model.max_position_embeddings=8192",
             "parallel.tensor.size=1", "parallel.zero1.fsdp=True", "model.checkpoint=True",
             "model.checkpoint_policy='selective_op'", "data.micro_bsz=2", "data.micro_num=1"]


@pytest.mark.parametrize("gpus,published", [
    (8, 5762),  # torchtitan benchmarks/llama3_h100_202412_torchtitan.md: Llama 3.1 8B, FSDP, selective AC
    (128, 5605),  # same, Table 3: 16 hosts, global batch 256
])
def test_torchtitan_llama3_8b_on_h100_within_20_percent(gpus, published):
    # Llama 3.1 8B has InternLM2 7B's shape (4096 hidden, 32 layers, 8 KV heads, FFN 14336)
    cfg = load_config(ROOT / "configs/7B_internlm2.py", NO_DATA + LLAMA3_8B + [f"parallel.zero1.size={gpus}"])
    p = plan(cfg, gpus, GPUS["H100-96GB"])
    assert p.fits
    assert abs(p.tgs / published - 1) < 0.20, (p.tgs, published)


def test_internevo_layout_order_on_8_a100():
    # published: (tp=1, zero1=8) 4078 > (tp=2, zero1=4) 3761 (tp=2 runs micro_bsz 4)
    tp1 = plan(load_config(ROOT / "configs/7B_sft.py", NO_DATA + INTERNEVO_7B), 8, GPUS["A100-80GB"])
    tp2 = plan(load_config(ROOT / "configs/7B_sft.py", NO_DATA + ["parallel.tensor.size=2", "parallel.zero1.size=4",
                                                                  "data.micro_bsz=4"]), 8, GPUS["A100-80GB"])
    assert tp2.tgs < tp1.tgs
    assert tp2.tgs / tp1.tgs == pytest.approx(3761 / 4078, abs=0.08)


# ---- layouts and the CLI ----------------------------------------------------------------------------
def test_layout_words_map_to_config_keys():
    lay = parse_layout("tp=2 pp=2, zero1=8 ckpt=selective micro_bsz=4")
    assert layout_overrides(lay) == ["parallel.tensor.size=2", "parallel.pipeline.size=2", "parallel.zero1.size=8",
                                     "data.micro_bsz=4", "model.checkpoint=True", "model.checkpoint_policy=selective"]
    with pytest.raises(LayoutError, match="did you mean 'zero1'"):
        parse_layout("zero=8")
    with pytest.raises(LayoutError, match="ckpt='some'"):
        layout_overrides({"ckpt": "some"})


def test_candidates_keep_the_global_batch(tmp_path):
    cfg = _tiny(tmp_path)
    rows = cfg.data.micro_bsz * cfg.data.micro_num * 8
    cands = candidate_layouts(cfg, 8, 8)
    assert cands and all(c["micro_bsz"] * c["micro_num"] * 8 // (c["tp"] * c["pp"]) == rows for c in cands)
    assert {c["tp"] for c in cands} == {1, 2}  # 2 kv heads: tp=4 cannot split them


def _plan_cli(*args, cwd=ROOT):
    return run_python([ROOT / "tools/plan.py", *map(str, args)], cwd=cwd, timeout=240)


def test_cli_plans_a_layout_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    r = _plan_cli("--config", "configs/7B_sft.py", "--gpus", 16, "--gpu", "a100-80gb",
                  "--layout", "tp=2 zero1=8 ckpt=full", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "tp=2(mtp) pp=1 dp=8 zero1=8 ckpt=full" in r.stdout and "predicted: TGS" in r.stdout
    data = json.loads(out.read_text())
    p = data["plans"][0]
    assert data["gpu"] == "A100-80GB" and p["fits"] is True
    assert p["memory_gib"]["total"] == pytest.approx(sum(v for k, v in p["memory_gib"].items() if k != "total"))
    assert p["comm_bytes"]["tp/all_reduce"] > 0 and p["comm_bytes"]["dp_shard/all_gather"] > 0


def test_cli_names_the_nearest_layout_that_works():
    r = _plan_cli("--config", "configs/7B_sft.py", "--gpus", 8, "--layout", "tp=3")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    near = r.stderr.split("nearest layout that works: --layout ")[1].strip().strip('"')
    near = dict(w.split("=") for w in near.split())
    # the closest tp that divides the heads; the rest of the config's layout kept
    assert near["tp"] in ("2", "4") and near["pp"] == "1" and near["ckpt"] == "off"
    assert int(near["micro_bsz"]) * int(near["micro_num"]) * 8 // int(near["tp"]) == 2 * 4 * 8
    r = _plan_cli("--config", "configs/7B_sft.py", "--gpus", 8, "--layout", "tpp=2")
    assert r.returncode == 2 and "did you mean 'tp'" in r.stderr


def test_cli_search_ranks_layouts_and_says_when_nothing_fits(tmp_path):
    cfg = write_config(tmp_path, **{"model": {"dtype": "torch.bfloat16"}})
    r = _plan_cli("--config", cfg, "--gpus", 4, "--gpu", "H100-80GB", "--search", "--top", 3)
    assert r.returncode == 0, r.stderr
    ranked = [float(line.split()[1]) for line in r.stdout.splitlines()[2:5]]
    assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True)
    # 1 GiB: below the headroom every plan keeps for the CUDA context and fragmentation
    r = _plan_cli("--config", cfg, "--gpus", 2, "--gpu", "A100-80GB", "--memory_gb", 1, "--search")
    assert r.returncode == 2 and "no layout of this config fits 2 x A100-80GB (1 GiB each)" in r.stderr
    assert "needs" in r.stderr and "Traceback" not in r.stderr


def test_planned_config_ignores_missing_data_folders(tmp_path):
    cfg = planned_config(write_config(tmp_path, data={"train_folder": "/nowhere"}), [], {"tp": "2"})
    assert cfg.data.train_folder is None and cfg.parallel.tensor.size == 2


def test_explain_reads_a_finished_run_against_its_plan(tmp_path, capsys):
    """--explain RUN_FOLDER: a 2-process dp run with --profiling, its medians and trace parts against the
    plan of the same layout (world size read off the tokens per step), the largest gap named; missing
    files are one-line errors."""
    import statistics

    from internlm.cli import plan as plan_cli
    from internlm.plan.explain import read_trace
    from tests import launcher

    cfg = write_config(tmp_path, data=dict(total_steps=6))
    run = launcher.run(2, ["--profiling", "--count-comm", "--track-memory"], tmp_path, config=cfg, timeout=240)
    assert run.returncode == 0, run.tail()
    folder = tmp_path / "run"
    out = tmp_path / "explain.json"
    assert plan_cli.main(["--explain", str(folder), "--gpu", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    m = res["measured"]
    assert m["world_size"] == 2 and m["steps"] == 5
    assert m["step_s"] == pytest.approx(statistics.median(r["step_time"] for r in run.records[1:]))
    trace = read_trace(next((folder / "profile").glob("trace_rank0_steps*.json")))
    assert trace["steps"] == 3 and 0 < trace["comm_s"] < trace["step_s"] and trace["optimizer_s"] > 0
    assert m["comm_s"] == pytest.approx(trace["comm_s"])
    rows = {r[0]: r for r in res["rows"]}
    assert {"step time", "TGS", "MFU", "communication", "optimizer", "peak memory"} <= set(rows)
    # --count-comm: the bytes rank 0 sent in step 2, by kind, next to the plan's (FSDP's, exactly)
    counted = json.loads((folder / "comm" / "rank0.json").read_text())["bytes"]
    for kind in ("all_gather", "reduce_scatter"):
        assert rows[f"sent {kind}"][1] == pytest.approx(counted[kind] / 2**20)
        assert rows[f"sent {kind}"][2] == pytest.approx(rows[f"sent {kind}"][1], rel=1e-6)
    assert rows["communication"][2] > 0  # the plan's FSDP traffic of dp=2
    assert res["layout"].startswith("tp=1 pp=1 dp=2 zero1=2")
    tracked = json.loads((folder / "memory" / "rank0.json").read_text())
    assert tracked["step"] == 3  # the step after the counted one
    tracked = tracked["peak_bytes"]["total"]
    assert rows["tensor memory"][1] == pytest.approx(tracked / 2**30)
    assert 0.85 < rows["tensor memory"][1] / rows["tensor memory"][2] < 1.15
    assert "largest gap: " in text and res["largest_gap"].split(":")[0] in rows
    # mistakes: one line, exit status 2
    assert plan_cli.main(["--explain", str(tmp_path / "nowhere"), "--gpu", "cpu"]) == 2
    assert "config.yaml does not exist" in capsys.readouterr().err
    (folder / "metrics.jsonl").write_text("")
    assert plan_cli.main(["--explain", str(folder), "--gpu", "cpu"]) == 2
    assert "holds no training step" in capsys.readouterr().err
    assert plan_cli.main(["--gpu", "cpu"]) == 2
    assert "--config and --gpus are needed" in capsys.readouterr().err
