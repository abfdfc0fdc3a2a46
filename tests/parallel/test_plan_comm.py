"""The planner's communication against the bytes a real run sends (issue 17's CPU proof).

Each layout trains two steps under torchrun (gloo) with `train.py --count-comm`, which counts every
collective of the second step on every rank (internlm/comm_count.py: c10d and functional collectives,
forward, backward and optimizer, under the ring model). `tools/plan.py`'s estimate for the same config
and world size (internlm/plan/estimate.py `communication`) must give, for the rank of its peak pipeline
stage, each collective kind's bytes within 2% of what that rank sent, for every kind that carries at
least 1% of the step's traffic; the kinds below that (loss and gradient-norm reductions, a few numbers)
must stay under 1% together. Expert-parallel all-to-all depends on where the router sends tokens: the
plan assumes even routing and no drops, so that kind gets 15%. Where FSDP shards over more than one
rank, the memory traffic of its copies around the collectives (copy-out after each all-gather, copy-in
before each reduce-scatter), which the plan times on the compute stream, must match within 2% too.
"""
from __future__ import annotations

import json

import pytest

from tests import launcher

KIND_TOL = 0.02
SMALL = 0.01
ROUTED_TOL = 0.15
MOE = ("model_type='INTERNLM_MoE'", "model.num_experts=4")
ISP = ("parallel.tensor.mode='isp'",)
S2D = ("parallel.sequence_2D.enable=True",)


def comm_layout(name: str, nproc: int, overrides: tuple[str, ...]):
    return pytest.param(launcher.ProbeLayout("--count-comm", name, nproc, overrides), id=name)


LAYOUTS = [
    comm_layout("dp2_zero1-2", 2, ("parallel.zero1.size=2",)),
    comm_layout("dp2_fsdp", 2, ("parallel.zero1.fsdp=True",)),
    comm_layout("dp4_zero1-2_hsdp", 4, ("parallel.zero1.size=2",)),
    comm_layout("tp2_mtp", 2, ("parallel.tensor.size=2", "parallel.tensor.mode='mtp'")),
    comm_layout("tp2_msp_dp2", 4, ("parallel.tensor.size=2", "parallel.tensor.mode='msp'", "parallel.zero1.size=2")),
    comm_layout("pp2_1f1b", 2, ("parallel.pipeline.size=2",)),
    comm_layout("pp2_dp2_zero1", 4, ("parallel.pipeline.size=2", "parallel.zero1.size=2")),
    comm_layout("pp2_dp2_fsdp", 4, ("parallel.pipeline.size=2", "parallel.zero1.fsdp=True")),
    comm_layout("zbv_dp2_fsdp", 4, ("parallel.pipeline.size=2", "parallel.pipeline.mode='zbv'", "model.num_chunks=2",
                                    "parallel.zero1.fsdp=True")),
    comm_layout("pp2_interleaved", 2, ("parallel.pipeline.size=2", "model.num_chunks=2")),
    comm_layout("pp2_zbv", 2, ("parallel.pipeline.size=2", "parallel.pipeline.mode='zbv'", "model.num_chunks=2")),
    comm_layout("isp2_wp2", 2, ("parallel.tensor.size=2", *ISP, "parallel.weight.size=2")),
    comm_layout("isp4_head2_context2", 4, ("parallel.tensor.size=4", *ISP, "model.num_kv_attention_heads=4", *S2D,
                                          "parallel.sequence_2D.head_size=2", "parallel.sequence_2D.context_size=2")),
    comm_layout("isp4_double_ring", 4, ("parallel.tensor.size=4", *ISP, *S2D, "parallel.sequence_2D.head_size=1",
                                       "parallel.sequence_2D.context_size=4", "parallel.sequence_2D.window_size=2")),
    comm_layout("moe_ep2", 2, (*MOE, "parallel.expert.size=2")),
    comm_layout("moe_ep2_edp2", 4, (*MOE, "parallel.expert.size=2", "data.micro_num=1")),  # experts sharded
    comm_layout("moe_tp2_msp", 2, (*MOE, "parallel.tensor.size=2", "parallel.tensor.mode='msp'")),
    comm_layout("moe_isp2", 2, (*MOE, "parallel.tensor.size=2", *ISP)),
]


def _planned(result: launcher.RunResult, layout: launcher.ProbeLayout) -> tuple[dict, int, float | None]:
    from internlm.config import load_config
    from internlm.parallel_dims import ParallelDims
    from internlm.plan.estimate import comm_by_kind, fsdp_group_sizes, plan
    from internlm.plan.hardware import cpu_hardware

    overrides = layout.config_overrides()
    cfg = load_config(result.run_folder.parent / "tiny.py", overrides)
    p = plan(cfg, layout.nproc, cpu_hardware())
    dims = ParallelDims.from_config(cfg, layout.nproc)
    # FSDP's copies run as torch.ops.fsdp kernels when its shard group has more than one rank (with one,
    # FSDP copies with plain tensor copies, which the counter does not single out)
    copies = p.hbm_bytes["fsdp_copy"] if dims.fsdp and fsdp_group_sizes(dims)[0] > 1 else None
    return comm_by_kind(p.comm_bytes), p.peak_stage * dims.dp * dims.tp, copies


@pytest.mark.parametrize("layout", LAYOUTS)
def test_planned_bytes_per_collective_match_a_counted_run(layout: launcher.ProbeLayout, runner):
    result = runner.result(layout.job())
    assert result.returncode == 0, result.tail()
    planned, rank, copies = _planned(result, layout)
    counted = json.loads((result.run_folder / "comm" / f"rank{rank}.json").read_text())
    assert counted["step"] == 2
    if copies is not None:  # the memory traffic of FSDP's copy-out and copy-in, which the plan times
        got = counted["hbm_bytes"]["fsdp_copy"]
        assert abs(copies - got) <= KIND_TOL * got, f"{layout.name} rank {rank}: FSDP copies planned " \
                                                    f"{copies:.0f} counted {got:.0f}"
    measured = counted["bytes"]
    total = sum(measured.values())
    assert total > 0
    small = 0.0
    rows = []
    for kind in sorted(set(planned) | set(measured)):
        got, want = measured.get(kind, 0.0), planned.get(kind, 0.0)
        rows.append(f"{kind}: planned {want:.0f} counted {got:.0f}")
        if max(got, want) < SMALL * total:
            small += got
            continue
        tol = ROUTED_TOL if kind == "all_to_all" and "parallel.expert.size=2" in layout.overrides else KIND_TOL
        assert abs(want - got) <= tol * got, f"{layout.name} rank {rank}: " + "; ".join(rows)
    assert small < SMALL * total, f"{layout.name}: {small:.0f} of {total:.0f} bytes unplanned: " + "; ".join(rows)
