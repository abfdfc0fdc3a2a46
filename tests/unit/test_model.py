"""The model pieces: RoPE, packed attention, GQA shapes, init determinism."""
import math

import pytest
import torch
import torch.nn.functional as F

from internlm.model import attention
from internlm.model.attention import cu_seqlens, packed_attention, plan_attention, resolve_backend
from internlm.model.internlm import InternLM, Kernels, init_full_tensor
from internlm.model.ops import apply_rope, dynamic_ntk_base, rope_cos_sin
from internlm.model.shape import swiglu_hidden_dim
from internlm.parallelize import init_parameters
from tests.helpers import tiny_model_args


def tiny(**kw):
    """The tiny model with 2 layers and an odd vocabulary (97: no size coincides with another)."""
    return tiny_model_args(**{"vocab_size": 97, "num_layers": 2, "multiple_of": 16, **kw})


def build(args, kernels=None, seed=3):
    with torch.device("meta"):
        model = InternLM(args, kernels)
    init_parameters(model, torch.device("cpu"), seed)
    return model


def test_rope_is_a_rotation_and_relative():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 2, 16)
    k = torch.randn(1, 6, 2, 16)
    pos = torch.arange(6)[None]
    cos, sin = rope_cos_sin(pos, 16, 10000.0, None, 2048)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # norms are preserved
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # the score depends only on the relative offset: shift every position by 5
    cos2, sin2 = rope_cos_sin(pos + 5, 16, 10000.0, None, 2048)
    rq2, rk2 = apply_rope(q, cos2, sin2), apply_rope(k, cos2, sin2)
    torch.testing.assert_close(torch.einsum("bihd,bjhd->bhij", rq, rk), torch.einsum("bihd,bjhd->bhij", rq2, rk2),
                               atol=1e-4, rtol=1e-4)
    # position 0 is the identity
    torch.testing.assert_close(rq[:, 0], q[:, 0])


def test_rope_matches_complex_formulation():
    q = torch.randn(1, 5, 1, 8)
    pos = torch.arange(5)[None]
    cos, sin = rope_cos_sin(pos, 8, 500.0, None, 2048)
    out = apply_rope(q, cos, sin)
    inv = 1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8))
    angles = torch.arange(5).float()[:, None] * inv
    # half-rotation layout: pair (i, i + d/2)
    z = torch.complex(q[0, :, 0, :4], q[0, :, 0, 4:]) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(out[0, :, 0], torch.cat([z.real, z.imag], -1), atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_only_beyond_trained_length():
    assert dynamic_ntk_base(10000.0, 64, 2.0, 1000, 2048) == 10000.0
    grown = dynamic_ntk_base(10000.0, 64, 2.0, 4096, 2048)
    assert grown == pytest.approx(10000.0 * (2.0 * 4096 / 2048 - 1) ** (64 / 62))


def test_swiglu_width_as_internevo():
    assert swiglu_hidden_dim(4096, 8 / 3, 256) == 11008  # InternLM-7B / Llama-7B FFN width


def _each_sample_alone(q, k, v, lens):
    outs, start = [], 0
    rep = q.shape[2] // k.shape[2]
    for n in lens:
        sl = slice(start, start + n)
        kk = k[:, sl].repeat_interleave(rep, dim=2)
        vv = v[:, sl].repeat_interleave(rep, dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, sl].transpose(1, 2), kk.transpose(1, 2),
                                                   vv.transpose(1, 2), is_causal=True).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


# (sample lengths, backend, small-window limit, the plan the backend must choose)
ATTENTION_LAYOUTS = [
    ([5, 11, 1, 7], "sdpa", 512, "mask"),  # one window of 24 tokens, four samples
    ([6, 6, 6, 6], "sdpa", 512, "rows"),  # four windows of one sample each: plain causal rows
    ([5, 7, 12, 3, 9], "sdpa", 512, "mask"),  # windows of 12 tokens (rows of a micro_bsz=3 batch)
    ([5, 11, 1, 7, 70, 2], "sdpa", 16, "buckets"),  # a window above the limit: padded length groups
    ([5, 11, 1, 7], "sdpa_mask", 512, "mask"),
    ([6, 6, 6, 6], "sdpa_mask", 512, "mask"),
    ([5, 11, 1, 7], "sdpa_loop", 512, "loop"),
]


@pytest.mark.parametrize("lens,backend,limit,kind", ATTENTION_LAYOUTS)
def test_packed_attention_equals_each_sample_alone(lens, backend, limit, kind, monkeypatch):
    monkeypatch.setattr(attention, "MASK_WINDOW_MAX", limit)
    monkeypatch.setattr(attention, "BUCKET", 8)
    torch.manual_seed(0)
    T = sum(lens)
    q, k, v = (torch.randn(1, T, h, 8, requires_grad=True) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    plan = plan_attention(pos, backend)
    assert plan.kind == kind
    out = packed_attention(q, k, v, plan)
    grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out).sin()).sum(), (q, k, v))
    ref = _each_sample_alone(q, k, v, lens)
    ref_grads = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref).sin()).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_attention_windows_follow_sample_starts():
    starts = lambda lens: torch.cat([torch.arange(n) for n in lens]) == 0  # noqa: E731
    assert attention._window(starts([4, 4, 4, 4])) == 4
    assert attention._window(starts([2, 2, 4, 3, 1, 4])) == 4
    assert attention._window(starts([3, 5, 8])) == 8  # 16 tokens: 8 is the shortest window that fits
    assert attention._window(starts([3, 13])) == 16


