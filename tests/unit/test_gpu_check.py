"""tools/gpu_check.py: its plumbing on the CPU (tiny shapes), that its checks fail when they should,
and the torch varlen attention adapter (run against a stand-in kernel, since the real one is CUDA-only)."""
import gzip
import json
import math

import pytest
import torch

from internlm.cli import gpu_check
from internlm.model import attention
from tests.helpers import ROOT, run_python


def run_check(tmp_path, *args):
    out = tmp_path / "out"
    proc = run_python([ROOT / "tools" / "gpu_check.py", "--out", out, *args], cwd=tmp_path,
                      env={"OUT": None})  # the device machine's output folder is not ours
    return proc, out


def test_correctness_stages_on_cpu(tmp_path):
    proc, out = run_check(tmp_path, "--stages", "env,attention,moe,parity")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    st = res["stages"]
    assert res["cuda"] is False and res["tiny"] is True
    assert st["env"]["gemm_tflops_bf16"] > 0 and st["env"]["torch"] == torch.__version__
    backends = {(r["backend"], r["dtype"]) for r in st["attention"]["rows"]}
    assert {("sdpa", "bfloat16"), ("sdpa", "float32"), ("sdpa_loop", "float32"), ("sdpa_mask", "bfloat16")} <= backends
    for r in st["attention"]["rows"]:
        assert r["ok"] and r["max_err"] <= r["tol"], r
    assert st["attention"]["doc_mask_leak_error"] > 0.1  # ignoring document boundaries would be caught
    moe_rows = {(r["dtype"], r["kernel"]): r for r in st["moe"]["rows"]}
    assert moe_rows[("float32", "grouped_mm")]["max_err"] <= 1e-4  # F.grouped_mm takes fp32 on the CPU
    assert moe_rows[("float32", "grouped_mm")]["speedup_vs_loop"] > 0
    assert moe_rows[("bfloat16", "loop")]["ok"] and "skipped" in moe_rows[("bfloat16", "grouped_mm")]
    (row,) = st["parity"]["rows"]
    assert row["ok"] and len(row["loss_cpu"]) == 3 and row["max_rel_loss_diff"] <= 1e-3
    assert all(math.isfinite(x) for x in row["loss_device"])
    md = (out / "gpu_check.md").read_text()
    assert "| sdpa_loop | float32 | loop |" in md and "Stages: env ok, attention ok, moe ok, parity ok" in md
    assert "[parity] float32: max relative loss difference" in (out / "gpu_check.log").read_text()


def test_throughput_stage_on_cpu_with_hf_and_trace(tmp_path):
    proc, out = run_check(tmp_path, "--stages", "bench", "--bench-variants", "defaults")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((out / "gpu_check.json").read_text())["stages"]["bench"]["rows"]
    assert row["ok"] and row["name"] == "defaults"
    assert row["tgs"] > 0 and row["hf_tgs"] > 0 and 0 < row["mfu"] < 1
    assert row["speedup_vs_hf"] == pytest.approx(row["tgs"] / row["hf_tgs"])
    assert row["kernels"]["attention"].startswith("torch SDPA")
    trace = json.loads(gzip.open(out / "trace_defaults.json.gz").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "aten::mm" in names or "aten::addmm" in names  # a real profile of a training step
    md = (out / "gpu_check.md").read_text()
    assert "| defaults | 128 |" in md and "Top ops of one profiled step" in md


def test_unknown_stage_is_refused(tmp_path):
    proc, _ = run_check(tmp_path, "--stages", "env,atention")
    assert proc.returncode == 2 and "unknown stage(s) ['atention']" in proc.stderr


def test_attention_check_fails_a_backend_that_ignores_documents(monkeypatch):
    real = attention.packed_attention

    def leaky(q, k, v, plan, scale=None):  # one causal call over the whole row: documents see each other
        whole = attention.plan_attention(torch.arange(q.shape[1], device=q.device)[None], "sdpa")
        return real(q, k, v, whole, scale)

    monkeypatch.setattr(attention, "packed_attention", leaky)
    res = gpu_check.check_attention(torch.device("cpu"), tiny=True)
    assert not res["ok"]
    assert all(not r["ok"] and r["max_err"] > 0.1 for r in res["rows"])


def test_parity_comparison_flags_diverging_runs():
    ref = [8.0, 7.5, 7.0]
    good = gpu_check.compare_runs(ref, [1.0] * 3, [8.0, 7.5001, 7.0], [1.0] * 3, steps=3, tol=1e-3)
    assert good["ok"] and good["max_rel_loss_diff"] == pytest.approx(0.0001 / 7.5)
    assert not gpu_check.compare_runs(ref, [1.0] * 3, [8.0, 7.6, 7.0], [1.0] * 3, steps=3, tol=1e-3)["ok"]
    assert not gpu_check.compare_runs(ref, [1.0] * 3, [8.0, float("nan"), 7.0], [1.0] * 3, steps=3, tol=1e-3)["ok"]
    with pytest.raises(RuntimeError, match="expected 3 logged steps, got 3 \\(cpu\\) and 2"):
        gpu_check.compare_runs(ref, [1.0] * 3, [8.0, 7.5], [1.0] * 2, steps=3, tol=1e-3)


# ---- the torch varlen backend ----------------------------------------------------------------------

def _stand_in_varlen(new_api: bool):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn with the torch 2.10 (`is_causal`) or the
    2.13 (`window_size`, `enable_gqa`) signature, computing per-sample attention with SDPA."""
    def compute(q, k, v, cu, causal, gqa):
        if k.shape[1] != q.shape[1]:
            assert gqa, "KV heads reached the kernel without enable_gqa"
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        assert causal
        outs = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qi, ki, vi = (t[s:e].transpose(0, 1) for t in (q, k, v))
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(0, 1))
        return torch.cat(outs)

    if new_api:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return compute(query, key, value, cu_seq_q, tuple(window_size) == (-1, 0), enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return compute(query, key, value, cu_seq_q, is_causal, False)
    return varlen_attn


@pytest.mark.parametrize("new_api", [True, False])
def test_varlen_backend_calls_the_kernel_right_across_torch_versions(monkeypatch, new_api):
    monkeypatch.setattr(attention, "_torch_varlen_attn", _stand_in_varlen(new_api))
    lens = [5, 9, 2]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    q, k, v = (torch.randn(1, sum(lens), h, 8, dtype=torch.bfloat16) for h in (4, 2, 2))
    plan = attention.plan_attention(pos, "varlen")
    assert plan.kind == "varlen" and plan.cu_seqlens.tolist() == [0, 5, 14, 16] and plan.max_len == 9
    out = attention.packed_attention(q, k, v, plan)
    ref = attention.packed_attention(q, k, v, attention.plan_attention(pos, "sdpa_loop"))
    torch.testing.assert_close(out, ref, atol=3e-3, rtol=2e-2)  # bf16 rounding; a wrong mask is O(1)
    with pytest.raises(RuntimeError, match="computes in bf16/fp16, got torch.float32"):
        attention.packed_attention(q.float(), k.float(), v.float(), plan)


def test_varlen_backend_selection():
    cpu = torch.device("cpu")
    assert attention.resolve_backend("auto", cpu, dtype=torch.bfloat16) == "sdpa"
    with pytest.raises(RuntimeError, match="needs torch.nn.attention.varlen .* and a CUDA device"):
        attention.resolve_backend("varlen", cpu)
