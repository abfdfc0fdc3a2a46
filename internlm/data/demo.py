"""An offline demo corpus, and the text-side helpers that build it (and serve tools/*.py).

Nothing is downloaded: the corpus is the Python standard library of the running interpreter.
English ("en") is its docstrings, code ("code") is its source in chunks of ~100 lines. That is a few MB
of real, varied text on every machine with Python, enough to watch a small model learn.

    prepare_demo_data(out_dir)  ->  out_dir/raw/{train,valid}_{en,code}.jsonl      raw text
                                    out_dir/tokenizer/tokenizer.model             sentencepiece BPE
                                    out_dir/{train,valid}/{en,code}/stdlib.bin    + .bin.meta
                                    out_dir/DONE                                  written last

The text helpers it uses (`iter_texts`, `train_sentencepiece`, `encode_texts`) are in text.py.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

from internlm.data.text import train_sentencepiece
from internlm.data.tokenized import write_bin
from internlm.log import logger, setup_logging

__all__ = ["stdlib_corpus", "prepare_demo_data"]

# ----------------------------------------------------------------------------------------------------
# The standard-library corpus

# Folders whose text is not useful prose/code to learn from (tests, vendored or generated tables).
_SKIP_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
    "lib2to3", "turtledemo", "encodings", "pydoc_data",
}
CODE_CHUNK_LINES = 100
MIN_DOCSTRING_CHARS = 16


def _stdlib_files(stdlib: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                found.append((Path(dirpath) / name).relative_to(stdlib).as_posix())
    return sorted(found)


def _read_module(path: Path):
    """(source, docstrings) of a module, or None if it cannot be read or parsed."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                docs.append(doc)
    return source, docs


def _code_chunks(source: str) -> list[str]:
    lines = source.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + CODE_CHUNK_LINES]) for i in range(0, len(lines), CODE_CHUNK_LINES)]
    return [c for c in chunks if c.strip()]


