"""Config loading, overrides, defaults and validation (internlm/config/) and the shipped configs."""

import copy
import dataclasses
import pickle
import textwrap

import pytest
import torch

from internlm.config import (
    ConfigError,
    ModelConfig,
    TrainConfig,
    config_from_dict,
    config_to_yaml_str,
    dump_yaml,
    load_config,
    to_dict,
    torch_dtype,
    validate,
)
from internlm.config.docs import markdown
from internlm.config.schema import PipelineConfig, ZeroConfig
from internlm.parallel_dims import shard_group_size
from tests.helpers import ROOT, run_python

CONFIGS = ROOT / "configs"
SHIPPED = ["demo.py", "7B_sft.py", "7B_isp_sft.py", "1.8B_MoE16_sft.py", "7B_internlm2.py", "8B_internlm3.py",
           "demo_sft.py", "7B_internlm2_sft.py", "tiny_hf_sft.py"]
NO_DATA = ("data.train_folder=None", "data.valid_folder=None", "data.type='tokenized'")


def demo(*overrides):
    return load_config(CONFIGS / "demo.py", NO_DATA + overrides)


def tiny(**sections):
    """A minimal raw config dict; keyword arguments replace or extend sections."""
    raw = {
        "model": dict(num_attention_heads=4, hidden_size=64, num_layers=4, vocab_size=128),
        "data": dict(seq_len=32),
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name].update(value)
        else:
            raw[name] = value
    return raw


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.rstrip()[-1] in ".?", f"not a complete sentence: {message!r}"
    return message


# ------------------------------------------------------------------------------------------ shipped configs

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_round_trips_through_yaml(name, tmp_path):
    cfg = load_config(CONFIGS / name, NO_DATA)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.model, ModelConfig)
    validate(cfg)
    dump_yaml(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("name,world_size", [("demo.py", 1), ("demo.py", 2), ("7B_sft.py", 16),
                                             ("7B_internlm2.py", 8), ("8B_internlm3.py", 8), ("7B_isp_sft.py", 8),
                                             ("7B_internlm2_sft.py", 8)])
def test_shipped_config_fits_a_world_size(name, world_size):
    validate(load_config(CONFIGS / name, NO_DATA), world_size=world_size)


def test_shipped_model_shapes():
    d = demo()
    assert (d.JOB_NAME, d.model_type, d.data.seq_len, d.model.vocab_size) == ("demo", "INTERNLM2_PUBLIC", 256, 4000)
    assert (d.model.num_attention_heads, d.model.num_kv_attention_heads, d.model.head_dim) == (8, 2, 32)
    assert d.model.intermediate_size == 704 and d.model.no_bias is True
    assert (d.data.micro_num, d.data.micro_bsz, d.data.total_steps, d.lr_scheduler.total_steps) == (2, 4, 300, 300)
    assert d.monitor.run_folder == "runs/demo" and d.ckpt.enable_save_ckpt is True

    v1 = load_config(CONFIGS / "7B_sft.py")
    assert v1.model_type == "INTERNLM" and v1.model.intermediate_size == 11008 and v1.model.no_bias is False
    assert v1.model.num_kv_attention_heads == 32 and v1.parallel.zero1.size == 8
    assert v1.ckpt.save_ckpt_folder == "llm_ckpts"  # "local:" prefix dropped

    v2 = load_config(CONFIGS / "7B_internlm2.py")
    assert (v2.model.intermediate_size, v2.model.rope_base, v2.model.max_position_embeddings) == (14336, 1e6, 32768)
    assert v2.parallel.tensor.mode == "msp" and v2.parallel.sequence_parallel is True

    v3 = load_config(CONFIGS / "8B_internlm3.py")
    assert (v3.model.num_layers, v3.model.num_kv_attention_heads, v3.model.head_dim) == (48, 2, 128)
    assert v3.model.rope_scaling == {"type": "dynamic", "factor": 6.0} and v3.model.rope_base == 5e7
    assert v3.model.vocab_size == 128512 and v3.model.tie_word_embeddings is False


def test_demo_loads_as_is_once_its_data_exists(tmp_path, monkeypatch):
    for sub in ("train", "valid"):
        (tmp_path / "demo_data" / sub).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / "demo.py")
    assert cfg.data.train_folder == "demo_data/train"


