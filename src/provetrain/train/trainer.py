"""The contract-governed training loop.

One step, in order (each phase a short helper):

1. learning rate from the schedule of *applied* steps; check ``lr > 0.0``, and ``lr < lr_max`` when an
   ``lr_max`` is declared (an ``lr_max: auto`` estimate is reported, never enforced);
2. the batch for this step (the data position advances even when the step is later skipped: a bad batch
   is dropped, so the run equals one that never saw it);
3. forward, loss, backward; check ``!gradients.is_empty()``;
4. under ``torch.distributed``, the global batch's mean loss, the same on every rank;
5. ``optimizer.step(loss=...)``: global-norm clip, finite guard and update, with the skip decided on the
   device (provetrain's Adam/AdamW);
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
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from provetrain.contract.load import load_contract
from provetrain.contract.predicates import PREDICATES
from provetrain.contract.schema import Contract
from provetrain.data.sources import DataSplits
from provetrain.errors import ContractViolation
from provetrain.ops.adam import Adam, AdamW
from provetrain.ops.clip import first_nonfinite_gradient
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
from provetrain.train.config import TrainConfig, config_error, make_config
from provetrain.train.distributed import World
from provetrain.train.lr_max import LrMaxEstimate, estimate_lr_max, preconditioner_from_batches
from provetrain.train.monitor import LossTrendMonitor
from provetrain.train.outputs import RunOutputs, check_output_dir
from provetrain.train.policies import SkipBudget, nonfinite_clause
from provetrain.train.schedule import Schedule

__all__ = ["Callback", "Terminated", "TrainResult", "Trainer"]


LossFn = Callable[[Tensor, Tensor], Tensor]


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


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


# Diagnostics of the last step, not training state: NaN before the first step and after a skipped one, and
# rewritten by the next step. A checkpoint records them as absent (the finiteness rule is for state), and a
# resumed optimizer starts them afresh.
_DIAGNOSTIC_COUNTERS = ("last_grad_norm", "last_clipped_grad_norm")
_COUNTERS = "provetrain"  # where provetrain's Adam keeps its counters in its state_dict

# The outcome of a run that has started and not ended: what a killed run's certificate keeps saying.
_UNFINISHED = "failed: did not finish (the process was killed, or the final certificate could not be written)"


@dataclass
class _Snapshot:
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    applied_steps: int


def _default_loss(task: str) -> LossFn:
    if task == "language-model":
        return lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return F.cross_entropy


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    """Train ``model`` on ``data`` under the training-loop contract.

    Args:
        model: any ``torch.nn.Module``.
        data: a :class:`~provetrain.data.sources.DataSplits` (train and test sets) or a ``TensorDataset``
            of ``(x, y)`` for classification.
        eval_data: a held-out ``TensorDataset`` when ``data`` is a plain dataset.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy (per token for a language model).
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``lr=1e-3, steps=500``...).
        callbacks: :class:`Callback` objects.
        contract: the contract to enforce and certify; default the bundled ``training-loop-v1.yaml``.
            The certificate also has a section per contract of ``contracts=[...]`` (a config key: files or
            bundled names; default ``["training-loop-v1"]``).
        console: where the progress bar and messages go; ``None`` for a quiet run.

    Under ``torch.distributed`` (more than one process) every rank builds the same Trainer; the model is
    wrapped in ``DistributedDataParallel`` at :meth:`fit`, rank 0 prints, writes ``output_dir`` and the
    checkpoints, and callbacks run on every rank with the same rows (guard side effects with
    ``trainer.world.is_main``). The held-out evaluation runs on every rank on the whole held-out set (the
    weights are the same everywhere, so no collective is needed); rank 0's is the one logged.
    """

    def __init__(
        self,
        model: nn.Module,
        data: DataSplits | TensorDataset,
        *,
        eval_data: TensorDataset | None = None,
        loss_fn: LossFn | None = None,
        config: TrainConfig | None = None,
        callbacks: Sequence[Callback] = (),
        contract: Contract | None = None,
        console: Console | None = None,
        **overrides: Any,
    ) -> None:
        base = config.model_dump() if config is not None else {}
        self.config = make_config({**base, **overrides})
        if isinstance(data, TensorDataset):
            data = DataSplits(data, eval_data, "classification", tuple(data.tensors[0].shape[1:]), 0)
        self.data = data
        self.world = World.current()
        self.world.set_collective_timeout(self.config.collective_timeout_minutes)
        self.world.check_batches(len(data.train), self.config.batch_size)
        self.device = self.world.local_device(_resolve_device(self.config.device))
        self.model = model.to(self.device)
        if self.config.activation_checkpointing is not None:  # checkpoint-v1: recompute, do not keep, activations
            try:
                apply_activation_checkpointing(self.model, self.config.activation_checkpointing)
            except ValueError as error:
                raise config_error(self.config, str(error), key="activation_checkpointing") from None
        self.loss_fn = loss_fn or _default_loss(data.task)
        self.callbacks = list(callbacks)
        self.contract = contract or load_contract()
        self.console = console if self.world.is_main else None
        self.ledger = ClauseLedger(self.contract, contracts=config_contracts(self.config))
        self.steps_per_epoch = math.ceil(len(data.train) / self.config.batch_size)
        self.total_steps = self.config.steps or self.config.epochs * self.steps_per_epoch  # type: ignore[operator]
        self.schedule = Schedule(
            self.config.lr,
            self.total_steps,
            self.config.schedule,
            self.config.warmup_steps,
            self.config.min_lr_ratio,
        )
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

    # ----------------------------------------------------------------------------------------------- setup
    def _build_optimizer(self) -> Adam:
        cls = AdamW if self.config.optimizer == "adamw" else Adam
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
            named,
            lr=self.config.lr,
            betas=self.config.betas,
            eps=self.config.eps,
            weight_decay=self.config.weight_decay,
            clip_value=self.config.clip_value,
            on_nonfinite="skip",
        )

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
        """The held-out forward and loss on two examples, so that an evaluation that cannot run fails before
        anything is written (eval mode: no buffer is written, no random number drawn)."""
        if self.data.test is None or len(self.data.test) == 0:
            return
        self.model.eval()
        inputs, targets = (t[:2].to(self.device) for t in self.data.test.tensors)
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
        self.optimizer = self._build_optimizer()
        # The module the training forward runs through: DDP around the model under torch.distributed.
        self._train_module = self.world.wrap(self.model, self.device)
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
        # 2. this step's batch (a fixed function of the step, so a resumed run sees the same data); under
        #    torch.distributed, this rank's share of it
        indices = self._batch_indices(step)
        local = self.world.shard(indices)
        inputs, targets = self._examples(local)
        # 3. forward, loss, backward; under DDP the backward averages the gradients over the ranks, and the
        #    weight (1.0 for equal shares) makes that average the gradient of the global batch's mean loss
        self._train_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._buffers.save_()  # the forward may write buffers before the step is known to be good
        with self._autocast():
            loss = self.loss_fn(self._train_module(inputs), targets)
        weight = self.world.size * len(local) / len(indices)
        scaled = loss if weight == 1.0 else loss * weight
        (scaled if self._scaler is None else self._scaler.scale(scaled)).backward()
        self._check_gradients_present(step)
        # 4. the global batch's mean loss: the same on every rank, and non-finite on all when it is on one,
        #    so that every rank skips the same steps (in one process, the loss itself)
        loss = self.world.mean_loss(loss.detach(), share=len(local) / len(indices))
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

    def _batch_indices(self, step: int) -> Tensor:
        """The training examples of the global batch of ``step``: every rank draws the same ones."""
        epoch, index = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.data.train), generator=generator)
        return order[index * self.config.batch_size : (index + 1) * self.config.batch_size]

    def _examples(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        inputs, targets = (t[indices] for t in self.data.train.tensors)
        return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)

    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The whole global batch of ``step`` (not a rank's share)."""
        return self._examples(self._batch_indices(step))

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
        """``lr_max: auto``: estimate Adam's edge of stability at the initial point and report it.

        Not enforced: the estimate models Adam on a frozen-preconditioner quadratic, while real runs train
        above it (``bench/lr_max_divergence.py`` measures where they diverge), and power iteration may stop
        before it converges. Refusing a rate on it would refuse rates that train."""
        if self.config.lr_max != "auto":
            return
        # Estimated once, by rank 0, on whole global batches, and sent to every rank: the same report everywhere.
        self.lr_max_estimate = estimate = self.world.run_on_main(self.estimate_lr_max)
        peak = self.schedule.extremes()[1]
        where = "below" if peak < estimate.lr_max else "at or above"
        self._say(
            f"lr_max estimate {estimate.lr_max:.4g} ({estimate.iterations} Hessian-vector products, "
            f"{'converged' if estimate.converged else 'NOT converged: optimistic'}); peak lr {peak:.4g} is {where} "
            "it. Reported, not enforced: declare lr_max as a number to enforce a bound."
        )

    def estimate_lr_max(self, *, batches: int = 16, iterations: int = 50) -> LrMaxEstimate:
        """An estimate of Adam's largest stable lr at the initial point (``provetrain.train.lr_max``): the
        preconditioner from the mean squared gradient of the first ``batches`` batches, the curvature on their
        union (up to 1024 examples), at most ``iterations`` Hessian-vector products per power iteration. Uses
        the data of the first steps and the model as it is now; changes nothing."""
        # Its forwards run in training mode and write buffers (BatchNorm statistics): they are put back after.
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        try:
            loaded = [self._batch(i) for i in range(min(batches, self.steps_per_epoch))]
            params = [p for p in self.model.parameters() if p.requires_grad]
            losses = [lambda x=x, y=y: self.loss_fn(self.model(x), y) for x, y in loaded]
            preconditioner = preconditioner_from_batches(losses, params, eps=self.config.eps)
            inputs, targets = (torch.cat(parts)[:1024] for parts in zip(*loaded, strict=True))
            return estimate_lr_max(
                lambda: self.loss_fn(self.model(inputs), targets),
                params,
                optimizer="adam",
                betas=self.config.betas,
                eps=self.config.eps,
                preconditioner=preconditioner,
                iterations=iterations,
            )
        finally:
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    if name in buffers and _same_layout(buffer, buffers[name]):
                        buffer.copy_(buffers[name])

    # --------------------------------------------------------------------------------------- checkpoints
    _RESUME_INVARIANT_KEYS = ("data", "data_args", "model", "model_args", "optimizer", "batch_size", "seed")

    def _checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _save_checkpoint(self, next_step: int) -> None:
        """Everything the run needs to continue exactly; never a non-finite tensor (the writer refuses).

        Under torch.distributed every rank holds the same state: rank 0 writes it, and the other ranks wait
        until it is written (or raise rank 0's error)."""
        if self._pending:  # the policies see every step before its state is saved (a host read, rare)
            self._read_back()
        self.world.run_on_main(lambda: self._write_checkpoint(next_step))

    def _write_checkpoint(self, next_step: int) -> None:
        model_tensors, model_structure = flatten_state(self.model.state_dict(), prefix="model")
        optimizer_tensors, optimizer_structure = flatten_state(self._optimizer_state(), prefix="optimizer")
        state = {
            "next_step": next_step,
            "applied_steps": self.applied_steps,
            "skipped_steps": self.skips.total,
            "consecutive_skips": self.skips.consecutive,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "lr_max": self.lr_max,
            "lr_max_estimate": None if self.lr_max_estimate is None else self.lr_max_estimate.to_dict(),
            "model": model_structure,
            "optimizer": optimizer_structure,
            "monitor": self.monitor.state_dict(),
            "ledger": self.ledger.state_dict(),
            "rng": capture_rng_state(),
            "config": self.config.model_dump(mode="json"),
            "grad_scaler": None if self._scaler is None else self._scaler.state_dict(),
        }
        save_checkpoint(
            self._checkpoint_dir(),
            step=next_step,
            tensors=model_tensors | optimizer_tensors,
            state=state,
            keep_last=self.config.keep_checkpoints,
            overwrite=True,
        )

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
        self.optimizer.load_state_dict(state)

    def _resume(self, path: Path) -> int:
        """Restore a checkpoint saved by this Trainer; returns the step to continue from.

        Raises:
            ResumeError: the checkpoint is missing, corrupt or inconsistent, was saved with other settings
                (naming them), or is at or past this run's last step.
        """
        try:
            checkpoint = self._load_resume_checkpoint(path)
            state = checkpoint.state
            next_step = self._check_resume_state(checkpoint.path, checkpoint.step, state)
            self.model.load_state_dict(unflatten_state(checkpoint.tensors, state["model"]))
            self._load_optimizer_state(unflatten_state(checkpoint.tensors, state["optimizer"]))
            self.monitor.load_state_dict(state["monitor"])
            if "ledger" in state:  # checkpoints from before the ledger was saved certify from the resume on
                self.ledger.load_state_dict(state["ledger"])
            if self._scaler is not None and state.get("grad_scaler"):
                self._scaler.load_state_dict(state["grad_scaler"])
        except ResumeError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise ResumeError(f"cannot resume from {path}: {error}") from error
        self.applied_steps = state["applied_steps"]
        self.skips.total = state["skipped_steps"]
        self.skips.consecutive = state["consecutive_skips"]
        self.rollbacks = state["rollbacks"]
        self.lr_scale = state["lr_scale"]
        # The bound is this run's declared lr_max (as before training); the estimate, made at the start of the
        # run, is kept for the certificate. (A checkpoint from before lr_max: auto stopped being a bound holds
        # the estimate as "lr_max": it is not enforced either.)
        saved_estimate = state.get("lr_max_estimate")
        self.lr_max_estimate = None if saved_estimate is None else LrMaxEstimate.from_dict(saved_estimate)
        restore_rng_state(state["rng"])
        return next_step

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

    @torch.no_grad()
    def _evaluate(self, step: int) -> dict[str, float] | None:
        test = self.data.test
        if test is None:
            return None
        self.model.eval()
        total_loss, correct, count = 0.0, 0, 0
        for start in range(0, len(test), 1024):
            inputs, targets = (t[start : start + 1024].to(self.device) for t in test.tensors)
            outputs = self.model(inputs)
            total_loss += float(self.loss_fn(outputs, targets)) * len(inputs)
            correct += int((outputs.argmax(-1) == targets).sum())
            count += targets.numel()
        evaluation = {"loss": total_loss / len(test), "accuracy": correct / count}
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
