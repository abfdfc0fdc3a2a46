"""An offline instruction set for the finetuning demo (tools/demo.py --sft), from the standard library.

Each example shows the ``def`` line of a real stdlib function and asks what it defines; the answer
names three properties the line decides, in a fixed sentence:

    user:       What does this line define?
                def _quote(string, safe='/', encoding=None):
    assistant:  a private function with default values

- the kind: ``method`` (first parameter ``self``), ``class method`` (``cls``), else ``function``;
- the visibility: ``special`` (``__name__``), ``private`` (``_name``), else ``public``;
- ``with default values`` when a parameter has a default, else ``without default values``.

Answering takes what finetuning teaches: the chat format, reading the properties off an unseen line,
the exact wording, and stopping at ``<|im_end|>``. The test lines come from modules none of the
training lines come from. Everything is deterministic (CRC32 orders, no random state).
"""
from __future__ import annotations

import ast
import sysconfig
import zlib
from pathlib import Path

from internlm.data.demo import _stdlib_files

__all__ = ["sft_examples", "describe", "QUESTION"]

QUESTION = "What does this line define?"
MAX_LINE = 100  # characters of the longest line shown


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def describe(node: ast.FunctionDef) -> str:
    """The answer for a function definition: kind, visibility and defaults."""
    args = node.args
    params = [a.arg for a in (*args.posonlyargs, *args.args)]
    kind = {"self": "method", "cls": "class method"}.get(params[0] if params else "", "function")
    name = node.name
    visibility = "special" if name.startswith("__") and name.endswith("__") else (
        "private" if name.startswith("_") else "public")
    has_defaults = bool(args.defaults) or any(d is not None for d in args.kw_defaults)
    return f"a {visibility} {kind} {'with' if has_defaults else 'without'} default values"


def _module_examples(rel: str, source: str) -> list[dict]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out, seen = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        line = lines[node.lineno - 1].strip()
        if not (line.startswith("def ") and line.endswith(":") and len(line) <= MAX_LINE) or line in seen:
            continue  # multi-line signatures, one-line bodies, repeats
        seen.add(line)
        out.append({"messages": [{"role": "user", "content": f"{QUESTION}\n{line}"},
                                 {"role": "assistant", "content": describe(node)}]})
    return out


def sft_examples(num_test: int = 1000, stdlib: str | None = None) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} chat records. Modules are taken in CRC32 order; the first ones
    give the test set until it holds `num_test` examples, the rest the training set (shuffled by CRC)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    order = sorted(_stdlib_files(root), key=lambda rel: (_crc(rel), rel))
    split = {"train": [], "test": []}
    for rel in order:
        try:
            source = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        examples = _module_examples(rel, source)
        split["test" if len(split["test"]) < num_test else "train"].extend(examples)
    split["train"].sort(key=lambda r: _crc(r["messages"][0]["content"]))
    return split
