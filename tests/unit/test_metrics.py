import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from internlm.metrics import (
    MetricsWriter,
    device_peak_tflops,
    format_log_line,
    known_peak_tflops,
    measure_peak_tflops,
    megatron_tflops,
    mfu,
    model_flops_per_token,
    peak_memory_bytes,
    tgs,
)
from tests.helpers import read_metrics

# InternLM-7B as published in InternEvo's performance table
H, L, V, S = 4096, 32, 103168, 2048
MLP_RATIO = 8 / 3


def _internlm7b_tflops(tgs_value, checkpoint, world_size=8, step_time=2.0):
    global_tokens = tgs_value * world_size * step_time
    return megatron_tflops(
        step_time,
        checkpoint=checkpoint,
        seq_len=S,
        hidden_size=H,
        num_layers=L,
        vocab_size=V,
        global_batch_size=global_tokens / S,
        world_size=world_size,
        mlp_ratio=MLP_RATIO,
    )


def test_tgs():
    assert tgs(8 * 4096, 2.0, 4) == pytest.approx(4096.0)
    with pytest.raises(ValueError):
        tgs(1, 0.0, 1)


def test_megatron_tflops_matches_published_7b_figure():
    # 3314 TGS with activation checkpointing is reported by InternEvo as ~193 TFLOPS
    assert _internlm7b_tflops(3314, checkpoint=True) == pytest.approx(193, rel=0.01)
    # and the figure depends on tokens per device per second only
    assert _internlm7b_tflops(3314, checkpoint=True, world_size=64, step_time=5.0) == pytest.approx(
        _internlm7b_tflops(3314, checkpoint=True)
    )


def test_megatron_tflops_hand_formula_and_factor3():
    # per token: factor * ((8 + 4 * 4) h^2 + 4 s h) * L + 6 h V   (mlp_ratio 8/3 * 3/2 = 4 with SwiGLU)
    layers = ((8 + 16) * H**2 + 4 * S * H) * L
    head = 6 * H * V
    assert _internlm7b_tflops(1000, True) == pytest.approx(1000 * (4 * layers + head) / 1e12, rel=1e-12)
    assert _internlm7b_tflops(1000, False) == pytest.approx(1000 * (3 * layers + head) / 1e12, rel=1e-12)
    # checkpoint given as a fraction of layers counts as "on", as in InternEvo
    assert _internlm7b_tflops(1000, 0.5) == _internlm7b_tflops(1000, True)


def test_megatron_tflops_without_swiglu():
    value = megatron_tflops(
        1.0, checkpoint=False, seq_len=4, hidden_size=8, num_layers=2, vocab_size=16,
        global_batch_size=3, world_size=1, mlp_ratio=4, use_swiglu=False,
    )
    expected = 3 * ((8 + 16) * 3 * 4 * 64 + 4 * 3 * 16 * 8) * 2 + 6 * 3 * 4 * 8 * 16
    assert value == pytest.approx(expected / 1e12)


class _TinyGQALayer(nn.Module):
    def __init__(self, h, heads, kv_heads, head_dim, inter):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(h, heads * head_dim, bias=False)
        self.k = nn.Linear(h, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(h, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, h, bias=False)
        self.w1 = nn.Linear(h, inter, bias=False)
        self.w3 = nn.Linear(h, inter, bias=False)
        self.w2 = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        # explicit matmuls: the counter sees the full s x s scores, i.e. non-causal work
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        attn = scores.softmax(-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, -1))
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


