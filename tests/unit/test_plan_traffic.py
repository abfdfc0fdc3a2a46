"""The memory traffic the planner times (BLOCK_BYTES, MOE_BYTES and LOSS_BYTES in
internlm/plan/estimate.py), counted from the ops the trainer's blocks and loss kernels really run,
forward and backward."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

COMPUTE = ("mm", "addmm", "bmm", "_scaled_dot_product", "_grouped_mm")  # timed by their FLOPs
_ORIGINAL_RMS_NORM = F.rms_norm


class _Traffic(TorchDispatchMode):
    """Bytes each aten op reads and writes (views and allocations move nothing). Ops that touch a few
    elements of a big tensor count those elements; ATen's composite reductions count their passes over
    the input: logsumexp = amax, subtract, exp, sum (6 input-sized reads and writes), log_softmax = max,
    sum of exp, the output (4), its backward = the gradient's sum, then gradient, output and result (4).
    GEMMs and attention are left out (the plan times them by their FLOPs), and with `loop_only` the
    experts' loop's own ops (stacking the experts' gradients, concatenating their outputs), which the
    grouped GEMM of CUDA runs do not have."""
    PASSES = {"logsumexp": 6, "_log_softmax": 4, "_log_softmax_backward_data": 4}

    def __init__(self, loop_only: bool = False):
        super().__init__()
        self.total = 0
        self.loop_only = loop_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        ret = func._schema.returns[0].alias_info if func._schema.returns else None
        size = lambda t: t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0  # noqa: E731
        if (ret is not None and not ret.is_write) or name.startswith(("empty", "_unsafe_view")) \
                or name.startswith(COMPUTE):
            return out  # a view, memory not yet written, or a GEMM
        if self.loop_only and (name == "stack" or (name == "cat" and len(args[0]) > 2)):
            return out
        if name in self.PASSES:
            self.total += self.PASSES[name] * size(args[0 if name != "_log_softmax_backward_data" else 1])
        elif name in ("gather", "scatter_add_", "scatter_add", "nll_loss_forward"):
            self.total += sum(size(a) for a in args[1:]) + (size(out) if name != "scatter_add_" else 0)
        elif name == "nll_loss_backward":  # a zero-filled gradient with one value per row
            self.total += size(out)
        elif name == "copy_":
            self.total += size(args[1]) + size(args[0])
        else:
            self.total += sum(size(a) for a in args if isinstance(a, torch.Tensor)) + size(out)
        return out


@pytest.mark.parametrize("kernel", ["chunked", "torch"])
def test_loss_traffic_is_what_the_loss_kernels_move(kernel):
    # the plan times the loss at LOSS_BYTES per logit (bf16 logits, as under autocast)
    from internlm.loss import PackedLMLoss
    from internlm.plan.estimate import LOSS_BYTES

    n, vocab = 96, 2048
    logits = torch.randn(1, n, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n))
    loss_fn = PackedLMLoss(1, kernel=kernel)
    with _Traffic() as t:
        loss_fn.token_losses(logits, labels).sum().backward()
    assert t.total / (n * vocab) == pytest.approx(LOSS_BYTES[kernel], rel=0.05)


def _fused_rms_norm(counter: _Traffic):
    """F.rms_norm as CUDA runs it (torch's fused kernel): forward reads x and writes y, backward reads the
    gradient and x and writes x's gradient; the CPU build decomposes it into a dozen elementwise ops."""
    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, eps):
            ctx.save_for_backward(x)
            ctx.eps = eps
            counter.total += 2 * x.numel() * x.element_size()
            with _disable_current_modes():
                return _ORIGINAL_RMS_NORM(x, (x.shape[-1],), eps=eps)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            counter.total += 3 * x.numel() * x.element_size()
            with _disable_current_modes(), torch.enable_grad():
                leaf = x.detach().requires_grad_()
                return torch.autograd.grad(_ORIGINAL_RMS_NORM(leaf, (x.shape[-1],), eps=ctx.eps), leaf, grad)[0], None

    return lambda x, shape, weight=None, eps=None: Fused.apply(x, eps)


def _block_traffic_per_token(monkeypatch, tokens=256, heads=4, **shape) -> float:
    """Bytes per token one bf16 block (FSDP's compute dtype) moves in forward and backward."""
    import internlm.model.ops as ops
    from internlm.model.attention import plan_attention
    from internlm.model.internlm import Kernels, ModelArgs, TransformerBlock
    from internlm.model.ops import rope_cos_sin

    torch.manual_seed(0)
    args = ModelArgs(num_layers=1, num_attention_heads=heads, head_dim=64, **shape)
    block = TransformerBlock(args, Kernels(attn_backend="sdpa")).to(torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, args.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)
    pos = torch.arange(tokens)[None]
    cos, sin = rope_cos_sin(pos, args.head_dim, args.rope_base, None, args.max_position_embeddings)
    plan = plan_attention(pos, "sdpa", False)
    counter = _Traffic(loop_only=True)
    monkeypatch.setattr(ops.F, "rms_norm", _fused_rms_norm(counter))
    with counter:
        block(x, cos, sin, plan).backward(grad)
    monkeypatch.setattr(ops.F, "rms_norm", _ORIGINAL_RMS_NORM)
    return counter.total / tokens


def _planned_block(h, q, kv, f):
    from internlm.plan.estimate import BLOCK_BYTES

    return BLOCK_BYTES["hidden"] * h + BLOCK_BYTES["q"] * q + BLOCK_BYTES["kv"] * kv + BLOCK_BYTES["ffn"] * f


@pytest.mark.parametrize("hidden,heads,kv_heads,ffn", [(256, 4, 4, 704), (256, 4, 2, 1408), (512, 4, 2, 512),
                                                       (512, 8, 2, 512), (384, 2, 1, 1024)])
def test_block_traffic_is_what_the_blocks_ops_move(monkeypatch, hidden, heads, kv_heads, ffn):
    counted = _block_traffic_per_token(monkeypatch, heads=heads, hidden_size=hidden, num_kv_attention_heads=kv_heads,
                                       intermediate_size=ffn)
    assert counted == pytest.approx(_planned_block(hidden, heads * 64, kv_heads * 64, ffn), rel=0.02)


@pytest.mark.parametrize("experts,top_k,ffn", [(4, 2, 256), (8, 1, 512), (8, 4, 128)])
def test_moe_block_traffic_adds_its_routing(monkeypatch, experts, top_k, ffn):
    from internlm.plan.estimate import MOE_BYTES

    h = 256
    counted = _block_traffic_per_token(monkeypatch, hidden_size=h, num_kv_attention_heads=4, intermediate_size=ffn,
                                       num_experts=experts, top_k=top_k, moe_type="Dropless",
                                       model_type="INTERNLM_MoE")
    planned = _planned_block(h, h, h, top_k * ffn) + (MOE_BYTES["layer"] + MOE_BYTES["routed"] * top_k) * h
    assert counted == pytest.approx(planned, rel=0.03)
