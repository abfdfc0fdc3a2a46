"""The memory traffic the planner times for the loss (LOSS_BYTES in internlm/plan/estimate.py), counted
from the ops the trainer's loss kernels really run."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Traffic(TorchDispatchMode):
    """Bytes each aten op reads and writes (views and allocations move nothing). Ops that touch a few
    elements of a big tensor count those elements; ATen's composite reductions count their passes over
    the input: logsumexp = amax, subtract, exp, sum (6 input-sized reads and writes), log_softmax = max,
    sum of exp, the output (4), its backward = the gradient's sum, then gradient, output and result (4)."""
    PASSES = {"logsumexp": 6, "_log_softmax": 4, "_log_softmax_backward_data": 4}

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        ret = func._schema.returns[0].alias_info if func._schema.returns else None
        size = lambda t: t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0  # noqa: E731
        if (ret is not None and not ret.is_write) or name.startswith("empty"):
            return out  # a view, or memory not yet written
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
    # the plan times the loss at LOSS_BYTES per logit; counted here from the ops the trainer's loss runs,
    # forward and backward (bf16 logits, as under autocast)
    from internlm.loss import PackedLMLoss
    from internlm.plan.estimate import LOSS_BYTES

    n, vocab = 96, 2048
    logits = torch.randn(1, n, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, n))
    loss_fn = PackedLMLoss(1, kernel=kernel)
    with _Traffic() as t:
        loss_fn.token_losses(logits, labels).sum().backward()
    assert t.total / (n * vocab) == pytest.approx(LOSS_BYTES[kernel], rel=0.05)
