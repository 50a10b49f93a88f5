"""Learning-rate schedules as pure functions of the number of *applied* optimizer steps.

A skipped step does not advance the schedule (see FINDINGS: Lightning steps its scheduler after a skipped
step; DeepSpeed does not). Every value a schedule will produce is known before training, so the contract's
preconditions ``lr > 0.0`` and ``lr < lr_max`` are checked for the whole schedule up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["Schedule", "ScheduleName"]

ScheduleName = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class Schedule:
    """``lr(t)`` for ``t = 0 .. total_steps - 1`` applied steps.

    Linear warm-up over ``warmup_steps`` from ``base_lr / warmup_steps`` to ``base_lr``, then:
    ``constant``: ``base_lr``; ``cosine``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * s)) / 2``;
    ``linear``: ``base_lr + (min_lr - base_lr) * s``, where ``min_lr = min_lr_ratio * base_lr`` unless
    ``min_lr`` is given, and ``s`` is the progress through the decay:

    * without ``decay_steps``: ``s = (t - warmup) / (total - warmup)``, in [0, 1). Since ``s < 1`` both decays
      stay above ``min_lr``, and the schedule stays strictly positive even with ``min_lr = 0``;
    * with ``decay_steps = D``: ``s = min((t - warmup) / D, 1)``: the decay reaches ``min_lr`` exactly at
      ``t = warmup + D`` and stays there (nanoGPT's ``lr_decay_iters`` is ``warmup + D``). With ``min_lr = 0``
      that plateau is ``lr = 0``, which the contract's ``lr > 0.0`` refuses before training.
    """

    base_lr: float
    total_steps: int
    name: ScheduleName = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_steps: int | None = None
    min_lr: float | None = None

    def lr(self, applied_steps: int) -> float:
        """The learning rate for the next step, after ``applied_steps`` applied steps."""
        t = min(applied_steps, self.total_steps - 1)
        if t < self.warmup_steps:
            return self.base_lr * (t + 1) / self.warmup_steps
        if self.name == "constant":
            return self.base_lr
        if self.decay_steps is None:
            s = (t - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        else:
            s = min((t - self.warmup_steps) / self.decay_steps, 1.0)
        floor = self.min_lr if self.min_lr is not None else self.min_lr_ratio * self.base_lr
        if s >= 1.0:
            return floor
        if self.name == "cosine":
            return floor + (self.base_lr - floor) * (1.0 + math.cos(math.pi * s)) / 2.0
        return self.base_lr + (floor - self.base_lr) * s

    def extremes(self) -> tuple[float, float]:
        """The smallest and largest learning rate over the whole schedule."""
        values = [self.lr(t) for t in range(self.total_steps)]
        return min(values), max(values)
