"""What the Lightning and Hugging Face callbacks share: certifying optimizer steps, and a skip-aware schedule.

A framework's loop calls provetrain's optimizer; the callbacks see the step only from outside. Per optimizer
step, in order:

1. :meth:`StepCertifier.add_loss` for each micro-batch's loss (device tensors, summed);
2. :meth:`StepCertifier.guard_loss_` just before ``optimizer.step()``: a non-finite loss reaches the
   optimizer's finite guard even when the framework does not pass the loss to ``step()``;
3. :meth:`StepCertifier.record_step` just after it: the optimizer's counters are copied on the device;
4. :meth:`StepCertifier.read_back`, every step on CPU or every logging interval on CUDA: one host transfer
   for all pending steps, then the contract's clauses are counted in a
   :class:`~provetrain.train.certificate.ClauseLedger` exactly as :class:`~provetrain.train.trainer.Trainer`
   counts them, and the skip budget is enforced.

Frameworks advance the learning-rate schedule after every optimizer step, applied or skipped (Lightning
#5558; Hugging Face steps it unless its own ``GradScaler`` skipped). :class:`SkipAwareScheduler` holds the
schedule still on a skipped step, so it follows applied steps, as the Trainer's schedule does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from provetrain.contract.load import load_contract
from provetrain.contract.schema import Contract
from provetrain.ops.adam import Adam
from provetrain.train.certificate import GRAD, LOSS, ClauseLedger, ContractSpec, certify_step, outcome_of
from provetrain.train.outputs import write_json
from provetrain.train.policies import SkipBudget, nonfinite_clause

__all__ = [
    "SkipAwareScheduler",
    "StepCertifier",
    "certify_step",
    "outcome_of",
    "require_provetrain_optimizer",
    "skip_aware_scheduler",
]


def require_provetrain_optimizer(optimizer: object, *, fix: str) -> Adam:
    """The provetrain :class:`~provetrain.ops.adam.Adam`/``AdamW`` inside framework wrappers (accelerate's
    ``AcceleratedOptimizer`` keeps it in ``.optimizer``); ``TypeError`` naming the class found and ``fix``."""
    inner = optimizer
    while not isinstance(inner, Adam) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, Adam):
        kind = type(inner)
        raise TypeError(
            f"the optimizer is {kind.__module__}.{kind.__qualname__}, not provetrain.ops.adam.Adam or AdamW: "
            f"only provetrain's optimizer clips, guards non-finite steps and keeps the counters the certificate "
            f"is made from. {fix}"
        )
    return inner


class SkipAwareScheduler(LRScheduler):
    """An LR scheduler that advances only on the optimizer steps that were applied.

    Each :meth:`step` call stands for one optimizer step: it steps the wrapped ``scheduler`` unless
    ``optimizer.skipped_steps`` grew since the previous call, so the learning rate is a function of the
    number of *applied* steps. Build it with :func:`skip_aware_scheduler`.

    Guarantees:
        * A skipped step leaves the wrapped scheduler untouched (its ``last_epoch`` and learning rates).
        * :meth:`state_dict` is the wrapped scheduler's own, so checkpoints load with or without the wrapper;
          :meth:`load_state_dict` re-reads the optimizer's ``skipped_steps``, which Lightning and Hugging Face
          restore before the scheduler.

    Each :meth:`step` reads ``skipped_steps`` on the host: on CUDA one synchronisation per optimizer step,
    the price of a host-side schedule that must know whether the step was applied (DeepSpeed reads its
    overflow flag the same way).
    """

    def __init__(self, scheduler: LRScheduler, optimizer: Adam) -> None:
        # A wrapper, like torch's ChainedScheduler: LRScheduler.__init__ would step the schedule once more.
        self.scheduler = scheduler
        self.optimizer = optimizer
        self._skips_seen = int(optimizer.skipped_steps)  # host read, once

    def step(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Step the wrapped scheduler, unless the optimizer skipped a step since the previous call."""
        # Host read of a 0-d device counter: the next learning rate is a host float and depends on it.
        skips = int(self.optimizer.skipped_steps)
        if skips != self._skips_seen:
            self._skips_seen = skips
            return
        self.scheduler.step(*args, **kwargs)

    def get_last_lr(self) -> list[float]:  # type: ignore[override]
        return self.scheduler.get_last_lr()

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return self.scheduler.get_lr()

    @property
    def last_epoch(self) -> int:  # type: ignore[override]
        """The wrapped scheduler's count of steps: the applied optimizer steps since it was built."""
        return self.scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)
        self._skips_seen = int(self.optimizer.skipped_steps)


