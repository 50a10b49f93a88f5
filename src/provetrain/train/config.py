"""Training configuration: plain data, validated eagerly, with a comment per value.

``provetrain train CONFIG.yaml`` reads one of these; ``Trainer(..., **overrides)`` builds one from
keywords. Any invalid value raises :class:`provetrain.ConfigError` naming the key (and, for a file, its
line and column) before anything is written. Counts are strict integers (``steps: true`` or ``steps: 2.5``
is an error, not 1 or 2) and no number accepts a boolean.

A config loaded from a file remembers where each key was (:func:`config_error`), so a problem found only
when the data or the model is built is still reported at the file, line and column of its key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StrictBool,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from provetrain.errors import ConfigError
from provetrain.train.schedule import ScheduleName
from provetrain.yaml_schema import KeyPositions, LocatedProblem, read_yaml_text, validate_yaml_located

__all__ = [
    "ConfigSource",
    "LrMaxBudget",
    "NonFinitePolicy",
    "TrainConfig",
    "TrendPolicy",
    "config_error",
    "load_config",
    "make_config",
    "override",
]

DEFAULT_EPOCHS = 10
# numpy's seed range; the Trainer derives per-epoch seeds as seed * 1_000_003 + epoch, which stays inside
# torch's 64-bit seeds for every seed up to here.
MAX_SEED = 2**32 - 1


def _no_bool(value: Any) -> Any:
    # pydantic reads True as 1.0 and YAML reads `yes`/`true` as True: a number must be written as one.
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number, not a boolean")
    return value


def _checkpoint_targets(value: Any) -> Any:
    if value is None or value == "module_lists":
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return value
    raise PydanticCustomError(
        "activation_checkpointing",
        "not a setting of activation_checkpointing",
    )


def _path_text(value: Any) -> Any:
    # A contract is named by a string in YAML; the Python API may pass a Path.
    return str(value) if isinstance(value, Path) else value


# A count beyond this is a typo, never a plan (2**31 - 1 steps at 1 ms each is 25 days); it also keeps every
# count a 32-bit integer where torch and JSON readers store one.
MAX_COUNT = 2**31 - 1
Int = Annotated[int, Strict(), Field(le=MAX_COUNT)]
Float = Annotated[float, BeforeValidator(_no_bool)]

NonFinitePolicy = Literal["skip", "raise", "rollback"]
TrendPolicy = Literal["warn", "reduce_lr", "rollback", "raise"]


@dataclass(frozen=True)
class ConfigSource:
    """The file a config was read from, the 1-based (line, column) of each of its keys, and the settings
    replaced since (whose values no longer come from the file)."""

    path: Path
    positions: KeyPositions
    overridden: frozenset[str] = frozenset()


class LrMaxBudget(BaseModel):
    """What ``lr_max: auto`` may spend; the estimate stops at whichever limit comes first and says so."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Hessian-vector products of the power iteration (the preconditioner's gradients are not counted).
    hvp: Int = Field(default=20, ge=1)
    # Wall-clock seconds for the whole estimate (None: no time limit).
    seconds: Float | None = Field(default=60.0, gt=0, allow_inf_nan=False)
    # Micro-batches averaged for Adam's preconditioner (a backward each: cheap in memory), and how many of
    # them the curvature is measured on together (one double-backward graph: what sets the peak memory).
    batches: Int = Field(default=16, ge=1)
    curvature_batches: Int = Field(default=4, ge=1)