def test_batched_rows_each_start_a_sample():
    """In a [B, T] batch every row starts a sample, even when its first position is not 0."""
    pos = torch.tensor([[0, 1, 2, 3], [4, 5, 0, 1]])
    assert plan_attention(pos, "sdpa_loop").lengths == (4, 2, 2)
    cu, max_len = cu_seqlens(pos)
    assert cu.tolist() == [0, 4, 6, 8] and max_len == 4


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_mask", "sdpa_loop"])
def test_packed_model_equals_separate_samples(backend):
    model = build(tiny(), Kernels(attn_backend=backend))
    x = torch.randint(0, 97, (1, 21))
    pos = torch.cat([torch.arange(8), torch.arange(13)])[None]
    packed = model(x, position_ids=pos)
    a, b = model(x[:, :8]), model(x[:, 8:])
    torch.testing.assert_close(packed, torch.cat([a, b], 1), atol=1e-5, rtol=1e-5)


def test_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu, max_len = cu_seqlens(pos)
    assert cu.tolist() == [0, 3, 5, 9] and max_len == 4


def test_backend_selection_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("sdpa", torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="flash-attn"):
        resolve_backend("flash", torch.device("cpu"))


@pytest.mark.parametrize("model_type,kw,bias", [
    ("INTERNLM", dict(num_kv_attention_heads=4, qkv_bias=True, o_bias=True), True),
    ("INTERNLM2_PUBLIC", dict(), False),
    ("INTERNLM3", dict(head_dim=32), False),
])
def test_shapes_per_model_type(model_type, kw, bias):
    args = tiny(model_type=model_type, **kw)
    model = build(args)
    att = model.layers["0"].attention
    hd = args.head_dim
    assert att.wq.weight.shape == (4 * hd, 64)
    assert att.wk.weight.shape == (args.num_kv_attention_heads * hd, 64)
    assert att.wo.weight.shape == (64, 4 * hd)
    assert (att.wq.bias is not None) == bias and (att.wo.bias is not None) == bias
    n = sum(p.numel() for p in model.parameters())
    assert n == args.num_params()
    out = model(torch.randint(0, 97, (2, 9)))
    assert out.shape == (2, 9, 97)


def test_tied_embeddings_share_storage():
    model = build(tiny(tie_word_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight


def test_norm_head_uses_normalised_rows():
    """model.norm_head: logits against the unit-norm rows of the output matrix, so scaling a row
    leaves them unchanged; the gradient reaches the raw parameter (same name and shape)."""
    plain, normed = build(tiny()), build(tiny(norm_head=True))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in normed.named_parameters()]
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    hidden = normed.norm(plain_hidden(normed, ids))
    expected = hidden @ F.normalize(normed.output.weight, dim=-1).T
    logits = normed(ids)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not torch.allclose(logits, hidden @ normed.output.weight.T, atol=1e-3)
    with torch.no_grad():
        normed.output.weight[5].mul_(7.0)
    assert torch.allclose(normed(ids), logits, atol=1e-5)
    normed(ids).sum().backward()
    assert normed.output.weight.grad is not None and normed.output.weight.grad.abs().sum() > 0


def plain_hidden(model, ids):
    """The last block's output (before the final norm and the head)."""
    h = model.tok_embeddings(ids)
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    cos, sin = rope_cos_sin(pos, model.args.head_dim, model.args.rope_base, model.args.rope_scaling,
                            model.args.max_position_embeddings)
    plan = plan_attention(pos, model.kernels.attn_backend, model.kernels.attn_upcast)
    for block in model.layers.values():
        h = block(h, cos, sin, plan)
    return h


def test_init_is_deterministic_and_name_dependent():
    a, b, c = build(tiny(), seed=5), build(tiny(), seed=5), build(tiny(), seed=6)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name and not name.endswith("bias"):
            assert not torch.equal(pa, pc), name
    wq0 = a.layers["0"].attention.wq.weight
    wq1 = a.layers["1"].attention.wq.weight
    assert not torch.equal(wq0, wq1)
    # scaled init on residual outputs
    args = tiny()
    w2 = init_full_tensor("layers.0.feed_forward.w2.weight", (64, 1000), args, 0)
    assert w2.std().item() == pytest.approx(args.init_std / math.sqrt(2 * args.num_layers), rel=0.1)
    # wrapper prefixes do not change the value
    assert torch.equal(init_full_tensor("layers.0._checkpoint_wrapped_module.attention.wq.weight", (4, 4), args, 0),
                       init_full_tensor("layers.0.attention.wq.weight", (4, 4), args, 0))


def test_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (2, 16))
    first = None
    for _ in range(30):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 97), x[:, 1:].reshape(-1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5
