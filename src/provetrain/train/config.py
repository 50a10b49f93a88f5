"""Training configuration: plain data, validated eagerly, with a comment per value.

``provetrain train CONFIG.yaml`` reads one of these; ``Trainer(..., **overrides)`` builds one from
keywords. Any invalid value raises :class:`provetrain.ConfigError` naming the key (and, for a file, its
line and column) before anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from provetrain.errors import ConfigError
from provetrain.train.schedule import ScheduleName
from provetrain.yaml_schema import read_yaml_text, validate_yaml

__all__ = ["NonFinitePolicy", "TrainConfig", "TrendPolicy", "load_config", "make_config"]

DEFAULT_EPOCHS = 10

NonFinitePolicy = Literal["skip", "raise", "rollback"]
TrendPolicy = Literal["warn", "reduce_lr", "rollback", "raise"]


class TrainConfig(BaseModel):
    """Everything a training run needs besides the model and the data objects themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What to train on: a built-in ("digits", "arrays", "text") or "module:function", with its keywords.
    data: str = "digits"
    data_args: dict[str, Any] = {}
    # What to train: a built-in ("mlp", "cnn", "tiny-gpt") or "module:function", with its keywords.
    model: str = "mlp"
    model_args: dict[str, Any] = {}

    # Optimizer: provetrain's guarded Adam or AdamW (decoupled weight decay).
    optimizer: Literal["adam", "adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    # The contract's lr_max: a number, "auto" (estimated from curvature before training) or None (no bound
    # known: the `lr < lr_max` clause is then reported as unchecked in the certificate).
    lr_max: float | Literal["auto"] | None = "auto"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, ge=0, allow_inf_nan=False)
    weight_decay: float = Field(default=1e-2, ge=0, allow_inf_nan=False)
    # Global gradient-norm bound (the contract's clip_value); None turns clipping off.
    clip_value: float | None = Field(default=1.0, gt=0, allow_inf_nan=False)

    # Schedule over applied steps (skipped steps do not advance it).
    schedule: ScheduleName = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, lt=1)

    # Length: one of steps or epochs (neither: DEFAULT_EPOCHS epochs).
    steps: int | None = Field(default=None, ge=1)
    epochs: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=64, ge=1)

    # How often device values are read on the host (metrics, policies); every step on CPU where it is free.
    log_every: int = Field(default=10, ge=1)
    # Evaluate on the held-out set every N applied steps (and always at the end); None: only at the end.
    eval_every: int | None = Field(default=None, ge=1)

    # Non-finite loss or gradient: skip the batch, raise, or roll back to the last good state with a lower lr.
    on_nonfinite: NonFinitePolicy = "skip"
    max_consecutive_skips: int = Field(default=5, ge=1)
    max_total_skips: int = Field(default=50, ge=1)
    rollback_lr_factor: float = Field(default=0.5, gt=0, lt=1)
    max_rollbacks: int = Field(default=3, ge=1)

    # The invariant "loss non-increasing in expectation": a trend test on the loss stream and what to do.
    on_loss_increase: TrendPolicy = "warn"
    monitor_window: int = Field(default=50, ge=5)
    monitor_alpha: float = Field(default=1e-3, gt=0, lt=0.5)

    # Checkpoints every N applied steps into output_dir/checkpoints (None: only the final one).
    checkpoint_every: int | None = Field(default=None, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Run outputs; None: runs/<data>-<model>-<timestamp>.
    output_dir: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("steps") is None and values.get("epochs") is None:
            return {**values, "epochs": DEFAULT_EPOCHS}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give only one of steps or epochs")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0 or math.isnan(beta):
                raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        if isinstance(self.lr_max, float) and not (self.lr_max > 0 and math.isfinite(self.lr_max)):
            raise ValueError(f"lr_max must be a finite number > 0, 'auto' or null, got {self.lr_max}")
        return self


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training configuration; errors name the key, line and column."""
    path = Path(path)
    text = read_yaml_text(path, ConfigError, what="config file")
    if not text.strip():
        return make_config({})
    return validate_yaml(text, TrainConfig, path=path, error=ConfigError, empty_expected="a mapping of settings")


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A config from keywords (the Python API), with the same errors as a file, minus the position."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        detail = error.errors(include_url=False)[0]
        key = ".".join(str(part) for part in detail["loc"]) or None
        raise ConfigError(f"{detail['msg']}; got {detail.get('input')!r}", key=key) from None
