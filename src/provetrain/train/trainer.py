"""The contract-governed training loop.

One step, in order (each phase a short helper):

1. learning rate from the schedule of *applied* steps; check ``lr > 0.0``, and ``lr < lr_max`` when an
   ``lr_max`` is declared (an ``lr_max: auto`` estimate is reported, never enforced);
2. for each of the ``gradient_accumulation_steps`` (k) micro-batches of the step (the data position
   advances even when the step is later skipped: a bad batch is dropped, so the run equals one that never
   saw it): forward (through ``torch.compile`` under ``compile``), the loss on the output at ``output_key``,
   backward of loss / k (without the gradients' reduction across ranks but for the last: DDP's
   ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``); the micro-batch losses are summed on the
   device in float64;
3. check ``!gradients.is_empty()``;
4. the step's mean loss over its micro-batches (under ``torch.distributed``, over every rank's shares in one
   collective): the same on every rank, and non-finite when any micro-batch's loss was;
5. ``optimizer.step(loss=...)``: global-norm clip, finite guard and update, with the skip decided on the
   device (provetrain's Adam, AdamW or SGD): a NaN loss on any micro-step skips the whole accumulated step;
6. on a skipped step, module buffers the forward wrote (BatchNorm statistics) are put back, on the device;
7. record the step's loss, gradient norms and skip count as device tensors.

Recorded values are read on the host in one batch every ``read_every`` steps (every step on CPU, where a
read is free; every ``log_every`` steps on CUDA, so there is no host-device sync per step). Reading them
is when the contract's postconditions are counted in the certificate, the loss-trend invariant is tested,
and the non-finite and trend policies act. With ``on_nonfinite="raise"`` the error names the exact first
bad step; the bad update itself was never applied, whatever the policy.

When ``torch.distributed`` is initialised with more than one process (``torchrun``), the model runs under
``DistributedDataParallel``, each rank on its share of every global batch of ``batch_size`` examples, and
every decision is taken on values that are the same on every rank; rank 0 alone writes the outputs and the
checkpoints (:mod:`provetrain.train.distributed` states what is guaranteed).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from provetrain.contract.load import load_contract
from provetrain.contract.predicates import PREDICATES
from provetrain.contract.schema import Contract
from provetrain.data.batches import (
    BatchSource,
    DataError,
    MapBatches,
    evaluation_batches,
    first_batches,
    make_batch_source,
)
from provetrain.data.sources import DataSplits, as_splits, resolve_function
from provetrain.errors import ConfigError, ContractViolation
from provetrain.ops.adam import Adam, AdamW
from provetrain.ops.clip import first_nonfinite_gradient
from provetrain.ops.guarded import GuardedOptimizer
from provetrain.ops.sgd import SGD
from provetrain.train.activation_checkpointing import apply_activation_checkpointing
from provetrain.train.certificate import (
    GRAD,
    LOSS,
    LOSS_TREND,
    ClauseLedger,
    certify_step,
    config_contracts,
    outcome_of,
)
from provetrain.train.checkpoint import (
    Checkpoint,
    ResumeError,
    capture_rng_state,
    flatten_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
)
from provetrain.train.config import TrainConfig, config_error, make_config, override
from provetrain.train.distributed import World, gradient_sync
from provetrain.train.lr_max import LrMaxEstimate, PowerBudget, estimate_lr_max, preconditioner_from_batches
from provetrain.train.model_output import LossFn, default_loss, loss_on_output, select_output
from provetrain.train.monitor import LossTrendMonitor
from provetrain.train.outputs import RunOutputs, check_output_dir
from provetrain.train.policies import SkipBudget, nonfinite_clause
from provetrain.train.schedule import Schedule
from provetrain.train.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint, training_tensors

__all__ = ["Callback", "Terminated", "TrainResult", "Trainer"]


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during :meth:`Trainer.fit`: raised like Ctrl-C, so the run ends through the same path
    (the certificate says ``failed``, the last checkpoint stays loadable)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While training, SIGTERM raises :class:`Terminated`; the previous handler is restored after.

    Signal handlers can only be set from the main thread: elsewhere SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("received SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Callback:
    """Hooks called by :class:`Trainer`; override the ones you need."""

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After a step's values were read back (``row`` is its metrics.jsonl line)."""

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """After an evaluation on the held-out set."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the run, outputs written."""


@dataclass
class TrainResult:
    """What a run did: counts, the last evaluation, where its outputs are, and its certificate."""

    steps: int
    applied_steps: int
    skipped_steps: int
    rollbacks: int
    final_loss: float
    evaluation: dict[str, float] | None
    output_dir: Path
    certificate: dict[str, Any] = field(repr=False)
    lr_max: float | None = None  # the declared bound that `lr < lr_max` enforced; None: unchecked
    lr_max_estimate: LrMaxEstimate | None = None  # lr_max: auto's estimate, reported and not enforced


@dataclass
class _Pending:
    step: int
    lr: float
    loss: Tensor
    grad_norm: Tensor
    clipped_norm: Tensor
    skipped: Tensor


