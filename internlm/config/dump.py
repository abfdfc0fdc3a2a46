"""Writing a config: the resolved `TrainConfig` as YAML (the run folder's and each checkpoint's config.yaml)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from internlm.config.load import to_dict


def _yaml_ready(value):
    if isinstance(value, dict):
        return {str(k): _yaml_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_ready(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # e.g. a torch.dtype held by a user variable


def config_to_yaml_str(cfg) -> str:
    """Every key with the value the run used (InternEvo keys without effect only when set); reading it
    back with load_config gives the same config."""
    return yaml.safe_dump(_yaml_ready(to_dict(cfg)), sort_keys=False, default_flow_style=False, width=120)


def dump_yaml(cfg, path) -> None:
    """Write the config as YAML atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = config_to_yaml_str(cfg)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