# ------------------------------------------------------------------------------------------------ overrides

def test_override_value_types():
    cfg = demo("model.num_layers=2", "adam.lr=3e-4", "model.dtype=torch.float32", "model.compile=True",
               "monitor.peak_tflops=None", "JOB_NAME=quick", "data.micro_num=1e1")
    assert cfg.model.num_layers == 2 and isinstance(cfg.model.num_layers, int)
    assert cfg.adam.lr == 3e-4
    assert cfg.model.dtype == "torch.float32"
    assert cfg.model.compile is True and cfg.monitor.peak_tflops is None
    assert cfg.JOB_NAME == "quick" and cfg.monitor.run_folder == "runs/quick"  # derived from JOB_NAME
    assert cfg.data.micro_num == 10
    assert demo('model.dtype="torch.float16"').model.dtype == "torch.float16"
    assert demo("model.dtype=bf16").model.dtype == "torch.bfloat16"  # aliases are canonicalised
    assert demo("model.use_flash_attn=false").model.use_flash_attn is False
    assert demo("JOB_NAME=2024").JOB_NAME == "2024"  # a string key keeps the text
    assert demo("data.tokenizer_path=/tmp/tok.model").data.tokenizer_path == "/tmp/tok.model"


def test_override_none_and_derived_defaults():
    cfg = demo("model.head_dim=None", "model.max_position_embeddings=None", "data.seq_len=4096")
    assert cfg.model.head_dim == 32
    assert cfg.model.max_position_embeddings == 4096  # max(2048, seq_len)


def test_override_tuple_list_and_dict():
    info = "{'path': 'local:/ckpt/10', 'content': ('model', 'optimizer'), 'ckpt_type': 'internevo'}"
    cfg = demo(f"ckpt.load_ckpt_info={info}", "model.rope_scaling={'type': 'dynamic', 'factor': 2}")
    assert cfg.ckpt.load_ckpt_info == {"path": "/ckpt/10", "content": ["model", "optimizer"], "ckpt_type": "internlm"}
    assert cfg.model.rope_scaling == {"type": "dynamic", "factor": 2.0}
    cfg = load_config(CONFIGS / "8B_internlm3.py", ["model.rope_scaling.factor=8.0"])
    assert cfg.model.rope_scaling["factor"] == 8.0


def test_override_nested_shorthand_and_free_dicts():
    cfg = demo("parallel.tensor=2")
    assert to_dict(cfg.parallel.tensor) == {"size": 2, "mode": "mtp"}
    cfg = config_from_dict(tiny(parallel=dict(zero1=4, pipeline=2), data=dict(micro_num=2)),
                           ["parallel.zero1.fsdp=True"])
    assert cfg.parallel.zero1 == ZeroConfig(size=4, fsdp=True) and cfg.parallel.pipeline.size == 2
    cfg = demo("monitor.alert.enable_feishu_alert=False", "MY_VARIABLE=[1, 2]")
    assert cfg.monitor.alert.enable_feishu_alert is False and cfg.user_vars["MY_VARIABLE"] == [1, 2]


def test_override_errors():
    msg = error_of(demo, "model.hiden_size=3")
    assert "'model.hiden_size'" in msg and "did you mean 'model.hidden_size'?" in msg
    msg = error_of(demo, "modle.hidden_size=3")
    assert "'modle'" in msg and "'model'" in msg
    assert "dotted.key=VALUE" in error_of(demo, "model.hidden_size")
    assert "single value" in error_of(demo, "model.hidden_size.x=3")
    assert "'model.num_layers'" in error_of(demo, "model.num_layers=four")


# ---------------------------------------------------------------------------------------------- key checks

def test_unknown_top_level_key():
    msg = error_of(config_from_dict, tiny(modle=dict(hidden_size=3)))
    assert "unknown config key 'modle'; did you mean 'model'?" in msg
    assert "did you mean 'data.seq_len'?" in error_of(config_from_dict, tiny(seq_len=8))
    msg = error_of(config_from_dict, tiny(zzz_qqq=1))
    assert "'zzz_qqq'" in msg and "UPPER_CASE" in msg
    cfg = config_from_dict(tiny(ANYTHING_GOES=object))  # user variables are not checked
    assert cfg.user_vars["ANYTHING_GOES"] is object


