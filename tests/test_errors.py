"""The two error types: what they carry and how they read."""

from __future__ import annotations

import torch

from provetrain import ContractError, ContractViolation


def test_violation_quotes_the_clause_and_the_observed_values() -> None:
    error = ContractViolation(
        "gradient_norm",
        "gradients.iter().all(|g| g.is_finite())",
        step=12,
        observed={"parameter": "fc2.weight", "non_finite": 3, "loss": torch.tensor(float("nan"))},
        hint="Lower the learning rate or use on_nonfinite='skip'.",
    )
    assert str(error) == (
        "contract gradient_norm precondition `gradients.iter().all(|g| g.is_finite())` violated at step 12: "
        "observed parameter='fc2.weight', non_finite=3, loss=nan. Lower the learning rate or use on_nonfinite='skip'."
    )
    assert (error.equation, error.step, error.kind) == ("gradient_norm", 12, "precondition")
    assert error.observed["non_finite"] == 3


def test_violation_without_step_or_values() -> None:
    assert (
        str(ContractViolation("loss_decrease", "lr > 0.0")) == "contract loss_decrease precondition `lr > 0.0` violated"
    )


def test_contract_error_location_and_parts() -> None:
    error = ContractError("unknown key", path="c.yaml", line=3, column=5, key="metadata.x", expected="a known key")
    assert str(error) == "c.yaml:3:5: key 'metadata.x': unknown key (expected a known key)"
    assert isinstance(error, ValueError)
    assert ContractError("empty").location == "<contract>"