class _BufferGuard:
    """The module's buffers as they were before a step's forward, put back when the step is skipped.

    The forward writes buffers (BatchNorm's running statistics) before the step is known to be good; a
    skipped step must leave them as they were, like the weights. Each buffer is copied into a tensor
    allocated once, and restored with ``torch.where`` on the optimizer's skip flag: all on the device, no
    host read. Buffers updated in place or reassigned with the same shape are covered.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._saved: dict[str, Tensor] = {}

    @torch.no_grad()
    def save_(self) -> None:
        for name, buffer in self.module.named_buffers():
            saved = self._saved.get(name)
            if saved is None or not _same_layout(saved, buffer):
                saved = self._saved[name] = torch.empty_like(buffer)
            saved.copy_(buffer)

    @torch.no_grad()
    def restore_if_(self, skipped: Tensor) -> None:
        """Put every saved buffer back where ``skipped`` (a 0-d bool device tensor) is true."""
        for name, buffer in self.module.named_buffers():
            saved = self._saved.get(name)
            if saved is not None and _same_layout(saved, buffer):
                buffer.copy_(torch.where(skipped.to(buffer.device, non_blocking=True), saved, buffer))


_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16-autocast": torch.bfloat16,
    "fp16-amp": torch.float16,
}


def _class_scores(predicted: Any, targets: Tensor) -> bool:
    """Whether ``predicted`` holds one score per class for each target, a class index: what an accuracy
    (``argmax(-1) == targets``) means. A regression's output (float targets, one value per example) is not:
    compared, it would broadcast to a meaningless number."""
    return (
        isinstance(predicted, Tensor)
        and predicted.dim() == targets.dim() + 1
        and predicted.shape[:-1] == targets.shape
        and not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    )


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


# Diagnostics of the last step, not training state: NaN before the first step and after a skipped one, and
# rewritten by the next step. A checkpoint records them as absent (the finiteness rule is for state), and a
# resumed optimizer starts them afresh.
_DIAGNOSTIC_COUNTERS = ("last_grad_norm", "last_clipped_grad_norm")
_COUNTERS = "provetrain"  # where provetrain's optimizers keep their counters in their state_dict

# The outcome of a run that has started and not ended: what a killed run's certificate keeps saying.
_UNFINISHED = "failed: did not finish (the process was killed, or the final certificate could not be written)"


@dataclass
class _Snapshot:
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    applied_steps: int


def no_decay_names(model: nn.Module, patterns: Sequence[str] | None) -> set[str]:
    """The names of ``model``'s parameters that get no weight decay.

    ``patterns=None``: nanoGPT's ``configure_optimizers`` rule, every parameter with fewer than 2 dimensions
    (biases, LayerNorm/RMSNorm weights) and the weight of every ``nn.Embedding``; otherwise the parameters
    whose name matches one of the shell-style ``patterns`` (``fnmatch``: ``*.bias``, ``*norm*``)."""
    import fnmatch

    named = dict(model.named_parameters())
    if patterns is not None:
        return {n for n in named if any(fnmatch.fnmatchcase(n, pattern) for pattern in patterns)}
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding | nn.EmbeddingBag)}
    return {n for n, p in named.items() if p.dim() < 2 or id(p) in embeddings}


def _optimizer_class(name: str) -> type[GuardedOptimizer]:
    """The provetrain optimizer ``optimizer`` names."""
    return {"adam": Adam, "adamw": AdamW, "sgd": SGD}[name]


def _with_momentum(estimate: LrMaxEstimate, momentum: float, *, nesterov: bool) -> LrMaxEstimate:
    r"""SGD's threshold ``2 / λ`` for momentum :math:`\mu` (torch's form, no dampening): on the quadratic's top
    eigen-direction the heavy ball is stable while :math:`\eta\lambda < 2(1 + \mu)`, Nesterov's variant while
    :math:`\eta\lambda < 2(1 + \mu) / (1 + 2\mu)` (the roots of each iteration's characteristic polynomial
    stay inside the unit circle; Goh 2017, *Why momentum really works*)."""
    if momentum == 0:
        return estimate
    factor = 2 * (1 + momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)
    form = "2(1 + mu) / (1 + 2 mu)" if nesterov else "2(1 + mu)"
    lr_max = estimate.lr_max * factor / 2
    note = (
        f" With {'Nesterov ' if nesterov else ''}momentum mu = {momentum:g} the bound is lr·λ_max(H) < {form} instead"
        f" of 2, so lr_max = {lr_max:.6g}."
    )
    return dataclasses.replace(estimate, lr_max=lr_max, explanation=estimate.explanation + note)


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its parameters and state dict are the model's), or ``module``."""
    return getattr(module, "_orig_mod", module)


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The value a resume invariant had before the setting existed, for checkpoints older than it: no
# accumulation, and weight decay on every parameter (one optimizer group).
_BEFORE_THE_SETTING: dict[str, Any] = {"gradient_accumulation_steps": 1, "no_weight_decay": []}


