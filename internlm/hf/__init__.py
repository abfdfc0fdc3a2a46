"""Hugging Face interoperability: our weights and config to and from transformers' formats.

Export writes a folder that `AutoModelForCausalLM.from_pretrained` loads with no remote code
(transformers' llama or internlm3); import reads a transformers llama / internlm3 / internlm folder or
InternLM2's published layout, into a training checkpoint or straight into a model under any parallel
layout. One concern per file:

    mapping.py          parameter names ours <-> HF, configs (config.json <-> ModelArgs, a training config),
                        what a target can express, check_args_match
    weights.py          HF weight files: HFWeights / HFSource (reading), load_hf_into_parts, the in-memory
                        StateDictSource, safetensors shard planning and writing
    tokenizer_files.py  tokenizer.model / tokenizer_config.json / tokenizer.json of an export, find_tokenizer
    export.py           export_ckpt_to_hf, export_model_to_hf, export_source_to_hf
    importer.py         import_hf_to_ckpt, hf_state_dict_ours

Reading our own training checkpoints (resolve_ckpt_dir, read_ckpt_config, DCPSource,
load_ckpt_into_parts) lives in internlm/checkpoint/reader.py; ConversionError in internlm/errors.py.
Both are re-exported here for existing callers.
"""
from internlm.checkpoint.reader import DCPSource, load_ckpt_into_parts, read_ckpt_config, resolve_ckpt_dir
from internlm.errors import ConversionError
from internlm.hf.export import ExportReport, export_ckpt_to_hf, export_model_to_hf, export_source_to_hf
from internlm.hf.importer import hf_state_dict_ours, import_hf_to_ckpt
from internlm.hf.mapping import (
    HF_TARGETS,
    check_args_match,
    check_expressible,
    default_target,
    expected_parameters,
    from_hf_name,
    hf_config_dict,
    hf_dtype,
    hf_layout,
    model_args_from_hf_config,
    to_hf_name,
    training_config_from_args,
)
from internlm.hf.tokenizer_files import find_tokenizer, write_tokenizer_files
from internlm.hf.weights import (
    BIN_INDEX_FILE,
    INDEX_FILE,
    HFSource,
    HFWeights,
    StateDictSource,
    copy_full_into,
    is_hf_dir,
    load_hf_into_parts,
    parse_size,
    plan_shards,
    write_safetensors_shards,
)

__all__ = [
    "BIN_INDEX_FILE", "ConversionError", "DCPSource", "ExportReport", "HF_TARGETS", "HFSource", "HFWeights",
    "INDEX_FILE", "StateDictSource", "check_args_match", "check_expressible", "copy_full_into", "default_target",
    "expected_parameters", "export_ckpt_to_hf", "export_model_to_hf", "export_source_to_hf", "find_tokenizer",
    "from_hf_name", "hf_config_dict", "hf_dtype", "hf_layout", "hf_state_dict_ours", "import_hf_to_ckpt", "is_hf_dir",
    "load_ckpt_into_parts", "load_hf_into_parts", "model_args_from_hf_config", "parse_size", "plan_shards",
    "read_ckpt_config", "resolve_ckpt_dir", "to_hf_name", "training_config_from_args", "write_safetensors_shards",
    "write_tokenizer_files",
]
