"""The training config: one typed schema (schema.py), loading and overrides (load.py), cross-key checks
(validate.py), YAML output (dump.py) and the generated key table (docs.py).

    cfg = load_config("configs/7B_sft.py", ["data.total_steps=20"])
    cfg.model.hidden_size, cfg.parallel.zero1.size      # typed, frozen, every key filled in
"""
from internlm.config.checks import ConfigError, canonical_dtype, torch_dtype
from internlm.config.dump import config_to_yaml_str, dump_yaml
from internlm.config.load import config_from_dict, load_config, to_dict
from internlm.config.schema import (
                                    AdamConfig,
                                    CkptConfig,
                                    DataConfig,
                                    ModelConfig,
                                    MonitorConfig,
                                    ParallelConfig,
                                    TrainConfig,
)
from internlm.config.validate import validate

__all__ = [
    "ConfigError", "TrainConfig", "ModelConfig", "DataConfig", "AdamConfig", "ParallelConfig", "CkptConfig",
    "MonitorConfig", "load_config", "config_from_dict", "to_dict", "validate", "dump_yaml", "config_to_yaml_str",
    "torch_dtype", "canonical_dtype",
]
