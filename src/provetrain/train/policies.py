"""What a skipped step broke, and the budget that keeps skipping honest.

Skipping a non-finite step is only acceptable when it is counted and bounded (FINDINGS: silent skipping
hid failures in DeepSpeed and HF; optax gives up and *accepts* the bad update). :class:`SkipBudget` counts
skips and turns "too many in a row, or in all" into a :class:`~provetrain.errors.ContractViolation`. The
Trainer and the Lightning / Hugging Face certifiers share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from provetrain.errors import ContractViolation
from provetrain.train.certificate import GRAD, GRADS_FINITE, LOSS, LOSS_FINITE

__all__ = ["SkipBudget", "nonfinite_clause"]


def nonfinite_clause(loss: float | None) -> tuple[str, str, str]:
    """``(equation, kind, clause)`` a skipped step broke: the loss's postcondition when the loss is known and
    non-finite, otherwise the gradients' precondition (the optimizer skips for nothing else)."""
    if loss is not None and not math.isfinite(loss):
        return LOSS, "postcondition", LOSS_FINITE
    return GRAD, "precondition", GRADS_FINITE


@dataclass
class SkipBudget:
    """Skipped steps in a row and in all, against their limits.

    Attributes:
        max_consecutive, max_total: the most skips allowed in a row and over the run.
        consecutive, total: the skips counted so far (``consecutive`` resets on an applied step).
    """

    max_consecutive: int
    max_total: int
    consecutive: int = 0
    total: int = 0

    def applied(self) -> None:
        """A step was applied: the run of skips is over."""
        self.consecutive = 0

    def skipped(self) -> None:
        """A step was skipped."""
        self.consecutive += 1
        self.total += 1

    @property
    def exhausted(self) -> bool:
        return self.consecutive > self.max_consecutive or self.total > self.max_total

    def violation(self, step: int, loss: float | None, observed: dict[str, Any]) -> ContractViolation:
        """The error for an exhausted budget, quoting the clause the last skip broke."""
        equation, kind, clause = nonfinite_clause(loss)
        return ContractViolation(
            equation,
            clause,
            kind=kind,
            step=step,
            observed=observed | {"consecutive_skips": self.consecutive, "total_skips": self.total},
            hint=f"Skip budget exhausted (max {self.max_consecutive} in a row, {self.max_total} in total): "
            "training is unstable; lower the learning rate or inspect the data. No skipped update was applied.",
        )