def test_unknown_section_key_suggests_closest():
    raw = tiny()
    raw["model"]["hiden_size"] = 3
    assert error_of(config_from_dict, raw) == ("unknown config key 'model.hiden_size'; "
                                               "did you mean 'model.hidden_size'?")
    raw = tiny(parallel=dict(tensor=dict(sise=2)))
    assert "did you mean 'parallel.tensor.size'?" in error_of(config_from_dict, raw)
    raw = tiny(adam=dict(qqqq=1))
    assert "the valid keys of 'adam' are" in error_of(config_from_dict, raw)


def test_wrong_types_and_ranges():
    assert "'model.hidden_size' must be an integer" in error_of(config_from_dict, tiny(model=dict(hidden_size="big")))
    assert "True or False" in error_of(config_from_dict, tiny(model=dict(use_flash_attn=1)))
    assert "'adam.lr' must be > 0" in error_of(config_from_dict, tiny(adam=dict(lr=-1)))
    assert "must be a dict" in error_of(config_from_dict, tiny(adam=3))
    assert "'model.checkpoint'" in error_of(config_from_dict, tiny(model=dict(checkpoint=1.5)))
    assert config_from_dict(tiny(model=dict(checkpoint=0.5))).model.checkpoint == 0.5
    assert "'model.dtype'" in error_of(config_from_dict, tiny(model=dict(dtype="torch.int8")))
    assert "'data.micro_num' must be >= 1" in error_of(config_from_dict, tiny(data=dict(micro_num=0)))
    assert "missing required config key 'model.vocab_size'" in error_of(
        config_from_dict, {"model": dict(num_attention_heads=4, hidden_size=64, num_layers=2)})


def test_model_type():
    assert config_from_dict(tiny(model_type="internlm3")).model_type == "INTERNLM3"
    assert config_from_dict(tiny(model_type="InternLM2")).model_type == "INTERNLM2_PUBLIC"
    assert config_from_dict(tiny()).model_type == "INTERNLM"  # InternEvo's default
    msg = error_of(config_from_dict, tiny(model_type="GPT"))
    assert all(t in msg for t in ("INTERNLM", "INTERNLM2_PUBLIC", "INTERNLM3", "LLAMA2"))


def test_unsupported_features_are_named():
    assert "not supported" in error_of(config_from_dict, tiny(model=dict(apply_post_layer_norm=True)))
    assert "not supported" in error_of(config_from_dict, tiny(data=dict(rampup_batch_size="192 24 8")))
    msg = error_of(config_from_dict, tiny(parallel=dict(tensor=dict(size=2, mode="fsp"))))
    assert msg == ("parallel.tensor.mode='fsp' is not supported: use 'msp' (TP with sequence parallel), "
                   "which shards the same activations.")
    msg = error_of(config_from_dict, tiny(ckpt=dict(save_ckpt_folder="boto3:s3://bucket/ckpt")))
    assert "'ckpt.save_ckpt_folder'='boto3:s3://bucket/ckpt' names remote storage (boto3:)" in msg


def test_isp_and_weight_parallel_rules():
    cfg = config_from_dict(tiny(parallel=dict(tensor=dict(size=2, mode="isp"), weight=dict(size=2))))
    assert (cfg.parallel.tensor.mode, cfg.parallel.weight.size) == ("isp", 2)
    msg = error_of(config_from_dict, tiny(parallel=dict(weight=dict(size=4))))
    assert "parallel.weight.size=4 works within InternEvo's isp mode: set parallel.tensor.mode='isp'" in msg
    msg = error_of(config_from_dict, tiny(parallel=dict(tensor=dict(size=4, mode="isp"), weight=dict(size=3))))
    assert "parallel.weight.size=3 must divide parallel.tensor.size=4" in msg
    msg = error_of(config_from_dict, tiny(parallel=dict(tensor=dict(size=3, mode="isp")), data=dict(seq_len=32),
                                          model=dict(num_attention_heads=3, hidden_size=48)))
    assert "splits each micro-batch's 32 tokens (data.micro_bsz * data.seq_len) over parallel.tensor.size=3" in msg
    config_from_dict(tiny(parallel=dict(tensor=dict(size=2, mode="isp")),  # (parity: tests/parallel)
                          model=dict(checkpoint=True, checkpoint_policy="selective")))
    # isp does not split the vocabulary: any vocab_size
    config_from_dict(tiny(parallel=dict(tensor=dict(size=2, mode="isp")), model=dict(vocab_size=127)))


