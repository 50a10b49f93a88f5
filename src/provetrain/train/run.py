"""Build a run from a config: resolve the data and the model, then hand them to the Trainer.

Everything that can be wrong with a config (a bad value, a data file that is missing or malformed, a model
function that does not exist or raises, a model that does not run on the data) is found here, before the
Trainer creates the run directory, and reported as a :class:`ConfigError` at the file, line and column of
the key to blame.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from rich.console import Console

from provetrain.data.sources import ArgumentError, load_data
from provetrain.errors import ConfigError, ContractViolation
from provetrain.models.builtin import build_model
from provetrain.train.config import TrainConfig, config_error, load_config, override
from provetrain.train.model_output import ModelOutputError
from provetrain.train.trainer import Trainer, TrainResult

__all__ = ["default_config_path", "prepare_trainer", "train_from_config"]

Built = TypeVar("Built")


def default_config_path() -> Path:
    """The embedded default job: digits, a small MLP, guarded AdamW."""
    return Path(str(resources.files("provetrain") / "configs" / "default.yaml"))


def prepare_trainer(config: TrainConfig, *, console: Console | None = None, **overrides: Any) -> Trainer:
    """A Trainer for ``config`` with its data and model resolved and checked to run together; ConfigError
    names the failing key (located in the config's file when it came from one)."""
    config = override(config, {k: v for k, v in overrides.items() if v is not None})
    _check_output_dir(config)
    data = _build(config, "data", lambda: load_data(config.data, config.data_args, seed=config.seed))
    torch.manual_seed(config.seed)  # the initial weights are part of the run: same seed, same model
    model = _build(config, "model", lambda: build_model(config.model, data, config.model_args))
    try:
        trainer = Trainer(model, data, config=config, console=console)
    except ConfigError as error:
        raise config_error(config, error.problem, key=error.key or "data", expected=error.expected) from None
    except ContractViolation:  # some are also ValueErrors (errors.ArgumentViolation): the CLI reports them
        raise
    except ValueError as error:  # e.g. device="cuda" without CUDA
        raise config_error(config, str(error), key="device") from None
    _check_first_batch(trainer, config)
    return trainer


def _build(config: TrainConfig, section: str, build: Callable[[], Built]) -> Built:
    """``build()``, with its errors as a ConfigError at ``section`` (``data``/``model``), or at the argument
    in ``<section>_args`` that is to blame."""
    try:
        return build()
    except ArgumentError as error:
        raise config_error(config, str(error), key=f"{section}_args.{error.argument}") from None
    except FileNotFoundError as error:
        raise config_error(config, str(error), key=f"{section}_args.path") from None
    except (ValueError, TypeError) as error:
        raise config_error(config, str(error), key=section) from None
    except (RuntimeError, MemoryError, OverflowError) as error:  # torch refusing a size it cannot allocate
        problem = f"building the {section} {getattr(config, section)!r} failed ({type(error).__name__}: {error})"
        raise config_error(config, problem, key=f"{section}_args") from None


def _check_output_dir(config: TrainConfig) -> None:
    """An ``output_dir`` that is, or lies under, an existing file can never be created: say so now, not
    after the data is loaded."""
    if config.output_dir is None:
        return
    target = Path(config.output_dir)
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            problem = f"{path} is a file, so the run directory {target} cannot be created there"
            raise config_error(config, problem, key="output_dir", expected="a new or empty directory")


@torch.no_grad()
def _check_first_batch(trainer: Trainer, config: TrainConfig) -> None:
    """The model's forward and the loss on two training examples, so a model that does not fit the data
    fails here, named, before anything is written. Eval mode and no gradient: no buffer (BatchNorm's
    running statistics) and no random state changes."""
    try:
        inputs, targets = (t[:2] for t in trainer._first_batches(1)[0])
    except (ValueError, TypeError) as error:  # DataError: items that are not pairs, an empty loader
        raise config_error(config, str(error), key="data") from None
    was_training = trainer.model.training
    trainer.model.eval()
    # A configured loss_fn is blamed for what fails after the forward, the model for the forward itself.
    loss_key = "model" if config.loss_fn is None else "loss_fn"
    try:
        outputs = trainer.model(inputs)
    except Exception as error:
        shape = tuple(inputs.shape[1:])
        problem = (
            f"the model {config.model!r} does not run on the data {config.data!r} (examples of shape {shape}, "
            f"{trainer.data.num_classes} classes): {type(error).__name__}: {error}"
        )
        raise config_error(config, problem, key="model") from None
    finally:
        trainer.model.train(was_training)
    try:
        loss = trainer.loss_fn(outputs, targets)
    except ModelOutputError as error:  # a tuple without output_key, a key the output does not have
        raise config_error(config, str(error), key=error.key) from None
    except Exception as error:
        source = "the default loss" if config.loss_fn is None else f"loss_fn {config.loss_fn!r}"
        problem = (
            f"{source} fails on the model {config.model!r}'s outputs and the data {config.data!r}'s targets: "
            f"{type(error).__name__}: {error}"
        )
        raise config_error(config, problem, key=loss_key, expected="loss_fn(outputs, targets) -> a scalar") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise config_error(config, f"the loss on the model's outputs is not a scalar (got {shape})", key=loss_key)


def train_from_config(
    path: str | Path | None = None, *, console: Console | None = None, **overrides: Any
) -> TrainResult:
    """Load a YAML config (the embedded default when None) and train."""
    config = load_config(default_config_path() if path is None else path)
    return prepare_trainer(config, console=console, **overrides).fit()
