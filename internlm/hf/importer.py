"""Import: a transformers folder (llama, internlm3, internlm v1 or InternLM2's published layout) -> a
complete training checkpoint of ours, or our parameters as one in-memory state dict.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from internlm.checkpoint import layout
from internlm.checkpoint.reader import quiet_dcp
from internlm.checkpoint.state import MODEL_PREFIX
from internlm.errors import ConversionError
from internlm.hf.mapping import expected_parameters, hf_dtype, layer_sort_key, training_config_from_args
from internlm.hf.weights import HFSource
from internlm.model.internlm import ModelArgs


def hf_state_dict_ours(hf_dir) -> tuple[ModelArgs, dict, dict]:
    """(our ModelArgs, {our name: full tensor}, the HF config) of a HF folder."""
    source = HFSource(hf_dir)
    try:
        expected = expected_parameters(source.args)
        tensors = {name: source.full_tensor(name, shape).clone()
                   for name, shape in sorted(expected.items(), key=lambda kv: layer_sort_key(kv[0]))}
        return source.args, tensors, source.weights.config
    finally:
        source.weights.close()


def import_hf_to_ckpt(hf_dir, ckpt_dir, config_out=None, dtype: torch.dtype = torch.float32,
                      progress: bool = True) -> dict:
    """HF folder -> a complete training checkpoint of this framework (see internlm/checkpoint/layout.py):
    DCP with keys `model.<name>`, config.yaml derived from config.json, meta.json, state.json (step 0)
    and the COMPLETE marker, loadable with load_ckpt_info=dict(path=ckpt_dir, content=("model",)).
    `config_out` also gets a training config that starts from it."""
    import torch.distributed.checkpoint as dcp

    from internlm.config import config_from_dict, dump_yaml

    args, tensors, hf_cfg = hf_state_dict_ours(hf_dir)
    if args.tie_word_embeddings:  # the trainer's state dict names the tied head too
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    names = list(tensors)
    if progress:
        from internlm.progress import progress as show_progress

        names = show_progress(names, desc="import", unit="tensors")
    for name in names:
        tensors[name] = tensors[name].to(dtype)
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / layout.MARKER).exists():
        raise ConversionError(f"{str(ckpt_dir)!r} already holds a complete checkpoint; choose another folder.")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with quiet_dcp():
        dcp.save({MODEL_PREFIX + k: v for k, v in tensors.items()}, checkpoint_id=str(ckpt_dir), no_dist=True)
    model_dtype = hf_dtype(hf_cfg)
    if model_dtype not in ("torch.bfloat16", "torch.float16", "torch.float32"):
        model_dtype = "torch.bfloat16"
    cfg = config_from_dict(training_config_from_args(args, model_dtype, job_name=ckpt_dir.name or "from_hf"))
    dump_yaml(cfg, ckpt_dir / layout.CONFIG)
    layout.write_json(ckpt_dir / layout.STATE, {"step": 0, "note": "imported from Hugging Face: model weights only"})
    layout.write_json(ckpt_dir / layout.META, {
        "format": layout.FORMAT, "format_version": layout.FORMAT_VERSION, "kind": "import", "step": 0, "tokens_seen": 0,
        "model_type": args.model_type, "dtype": str(dtype), "num_params": args.num_params(),
        "source": "huggingface", "hf_dir": str(Path(hf_dir).resolve()), "hf_model_type": hf_cfg.get("model_type"),
        "torch_version": torch.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    layout.write_json(ckpt_dir / layout.MARKER, {"step": 0, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if config_out:
        train_cfg = config_from_dict(training_config_from_args(args, model_dtype, job_name="finetune",
                                                               load_path=str(ckpt_dir)))
        dump_yaml(train_cfg, config_out)
    return {"ckpt_dir": str(ckpt_dir), "model_type": args.model_type, "num_params": args.num_params(),
            "tensors": len(tensors)}