def test_sequence_parallel_normalises_tensor_mode():
    cfg = config_from_dict(tiny(parallel=dict(tensor=2, sequence_parallel=True)))
    assert cfg.parallel.tensor.mode == "msp" and cfg.parallel.sequence_parallel is True
    cfg = config_from_dict(tiny(parallel=dict(tensor=dict(size=2, mode="MSP"))))
    assert cfg.parallel.tensor.mode == "msp" and cfg.parallel.sequence_parallel is True


def test_checkpoint_settings():
    cfg = config_from_dict(tiny(ckpt=dict(save_ckpt_folder="local:/tmp/x", load_ckpt_info=dict(
        path="/ckpt/hf", content=("model",), ckpt_type="hf"))))
    assert cfg.ckpt.save_ckpt_folder == "/tmp/x"
    assert cfg.ckpt.load_ckpt_info == {"path": "/ckpt/hf", "content": ["model"], "ckpt_type": "hf"}
    assert "'ckpt.load_ckpt_info.content'" in error_of(
        config_from_dict, tiny(ckpt=dict(load_ckpt_info=dict(path="/x", content=("weights",)))))
    assert "'ckpt.load_ckpt_info.ckpt_type'" in error_of(
        config_from_dict, tiny(ckpt=dict(load_ckpt_info=dict(path="/x", ckpt_type="megatron"))))
    assert "ckpt.save_ckpt_folder" in error_of(config_from_dict, tiny(ckpt=dict(enable_save_ckpt=True)))


def test_defaults_are_filled():
    cfg = config_from_dict(tiny(SEQ_LEN=64, data={}, JOB_NAME="job"))
    assert cfg.data.seq_len == 32  # explicit data.seq_len wins over SEQ_LEN
    raw = tiny(SEQ_LEN=64)
    del raw["data"]
    cfg = config_from_dict(raw)
    assert cfg.data.seq_len == 64 and cfg.model.max_position_embeddings == 2048
    assert cfg.model.num_kv_attention_heads == 4 and cfg.model.head_dim == 16
    assert cfg.model.mlp_ratio == 4.0 and cfg.model.intermediate_size == 256
    assert cfg.lr_scheduler.total_steps == cfg.data.total_steps == 1000
    assert cfg.beta2_scheduler.init_beta2 == cfg.adam.adam_beta2 == 0.95
    assert cfg.parallel.zero1 == ZeroConfig(size=-1, fsdp=False)
    assert cfg.parallel.pipeline == PipelineConfig(size=1, interleaved_overlap=True, mode="1f1b")
    assert cfg.hybrid_zero_optimizer.clip_grad_norm == 0.0 and cfg.grad_scaler.fp16.initial_scale == 2**16
    assert cfg.monitor.run_folder == "runs/AnonymousJob" and cfg.seed == 1024 and cfg.device == "auto"
    assert config_from_dict(tiny(model=dict(intermediate_size=100))).model.intermediate_size == 100


def test_derived_bias_and_zero1_size():
    assert config_from_dict(tiny(model_type="INTERNLM")).model.no_bias is False
    assert config_from_dict(tiny(model_type="LLAMA2")).model.no_bias is True
    assert config_from_dict(tiny(model_type="INTERNLM", model=dict(no_bias=True))).model.no_bias is True
    assert config_from_dict(tiny(model_type="INTERNLM", model=dict(no_bias=None))).model.no_bias is False
    assert [shard_group_size(z, 8) for z in (-1, 0, 2, 16)] == [8, 8, 2, 8]  # capped at the data-parallel size


# ------------------------------------------------------------------------------------------ cross-key checks

