"""The shape rules of the InternLM family, in one place and without torch (the config reads them too).

model_type          attention         biases                   head_dim
INTERNLM (v1)       MHA               q/k/v and output proj    hidden / heads
INTERNLM2_PUBLIC    GQA               none                     hidden / heads
INTERNLM3           GQA               none                     explicit
LLAMA2              MHA or GQA        none                     hidden / heads
INTERNLM_MoE        MHA or GQA        as INTERNLM (v1)         hidden / heads   FFN: experts (moe.py)
"""
from __future__ import annotations

import math

MODEL_TYPES = ("INTERNLM", "INTERNLM2_PUBLIC", "INTERNLM3", "LLAMA2", "INTERNLM_MoE")


def has_bias(model_type: str) -> bool:
    """InternLM (v1), and InternEvo's MoE model built on it, have q/k/v and output-projection biases; the
    others have none."""
    return model_type in ("INTERNLM", "INTERNLM_MoE")


def default_head_dim(hidden_size: int, num_attention_heads: int) -> int:
    return hidden_size // num_attention_heads


def swiglu_hidden_dim(hidden_size: int, mlp_ratio: float, multiple_of: int) -> int:
    """InternEvo's FFN width: int(h * mlp_ratio) rounded up to a multiple of `multiple_of`."""
    dim = int(hidden_size * mlp_ratio)
    return multiple_of * math.ceil(dim / multiple_of)


MOE_TYPES = ("GShard", "Dropless", "MegaBlock", "MegaBlock-Dropless")


def drops_tokens(moe_type: str, drop_tokens: bool = True) -> bool:
    """GShard routing (and MegaBlock's non-dropless one) drops what exceeds an expert's capacity."""
    return drop_tokens and moe_type in ("GShard", "MegaBlock")