class Trainer:
    """Train ``model`` on ``data`` under the training-loop contract.

    Args:
        model: any ``torch.nn.Module``.
        data: a :class:`~provetrain.data.sources.DataSplits` (train and test sets), or a training set of
            ``(input, target)`` pairs: any map-style ``Dataset`` (a ``TensorDataset`` is indexed whole), an
            ``IterableDataset``, a ``DataLoader`` you built, or a
            :class:`~provetrain.data.batches.BatchSource` (see :mod:`provetrain.data.batches` for how each
            is batched and resumed).
        eval_data: the held-out set when ``data`` is a plain training set (any of the same kinds).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, given the part of the model's output at the config's
            ``output_key`` (all of it when unset); default the config's ``loss_fn`` (``module:function``), else
            cross-entropy (per token for a language model), which needs a tensor of logits.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``lr=1e-3, steps=500``...).
        callbacks: :class:`Callback` objects.
        contract: the contract to enforce and certify; default the bundled ``training-loop-v1.yaml``.
            The certificate also has a section per contract of ``contracts=[...]`` (a config key: files or
            bundled names; default ``["training-loop-v1"]``).
        console: where the progress bar and messages go; ``None`` for a quiet run.

    Under ``torch.distributed`` (more than one process) every rank builds the same Trainer; the model is
    wrapped in ``DistributedDataParallel`` at :meth:`fit`, rank 0 prints, writes ``output_dir`` and the
    checkpoints, and callbacks run on every rank with the same rows (guard side effects with
    ``trainer.world.is_main``). Every rank draws each whole global batch from its own copy of the data
    source and keeps its share (a DataLoader runs on every rank). The held-out evaluation runs on every rank
    on the same held-out batches (the weights are the same everywhere, so no collective is needed); rank
    0's is the one logged.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits | Dataset | DataLoader | BatchSource,
        *,
        eval_data: Dataset | DataLoader | None = None,
        loss_fn: LossFn | None = None,
        config: TrainConfig | None = None,
        callbacks: Sequence[Callback] = (),
        contract: Contract | None = None,
        console: Console | None = None,
        **overrides: Any,
    ) -> None:
        # A config read from a file keeps its key positions, so later errors still name the file and line.
        self.config = override(config, overrides) if config is not None else make_config(overrides)
        self.data = data = self._splits_of(data, eval_data)
        self.batches = self._batch_source(data)
        self.batch_share = 1.0  # this rank's fraction of the last global batch (set by _next_batch)
        self.world = World.current()
        self.world.set_collective_timeout(self.config.collective_timeout_minutes)
        self.world.check_strategy(self.config)
        self.world.check_batches(getattr(self.batches, "examples", self.config.batch_size), self.config.batch_size)
        self.device = self.world.local_device(_resolve_device(self.config.device))
        # The module that is trained, checkpointed and measured; a compiled one is unwrapped (its parameters
        # are the same tensors) and trained compiled, as under compile: true.
        self.model = _uncompiled(model).to(self.device)
        self._user_compiled = model if self.model is not model else None
        self._compile = self.config.compile or self._user_compiled is not None
        if self.config.activation_checkpointing is not None:  # checkpoint-v1: recompute, do not keep, activations
            try:
                apply_activation_checkpointing(self.model, self.config.activation_checkpointing)
            except ValueError as error:
                raise config_error(self.config, str(error), key="activation_checkpointing") from None
        # The loss on the model's output: the part at output_key, then loss_fn (default cross-entropy).
        self.loss_fn: LossFn = loss_on_output(loss_fn or self._configured_loss(data.task), self.config.output_key)
        self.callbacks = list(callbacks)
        self.contract = contract or load_contract()
        self.console = console if self.world.is_main else None
        self.ledger = ClauseLedger(self.contract, contracts=config_contracts(self.config))
        self.steps_per_epoch = self.batches.batches_per_epoch  # micro-batches per epoch (None: no epochs)
        # Optimizer steps: each takes gradient_accumulation_steps micro-batches.
        self.accumulation = self.config.gradient_accumulation_steps
        self.total_steps = self.config.steps or math.ceil(
            self.config.epochs * self._epoch_length() / self.accumulation  # type: ignore[operator]
        )
        self.schedule = Schedule(
            self.config.lr,
            self.total_steps,
            self.config.schedule,
            self.config.warmup_steps,
            self.config.min_lr_ratio,
            self.config.decay_steps,
            self.config.min_lr,
        )
        self._check_compile_backend()
        # On CPU a host read costs nothing, so every step is checked as it happens.
        self.read_every = 1 if self.device.type == "cpu" else self.config.log_every
        # The bound `lr < lr_max` enforces is the user's declared number (the contract does not define
        # lr_max); `lr_max: auto`'s curvature estimate is only reported (see _estimate_lr_max_if_asked).
        self.lr_max: float | None = self.config.lr_max if isinstance(self.config.lr_max, float) else None
        self.lr_max_estimate: LrMaxEstimate | None = None
        self.monitor = LossTrendMonitor(window=self.config.monitor_window, alpha=self.config.monitor_alpha)
        self.applied_steps = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.skips = SkipBudget(self.config.max_consecutive_skips, self.config.max_total_skips)
        self._pending: list[_Pending] = []
        self._rows: list[dict[str, Any]] = []
        self._snapshot: _Snapshot | None = None
        self._last_trained_step = -1
        self._buffers = _BufferGuard(self.model)
        self._autocast_dtype = _AUTOCAST_DTYPES[self.config.precision]
        # fp16 autocast scales the loss; the scaler hands provetrain's optimizer its scale and inf flag, so
        # an overflow is the optimizer's skip (one decision, counted once, no host read).
        self._scaler = torch.amp.GradScaler(self.device.type) if self.config.precision == "fp16-amp" else None
        self.outputs: RunOutputs | None = None  # rank 0's run files, from fit() on

    # ------------------------------------------------------------------------------------------------ data
    @staticmethod
    def _splits_of(data: Any, eval_data: Any) -> DataSplits:
        """``data`` as DataSplits: as it is, or a training set (any Dataset, IterableDataset, DataLoader) with
        ``eval_data`` as its held-out set. Bad data is a ConfigError at ``data``, raised before anything runs."""
        if isinstance(data, DataSplits):
            return data
        try:
            return as_splits(data, eval_data)
        except DataError as error:
            raise ConfigError(str(error), key="data") from None

    def _batch_source(self, data: DataSplits) -> BatchSource:
        try:
            return make_batch_source(data.train, self.config.batch_size, seed=self.config.seed)
        except DataError as error:
            raise ConfigError(str(error), key="data") from None

    def _epoch_length(self) -> int:
        if self.steps_per_epoch is None:
            raise ConfigError(
                f"epochs cannot be counted: the training data ({type(self.data.train).__name__}) has no length, "
                "or, for a token stream, no epochs (batches are random windows)",
                key="steps",
                expected="steps: the number of training steps",
            )
        return self.steps_per_epoch

    # ----------------------------------------------------------------------------------------------- setup
    def _configured_loss(self, task: str) -> LossFn:
        """``loss_fn: module:function`` from the config, or the default loss for ``task``."""
        if self.config.loss_fn is None:
            return default_loss(task)
        try:
            return resolve_function(self.config.loss_fn, "loss_fn")
        except ValueError as error:
            raise config_error(self.config, str(error), key="loss_fn", expected="'module:function'") from None

    def select_output(self, output: Any) -> Any:
        """The part of a model's output the loss is computed from (``output_key``; the output itself if unset)."""
        return select_output(output, self.config.output_key)

    def _check_compile_backend(self) -> None:
        if not self._compile or self.config.compile_backend is None:
            return
        from torch._dynamo import list_backends

        backend = self.config.compile_backend
        if backend not in list_backends(exclude_tags=()):
            raise config_error(
                self.config,
                f"compile_backend {backend!r} is not a torch.compile backend",
                key="compile_backend",
                expected=f"null (torch's default) or one of {', '.join(sorted(list_backends(exclude_tags=())))}",
            )

    def _compiled(self, module: nn.Module) -> nn.Module:
        """``torch.compile(module)`` under ``compile: true``; it compiles on the first forward."""
        if not self._compile:
            return module
        if self._user_compiled is not None and module is self.model:  # one process: the user's own compile
            return self._user_compiled
        backend = self.config.compile_backend or "inductor"
        return torch.compile(module, backend=backend)  # type: ignore[return-value]

    def _param_groups(self, named: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
        """Two groups: decayed with ``weight_decay``, and :func:`no_decay_names` with none (empty ones dropped)."""
        self._check_no_decay_patterns([n for n, _ in named])
        exempt = no_decay_names(self.model, self.config.no_weight_decay)
        groups = [
            {"params": [(n, p) for n, p in named if n not in exempt], "weight_decay": self.config.weight_decay},
            {"params": [(n, p) for n, p in named if n in exempt], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def _check_no_decay_patterns(self, names: list[str]) -> None:
        """Each ``no_weight_decay`` pattern names at least one trainable parameter: one that matches none is a
        typo (``*.bais``) whose parameters would silently be decayed."""
        import fnmatch

        for index, pattern in enumerate(self.config.no_weight_decay or ()):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
                raise config_error(
                    self.config,
                    f"no_weight_decay pattern {pattern!r} matches no trainable parameter of the model ({shown})",
                    key=f"no_weight_decay[{index}]",
                    expected="shell-style patterns of parameter names, e.g. '*.bias'; [] decays every parameter",
                )

    def _build_optimizer(self) -> GuardedOptimizer:
        cls = _optimizer_class(self.config.optimizer)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not PREDICATES["!params.is_empty()"](params=[p for _, p in named]):
            raise ContractViolation(
                LOSS,
                "!params.is_empty()",
                observed={"trainable_parameters": len(named)},
                hint="The model has no trainable parameters; check requires_grad or the model factory.",
            )
        self.ledger.check(LOSS, "precondition", "!params.is_empty()")
        if self.config.clip_value is not None:
            self.ledger.check(GRAD, "precondition", "clip_value > 0.0")
        return cls(
            self._param_groups(named),
            lr=self.config.lr,
            clip_value=self.config.clip_value,
            on_nonfinite="skip",
            **self._optimizer_hyperparameters(),
        )

    def _optimizer_hyperparameters(self) -> dict[str, Any]:
        """The settings of the configured optimizer alone (the config refuses another's)."""
        if self.config.optimizer == "sgd":
            return {"momentum": self.config.momentum, "nesterov": self.config.nesterov}
        return {"betas": self.config.betas, "eps": self.config.eps}

    def _preflight_lr(self) -> None:
        """``lr > 0.0``, and ``lr < lr_max`` for a declared lr_max, for every lr the schedule will produce."""
        low, high = self.schedule.extremes()
        if not PREDICATES["lr > 0.0"](lr=low):
            raise ContractViolation(LOSS, "lr > 0.0", observed={"lr": low}, hint="Use a schedule that stays above 0.")
        if self.lr_max is not None and not PREDICATES["lr < lr_max"](lr=high, lr_max=self.lr_max):
            raise ContractViolation(
                LOSS,
                "lr < lr_max",
                observed={"lr": high, "lr_max": self.lr_max},
                hint=f"Lower lr below the declared lr_max {self.lr_max:.4g}, or raise lr_max (null declares no bound).",
            )

    def _output_dir(self) -> Path:
        """Where this run's outputs will go; ``FileExistsError`` if it could not be claimed."""
        if self.config.output_dir is not None:
            directory = Path(self.config.output_dir)
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            directory = Path("runs") / f"{self.config.data}-{self.config.model}-{stamp}"
        check_output_dir(directory)
        return directory

    @torch.no_grad()
    def _preflight_eval(self) -> None:
        """The held-out forward and loss on two examples, so that an evaluation that cannot run (an empty
        held-out set, items that are not pairs, a model that does not fit them) fails before anything is
        written (eval mode: no buffer is written; no global random number drawn)."""
        if self.data.test is None:
            return
        first = next(self._evaluation_batches(), None)
        if first is None:
            raise ConfigError("the held-out set is empty; give no held-out set for no evaluation", key="data")
        self.model.eval()
        inputs, targets = (t[:2].to(self.device) for t in first)
        self.loss_fn(self.model(inputs), targets)

    # ------------------------------------------------------------------------------------------------ loop
    def fit(self, *, resume_from: str | Path | None = None) -> TrainResult:
        """Train for the configured steps or epochs; returns the run's result and writes its outputs.

        Args:
            resume_from: a checkpoint directory (``<run>/checkpoints``) or one ``step-N`` in it: the model,
                optimizer, counters, loss monitor, RNG and data position are restored, and the run continues
                exactly as the uninterrupted one would have. Outputs go to this run's own ``output_dir``.
        """
        torch.manual_seed(self.config.seed)
        # The module the training forward runs through: DDP around the model under torch.distributed, or
        # the model sharded in place by FSDP2, whose DTensor parameters the optimizer must then take; compiled
        # under compile: true (torch.compile of DDP, as torch recommends; DDP's no_sync stays reachable).
        self._ddp = self.world.wrap(
            self.model, self.device, strategy=self.config.strategy, precision=self.config.precision
        )
        self._train_module = self._compiled(self._ddp)
        self.optimizer = self._build_optimizer()
        self._resumed_from = None if resume_from is None else Path(resume_from)
        first_step = 0
        if self._resumed_from is not None:
            first_step = self._resume(self._resumed_from)
        else:
            self._estimate_lr_max_if_asked()
        self._preflight_lr()
        self._preflight_eval()
        self.output_dir = self.world.run_on_main(self._output_dir)  # checked now, claimed once training starts
        self._take_snapshot()
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            with _sigterm_raises(), self._progress(first_step) as advance:
                for step in range(first_step, self.total_steps):
                    self._train_step(step)
                    if step == first_step:  # data, model, forward and backward work: the run has started
                        self._open_outputs()
                    if (step + 1) % self.read_every == 0 or step + 1 == self.total_steps:
                        self._read_back()
                    if self.config.eval_every and self._due(step, self.config.eval_every):
                        self._evaluate(step)
                    if self.config.checkpoint_every and self._due(step, self.config.checkpoint_every):
                        self._save_checkpoint(step + 1)
                    advance()
                self._save_checkpoint(self.total_steps)
                evaluation = self._evaluate(self.total_steps - 1)
                if self.outputs is not None:
                    self.outputs.write_report(self._rows, clip_value=self.config.clip_value)
        except BaseException as caught:  # KeyboardInterrupt and SIGTERM too: the certificate must say so
            error = caught
            raise
        finally:
            self._finish(error, time.perf_counter() - started)
        # Every rank returns once rank 0's outputs are complete. The wait also lets gloo's worker threads
        # release the tensors of the last collectives while Python is alive: a process that exits right after
        # a collective can abort in interpreter shutdown (torch 2.13, gloo).
        self.world.barrier()
        result = TrainResult(
            steps=self.total_steps,
            applied_steps=self.applied_steps,
            skipped_steps=self.skips.total,
            rollbacks=self.rollbacks,
            final_loss=next((r["loss"] for r in reversed(self._rows) if "loss" in r and not r["skipped"]), math.nan),
            evaluation=evaluation,
            output_dir=self.output_dir,
            certificate=self._certificate(outcome_of(None)),
            lr_max=self.lr_max,
            lr_max_estimate=self.lr_max_estimate,
        )
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        return result

    def _due(self, step: int, every: int) -> bool:
        return (step + 1) % every == 0 and step + 1 < self.total_steps

    def _train_step(self, step: int) -> None:
        # 1. learning rate of the applied-step schedule, checked against the contract's preconditions
        lr = self.schedule.lr(self.applied_steps) * self.lr_scale
        self._check_lr(lr, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._train_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers.save_()  # the forwards may write buffers before the step is known to be good
        # 2-3. gradient_accumulation_steps micro-batches: forward, loss / k, backward; the gradients add up
        #    to those of the mean loss over the k micro-batches. Their losses add up on the device, in
        #    float64: one non-finite micro-batch loss makes the sum non-finite, and the step is skipped whole.
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(self.accumulation):
            total = total + self._micro_step(step, micro)
        self._check_gradients_present(step)
        # 4. the optimizer step's mean loss over its micro-batches (under torch.distributed, over every
        #    rank's shares, in one collective): the same on every rank, and non-finite on all when one of its
        #    terms is, so that every rank skips the same steps
        loss = self.world.mean_loss(total / self.accumulation, share=1.0)
        # 5. clip + finite guard + update; a non-finite loss or gradient skips it on the device. Under DDP
        #    every rank holds the whole averaged gradient, so the optimizer's norm is already the global one.
        skipped_before = self.optimizer.skipped_steps.clone()
        if self._scaler is None:
            self.optimizer.step(loss=loss)
        else:  # the optimizer unscales, clips and skips; update() backs the scale off after an overflow
            self._scaler.step(self.optimizer, loss=loss)
            self._scaler.update()
        skipped = self.optimizer.skipped_steps - skipped_before
        # 6. a skipped step leaves the buffers as they were, like the weights (decided on the device)
        self._buffers.restore_if_(skipped > 0)
        # 7. keep this step's values on the device until the next read-back
        self._last_trained_step = step
        self._pending.append(
            _Pending(
                step,
                lr,
                loss.detach().reshape(()).to(torch.float64),
                self.optimizer.last_grad_norm.clone(),
                self.optimizer.last_clipped_grad_norm.clone(),
                skipped,
            )
        )

    def _micro_step(self, step: int, micro: int) -> Tensor:
        """Forward and backward of micro-batch ``micro`` of optimizer step ``step``; returns this rank's share
        of its mean loss (``share * loss``, float64, on the device: no host read).

        Under DDP (FSDP2) the backward averages (reduce-scatters) the gradients over the ranks on the last
        micro-batch only: the others run under ``no_sync`` (``set_requires_gradient_sync(False)``), so the
        gradients accumulate locally and are reduced once per step (:func:`~.distributed.gradient_sync`). The weight
        ``W * share / k`` (``1 / k`` for equal shares) makes the sum the gradient of the step's mean loss."""
        inputs, targets = self._next_batch()
        share = self.batch_share
        last = micro == self.accumulation - 1
        with gradient_sync(self._ddp, enabled=last):
            with self._autocast():
                loss = self.loss_fn(self._forward(inputs, step), targets)
            weight = self.world.size * share / self.accumulation
            scaled = loss if weight == 1.0 else loss * weight
            (scaled if self._scaler is None else self._scaler.scale(scaled)).backward()
        return loss.detach().reshape(()).to(torch.float64) * share

    def _forward(self, inputs: Tensor, step: int) -> Any:
        """The training forward; under ``compile`` a failure of torch.compile is a ConfigError at ``compile``."""
        if not self._compile:
            return self._train_module(inputs)
        from torch._dynamo.exc import TorchDynamoException

        try:
            return self._train_module(inputs)
        except TorchDynamoException as error:
            backend = self.config.compile_backend or "inductor"
            detail = str(error).strip().splitlines()
            problem = (
                f"torch.compile (backend {backend!r}) failed on the model's training forward at step {step}: "
                f"{type(error).__name__}: {' '.join(detail[:2])}"
            )
            expected = (
                "compile: false to train the model uncompiled, or compile_backend: eager to tell a graph-capture "
                "problem from a backend one"
            )
            raise config_error(self.config, problem, key="compile", expected=expected) from error

    def _autocast(self) -> Any:
        """The training forward's autocast context (``precision``); a no-op for fp32."""
        dtype = self._autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _check_lr(self, lr: float, step: int) -> None:
        self.ledger.check(LOSS, "precondition", "lr > 0.0", passed=int(lr > 0.0), failed=int(not lr > 0.0))
        if not PREDICATES["lr > 0.0"](lr=lr):
            raise ContractViolation(LOSS, "lr > 0.0", step=step, observed={"lr": lr})
        if self.lr_max is None:
            return
        below = bool(PREDICATES["lr < lr_max"](lr=lr, lr_max=self.lr_max))
        self.ledger.check(LOSS, "precondition", "lr < lr_max", passed=int(below), failed=int(not below))
        if not below:
            raise ContractViolation(LOSS, "lr < lr_max", step=step, observed={"lr": lr, "lr_max": self.lr_max})

    def _check_gradients_present(self, step: int) -> None:
        present = any(p.grad is not None for group in self.optimizer.param_groups for p in group["params"])
        self.ledger.check(GRAD, "precondition", "!gradients.is_empty()", passed=int(present), failed=int(not present))
        if not present:
            raise ContractViolation(
                GRAD,
                "!gradients.is_empty()",
                step=step,
                hint="loss.backward() produced no gradient: is the loss connected to the model's parameters?",
            )

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        """The next training batch of the data source: this rank's share of the global batch, on the device.

        Every call advances the source (every rank draws the same global batch and keeps its contiguous
        share); ``self.batch_share`` is then that share's fraction of the global batch (1.0 in one process).
        """
        inputs, targets = self.batches.next_batch()
        examples = len(inputs)
        if examples < self.world.size:  # every rank draws this batch: every rank raises here, none waits
            raise DataError(
                f"a training batch of {examples} example{'s' if examples != 1 else ''} is shared by "
                f"{self.world.size} processes: a process without examples would have a NaN loss, and every such "
                "step would be skipped. The last batch of an epoch is short when the data's length is not a "
                f"multiple of its batch size: choose a batch size for which it holds at least {self.world.size} "
                "examples (a DataLoader: drop_last=True)"
            )
        inputs, targets = self.world.shard(inputs), self.world.shard(targets)
        self.batch_share = len(inputs) / examples
        # Pinned host memory (a DataLoader with pin_memory=True) lets these copies overlap the compute.
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _first_batches(self, count: int) -> list[tuple[Tensor, Tensor]]:
        """The next ``count`` whole global batches (not a rank's share), on the device; the data source is
        left where it was."""
        batches = first_batches(self.batches, count)
        return [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in batches]

    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The whole global batch ``step`` batches ahead of the source's position (the run's batch ``step``
        before training starts); the source does not move."""
        return self._first_batches(step + 1)[step]

    # ------------------------------------------------------------------------------------------ read-back
    def _read_back(self) -> None:
        """Read the pending steps' device values in one transfer, then certify and apply policies."""
        pending, self._pending = self._pending, []
        # The one host read per read_every steps: everything recorded since the last one, in a single copy.
        values = torch.stack(
            [torch.stack([p.loss, p.grad_norm, p.clipped_norm, p.skipped.to(torch.float64)]) for p in pending]
        ).tolist()
        for record, (loss, grad_norm, clipped, skipped_flag) in zip(pending, values, strict=True):
            skipped = skipped_flag > 0
            row = {
                "step": record.step,
                "loss": loss,
                "grad_norm": grad_norm,
                "grad_norm_clipped": clipped,
                "lr": record.lr,
                "skipped": skipped,
            }
            self._certify_step(record.step, loss, clipped, skipped)
            if skipped:
                self.skips.skipped()
                row["action"] = self._on_nonfinite(record.step, loss, grad_norm)
            else:
                self.skips.applied()
                self.applied_steps += 1
                row["action"] = self._on_trend(record.step, loss)
            self._log(row)
            for callback in self.callbacks:
                callback.on_step_end(self, row)
            if row["action"] == "rollback":
                return  # the rest of this window was discarded with the state it was computed from
        if pending and self.applied_steps % self.config.log_every == 0:
            self._take_snapshot()

    def _certify_step(self, step: int, loss: float, clipped: float, skipped: bool) -> None:
        certify_step(
            self.ledger, step, loss=loss, clipped_norm=clipped, skipped=skipped, clip_value=self.config.clip_value
        )

    def _on_nonfinite(self, step: int, loss: float, grad_norm: float) -> str:
        """Apply the non-finite policy to a skipped step; returns the action taken (``skip``, ``rollback``)."""
        equation, kind, clause = nonfinite_clause(loss)
        observed = {"loss": loss, "grad_norm": grad_norm} | self._first_nonfinite_parameter(step)
        policy = self.config.on_nonfinite
        if policy == "raise":
            raise ContractViolation(
                equation,
                clause,
                kind=kind,
                step=step,
                observed=observed,
                hint="The update was not applied. Lower the learning rate, or use on_nonfinite='skip' or 'rollback'.",
            )
        if policy == "rollback":
            self.rollbacks += 1
            self.ledger.act(equation, kind, clause, "rollback")
            if self.rollbacks > self.config.max_rollbacks:
                raise ContractViolation(
                    equation,
                    clause,
                    kind=kind,
                    step=step,
                    observed=observed | {"rollbacks": self.rollbacks - 1},
                    hint=f"Gave up after {self.config.max_rollbacks} rollbacks; lower lr or inspect the data.",
                )
            self._restore_snapshot(factor=self.config.rollback_lr_factor)
            self._say(
                f"step {step}: non-finite {'loss' if equation == LOSS else 'gradient'}; rolled back to applied step "
                f"{self.applied_steps}, lr x{self.lr_scale:g}"
            )
            return "rollback"
        self.ledger.act(equation, kind, clause, "skip")
        if self.skips.exhausted:
            raise self.skips.violation(step, loss, observed)
        return "skip"

    def _first_nonfinite_parameter(self, step: int) -> dict[str, Any]:
        """Name the first parameter with a non-finite gradient, while this step's gradients still exist."""
        if step != self._last_trained_step:
            return {}
        named = ((name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None)
        found = first_nonfinite_gradient(named)
        return {} if found is None else {"parameter": found[0], "non_finite_values": found[2] + found[3]}

    def _on_trend(self, step: int, loss: float) -> str | None:
        """Feed the loss-trend monitor; act by policy when it fires. Returns the action taken, if any."""
        tests_before = self.monitor.tests
        verdict = self.monitor.update(step, loss)
        if self.monitor.tests == tests_before:
            return None
        self.ledger.check(
            LOSS,
            "invariant",
            LOSS_TREND,
            passed=int(verdict is None),
            failed=int(verdict is not None),
            first_failed_step=step,
        )
        if verdict is None:
            return None
        policy = self.config.on_loss_increase
        self.ledger.act(LOSS, "invariant", LOSS_TREND, policy)
        if policy == "raise":
            raise verdict.to_violation()
        if policy == "rollback":
            self.rollbacks += 1
            self._restore_snapshot(factor=self.config.rollback_lr_factor)
        elif policy == "reduce_lr":
            self.lr_scale *= self.config.rollback_lr_factor
        self._say(f"step {step}: {verdict.message} -> {policy}")
        return policy

    # -------------------------------------------------------------------------------- snapshots, outputs
    def _take_snapshot(self) -> None:
        # A full copy of model and optimizer state: only worth its cost when a policy can roll back to it.
        if "rollback" not in (self.config.on_nonfinite, self.config.on_loss_increase):
            return
        self._snapshot = _Snapshot(
            {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
            self.applied_steps,
        )

    def _restore_snapshot(self, *, factor: float) -> None:
        assert self._snapshot is not None  # taken before the first step under a rollback policy
        self.model.load_state_dict(self._snapshot.model)
        self.optimizer.load_state_dict(copy.deepcopy(self._snapshot.optimizer))
        self.applied_steps = self._snapshot.applied_steps
        self.lr_scale *= factor
        self._pending.clear()
        self.skips.applied()  # the skipped run was undone with the state

    def _estimate_lr_max_if_asked(self) -> None:
        """``lr_max: auto`` (opt-in): estimate the optimizer's edge of stability at the initial point and
        report it.

        Not enforced: the estimate models the optimizer on a local quadratic (Adam with a frozen
        preconditioner), while real runs train above it (``bench/lr_max_divergence.py`` measures where they
        diverge), and power iteration may stop before it converges. Refusing a rate on it would refuse rates
        that train."""
        if self.config.lr_max != "auto":
            return
        # Estimated once, by rank 0, and sent to every rank: the same report everywhere.
        with self._lr_max_progress() as progress:
            self.lr_max_estimate = estimate = self.world.run_on_main(lambda: self.estimate_lr_max(progress=progress))
        peak = self.schedule.extremes()[1]
        where = "below" if peak < estimate.lr_max else "at or above"
        state = "converged" if estimate.converged else "NOT converged: optimistic"
        if estimate.stopped:
            state += f", stopped by lr_max_budget ({estimate.stopped})"
        self._say(
            f"lr_max estimate {estimate.lr_max:.4g} ({estimate.iterations} Hessian-vector products, {state}); "
            f"peak lr {peak:.4g} is {where} it. Reported, not enforced: declare lr_max as a number to enforce a bound."
        )

    def estimate_lr_max(
        self,
        *,
        batches: int | None = None,
        iterations: int | None = None,
        seconds: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> LrMaxEstimate:
        """An estimate of the optimizer's largest stable lr at the initial point (``provetrain.train.lr_max``).

        Adam's preconditioner is the root mean squared gradient of the first ``batches`` micro-batches (one
        backward each); SGD has none, and its threshold counts its momentum (:func:`_with_momentum`). The
        curvature is measured on the union of the first ``lr_max_budget.curvature_batches`` micro-batches, by
        at most ``iterations`` Hessian-vector products in all,
        for at most ``seconds`` (defaults: the config's ``lr_max_budget``). ``progress(products_done)`` is
        called after each product. Measured on the uncompiled module (double backward through a compiled
        graph is not supported), in training mode; its buffers are put back after, and nothing else changes.

        Memory: one double-backward graph of ``curvature_batches`` micro-batches, about 2-3x the activations of
        a training step on as many examples (keep it small for a large model).

        Raises:
            ConfigError: at ``lr_max``, when the model cannot be differentiated twice, or the estimate fails.
        """
        budget = self.config.lr_max_budget
        products, curvature_batches = iterations or budget.hvp, budget.curvature_batches
        # Its forwards run in training mode and write buffers (BatchNorm statistics): they are put back after.
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        try:
            sgd = self.config.optimizer == "sgd"
            wanted = curvature_batches if sgd else batches or budget.batches
            loaded = self._first_batches(min(wanted, self.steps_per_epoch or wanted))
            params = [p for p in self.model.parameters() if p.requires_grad]
            losses = [lambda x=x, y=y: self.loss_fn(self.model(x), y) for x, y in loaded]
            preconditioner = None if sgd else preconditioner_from_batches(losses, params, eps=self.config.eps)
            # The curvature of their union: one minibatch's is noisy enough to turn its sign.
            inputs, targets = (torch.cat(parts) for parts in zip(*loaded[:curvature_batches], strict=True))
            estimate = estimate_lr_max(
                lambda: self.loss_fn(self.model(inputs), targets),
                params,
                optimizer="sgd" if sgd else "adam",
                betas=self.config.betas,
                eps=self.config.eps,
                preconditioner=preconditioner,
                iterations=products,
                budget=PowerBudget(products, seconds if seconds is not None else budget.seconds, progress),
            )
            return _with_momentum(estimate, self.config.momentum, nesterov=self.config.nesterov) if sgd else estimate
        except (ValueError, RuntimeError) as error:
            problem = f"the lr_max estimate failed: {type(error).__name__}: {error}"
            raise config_error(
                self.config, problem, key="lr_max", expected="a number to enforce, or null (no estimate)"
            ) from None
        finally:
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    if name in buffers and _same_layout(buffer, buffers[name]):
                        buffer.copy_(buffers[name])

    @contextlib.contextmanager
    def _lr_max_progress(self) -> Iterator[Callable[[int], None] | None]:
        """A progress bar of Hessian-vector products, like the training bar (on a terminal only)."""
        if self.console is None or not self.console.is_terminal:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        columns = ("lr_max", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("lr_max", total=self.config.lr_max_budget.hvp)
            yield lambda done: bar.update(task, completed=done)

    # --------------------------------------------------------------------------------------- checkpoints
    _RESUME_INVARIANT_KEYS = (
        "data",
        "data_args",
        "model",
        "model_args",
        "optimizer",
        "batch_size",
        "gradient_accumulation_steps",
        "seed",
        "no_weight_decay",  # the parameter groups: which saved state belongs to which parameter
    )

    def _checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _save_checkpoint(self, next_step: int) -> None:
        """Everything the run needs to continue exactly; never a non-finite tensor (the writer refuses).

        Under torch.distributed every rank holds the same state: rank 0 writes it, and the other ranks wait
        until it is written (or raise rank 0's error)."""
        if self._pending:  # the policies see every step before its state is saved (a host read, rare)
            self._read_back()
        # A run resumed from this checkpoint rolls back to it (its first snapshot): so does this run, or the
        # two would roll back to different states after a non-finite step (rollback policies only).
        self._take_snapshot()
        if self._sharded:  # FSDP2: every rank writes its own shards, rank 0 commits (sharded_checkpoint)
            save_sharded_checkpoint(
                self._checkpoint_dir(),
                step=next_step,
                tensors=self._sharded_tensors(),
                state=self._run_state(next_step),
                keep_last=self.config.keep_checkpoints,
            )
            return
        self.world.run_on_main(lambda: self._write_checkpoint(next_step))

    @property
    def _sharded(self) -> bool:
        return self.config.strategy == "fsdp" and self.world.size > 1

    def _sharded_tensors(self) -> dict[str, Tensor]:
        """Model and optimizer tensors by name, without the last-step diagnostics (NaN by design)."""
        tensors = training_tensors(self.model, self.optimizer)
        return {k: v for k, v in tensors.items() if k.rsplit("/", 1)[-1] not in _DIAGNOSTIC_COUNTERS}

    def _write_checkpoint(self, next_step: int) -> None:
        model_tensors, model_structure = flatten_state(self.model.state_dict(), prefix="model")
        optimizer_tensors, optimizer_structure = flatten_state(self._optimizer_state(), prefix="optimizer")
        state = {**self._run_state(next_step), "model": model_structure, "optimizer": optimizer_structure}
        save_checkpoint(
            self._checkpoint_dir(),
            step=next_step,
            tensors=model_tensors | optimizer_tensors,
            state=state,
            keep_last=self.config.keep_checkpoints,
            overwrite=True,
        )

    def _run_state(self, next_step: int) -> dict[str, Any]:
        """The checkpoint's plain data: counters, monitor, ledger, RNG, config (no model, no optimizer)."""
        return {
            "next_step": next_step,
            "applied_steps": self.applied_steps,
            "skipped_steps": self.skips.total,
            "consecutive_skips": self.skips.consecutive,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "lr_max": self.lr_max,
            "lr_max_estimate": None if self.lr_max_estimate is None else self.lr_max_estimate.to_dict(),
            "monitor": self.monitor.state_dict(),
            "ledger": self.ledger.state_dict(),
            "rng": capture_rng_state(),
            "config": self.config.model_dump(mode="json"),
            "grad_scaler": None if self._scaler is None else self._scaler.state_dict(),
            "data": self.batches.state_dict(),  # the data source's position (and its generator, if any)
        }

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state without its last-step diagnostics (:data:`_DIAGNOSTIC_COUNTERS`)."""
        state = self.optimizer.state_dict()
        counters = state.get(_COUNTERS)
        if isinstance(counters, dict):
            state[_COUNTERS] = {k: v for k, v in counters.items() if k not in _DIAGNOSTIC_COUNTERS}
        return state

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's optimizer state; the diagnostics it records as absent keep their fresh values."""
        counters = state.get(_COUNTERS)
        if isinstance(counters, dict):
            live = self.optimizer.state_dict().get(_COUNTERS, {})
            state[_COUNTERS] = {k: v for k, v in live.items() if k in _DIAGNOSTIC_COUNTERS} | counters
        # torch's load puts the saved groups' hyper-parameters back; this run's config (which its certificate
        # records) decides them: a weight_decay or betas changed for the resumed run would be silently ignored.
        # (lr is the schedule's, set at every step.)
        configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, settings in zip(self.optimizer.param_groups, configured, strict=True):
            group.update(settings)

    def _resume(self, path: Path) -> int:
        """Restore a checkpoint saved by this Trainer; returns the step to continue from.

        Raises:
            ResumeError: the checkpoint is missing, corrupt or inconsistent, was saved with other settings
                (naming them), or is at or past this run's last step.
        """
        try:
            if self._sharded:  # FSDP2: each rank reads the shards it holds, in place (sharded_checkpoint)
                directory, step = (path.parent, int(path.name[5:])) if path.name.startswith("step-") else (path, None)
                sharded = load_sharded_checkpoint(directory, self._sharded_tensors(), step=step)
                checkpoint = Checkpoint(sharded.step, {}, sharded.state, sharded.path)
            else:
                checkpoint = self._load_resume_checkpoint(path)
            state = checkpoint.state
            if not isinstance(state, dict):
                raise ResumeError(f"cannot resume from {path}: state.json holds {type(state).__name__}, not a mapping")
            next_step = self._check_resume_state(checkpoint.path, checkpoint.step, state)
            if not self._sharded:
                self.model.load_state_dict(unflatten_state(checkpoint.tensors, state["model"]))
                self._load_optimizer_state(unflatten_state(checkpoint.tensors, state["optimizer"]))
            self.monitor.load_state_dict(state["monitor"])
            if "ledger" in state:  # checkpoints from before the ledger was saved certify from the resume on
                self.ledger.load_state_dict(state["ledger"])
            if self._scaler is not None and state.get("grad_scaler"):
                self._scaler.load_state_dict(state["grad_scaler"])
            self._restore_data_position(state.get("data"), next_step)
            # The bound is this run's declared lr_max (as before training); the estimate, made at the start of
            # the run, is kept for the certificate. (A checkpoint from before lr_max: auto stopped being a bound
            # holds the estimate as "lr_max": it is not enforced either.)
            saved_estimate = state.get("lr_max_estimate")
            lr_max_estimate = None if saved_estimate is None else LrMaxEstimate.from_dict(saved_estimate)
            restore_rng_state(state["rng"])
        except ResumeError:
            raise
        except KeyError as error:
            raise ResumeError(f"cannot resume from {path}: state.json has no entry {error}") from error
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as error:
            raise ResumeError(f"cannot resume from {path}: {error}") from error
        self.applied_steps = state["applied_steps"]
        self.skips.total = state["skipped_steps"]
        self.skips.consecutive = state["consecutive_skips"]
        self.rollbacks = state["rollbacks"]
        self.lr_scale = state["lr_scale"]
        self.lr_max_estimate = lr_max_estimate
        return next_step

    def _restore_data_position(self, saved: dict[str, Any] | None, next_step: int) -> None:
        """The data source continues where the checkpoint left it. A checkpoint from before data sources
        were saved (no ``data``) drew batch ``step`` as a function of the step, which a map-style dataset
        reproduces; other sources cannot resume from it."""
        if saved is not None:
            self.batches.load_state_dict(saved)
        elif isinstance(self.batches, MapBatches):
            self.batches.seek(next_step)
        else:
            raise ResumeError("the checkpoint has no data position (it predates data sources); start a new run")

    @staticmethod
    def _load_resume_checkpoint(path: Path) -> Checkpoint:
        if path.name.startswith("step-"):
            step = path.name.removeprefix("step-")
            if not step.isdigit():
                raise ResumeError(f"cannot resume from {path}: a checkpoint is named step-<N> with N a number")
            return load_checkpoint(path.parent, int(step))
        return load_checkpoint(path)

    def _check_resume_state(self, where: Path, step: int, state: dict[str, Any]) -> int:
        """The checkpoint's counters are consistent and its settings are this run's; returns its next step."""

        def count(key: str) -> int:
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ResumeError(f"cannot resume from {where}: state.json: {key} is {value!r}, not a count >= 0")
            return value

        next_step, applied, skipped = count("next_step"), count("applied_steps"), count("skipped_steps")
        if next_step != step or applied + skipped > next_step or count("consecutive_skips") > skipped:
            raise ResumeError(
                f"cannot resume from {where}: state.json: next_step={next_step}, applied_steps={applied}, "
                f"skipped_steps={skipped} do not fit a checkpoint of step {step}"
            )
        count("rollbacks")
        scale = state.get("lr_scale")
        if not isinstance(scale, float | int) or not 0 < scale <= 1:
            raise ResumeError(f"cannot resume from {where}: state.json: lr_scale is {scale!r}, not in (0, 1]")
        saved, current = state["config"], self.config.model_dump(mode="json")
        if not isinstance(saved, dict):
            raise ResumeError(
                f"cannot resume from {where}: state.json: config is {type(saved).__name__}, not a mapping"
            )
        # A setting newer than the checkpoint is absent from its config: the run had the behaviour before it.
        saved = {**_BEFORE_THE_SETTING, **saved}
        changed = [k for k in self._RESUME_INVARIANT_KEYS if saved.get(k) != current.get(k)]
        if changed:
            raise ResumeError(
                f"cannot resume from {where}: its run used different {', '.join(changed)} "
                f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}; this run has "
                f"{', '.join(f'{k}={current.get(k)!r}' for k in changed)}); resume with the same settings"
            )
        if next_step >= self.total_steps:
            raise ResumeError(
                f"cannot resume from {where}: it is at step {next_step}, and this run ends at step "
                f"{self.total_steps} (steps is the total, not the steps to add); give more than {next_step} "
                "steps to continue"
            )
        return next_step

    def _evaluation_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The held-out batches: the whole set, or ``eval_batches`` random ones (the same at every evaluation)."""
        return evaluation_batches(
            self.data.test, batch_size=self.config.batch_size, count=self.config.eval_batches, seed=self.config.seed
        )

    @torch.no_grad()
    def _evaluate(self, step: int) -> dict[str, float] | None:
        """Mean loss per example and accuracy per target over the held-out batches (eval mode)."""
        if self.data.test is None:
            return None
        self.model.eval()
        # Summed on the device in float64 (each batch's mean loss times its size), read once at the end.
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        examples, targets_seen = 0, 0
        for inputs, targets in self._evaluation_batches():
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            outputs = self.model(inputs)
            total_loss += self.loss_fn(outputs, targets).detach().double() * len(inputs)
            predicted = self.select_output(outputs)  # no accuracy for an output that is not class scores
            if _class_scores(predicted, targets):
                correct += (predicted.argmax(-1) == targets).sum()
                targets_seen += targets.numel()
            examples += len(inputs)
        loss, right = torch.stack([total_loss, correct.double()]).tolist()  # the evaluation's one host read
        evaluation = {"loss": loss / examples} | ({"accuracy": right / targets_seen} if targets_seen else {})
        row = {"step": step, "eval": evaluation}
        self._log(row)
        for callback in self.callbacks:
            callback.on_evaluate(self, row)
        return evaluation

    def _certificate(self, outcome: str) -> dict[str, Any]:
        run = {
            "resumed_from": None if self._resumed_from is None else str(self._resumed_from),
            "config": self.config.model_dump(mode="json"),
            "device": str(self.device),
            "world_size": self.world.size,
            "steps": self.total_steps,
            "applied_steps": self.applied_steps,
            "skipped_steps": self.skips.total,
            "rollbacks": self.rollbacks,
            "lr_max": self.lr_max,  # the declared bound `lr < lr_max` was checked against; None: unchecked
            # lr_max: auto's estimate with its convergence: reported, never enforced
            "lr_max_estimate": None if self.lr_max_estimate is None else self.lr_max_estimate.to_dict(),
            "torch": torch.__version__,
        }
        return self.ledger.certificate(run=run, outcome=outcome)

    def _finish(self, error: BaseException | None, seconds: float) -> None:
        """Rank 0 writes the certificate whatever ended the run (a minimal one if the disk is full)."""
        if self.outputs is None:  # not rank 0, or the run never started: nothing was written
            return
        if error is not None:  # the report helps explain a failure; it must not hide it
            with contextlib.suppress(Exception):
                self.outputs.write_report(self._rows, clip_value=self.config.clip_value)
        with contextlib.suppress(OSError):
            self.outputs.close()
        self.outputs.write_certificate(self._certificate(outcome_of(error)) | {"seconds": round(seconds, 3)})

    def _open_outputs(self) -> None:
        """Rank 0 claims the run directory (new or empty) and writes a certificate saying the run has not
        finished, replaced when it ends (what a killed run leaves behind)."""

        def create() -> None:
            self.outputs = RunOutputs(self.output_dir)
            self.outputs.write_certificate(self._certificate(_UNFINISHED))

        self.world.run_on_main(create)

    def _log(self, row: dict[str, Any]) -> None:
        """Keep a metrics row (every rank) and append it to metrics.jsonl (rank 0)."""
        if self.outputs is not None:
            self.outputs.log(row)
        self._rows.append(row)

    def _say(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False)  # messages quote user values

    def _progress(self, first_step: int = 0) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def bar() -> Any:
            if self.console is None or not self.console.is_terminal:
                yield lambda: None
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            with Progress("train", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=self.console) as p:
                task = p.add_task("train", total=self.total_steps, completed=first_step)
                yield lambda: p.advance(task)

        return bar()
