"""The MoE layer (internlm/model/moe.py) and its export to transformers' Mixtral."""
import math

import pytest
import torch

from internlm.errors import ConversionError
from internlm.hf.export import export_model_to_hf
from internlm.model.internlm import InternLM, ModelArgs, init_full_tensor
from internlm.model.moe import moe_aux_loss, moe_layers, route


def _moe_args(**kw):
    base = dict(vocab_size=96, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_attention_heads=2,
                intermediate_size=48, num_experts=4, top_k=2, moe_type="Dropless", model_type="INTERNLM_MoE")
    base.update(kw)
    return ModelArgs(**base)


def _model(args, seed=3):
    model = InternLM(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_full_tensor(name, p.shape, args, seed) * (10 if "gate" in name else 1))
    return model


def test_route_weights_capacity_order_and_aux_loss():
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    probs = logits.softmax(-1)
    weights, experts, kept, aux, load = route(logits, 2, capacity=None)
    top = probs.topk(2, dim=-1)
    assert torch.equal(experts, top.indices) and kept.all()
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))
    assert int(load.sum()) == 20
    first = torch.bincount(top.indices[:, 0], minlength=4).float() / 10
    torch.testing.assert_close(aux, 4 * (probs.mean(0) * first).sum())
    # top-1 keeps the probability itself (Switch/GShard top-1)
    w1, e1, *_ = route(logits, 1, capacity=None)
    torch.testing.assert_close(w1[:, 0], probs.max(-1).values)
    # every token prefers expert 0, second choice expert 1: capacity 3 keeps the first three tokens'
    # first choices; expert 1's queue holds the second choices in token order
    skewed = torch.tensor([[4.0, 2.0, 0.0, 0.0]]).repeat(5, 1)
    w, e, kept, aux, load = route(skewed, 2, capacity=3)
    assert kept[:, 0].tolist() == [True, True, True, False, False]
    assert kept[:, 1].tolist() == [True, True, True, False, False]
    assert (w[~kept] == 0).all() and load.tolist() == [5, 5, 0, 0]
    # a perfectly balanced router has aux loss 1
    balanced = torch.zeros(8, 4)
    assert math.isclose(route(balanced, 1, None)[3].item(), 1.0, rel_tol=1e-6)


def test_dropped_tokens_pass_through_unchanged_and_layer_reports_them():
    args = _moe_args(moe_type="GShard", capacity_factor=0.25, min_capacity=0)
    model = _model(args)
    layer = model.layers["0"].feed_forward
    x = torch.randn(1, 16, 32)
    out = layer(x)
    assert layer.stats["dropped"] > 0 and int(layer.stats["load"].sum()) == 32
    cap = layer.capacity(16)  # ceil(2 * 16 / 4 * 0.25) = 2 per expert
    assert cap == 2
    zero_rows = (out[0].abs().sum(-1) == 0).sum().item()
    assert zero_rows >= 16 - 4 * cap // 1  # at most 4 experts x 2 slots reach the tokens
    dense = _model(_moe_args(moe_type="Dropless"))
    ref = dense.layers["0"].feed_forward(x)
    assert not torch.allclose(ref, out)


def test_aux_loss_reaches_the_router_and_sums_over_layers():
    model = _model(_moe_args())
    model(torch.randint(0, 96, (1, 24)))
    aux = moe_aux_loss(model)
    assert torch.isclose(aux, sum(m.aux_loss for _, m in moe_layers(model)))
    aux.backward()
    assert all(m.gate.weight.grad.abs().sum() > 0 for _, m in moe_layers(model))
    assert model.layers["1"].feed_forward.experts.w1.grad is None  # no aux loss lies after the last experts


def test_export_to_mixtral_gives_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    args = _moe_args(num_layers=3, num_experts=8, top_k=2)
    model = _model(args).eval()
    report = export_model_to_hf(model, tmp_path / "hf", dtype=torch.float32, progress=False)
    assert report.target == "mixtral" and report.notes == []
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
    # GShard with room for every token in evaluation is the same model: exported with a note
    gshard = _model(_moe_args(moe_type="GShard", eval_capacity_factor=4.0)).eval()
    note = export_model_to_hf(gshard, tmp_path / "g", dtype=torch.float32, progress=False).notes
    assert note and "drops tokens" in note[0]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gshard(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=1), "top_k=1"),
    (dict(moe_use_residual=True), "residual MoE"),
    (dict(qkv_bias=True, o_bias=True), "model.no_bias=True"),
])
def test_export_refuses_what_mixtral_cannot_hold(kw, message, tmp_path):
    model = _model(_moe_args(**kw))
    with pytest.raises(ConversionError, match=message):
        export_model_to_hf(model, tmp_path / "hf", dtype=torch.float32, progress=False)
    assert not list((tmp_path / "hf").glob("*.safetensors"))


