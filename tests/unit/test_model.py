"""The model pieces: RoPE, packed attention, GQA shapes, init determinism."""
import math

import pytest
import torch
import torch.nn.functional as F

from internlm.model.attention import cu_seqlens, packed_attention, resolve_backend
from internlm.model.internlm import InternLM, ModelArgs, init_full_tensor
from internlm.model.ops import apply_rope, dynamic_ntk_base, rope_cos_sin, swiglu_hidden_dim
from internlm.parallelize import init_parameters


def tiny(**kw):
    base = dict(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_attention_heads=2,
                multiple_of=16)
    base.update(kw)
    return ModelArgs(**base)


def build(args, seed=3):
    with torch.device("meta"):
        model = InternLM(args)
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


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_loop"])
def test_packed_attention_equals_each_sample_alone(backend):
    torch.manual_seed(0)
    lens = [5, 11, 1, 7]
    T = sum(lens)
    q, k, v = torch.randn(1, T, 4, 8), torch.randn(1, T, 2, 8), torch.randn(1, T, 2, 8)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    out = packed_attention(q, k, v, pos, backend)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        kk = k[:, sl].repeat_interleave(2, dim=2)
        vv = v[:, sl].repeat_interleave(2, dim=2)
        ref = F.scaled_dot_product_attention(q[:, sl].transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                             is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, sl], ref, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_loop"])
def test_packed_model_equals_separate_samples(backend):
    model = build(tiny(attn_backend=backend))
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
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa_loop"
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
