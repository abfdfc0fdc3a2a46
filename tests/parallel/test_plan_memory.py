"""The planner's memory against the tensor memory a real run holds (issue 17's CPU proof).

Each layout trains two steps under torchrun (gloo) with `train.py --track-memory`, which records with
PyTorch's MemTracker the tensor memory each rank holds at its peak in the second step (parameters,
gradients, optimizer states, FSDP's gathered weights, activations, temporaries; not the Python runtime).
`tools/plan.py`'s estimate for the same config and world size must be within 15% of the measured peak
of the rank of its peak pipeline stage.
"""
from __future__ import annotations

import json

import pytest

from tests import launcher

TOL = 0.15
MOE = ("model_type='INTERNLM_MoE'", "model.num_experts=4")
ISP = ("parallel.tensor.size=2", "parallel.tensor.mode='isp'")
ONE_MICRO = "data.micro_num=1"  # no gradients during the forward: the peak holds activations or gradients


def mem_layout(name: str, nproc: int, overrides: tuple[str, ...]):
    return pytest.param(launcher.ProbeLayout("--track-memory", name, nproc, overrides), id=name)


LAYOUTS = [
    mem_layout("one_process", 1, ()),
    mem_layout("full_checkpoint", 1, ("model.checkpoint=True",)),
    mem_layout("dp2_zero1-2", 2, ("parallel.zero1.size=2",)),
    mem_layout("dp2_fsdp", 2, ("parallel.zero1.fsdp=True",)),
    mem_layout("dp2_selective_checkpoint", 2, ("parallel.zero1.size=2", "model.checkpoint=True",
                                              "model.checkpoint_policy='selective'")),
    mem_layout("dp2_selective_op_checkpoint", 2, ("parallel.zero1.size=2", "model.checkpoint=True",
                                                 "model.checkpoint_policy='selective_op'")),
    mem_layout("tp2_mtp", 2, ("parallel.tensor.size=2", "parallel.tensor.mode='mtp'")),
    mem_layout("tp2_msp", 2, ("parallel.tensor.size=2", "parallel.tensor.mode='msp'")),
    mem_layout("pp2_1f1b", 2, ("parallel.pipeline.size=2",)),
    mem_layout("pp2_interleaved", 2, ("parallel.pipeline.size=2", "model.num_chunks=2")),
    mem_layout("isp2", 2, ISP),
    mem_layout("isp2_wp2", 2, (*ISP, "parallel.weight.size=2")),
    mem_layout("moe_dp2", 2, (*MOE, "parallel.zero1.size=2")),
    mem_layout("moe_ep2", 2, (*MOE, "parallel.expert.size=2")),
    mem_layout("moe_ep2_edp2", 4, (*MOE, "parallel.expert.size=2")),  # experts sharded
    mem_layout("one_process_micro1", 1, (ONE_MICRO,)),
    mem_layout("full_checkpoint_micro1", 1, (ONE_MICRO, "model.checkpoint=True")),  # gradients + recompute
    mem_layout("dp2_fsdp_micro1", 2, (ONE_MICRO, "parallel.zero1.fsdp=True")),
    mem_layout("dp2_zero1-2_micro1", 2, (ONE_MICRO, "parallel.zero1.size=2")),
    mem_layout("pp2_1f1b_micro2", 2, ("parallel.pipeline.size=2", "data.micro_num=2")),  # F F B B on rank 0
    mem_layout("pp2_dp2_zero1", 4, ("parallel.pipeline.size=2", "parallel.zero1.size=2")),
    mem_layout("pp2_dp2_fsdp", 4, ("parallel.pipeline.size=2", "parallel.zero1.fsdp=True")),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_planned_peak_memory_matches_a_tracked_run(layout: launcher.ProbeLayout, runner):
    from internlm.config import load_config
    from internlm.parallel_dims import ParallelDims
    from internlm.plan.estimate import GiB, plan
    from internlm.plan.hardware import cpu_hardware

    result = runner.result(layout.job())
    assert result.returncode == 0, result.tail()
    overrides = layout.config_overrides()
    cfg = load_config(result.run_folder.parent / "tiny.py", overrides)
    p = plan(cfg, layout.nproc, cpu_hardware())
    dims = ParallelDims.from_config(cfg, layout.nproc)
    rank = p.peak_stage * dims.dp * dims.tp
    tracked = json.loads((result.run_folder / "memory" / f"rank{rank}.json").read_text())
    assert tracked["step"] == 2
    measured = tracked["peak_bytes"]["total"]
    predicted = p.memory_gib["total"] * GiB
    parts = {k: round(v * 1024, 2) for k, v in p.memory_gib.items()}
    seen = {k: round(v / 2**20, 2) for k, v in tracked["peak_bytes"].items()}
    assert abs(predicted - measured) <= TOL * measured, \
        f"{layout.name} rank {rank}: planned {parts} MiB, tracked {seen} MiB"


def test_track_memory_is_off_with_a_notice_under_zero_bubble_schedules(tmp_path):
    run = launcher.run(2, ["--track-memory", "data.total_steps=2", "parallel.pipeline.size=2",
                           "parallel.pipeline.mode='zbv'", "model.num_chunks=2"], tmp_path, timeout=240)
    assert run.returncode == 0, run.tail()
    assert "notice: --track-memory is off for parallel.pipeline.mode='zbv'" in run.out
    assert not (tmp_path / "run" / "memory").exists()
