"""InternEvo's config keys and defaults here: storage prefixes, `monitor.alert`, `enable_tb` /
`tensorboard_folder`, the defaults taken from InternEvo and the documented differences."""

import re

import pytest

from internlm.config import ConfigError, config_from_dict, load_config
from internlm.config.schema import key_at
from tests.helpers import ROOT, run_python, write_config


def tiny(**sections):
    raw = {"model": dict(num_attention_heads=4, hidden_size=64, num_layers=2, vocab_size=128), "data": dict(seq_len=32)}
    for name, value in sections.items():
        raw[name] = {**raw[name], **value} if isinstance(value, dict) and name in raw else value
    return raw


def error_of(raw) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    message = str(info.value)
    assert "\n" not in message and message[-1] in ".?"
    return message


# ---- storage prefixes ----------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["boto3:", "oss2:", "volc:", "s3:"])
def test_object_store_save_folder_is_refused_naming_the_key(prefix):
    folder = f"{prefix}s3://bucket.10.0.0.1/internlm/ckpt" if prefix != "s3:" else "s3://bucket/internlm/ckpt"
    msg = error_of(tiny(ckpt=dict(enable_save_ckpt=True, save_ckpt_folder=folder)))
    assert msg.startswith(f"config key 'ckpt.save_ckpt_folder'={folder!r} names remote storage ({prefix}")
    assert "local or shared-filesystem path" in msg


@pytest.mark.parametrize("section,key", [("ckpt", "load_ckpt_info"), ("ckpt", "stop_file_path"),
                                         ("ckpt", "load_ckpt_folder"), ("monitor", "run_folder"),
                                         ("monitor", "alert"), ("", "tensorboard_folder"), ("data", "train_folder")])
def test_every_path_key_refuses_object_stores(section, key):
    path = "oss2:s3://bucket/x"
    if key == "load_ckpt_info":
        raw, name = tiny(ckpt=dict(load_ckpt_info=dict(path=path))), "ckpt.load_ckpt_info.path"
    elif key == "alert":
        raw, name = tiny(monitor=dict(alert=dict(alert_file_path=path))), "monitor.alert.alert_file_path"
    elif not section:
        raw, name = tiny(tensorboard_folder=path), "tensorboard_folder"
    else:
        raw, name = tiny(**{section: {key: path}}), f"{section}.{key}"
    assert error_of(raw).startswith(f"config key '{name}'='oss2:s3://bucket/x' names remote storage (oss2:)")


def test_local_prefix_is_dropped():
    cfg = config_from_dict(tiny(ckpt=dict(save_ckpt_folder="local:/tmp/ckpt"), tensorboard_folder="local:tb",
                                monitor=dict(run_folder="local:runs/x")))
    assert (cfg.ckpt.save_ckpt_folder, cfg.tensorboard_folder, cfg.monitor.run_folder) == ("/tmp/ckpt", "tb",
                                                                                           "runs/x")


def test_train_py_stops_on_an_object_store_folder_before_making_anything(tmp_path):
    cfg = write_config(tmp_path)
    proc = run_python([ROOT / "train.py", "--config", cfg, "ckpt.save_ckpt_folder='oss2:s3://bucket/ckpt'"],
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config key 'ckpt.save_ckpt_folder'='oss2:s3://bucket/ckpt' names remote storage (oss2:)" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.py"]  # no folder named 'oss2:...', no run folder


# ---- monitor.alert, enable_tb, tensorboard_folder ---------------------------------------------------

def test_alert_section_keys_and_notices():
    cfg = config_from_dict(tiny(monitor=dict(alert=dict(enable_feishu_alert=True, feishu_alert_address="http://h/x",
                                                        light_monitor_address=None, alert_file_path="local:a.log"))))
    a = cfg.monitor.alert
    assert (a.enable_feishu_alert, a.feishu_alert_address, a.alert_file_path) == (True, "http://h/x", "a.log")
    assert cfg.notices == ()  # light_monitor_address=None (InternEvo's stock configs) is no request
    cfg = config_from_dict(tiny(monitor=dict(alert=dict(light_monitor_address="10.0.0.1:8080"))))
    assert cfg.notices == ("monitor.alert.light_monitor_address has no effect here: no heartbeats are sent, only "
                           "Feishu alerts",)
    msg = error_of(tiny(monitor=dict(alert=dict(feishu_alert_address="open.feishu.cn/hook"))))
    assert msg == ("config key 'monitor.alert.feishu_alert_address' must be an http:// or https:// URL (a Feishu "
                   "bot webhook), got 'open.feishu.cn/hook'.")
    msg = error_of(tiny(monitor=dict(alert=dict(enable_feishu_alerts=True))))
    assert "monitor.alert.enable_feishu_alerts" in msg and "did you mean 'monitor.alert.enable_feishu_alert'?" in msg


