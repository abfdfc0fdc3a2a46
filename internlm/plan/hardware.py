"""One set of hardware constants per accelerator model: the planner's whole hardware model.

Peak figures are the vendors' dense (no sparsity) BF16 tensor-core numbers; bandwidths are per GPU and
per direction. The efficiencies say what fraction of a peak a well-shaped kernel reaches in practice:
`gemm_eff` (cuBLAS on transformer-sized GEMMs), `attn_eff` (the flash-attention kernel forward + backward,
as its papers report per GPU generation, in their FLOP count: the backward 2.5 times the forward, as it
recomputes QK^T), `hbm_eff` (streaming elementwise kernels) and `link_eff`
(NCCL ring bus bandwidth over the link's peak). They are set once per GPU model from those public
figures and are not tuned per case; doc/plan.md lists them and what they predict against published runs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float  # dense bf16
    memory_gib: float
    hbm_tbps: float  # memory bandwidth, TB/s
    intra_gbps: float  # NVLink (or equivalent) per GPU per direction, GB/s
    inter_gbps: float  # network per GPU per direction, GB/s
    gemm_eff: float = 0.75
    attn_eff: float = 0.5
    hbm_eff: float = 0.8
    link_eff: float = 0.8
    source: str = ""

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12


GPUS = {
    "A100-80GB": Hardware("A100-80GB", 312, 80, 2.039, 300, 25, gemm_eff=0.75, attn_eff=0.6,
                          source="A100 SXM4 datasheet; NVLink3 600 GB/s bidirectional; HDR 200 Gb/s per GPU; "
                                 "FlashAttention-2 reaches 50-73% of peak forward+backward on A100"),
    "H100-80GB": Hardware("H100-80GB", 989, 80, 3.35, 450, 50, gemm_eff=0.7, attn_eff=0.35,
                          source="H100 SXM5 datasheet; NVLink4 900 GB/s bidirectional; NDR 400 Gb/s per GPU; "
                                 "FlashAttention-2 reaches ~35% of peak on H100"),
    # torchtitan's benchmark GPUs (Grand Teton): H100 SXM with 96 GB HBM2e at 2.4 TB/s and a 500 W power
    # limit, "between SXM and NVL" in peak: the NVL's dense bf16 figure is taken
    "H100-96GB": Hardware("H100-96GB", 835, 96, 2.4, 450, 50, gemm_eff=0.7, attn_eff=0.35,
                          source="torchtitan benchmarks/llama3_h100_202412: HBM2e 2.4 TB/s, 500 W; "
                                 "H100 NVL dense bf16 peak"),
    "H200": Hardware("H200", 989, 141, 4.8, 450, 50, gemm_eff=0.7, attn_eff=0.35,
                     source="H200 SXM datasheet (H100 compute, HBM3e 4.8 TB/s)"),
    "B200": Hardware("B200", 2250, 180, 8.0, 900, 50, gemm_eff=0.7, attn_eff=0.35,
                     source="B200 datasheet (HGX, dense bf16); NVLink5 1.8 TB/s bidirectional"),
}


def cpu_hardware(peak_tflops: float | None = None, memory_gib: float | None = None) -> Hardware:
    """This machine's CPU: the fp32 GEMM peak measured here (what bf16 runs as on CPUs without bf16
    GEMMs) and its RAM; links are shared memory (gloo)."""
    if peak_tflops is None:
        import torch

        from internlm.metrics import measure_peak_tflops

        peak_tflops = measure_peak_tflops(dtype=torch.float32, device=torch.device("cpu"))
    if memory_gib is None:
        import os

        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return Hardware("cpu", peak_tflops, memory_gib, 0.02, 5, 5, gemm_eff=0.8, attn_eff=0.3,
                    source="measured on this machine")


def resolve_hardware(gpu: str, *, peak_tflops=None, memory_gb=None, intra_gbps=None, inter_gbps=None) -> Hardware:
    """The named model (case-insensitive) with any figure the user gives in its place."""
    if gpu.lower() == "cpu":
        hw = cpu_hardware(peak_tflops, memory_gb)
    else:
        match = {k.lower(): v for k, v in GPUS.items()}.get(gpu.lower())
        if match is None:
            raise ValueError(f"unknown --gpu {gpu!r}: choose one of {', '.join(GPUS)} or cpu, or give "
                             f"--peak_tflops/--memory_gb/--intra_gbps/--inter_gbps for another accelerator")
        hw = match
    changes = {k: v for k, v in dict(peak_tflops=peak_tflops, memory_gib=memory_gb, intra_gbps=intra_gbps,
                                     inter_gbps=inter_gbps).items() if v is not None}
    return replace(hw, **changes) if changes else hw
