"""The config schema: one frozen dataclass per section, each key with its type, default and a one-line doc.

This is the only place a default is written. `load_config` (load.py) checks a file against it and
returns a `TrainConfig`; the key table of doc/config_keys.md and `python train.py --config-keys` are
generated from it (docs.py). Key metadata:

- `doc`: one line for the table;
- `choices`, `ge`/`gt`/`le`/`lt`, `check`: value rules (checks.py);
- `inert`: the key is InternEvo's and has no effect on this engine; it is accepted, and a run whose
  config sets it prints one notice naming it and saying why (`TrainConfig.notices`);
- `legacy`: an older InternEvo spelling that load.py maps onto the current key (named in the text) with a
  deprecation notice; the resolved config holds the mapped value and the legacy key as None.

Defaults that depend on other keys are `DERIVED` here and computed in load.py (`fill_derived`); keys
without a default are `REQUIRED`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from internlm.config import checks
from internlm.model.shape import MOE_TYPES


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __deepcopy__(self, memo):
        return self


REQUIRED = _Marker("REQUIRED")  # no default: the user must set it
DERIVED = _Marker("DERIVED")  # default computed from other keys (load.fill_derived)


def key(default: Any = None, doc: str = "", *, factory=None, choices=(), ge=None, gt=None, le=None, lt=None,
        check=None, inert: str | None = None, legacy: str | None = None):
    meta = dict(doc=doc, choices=tuple(choices), ge=ge, gt=gt, le=le, lt=lt, check=check, inert=inert, legacy=legacy)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, doc: str):
    """A nested section (its keys are the fields of `cls`)."""
    return field(default_factory=cls, metadata=dict(doc=doc, section=True))


# ---- model ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    num_attention_heads: int = key(REQUIRED, "query heads", ge=1)
    num_kv_attention_heads: int = key(DERIVED, "key/value heads (grouped-query attention); default: "
                                               "num_attention_heads", ge=1)
    head_dim: int = key(DERIVED, "size of one head; default hidden_size // num_attention_heads", ge=1)
    vocab_size: int = key(REQUIRED, "vocabulary size (embedding and output rows)", ge=1)
    hidden_size: int = key(REQUIRED, "model width", ge=1)
    num_layers: int = key(REQUIRED, "transformer blocks", ge=1)
    mlp_ratio: float = key(4.0, "FFN width / hidden_size before rounding to multiple_of", gt=0)
    multiple_of: int = key(256, "the FFN width is rounded up to a multiple of this", ge=1)
    intermediate_size: int = key(DERIVED, "FFN width; default int(hidden_size * mlp_ratio) rounded up to "
                                          "multiple_of", ge=1)
    no_bias: bool = key(DERIVED, "no q/k/v/output biases; default: True except for model_type INTERNLM")
    dtype: str = key("torch.bfloat16", "compute dtype: torch.bfloat16, torch.float16 or torch.float32 "
                                       "(master weights stay fp32)", check=checks.dtype_name)
    norm_type: str = key("rmsnorm", "normalisation (only rmsnorm)", choices=("rmsnorm",))
    layer_norm_epsilon: float = key(1e-5, "RMSNorm epsilon", gt=0)
    use_flash_attn: bool = key(True, "use flash-attn's varlen kernel on CUDA when it is importable")
    num_chunks: int = key(1, "pipeline stages per rank (interleaved schedules)", ge=1)
    rope_base: float = key(10000.0, "rotary embedding base (theta)", gt=0)
    rope_scaling: dict | None = key(None, "None or dict(type='dynamic', factor=F): dynamic NTK scaling",
                                    check=checks.rope_scaling)
    max_position_embeddings: int = key(DERIVED, "trained context length; default max(2048, data.seq_len)", ge=1)
    tie_word_embeddings: bool = key(False, "share the embedding and output matrices")
    norm_head: bool = key(False, "InternEvo's normalised output head: logits against the L2-normalised rows of the "
                                 "output matrix (exported to Hugging Face as that normalised matrix)")
    init_std: float = key(0.02, "standard deviation of the initial weights", gt=0)
    checkpoint: bool | float = key(False, "activation checkpointing: True/False or the fraction of layers",
                                   check=checks.bool_or_fraction)
    checkpoint_policy: str = key("full", "activation checkpointing: recompute whole blocks (full), all but "
                                         "matmuls and attention (selective), or also every other matmul "
                                         "(selective_op, torchtitan's op-level policy)",
                                 choices=("full", "selective", "selective_op"))
    compile: bool = key(False, "torch.compile each transformer block")
    attn_backend: str = key("auto", "attention kernel: auto, flash, varlen, sdpa, sdpa_mask, sdpa_loop",
                            choices=("auto", "flash", "varlen", "sdpa", "sdpa_mask", "sdpa_loop"))
    attn_compute: str = key("auto", "SDPA precision: auto (fp32 on CPU), input, float32",
                            choices=("auto", "input", "float32"))
    cpu_matmul: str = key("auto", "bf16 matmuls on CPU: native, fp32 GEMMs on bf16-rounded operands, or "
                          "auto (fp32 where the CPU has no bf16 GEMM)", choices=("auto", "native", "fp32"))
    apply_post_layer_norm: bool = key(False, "post-norm blocks (not supported: must stay False)",
                                      check=checks.must_be_false("only pre-norm transformers are implemented"))
    embed_split_hidden: bool = key(True, "InternEvo's embedding split", inert="the embedding is split by DTensor "
                                         "tensor parallelism over the vocabulary")
    embed_grad_scale: float = key(1.0, "InternEvo's embedding gradient scale", gt=0,
                                  inert="embedding gradients are not rescaled")
    parallel_output: bool = key(True, "InternEvo's vocabulary-parallel output",
                                inert="the output is vocabulary-parallel under tensor parallelism (loss_parallel)")
    mlp_layer_fusion: bool = key(False, "InternEvo's fused w1/w3", inert="w1 and w3 stay separate matrices")
    qk_interleaved: bool = key(False, "InternEvo's interleaved rotary layout",
                               inert="rotary embeddings use the half-rotation layout of Hugging Face")
    enable_qkv_fusion: bool | None = key(None, "InternEvo's fused wqkv", inert="q, k and v stay separate matrices")
    num_experts: int = key(0, "experts per MoE layer (model_type INTERNLM_MoE; 0: dense FFN); doc/moe.md", ge=0)
    moe_type: str = key("GShard", "MoE routing: GShard (capacity, tokens beyond it dropped) or Dropless; "
                                  "MegaBlock / MegaBlock-Dropless are the same routing", choices=MOE_TYPES)
    moe_use_residual: bool = key(False, "residual MoE: a dense FFN beside the experts, mixed per token")
    adapt_hf: bool = key(True, "InternEvo's choice of rotary layout (True: Hugging Face's)",
                         inert="rotary embeddings use the half-rotation layout of Hugging Face")


# ---- data ----------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = key(DERIVED, "tokens per packed sequence; default SEQ_LEN (else 2048)", ge=1)
    micro_num: int = key(1, "micro-batches per optimizer step (gradient accumulation)", ge=1)
    micro_bsz: int = key(1, "sequences per micro-batch (packed end to end: micro_bsz * seq_len tokens)", ge=1)
    valid_micro_num: int = key(DERIVED, "validation micro-batches per data-parallel rank; default micro_num", ge=1)
    valid_every: int = key(0, "validate every N steps (0: never)", ge=0)
    pack_sample_into_one: bool = key(False, "treat each packed row as one sequence (attention crosses samples)")
    total_steps: int = key(1000, "optimizer steps of the run", ge=1)
    min_length: int = key(0, "drop samples shorter than this", ge=0)
    type: str = key("tokenized", "tokenized: .bin/.bin.meta token files; streaming: .jsonl/.json/.parquet/.txt "
                                 "files or a datasets save_to_disk folder, tokenized on the fly with "
                                 "data.tokenizer_path (doc/finetune.md)", choices=("tokenized", "streaming"))
    train_folder: str | None = key(None, "folder of .bin/.bin.meta files, or of raw files with type='streaming' "
                                         "(None: generated dummy data)", check=checks.local_path)
    valid_folder: str | None = key(None, "validation folder, .bin files or raw files (tokenized at start; "
                                         "None: no validation)", check=checks.local_path)
    tokenizer_path: str | None = key(None, "sentencepiece model: tokenizes streaming data; recorded for export "
                                           "and generation", check=checks.local_path)
    format: str = key("auto", "streaming records: auto (detected per file), text, chat or instruction",
                      choices=("auto", "text", "chat", "instruction"))
    dummy_num_samples: int = key(10000, "samples of the generated dummy data", ge=1)
    check_data: bool = key(True, "verify every .bin/.bin.meta (coverage, counts, token ids < vocab_size) at start")
    shuffle: bool = key(True, "shuffle the sample order each epoch")
    rampup_batch_size: str = key("", "batch-size ramp-up (not supported: must stay empty)", check=checks.empty_string)
    skip_batches: str | None = key("", "InternEvo's batches to skip", inert="no batches are skipped")
    empty_cache_and_diag_interval: int | None = key(None, "InternEvo's diagnosis interval",
                                                    inert="no periodic cache emptying or diagnosis")
    diag_outlier_ratio: float | None = key(None, "InternEvo's slow-rank diagnosis", inert="no slow-rank diagnosis")
    num_worker: int = key(0, "streaming: tokenizer processes (0: a background thread); .bin data is read in "
                             "the training process (memory-mapped)", ge=0)
    fixed_random_dataset_seqlen: bool = key(True, "InternEvo's dummy-data switch",
                                            inert="dummy data has Zipf-like sample lengths")


# ---- optimizer ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class FP16ScalerConfig:
    initial_scale: float = key(float(2**16), "initial fp16 loss scale", gt=0)
    min_scale: float = key(1.0, "smallest fp16 loss scale", gt=0)
    growth_interval: int = key(1000, "steps without overflow before the scale grows", ge=1)


@dataclass(frozen=True, kw_only=True)
class GradScalerConfig:
    fp16: FP16ScalerConfig = section(FP16ScalerConfig, "fp16 dynamic loss scaling")
    growth_factor: float = key(2.0, "scale growth factor", gt=1)
    backoff_factor: float = key(0.5, "scale backoff on overflow", gt=0, lt=1)
    max_scale: float = key(float(2**24), "largest loss scale", gt=0)
    hysteresis: int = key(2, "overflows tolerated before backing off", ge=1)


@dataclass(frozen=True, kw_only=True)
class HybridZeroConfig:
    overlap_sync_grad: bool = key(True, "overlap communication with compute (FSDP2 prefetch)")
    overlap_sync_param: bool = key(False, "overlap parameter all-gathers (FSDP2 prefetch)")
    clip_grad_norm: float | None = key(0.0, "clip the global gradient norm to this (0 or None: no clipping)", ge=0)
    max_skipped_steps: int = key(10, "stop the run after this many consecutive steps with non-finite gradients",
                                 ge=1)
    reduce_bucket_size: int = key(512 * 1024 * 1024, "InternEvo's gradient bucket bytes", ge=1,
                                  inert="FSDP2 reduces gradients per transformer block")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    label_smoothing: float = key(0.0, "label smoothing of the cross entropy", ge=0, lt=1)
    kernel: str = key("auto", "cross entropy: auto (chunked), chunked (fp32, 32 MiB blocks), torch",
                      choices=("auto", "chunked", "torch"))
    op_type: str | None = key(None, "InternEvo's loss kernel name", inert="the kernel is chosen by loss.kernel")
    moe_loss_coeff: float = key(0.01, "weight of the MoE load-balancing loss added to the LM loss (logged "
                                      "apart as moe_loss)", ge=0)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    top_k: int = key(2, "experts per token", ge=1)
    capacity_factor: float = key(1.0, "GShard: an expert takes at most ceil(top_k * tokens / num_experts * "
                                      "capacity_factor) tokens of a micro-batch in training", gt=0)
    eval_capacity_factor: float = key(1.0, "the same in validation", gt=0)
    min_capacity: int = key(4, "GShard: the least capacity of an expert", ge=0)
    drop_tokens: bool = key(True, "GShard: drop the tokens beyond an expert's capacity (False: dropless)")
    noisy_gate_policy: str | None = key(None, "noise on the router logits (only None)",
                                        check=checks.must_be_none("routing has no noise here; the same tokens "
                                                                  "go to the same experts in every layout"))
    use_rts: bool = key(True, "InternEvo's random token selection", inert="tokens are dropped by position "
                                                                       "(first choices first, in token order)")
    use_fused_gating: bool = key(False, "InternEvo's fused gating kernel", inert="the gate is one fp32 matmul")


@dataclass(frozen=True, kw_only=True)
class AdamConfig:
    lr: float = key(1e-4, "peak learning rate", gt=0)
    adam_beta1: float = key(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = key(0.95, "AdamW beta2 (start of the beta2 schedule)", ge=0, lt=1)
    adam_beta2_c: float = key(0.0, "beta2 schedule constant (0: constant beta2)", ge=0)
    adam_eps: float = key(1e-8, "AdamW epsilon", gt=0)
    weight_decay: float = key(0.01, "decoupled weight decay of matrices (norms and biases: none)", ge=0)
    impl: str = key("auto", "AdamW implementation: auto (torch fused), fused, foreach, apex",
                    choices=("auto", "fused", "foreach", "apex"))


@dataclass(frozen=True, kw_only=True)
class LRSchedulerConfig:
    total_steps: int = key(DERIVED, "steps of the schedule; default data.total_steps", ge=1)
    init_steps: int = key(0, "steps already taken (the schedule starts there)", ge=0)
    warmup_ratio: float = key(0.01, "linear warm-up as a fraction of total_steps", ge=0, le=1)
    eta_min: float = key(1e-5, "final learning rate of the cosine decay", ge=0)
    last_epoch: int = key(-1, "InternEvo's scheduler start", ge=-1,
                          inert="the schedule's position comes from lr_scheduler.init_steps or a checkpoint")


@dataclass(frozen=True, kw_only=True)
class Beta2SchedulerConfig:
    init_beta2: float = key(DERIVED, "initial beta2; default adam.adam_beta2", ge=0, lt=1)
    c: float = key(DERIVED, "beta2 schedule constant; default adam.adam_beta2_c", ge=0)
    cur_iter: int = key(-1, "schedule position to start from", ge=-1)


# ---- parallel layout ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ZeroConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(-1, "ranks that shard parameters, gradients and optimizer state (-1/0: all of dp)",
                    check=checks.zero1_size)
    fsdp: bool = key(False, "also reshard parameters after forward (ZeRO-3)")


@dataclass(frozen=True, kw_only=True)
class TensorConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(1, "tensor-parallel degree", ge=1)
    mode: str = key("mtp", "mtp (tensor parallel), msp (tensor + sequence parallel) or isp (sequence parallel "
                           "with head-parallel attention, doc/parallel.md)", check=checks.tensor_mode)


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(1, "pipeline-parallel degree", ge=1)
    mode: str = key("1f1b", "schedule: 1f1b (interleaved when model.num_chunks > 1), zbh1, zbv, gpipe",
                    choices=("1f1b", "zbh1", "zbv", "gpipe"))
    interleaved_overlap: bool = key(True, "InternEvo's interleaved overlap",
                                    inert="torch.distributed.pipelining schedules the communication")


@dataclass(frozen=True, kw_only=True)
class WeightConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(1, "weight parallelism within the isp group: ranks that shard each weight (divides "
                       "tensor.size)", check=checks.weight_size)
    overlap: bool = key(True, "InternEvo's weight-parallel overlap",
                        inert="FSDP prefetch follows hybrid_zero_optimizer.overlap_sync_param/overlap_sync_grad")
    memory_pool: bool = key(True, "InternEvo's weight-parallel memory pool", inert="FSDP2 manages its buffers")
    launch_allgather_before: str | None = key(None, "InternEvo's weight-parallel all-gather point",
                                              inert="FSDP2 gathers each block before its forward")
    forward_overlap_per: str | None = key(None, "InternEvo's weight-parallel overlap unit",
                                          inert="FSDP2 gathers each block before its forward")


@dataclass(frozen=True, kw_only=True)
class PlacementConfig:
    head_first: bool = key(True, "head-parallel ranks are consecutive (else the context-parallel ranks are)")
    interleaved: bool = key(False, "double-ring windows of every other context rank (InternEvo's placement: "
                                   "outer-ring neighbours are adjacent ranks)")


@dataclass(frozen=True, kw_only=True)
class Sequence2DConfig:
    enable: bool = key(False, "2D sequence parallelism: the isp degree (tensor.size) = head_size x context_size")
    head_size: int = key(1, "head parallelism: all-to-all around attention (isp's Ulysses exchange)", ge=1)
    context_size: int = key(1, "context parallelism: ring attention over the context ranks' key/value blocks, "
                               "zigzag slices", ge=1)
    window_size: int = key(1, "InternEvo's double ring: context ranks per window; key/value blocks go round "
                              "each window's inner ring, then on to the next window (1 or context_size: "
                              "one ring)", ge=1)
    device_placement_strategy: PlacementConfig = section(PlacementConfig, "rank placement of the 2D groups")


@dataclass(frozen=True, kw_only=True)
class ExpertConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(1, "data-parallel ranks each MoE layer's experts are spread over, tokens sent to them by "
                       "all-to-all (-1/0: the data-parallel size, capped at num_experts; 1: every rank holds all "
                       "experts, sharded by zero1 like every weight); doc/moe.md", ge=-1)
    no_tp: bool = key(False, "InternEvo's experts without tensor parallelism",
                      inert="experts are split over the tensor-parallel ranks by their FFN width here "
                            "(doc/moe.md)")


@dataclass(frozen=True, kw_only=True)
class ExpertWeightConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(1, "InternEvo's expert weight parallelism: only 1 (shard expert weights with zero1 or "
                       "zero1.fsdp instead)", ge=1, le=1)
    overlap: bool = key(False, "InternEvo's expert weight-parallel overlap", inert="no expert weight parallelism")


@dataclass(frozen=True, kw_only=True)
class ExpertZeroConfig:
    SHORTHAND: ClassVar[str] = "size"
    size: int = key(-1, "expert-parallel experts sharded over their replicas (-1: all of them, as InternEvo's "
                        "expert ZeRO group; 1: a whole copy on each); with expert.size=1 zero1 shards experts")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    zero1: ZeroConfig = section(ZeroConfig, "Hybrid ZeRO sharding group")
    tensor: TensorConfig = section(TensorConfig, "tensor parallelism")
    pipeline: PipelineConfig = section(PipelineConfig, "pipeline parallelism")
    weight: WeightConfig = section(WeightConfig, "InternEvo's weight parallelism")
    sequence_2D: Sequence2DConfig = section(Sequence2DConfig, "InternEvo's 2D sequence parallelism (head x context)")
    sequence_parallel: bool = key(False, "sequence parallelism with tensor parallelism (= tensor.mode='msp')")
    collective_timeout_s: int = key(1800, "seconds before a stuck collective fails with the phase it was in", ge=1)
    expert: ExpertConfig = section(ExpertConfig, "InternEvo's expert parallelism (MoE)")
    expert_weight: ExpertWeightConfig = section(ExpertWeightConfig, "InternEvo's expert weight parallelism")
    expert_zero1: ExpertZeroConfig = section(ExpertZeroConfig, "InternEvo's ZeRO group of expert parameters")


# ---- checkpoints and monitoring ----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CkptConfig:
    enable_save_ckpt: bool = key(DERIVED, "save checkpoints; default: True when save_ckpt_folder is set")
    save_ckpt_folder: str | None = key(None, "folder of the checkpoints (local path; 'local:' prefix accepted)",
                                       check=checks.local_path)
    checkpoint_every: int = key(50, "save every N steps (and at the end)", ge=1)
    auto_resume: bool = key(DERIVED, "resume from the newest complete checkpoint in save_ckpt_folder; default: True "
                                      "(InternEvo's legacy: not load_given_ckpt); doc/checkpoint.md#resuming")
    load_ckpt_info: dict | None = key(None, "dict(path=..., content=('model',...), ckpt_type='internlm'|'internevo'|"
                                            "'hf'|'hf_llama'|'llama'): what to load when not resuming; path=None: "
                                            "train from scratch", check=checks.load_ckpt_info)
    oss_snapshot_freq: int = key(0, "write a snapshot (two alternating slots) every N steps (0: never)", ge=0)
    async_upload: bool = key(False, "save asynchronously (DCP async_save) while training continues")
    stop_file_path: str | None = key(None, "a file holding a step: save and stop at that step (-N: save at step N and "
                                           "go on; 0: nothing; empty: stop now); doc/checkpoint.md",
                                     check=checks.local_path)
    keep_last: int = key(0, "keep only the newest N checkpoints (0: all)", ge=0)
    enable_internevo2hf_ckpt: bool = key(False, "also export each saved checkpoint as a Hugging Face folder, "
                                                "<save_ckpt_folder>/hf/<step> (rank 0, after the save is "
                                                "complete; as tools/convert2hf.py in model.dtype)")
    load_ckpt_folder: str | None = key(None, "InternEvo's legacy load folder (model, sampler and optimizer)",
                                       legacy="ckpt.load_ckpt_info", check=checks.local_path)
    load_model_only_folder: str | None = key(None, "InternEvo's legacy weights-only load folder",
                                             legacy="ckpt.load_ckpt_info", check=checks.local_path)
    load_optimizer: bool | None = key(None, "InternEvo's legacy switch: load_ckpt_folder loads the optimizer too "
                                            "(None: True)", legacy="ckpt.load_ckpt_info")
    load_given_ckpt: bool | None = key(None, "InternEvo's legacy switch: True means auto_resume=False",
                                       legacy="ckpt.auto_resume")
    async_upload_tmp_folder: str | None = key(None, "InternEvo's upload staging folder",
                                              inert="async saves write straight to save_ckpt_folder",
                                              check=checks.local_path)


@dataclass(frozen=True, kw_only=True)
class AlertConfig:
    enable_feishu_alert: bool = key(False, "post alerts (start, end, exception, NaN/inf or spiking loss, checkpoint "
                                           "saves, stop file) to feishu_alert_address, from rank 0")
    feishu_alert_address: str | None = key(None, "the Feishu bot webhook URL the alerts are posted to",
                                           check=checks.http_url)
    light_monitor_address: str | None = key(None, "InternEvo's light-monitor heartbeat address",
                                            inert="no heartbeats are sent, only Feishu alerts")
    alert_file_path: str | None = key(None, "a local file to which rank 0 appends every alert it sends",
                                      check=checks.local_path)


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    run_folder: str = key(DERIVED, "metrics.jsonl, TensorBoard events and config.yaml; default runs/<JOB_NAME>",
                          check=checks.local_path)
    log_every: int = key(1, "print a log line every N steps", ge=1)
    peak_tflops: float | None = key(None, "peak TFLOPS per device for MFU (None: known GPU table or measured)", gt=0)
    loss_spike_factor: float = key(3.0, "warn when a step's loss exceeds this multiple of the recent mean (0: off)",
                                   ge=0)
    loss_spike_window: int = key(20, "steps in the recent mean of loss_spike_factor", ge=1)
    alert: AlertConfig = section(AlertConfig, "Feishu webhook alerts (InternEvo's)")
    tensorboard: dict = key(factory=lambda: {"queue_max_length": 10}, doc="InternEvo's TensorBoard queue",
                            inert="TensorBoard events are written by the metrics writer")


# ---- the whole config --------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    JOB_NAME: str = key("AnonymousJob", "name of the run (default run folder runs/<JOB_NAME>)")
    model_type: str = key("INTERNLM", "INTERNLM, INTERNLM2_PUBLIC, INTERNLM3, LLAMA2 or INTERNLM_MoE",
                          check=checks.model_type)
    model: ModelConfig = section(ModelConfig, "the transformer's shape and its kernels")
    data: DataConfig = section(DataConfig, "packed data and batch")
    grad_scaler: GradScalerConfig = section(GradScalerConfig, "fp16 loss scaling")
    hybrid_zero_optimizer: HybridZeroConfig = section(HybridZeroConfig, "Hybrid ZeRO and clipping")
    loss: LossConfig = section(LossConfig, "the loss")
    adam: AdamConfig = section(AdamConfig, "AdamW")
    lr_scheduler: LRSchedulerConfig = section(LRSchedulerConfig, "warm-up + cosine learning rate")
    beta2_scheduler: Beta2SchedulerConfig = section(Beta2SchedulerConfig, "beta2 schedule")
    parallel: ParallelConfig = section(ParallelConfig, "the parallel layout")
    moe: MoEConfig = section(MoEConfig, "Mixture of Experts routing (model_type INTERNLM_MoE); doc/moe.md")
    ckpt: CkptConfig = section(CkptConfig, "checkpoints")
    monitor: MonitorConfig = section(MonitorConfig, "logs and metrics")
    seed: int = key(1024, "seed of the initial weights and the data order", ge=0)
    device: str = key("auto", "auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    cpu_malloc_tuning: bool = key(True, "keep freed memory in glibc's heap on CPU runs (faster steps)")
    cudnn_deterministic: bool = key(False, "torch.backends.cudnn.deterministic")
    cudnn_benchmark: bool = key(False, "torch.backends.cudnn.benchmark")
    enable_tb: bool = key(True, "write TensorBoard events (metrics.jsonl is written either way)")
    tensorboard_folder: str | None = key(None, "folder of the TensorBoard events (None: <run_folder>/tensorboard)",
                                         check=checks.local_path)
    use_fp32_norm: bool | None = key(None, "InternEvo's fp32 norms", inert="norms always compute in fp32")
    generation: dict | None = key(None, "InternEvo's generation settings", inert="no effect on training")
    # not keys: the file's own UPPER_CASE variables, and the InternEvo keys without effect that it set
    user_vars: dict = field(default_factory=dict, metadata=dict(schema=False))
    inert_keys: tuple = field(default=(), metadata=dict(schema=False))
    legacy_notes: tuple = field(default=(), metadata=dict(schema=False))  # legacy keys mapped (load.py)

    @property
    def notices(self) -> tuple[str, ...]:
        """One line per InternEvo key the config set that has no effect on this engine, and per legacy
        key that was mapped onto its current spelling."""
        inert = tuple(f"{path} has no effect here: {key_at(path).inert}" for path in self.inert_keys)
        return inert + tuple(self.legacy_notes)


# ---- reading the schema ------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyInfo:
    name: str
    kind: str  # "int", "float", "bool", "str", "dict" or "any"
    optional: bool  # None is allowed
    default: Any
    doc: str
    choices: tuple
    ge: Any
    gt: Any
    le: Any
    lt: Any
    check: Any
    inert: str | None
    legacy: str | None = None

    def default_value(self):
        return self.default() if callable(self.default) and not isinstance(self.default, _Marker) else self.default


_KINDS = {int: "int", float: "float", bool: "bool", str: "str", dict: "dict"}


def _kind(tp) -> tuple[str, bool]:
    if isinstance(tp, (types.UnionType,)) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return _KINDS.get(args[0], "any"), optional
        return "any", optional
    return _KINDS.get(tp, "any"), False


def keys_of(cls) -> dict:
    """name -> KeyInfo, or name -> section class, in declaration order."""
    cached = _KEYS_CACHE.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("schema") is False:
            continue
        tp = hints[f.name]
        if f.metadata.get("section"):
            out[f.name] = tp
            continue
        kind, optional = _kind(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory
        m = f.metadata
        out[f.name] = KeyInfo(f.name, kind, optional, default, m.get("doc", ""), m.get("choices", ()), m.get("ge"),
                              m.get("gt"), m.get("le"), m.get("lt"), m.get("check"), m.get("inert"),
                              m.get("legacy"))
    _KEYS_CACHE[cls] = out
    return out


_KEYS_CACHE: dict = {}


def key_at(path: str) -> KeyInfo:
    """The KeyInfo of a dotted key path."""
    cls, *sections, name = [TrainConfig, *path.split(".")]
    for sec in sections:
        cls = keys_of(cls)[sec]
    return keys_of(cls)[name]


def is_section(entry) -> bool:
    return isinstance(entry, type) and dataclasses.is_dataclass(entry)


def shorthand_of(cls) -> str | None:
    return getattr(cls, "SHORTHAND", None)
