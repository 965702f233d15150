"""Accelerate-driven training of timm models (S4ND backbones and their baselines) from YAML configs."""
from .config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from .trainer import Trainer, TrainState, latest_checkpoint
