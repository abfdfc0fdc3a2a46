"""Tokenizer files of an export: our sentencepiece model as transformers' LlamaTokenizer (tokenizer.model,
tokenizer_config.json, special_tokens_map.json and, when it reproduces the ids, tokenizer.json), and
finding the tokenizer a training config names.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from internlm.checkpoint import layout
from internlm.errors import ConversionError

logger = logging.getLogger("internlm")


def write_tokenizer_files(spm_model, out_dir, model_max_length: int = 2048) -> dict:
    """tokenizer.model + tokenizer_config.json + special_tokens_map.json for transformers' LlamaTokenizer.

    Our sentencepiece models are trained without a dummy prefix (add_dummy_prefix=False) and with
    whitespace kept, so transformers must not add a prefix space either (add_prefix_space=False,
    legacy=False), and special-token strings in a text stay text (split_special_tokens=True): then it
    gives sentencepiece's ids exactly, also for texts starting with spaces or quoting "<unk>".
    Returns the bos/eos/pad/unk ids."""
    import sentencepiece as spm

    spm_model = Path(spm_model)
    if not spm_model.is_file():
        raise ConversionError(f"tokenizer model {str(spm_model)!r} does not exist.")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spm_model, out_dir / "tokenizer.model")

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    special = {f"{k}_token": piece(v) for k, v in ids.items() if piece(v) is not None}
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": ids["bos"] >= 0,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "bos_token": special.get("bos_token"),
        "eos_token": special.get("eos_token"),
        "unk_token": special.get("unk_token"),
        "pad_token": special.get("pad_token"),
        # text is text, as when the training data was tokenized: a literal "</s>" is not the eos token
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "model_max_length": model_max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    _write_tokenizer_json(out_dir, sp)
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


_PROBE_TEXTS = ("hello world", "  two leading spaces", "    def f(x):\n        return x\n", "\n\nx\ty  z ",
                "caf\u00e9 \u4e2d\u6587 \U0001f600")


def _write_tokenizer_json(out_dir: Path, sp) -> bool:
    """Also write tokenizer.json (fast tokenizers, vLLM, LMDeploy) when transformers can build it, and
    only if it reproduces sentencepiece's ids on a few probe texts."""
    path = out_dir / "tokenizer.json"
    path.unlink(missing_ok=True)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out_dir))
        backend = tok.backend_tokenizer
    except Exception as exc:  # noqa: BLE001 - optional file; tokenizer.model alone is enough
        logger.info("tokenizer.json not written (%s)", exc)
        return False
    bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
    if any(backend.encode(t).ids != bos + sp.encode(t) for t in _PROBE_TEXTS):
        logger.warning("tokenizer.json not written: transformers' conversion does not reproduce the ids")
        return False
    backend.save(str(path))
    return True


def find_tokenizer(cfg, ckpt_dir=None) -> str | None:
    """The tokenizer of a checkpoint: its own copy (`<ckpt>/tokenizer.model`, saved with every
    checkpoint of a run that has `data.tokenizer_path`), else the config's path if it still exists."""
    if ckpt_dir is not None and (Path(ckpt_dir) / layout.TOKENIZER).is_file():
        return str(Path(ckpt_dir) / layout.TOKENIZER)
    path = cfg.data.tokenizer_path if cfg is not None else None
    return path if path and Path(path).is_file() else None
