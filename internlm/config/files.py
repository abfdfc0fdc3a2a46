"""Reading config files: .py (executed, InternEvo style) and .yaml, and the two ways a config inherits
from other config files.

1. `with read_base():` (mmengine's pure-Python style; InternEvo's configs/demo.py does it after
   `from internlm.utils.utils import read_base`):

       from internlm.utils.utils import read_base
       with read_base():
           from configs._base_.default_runtime import *     # absolute: searched from the config upwards
           from ._base_.models.internlm2_7B import *         # relative: from the config's own folder
           from .sizes import HIDDEN_SIZE, NUM_LAYER         # only some names
       model["num_layers"] = 4                               # the inherited values can be changed

   The lines inside the block name other config files, not Python modules: each is read here (with its
   own bases), and its names are bound in the config as `from ... import` would bind them, as fresh
   copies. The `read_base` import itself (from internlm.utils.utils, internlm.utils, mmengine.config or
   mmengine) needs no such package: it is taken out before the file runs. An absolute name `a.b.c` is
   the file `a/b/c.py` under the config's folder, under one of the folders above it, or under the
   working directory, whichever comes first.

2. `_base_ = "base.py"` or a list of files (mmengine's older style), relative to the config's folder:
   the bases' names are read first (two bases may not set the same name), then the config's own names
   are merged in: a dict is merged key by key (recursively) unless it holds `_delete_=True`, which
   replaces the base's dict; any other value replaces the base's.

Nothing is imported as a module and nothing is left in `sys.modules`, so two configs that inherit
from different files of the same name, read in one process, never see each other's values.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import traceback
import types
from pathlib import Path

import yaml

from internlm.config import checks
from internlm.config.checks import ConfigError

_READ_BASE_MODULES = ("internlm.utils.utils", "internlm.utils", "mmengine.config", "mmengine")
_BASES_CALL = "__internlm_read_base__"


@contextlib.contextmanager
def read_base():
    """The marker of an inheritance block; the block's imports are done by `read_python` itself."""
    yield


def _fresh(value):
    """A copy of the containers of an inherited value (modules, functions and the like as they are)."""
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_fresh(v) for v in value)
    if isinstance(value, set):
        return {_fresh(v) for v in value}
    return value


def _public(namespace: dict) -> dict:
    """What `from module import *` binds: `__all__`, else every name without a leading underscore."""
    names = namespace.get("__all__")
    if names is None:
        names = [n for n in namespace if not n.startswith("_")]
    return {n: namespace[n] for n in names if n in namespace}


# ---- with read_base(): ---------------------------------------------------------------------------

def _is_read_base(expr, local_names: set) -> bool:
    if not isinstance(expr, ast.Call):
        return False
    fn = expr.func
    return (isinstance(fn, ast.Name) and fn.id in local_names) or (isinstance(fn, ast.Attribute)
                                                                   and fn.attr == "read_base")


def _find_base(path: Path, node: ast.ImportFrom) -> Path:
    """The file an import line inside `with read_base():` names."""
    parts = (node.module or "").split(".") if node.module else []
    if node.level:
        root = path.parent
        for _ in range(node.level - 1):
            root = root.parent
        roots = [root]
    else:
        roots = [path.parent, *path.parent.parents, Path.cwd()]
    shown = "." * node.level + (node.module or "")
    if not parts:
        raise ConfigError(f"config file {path} line {node.lineno}: 'from {shown} import ...' inside read_base() "
                          f"must name a config file (e.g. 'from .base import *').")
    for root in roots:
        candidate = root.joinpath(*parts[:-1], parts[-1] + ".py")
        if candidate.is_file():
            return candidate
    where = "in the config's folder" if node.level else "next to the config, in the folders above it or in the " \
                                                        "working directory"
    raise ConfigError(f"config file {path} line {node.lineno}: cannot find the base config '{shown}' (looked for "
                      f"{'/'.join(parts)}.py {where}).")


