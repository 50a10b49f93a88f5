"""The skip budget and the clause a skipped step broke."""

from __future__ import annotations

import math

import pytest

from provetrain.train.policies import SkipBudget, nonfinite_clause


@pytest.mark.parametrize(
    ("loss", "clause"),
    [
        (math.nan, ("loss_decrease", "postcondition", "loss.is_finite()")),
        (-math.inf, ("loss_decrease", "postcondition", "loss.is_finite()")),
        (2.5, ("gradient_norm", "precondition", "gradients.iter().all(|g| g.is_finite())")),
        (None, ("gradient_norm", "precondition", "gradients.iter().all(|g| g.is_finite())")),
    ],
)
def test_nonfinite_clause(loss: float | None, clause: tuple[str, str, str]) -> None:
    assert nonfinite_clause(loss) == clause


def test_budget_counts_runs_and_totals() -> None:
    budget = SkipBudget(max_consecutive=2, max_total=3)
    budget.skipped()
    budget.skipped()
    assert not budget.exhausted
    budget.skipped()
    assert budget.exhausted and (budget.consecutive, budget.total) == (3, 3)
    budget = SkipBudget(max_consecutive=2, max_total=3)
    for _ in range(2):
        budget.skipped()
        budget.skipped()
        budget.applied()
    assert budget.exhausted and (budget.consecutive, budget.total) == (0, 4)


def test_violation_quotes_the_clause_and_the_counts() -> None:
    budget = SkipBudget(max_consecutive=1, max_total=10, consecutive=2, total=2)
    error = budget.violation(7, math.nan, {"loss": math.nan})
    assert (error.clause, error.step, error.kind) == ("loss.is_finite()", 7, "postcondition")
    assert error.observed["consecutive_skips"] == 2 and error.observed["total_skips"] == 2
    assert "Skip budget exhausted (max 1 in a row, 10 in total)" in str(error)
