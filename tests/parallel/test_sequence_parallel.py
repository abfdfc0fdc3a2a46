"""isp's attention: two all-to-alls around an unchanged kernel give, on each rank's slice of the
sequence, exactly the output and the q/k/v gradients of attention over the whole packed sequence, for
every CPU backend, with grouped-query heads and packed samples that straddle the ranks' slices."""
import json
import re
import textwrap

from tests import launcher

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from internlm.model.attention import packed_attention, plan_attention
    from internlm.sequence_parallel import UlyssesAttention, local_slice

    dist.init_process_group("gloo")
    r, S = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 24, 8, 4, 8
    full = [torch.randn(B, T, h, D) for h in (H, Hkv, Hkv)]
    # samples of 5, 9, 3, 7 tokens, then 4 and 20 in the second row: most cross a slice boundary
    pos = torch.tensor([list(range(5)) + list(range(9)) + list(range(3)) + list(range(7)),
                        list(range(4)) + list(range(20))])
    grad_out = torch.randn(B, T, H, D)
    out = {}
    for backend in ("sdpa", "sdpa_mask", "sdpa_loop"):
        ref_in = [t.clone().requires_grad_() for t in full]
        ref = packed_attention(*ref_in, plan_attention(pos, backend))
        ref.backward(grad_out)
        mine = [local_slice(t, r, S).detach().clone().requires_grad_() for t in full]
        got = UlyssesAttention(packed_attention, None, S)(*mine, plan_attention(local_slice(pos, r, S), backend))
        got.backward(local_slice(grad_out, r, S))
        err = [(got - local_slice(ref, r, S)).abs().max().item()]
        err += [(m.grad - local_slice(x.grad, r, S)).abs().max().item() for m, x in zip(mine, ref_in)]
        out[backend] = max(err)
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    os._exit(0)  # (as train.py does: no C++ teardown of the gloo groups at interpreter exit)
""")


def test_ulysses_attention_equals_whole_sequence_attention(tmp_path):
    script = tmp_path / "ulysses.py"
    script.write_text(SCRIPT)
    for nproc in (2, 4):
        result = launcher.start_script(nproc, script, [], tmp_path / f"run{nproc}").wait(timeout=120)
        assert result.returncode == 0, result.tail()
        found = re.findall(r"RESULT (\{[^}]*\})", result.stdout)  # the ranks' lines may interleave
        assert len(found) == nproc, result.stdout
        for text in found:
            errors = json.loads(text)
            assert set(errors) == {"sdpa", "sdpa_mask", "sdpa_loop"}
            assert max(errors.values()) < 1e-5, errors


RING = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import internlm.context_parallel as cp
    from internlm.context_parallel import RingAttention, context_indices
    cp.Q_CHUNK = cp.Q_CHUNK_FLASH = 5  # several query chunks per segment, the last one short
    cp.USE_CPU_FLASH = sys.argv[2] == "flash"  # PyTorch's CPU flash kernel, or the matmul path
    window, interleaved = int(sys.argv[3]), sys.argv[4] == "1"  # InternEvo's double ring
    from internlm.model.attention import packed_attention, plan_attention
    from internlm.sequence_parallel import UlyssesAttention

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    heads = int(sys.argv[1])  # head-parallel size; world = heads x context, head ranks innermost
    C = world // heads
    h_idx, c_idx = rank % heads, rank // heads
    groups = {}
    for c in range(C):  # every rank creates every group, in the same order
        g = dist.new_group([c * heads + h for h in range(heads)])
        if c == c_idx:
            groups["head"] = g
    for h in range(heads):
        g = dist.new_group([c * heads + h for c in range(C)])
        if h == h_idx:
            groups["context"] = g
    torch.manual_seed(0)
    B, T, H, Hkv, D = 2, 32, 4, 2, 8
    full = [torch.randn(B, T, n, D) for n in (H, Hkv, Hkv)]
    pos = torch.tensor([list(range(5)) + list(range(11)) + list(range(3)) + list(range(13)),
                        list(range(20)) + list(range(12))])
    grad_out = torch.randn(B, T, H, D)
    ref_in = [t.clone().requires_grad_() for t in full]
    ref = packed_attention(*ref_in, plan_attention(pos, "sdpa_loop"))
    ref.backward(grad_out)
    out = {}
    for zigzag in (False, True):
        idx = context_indices(T, c_idx, C, zigzag)
        idx = idx.view(heads, -1)[h_idx]  # then contiguous pieces of the context chunk over the head ranks
        take = lambda t: t[:, idx]
        mine = [take(t).detach().clone().requires_grad_() for t in full]
        kernel = RingAttention(groups["context"], C, zigzag, window, interleaved)
        if heads > 1:
            kernel = UlyssesAttention(kernel, groups["head"], heads)
        got = kernel(*mine, plan_attention(take(pos), "sdpa_loop"))
        got.backward(take(grad_out))
        err = [(got - take(ref)).abs().max().item()]
        err += [(m.grad - take(x.grad)).abs().max().item() for m, x in zip(mine, ref_in)]
        out["zigzag" if zigzag else "contiguous"] = max(err)
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    os._exit(0)
""")


def test_ring_attention_and_head_x_context_equal_whole_sequence_attention(tmp_path):
    """Context parallelism (ring attention, contiguous and zigzag slices; blocks by PyTorch's CPU flash
    kernel or by matmuls; InternEvo's double ring with plain and interleaved windows) and 2D head x
    context parallelism give each rank exactly its tokens' attention output and q/k/v gradients."""
    script = tmp_path / "ring.py"
    script.write_text(RING)
    runs = ((2, 1, "matmul", 1, 0), (2, 1, "flash", 1, 0), (4, 1, "flash", 1, 0), (4, 2, "matmul", 1, 0),
            (4, 1, "flash", 2, 0), (4, 1, "matmul", 2, 1))
    for nproc, heads, kernel, window, interleaved in runs:
        result = launcher.start_script(nproc, script, [str(heads), kernel, str(window), str(interleaved)],
                                       tmp_path / f"run{nproc}_{heads}_{kernel}_{window}{interleaved}"
                                       ).wait(timeout=120)
        assert result.returncode == 0, result.tail()
        found = re.findall(r"RESULT (\{[^}]*\})", result.stdout)
        assert len(found) == nproc, result.stdout
        for text in found:
            errors = json.loads(text)
            assert set(errors) == {"contiguous", "zigzag"}
            assert max(errors.values()) < 1e-5, (nproc, heads, errors)
