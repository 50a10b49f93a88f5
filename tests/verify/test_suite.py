"""provetrain verify's checks: they pass on provetrain and catch what they exist to catch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from provetrain.verify import suite


def small_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)), torch.randn(16, 6)


def test_exact_norm_check_is_exact_at_the_boundary() -> None:
    three_four = [torch.tensor([3.0, 4.0])]
    assert suite.exact_norm_at_most(three_four, 5.0)
    assert not suite.exact_norm_at_most(three_four, math.nextafter(5.0, 0.0))
    assert not suite.exact_norm_at_most([torch.tensor([math.inf])], 1e300)


def test_falsify_train_001_passes_with_provetrain_and_catches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = small_model()
    assert suite.falsify_train_001(model, trials=10)[0] == "pass"
    monkeypatch.setattr(suite, "clip_grad_norm_", torch.nn.utils.clip_grad_norm_)
    result, evidence = suite.falsify_train_001(model, trials=10)
    assert result == "fail" and "FAILED" in evidence  # torch zeroes the 3e38 case and overshoots by ulps


def test_falsify_train_002_catches_a_model_that_produces_nan() -> None:
    model, inputs = small_model()
    assert suite.falsify_train_002(model, inputs, steps=20)[0] == "pass"

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * (math.nan if self.training else 1.0)

    result, evidence = suite.falsify_train_002(Broken(), inputs, steps=20)
    assert result == "fail" and "at step 0" in evidence


def test_run_verification_reports_every_contract_check() -> None:
    model, inputs = small_model()
    results = suite.run_verification(model, inputs, proof_bound=1)
    assert [r.clause for r in results] == [
        "FALSIFY-TRAIN-001",
        "FALSIFY-TRAIN-002",
        "FALSIFY-TRAIN-003",
        "proof_obligations[0]",
        "train-kani-001",
        "loss_decrease.lean_theorem",
        "loss_decrease.lean_theorem",
        "backward-pass-v1: proof_obligations[0]",
        "backward-pass-v1: proof_obligations[1]",
    ]
    proof, runtime = results[-4:-2]
    assert proof.method == "smt proof under axioms" and "Not the cited Lean proof" in proof.evidence
    assert runtime.text == "the loss training reads is finite and >= 0 in float32"
    assert all(r.result == "pass" for r in results)
    assert all(r.seconds >= 0 and r.evidence for r in results)


def test_exact_norm_check_on_float64_uses_rationals() -> None:
    tiny = math.nextafter(0.0, 1.0)  # squares underflow in float64: only rationals see them
    assert suite.exact_norm_at_most([torch.tensor([tiny, tiny], dtype=torch.float64)], tiny * 2)
    assert not suite.exact_norm_at_most([torch.tensor([tiny, tiny], dtype=torch.float64)], tiny)


def test_the_training_loss_row_fails_on_a_model_whose_logits_overflow_the_loss() -> None:
    model, inputs = small_model()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([1e38, -1e38, 0.0, 0.0]))  # finite logits whose float32 loss overflows
    result, evidence = suite._training_loss(model, inputs)
    assert result == "fail" and "FAILED" in evidence