def _validate(world, *overrides):
    import tempfile
    from pathlib import Path

    from internlm.config import load_config, validate
    from tests.helpers import write_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(write_config(Path(tmp)), list(overrides))
    validate(cfg, world_size=world)
    return cfg


MOE_KEYS = ("model_type=INTERNLM_MoE", "model.num_experts=4")


@pytest.mark.parametrize("world, overrides, message", [
    (1, ("model_type=INTERNLM_MoE",), "needs model.num_experts >= 1"),
    (1, ("model.num_experts=4",), "needs model_type='INTERNLM_MoE'"),
    (1, (*MOE_KEYS, "moe.top_k=5"), "moe.top_k=5 is larger than model.num_experts=4"),
    (4, (*MOE_KEYS, "parallel.tensor.size=2", "parallel.tensor.mode='isp'", "parallel.expert.size=2"),
     "parallel.expert.size=2 (expert parallelism over 2 ranks) with parallel.tensor.mode='isp'"),
    (6, (*MOE_KEYS, "parallel.expert.size=4"), "does not divide the data-parallel size 6"),
    (6, (*MOE_KEYS, "parallel.expert.size=3"), "model.num_experts=4 is not divisible by the expert-parallel size 3"),
    (1, (*MOE_KEYS, "moe.noisy_gate_policy='Jitter'"), "routing has no noise here"),
    (1, (*MOE_KEYS, "parallel.expert_weight.size=2"), "parallel.expert_weight.size"),
    (8, (*MOE_KEYS, "parallel.expert.size=2", "parallel.expert_zero1.size=2"),
     "parallel.expert_zero1.size=2: expert-parallel experts are sharded over all of their 4 replica(s)"),
])
def test_moe_config_errors_name_the_key(world, overrides, message):
    from internlm.config.checks import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _validate(world, *overrides)


@pytest.mark.parametrize("size, world, ep", [(-1, 8, 4), (0, 2, 2), (2, 8, 2), (1, 8, 1)])
def test_expert_size_resolves_as_internevo(size, world, ep):
    from internlm.parallel_dims import ParallelDims

    cfg = _validate(world, *MOE_KEYS, f"parallel.expert.size={size}")
    dims = ParallelDims.from_config(cfg, world)
    assert dims.ep == ep  # -1/0: the data-parallel size, capped at the 4 experts
    assert (f"ep={ep}" in dims.describe()) == (ep > 1)


@pytest.mark.parametrize("world, zero, shard, line", [
    (8, -1, True, "ep=2 (experts sharded over edp=4)"), (8, 4, True, "ep=2 (experts sharded over edp=4)"),
    (8, 1, False, "ep=2 (experts whole on edp=4)"), (2, -1, False, "ep=2"), (2, 1, False, "ep=2")])
def test_expert_zero1_shards_experts_over_their_replicas(world, zero, shard, line):
    """InternEvo's expert ZeRO group: -1 (or edp) shards expert-parallel experts over their replicas."""
    from internlm.parallel_dims import ParallelDims

    dims = ParallelDims.from_config(_validate(world, *MOE_KEYS, "parallel.expert.size=2",
                                              f"parallel.expert_zero1.size={zero}"), world)
    assert dims.expert_shard == shard
    assert dims.describe().endswith(line)


def test_expert_mesh_of_a_pipeline_stage():
    """ep x pp: each stage's data-parallel ranks form its own (edp, ep) groups."""
    from internlm.parallel_dims import ParallelDims

    cfg = _validate(8, *MOE_KEYS, "parallel.expert.size=2", "parallel.pipeline.size=2", "model.num_layers=4")
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.pp, dims.dp, dims.ep) == (2, 4, 2)


