"""Evidence for the contract's ``lean_theorem``: ``ProvableContracts.Theorems.CrossEntropy.NonNegativity``.

The theorem: for logits ``z ∈ ℝⁿ`` and a target class ``y``, cross-entropy
``CE(z, y) = log(Σⱼ exp zⱼ) − z_y ≥ 0``. (It is what ``loss_decrease`` cites; it proves the loss is bounded
below, not that it decreases: FINDINGS.)

**Proof by SMT** (:func:`prove_cross_entropy_nonnegative`). Over the reals, with ``exp`` and ``log`` as
uninterpreted functions constrained only by these axioms:

1. ``exp(x) > 0`` for every x;
2. ``log(exp(x)) = x`` for every x;
3. ``log`` is monotone on the positives: ``0 < a ≤ b ⇒ log a ≤ log b``.

For each class count n = 1..N and each target y, Z3 shows the negation ``log(Σ exp zⱼ) − z_y < 0``
unsatisfiable. The argument it finds is the textbook one: ``Σ exp zⱼ ≥ exp z_y > 0`` (axiom 1), so
``log Σ ≥ log exp z_y = z_y`` (axioms 3, 2). Nothing else about exp and log is assumed.

**What this does not cover, and how it is covered.** The proof is about real numbers. In floating point,
PyTorch computes ``logsumexp(z) = m + log(Σ exp(zⱼ − m))`` with ``m = max z``; the sum contains
``exp(0) = 1`` exactly, so it is ``≥ 1``, its correctly rounded ``log`` is ``≥ 0``, and the result is ``≥ m ≥
z_y``: the computed loss is also non-negative, provided ``log`` is monotone and ``log(1) = 0`` in the
library's math (true of correctly rounded and of faithfully rounded monotone implementations).
:func:`check_cross_entropy_nonnegative` checks that at run time on real logits, including extreme ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CrossEntropyProof", "check_cross_entropy_nonnegative", "prove_cross_entropy_nonnegative"]


@dataclass(frozen=True)
class CrossEntropyProof:
    """One proof obligation: class count ``classes``, result ``proved``/``unknown``/``counterexample``."""

    classes: int
    result: str
    seconds: float


def prove_cross_entropy_nonnegative(max_classes: int = 8, *, timeout_s: float = 30.0) -> list[CrossEntropyProof]:
    """Prove ``log(Σ exp zⱼ) − z_y ≥ 0`` for n = 1..max_classes (target y = 0, which is general by symmetry
    of the sum: relabelling the classes maps any y to 0)."""
    import z3

    if max_classes < 1:
        raise ValueError(f"max_classes must be >= 1, got {max_classes}")
    real = z3.RealSort()
    exp, log = z3.Function("exp", real, real), z3.Function("log", real, real)
    x, a, b = z3.Reals("x a b")
    axioms = [
        z3.ForAll([x], exp(x) > 0, patterns=[exp(x)]),
        z3.ForAll([x], log(exp(x)) == x, patterns=[log(exp(x))]),
        z3.ForAll(
            [a, b], z3.Implies(z3.And(a > 0, a <= b), log(a) <= log(b)), patterns=[z3.MultiPattern(log(a), log(b))]
        ),
    ]
    results = []
    for n in range(1, max_classes + 1):
        z = z3.Reals(" ".join(f"z{j}" for j in range(n)))
        solver = z3.Solver()
        solver.set("timeout", int(timeout_s * 1000))
        solver.add(*axioms)
        total = z3.Sum([exp(zj) for zj in z]) if n > 1 else exp(z[0])
        solver.add(log(total) - z[0] < 0)  # the negation of the theorem
        started = time.perf_counter()
        verdict = solver.check()
        seconds = time.perf_counter() - started
        result = "proved" if verdict == z3.unsat else ("counterexample" if verdict == z3.sat else "unknown")
        results.append(CrossEntropyProof(n, result, seconds))
    return results


def check_cross_entropy_nonnegative(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """Run-time check: PyTorch's cross-entropy on these logits is ``≥ 0`` for every example."""
    return bool((F.cross_entropy(logits, targets, reduction="none") >= 0).all())
