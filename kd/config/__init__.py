"""Typed configuration: dataclasses grouped by concern (kd.config.schema), values in YAML, one
override grammar (kd.config.load), a reference table of every key (kd.config.reference).

    python -m kd.train --config configs/demo.yaml loss.temperature=2.0 --train.max_steps=50

Both `a.b=v` and `--a.b=v` are accepted (the second is what a W&B sweep agent passes).
Merging and type checks are OmegaConf's structured configs; `__post_init__` checks values.
Unknown keys and wrong types raise `ConfigError` with a one-line message naming the key.
"""

from kd.config.load import flat_dict, from_flat, load_config, to_dict, to_yaml
from kd.config.schema import (Config, DataConfig, LogConfig, LoraConfig, LossConfig, OnPolicyConfig, OptimConfig,
                              StudentConfig, TeacherConfig, TrainConfig, all_keys, flat_dict_defaults)
from kd.errors import ConfigError

__all__ = ["Config", "ConfigError", "DataConfig", "LogConfig", "LoraConfig", "LossConfig", "OnPolicyConfig",
           "OptimConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "all_keys", "flat_dict",
           "flat_dict_defaults", "from_flat", "load_config", "to_dict", "to_yaml"]