def test_grouped_gemm_experts_equal_the_loop(monkeypatch):
    """expert_ffn: F.grouped_mm (fp32 on CPU) gives the per-expert loop's outputs and gradients, with an
    expert that gets no token; the kernels line names the path."""
    import torch.nn.functional as F

    from internlm.model import moe

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    g = torch.Generator().manual_seed(0)
    counts = [5, 0, 9, 2]
    x = torch.randn(sum(counts), 16, generator=g)
    w1, w3 = (torch.randn(4, 24, 16, generator=g) * 0.2 for _ in range(2))
    w2 = torch.randn(4, 16, 24, generator=g) * 0.2
    grad = torch.randn(sum(counts), 16, generator=g)
    results = {}
    for grouped in (True, False):
        monkeypatch.setattr(moe, "USE_GROUPED_MM", grouped)
        assert moe._grouped_mm_runs(x, w1) == grouped
        leaves = [t.clone().requires_grad_() for t in (x, w1, w3, w2)]
        out = moe.expert_ffn(leaves[0], counts, *leaves[1:])
        out.backward(grad)
        results[grouped] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(results[True], results[False]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert results[True][2][1].abs().sum() == 0  # the idle expert gets no gradient
    monkeypatch.setattr(moe, "USE_GROUPED_MM", True)
    assert moe.grouped_mm_in_use(torch.device("cpu"), torch.float32)
    assert not moe.grouped_mm_in_use(torch.device("cpu"), torch.bfloat16)  # CPU bf16: the loop (autocast)
    assert not moe._grouped_mm_runs(torch.randn(3, 6), torch.randn(2, 5, 6))  # rows not 16-byte multiples


def test_a_rank_whose_tokens_are_all_dropped_still_gives_expert_gradients():
    """Every assignment dropped (a rank's share of a micro-batch under isp or dp): the output is zero and
    the expert weights get zero gradients, not none, so that FSDP reduces the same gradients on every
    rank (a missing one desynchronised the ranks' reductions and hung the run)."""
    from internlm.model.moe import combine_experts

    x = torch.randn(6, 16, requires_grad=True)
    w1, w3 = (torch.randn(4, 24, 16, requires_grad=True) for _ in range(2))
    w2 = torch.randn(4, 16, 24, requires_grad=True)
    weights = torch.rand(6, 2)
    chosen = torch.full((6, 2), -1)
    out = combine_experts(x, weights, chosen, w1, w3, w2)
    assert out.shape == x.shape and out.abs().sum() == 0
    out.sum().backward()
    for w in (w1, w3, w2):
        assert w.grad is not None and w.grad.abs().sum() == 0


def test_bf16_experts_as_fp32_gemms_on_cpu_match_the_bf16_loop(monkeypatch):
    """model.cpu_matmul's fp32 path for the experts (AVX2 CPUs have no bf16 GEMM): operands rounded to
    bf16, fp32 grouped GEMMs, output rounded to bf16; outputs and gradients within bf16 rounding of the
    plain bf16 computation, and the same dtypes."""
    import torch.nn.functional as F

    from internlm.model import moe

    if not hasattr(F, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    g = torch.Generator().manual_seed(0)
    counts = [6, 0, 10, 4]
    x = (torch.randn(sum(counts), 16, generator=g)).bfloat16()
    w1, w3 = ((torch.randn(4, 24, 16, generator=g) * 0.3).bfloat16() for _ in range(2))
    w2 = (torch.randn(4, 16, 24, generator=g) * 0.3).bfloat16()
    grad = torch.randn(sum(counts), 16, generator=g).bfloat16()
    results, seen = {}, []
    inner = moe._expert_ffn
    monkeypatch.setattr(moe, "_expert_ffn", lambda x, *a: seen.append(x.dtype) or inner(x, *a))
    for fp32 in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w3, w2)]
        out = moe.expert_ffn(leaves[0], counts, *leaves[1:], fp32_gemm=fp32)
        out.backward(grad)
        results[fp32] = [out.detach()] + [t.grad for t in leaves]
    for a, b in zip(results[True], results[False]):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2), (a.float() - b.float()).abs().max()
    assert seen == [torch.float32, torch.bfloat16]  # the fp32 GEMMs, then the plain bf16 loop
