"""The speed switches of doc/train_performance.md: each must compute what the plain path computes,
and each must really be in effect when selected (kernel report, allocator state, saved memory)."""
import collections
import dataclasses
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from internlm.config import AdamConfig
from internlm.model import ops
from internlm.model.attention import resolve_upcast
from internlm.model.internlm import InternLM, Kernels, ModelArgs
from internlm.optim.hybrid_zero import HybridZeroOptimizer, resolve_adamw_impl
from internlm.parallelize import apply_activation_checkpointing, init_parameters
from internlm.perf import resolve_cpu_matmul
from tests.helpers import run_python, tiny_model_args

# ---- attention computed in fp32 from bf16 inputs -------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_mask", "sdpa_loop"])
def test_attention_upcast_runs_sdpa_in_fp32_under_autocast(backend):
    model = InternLM(tiny_model_args(num_layers=1), Kernels(attn_backend=backend))
    init_parameters(model, torch.device("cpu"), seed=5)
    tokens = torch.randint(0, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(24), torch.arange(40)])[None]
    outputs, sdpa_dtypes = {}, {}
    class Spy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.overloadpacket.__name__:
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    for upcast in (False, True):
        model.kernels.attn_upcast = upcast
        spy = Spy()
        with spy, torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[upcast] = model(tokens, positions).float()
        sdpa_dtypes[upcast] = set(spy.seen)
    assert sdpa_dtypes == {False: {torch.bfloat16}, True: {torch.float32}}
    assert outputs[True].dtype == outputs[False].dtype
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0.05, atol=0.05)


def test_attn_compute_resolution():
    assert resolve_upcast("auto", torch.device("cpu")) and not resolve_upcast("auto", torch.device("cuda"))
    assert resolve_upcast("float32", torch.device("cuda")) and not resolve_upcast("input", torch.device("cpu"))
    with pytest.raises(ValueError, match="attn_compute"):
        resolve_upcast("fp8", torch.device("cpu"))


# ---- bf16 matmuls as fp32 GEMMs (model.cpu_matmul="fp32") ----------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fp32_gemm_linear_computes_the_bf16_matmul(bias, x_dtype):
    gen = torch.Generator().manual_seed(0)
    native, emulated = ops.Linear(96, 80, bias=bias), ops.Linear(96, 80, bias=bias, fp32_gemm=True)
    emulated.load_state_dict(native.state_dict())
    x = torch.randn(2, 33, 96, generator=gen).to(x_dtype)
    weights = torch.randn(80, generator=gen)
    results = []
    for layer in (native, emulated):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        (y.float() * weights).sum().backward()
        results.append([y, xi.grad, layer.weight.grad] + ([layer.bias.grad] if bias else []))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        # same bf16 operands, fp32 accumulation and bf16 rounding: equal up to summation order
        torch.testing.assert_close(b, a, rtol=2 ** -7, atol=1e-3)
    # off autocast and in fp32 the layer is plain nn.Linear
    xf = torch.randn(4, 96, generator=gen)
    assert torch.equal(emulated(xf), native(xf))