class TrainConfig(BaseModel):
    """Everything a training run needs besides the model and the data objects themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # What to train on: a built-in ("digits", "arrays", "text") or "module:function", with its keywords.
    data: str = "digits"
    data_args: dict[str, Any] = {}
    # What to train: a built-in ("mlp", "cnn", "tiny-gpt") or "module:function", with its keywords.
    model: str = "mlp"
    model_args: dict[str, Any] = {}

    # The contracts the run is certified against, a section each in certificate.json: contract files, or names
    # of the bundled ones (training-loop-v1, optimizer-v1, backward-pass-v1, checkpoint-v1, batch-v1, ...).
    contracts: list[Annotated[str, BeforeValidator(_path_text)]] = Field(default=["training-loop-v1"], min_length=1)

    # Optimizer: provetrain's guarded Adam, AdamW (decoupled weight decay) or SGD (weight decay as an L2 term
    # of the gradient, as torch.optim.SGD's); all three clip, guard and skip alike.
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: Float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    # The contract's lr_max, which the contract itself does not define: a number is the bound that the
    # precondition `lr < lr_max` enforces (before training for the whole schedule, then every step); None
    # (default) declares no bound, and the clause is reported as unchecked; "auto" (opt-in) estimates Adam's
    # edge of stability from curvature before training, within lr_max_budget, and reports it, with its
    # convergence, in the certificate and the summary, without enforcing it (a local estimate: rates above it
    # often train, see README).
    lr_max: Annotated[float | Literal["auto"] | None, BeforeValidator(_no_bool)] = None
    # What lr_max: auto may spend: Hessian-vector products (each about 2-3 training steps of compute) and
    # seconds, whichever runs out first, and how many micro-batches it uses.
    lr_max_budget: LrMaxBudget = Field(default_factory=lambda: LrMaxBudget())
    # Adam's and AdamW's moment decay rates and denominator guard (refused when set with optimizer: sgd).
    betas: tuple[Float, Float] = (0.9, 0.999)
    eps: Float = Field(default=1e-8, gt=0, allow_inf_nan=False)
    # SGD's heavy-ball momentum mu in [0, 1) (0: plain SGD) and Nesterov's variant (needs momentum > 0);
    # optimizer: sgd only (Adam's momentum is betas[0]): set with adam or adamw they are refused.
    momentum: Float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False)
    nesterov: StrictBool = False
    weight_decay: Float = Field(default=1e-2, ge=0, allow_inf_nan=False)
    # Parameters that get no weight decay, as shell-style patterns of their names (`*.bias`, `ln_*`); None
    # (default): nanoGPT's rule, every parameter with fewer than 2 dimensions (biases, norm weights) and
    # every nn.Embedding's weight; [] decays every parameter.
    no_weight_decay: list[str] | None = None
    # Global gradient-norm bound (the contract's clip_value); None turns clipping off.
    clip_value: Float | None = Field(default=1.0, gt=0, allow_inf_nan=False)
    # Arithmetic of the forward and backward: full float32, bfloat16 autocast, or float16 autocast with a
    # GradScaler (an overflow is the contract's skip, counted against the skip budget like any other).
    precision: Literal["fp32", "bf16-autocast", "fp16-amp"] = "fp32"

    # Schedule over applied optimizer steps (skipped steps do not advance it): warmup, then a decay to the
    # floor min_lr (or min_lr_ratio * lr) over decay_steps steps and flat at the floor after; without
    # decay_steps, over the rest of the run.
    schedule: ScheduleName = "cosine"
    warmup_steps: Int = Field(default=0, ge=0)
    min_lr_ratio: Float = Field(default=0.0, ge=0, lt=1)
    decay_steps: Int | None = Field(default=None, ge=1)
    min_lr: Float | None = Field(default=None, ge=0, allow_inf_nan=False)

    # Length: one of steps or epochs (neither: DEFAULT_EPOCHS epochs); steps count optimizer steps.
    steps: Int | None = Field(default=None, ge=1)
    epochs: Int | None = Field(default=None, ge=1)
    # Examples per micro-batch; each optimizer step sums the gradients of gradient_accumulation_steps
    # micro-batches, each loss scaled by 1/gradient_accumulation_steps (one step sees k * batch_size examples).
    batch_size: Int = Field(default=64, ge=1)
    gradient_accumulation_steps: Int = Field(default=1, ge=1)

    # What the loss is computed from: the model's output, or the part of it at output_key (an index of a
    # tuple/list, a key of a dict or of a Hugging Face ModelOutput); loss_fn(output, targets) as
    # "module:function" (default: cross-entropy, per token for a language model).
    output_key: Annotated[int, Strict()] | str | None = None
    loss_fn: str | None = None
    # torch.compile the model for training (checkpoints and lr_max use the uncompiled module); the backend
    # torch.compile uses (None: torch's default, "inductor"; "eager" checks the graph capture only).
    compile: StrictBool = False
    compile_backend: str | None = None

    # How often device values are read on the host (metrics, policies); every step on CPU where it is free.
    log_every: Int = Field(default=10, ge=1)
    # Evaluate on the held-out set every N steps, skipped ones included (steps N-1, 2N-1... of the metrics), and
    # always at the end; None: only at the end.
    eval_every: Int | None = Field(default=None, ge=1)
    # Evaluate on this many random held-out batches of batch_size (seeded by seed: the same batches at every
    # evaluation) instead of the whole held-out set (None, default), as nanoGPT's estimate_loss does.
    eval_batches: Int | None = Field(default=None, ge=1)

    # Non-finite loss or gradient: skip the batch, raise, or roll back to the last good state with a lower lr.
    on_nonfinite: NonFinitePolicy = "skip"
    max_consecutive_skips: Int = Field(default=5, ge=1)
    max_total_skips: Int = Field(default=50, ge=1)
    rollback_lr_factor: Float = Field(default=0.5, gt=0, lt=1)
    max_rollbacks: Int = Field(default=3, ge=1)

    # The invariant "loss non-increasing in expectation": a trend test on the loss stream and what to do.
    on_loss_increase: TrendPolicy = "warn"
    monitor_window: Int = Field(default=50, ge=5)
    monitor_alpha: Float = Field(default=1e-3, gt=0, lt=0.5)

    # Activation checkpointing (checkpoint-v1): these submodules' activations are recomputed in the backward
    # instead of kept, outputs and gradients unchanged; "module_lists" (each child of every nn.ModuleList) or
    # fnmatch patterns over submodule names (["blocks.*"]); None: off.
    activation_checkpointing: Annotated[
        Literal["module_lists"] | list[str] | None, BeforeValidator(_checkpoint_targets)
    ] = None

    # Checkpoints every N steps, skipped ones included, into output_dir/checkpoints (None: only the final one).
    checkpoint_every: Int | None = Field(default=None, ge=1)
    keep_checkpoints: Int = Field(default=2, ge=1)

    seed: Annotated[int, Strict()] = Field(default=0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Under torch.distributed: how long a collective may wait for a frozen or dead process before the run
    # ends with an error on every process still alive (torch's gloo default is 30).
    collective_timeout_minutes: Float = Field(default=10.0, gt=0, allow_inf_nan=False)
    # Under torch.distributed: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters, gradients
    # and Adam state sharded over the ranks, checkpoints written shard by shard); no effect in one process.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Run outputs; None: runs/<data>-<model>-<timestamp>.
    output_dir: str | None = Field(default=None, min_length=1)

    # Where the values came from, when they were read from a file (see config_error).
    _source: ConfigSource | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("steps") is None and values.get("epochs") is None:
            return {**values, "epochs": DEFAULT_EPOCHS}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise LocatedProblem(("epochs",), "give only one of steps or epochs", expected="steps or epochs, not both")
        for beta in self.betas:
            if not 0.0 <= beta < 1.0 or math.isnan(beta):
                raise LocatedProblem(
                    ("betas",), f"betas must each be in [0, 1), got {self.betas}", expected="[0.9, 0.999]"
                )
        if isinstance(self.lr_max, float) and not (self.lr_max > 0 and math.isfinite(self.lr_max)):
            raise LocatedProblem(
                ("lr_max",),
                f"lr_max must be a finite number > 0, got {self.lr_max}",
                expected="a number > 0, auto or null",
            )
        if self.min_lr is not None and self.min_lr_ratio:
            raise LocatedProblem(
                ("min_lr",),
                f"give only one of min_lr ({self.min_lr}) or min_lr_ratio ({self.min_lr_ratio}): both set the floor",
                expected="min_lr or min_lr_ratio, not both",
            )
        if self.min_lr is not None and self.min_lr >= self.lr:
            raise LocatedProblem(
                ("min_lr",),
                f"min_lr ({self.min_lr}) must be below lr ({self.lr}): it is where the decay ends",
                expected=f"a number in [0, {self.lr})",
            )
        self._check_optimizer_settings()
        if self.loss_fn is not None and (self.loss_fn.count(":") != 1 or not all(self.loss_fn.split(":"))):
            raise LocatedProblem(
                ("loss_fn",),
                f"loss_fn must be 'module:function', got {self.loss_fn!r}",
                expected="'module:function', e.g. torch.nn.functional:cross_entropy, or null for cross-entropy",
            )
        return self

    def _check_optimizer_settings(self) -> None:
        """Settings of one optimizer are refused with another rather than silently ignored (a value equal to
        the default changes nothing and passes, so a dumped config validates again)."""
        fields = type(self).model_fields
        given = {key for key in ("betas", "eps", "momentum", "nesterov") if getattr(self, key) != fields[key].default}
        if self.optimizer == "sgd":
            for key in ("betas", "eps"):
                if key in given:
                    raise LocatedProblem(
                        (key,),
                        f"{key} is a setting of Adam and AdamW, not of optimizer: sgd",
                        expected=f"no {key} with optimizer: sgd (its settings are momentum and nesterov), or "
                        "optimizer: adam or adamw",
                    )
            if self.nesterov and self.momentum == 0:
                raise LocatedProblem(
                    ("nesterov",),
                    "nesterov: true needs momentum > 0 (it is Nesterov's variant of momentum)",
                    expected="a momentum in (0, 1), e.g. 0.9, or nesterov: false",
                )
            return
        for key in ("momentum", "nesterov"):
            if key in given:
                raise LocatedProblem(
                    (key,),
                    f"{key} is a setting of optimizer: sgd, not of {self.optimizer} (whose momentum is betas[0])",
                    expected=f"no {key} with optimizer: {self.optimizer}, or optimizer: sgd",
                )


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a YAML training configuration; errors name the key, line and column."""
    path = Path(path)
    text = read_yaml_text(path, ConfigError, what="config file")
    expected = "a mapping of settings; without a config file, provetrain train runs the embedded default job"
    if not text.strip():
        raise ConfigError("the config file is empty", path=path, expected=expected)
    config, positions = validate_yaml_located(text, TrainConfig, path=path, error=ConfigError, empty_expected=expected)
    config._source = ConfigSource(path, positions)
    return config


