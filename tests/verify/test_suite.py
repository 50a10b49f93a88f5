"""provetrain verify's checks: they pass on provetrain and catch what they exist to catch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from provetrain.verify import suite
from provetrain.verify.cross_entropy import check_cross_entropy_nonnegative, prove_cross_entropy_nonnegative


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


def test_cross_entropy_proof_and_runtime_check() -> None:
    assert all(p.result == "proved" for p in prove_cross_entropy_nonnegative(6))
    logits = torch.tensor([[1e30, -1e30, 0.0], [0.0, 0.0, 0.0], [-3.0e38, 3.0e38, 1.0]])
    assert check_cross_entropy_nonnegative(logits, torch.tensor([1, 2, 0]))


def test_cross_entropy_axioms_do_not_prove_a_false_claim() -> None:
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


def test_run_verification_reports_every_contract_check() -> None:
    model, inputs = small_model()
    results = suite.run_verification(model, inputs, proof_bound=1)
    assert [r.clause for r in results] == [
        "FALSIFY-TRAIN-001",
        "FALSIFY-TRAIN-002",
        "FALSIFY-TRAIN-003",
        "proof_obligations[0]",
        "train-kani-001",
        "lean_theorem",
    ]
    assert all(r.result == "pass" for r in results)
    assert all(r.seconds >= 0 and r.evidence for r in results)


def test_exact_norm_check_on_float64_uses_rationals() -> None:
    tiny = math.nextafter(0.0, 1.0)  # squares underflow in float64: only rationals see them
    assert suite.exact_norm_at_most([torch.tensor([tiny, tiny], dtype=torch.float64)], tiny * 2)
    assert not suite.exact_norm_at_most([torch.tensor([tiny, tiny], dtype=torch.float64)], tiny)
