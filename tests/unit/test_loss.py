"""internlm/loss.py: the chunked fp32 cross entropy and its hand-written backward, and PackedLMLoss
(micro-batch mean over labelled tokens, per-type loss sums and token counts, label smoothing, the
fp16 loss scale) against float64 references computed here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internlm.loss import PackedLMLoss, chunked_cross_entropy, make_target

IGNORED = [3, 10, 36]  # rows of the 37-row examples whose label is ignored


def _logits_and_labels(dtype=torch.float32, rows=37, vocab=101, seed=0, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[IGNORED] = ignore_index
    return logits, labels, torch.randn(rows, generator=gen)


def _reference(logits, labels, smoothing=0.0, ignore_index=-100):
    """Per-token losses in float64 (from the same, possibly bf16-rounded, logit values)."""
    return F.cross_entropy(logits.double(), labels, ignore_index=ignore_index, reduction="none",
                           label_smoothing=smoothing)


# ---- chunked cross entropy ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elements", [101, 1000, 10**6])  # one row per block, several, all rows
def test_chunked_cross_entropy_matches_torch(dtype, smoothing, chunk_elements):
    logits, labels, weights = _logits_and_labels(dtype)
    ours = chunked_cross_entropy(logits, labels, label_smoothing=smoothing, chunk_elements=chunk_elements)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=smoothing)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert bool((ours[IGNORED] == 0).all())
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(g_ours, g_ref.to(dtype), **tol)
    assert bool((g_ours[IGNORED] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_chunked_cross_entropy_against_float64(dtype, smoothing):
    """Forward and backward against F.cross_entropy in float64 on the same logit values: the fp32
    computation (bf16 logits included: they are upcast, not computed in bf16) is accurate to fp32."""
    logits, labels, weights = _logits_and_labels(dtype, seed=1)
    ours = chunked_cross_entropy(logits, labels, label_smoothing=smoothing, chunk_elements=7 * 101)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    x64 = logits.detach().double().requires_grad_()
    ref = _reference(x64, labels, smoothing)
    (g_ref,) = torch.autograd.grad((ref * weights.double()).sum(), x64)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=2e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-5, atol=1e-7)
    else:  # the fp32 gradient rounded to the logits' dtype: within one bf16 ulp of the exact one
        torch.testing.assert_close(g_ours.double(), g_ref, rtol=2**-7, atol=0)


def test_chunked_backward_is_the_closed_form():
    """d loss_i / d x_ij = w_i (softmax_ij - (1 - eps) [j = y_i] - eps / V), 0 on ignored rows."""
    eps, vocab = 0.2, 101
    logits, labels, weights = _logits_and_labels()
    ours = chunked_cross_entropy(logits, labels, label_smoothing=eps, chunk_elements=1000)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    x = logits.detach().double()
    valid = labels != -100
    onehot = F.one_hot(torch.where(valid, labels, 0), vocab).double()
    want = (x.softmax(-1) - (1 - eps) * onehot - eps / vocab) * (weights.double() * valid)[:, None]
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)


def test_chunked_other_ignore_index():
    """Another ignore_index than -100: those rows get loss 0 and gradient 0, the others their loss."""
    logits, labels, weights = _logits_and_labels(ignore_index=-1)
    ours = chunked_cross_entropy(logits, labels, ignore_index=-1)
    (grad,) = torch.autograd.grad((ours * weights).sum(), logits)
    torch.testing.assert_close(ours.double(), _reference(logits, labels, ignore_index=-1), rtol=2e-6, atol=2e-6)
    assert bool((ours[IGNORED] == 0).all()) and bool((grad[IGNORED] == 0).all())
    assert bool((ours[[0, 1, 2]] > 0).all())


def test_chunked_all_tokens_ignored():
    logits, labels, _ = _logits_and_labels()
    labels[:] = -100
    ours = chunked_cross_entropy(logits, labels)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    assert ours.shape == (37,) and bool((ours == 0).all())
    assert bool((grad == 0).all())


# ---- make_target ---------------------------------------------------------------------------------


def test_make_target_stacks_labels_and_types_last():
    labels = torch.tensor([[5, -100, 7], [1, 2, 3]])
    types = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = make_target(labels, types)
    assert target.shape == (2, 3, 2) and target.dtype == labels.dtype
    assert torch.equal(target[..., 0], labels) and torch.equal(target[..., 1], types)
    # a micro-batch slice of the target is the target of the micro-batch slice (the pipeline splits dim 0)
    assert torch.equal(target[1:2], make_target(labels[1:2], types[1:2]))


# ---- PackedLMLoss --------------------------------------------------------------------------------

# One packed row of 8 tokens, vocabulary 5, three data types; type 1 has no labelled token (its
# only token is ignored), positions 2 and 5 are ignored.
VOCAB = 5
LABELS = torch.tensor([[1, 4, -100, 0, 2, -100, 3, 3]])
TYPES = torch.tensor([[0, 0, 2, 2, 0, 1, 2, 2]])


def _example_logits(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(1, 8, VOCAB, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_()


def _by_hand(logits, smoothing=0.0):
    """Per-token losses in float64 from the definition: lse - x_y, smoothed towards lse - mean(x)."""
    x = logits.detach().double()[0]
    lse = x.logsumexp(-1)
    losses = {}
    for i, (y, t) in enumerate(zip(LABELS[0].tolist(), TYPES[0].tolist())):
        if y != -100:
            losses[i] = (t, float((1 - smoothing) * (lse[i] - x[i, y]) + smoothing * (lse[i] - x[i].mean())))
    return losses


@pytest.mark.parametrize("kernel", ["chunked", "torch"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_packed_loss_and_per_type_statistics_by_hand(kernel, smoothing):
    logits = _example_logits()
    fn = PackedLMLoss(3, label_smoothing=smoothing, kernel=kernel)
    loss = fn(logits, make_target(LABELS, TYPES))
    tokens = _by_hand(logits, smoothing)
    assert sorted(tokens) == [0, 1, 3, 4, 6, 7]
    mean = sum(v for _, v in tokens.values()) / len(tokens)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(mean, rel=1e-6)
    (row,) = fn.records
    assert row.dtype == torch.float64 and row.shape == (2 + 2 * 3,)
    type_sum = [sum(v for t, v in tokens.values() if t == k) for k in range(3)]
    type_count = [sum(1 for t, _ in tokens.values() if t == k) for k in range(3)]
    assert type_count == [3, 0, 3]  # type 1 absent: its only token is ignored
    assert row[0].item() == pytest.approx(mean, rel=1e-6) and row[1].item() == 1.0
    assert row[2:5].tolist() == pytest.approx(type_sum, rel=1e-6)
    assert row[2 + 1].item() == 0.0  # the absent type: exactly nothing
    assert row[5:].tolist() == type_count
    # the micro-batch loss is the token mean: the per-type sums and counts add up to it
    assert (row[2:5].sum() / row[5:].sum()).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("kernel", ["chunked", "torch"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_packed_loss_matches_float64_cross_entropy_and_its_gradient(kernel, smoothing):
    """3-d logits [B, T, V] (two rows): the loss is F.cross_entropy's mean over labelled tokens and
    the gradient is autograd's through it, both in float64."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 30, 64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 64, (2, 30), generator=gen)
    labels[0, :5] = -100
    labels[1, 20:] = -100
    target = make_target(labels, torch.randint(0, 3, (2, 30), generator=gen))
    loss = PackedLMLoss(3, label_smoothing=smoothing, kernel=kernel)(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    x64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(x64.reshape(-1, 64), labels.reshape(-1), ignore_index=-100, label_smoothing=smoothing)
    (g_ref,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.double(), g_ref, rtol=1e-5, atol=1e-8)
    assert bool((grad[0, :5] == 0).all()) and bool((grad[1, 20:] == 0).all())


def test_packed_loss_kernels_agree():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 50, 64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 64, (1, 50), generator=gen)
    labels[0, :5] = -100
    target = make_target(labels, torch.randint(0, 3, (1, 50), generator=gen))
    losses, grads = {}, {}
    for kernel in ("chunked", "torch"):
        fn = PackedLMLoss(3, kernel=kernel)
        losses[kernel] = fn(logits, target)
        (grads[kernel],) = torch.autograd.grad(losses[kernel], logits)
        assert fn.uses_chunked(logits) == (kernel == "chunked")
    torch.testing.assert_close(losses["chunked"], losses["torch"])
    torch.testing.assert_close(grads["chunked"], grads["torch"])
    with pytest.raises(ValueError, match="loss kernel must be one of"):
        PackedLMLoss(1, kernel="flash")