def test_head_checks():
    msg = error_of(config_from_dict, tiny(model=dict(hidden_size=66)))
    assert "model.hidden_size=66" in msg and "model.num_attention_heads=4" in msg
    assert config_from_dict(tiny(model=dict(hidden_size=66, head_dim=16))).model.head_dim == 16
    msg = error_of(config_from_dict, tiny(model=dict(num_kv_attention_heads=3)))
    assert "model.num_attention_heads=4" in msg and "model.num_kv_attention_heads=3" in msg
    msg = error_of(config_from_dict, tiny(model_type="INTERNLM", model=dict(num_kv_attention_heads=2)))
    assert "INTERNLM" in msg and "model.num_kv_attention_heads=2" in msg


def test_seq_len_beyond_max_positions():
    msg = error_of(config_from_dict, tiny(model=dict(max_position_embeddings=16)))
    assert "data.seq_len=32" in msg and "model.max_position_embeddings=16" in msg


def test_data_folders_must_exist(tmp_path):
    missing = str(tmp_path / "nowhere")
    msg = error_of(config_from_dict, tiny(data=dict(train_folder=missing)))
    assert "data.train_folder" in msg and missing in msg
    assert "data.valid_folder" in error_of(config_from_dict, tiny(data=dict(valid_folder=missing)))
    assert config_from_dict(tiny(data=dict(train_folder=str(tmp_path)))).data.train_folder == str(tmp_path)


def test_world_size_checks():
    cfg = config_from_dict(tiny(parallel=dict(tensor=4)))
    assert error_of(validate, cfg, world_size=6) == ("world size 6 is not divisible by parallel.tensor.size(4) * "
                                                     "parallel.pipeline.size(1).")
    validate(cfg, world_size=8)

    cfg = config_from_dict(tiny(parallel=dict(zero1=3)))
    msg = error_of(validate, cfg, world_size=4)
    assert "parallel.zero1.size=3" in msg and "4" in msg
    validate(cfg, world_size=3)
    validate(cfg, world_size=2)  # larger than dp: capped, shards over all of dp
    validate(config_from_dict(tiny(parallel=dict(zero1=-1))), world_size=7)


def test_tensor_parallel_divisibility():
    msg = error_of(config_from_dict, tiny(model=dict(vocab_size=130), parallel=dict(tensor=4)))
    assert "model.vocab_size=130" in msg and "parallel.tensor.size=4" in msg and "132" in msg
    msg = error_of(config_from_dict, tiny(model_type="INTERNLM2_PUBLIC", model=dict(num_kv_attention_heads=2),
                                          parallel=dict(tensor=4)))
    assert "model.num_kv_attention_heads=2" in msg
    assert "model.num_attention_heads=4" in error_of(config_from_dict, tiny(parallel=dict(tensor=8)))


def test_pipeline_checks():
    msg = error_of(config_from_dict, tiny(model=dict(num_layers=6), parallel=dict(pipeline=4)))
    assert "model.num_layers=6" in msg and "parallel.pipeline.size(4)" in msg
    msg = error_of(config_from_dict, tiny(model=dict(num_chunks=2), parallel=dict(pipeline=4)))
    assert "model.num_layers=4" in msg and "model.num_chunks(2)" in msg
    config_from_dict(tiny(model=dict(num_chunks=2), parallel=dict(pipeline=2)))
    assert "model.num_chunks=2" in error_of(config_from_dict, tiny(model=dict(num_chunks=2)))
    msg = error_of(config_from_dict, tiny(parallel=dict(pipeline=dict(size=2, mode="zbv"))))
    assert "zbv" in msg and "model.num_chunks=2" in msg
    config_from_dict(tiny(model=dict(num_chunks=2), parallel=dict(pipeline=dict(size=2, mode="zbv"))))
    assert "'parallel.pipeline.mode'" in error_of(config_from_dict, tiny(parallel=dict(pipeline=dict(mode="dualpipe"))))


def test_validate_rechecks_a_hand_edited_config():
    cfg = config_from_dict(tiny())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_kv_attention_heads = 3
    edited = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_kv_attention_heads=3))
    assert "model.num_kv_attention_heads=3" in error_of(validate, edited)
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="int8"))
    assert "'model.dtype'" in error_of(validate, bad)  # each key's own rule is checked again


# ------------------------------------------------------------------------------------------- files and YAML

