"""Config files that inherit from other config files (internlm/config/files.py): InternEvo's
`with read_base():` blocks and mmengine's `_base_` lists, on small files generated in tmp folders."""

import sys
import textwrap
from pathlib import Path

import pytest

from internlm.config import ConfigError, load_config
from internlm.config.files import read_raw

MODEL = """\
model_type = "INTERNLM2_PUBLIC"
VOCAB_SIZE = 128
model = dict(num_attention_heads=4, num_kv_attention_heads=2, hidden_size=64, num_layers=4, vocab_size=VOCAB_SIZE,
             dtype="torch.float32", checkpoint=0.5)
parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"))
"""
RUNTIME = """\
enable_tb = True
cudnn_deterministic = False
grad_scaler = dict(fp16=dict(initial_scale=2**16, min_scale=1, growth_interval=1000), growth_factor=2)
"""


def write(root: Path, files: dict) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def error_of(path, *overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_internevo_layout_absolute_imports_from_any_working_directory(tmp_path, monkeypatch):
    """InternEvo's configs/demo.py: `from internlm.utils.utils import read_base` (a package this
    project does not have) and absolute `configs._base_...` imports, read from elsewhere."""
    repo = tmp_path / "InternEvo"
    write(repo, {
        "configs/_base_/default_runtime.py": RUNTIME,
        "configs/_base_/models/internlm2_tiny.py": MODEL,
        "configs/demo.py": """\
            # Copyright (c) InternLM. All rights reserved.
            from internlm.utils.utils import read_base

            with read_base():
                from configs._base_.default_runtime import *  # noqa: F401
                from configs._base_.models.internlm2_tiny import *  # noqa: F401

            JOB_NAME = "7b_train"
            SEQ_LEN = 64
            data = dict(seq_len=SEQ_LEN, micro_num=4, micro_bsz=2, total_steps=20)
            model["num_layers"] = 2  # an inherited value changed in place
            """,
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = set(sys.modules)
    cfg = load_config(repo / "configs" / "demo.py")
    assert (cfg.JOB_NAME, cfg.model_type, cfg.data.seq_len, cfg.data.micro_num) == ("7b_train", "INTERNLM2_PUBLIC",
                                                                                     64, 4)
    assert (cfg.model.num_layers, cfg.model.num_kv_attention_heads, cfg.model.checkpoint) == (2, 2, 0.5)
    assert cfg.enable_tb is True and cfg.grad_scaler.fp16.initial_scale == 2**16
    assert cfg.user_vars == {"VOCAB_SIZE": 128, "SEQ_LEN": 64}
    # nothing was imported as a module: no `configs` package, no `internlm.utils`
    assert not {m for m in set(sys.modules) - before if m.startswith(("configs", "internlm.utils"))}
    # the base was not changed by the config that changed its copy
    assert read_raw(repo / "configs" / "_base_" / "models" / "internlm2_tiny.py")["model"]["num_layers"] == 4


def test_relative_imports_named_imports_and_the_mmengine_spelling(tmp_path):
    write(tmp_path, {
        "sizes.py": "HIDDEN = 64\nLAYERS = 3\nHEADS = 4\n_PRIVATE = 1\n",
        "_base_/models/tiny.py": MODEL,
        "base_cfg.py": RUNTIME,
        "sub/child.py": """\
            from mmengine.config import read_base

            with read_base():
                from ..base_cfg import *
                from ..sizes import HIDDEN as WIDTH, LAYERS
                from .._base_.models.tiny import model, model_type

            model = dict(model, hidden_size=WIDTH, num_layers=LAYERS)
            """,
    })
    cfg = load_config(tmp_path / "sub" / "child.py")
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.vocab_size) == (64, 3, 128)
    assert cfg.user_vars == {"WIDTH": 64, "LAYERS": 3}  # only the names imported, under their new names
    assert cfg.model_type == "INTERNLM2_PUBLIC" and cfg.cudnn_deterministic is False


def test_two_configs_whose_bases_share_a_name_see_their_own(tmp_path):
    """No module cache between reads: `from .base import *` in two folders, in one process."""
    for width in (32, 64):
        write(tmp_path / f"w{width}", {
            "base.py": MODEL.replace("hidden_size=64", f"hidden_size={width}"),
            "cfg.py": "from internlm.utils.utils import read_base\nwith read_base():\n    from .base import *\n",
        })
    assert load_config(tmp_path / "w32" / "cfg.py").model.hidden_size == 32
    assert load_config(tmp_path / "w64" / "cfg.py").model.hidden_size == 64
    assert load_config(tmp_path / "w32" / "cfg.py").model.hidden_size == 32


def test_read_base_errors_name_the_file_and_line(tmp_path):
    write(tmp_path, {
        "missing.py": "from internlm.utils.utils import read_base\nwith read_base():\n"
                      "    from configs._base_.nowhere import *\n",
        "not_import.py": "from internlm.utils.utils import read_base\nwith read_base():\n    X = 1\n",
        "no_name.py": "from internlm.utils.utils import read_base\nwith read_base():\n    from .b import missing\n",
        "b.py": MODEL,
        "cycle_a.py": "from internlm.utils.utils import read_base\nwith read_base():\n    from .cycle_b import *\n",
        "cycle_b.py": "from internlm.utils.utils import read_base\nwith read_base():\n    from .cycle_a import *\n",
        "bad_base.py": "from internlm.utils.utils import read_base\nwith read_base():\n    from .broken import *\n",
        "broken.py": "model = dict(\n",
    })
    msg = error_of(tmp_path / "missing.py")
    assert "missing.py line 3" in msg and "'configs._base_.nowhere'" in msg and "configs/_base_/nowhere.py" in msg
    assert "not_import.py line 3" in error_of(tmp_path / "not_import.py")
    assert "has no name 'missing'" in error_of(tmp_path / "no_name.py")
    msg = error_of(tmp_path / "cycle_a.py")
    assert "cycle" in msg and "cycle_a.py" in msg and "cycle_b.py" in msg
    assert "syntax error in config file" in error_of(tmp_path / "bad_base.py") and "broken.py" in error_of(
        tmp_path / "bad_base.py")


def test_base_lists_merge_dicts_key_by_key(tmp_path):
    write(tmp_path, {
        "model.py": MODEL,
        "runtime.yaml": "seed: 7\nadam: {lr: 0.001, weight_decay: 0.1}\n",
        "child.py": """\
            _base_ = ["model.py", "runtime.yaml"]
            model = dict(num_layers=2)                       # merged into the base's model
            adam = dict(_delete_=True, lr=0.0003)            # replaces the base's adam
            """,
        "dup.py": "_base_ = ['model.py', 'model.py']\n",
        "nofile.py": "_base_ = 'nowhere.py'\n",
        "yaml_child.yaml": "_base_: model.py\nmodel: {hidden_size: 32}\n",
    })
    cfg = load_config(tmp_path / "child.py")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_kv_attention_heads) == (2, 64, 2)
    assert cfg.seed == 7 and cfg.adam.lr == 3e-4 and cfg.adam.weight_decay == 0.01  # the default, not 0.1
    assert "'model_type' is set by two of its _base_ files, model.py and model.py" in error_of(tmp_path / "dup.py")
    assert "nowhere.py" in error_of(tmp_path / "nofile.py")
    assert load_config(tmp_path / "yaml_child.yaml").model.hidden_size == 32
