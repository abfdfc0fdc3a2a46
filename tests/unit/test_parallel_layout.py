"""The parallel layout without launching processes: rank coordinates and process groups
(internlm/parallel_dims.py) and the layout errors train.py reports before any process group work starts
(called in-process, and once through the real command line). The pipeline's stage placement and
layer split are in test_pipeline.py."""
from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
import torch.distributed as dist

from internlm.cli import train  # the command behind train.py, called in-process for the fast error checks
from internlm.config import load_config
from internlm.parallel_dims import MESH_DIMS, ParallelDims
from tests.helpers import TRAIN, run_python, write_config

# ------------------------------------------------------------------------------------------ rank layout

def test_coords_tp_innermost_then_zero1_then_replicas_then_pp():
    dims = ParallelDims(world_size=16, pp=2, dp_replicate=2, dp_shard=2, tp=2)
    for rank in range(16):
        c = dims.coords(rank)
        assert c["tp"] == rank % 2
        assert c["dp_shard"] == (rank // 2) % 2
        assert c["dp_replicate"] == (rank // 4) % 2
        assert c["pp"] == rank // 8
        assert c["dp"] == c["dp_replicate"] * 2 + c["dp_shard"]
    # the picture in doc/parallel.md
    assert [r for r in range(16) if dims.coords(r)["pp"] == 0 and dims.coords(r)["tp"] == 0] == [0, 2, 4, 6]
    assert [dims.coords(r)["dp"] for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_coords_are_a_bijection():
    for pp, dpr, dps, tp in itertools.product((1, 2, 3), (1, 2), (1, 2, 4), (1, 2)):
        world = pp * dpr * dps * tp
        dims = ParallelDims(world_size=world, pp=pp, dp_replicate=dpr, dp_shard=dps, tp=tp)
        seen = {tuple(dims.coords(r)[d] for d in MESH_DIMS) for r in range(world)}
        assert len(seen) == world
        assert {dims.coords(r)["dp"] for r in range(world)} == set(range(dims.dp))


def test_product_must_equal_world():
    with pytest.raises(ValueError, match="world size 8"):
        ParallelDims(world_size=8, pp=1, dp_replicate=1, dp_shard=2, tp=2)


def _cfg(*overrides):
    with tempfile.TemporaryDirectory() as tmp:
        return load_config(write_config(Path(tmp)), overrides)


@pytest.mark.parametrize("zero1, world, tp, pp, want", [
    (-1, 8, 1, 1, (1, 8)),  # all of dp
    (0, 8, 1, 1, (1, 8)),
    (1, 8, 1, 1, (8, 1)),  # plain replication (DDP semantics)
    (2, 8, 1, 1, (4, 2)),  # HSDP: 4 replicas of 2-way shards
    (4, 16, 2, 2, (1, 4)),
    (16, 8, 2, 1, (1, 4)),  # larger than dp: capped at dp
])
def test_from_config_splits_dp_into_replicas_and_zero1_shards(zero1, world, tp, pp, want):
    cfg = _cfg(f"parallel.zero1.size={zero1}", f"parallel.tensor.size={tp}", f"parallel.pipeline.size={pp}")
    dims = ParallelDims.from_config(cfg, world)
    assert (dims.dp_replicate, dims.dp_shard) == want
    assert dims.dp == world // (tp * pp) and (dims.tp, dims.pp) == (tp, pp)


@pytest.mark.parametrize("weight, zero1, world, tp, want", [
    (16, 1, 4, 1, (1, 4, 1, "zero1=4 raised from 1 by weight.size")),  # InternEvo's 8B_internlm3.py on 4 ranks
    (4, 1, 8, 2, (2, 2, 2, "zero1=2 raised from 1 by weight.size")),  # 7B_isp_sft.py: wp=2 in-group, x2 over dp
    (4, -1, 8, 2, (1, 4, 2, "zero1=4,")),  # zero1 already shards more: unchanged
    (8, 2, 8, 1, (1, 8, 1, "zero1=8 raised from 2 by weight.size")),
    (6, 1, 4, 1, (2, 2, 1, "zero1=2 raised from 1 by weight.size")),  # as far as dp divides: gcd(6, 4)
])
def test_weight_size_beyond_the_isp_group_raises_zero1(weight, zero1, world, tp, want):
    """InternEvo shards each weight weight.size ways even beyond the isp group; here the part beyond the
    group is zero1 sharding, raised to cover it (and said so in the layout line)."""
    cfg = _cfg("parallel.tensor.mode=isp", f"parallel.tensor.size={tp}", f"parallel.weight.size={weight}",
               f"parallel.zero1.size={zero1}")
    dims = ParallelDims.from_config(cfg, world)
    assert (dims.dp_replicate, dims.dp_shard, dims.wp) == want[:3]
    assert want[3] in dims.describe()


@pytest.mark.parametrize("mode, chunks, resharded", [("1f1b", 1, True), ("1f1b", 2, True), ("gpipe", 1, True),
                                                      ("zbh1", 1, False), ("zbv", 2, False)])
def test_zero_bubble_schedules_keep_fsdp_weights_gathered(mode, chunks, resharded):
    # their weight-gradient pass runs after later forwards: a weight resharded by one of those would take
    # its gradient on the shard (unreduced); tests/parallel/test_parity.py::pp2_zbv_dp2_fsdp trains it
    cfg = _cfg("parallel.pipeline.size=2", f"parallel.pipeline.mode={mode}", f"model.num_chunks={chunks}",
               "parallel.zero1.fsdp=True")
    dims = ParallelDims.from_config(cfg, 4)
    assert dims.reshard_after_forward == resharded
    assert dims.fsdp_kept_for_zero_bubble == (not resharded)
    assert ("fsdp kept gathered for zero-bubble" in dims.describe()) == (not resharded)


def test_sequence_parallel_only_with_tp():
    assert ParallelDims(world_size=2, tp=2, tp_mode="msp").sequence_parallel
    assert not ParallelDims(world_size=2, tp=2, tp_mode="mtp").sequence_parallel
    assert not ParallelDims(world_size=1, tp=1, tp_mode="msp").sequence_parallel


# parallel.py reads the flattened "dp" dim back from the root mesh; torch warns that this slicing is deprecated
@pytest.mark.filterwarnings("ignore:Slicing a flattened dim from root mesh")
def test_mesh_groups_match_coords():
    """Build the real DeviceMesh on a fake process group for a few ranks of a 16-rank world and check
    that every mesh dimension's group is exactly the ranks that differ from this one only there."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dims = ParallelDims(world_size=16, pp=2, dp_replicate=2, dp_shard=2, tp=2)
    coords = [dims.coords(r) for r in range(16)]

    def peers(rank, along):
        return [q for q in range(16) if all(coords[q][d] == coords[rank][d] for d in MESH_DIMS if d not in along)]

    assert not dist.is_initialized()
    for rank in (0, 5, 10, 15):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=16)
        try:
            mesh = dims.build_mesh("cpu")
            for name in MESH_DIMS:
                assert dist.get_process_group_ranks(mesh[name].get_group()) == peers(rank, {name}), name
            dp_ranks = dist.get_process_group_ranks(mesh["dp"].get_group())
            assert dp_ranks == peers(rank, {"dp_replicate", "dp_shard"})
            assert mesh["dp"].get_local_rank() == coords[rank]["dp"]
        finally:
            dist.destroy_process_group()


# ----------------------------------------------------------------- layout errors (world-independent)

LAYOUT_ERRORS = [
    # (overrides, text the message must hold)
    (("parallel.tensor.size=3",), "model.num_attention_heads=4 is not divisible by parallel.tensor.size=3"),
    (("parallel.tensor.size=4",), "model.num_kv_attention_heads=2 is not divisible by parallel.tensor.size=4"),
    (("parallel.tensor.size=2", "model.vocab_size=127"), "model.vocab_size=127"),
    (("parallel.pipeline.size=3",), "model.num_layers=4 is not divisible by parallel.pipeline.size(3)"),
    (("parallel.pipeline.size=2", "model.num_chunks=4"), "model.num_chunks(4)"),
    (("model.num_chunks=2",), "model.num_chunks=2 needs pipeline parallelism"),
    (("parallel.pipeline.size=2", "parallel.pipeline.mode='zbv'"), "parallel.pipeline.mode='zbv'"),
    (("parallel.tensor.mode='fsp'",), "parallel.tensor.mode='fsp' is not supported"),
    (("parallel.tensor.mode='isp'", "parallel.tensor.size=4"), "model.num_kv_attention_heads=2 is not divisible"),
    (("parallel.weight.size=2",), "parallel.weight.size=2 works within InternEvo's isp mode"),
    (("parallel.zero1.size=-2",), "parallel.zero1.size"),
    # PyTorch's schedules refuse these micro-batch counts at the first step, deep inside a rank
    (("parallel.pipeline.size=4", "data.micro_num=2"), "data.micro_num=2 is fewer than the 4 pipeline stages"),
    (("parallel.pipeline.size=2", "model.num_chunks=2", "data.micro_num=5"),
     "data.micro_num=5 does not fit the interleaved 1F1B schedule over parallel.pipeline.size=2"),
]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("layout_errors"))


@pytest.mark.parametrize("overrides, message", LAYOUT_ERRORS, ids=[" ".join(o) for o, _ in LAYOUT_ERRORS])
def test_train_rejects_layout_before_launch(overrides, message, tiny_config, tmp_path, capsys):
    """`train.py` stops with exit code 2 and a one-line message naming the key; nothing is launched
    (no process group: the check runs while loading the config)."""
    rc = train.main(["--config", str(tiny_config), *overrides, f"monitor.run_folder={str(tmp_path / 'run')!r}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


def test_train_cli_layout_error_exit_code(tiny_config, tmp_path):
    """The same through the real command line: a non-zero exit, the key named, no traceback."""
    proc = run_python([TRAIN, "--config", tiny_config, "parallel.tensor.size=3"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "parallel.tensor.size=3" in proc.stderr and "model.num_attention_heads" in proc.stderr
    assert "Traceback" not in proc.stderr
