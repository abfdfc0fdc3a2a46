"""tools/benchmark.py and internlm/cli/benchmark_sides.py: the tool's JSON, the HF comparison, and that the HF
baseline is the same model as ours (same parameter count; same weights give the same loss and
gradients on the same batch)."""
import json
import math
import re

import pytest
import torch

from internlm.cli.benchmark_sides import (
    build_hf_model,
    copy_initial_weights_to_hf,
    hf_loss,
    hf_micro_batches,
    hf_param_name,
)
from internlm.data.loader import build_train_loader
from internlm.data.packed import DummySource
from internlm.loss import PackedLMLoss, make_target
from internlm.model.internlm import InternLM, ModelArgs
from internlm.parallelize import init_parameters
from internlm.perf import resolve_cpu_matmul
from tests.helpers import ROOT, run_python

TINY = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_kv_attention_heads=2",
        "model.multiple_of=16", "model.vocab_size=512", "data.seq_len=64", "data.micro_bsz=2", "data.micro_num=2",
        "data.dummy_num_samples=200"]
KEYS = ("tgs", "tflops", "mfu", "peak_tflops", "peak_memory_bytes", "step_time_median", "params")
HF_KEYS = ("hf_tgs", "hf_peak_memory_bytes", "speedup_vs_hf")