def test_tensorboard_keys():
    cfg = config_from_dict(tiny())
    assert cfg.enable_tb is True and cfg.tensorboard_folder is None
    cfg = config_from_dict(tiny(enable_tb=False, tensorboard_folder="/tmp/tb"))
    assert cfg.enable_tb is False and cfg.tensorboard_folder == "/tmp/tb"


# ---- defaults ------------------------------------------------------------------------------------

def test_defaults_are_internevos():
    """InternEvo's launch.py defaults, for the keys a config leaves out."""
    cfg = config_from_dict(tiny())
    assert cfg.JOB_NAME == "AnonymousJob" and cfg.model_type == "INTERNLM" and cfg.model.no_bias is False
    assert cfg.model.mlp_ratio == 4.0 and cfg.model.multiple_of == 256 and cfg.model.layer_norm_epsilon == 1e-5
    assert (cfg.data.micro_num, cfg.data.valid_micro_num, cfg.data.valid_every, cfg.data.min_length) == (1, 1, 0, 0)
    assert cfg.hybrid_zero_optimizer.clip_grad_norm == 0.0 and cfg.hybrid_zero_optimizer.overlap_sync_param is False
    assert cfg.ckpt.enable_save_ckpt is False and cfg.ckpt.auto_resume is True and cfg.ckpt.async_upload is False
    assert cfg.parallel.zero1.size == -1 and cfg.parallel.tensor.mode == "mtp" and cfg.model.use_flash_attn is True
    assert (cfg.seed, cfg.cudnn_benchmark, cfg.cudnn_deterministic) == (1024, False, False)
    a = cfg.monitor.alert
    assert (a.enable_feishu_alert, a.feishu_alert_address, a.light_monitor_address, a.alert_file_path) == (
        False, None, None, None)
    # valid_micro_num follows micro_num; saving follows the folder (InternEvo: True, and then a folder is needed)
    assert config_from_dict(tiny(data=dict(micro_num=3))).data.valid_micro_num == 3
    assert config_from_dict(tiny(ckpt=dict(save_ckpt_folder="/tmp/c"))).ckpt.enable_save_ckpt is True
    assert config_from_dict(tiny(ckpt=dict(save_ckpt_folder="/tmp/c", enable_save_ckpt=False))).ckpt.enable_save_ckpt \
        is False


def test_internevo_7b_sft_shape_without_model_type_builds_internlm_v1(tmp_path):
    """InternEvo's configs/7B_sft.py sets no model_type: InternEvo builds InternLM (v1), so do we."""
    path = tmp_path / "7B_sft.py"
    path.write_text("model = dict(num_attention_heads=32, hidden_size=4096, num_layers=32, vocab_size=103168, "
                    "mlp_ratio=8 / 3)\n")
    cfg = load_config(path)
    assert cfg.model_type == "INTERNLM" and cfg.model.no_bias is False and cfg.model.intermediate_size == 11008


DIFFERENCES = ("model.dtype", "model.no_bias", "model.max_position_embeddings",
               "hybrid_zero_optimizer.overlap_sync_grad", "ckpt.enable_save_ckpt", "tensorboard_folder",
               "monitor.loss_spike_factor")


def test_usage_doc_lists_each_deliberate_difference():
    doc = (ROOT / "doc" / "usage.md").read_text()
    section = doc.split("### Defaults that differ from InternEvo's", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w.]+)` \|", section, flags=re.M))
    assert listed == set(DIFFERENCES), listed ^ set(DIFFERENCES)
    for name in DIFFERENCES:
        key_at(name)  # every listed key exists
    assert "`torch.bfloat16`" in section and "`torch.float16`" in section


def test_migration_guide_is_linked_and_covers_the_topics():
    readme = (ROOT / "README.md").read_text()
    assert "[doc/migrate_from_internevo.md](doc/migrate_from_internevo.md)" in readme
    guide = (ROOT / "doc" / "migrate_from_internevo.md").read_text()
    for heading in ("## What carries over unchanged", "## What differs, and why", "## Checkpoints"):
        assert heading in guide
    for word in ("read_base", "stop_file_path", "feishu_alert_address", "--profiling", "oss2:", "enable_tb",
                 "model_tp{t}_pp{p}.pt", "ckpt_type=\"llama\""):
        assert word in guide, word