def config_error(config: TrainConfig, problem: str, *, key: str, expected: str | None = None) -> ConfigError:
    """A ConfigError about ``key`` (``model_args.hidden[0]``), located at that key in the config's file, or at
    the nearest enclosing key the file has (``model_args``, then ``model``: a default is located at the
    setting it belongs to, when the file has that)."""
    source = config._source
    if source is None or key.split(".")[0].split("[")[0] in source.overridden:
        return ConfigError(problem, key=key, expected=expected)
    where = key
    while where and where not in source.positions:
        where = where[: max(where.rfind("."), where.rfind("["), 0)]
    if not where:
        where = key.split(".")[0].removesuffix("_args")
    line, column = source.positions.get(where, (None, None))
    return ConfigError(problem, path=source.path, line=line, column=column, key=key, expected=expected)


def override(config: TrainConfig, update: dict[str, Any]) -> TrainConfig:
    """``config`` with ``update`` applied and validated. A ``steps`` given on top of a config replaces its
    length, whichever it was. Errors about the updated keys are no longer located in the file."""
    if not update:
        return config
    if "steps" in update:
        update = {**update, "epochs": None}
    updated = make_config({**config.model_dump(), **update})
    if config._source is not None:
        source = config._source
        updated._source = ConfigSource(source.path, source.positions, source.overridden | set(update))
    return updated


def make_config(values: dict[str, Any]) -> TrainConfig:
    """A config from keywords (the Python API), with the same errors as a file, minus the position."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        detail = error.errors(include_url=False)[0]
        cause = (detail.get("ctx") or {}).get("error")
        if isinstance(cause, LocatedProblem):
            key = ".".join(str(part) for part in cause.loc) or None
            raise ConfigError(cause.problem, key=key, expected=cause.expected) from None
        key = ".".join(str(part) for part in detail["loc"]) or None
        raise ConfigError(f"{detail['msg']}; got {detail.get('input')!r}", key=key) from None
