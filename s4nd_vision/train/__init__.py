"""Accelerate-driven training of timm models (S4ND backbones and their baselines) from YAML configs.

`config` (the YAML schema and its checks), `trainer` (the loop), `data` (one class per kind of data), `checkpoint`
(atomic checkpoints, resume, exported weights), `metrics` (metrics.csv, trackers), `optim` (SSM parameter groups),
`cli` (`s4nd-vision train`, `tools/train.py`).
"""
from . import optim
from .checkpoint import RunFolderInUse, TrainState, latest_checkpoint
from .config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from .trainer import Trainer, TrainingDiverged
