"""internlm/comm_count.py: the bytes a rank sends, by collective kind, under the ring model, for the
c10d and functional collectives the trainer uses (on a fake process group of 4: nothing moves, every
operator still dispatches)."""
import torch
import torch.distributed as dist

from internlm.comm_count import CommCounter
from internlm.plan.shapes import fake_world


def test_each_collective_counts_what_one_rank_sends_in_a_ring():
    from torch.distributed._functional_collectives import all_gather_tensor, all_reduce, reduce_scatter_tensor

    with fake_world(4, 1):
        x = torch.ones(16)  # 64 bytes
        with CommCounter() as c:
            dist.all_reduce(x)  # 2 * 3/4 * 64 = 96
            dist.all_gather_into_tensor(torch.empty(64), x)  # 3 * 64 = 192
            dist.reduce_scatter_tensor(torch.empty(4), x)  # 3/4 * 64 = 48
            dist.all_to_all_single(torch.empty(16), x)  # 3/4 of the input leaves: 48
            dist.all_to_all_single(torch.empty(10), torch.ones(10), [1, 2, 3, 4], [4, 3, 2, 1])  # rank 1 keeps 3
            dist.send(x, 2)  # 64
            dist.recv(x, 0)  # 0
            all_reduce(x, "sum", dist.group.WORLD)  # functional (tensor parallelism): 96
            all_gather_tensor(x, 0, dist.group.WORLD)  # 192
            reduce_scatter_tensor(x, "sum", 0, dist.group.WORLD)  # 48
            sub = dist.new_group([0, 1])
            dist.all_reduce(torch.ones(8), group=sub)  # 2 * 1/2 * 32 = 32
    assert dict(c.bytes) == {"all_reduce": 96 + 96 + 32, "all_gather": 192 + 192, "reduce_scatter": 48 + 48,
                             "all_to_all": 48 + 28, "send": 64, "recv": 0}
    assert c.calls["all_reduce"] == 3 and c.calls["all_to_all"] == 2


def test_fsdp_copies_count_what_they_read_and_write():
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401  (registers torch.ops.fsdp)

    gathered = torch.arange(24, dtype=torch.bfloat16)  # an all-gather's output over 2 ranks: 48 bytes
    outs = [torch.empty(2, 4, dtype=torch.bfloat16), torch.empty(2, 8, dtype=torch.bfloat16)]
    grads = [torch.ones(4, 2, dtype=torch.bfloat16), torch.ones(6, dtype=torch.bfloat16)]  # 28 bytes
    rs_input = torch.empty(14, dtype=torch.float32)  # 56 bytes
    with CommCounter() as c:
        torch.ops.fsdp.split_with_sizes_copy(gathered.view(2, -1), [4, 8], dim=1, out=outs)
        torch.ops.fsdp.chunk_cat(grads, dim=0, num_chunks=2, out=rs_input.view(2, -1))
        torch.empty(6).copy_(torch.ones(6))  # other copies are not FSDP's
    assert dict(c.hbm) == {"fsdp_copy": (48 + 48) + (28 + 56)}
    assert outs[1][1].tolist() == gathered.view(2, -1)[1, 4:].tolist()  # the copies still ran
    assert not c.bytes