def test_yaml_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""\
        JOB_NAME: yaml_job
        SEQ_LEN: 64
        model_type: LLAMA2
        model: {num_attention_heads: 4, hidden_size: 64, num_layers: 2, vocab_size: 256, dtype: fp32}
        adam: {lr: 1e-3}   # YAML reads this as a string; it is still a number
        parallel: {zero1: 2, tensor: {size: 2}}
    """))
    cfg = load_config(path, ["model.num_layers=4"])
    assert cfg.JOB_NAME == "yaml_job" and cfg.data.seq_len == 64 and cfg.model.num_layers == 4
    assert cfg.adam.lr == 1e-3 and cfg.model.dtype == "torch.float32"
    assert cfg.parallel.zero1.size == 2 and cfg.parallel.tensor.mode == "mtp"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1,\n")
    assert "bad.yaml" in error_of(load_config, bad)


def test_python_config_namespace(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent("""\
        import math
        from os import path as _p
        SEQ_LEN = 48
        _private = 3
        def helper(x):
            return 2 * x
        class Thing:
            pass
        model = dict(num_attention_heads=4, hidden_size=helper(32), num_layers=2, vocab_size=256)
        adam = dict(lr=math.sqrt(1e-6))
    """))
    cfg = load_config(path)
    assert cfg.model.hidden_size == 64 and cfg.data.seq_len == 48 and cfg.adam.lr == pytest.approx(1e-3)
    assert not {"math", "helper", "Thing", "_private", "_p"} & set(to_dict(cfg))
    assert cfg.user_vars == {"SEQ_LEN": 48}


def test_file_errors(tmp_path):
    msg = error_of(load_config, tmp_path / "missing.py")
    assert "missing.py" in msg and "does not exist" in msg
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(\n  hidden_size=1,\n  num_layers=2,,\n)\n")
    msg = error_of(load_config, broken)
    assert "broken.py" in msg and "line 3" in msg
    failing = tmp_path / "failing.py"
    failing.write_text("X = 1\nY = UNDEFINED + 1\n")
    msg = error_of(load_config, failing)
    assert "failing.py" in msg and "line 2" in msg and "NameError" in msg
    other = tmp_path / "cfg.json"
    other.write_text("{}")
    assert ".py, .yaml or .yml" in error_of(load_config, other)


def test_internevo_style_config_is_accepted(tmp_path):
    path = tmp_path / "internevo_like.py"
    path.write_text(textwrap.dedent("""\
        JOB_NAME = "legacy"
        DO_ALERT = False
        SEQ_LEN = 128
        ckpt = dict(
            enable_save_ckpt=False,
            save_ckpt_folder="local:llm_ckpts",
            load_ckpt_folder="local:llm_ckpts/",
            load_ckpt_info=dict(path="local:llm_ckpts/40", content=("model",), ckpt_type="internevo"),
            auto_resume=True,
            checkpoint_every=50,
            async_upload=True,
            async_upload_tmp_folder="/dev/shm/tmp_ckpt/",
            oss_snapshot_freq=25,
        )
        data = dict(seq_len=SEQ_LEN, micro_num=4, micro_bsz=2, valid_micro_num=4, valid_every=50,
                    pack_sample_into_one=False, total_steps=100, skip_batches="", rampup_batch_size="",
                    min_length=50, train_folder=None, valid_folder=None, empty_cache_and_diag_interval=200,
                    diag_outlier_ratio=1.1)
        loss = dict(label_smoothing=0, op_type="py_vocab_parallel")
        use_fp32_norm = False
        model = dict(checkpoint=False, num_attention_heads=4, embed_split_hidden=True, vocab_size=256,
                     embed_grad_scale=1, parallel_output=True, hidden_size=64, num_layers=2, mlp_ratio=8 / 3,
                     apply_post_layer_norm=False, dtype="torch.bfloat16", norm_type="rmsnorm",
                     layer_norm_epsilon=1e-5, use_flash_attn=True, num_chunks=1, qk_interleaved=False)
        parallel = dict(zero1=dict(size=-1), tensor=dict(size=1, mode="mtp"),
                        pipeline=dict(size=1, interleaved_overlap=True), weight=dict(size=1, overlap=True))
        cudnn_deterministic = False
        cudnn_benchmark = False
        monitor = dict(alert=dict(enable_feishu_alert=DO_ALERT, feishu_alert_address=None),
                       tensorboard=dict(queue_max_length=10))
    """))
    cfg = load_config(path)
    assert cfg.ckpt.load_ckpt_info["ckpt_type"] == "internlm" and cfg.ckpt.load_ckpt_info["path"] == "llm_ckpts/40"
    assert cfg.loss.op_type == "py_vocab_parallel" and cfg.monitor.run_folder == "runs/legacy"


def test_dump_yaml_is_plain_and_atomic(tmp_path):
    cfg = config_from_dict(tiny(MY_TUPLE=(1, 2), ckpt=dict(load_ckpt_info=dict(path="/x", content=("model",)))))
    text = config_to_yaml_str(cfg)
    assert "!!python" not in text and "dtype: torch.bfloat16" in text
    out = tmp_path / "deep" / "config.yaml"
    dump_yaml(cfg, out)
    assert out.read_text() == text and [p.name for p in out.parent.iterdir()] == ["config.yaml"]
    again = load_config(out)
    assert again == cfg and again.user_vars["MY_TUPLE"] == [1, 2]


# ------------------------------------------------------------------------------------------- small pieces

@pytest.mark.parametrize("name,expected", [
    ("torch.bfloat16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("torch.float16", torch.float16), ("fp16", torch.float16), ("torch.float32", torch.float32),
    ("fp32", torch.float32), ("float32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_torch_dtype(name, expected):
    assert torch_dtype(name) is expected


def test_torch_dtype_rejects_unknown():
    assert "torch.bfloat16" in error_of(torch_dtype, "int8")


def test_config_is_typed_frozen_and_copyable():
    cfg = config_from_dict(tiny(MY_VAR=3))
    assert type(cfg.model.hidden_size) is int and type(cfg.adam.lr) is float and cfg.user_vars == {"MY_VAR": 3}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    with pytest.raises(AttributeError):
        _ = cfg.model.missing
    for other in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert other == cfg and isinstance(other.model, ModelConfig)
    changed = config_from_dict(cfg, ["model.num_layers=2"])  # a config as the base of another
    assert changed.model.num_layers == 2 and cfg.model.num_layers == 4 and changed.user_vars == {"MY_VAR": 3}


def test_inert_internevo_keys_give_one_notice_each():
    cfg = config_from_dict(tiny(model=dict(mlp_layer_fusion=True, embed_split_hidden=True),
                                monitor=dict(alert=dict(enable_feishu_alert=True, light_monitor_address="h:1"))))
    assert cfg.notices == ("model.embed_split_hidden has no effect here: the embedding is split by DTensor tensor "
                           "parallelism over the vocabulary",
                           "model.mlp_layer_fusion has no effect here: w1 and w3 stay separate matrices",
                           "monitor.alert.light_monitor_address has no effect here: no heartbeats are sent, only "
                           "Feishu alerts")
    assert config_from_dict(tiny()).notices == ()
    # a dumped config reads back with the same notices, no more
    again = config_from_dict(yaml_round_trip(cfg))
    assert again.notices == cfg.notices and config_from_dict(yaml_round_trip(config_from_dict(tiny()))).notices == ()


def yaml_round_trip(cfg) -> dict:
    import yaml

    return yaml.safe_load(config_to_yaml_str(cfg))


def test_key_table_doc_is_generated_from_the_schema():
    doc = (ROOT / "doc" / "config_keys.md").read_text()
    assert doc == markdown(), "doc/config_keys.md is stale: python -m internlm.config.docs > doc/config_keys.md"
    assert "| `model.hidden_size` | int | *required* |" in doc and "| `adam.lr` | float | `0.0001` |" in doc
    assert "| `data.skip_batches` | str or None | `''` | InternEvo's batches to skip (*no effect*:" in doc


def test_train_py_prints_the_config_keys():
    proc = run_python([ROOT / "train.py", "--config-keys"], timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == len(markdown().splitlines()) - len(markdown().split("|---|")[0].splitlines()) - 1
    assert any(line.startswith("parallel.zero1.size") and "-1" in line for line in lines)


# ---------------------------------------------------------------------------------------------- entry point

@pytest.mark.skipif(not (ROOT / "train.py").exists(), reason="train.py not written yet")
def test_train_py_reports_config_errors_without_traceback():
    proc = run_python(["train.py", "--config", "configs/demo.py", "model.hiden_size=3"], cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in output
    assert "model.hiden_size" in output and "model.hidden_size" in output


def test_internevo_isp_and_2d_parallel_sections():
    """InternEvo's isp configs as they are written: weight.size beyond the isp group (sharded further
    by zero1 here), the sequence_2D block with its placement keys; the layout each gives."""
    from internlm.parallel_dims import ParallelDims

    isp = dict(zero1=dict(size=-1), tensor=dict(size=2, mode="isp"), pipeline=dict(size=1, interleaved_overlap=True),
               weight=dict(size=4, overlap=True, memory_pool=True))
    cfg = config_from_dict(tiny(parallel=isp))
    validate(cfg, world_size=8)
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.isp, dims.wp, dims.dp, dims.dp_shard, dims.tensor_parallel) == (2, 2, 4, 4, 1)
    two_d = dict(isp, tensor=dict(size=4, mode="isp"), weight=dict(size=4, overlap=True, memory_pool=False),
                 sequence_2D=dict(enable=True, head_size=2, context_size=2, window_size=1,
                                  device_placement_strategy=dict(head_first=False, interleaved=False)))
    cfg = config_from_dict(tiny(parallel=two_d, data=dict(seq_len=64)))
    validate(cfg, world_size=8)
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.head, dims.context, dims.head_first) == (2, 2, False)
    assert [dims.sp_coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert (dims.window, dims.interleaved) == (1, False)
    cfg = config_from_dict(tiny(parallel=dict(two_d, tensor=dict(size=8, mode="isp"), sequence_2D=dict(
        enable=True, head_size=1, context_size=8, window_size=2, device_placement_strategy=dict(interleaved=True)))))
    validate(cfg, world_size=8)
    dims = ParallelDims.from_config(cfg, 8)
    assert (dims.context, dims.window, dims.interleaved) == (8, 2, True)
    assert not [k for k in cfg.inert_keys if "sequence_2D" in k]
    from internlm.context_parallel import ring_windows
    assert ring_windows(8, 2, True) == [[0, 2], [1, 3], [4, 6], [5, 7]]  # InternEvo's placement
    assert ring_windows(8, 2, False) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ring_windows(8, 8, True) == [list(range(8))]  # one window: the single ring
    s2d = dict(enable=True, head_size=1, context_size=4, window_size=3)
    msg = error_of(config_from_dict, tiny(parallel=dict(two_d, sequence_2D=s2d)))
    assert "window_size=3 must divide context_size=4" in msg
    s2d = dict(s2d, context_size=6, window_size=2, device_placement_strategy=dict(interleaved=True))
    msg = error_of(config_from_dict, tiny(parallel=dict(two_d, tensor=dict(size=6, mode="isp"), sequence_2D=s2d,
                                                        weight=dict(size=1)),
                                     model=dict(num_attention_heads=6, num_kv_attention_heads=6, hidden_size=96),
                                     data=dict(seq_len=96)))
    assert "interleaved=True" in msg and "context_size=6 a multiple of 4" in msg
    msg = error_of(config_from_dict, tiny(parallel=dict(two_d, sequence_2D=dict(enable=True, head_size=2,
                                                                                   context_size=4))))
    assert "head_size(2) * context_size(4) = 8 must equal parallel.tensor.size=4" in msg
    msg = error_of(config_from_dict, tiny(parallel=dict(sequence_2D=dict(enable=True))))
    assert "needs parallel.tensor.mode='isp'" in msg
    msg = error_of(config_from_dict, tiny(parallel=two_d, data=dict(seq_len=36)))
    assert "2 x 2 zigzag chunks" in msg and "a multiple of 8" in msg


def test_norm_head_reaches_the_model_and_refuses_tied_embeddings():
    from internlm.builders import model_args

    cfg = config_from_dict(tiny(model=dict(norm_head=True)))
    assert model_args(cfg).norm_head is True
    assert model_args(config_from_dict(tiny())).norm_head is False
    msg = error_of(config_from_dict, tiny(model=dict(norm_head=True, tie_word_embeddings=True)))
    assert "model.norm_head=True" in msg and "model.tie_word_embeddings=False" in msg
