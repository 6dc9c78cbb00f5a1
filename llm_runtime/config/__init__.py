"""Configuration: the tree (tree.py), its one loader (load.py) and its one check (check.py).

Precedence, lowest to highest: defaults < TOML file (``--config``) < ``LLM_RUNTIME_<SECTION>_<KEY>``
variables < SageMaker hyperparameters (``section.key``) < command line ``--section.key=value``.
"""
from .check import LAYOUT_KEYS, set_by, validate
from .load import ENV_PREFIX, ConfigError, load_config, parse_cli_overrides, source_of, to_dict
from .tree import (CheckpointConfig, CommConfig, Config, DataConfig, DeepSpeedConfig, DistConfig, EvalConfig, HealthConfig,
                   LaunchConfig, MetricsConfig, ModelConfig, NetenvConfig, ParallelConfig, TrainConfig,
                   WatchdogConfig)

__all__ = ["CheckpointConfig", "CommConfig", "Config", "ConfigError", "DataConfig", "DeepSpeedConfig", "DistConfig",
           "ENV_PREFIX", "EvalConfig", "HealthConfig", "LAYOUT_KEYS", "LaunchConfig", "MetricsConfig", "ModelConfig",
           "NetenvConfig", "ParallelConfig", "TrainConfig", "WatchdogConfig", "load_config", "parse_cli_overrides",
           "set_by", "source_of", "to_dict", "validate"]
