"""Typed experiment configs loaded from YAML; every error names the offending key.

schema.py holds the dataclasses (one per YAML section), reading.py turns YAML or plain data into them,
validation.py checks ranges and consistency, shipped.py finds the configs that ship with the package by name.
"""

from .reading import config_from_dict, load_config
from .schema import (
                     BACKEND_CHOICES,
                     DataConfig,
                     DecoderConfig,
                     DiffusionConfig,
                     DiTConfig,
                     ExperimentConfig,
                     ModelConfig,
                     MultiStageConfig,
                     SampleConfig,
                     SearchConfig,
                     SparsityConfig,
                     TrainConfig,
                     UNetConfig,
                     equal_stage_boundaries,
)
from .shipped import config_path, shipped_configs
from .validation import (
                     COST_CHOICES,
                     budget_gflops,
                     channels_at,
                     parse_budget,
                     validate,
                     validate_dit,
                     validate_multistage,
                     validate_search,
                     validate_sparsity,
                     validate_unet,
)

__all__ = ["BACKEND_CHOICES", "COST_CHOICES", "DataConfig", "DecoderConfig", "DiffusionConfig",
           "DiTConfig", "ExperimentConfig", "ModelConfig", "MultiStageConfig", "SampleConfig", "SearchConfig",
           "SparsityConfig", "TrainConfig", "UNetConfig", "budget_gflops", "channels_at", "config_from_dict", "config_path",
           "equal_stage_boundaries", "load_config", "parse_budget", "shipped_configs", "validate", "validate_dit",
           "validate_multistage", "validate_search", "validate_sparsity", "validate_unet"]
