"""The InternLM family of transformers as one plain-PyTorch module.

The shape rules of each model_type (biases, head size, FFN width) are in `shape.py`. `ModelArgs` is
the model's shape; `Kernels` the per-run choice of kernels (attention backend and precision, the CPU
GEMM), which the trainer resolves for its device (`internlm.builders`) and which changes no weight.

Parameter names are stable and parallel-agnostic (`layers.<i>.attention.wq.weight`, ...): layers live
in a ModuleDict keyed by their global index, so a pipeline stage that keeps layers 4..7 keeps their
names, and a stage without the embedding or the head simply holds None there.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from internlm.model.attention import AttentionPlan, packed_attention, plan_attention
from internlm.model.moe import MoEFeedForward
from internlm.model.ops import Linear, NormHead, RMSNorm, apply_rope, rope_cos_sin
from internlm.model.shape import default_head_dim, swiglu_hidden_dim


@dataclass
class Kernels:
    """Which kernels a run uses; resolved for the device by the trainer (`internlm.builders.kernels`)."""

    attn_backend: str = "sdpa"  # attention.BACKENDS
    attn_upcast: bool = False  # SDPA computes in fp32 (attention.py), from model.attn_compute
    cpu_fp32_gemm: bool = False  # bf16 matmuls as fp32 GEMMs on CPU (ops.Linear), from model.cpu_matmul


@dataclass
class ModelArgs:
    vocab_size: int = 4000
    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 8
    num_kv_attention_heads: int = 8
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    intermediate_size: int = 0  # 0 -> from mlp_ratio and multiple_of
    mlp_ratio: float = 8 / 3
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    norm_head: bool = False  # InternEvo's: logits against the L2-normalised rows of the output matrix
    init_std: float = 0.02
    model_type: str = "INTERNLM2_PUBLIC"
    # Mixture of Experts (model_type INTERNLM_MoE; 0 experts: dense), moe.py
    num_experts: int = 0
    top_k: int = 2
    moe_type: str = "GShard"
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    moe_use_residual: bool = False

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = default_head_dim(self.hidden_size, self.num_attention_heads)
        if not self.intermediate_size:
            self.intermediate_size = swiglu_hidden_dim(self.hidden_size, self.mlp_ratio, self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_kv_attention_heads * hd
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) + (h if self.o_bias else 0)
        ffn = 3 * h * self.intermediate_size
        if self.num_experts:
            ffn = self.num_experts * ffn + h * self.num_experts + (ffn + 2 * h + 2 if self.moe_use_residual else 0)
        per_layer = attn + ffn + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kernels: Kernels):
        super().__init__()
        h, hd = args.hidden_size, args.head_dim
        self.head_dim = hd
        f32 = kernels.cpu_fp32_gemm
        self.wq = Linear(h, args.num_attention_heads * hd, bias=args.qkv_bias, fp32_gemm=f32)
        self.wk = Linear(h, args.num_kv_attention_heads * hd, bias=args.qkv_bias, fp32_gemm=f32)
        self.wv = Linear(h, args.num_kv_attention_heads * hd, bias=args.qkv_bias, fp32_gemm=f32)
        self.wo = Linear(args.num_attention_heads * hd, h, bias=args.o_bias, fp32_gemm=f32)
        # the attention kernel: q, k, v, plan -> output; a parallel layout may wrap it (e.g. sequence
        # parallelism exchanges sequence for heads around it), the weights never change
        self.attend = packed_attention

    def forward(self, x, cos, sin, plan: AttentionPlan):
        bsz, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism the projections hold only the local heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attend(q, k, v, plan)
        return self.wo(out.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs, kernels: Kernels):
        super().__init__()
        f32 = kernels.cpu_fp32_gemm
        self.w1 = Linear(args.hidden_size, args.intermediate_size, bias=False, fp32_gemm=f32)
        self.w3 = Linear(args.hidden_size, args.intermediate_size, bias=False, fp32_gemm=f32)
        self.w2 = Linear(args.intermediate_size, args.hidden_size, bias=False, fp32_gemm=f32)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, kernels: Kernels):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.attention = Attention(args, kernels)
        self.ffn_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.feed_forward = (MoEFeedForward(args, FeedForward, kernels) if args.num_experts
                             else FeedForward(args, kernels))

    def forward(self, x, cos, sin, plan: AttentionPlan):
        x = x + self.attention(self.attention_norm(x), cos, sin, plan)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM(nn.Module):
    def __init__(self, args: ModelArgs, kernels: Kernels | None = None):
        super().__init__()
        kernels = kernels or Kernels()
        self.args, self.kernels = args, kernels
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, kernels) for i in range(args.num_layers)})
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        head = NormHead if args.norm_head else Linear
        self.output = head(args.hidden_size, args.vocab_size, bias=False, fp32_gemm=kernels.cpu_fp32_gemm)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: token ids [B, T] on the first pipeline stage, hidden states [B, T, h] elsewhere.
        position_ids [B, T] restart at 0 at each packed sample (default: one sample per row).
        Returns logits [B, T, V] on the last stage, hidden states otherwise."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        if position_ids is None:
            position_ids = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_base,
                                self.args.rope_scaling, self.args.max_position_embeddings)
        # worked out once, shared by every layer
        plan = plan_attention(position_ids, self.kernels.attn_backend, self.kernels.attn_upcast)
        for block in self.layers.values():
            h = block(h, cos, sin, plan)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            h = self.output(h)
        return h


# ---- deterministic, layout-independent initialisation -------------------------------------------

def canonical_name(name: str) -> str:
    """Strip wrapper prefixes (activation checkpointing, torch.compile) from a parameter name."""
    for token in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(token, "")
    return name


def init_full_tensor(name: str, shape, args: ModelArgs, seed: int) -> torch.Tensor:
    """The full (unsharded) fp32 initial value of one parameter. It depends only on the seed and
    the parameter's name, so every parallel layout starts from identical weights."""
    name = canonical_name(name)
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = args.init_std
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "experts.w2", "residual_mlp.w2.weight")):
        std = std / math.sqrt(2.0 * args.num_layers)  # scaled init of residual-branch outputs
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return torch.randn(shape, generator=gen) * std
