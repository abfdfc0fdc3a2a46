"""Export: our weights (a training checkpoint, or a model in memory) -> a transformers folder.

The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` with
no remote code, in one of two transformers model types:
- "llama" (LlamaForCausalLM): INTERNLM v1 (its q/k/v and output biases are exactly Llama's
  `attention_bias=True`), INTERNLM2_PUBLIC, LLAMA2, and INTERNLM3 too (Llama has `head_dim`);
- "internlm3" (transformers maps it to its Llama implementation): every shape without biases.
A training checkpoint is read one tensor at a time (internlm.checkpoint.reader), so exporting needs
about one safetensors shard of memory (plus the largest single tensor), never the whole model twice.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from internlm.checkpoint.reader import DCPSource
from internlm.errors import ConversionError
from internlm.hf.mapping import (
    check_expressible,
    default_target,
    expected_parameters,
    hf_config_dict,
    layer_sort_key,
    to_hf_name,
)
from internlm.hf.mixtral import check_mixtral, mixtral_config, mixtral_entries
from internlm.hf.tokenizer_files import find_tokenizer, write_tokenizer_files
from internlm.hf.weights import StateDictSource, parse_size, remove_weight_files, write_safetensors_shards
from internlm.model.internlm import InternLM, ModelArgs


@dataclass
class ExportReport:
    out_dir: str
    target: str
    model_type: str
    dtype: str
    shards: int
    total_size: int
    tokenizer: str | None
    seconds: float = 0.0
    notes: list = field(default_factory=list)


def export_source_to_hf(source, args: ModelArgs, out_dir, target: str | None = None,
                        dtype: torch.dtype = torch.bfloat16, max_shard="10GB", tokenizer=None,
                        progress: bool = True) -> ExportReport:
    """Write a transformers folder from any object with `full_tensor(our name, shape)`."""
    t0 = time.time()
    target = target or default_target(args)
    check_expressible(args, target)
    notes = check_mixtral(args) if target == "mixtral" else []
    expected = expected_parameters(args)
    entries, producers = [], {}

    def read(name):
        full = source.full_tensor(name, expected[name])
        if name == "output.weight" and args.norm_head:  # the head multiplies by its normalised rows
            full = torch.nn.functional.normalize(full.float(), dim=-1)
        return full

    for name in sorted(expected, key=layer_sort_key):
        if ".feed_forward." in name and args.num_experts:
            if name.endswith("experts.w1"):  # the layer's MoE tensors, written once
                layer = int(name.split(".")[1])
                for hf_name, shape, make in mixtral_entries(layer, expected, read):
                    entries.append((hf_name, shape))
                    producers[hf_name] = (name, make)
            continue
        hf_name = to_hf_name(name)
        entries.append((hf_name, expected[name]))
        producers[hf_name] = (name, lambda n=name: read(n))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = {"bos": 1, "eos": 2, "pad": None}
    if tokenizer:
        ids = write_tokenizer_files(tokenizer, out_dir, args.max_position_embeddings)
    def finite_tensor(key):
        ours, make = producers[key]
        tensor = make()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ConversionError(f"tensor {ours!r} holds NaN or inf values (the training diverged); "
                                  f"refusing to export it")
        return tensor

    try:
        written = write_safetensors_shards(out_dir, entries, finite_tensor, dtype, parse_size(max_shard), progress)
    except ConversionError:
        remove_weight_files(out_dir)  # no half-written export is left behind
        raise
    if target == "mixtral":  # Llama's attention, embedding and norms, then Mixtral's experts
        config = mixtral_config(args, hf_config_dict(replace(args, num_experts=0), "llama", dtype, ids.get("bos"),
                                                     ids.get("eos"), ids.get("pad")))
    else:
        config = hf_config_dict(args, target, dtype, ids.get("bos"), ids.get("eos"), ids.get("pad"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # a chat model ends its turn with <|im_end|>: generation stops there as at eos
    eos = [ids["eos"], ids["im_end"]] if ids.get("im_end") is not None else ids.get("eos")
    gen = {"bos_token_id": ids.get("bos"), "eos_token_id": eos}
    if ids.get("pad") is not None:
        gen["pad_token_id"] = ids["pad"]
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ExportReport(out_dir=str(out_dir), target=target, model_type=args.model_type,
                        dtype=str(dtype).replace("torch.", ""), shards=written["shards"],
                        total_size=written["total_size"], tokenizer=str(tokenizer) if tokenizer else None,
                        seconds=time.time() - t0, notes=notes)


def export_model_to_hf(model: InternLM, out_dir, **kwargs) -> ExportReport:
    """Export an in-memory (single-device) model of ours."""
    return export_source_to_hf(StateDictSource(model.state_dict()), model.args, out_dir, **kwargs)


def export_ckpt_to_hf(ckpt_dir, out_dir, target: str | None = None, dtype: torch.dtype = torch.bfloat16,
                      max_shard="10GB", tokenizer=None, progress: bool = True) -> ExportReport:
    """Training checkpoint (DCP + config.yaml) -> transformers folder."""
    source = DCPSource(ckpt_dir)
    source.check(expected_parameters(source.args))
    notes = []
    if source.args.tie_word_embeddings and "output.weight" in source.entries:
        # a tied model split over pipeline stages holds two copies; the export keeps the embedding's
        diff = (source.full_tensor("output.weight") - source.full_tensor("tok_embeddings.weight")).abs().max()
        if diff > 0:
            notes.append(f"tied embeddings: output.weight differs from tok_embeddings.weight by up to "
                         f"{diff.item():.3g}; the export uses tok_embeddings.weight for both")
    if tokenizer is None:
        tokenizer = find_tokenizer(source.cfg, source.path)
        if tokenizer:
            notes.append(f"tokenizer: {tokenizer}")
    report = export_source_to_hf(source, source.args, out_dir, target, dtype, max_shard, tokenizer, progress)
    report.notes += notes
    if not report.tokenizer:
        report.notes.append("no tokenizer written (pass --tokenizer PATH/tokenizer.model)")
    return report
