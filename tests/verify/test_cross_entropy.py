"""The evidence bound to the contract's lean_theorem CrossEntropy.NonNegativity: a z3 proof under stated
axioms, and the float32 facts training relies on (the loss it reads is never NaN or negative, and finite
within the stated range)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from provetrain.contract.load import load_contract
from provetrain.contract.registry import THEOREMS, theorem_statuses
from provetrain.verify.cross_entropy import (
    AXIOMS,
    check_cross_entropy_nonnegative,
    loss_is_finite_and_nonnegative,
    prove_cross_entropy_nonnegative,
)

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def test_nonnegativity_is_proved_under_the_stated_axioms() -> None:
    proofs = prove_cross_entropy_nonnegative(6)
    assert [p.classes for p in proofs] == [1, 2, 3, 4, 5, 6]
    assert all(p.result == "proved" for p in proofs)


def test_the_axioms_do_not_prove_a_false_claim() -> None:
    """Non-vacuity: with the same axioms, 'CE >= 1' (false) must not come out proved."""
    import z3

    real = z3.RealSort()
    exp, log = z3.Function("exp", real, real), z3.Function("log", real, real)
    x, a, b, z0, z1 = z3.Reals("x a b z0 z1")
    solver = z3.Solver()
    solver.set("timeout", 3000)
    solver.add(
        z3.ForAll([x], exp(x) > 0, patterns=[exp(x)]),
        z3.ForAll([x], log(exp(x)) == x, patterns=[log(exp(x))]),
        z3.ForAll(
            [a, b], z3.Implies(z3.And(a > 0, a <= b), log(a) <= log(b)), patterns=[z3.MultiPattern(log(a), log(b))]
        ),
        log(exp(z0) + exp(z1)) - z0 < 1,
    )
    assert solver.check() != z3.unsat


def test_the_cited_theorem_is_bound_to_what_is_shown() -> None:
    [status] = theorem_statuses(load_contract())
    assert (status.equation, status.theorem) == (
        "loss_decrease",
        "ProvableContracts.Theorems.CrossEntropy.NonNegativity",
    )
    assert status.bound and status.binding is THEOREMS[("loss_decrease", status.theorem)]
    assert status.binding.axioms == AXIOMS  # the binding states exactly what the proof assumes
    assert "z3" in status.binding.method and "not the cited Lean proof" in status.binding.method
    assert "decreases" in status.binding.not_shown
    kinds = {e.kind for e in status.binding.evidence}
    assert {"smt-proof", "property-test"} <= kinds


def test_an_unknown_theorem_is_a_gap() -> None:
    contract = load_contract()
    [status] = theorem_statuses(contract, theorems={})
    assert status.binding is None and not status.bound


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
rows = st.integers(1, 8).flatmap(lambda n: st.lists(st.lists(finite32, min_size=n, max_size=n), min_size=1, max_size=8))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(rows, st.data())
def test_float32_loss_is_never_nan_or_negative_for_finite_logits(
    logits: list[list[float]], data: st.DataObject
) -> None:
    """Any finite float32 logits, however large: every example's loss and the mean are >= 0 (+inf at most)."""
    z = torch.tensor(logits)
    y = torch.tensor([data.draw(st.integers(0, z.shape[1] - 1)) for _ in logits])
    per_example, mean = F.cross_entropy(z, y, reduction="none"), F.cross_entropy(z, y)
    assert per_example.dtype == mean.dtype == torch.float32
    assert not per_example.isnan().any() and (per_example >= 0).all()
    assert not mean.isnan() and mean >= 0
    assert check_cross_entropy_nonnegative(z, y)


BOUND = float(torch.tensor(1e36, dtype=torch.float32))  # 1e36 rounded to float32 (just below it)
within = st.floats(-BOUND, BOUND, width=32)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.integers(1, 8).flatmap(lambda n: st.lists(st.lists(within, min_size=n, max_size=n), min_size=1, max_size=100)),
    st.data(),
)
def test_float32_loss_is_finite_for_logits_within_range(logits: list[list[float]], data: st.DataObject) -> None:
    """batch * (spread + log classes) < 3.4e38: logits within +-1e36 in a batch of up to 100 give a finite loss."""
    z = torch.tensor(logits)
    y = torch.tensor([data.draw(st.integers(0, z.shape[1] - 1)) for _ in logits])
    assert loss_is_finite_and_nonnegative(z, y)


def test_the_loss_overflows_to_inf_beyond_range_and_is_caught() -> None:
    """Finite logits can give +inf (never NaN): the run-time check, and the Trainer's `loss.is_finite()`, see it."""
    spread = torch.tensor([[FLOAT32_MAX, -FLOAT32_MAX, 0.0]])
    assert F.cross_entropy(spread, torch.tensor([1])).item() == math.inf
    assert not loss_is_finite_and_nonnegative(spread, torch.tensor([1]))
    assert loss_is_finite_and_nonnegative(spread, torch.tensor([0]))  # the target is the max: loss 0
    many = torch.zeros(64, 3)
    many[:, 0], many[:, 1] = 1e38, -1e38  # each example's loss 2e38 is finite, their float32 sum is not
    assert torch.isfinite(F.cross_entropy(many, torch.ones(64, dtype=torch.long), reduction="none")).all()
    assert not loss_is_finite_and_nonnegative(many, torch.ones(64, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_the_loss_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    with torch.autocast("cpu", dtype=dtype):
        logits = linear(torch.randn(5, 4))
        loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1]))
    assert logits.dtype == dtype and loss.dtype == torch.float32
    assert loss_is_finite_and_nonnegative(logits, torch.tensor([0, 1, 2, 0, 1]))
