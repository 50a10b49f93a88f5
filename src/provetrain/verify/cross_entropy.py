"""Evidence for the contract's ``lean_theorem`` ``ProvableContracts.Theorems.CrossEntropy.NonNegativity``.

**What is cited, and what is shown.** ``loss_decrease`` cites a Lean theorem. No Lean proof is checked here:
the citation is bound (``provetrain.contract.bindings.THEOREMS``) to a z3 proof, under three stated axioms,
of the statement the theorem's name gives, ``CE(z, y) = log(Σⱼ exp zⱼ) − z_y ≥ 0`` for logits ``z ∈ ℝⁿ``
and a target class y, and to a run-time check of the floating-point fact that training relies on. It is
non-negativity (the loss is bounded below), not decrease: FINDINGS. The decrease invariant is evidenced
statistically by the loss-trend monitor.

**Proof by SMT** (:func:`prove_cross_entropy_nonnegative`). Over the reals, with ``exp`` and ``log`` as
uninterpreted functions constrained only by :data:`AXIOMS`:

1. ``exp(x) > 0`` for every x;
2. ``log(exp(x)) = x`` for every x;
3. ``log`` is monotone on the positives: ``0 < a ≤ b ⇒ log a ≤ log b``.

For each class count n = 1..N, Z3 shows the negation ``log(Σ exp zⱼ) − z_y < 0`` unsatisfiable. The
argument it finds is the textbook one: ``Σ exp zⱼ ≥ exp z_y > 0`` (axiom 1), so ``log Σ ≥ log exp z_y =
z_y`` (axioms 3, 2). Nothing else about exp and log is assumed.

**The run-time fact** (:func:`loss_is_finite_and_nonnegative`). The proof is about real numbers; training
reads a float32 loss. PyTorch computes ``CE = −((z_y − m) − log Σ exp(zⱼ − m))`` with ``m = max z``: the
sum contains ``exp(0) = 1`` exactly, so it is ``≥ 1`` and its log ``≥ 0``, and ``z_y − m ≤ 0`` exactly, so
with monotone rounding the computed loss is ``≥ 0`` for every example, and so is a mean of them. It is not
always finite: finite logits whose spread ``m − z_y`` reaches float32's largest value (3.4e38) give ``+inf``,
and so does a mean whose sum overflows. For finite logits it is never NaN and never negative; it is finite
when ``batch · (max spread + log n) < 3.4e38``, true of any logits below 1e36 in a batch of 100. A ``+inf``
is caught by the postcondition ``loss.is_finite()`` (the step is skipped). Under ``bf16-autocast`` and
``fp16-amp`` autocast runs cross-entropy in float32, so the same holds. ``tests/verify/test_cross_entropy.py``
checks these claims as properties.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AXIOMS",
    "CrossEntropyProof",
    "check_cross_entropy_nonnegative",
    "loss_is_finite_and_nonnegative",
    "prove_cross_entropy_nonnegative",
]

# Everything the proof assumes about exp and log (the binding in provetrain.contract.bindings quotes these).
AXIOMS = (
    "exp(x) > 0 for every real x",
    "log(exp(x)) = x for every real x",
    "0 < a <= b implies log(a) <= log(b)",
)


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
    """Run-time check: PyTorch's cross-entropy on these logits is ``≥ 0`` for every example (``+inf``
    included: non-negativity, not finiteness; see :func:`loss_is_finite_and_nonnegative`)."""
    return bool((F.cross_entropy(logits, targets, reduction="none") >= 0).all())


def loss_is_finite_and_nonnegative(logits: torch.Tensor, targets: torch.Tensor) -> bool:
    """The run-time fact the clause needs: the loss training reads, float32 cross-entropy averaged over the
    batch (the Trainer's default loss), is finite and ``≥ 0``, and so is every example's.

    ``logits`` is ``(batch..., classes)`` and ``targets`` ``(batch...)`` (a language model's tokens are
    examples); the logits are cast to float32 as autocast does for cross-entropy.
    """
    flat, labels = logits.detach().float().flatten(0, -2), targets.flatten()
    per_example = F.cross_entropy(flat, labels, reduction="none")
    mean = F.cross_entropy(flat, labels)
    return bool(torch.isfinite(per_example).all() and (per_example >= 0).all() and torch.isfinite(mean) and mean >= 0)
