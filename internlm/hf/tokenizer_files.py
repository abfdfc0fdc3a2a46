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
    legacy=False): then it gives sentencepiece's ids exactly, also for texts starting with spaces.
    A tokenizer with InternLM's chat pieces (<|im_start|>, <|im_end|>) gets them as special tokens and
    InternLM's chat template, so `apply_chat_template` gives the ids tools/tokenizer.py writes for
    chat data. As in InternLM's released tokenizers (and transformers' default), the bos/eos strings
    in a text are the special tokens (the template spells bos as text); sentencepiece, and so the
    training data, keeps a literal "</s>" as text.
    Returns the bos/eos/pad/unk ids, and "im_end" when the chat pieces are there."""
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
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "sp_model_kwargs": {},
        "model_max_length": model_max_length,
    }
    chat = _chat_ids(sp, spm_model)
    if chat:
        from internlm.data.chat import CHAT_TEMPLATE, CHAT_TOKENS

        if [sp.id_to_piece(i) for i in chat] != list(CHAT_TOKENS):
            _name_pieces(spm_model, out_dir / "tokenizer.model", dict(zip(chat, CHAT_TOKENS)))

        tok_cfg["added_tokens_decoder"] = {
            str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, piece in zip(chat, CHAT_TOKENS)}
        tok_cfg["additional_special_tokens"] = list(CHAT_TOKENS)
        tok_cfg["chat_template"] = CHAT_TEMPLATE
        special["additional_special_tokens"] = tok_cfg["additional_special_tokens"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    _write_tokenizer_json(out_dir, sp)
    out = {k: (v if v >= 0 else None) for k, v in ids.items()}
    if chat:
        out["im_end"] = chat[1]
    return out


def _chat_ids(sp, spm_model) -> list[int]:
    """[<|im_start|>, <|im_end|>] ids when the model has both (as pieces, or as HF added tokens in the
    tokenizer_config.json beside it), else []."""
    from internlm.data.chat import require_chat_tokens
    from internlm.data.tokenized import DataFormatError

    try:
        return list(require_chat_tokens(sp, spm_model))
    except DataFormatError:
        return []


def _name_pieces(src: Path, dst: Path, names: dict[int, str]) -> None:
    """Write `src` with pieces renamed (id -> text) as user-defined (atomic) pieces: chat tokens that
    were HF added tokens over unused pieces become pieces of the exported model, so transformers finds
    them in the vocabulary at the same ids instead of appending new ones."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(src.read_bytes())
    for i, text in names.items():
        proto.pieces[i].piece = text
        proto.pieces[i].type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    dst.write_bytes(proto.SerializeToString())


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
