"""Validated experiment configs."""

from cotune.config.loader import ConfigError, config_from_dict, dump_config, load_config
from cotune.config.schema import ExperimentConfig

__all__ = ["ConfigError", "ExperimentConfig", "config_from_dict", "dump_config", "load_config"]