def test_auto_kernel_is_chunked_for_plain_tensors_not_on_meta():
    fn = PackedLMLoss(1)
    assert fn.kernel == "auto" and fn.uses_chunked(torch.zeros(2, 3))
    assert not fn.uses_chunked(torch.zeros(2, 3, device="meta"))
    assert not PackedLMLoss(1, kernel="torch").uses_chunked(torch.zeros(2, 3))


@pytest.mark.parametrize("kernel", ["chunked", "torch"])
def test_bf16_logits_give_an_fp32_loss(kernel):
    logits = _example_logits(torch.bfloat16)
    loss = PackedLMLoss(3, kernel=kernel)(logits, make_target(LABELS, TYPES))
    tokens = _by_hand(logits)  # from the bf16 values
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sum(v for _, v in tokens.values()) / len(tokens), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.bfloat16


def test_records_sum_over_calls_and_reset():
    fn = PackedLMLoss(3)
    empty = fn.summed()
    assert empty.dtype == torch.float64 and empty.tolist() == [0.0] * 8
    logits = _example_logits()
    other_types = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1]])
    first = fn(logits, make_target(LABELS, TYPES))
    second = fn(logits, make_target(LABELS, other_types))
    a, b = fn.records
    total = fn.summed()
    torch.testing.assert_close(total, a + b, rtol=0, atol=0)
    assert total[1].item() == 2.0  # two micro-batches
    assert (total[0] / total[1]).item() == pytest.approx((first.item() + second.item()) / 2, rel=1e-6)
    assert b[2:5].tolist() == pytest.approx([0.0, b[2:5].sum().item(), 0.0])  # everything counted as type 1
    assert total[5:].tolist() == [3.0, 6.0, 3.0]
    # the last k records only (the pipeline's shape-inference calls come first)
    torch.testing.assert_close(fn.summed(last=1), b, rtol=0, atol=0)
    fn.reset()
    assert fn.records == [] and fn.summed().tolist() == [0.0] * 8


