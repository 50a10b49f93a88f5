"""Build a run from a config: resolve the data and the model, then hand them to the Trainer.

Everything that can be wrong with a config (a bad value, a data file that is missing, a model function
that does not exist) is found here, before the Trainer creates the run directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from provetrain.data.sources import load_data
from provetrain.errors import ConfigError
from provetrain.models.builtin import build_model
from provetrain.train.config import TrainConfig, load_config
from provetrain.train.trainer import Trainer, TrainResult

__all__ = ["default_config_path", "prepare_trainer", "train_from_config"]


def default_config_path() -> Path:
    """The embedded default job: digits, a small MLP, guarded AdamW."""
    return Path(str(resources.files("provetrain") / "configs" / "default.yaml"))


def prepare_trainer(config: TrainConfig, *, console: Console | None = None, **overrides: Any) -> Trainer:
    """A Trainer for ``config`` with its data and model resolved; ConfigError names the failing key."""
    update = {k: v for k, v in overrides.items() if v is not None}
    if "steps" in update:  # a step count given on top of a config replaces its length, whichever it was
        update["epochs"] = None
    config = config.model_copy(update=update)
    try:
        data = load_data(config.data, config.data_args, seed=config.seed)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise ConfigError(str(error), key="data") from None
    torch.manual_seed(config.seed)  # the initial weights are part of the run: same seed, same model
    try:
        model = build_model(config.model, data, config.model_args)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error), key="model") from None
    try:
        return Trainer(model, data, config=config, console=console)
    except ConfigError:
        raise
    except ValueError as error:  # e.g. device="cuda" without CUDA
        raise ConfigError(str(error), key="device") from None


def train_from_config(
    path: str | Path | None = None, *, console: Console | None = None, **overrides: Any
) -> TrainResult:
    """Load a YAML config (the embedded default when None) and train."""
    config = load_config(default_config_path() if path is None else path)
    return prepare_trainer(config, console=console, **overrides).fit()
