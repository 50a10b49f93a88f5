"""certify_step: the clip bound is judged at the resolution of the recorded norm, never falsely violated."""

from __future__ import annotations

import pytest

from provetrain import ContractViolation, load_contract
from provetrain.train.certificate import NORM_RESOLUTION, ClauseLedger, certify_step


def bound_counts(ledger: ClauseLedger) -> tuple[int, int]:
    """(checks, violations) of the postcondition grad_norm <= clip_value."""
    row = next(
        r for r in ledger.state_dict() if r["text"] == "grad_norm <= clip_value" and r["kind"] == "postcondition"
    )
    return row["checks"], row["violations"]


@pytest.mark.parametrize("excess", [0.0, 2**-40, NORM_RESOLUTION / 2, NORM_RESOLUTION])
def test_a_recorded_norm_within_its_rounding_of_the_clip_value_holds(excess: float) -> None:
    ledger = ClauseLedger(load_contract())
    certify_step(ledger, 0, loss=1.0, clipped_norm=1e199 * (1 + excess), skipped=False, clip_value=1e199)
    assert bound_counts(ledger) == (1, 0)


def test_a_norm_above_the_clip_value_beyond_its_rounding_is_a_violation() -> None:
    ledger = ClauseLedger(load_contract())
    with pytest.raises(ContractViolation, match="grad_norm <= clip_value"):
        certify_step(ledger, 3, loss=1.0, clipped_norm=1.0 + 4 * NORM_RESOLUTION, skipped=False, clip_value=1.0)
    assert bound_counts(ledger) == (1, 1)