def skip_aware_scheduler(scheduler: LRScheduler, optimizer: Any) -> SkipAwareScheduler:
    """Wrap ``scheduler`` so that steps skipped by ``optimizer`` (provetrain's Adam/AdamW) do not advance it.

    Example:
        >>> from torch.optim.lr_scheduler import LinearLR
        >>> from provetrain.ops.adam import AdamW
        >>> opt = AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3, clip_value=1.0)
        >>> schedule = skip_aware_scheduler(LinearLR(opt, start_factor=0.5, total_iters=10), opt)
    """
    inner = require_provetrain_optimizer(
        optimizer, fix="Pass the provetrain optimizer the scheduler was built on: skip_aware_scheduler(sched, opt)."
    )
    if isinstance(scheduler, SkipAwareScheduler):
        raise TypeError("scheduler is already a SkipAwareScheduler; pass the scheduler it wraps, or use it as it is")
    if getattr(scheduler, "optimizer", None) is not inner:
        raise ValueError(
            f"scheduler {type(scheduler).__name__} was built on a different optimizer than {type(inner).__name__}"
            " given here; build it on the provetrain optimizer the framework steps, and pass that optimizer"
        )
    return SkipAwareScheduler(scheduler, inner)


@dataclass
class _Pending:
    """One optimizer step's values, still on the device."""

    step: int
    loss: Tensor | None
    grad_norm: Tensor
    clipped_norm: Tensor
    skipped: Tensor


