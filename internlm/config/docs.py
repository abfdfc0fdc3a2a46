"""The key table, generated from the schema: doc/config_keys.md and `python train.py --config-keys`.

    python -m internlm.config.docs > doc/config_keys.md
"""
from __future__ import annotations

from internlm.config.schema import DERIVED, REQUIRED, TrainConfig, is_section, keys_of

HEADER = """# Config keys

Generated from `internlm/config/schema.py` by `python -m internlm.config.docs > doc/config_keys.md`
(a test fails when this page and the schema differ). `python train.py --config-keys` prints the same
table. *derived*: the default is computed from other keys (the description says how); *required*: no
default. Keys marked *no effect* are InternEvo's: accepted so that its configs load unchanged, and a run
whose config sets one prints a notice naming it.
"""


def _default(info) -> str:
    if info.default is REQUIRED:
        return "*required*"
    if info.default is DERIVED:
        return "*derived*"
    value = info.default_value()
    if isinstance(value, float) and value >= 1024 and value.is_integer():
        return f"`{int(value)}`"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return f"`{value!r}`"


def _type(info) -> str:
    return info.kind + (" or None" if info.optional else "")


def rows(cls=TrainConfig, prefix: str = ""):
    """(dotted key, type, default, description) for every key, sections in schema order."""
    for name, entry in keys_of(cls).items():
        path = f"{prefix}.{name}" if prefix else name
        if is_section(entry):
            yield from rows(entry, path)
            continue
        doc = entry.doc + (f" (*no effect*: {entry.inert})" if entry.inert else "")
        doc += f" (*deprecated*: mapped to {entry.legacy})" if entry.legacy else ""
        if entry.choices:
            doc += " [" + ", ".join(entry.choices) + "]"
        yield path, _type(entry), _default(entry), doc


def markdown() -> str:
    lines = [HEADER, "| key | type | default | description |", "|---|---|---|---|"]
    for path, kind, default, doc in rows():
        lines.append(f"| `{path}` | {kind} | {default} | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def plain() -> str:
    """The table for a terminal."""
    out = []
    for path, kind, default, doc in rows():
        out.append(f"{path:44s} {kind:14s} {default.strip('`*'):>12s}  {doc}")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