def run_tool(tmp_path, *extra):
    out = tmp_path / "bench.json"
    proc = run_python([ROOT / "tools" / "benchmark.py", "--config", ROOT / "configs" / "demo.py", *TINY, "--steps", "2",
                       "--warmup", "1", "--peak-seconds", "0.1", "--json", out, *extra], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| config |" in proc.stdout  # the markdown table
    return json.loads(out.read_text()), proc.stdout


def _positive_finite(result, keys):
    for key in keys:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_tool_writes_json(tmp_path):
    result, stdout = run_tool(tmp_path)
    _positive_finite(result, KEYS)
    assert result["layout"].startswith("world=1 pp=1 dp=1")
    assert len(result["step_times"]) == 2
    assert result["step_time_min"] <= result["step_time_median"] <= result["step_time_max"]
    # the demo model trains in bf16: its GEMMs run in bf16, or as fp32 GEMMs where this CPU has no bf16
    # GEMM (model.cpu_matmul="auto"); MFU is taken against the peak of the GEMM that runs
    fp32_gemm = resolve_cpu_matmul("auto", torch.device("cpu"), torch.bfloat16)
    assert result["peak_tflops"] == result["peak_tflops_fp32" if fp32_gemm else "peak_tflops_bf16"]
    assert "attention=sdpa" in stdout and "optimizer=AdamW" in stdout
    assert not (tmp_path / "runs").exists()  # the run folder is temporary
    # the defaults of doc/train_performance.md, as the trainer reported them at start
    kernels = result["kernels"]
    assert kernels["adamw"] == "torch AdamW (fused)" and "chunked" in kernels["loss"]
    assert kernels["attention"].endswith("computed in fp32") and kernels["malloc"].startswith("glibc tuned")
    assert kernels["activation_checkpointing"] == "off" and kernels["compile"] == "off"
    linear = "fp32 GEMM on bf16/fp16-rounded operands" if fp32_gemm else "torch bfloat16 GEMM"
    assert kernels["linear"] == linear
    assert f"[bench] ours kernels: linear={linear}, attention=" in stdout
    # the time left, after each round of steps (1 warm-up + 2 measured)
    assert re.search(r"\[bench\] 1/3 steps per side done, eta \d", stdout), stdout[-2000:]
    assert "[bench] 3/3 steps per side done, eta 0s" in stdout


def test_tool_reports_each_switch(tmp_path):
    result, _ = run_tool(tmp_path, "adam.impl=foreach", "loss.kernel=torch", "model.attn_compute=input",
                         "model.checkpoint=True", "model.checkpoint_policy=selective", "model.cpu_matmul=fp32")
    kernels = result["kernels"]
    assert kernels["adamw"] == "torch AdamW (foreach)" and result["optimizer"] == "AdamW (foreach)"
    assert kernels["loss"] == "torch cross_entropy"
    assert "fp32" not in kernels["attention"]
    assert kernels["activation_checkpointing"] == "selective (True)"
    assert kernels["linear"] == "fp32 GEMM on bf16/fp16-rounded operands"
    assert result["peak_tflops"] == max(result["peak_tflops_bf16"], result["peak_tflops_fp32"])
    _positive_finite(result, KEYS)


def test_tool_compare_hf(tmp_path):
    result, stdout = run_tool(tmp_path, "--compare", "hf")
    _positive_finite(result, KEYS + HF_KEYS)
    assert result["hf_params"] == result["params"]
    assert len(result["hf_step_times"]) == 2
    assert "attention=sdpa" in stdout and "LlamaForCausalLM" in stdout
    # same model, same first batch, same initial weights: only the attention span differs (HF
    # attends across the packed documents of a row), so the first losses are close, not equal
    assert abs(result["loss_first"] - result["hf_loss_first"]) < 0.1


def tiny_args(model_type):
    kw = dict(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_attention_heads=2,
              multiple_of=16, model_type=model_type, rope_base=5000.0)
    if model_type == "INTERNLM":  # MHA with q/k/v and output biases
        kw.update(num_kv_attention_heads=4, qkv_bias=True, o_bias=True)
    if model_type == "INTERNLM3":  # head_dim independent of hidden / heads
        kw.update(head_dim=24, intermediate_size=80)
    if model_type == "LLAMA2":
        kw.update(tie_word_embeddings=True)
    return ModelArgs(**kw)


def one_sequence_batch(vocab_size, seq_len=32, micro_bsz=2, micro_num=2):
    """A real loader batch in which every packed row is one sequence (positions 0..seq_len-1), so
    that HF's one-sequence-per-row view and our packed view see exactly the same attention."""
    source = DummySource(vocab_size, 64, seed=5, max_len=2 * seq_len)
    loader = build_train_loader(source, packed_length=seq_len, micro_num=micro_num, micro_bsz=micro_bsz, dp_rank=0,
                                dp_size=1, seed=5, pack_sample_into_one=True)
    return next(iter(loader))


@pytest.mark.parametrize("model_type", ["INTERNLM2_PUBLIC", "INTERNLM", "INTERNLM3", "LLAMA2"])
def test_hf_model_is_the_same_model(model_type):
    torch.manual_seed(0)
    args = tiny_args(model_type)
    with torch.device("meta"):
        ours = InternLM(args)
    init_parameters(ours, torch.device("cpu"), seed=11)
    hf = build_hf_model(args)
    hf_type = type(hf.config).__name__
    assert hf_type == ("InternLM3Config" if model_type == "INTERNLM3" else "LlamaConfig")
    assert hf.config._attn_implementation == "sdpa"
    n_ours = sum(p.numel() for p in ours.parameters())
    assert sum(p.numel() for p in hf.parameters()) == n_ours == args.num_params()

    copy_initial_weights_to_hf(args, 11, hf)  # the tool's path: weights from the seed, not from `ours`
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(hf_params[hf_param_name(name)], p, rtol=0, atol=0)

    seq_len, micro_bsz = 32, 2
    batch = one_sequence_batch(args.vocab_size, seq_len, micro_bsz)
    target = make_target(batch["labels"], batch["type_ids"])
    loss_fn = PackedLMLoss(2)
    for i, (ids, labels) in enumerate(hf_micro_batches(batch, micro_bsz, seq_len)):
        ours.zero_grad()
        hf.zero_grad()
        loss = loss_fn(ours(batch["input_ids"][i:i + 1], position_ids=batch["position_ids"][i:i + 1]), target[i:i + 1])
        theirs = hf_loss(hf(input_ids=ids, use_cache=False).logits, labels)
        assert abs(loss.item() - theirs.item()) < 1e-4, (model_type, i, loss.item(), theirs.item())
        loss.backward()
        theirs.backward()
        for name, p in ours.named_parameters():
            torch.testing.assert_close(hf_params[hf_param_name(name)].grad, p.grad, rtol=1e-4, atol=1e-5)