def stdlib_corpus(max_mb: float = 6.0, valid_fraction: float = 0.02, stdlib: str | None = None) -> dict:
    """Select the demo corpus: {"train": {"en": [...], "code": [...]}, "valid": {...}} of texts.

    Files are visited in a fixed pseudo-random order (CRC32 of the path relative to the stdlib), so
    a small budget still samples the whole library rather than its first letters. Docstrings (deduplicated)
    fill up to half of `max_mb`, code chunks the rest. The hold-out is by source file, from the front of
    that order, until each type has `valid_fraction` of its bytes held out: no text of a validation file is
    trained on (apart from docstrings that other modules repeat verbatim).
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    order = sorted(_stdlib_files(root), key=lambda rel: (zlib.crc32(rel.encode()), rel))
    budget = int(max_mb * 1e6)
    cache: dict[str, tuple | None] = {}

    def module(rel):
        if rel not in cache:
            cache[rel] = _read_module(root / rel)
        return cache[rel]

    en: dict[str, list[str]] = {}
    en_bytes = 0
    seen = set()
    for rel in order:
        if en_bytes >= budget // 2:
            break
        parsed = module(rel)
        if parsed is None:
            continue
        for doc in parsed[1]:
            if doc not in seen:
                seen.add(doc)
                en.setdefault(rel, []).append(doc)
                en_bytes += len(doc.encode())

    code: dict[str, list[str]] = {}
    code_bytes = 0
    for rel in order:
        if code_bytes >= budget - en_bytes:
            break
        parsed = module(rel)
        if parsed is None:
            continue
        code[rel] = _code_chunks(parsed[0])
        code_bytes += sum(len(c.encode()) for c in code[rel])

    totals = {"en": en_bytes, "code": code_bytes}
    held = {"en": 0, "code": 0}
    valid_files = set()
    for rel in order:
        if all(held[t] >= valid_fraction * totals[t] for t in held):
            break
        valid_files.add(rel)
        held["en"] += sum(len(d.encode()) for d in en.get(rel, ()))
        held["code"] += sum(len(c.encode()) for c in code.get(rel, ()))

    corpus = {split: {"en": [], "code": []} for split in ("train", "valid")}
    for rel in order:
        split = "valid" if rel in valid_files else "train"
        corpus[split]["en"].extend(en.get(rel, ()))
        corpus[split]["code"].extend(code.get(rel, ()))
    return corpus


# ----------------------------------------------------------------------------------------------------
# prepare_demo_data

_FORMAT_VERSION = 2  # 2: the tokenizer has the chat pieces <|im_start|>, <|im_end|>
TYPES = ("en", "code")
SPLITS = ("train", "valid")


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise preparation between processes on one machine (e.g. several ranks calling it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: callers must not race
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        logger.info(f"demo data: {msg}")


def prepare_demo_data(
    out_dir: str | os.PathLike,
    vocab_size: int = 4000,
    max_mb: float = 6.0,
    valid_fraction: float = 0.02,
    verbose: bool = True,
) -> dict:
    """Build (or reuse) the demo corpus, tokenizer and tokenized train/valid folders under `out_dir`.

    Returns {"train_folder", "valid_folder", "tokenizer_path"} as strings. If `out_dir/DONE` records
    the same parameters (and the same Python, whose stdlib is the corpus), nothing is rebuilt.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "format_version": _FORMAT_VERSION,
        "vocab_size": int(vocab_size),
        "max_mb": float(max_mb),
        "valid_fraction": float(valid_fraction),
        "python": platform.python_version(),
    }
    result = {
        "train_folder": str(out / "train"),
        "valid_folder": str(out / "valid"),
        "tokenizer_path": str(out / "tokenizer" / "tokenizer.model"),
    }
    done = out / "DONE"

    with _file_lock(out / ".prepare.lock"):
        if _is_done(done, params, result):
            _log(verbose, f"reusing {out}")
            return result

        start = time.perf_counter()
        done.unlink(missing_ok=True)
        for name in ("raw", "tokenizer", *SPLITS):
            shutil.rmtree(out / name, ignore_errors=True)

        _log(verbose, f"collecting up to {max_mb:g} MB of stdlib docstrings and source ...")
        corpus = stdlib_corpus(max_mb, valid_fraction)
        raw = out / "raw"
        raw.mkdir()
        stats: dict = {}
        for split in SPLITS:
            for typ in TYPES:
                texts = corpus[split][typ]
                with open(raw / f"{split}_{typ}.jsonl", "w", encoding="utf-8") as f:
                    for text in texts:
                        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                stats[f"{split}/{typ}"] = {"samples": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
        mb = sum(s["bytes"] for s in stats.values()) / 1e6
        _log(verbose, f"corpus: {mb:.2f} MB, " + ", ".join(f"{k} {v['samples']}" for k, v in stats.items()))

        _log(verbose, f"training a {vocab_size}-piece sentencepiece BPE tokenizer ...")
        model = train_sentencepiece(
            [raw / f"train_{typ}.jsonl" for typ in TYPES],
            out / "tokenizer" / "tokenizer",
            vocab_size=vocab_size,
            input_sentence_size=200_000,
        )
        assert str(model) == result["tokenizer_path"]

        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model))
        threads = min(os.cpu_count() or 1, 8)
        for split in SPLITS:
            for typ in TYPES:
                texts = corpus[split][typ]
                if not texts:
                    continue
                ids = sp.encode(texts, num_threads=threads)
                samples = [[sp.bos_id(), *x, sp.eos_id()] for x in ids]
                write_bin(out / split / typ / "stdlib.bin", samples)
                stats[f"{split}/{typ}"]["tokens"] = sum(len(s) for s in samples)
        tokens = {k: v.get("tokens", 0) for k, v in stats.items()}
        _log(verbose, "tokens: " + ", ".join(f"{k} {v}" for k, v in tokens.items()))

        record = {"params": params, "stats": stats, "seconds": round(time.perf_counter() - start, 2)}
        tmp = done.with_name(f"DONE.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, done)
        _log(verbose, f"done in {record['seconds']} s -> {out}")
    return result


def _is_done(done: Path, params: dict, result: dict) -> bool:
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("params") != params:
        return False
    return Path(result["tokenizer_path"]).is_file() and Path(result["train_folder"]).is_dir()


if __name__ == "__main__":
    setup_logging()
    logger.info(str(prepare_demo_data(sys.argv[1] if len(sys.argv) > 1 else "demo_data")))