class StepCertifier:
    """Certify the optimizer steps a framework takes with provetrain's ``optimizer``.

    Args:
        optimizer: the provetrain Adam/AdamW the framework steps.
        contract: the contract to certify; default the bundled ``training-loop-v1.yaml``.
        contracts: the contracts the certificate has a section for (files, bundled names such as
            ``optimizer-v1``, or loaded); default ``["training-loop-v1"]``.
        max_consecutive_skips, max_total_skips: the skip budget; past it :meth:`read_back` raises
            :class:`~provetrain.errors.ContractViolation` (skipping is only acceptable when bounded).

    The optimizer is set to ``on_empty="skip"``: a step in which no parameter has a gradient changes
    nothing, as in ``torch.optim``, and is counted as an action on ``!gradients.is_empty()``, not certified.

    Attributes:
        ledger: the per-clause counts.
        steps, skipped_steps: optimizer steps read back so far, and how many of them were skipped.
        empty_steps: steps taken with no gradient at all (nothing changed; not in ``steps``).
        last_row: the last step read back (``step``, ``loss``, ``grad_norm``, ``grad_norm_clipped``,
            ``skipped``), or ``None``.
    """

    def __init__(
        self,
        optimizer: Adam,
        *,
        contract: Contract | None = None,
        contracts: Sequence[ContractSpec] | None = None,
        max_consecutive_skips: int = 5,
        max_total_skips: int = 50,
    ) -> None:
        for name, value in (("max_consecutive_skips", max_consecutive_skips), ("max_total_skips", max_total_skips)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1, e.g. {name}=5")
        self.optimizer = optimizer
        self.ledger = ClauseLedger(contract or load_contract(), contracts=contracts)
        self.budget = SkipBudget(max_consecutive_skips, max_total_skips)
        self.steps = 0
        self.last_row: dict[str, Any] | None = None
        self._loss: Tensor | None = None
        self._pending: list[_Pending] = []
        self._skips_before = optimizer.skipped_steps.clone()
        # Frameworks call step() when no parameter has a gradient (a frozen phase; a Lightning training_step
        # that returns None), where torch.optim does nothing: such a step changes nothing and is counted.
        optimizer.on_empty = "skip"
        self._empty_before = int(optimizer.empty_steps)  # a CPU counter: no synchronisation
        self.empty_steps = 0
        # The optimizer's constructor refused empty parameters and a non-positive clip_value.
        self.ledger.check(LOSS, "precondition", "!params.is_empty()")
        if optimizer.clip_value is not None:
            self.ledger.check(GRAD, "precondition", "clip_value > 0.0")

    def add_loss(self, loss: Tensor) -> None:
        """Add one micro-batch's loss to this optimizer step's (summed on the device: no host read)."""
        value = loss.detach().to(torch.float64).sum()
        self._loss = value if self._loss is None else self._loss + value

    @torch.no_grad()
    def guard_loss_(self) -> None:
        """Before ``optimizer.step()``: when the loss added so far is non-finite, set one gradient element to
        NaN, so that the optimizer's finite guard skips the step on the device (no host read).

        Frameworks that call ``step()`` without the loss would otherwise apply a step whose loss is NaN
        while its gradients are finite. The gradients are discarded by the next ``zero_grad``.
        """
        if self._loss is None:
            return
        grad = next((p.grad for g in self.optimizer.param_groups for p in g["params"] if _has_values(p.grad)), None)
        if grad is None:
            return  # the optimizer will refuse the step itself: no parameter has a gradient
        bad = ~torch.isfinite(self._loss).to(grad.device, non_blocking=True)
        grad[(0,) * grad.dim()].masked_fill_(bad, math.nan)

    def record_step(self, step: int) -> None:
        """After ``optimizer.step()``: keep step ``step``'s loss and counters on the device until read back.

        ``lr > 0.0`` is counted here, not raised as the Trainer does: common warmups start at ``lr = 0``, a
        step that changes no weight, and the framework owns the schedule.
        """
        opt = self.optimizer
        empty = int(opt.empty_steps)  # a CPU counter: no synchronisation
        if empty != self._empty_before:
            # No gradient at all: the optimizer changed nothing and left its counters; no row to certify.
            self.ledger.act(GRAD, "precondition", "!gradients.is_empty()", "skip", empty - self._empty_before)
            self.empty_steps += empty - self._empty_before
            self._empty_before = empty
            self._loss = None
            return
        # Learning rates and the presence of gradients are host facts: checking them costs no sync.
        lr_positive = all(group["lr"] > 0.0 for group in opt.param_groups)
        self.ledger.check(
            LOSS,
            "precondition",
            "lr > 0.0",
            passed=int(lr_positive),
            failed=int(not lr_positive),
            first_failed_step=step,
        )
        self.ledger.check(GRAD, "precondition", "!gradients.is_empty()")  # step() refuses a step without any
        skips = opt.skipped_steps.clone()
        self._pending.append(
            _Pending(
                step,
                self._loss,
                opt.last_grad_norm.clone(),
                opt.last_clipped_grad_norm.clone(),
                skips - self._skips_before,
            )
        )
        self._skips_before = skips
        self._loss = None

    def read_back(self) -> list[dict[str, Any]]:
        """Read the pending steps in one host transfer, certify them, enforce the skip budget; return their rows.

        Raises:
            ContractViolation: the skip budget is exhausted, or a clipped norm broke its bound.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return []
        device = pending[0].grad_norm.device
        no_loss = torch.full((), math.nan, dtype=torch.float64, device=device)
        # The host read: every pending step's values in a single copy.
        values = torch.stack(
            [
                torch.stack(
                    [
                        no_loss if p.loss is None else p.loss.to(device, non_blocking=True),
                        p.grad_norm,
                        p.clipped_norm,
                        p.skipped.to(torch.float64),
                    ]
                )
                for p in pending
            ]
        ).tolist()
        rows = []
        for record, (loss_value, grad_norm, clipped, skipped_flag) in zip(pending, values, strict=True):
            loss = None if record.loss is None else loss_value
            skipped = skipped_flag > 0
            row = {"step": record.step, "loss": loss, "grad_norm": grad_norm, "grad_norm_clipped": clipped}
            rows.append(row | {"skipped": skipped})
            self.last_row = rows[-1]
            certify_step(
                self.ledger,
                record.step,
                loss=loss,
                clipped_norm=clipped,
                skipped=skipped,
                clip_value=self.optimizer.clip_value,
            )
            self.steps += 1
            if skipped:
                self._skip(record.step, loss, grad_norm)
            else:
                self.budget.applied()
        return rows

    @property
    def skipped_steps(self) -> int:
        """Skipped optimizer steps read back so far."""
        return self.budget.total

    def _skip(self, step: int, loss: float | None, grad_norm: float) -> None:
        """Count a skipped step against its clause and the budget."""
        self.budget.skipped()
        self.ledger.act(*nonfinite_clause(loss), "skip")
        if self.budget.exhausted:
            raise self.budget.violation(step, loss, {"loss": loss, "grad_norm": grad_norm})

    def certificate(self, *, outcome: str, run: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON-ready certificate of the steps read back so far; ``run`` adds framework facts."""
        facts = {
            "steps": self.steps,
            "applied_steps": self.steps - self.skipped_steps,
            "skipped_steps": self.skipped_steps,
            "optimizer": type(self.optimizer).__name__,
            "clip_value": self.optimizer.clip_value,
            "torch": torch.__version__,
        }
        return self.ledger.certificate(run=facts | (run or {}), outcome=outcome)

    def write_certificate(self, path: Path, *, outcome: str, run: dict[str, Any] | None = None) -> None:
        """Write :meth:`certificate` to ``path`` atomically (a crash leaves the previous file, never half)."""
        write_json(path, self.certificate(outcome=outcome, run=run))


def _has_values(grad: Tensor | None) -> bool:
    return grad is not None and grad.numel() > 0