def _inline_bases(path: Path, tree: ast.Module, chain: tuple) -> tuple[list[dict], set]:
    """Replace each top-level `with read_base():` block of `tree` by a call that binds the names its
    imports name; take out the import of `read_base`. Returns (the names of each block, the local
    names `read_base` was imported as)."""
    local_names, blocks, body = set(), [], []
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module in _READ_BASE_MODULES and not stmt.level:
            kept = [a for a in stmt.names if a.name != "read_base"]
            local_names |= {a.asname or a.name for a in stmt.names if a.name == "read_base"}
            if kept:
                stmt.names = kept
                body.append(stmt)
            continue
        if isinstance(stmt, ast.With) and len(stmt.items) == 1 and _is_read_base(stmt.items[0].context_expr,
                                                                                    local_names | {"read_base"}):
            names = {}
            for line in stmt.body:
                if not isinstance(line, ast.ImportFrom):
                    raise ConfigError(f"config file {path} line {line.lineno}: only 'from ... import ...' lines "
                                      f"naming other config files may stand inside 'with read_base():'.")
                base = _find_base(path, line)
                values = _namespace(base, chain)
                if len(line.names) == 1 and line.names[0].name == "*":
                    names.update(_public(values))
                    continue
                for alias in line.names:
                    if alias.name not in values:
                        raise ConfigError(f"config file {path} line {line.lineno}: the base config {base} has no "
                                          f"name '{alias.name}'.")
                    names[alias.asname or alias.name] = values[alias.name]
            call = ast.Expr(ast.Call(ast.Name(_BASES_CALL, ast.Load()), [ast.Constant(len(blocks))], []))
            body.append(ast.copy_location(call, stmt))
            blocks.append(names)
            continue
        body.append(stmt)
    tree.body = body
    ast.fix_missing_locations(tree)
    return blocks, local_names


# ---- _base_ = [...] ------------------------------------------------------------------------------

def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for name, value in child.items():
        if isinstance(value, dict) and value.get("_delete_"):
            out[name] = {k: v for k, v in value.items() if k != "_delete_"}
        elif isinstance(value, dict) and isinstance(out.get(name), dict):
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


def _with_listed_bases(path: Path, own: dict, chain: tuple) -> dict:
    listed = own.pop("_base_", None)
    if listed is None:
        return own
    files = [listed] if isinstance(listed, str) else listed
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"config file {path}: _base_ must be a file name or a list of file names, got "
                          f"{checks.show(listed)}.")
    merged, owner = {}, {}
    for name in files:
        base = (path.parent / name)
        if not base.is_file():
            raise ConfigError(f"config file {path}: its _base_ file {name!r} does not exist (looked for {base}).")
        for key, value in _public(_namespace(base, chain)).items():
            if key in merged:
                raise ConfigError(f"config file {path}: '{key}' is set by two of its _base_ files, {owner[key]} and "
                                  f"{name}; set it in one of them only.")
            merged[key], owner[key] = _fresh(value), name
    return _merge(merged, own)


# ---- files ---------------------------------------------------------------------------------------

def _exec_python(path: Path, chain: tuple) -> dict:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"syntax error in config file {path} at line {exc.lineno}: {exc.msg}.") from None
    blocks, local_names = _inline_bases(path, tree, chain)
    namespace = {"__name__": "__internlm_config__", "__file__": str(path), "__builtins__": builtins}

    def bind(index: int) -> None:
        namespace.update({k: _fresh(v) for k, v in blocks[index].items()})

    namespace[_BASES_CALL] = bind
    for name in local_names | {"read_base"}:  # also serves a `with read_base():` below the top level
        namespace[name] = read_base
    try:
        exec(compile(tree, str(path), "exec"), namespace)  # noqa: S102 - a config file is the user's code
    except SystemExit as exc:  # a config that exits must not end the run "successfully" with nothing done
        raise ConfigError(f"config file {path} called sys.exit({exc.code!r}) while being read; a config only "
                          f"assigns values.") from None
    except ConfigError:
        raise
    except Exception as exc:  # trusted user code; report where it failed, not a traceback
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        where = f" at line {frames[-1].lineno}" if frames else ""
        raise ConfigError(f"config file {path} failed{where}: {type(exc).__name__}: {exc}.") from None
    namespace.pop(_BASES_CALL, None)
    for name in local_names | {"read_base"}:  # the marker is no name the config set
        if namespace.get(name) is read_base:
            del namespace[name]
    return namespace


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML error in config file {path}{where}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of names to values, got {checks.show(data)}.")
    return data


def _namespace(path: Path, chain: tuple = ()) -> dict:
    """Every name a config file defines, its bases included (before any filtering)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved):], resolved))
        raise ConfigError(f"config files inherit from each other in a cycle: {cycle}.")
    chain = (*chain, resolved)
    suffix = path.suffix.lower()
    if suffix == ".py":
        own = _exec_python(path, chain)
    elif suffix in (".yaml", ".yml"):
        own = _read_yaml(path)
    else:
        raise ConfigError(f"config file {str(path)!r} must be a .py, .yaml or .yml file.")
    return _with_listed_bases(path, own, chain)


def read_raw(path) -> dict:
    """The names a config file sets, its bases included. Of a .py file, names starting with '_',
    modules, functions and classes are left out."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    if path.suffix.lower() not in (".py", ".yaml", ".yml"):
        raise ConfigError(f"config file {str(path)!r} must be a .py, .yaml or .yml file.")
    raw = _namespace(path)
    if path.suffix.lower() != ".py":
        return raw
    return {
        name: value for name, value in raw.items()
        if not name.startswith("_")
        and not isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))
    }
