"""Small numerical building blocks of the InternLM transformer: RMSNorm and rotary embeddings.

Plain PyTorch; nothing here knows about distribution. Under tensor parallelism the same code runs
on local shards (heads are inferred from the tensor shape, never stored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional GPU fast path: NVIDIA apex's fused RMSNorm (fp32 math, output in the input's dtype)
    from apex.normalization.fused_layer_norm import mixed_dtype_fused_rms_norm_affine as _apex_rms_norm  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _apex_rms_norm = None
APEX_DEVICES = ("cuda",)


def rms_norm_impl(device: torch.device) -> str:
    """Which kernel RMSNorm uses on `device`: "apex" (fused CUDA kernel) or "torch" (F.rms_norm)."""
    return "apex" if _apex_rms_norm is not None and device.type in APEX_DEVICES else "torch"


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as InternEvo and HF Llama do."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            # hand the following matmuls their compute dtype once, instead of one cast per projection
            dtype = torch.get_autocast_dtype(x.device.type)
        # apex takes plain tensors only (not the DTensors of sequence parallelism)
        if (_apex_rms_norm is not None and x.device.type in APEX_DEVICES and type(x) is torch.Tensor
                and type(self.weight) in (torch.Tensor, nn.Parameter)):
            return _apex_rms_norm(x, self.weight, (x.shape[-1],), self.eps).to(dtype)
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight.to(dtype) * out.to(dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class _LowpLinearViaFp32(torch.autograd.Function):
    """y = x @ w.T (+ b) at `dtype` (bf16/fp16) precision, run as fp32 GEMMs on operands rounded to
    `dtype`. Products of bf16 or fp16 values are exact in fp32 and a low-precision GEMM accumulates
    in fp32 too, so this computes what the `dtype` GEMM computes (up to summation order); the output
    and all gradients are rounded to `dtype` as autocast's would be. Saves the rounded operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xb, wb = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        out = F.linear(xb.float(), wb.float(), bias.to(dtype).float() if bias is not None else None)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.to(xb.dtype).float()
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_w = grad_b = None
        # backward runs under the caller's autocast (loss.backward() inside the autocast region):
        # without this, autocast would turn these fp32 GEMMs back into bf16 ones
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                grad_x = (g @ wb.float()).to(xb.dtype).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = (g2.t() @ xb.reshape(-1, xb.shape[-1]).float()).to(xb.dtype).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0).to(xb.dtype).to(b_dtype)
        return grad_x, grad_w, grad_b, None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names, same TP plans) that can run its bf16/fp16 matmul as an
    fp32 GEMM on CPU (`fp32_gemm`, set from `model.cpu_matmul`), at the same precision, for CPUs whose
    low-precision GEMM is slower than their fp32 one. `auto` turns it on only where oneDNN has no bf16
    GEMM at all (AVX2-only CPUs, ~30x slower); on AVX512-BF16 without AMX it made single matmuls up to
    1.5x faster but whole steps no faster and used more memory; see doc/train_performance.md."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fp32_gemm: bool = False, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.fp32_gemm = fp32_gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fp32_gemm and x.device.type == "cpu" and type(x) is torch.Tensor \
                and type(weight) in (torch.Tensor, nn.Parameter):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            if dtype in (torch.bfloat16, torch.float16):
                with torch.autocast("cpu", enabled=False):
                    return _LowpLinearViaFp32.apply(x, weight, self.bias, dtype)
        return F.linear(x, weight, self.bias)


class NormHead(Linear):
    """InternEvo's `model.norm_head` (after Baichuan 2): the output layer multiplies by the rows of its
    matrix divided by their L2 norm, so a token's logit does not grow with the norm of its row. The
    parameter is the raw matrix (same name and shape); a vocabulary-sharded row is whole on its rank, so
    tensor parallelism needs nothing more. Exported to Hugging Face as the normalised matrix."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, F.normalize(self.weight, dim=-1))


def rope_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def dynamic_ntk_base(base: float, head_dim: int, factor: float, seq_len: int, max_positions: int) -> float:
    """Dynamic NTK scaling (as HF's "dynamic" rope type): the base grows once a sequence is longer
    than the trained context, and is left unchanged below it."""
    if seq_len <= max_positions:
        return base
    scale = (factor * seq_len / max_positions) - (factor - 1)
    return base * scale ** (head_dim / (head_dim - 2))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, base: float, rope_scaling: dict | None,
                 max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, T, head_dim] (HF's half-rotation layout) for integer positions [B, T]."""
    if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) == "dynamic":
        seq_len = int(position_ids.max().item()) + 1
        base = dynamic_ntk_base(base, head_dim, float(rope_scaling["factor"]), seq_len, max_positions)
    inv_freq = rope_inv_freq(head_dim, base, device=position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D] (rotate-half convention, matching HF Llama).
    Runs in x's dtype, as HF does, so bf16 activations are not copied to fp32 and back."""
    cos = cos.to(x.dtype)[:, :, None, :]
    sin = sin.to(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