def test_all_tokens_ignored_is_a_zero_loss_with_zero_gradient():
    """A micro-batch with no labelled token: loss 0 (not NaN, as a mean over zero tokens would be),
    zero gradient, and a record that counts the micro-batch and no token."""
    logits = _example_logits()
    labels = torch.full_like(LABELS, -100)
    for kernel in ("chunked", "torch"):
        fn = PackedLMLoss(3, kernel=kernel)
        loss = fn(logits, make_target(labels, TYPES))
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and bool((grad == 0).all()), kernel
        assert fn.summed().tolist() == [0.0, 1.0] + [0.0] * 6, kernel


def test_zero_types_means_one():
    fn = PackedLMLoss(0)
    assert fn.num_types == 1 and fn.summed().shape == (4,)
    fn(_example_logits(), make_target(LABELS, torch.zeros_like(TYPES)))
    assert fn.summed()[3].item() == 6.0  # every labelled token in the one type


def test_loss_scale_scales_the_returned_loss_not_the_record():
    logits = _example_logits()
    target = make_target(LABELS, TYPES)
    plain = PackedLMLoss(3)
    ref = plain(logits, target)
    (g_ref,) = torch.autograd.grad(ref, logits)
    scaled = PackedLMLoss(3)
    scaled.scale = 1024.0
    loss = scaled(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.item() == ref.item() * 1024.0  # a power of two: exact
    torch.testing.assert_close(grad, g_ref * 1024.0, rtol=0, atol=0)
    torch.testing.assert_close(scaled.summed(), plain.summed(), rtol=0, atol=0)  # statistics unscaled


def test_meta_logits_return_a_loss_and_record_nothing():
    """The pipeline's shape inference runs the loss on the meta device: a loss of the right shape,
    no record (the step's statistics stay those of real micro-batches)."""
    fn = PackedLMLoss(3)
    logits = torch.empty(1, 8, VOCAB, device="meta", requires_grad=True)
    loss = fn(logits, make_target(LABELS, TYPES).to("meta"))
    assert loss.device.type == "meta" and loss.shape == ()
    assert fn.records == []