class _GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every GEMM dispatched while active."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fp32_gemm", [False, True])
def test_fp32_gemm_holds_when_backward_runs_under_autocast(fp32_gemm):
    # the trainer calls loss.backward() inside its autocast region: autocast must not turn the
    # backward's fp32 GEMMs back into bf16 ones (they ran 13x slower on an AVX2 CPU)
    layer = ops.Linear(64, 48, fp32_gemm=fp32_gemm)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), _GemmDtypes() as gemms:
        layer(x).float().sum().backward()
    assert len(gemms.seen) == 3  # forward, grad_x, grad_w
    want = torch.float32 if fp32_gemm else torch.bfloat16
    assert all(d == want for dtypes in gemms.seen for d in dtypes), gemms.seen
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_cpu_matmul_resolution():
    assert resolve_cpu_matmul("fp32", torch.device("cpu"), torch.bfloat16)
    assert not resolve_cpu_matmul("fp32", torch.device("cpu"), torch.float32)
    assert not resolve_cpu_matmul("fp32", torch.device("cuda"), torch.bfloat16)
    assert not resolve_cpu_matmul("native", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="cpu_matmul"):
        resolve_cpu_matmul("fast", torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_matmul_auto_follows_the_cpu(monkeypatch, native_bf16):
    # auto: fp32 GEMMs only where oneDNN has no bf16 kernels (AVX2-only CPUs, where bf16 is ~30x slower)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16, raising=False)
    assert resolve_cpu_matmul("auto", torch.device("cpu"), torch.bfloat16) is (not native_bf16)
    assert not resolve_cpu_matmul("auto", torch.device("cpu"), torch.float32)
    assert not resolve_cpu_matmul("auto", torch.device("cuda"), torch.bfloat16)
    assert resolve_cpu_matmul("fp32", torch.device("cpu"), torch.bfloat16)


# ---- AdamW implementations ------------------------------------------------------------------------

ADAM = AdamConfig(lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)


def _train_adamw(impl, steps=3):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    cfg = dataclasses.replace(ADAM, impl=impl)
    opt = HybridZeroOptimizer([net], cfg, 1.0, stage_world_size=1, device=torch.device("cpu"))
    for i in range(steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(i))
        net(x).pow(2).mean().backward()
        opt.step()
    return opt, [p.detach().clone() for p in net.parameters()]


def test_fused_adamw_is_the_default_and_matches_foreach():
    fused_opt, fused = _train_adamw("auto")
    foreach_opt, foreach = _train_adamw("foreach")
    assert fused_opt.adamw_kind == "fused" and fused_opt.part_optimizers[0].defaults["fused"]
    assert foreach_opt.adamw_kind == "foreach" and foreach_opt.part_optimizers[0].defaults["foreach"]
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_apex_adam_without_apex_is_a_clear_error():
    with pytest.raises(RuntimeError, match="adam.impl='apex' needs NVIDIA apex"):
        resolve_adamw_impl("apex", torch.device("cpu"), has_dtensors=False)
    with pytest.raises(ValueError, match="adam.impl must be one of"):
        resolve_adamw_impl("sgd", torch.device("cpu"), has_dtensors=False)


# ---- RMSNorm: the apex path is taken when available and computes the same norm ------------------


def test_rms_norm_dispatches_to_apex_when_importable(monkeypatch):
    calls = []

    def fake_apex(x, weight, shape, eps):  # the contract of apex's mixed-dtype fused RMSNorm
        calls.append(x.dtype)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    norm = ops.RMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = norm(x)
    assert ops.rms_norm_impl(torch.device("cpu")) == "torch"
    monkeypatch.setattr(ops, "_apex_rms_norm", fake_apex)
    monkeypatch.setattr(ops, "APEX_DEVICES", ("cpu",))
    assert ops.rms_norm_impl(torch.device("cpu")) == "apex"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
    assert calls == [torch.float32] and out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


# ---- selective activation checkpointing -----------------------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops_and_grads(policy):
    """Operators run during backward (recomputation included) and the gradients."""
    model = InternLM(tiny_model_args(num_layers=2))
    init_parameters(model, torch.device("cpu"), seed=3)
    if policy:
        assert apply_activation_checkpointing(model, True, policy) == 2
    tokens = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(40), torch.arange(56)])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, positions).float().logsumexp(-1).mean()
    with _CountOps() as mode:
        loss.backward()
    return mode.counts, [p.grad.clone() for p in model.parameters()]


def test_selective_checkpointing_recomputes_only_cheap_ops():
    none_ops, none_grads = _backward_ops_and_grads(None)
    sel_ops, sel_grads = _backward_ops_and_grads("selective")
    full_ops, full_grads = _backward_ops_and_grads("full")
    # full checkpointing runs the projections again in backward (at least wq, wk, wv, w1, w3 of both
    # layers; it stops once the saved tensors backward needs are back), selective never does
    assert full_ops["mm"] >= none_ops["mm"] + 10, (full_ops["mm"], none_ops["mm"])
    assert sel_ops["mm"] == none_ops["mm"]
    assert full_ops["silu"] == sel_ops["silu"] == 2 and none_ops["silu"] == 0  # SiLU is recomputed
    for a, b, c in zip(none_grads, sel_grads, full_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint_policy"):
        apply_activation_checkpointing(InternLM(ModelArgs(num_layers=1)), True, "some")


def test_selective_op_checkpointing_recomputes_every_other_matmul():
    """torchtitan's op-level policy: of each block's seven matmuls (wq wk wv wo w1 w3 w2) wk, wo and w3
    run again in backward (both layers: 6 more mm than without checkpointing), the gradients unchanged."""
    none_ops, none_grads = _backward_ops_and_grads(None)
    op_ops, op_grads = _backward_ops_and_grads("selective_op")
    assert op_ops["mm"] == none_ops["mm"] + 6, (op_ops["mm"], none_ops["mm"])
    assert op_ops["silu"] == 2
    for a, b in zip(none_grads, op_grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ---- the CPU allocator setting --------------------------------------------------------------------

_MALLOC_PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from internlm.perf import tune_cpu_malloc

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    print(tune_cpu_malloc(sys.argv[1] == "on"))
    before = libc.mallinfo2().hblkhd
    t = torch.ones(16 * 1024 * 1024)  # 64 MiB: glibc maps this separately unless tuned
    during = libc.mallinfo2().hblkhd
    del t
    kept = libc.mallinfo2().fordblks
    print(during - before, kept)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_cpu_malloc_tuning_keeps_big_blocks_in_the_heap():
    results = {}
    for mode in ("on", "off"):
        proc = run_python(["-c", _MALLOC_PROBE, mode], timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        state, numbers = proc.stdout.strip().splitlines()[-2:]
        mapped, kept_free = map(int, numbers.split())
        results[mode] = (state, mapped, kept_free)
    assert results["on"][0] == "glibc tuned (no mmap, no trim)" and results["off"][0] == "default"
    assert results["off"][1] >= 64 * 2**20  # untuned: the block is its own mmap, unmapped on free
    assert results["on"][1] == 0  # tuned: from the heap ...
    assert results["on"][2] >= 64 * 2**20  # ... and kept there, free, for the next step