def test_model_flops_per_token_matches_flop_counter():
    h, heads, kv_heads, head_dim, inter, layers, vocab, b, s = 32, 4, 2, 8, 48, 2, 40, 2, 16
    torch.manual_seed(0)
    blocks = nn.Sequential(*[_TinyGQALayer(h, heads, kv_heads, head_dim, inter) for _ in range(layers)])
    head = nn.Linear(h, vocab, bias=False)
    # the embedding output needs a gradient in a real model, so the first layer's input grad is computed
    x = torch.randn(b, s, h, requires_grad=True)
    labels = torch.randint(0, vocab, (b, s))
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(head(blocks(x)).flatten(0, 1), labels.flatten())
        loss.backward()
    counted = counter.get_total_flops() / (b * s)
    kwargs = dict(
        hidden_size=h, num_layers=layers, vocab_size=vocab, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=head_dim, intermediate_size=inter, seq_len=s,
    )
    full = model_flops_per_token(causal=False, **kwargs)
    assert full == pytest.approx(counted, rel=1e-9)  # only matmuls are counted: exact
    # causal counts only the lower triangle (with the diagonal) of the attention matmuls
    attention_full = layers * 3 * 4 * s * heads * head_dim
    causal = model_flops_per_token(causal=True, **kwargs)
    assert full - causal == pytest.approx(attention_full * (1 - (s + 1) / (2 * s)))


def test_model_flops_per_token_7b_close_to_6n():
    # InternLM-7B (MHA, 32 heads of 128, intermediate 11008): dense part is 6 * non-embedding params
    f = model_flops_per_token(
        hidden_size=H, num_layers=L, vocab_size=V, num_heads=32, num_kv_heads=32, head_dim=128,
        intermediate_size=11008, seq_len=S, causal=True,
    )
    n = L * (4 * H * H + 3 * H * 11008) + H * V
    assert f == pytest.approx(6 * n + 6 * L * (S + 1) * H)


def test_mfu():
    assert mfu(6e9, 1000.0, 12e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_measure_peak_tflops_quick():
    t0 = time.perf_counter()
    peak = measure_peak_tflops(torch.bfloat16, "cpu", size=256, seconds=0.1)
    assert peak > 0
    assert time.perf_counter() - t0 < 5


def test_device_peak_tflops_configured_and_table():
    assert device_peak_tflops("cpu", torch.bfloat16, configured=123.0) == 123.0
    assert known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("NVIDIA A800-SXM4-80GB", torch.float16) == 312.0
    assert known_peak_tflops("NVIDIA H200") == 989.0
    assert known_peak_tflops("NVIDIA H800") == 989.0
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert known_peak_tflops("Some Unknown Accelerator") is None


def test_peak_memory_bytes_cpu():
    # the test process holds torch, so its max RSS is well above 10 MiB
    assert peak_memory_bytes("cpu") > 10 * 2**20


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    records = [
        {"loss": 3.5, "lr": 1e-4, "grad_norm": 0.8, "tgs": 1234.5, "type_loss": {"en": 3.4, "code": 3.6}},
        {"loss": torch.tensor(3.25), "lr": 2e-4, "inf_nan_skip_batches": 0, "num_consumed_tokens": 4096},
        {"loss": float("nan"), "loss_scale": 65536.0, "note": "overflow"},
    ]
    with MetricsWriter(tmp_path / "run") as writer:
        for step, record in enumerate(records, start=1):
            writer.write(step, record)
        # each line is flushed as it is written (read_metrics reads only newline-terminated lines)
        back = read_metrics(tmp_path / "run")
        assert len(back) == 3
    assert back[0] == {"step": 1, **records[0]}
    assert back[1] == {"step": 2, "loss": 3.25, "lr": 2e-4, "inf_nan_skip_batches": 0, "num_consumed_tokens": 4096}
    assert back[2] == {"step": 3, "loss": None, "loss_scale": 65536.0, "note": "overflow"}
    tb_dir = tmp_path / "run" / "tensorboard"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb_dir))


def test_metrics_writer_appends_without_tensorboard(tmp_path):
    for step in (1, 2):
        writer = MetricsWriter(tmp_path, enable_tensorboard=False)
        writer.write(step, {"loss": 1.0})
        writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_format_log_line_order():
    line = format_log_line(
        12,
        {
            "extra": 7,
            "mfu": 0.123,
            "tflops": 1.234,
            "tgs": 1234.54,
            "grad_norm": 0.8312,
            "lr": 1e-4,
            "loss": 3.2101,
            "type_loss": {"en": 3.1},
            "valid_loss": None,
        },
    )
    assert line == (
        "step=12 loss=3.2101 lr=1.0e-04 grad_norm=0.831 tgs=1234.5 tflops=1.23 mfu=12.3% loss/en=3.1 extra=7"
    )
