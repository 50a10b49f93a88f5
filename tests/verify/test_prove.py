"""The SMT harness train-kani-001: the proof, its soundness checks, lockstep with the shipped clip, torch's
counterexamples replayed in torch."""

from __future__ import annotations

import math
import re
import struct
from fractions import Fraction

import pytest
import torch
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from provetrain.ops.clip import clip_coefficient, clip_grad_norm_, global_sum_of_squares, scale_gradient
from provetrain.verify.prove import (
    PROOF_COLUMNS,
    ProofReport,
    concretise_torch_counterexample,
    proof_rows,
    prove_clip_bound,
    replay_torch_clip,
)
from provetrain.verify.smt_clip import SQRT_ERROR, ClipVars, clip_branches, reference_clip, to_float32, trace_values
from provetrain.verify.smt_derivation import Derivation, check_unsat, linearize

CONTRACT_BOUND = 4


@pytest.fixture(scope="module")
def contract_report() -> ProofReport:
    return prove_clip_bound(CONTRACT_BOUND, timeout_s=120)


# --------------------------------------------------------------------------------------------------
# The proof.


@pytest.mark.contract("train-kani-001")
def test_harness_proves_the_bound_for_every_length_up_to_the_contract_bound(contract_report: ProofReport) -> None:
    assert contract_report.harness == "train-kani-001"
    assert contract_report.proved, proof_rows(contract_report)
    assert [length.n for length in contract_report.lengths] == [1, 2, 3, 4]
    assert {step.verdict for step in contract_report.lemmas} == {"proved"}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_each_length_is_proved_in_seconds_by_unsat_steps(contract_report: ProofReport, n: int) -> None:
    length = contract_report.lengths[n - 1]
    assert length.result == "proved"
    assert length.counterexample is None
    assert all(step.verdict == "proved" for step in length.steps)
    assert length.seconds < 60  # about a second here; generous for a loaded machine


def test_rows_have_the_lemmas_then_one_row_per_length(contract_report: ProofReport) -> None:
    rows = proof_rows(contract_report)
    assert PROOF_COLUMNS == ("n", "result", "seconds", "detail")
    assert [row[:2] for row in rows] == [("lemmas", "proved")] + [(str(n), "proved") for n in range(1, 5)]
    assert all(len(row) == len(PROOF_COLUMNS) for row in rows)


def test_the_proof_extends_beyond_the_contract_bound() -> None:
    """CI's bound: the largest that fits in about a minute on 2 cores (16: 43 s measured)."""
    report = prove_clip_bound(16, timeout_s=120)
    assert report.proved, proof_rows(report)


def test_the_proof_fails_without_the_margin() -> None:
    """Not vacuous: with no relative margin in the numerator, the clip case has a real counterexample."""
    variables = ClipVars.create(1)
    clip = next(b for b in clip_branches(variables, margin=Fraction(0)) if b.kind == "clip")
    derivation = Derivation((*clip.assumptions, *clip.definitions), timeout_s=60)
    clip.derive(derivation)
    assert derivation.failed
    result, model = check_unsat("direct", [*clip.assumptions, z3.Not(variables.goal())], timeout_s=60)
    assert result.verdict == "refuted"
    assert model is not None


def test_a_step_citing_an_unproved_fact_is_refused() -> None:
    x = z3.Real("x")
    derivation = Derivation([x >= 1], timeout_s=10)
    with pytest.raises(ValueError, match=re.escape("neither assumed nor derived")):
        derivation.derive("x >= 0", [x >= 2], x >= 0)


def test_linearize_shares_one_atom_per_monomial() -> None:
    x, y = z3.Reals("x y")
    linear = linearize([x * y > 1, y * x < 1])
    solver = z3.SolverFor("QF_LRA")
    solver.add(*linear)
    assert solver.check() == z3.unsat


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bound": 0}, "bound=0; expected an int in [1, 64]"),
        ({"bound": 2.0}, "bound=2.0; expected an int in [1, 64]"),
        ({"bound": 1, "timeout_s": 0}, "timeout_s=0; expected a finite number of seconds > 0"),
        ({"bound": 1, "timeout_s": math.inf}, "timeout_s=inf; expected a finite number of seconds > 0"),
        ({"bound": 1, "algorithm": "optax"}, "algorithm='optax'; expected 'provetrain' or 'torch'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        prove_clip_bound(**kwargs)


# --------------------------------------------------------------------------------------------------
# Lockstep: the encoded steps, in Python floats, against the shipped clip; real runs satisfy the encoding.

FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
GRADIENTS = st.lists(FLOAT32, min_size=1, max_size=8) | st.lists(
    st.floats(min_value=-(2.0**-120), max_value=2.0**-120, width=32), min_size=1, max_size=4
)


@st.composite
def clip_cases(draw: st.DrawFn) -> tuple[list[float], float]:
    g = draw(GRADIENTS)
    norm = math.sqrt(math.fsum(x * x for x in g))
    ratio = draw(st.floats(min_value=1e-3, max_value=2.0) | st.sampled_from([0.5, 1.0, 1.0 - 2**-30, 1.0 + 2**-30]))
    absolute = draw(st.floats(min_value=5e-324, max_value=1e300) | st.sampled_from([2.0**-149, 2.0**-148, 1e-45]))
    max_norm = ratio * norm if norm > 0 and draw(st.booleans()) else absolute
    return g, max_norm if 0 < max_norm < math.inf else 1.0


def _bits(values: list[float] | tuple[float, ...]) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]  # -0.0 and 0.0 differ


def _holds(formula: z3.BoolRef, values: dict[str, Fraction | bool]) -> bool:
    pairs = [
        (z3.Bool(name), z3.BoolVal(value)) if isinstance(value, bool) else (z3.Real(name), z3.RealVal(value))
        for name, value in values.items()
    ]
    return z3.is_true(z3.simplify(z3.substitute(formula, *pairs)))


@settings(max_examples=300, deadline=None)
@given(clip_cases())
def test_reference_steps_match_the_shipped_clip_bit_for_bit(case: tuple[list[float], float]) -> None:
    g, max_norm = case
    grad = torch.tensor(g, dtype=torch.float32)
    s_hat = global_sum_of_squares([grad])
    _, k = clip_coefficient(s_hat, max_norm, numel=len(g), dtypes={torch.float32})
    expected_k, expected_y = reference_clip(g, max_norm, s_hat=s_hat.item())
    assert _bits([k.item()]) == _bits([expected_k])
    assert _bits(scale_gradient(grad, k).tolist()) == _bits(expected_y)

    parameter = torch.zeros(len(g), requires_grad=True)
    parameter.grad = grad.clone()
    clip_grad_norm_([parameter], max_norm)
    stored = parameter.grad.tolist()
    assert _bits(stored) == _bits(expected_y)
    assert sum(Fraction(y) ** 2 for y in stored) <= Fraction(max_norm) ** 2


@settings(max_examples=300, deadline=None)
@given(clip_cases())
def test_real_runs_satisfy_every_assumption_of_the_encoding(case: tuple[list[float], float]) -> None:
    """The encoding over-approximates the shipped clip: each run is a model of its case's assumptions."""
    g, max_norm = case
    s_hat = global_sum_of_squares([torch.tensor(g, dtype=torch.float32)]).item()
    kind, values = trace_values(g, max_norm, s_hat)
    branch = next(b for b in clip_branches(ClipVars.create(len(g))) if b.kind == kind)
    assert _holds(branch.guard, values)
    failing = [str(fact) for fact in branch.assumptions if not _holds(fact, values)]
    assert not failing, failing


def test_float32_rounding_helper_rounds_to_nearest_even() -> None:
    assert to_float32(1 + 2**-24) == 1.0
    assert to_float32(1 + 3 * 2**-24) == 1 + 2**-22
    assert to_float32(2.0**-150) == 0.0
    assert to_float32(3 * 2.0**-150) == 2.0**-148


# --------------------------------------------------------------------------------------------------
# torch's algorithm fails, in the model and in torch.

# Found by prove_clip_bound(4, algorithm="torch") (z3-solver 5.4), concretised near the model's values.
TORCH_COUNTEREXAMPLES = [
    pytest.param([float.fromhex("0x1.0400320000000p+6")], float.fromhex("0x1.01ffe80000000p+6"), id="n=1"),
    pytest.param(
        [float.fromhex(h) for h in ("-0x1.04p+6", "-0x1.0400020000000p+6", "-0x1.0400020000000p+6", "-0x1.03fffep+6")],
        65.0,
        id="n=4",
    ),
]


def test_the_harness_finds_torch_counterexamples_that_replay_in_torch() -> None:
    report = prove_clip_bound(2, timeout_s=60, algorithm="torch")
    assert not report.proved
    for length in report.lengths:
        assert length.result == "counterexample"
        found = length.counterexample
        assert found is not None and found.realised
        assert replay_torch_clip(found.g, found.max_norm).excess == found.excess > 0


@pytest.mark.parametrize(("g", "max_norm"), TORCH_COUNTEREXAMPLES)
def test_torch_clip_grad_norm_exceeds_max_norm_on_concrete_float32_values(g: list[float], max_norm: float) -> None:
    assert all(to_float32(x) == x for x in [*g, max_norm])
    parameter = torch.zeros(len(g), requires_grad=True)
    parameter.grad = torch.tensor(g, dtype=torch.float32)
    torch.nn.utils.clip_grad_norm_([parameter], max_norm)
    norm_squared = sum(Fraction(y) ** 2 for y in parameter.grad.tolist())
    assert norm_squared > Fraction(max_norm) ** 2
    assert replay_torch_clip(g, max_norm).excess == norm_squared - Fraction(max_norm) ** 2

    ours = torch.zeros(len(g), requires_grad=True)
    ours.grad = torch.tensor(g, dtype=torch.float32)
    clip_grad_norm_([ours], max_norm)
    assert sum(Fraction(y) ** 2 for y in ours.grad.tolist()) <= Fraction(max_norm) ** 2


@pytest.mark.slow
def test_the_hard_coded_torch_counterexamples_are_rederived_by_the_solver() -> None:
    report = prove_clip_bound(4, timeout_s=120, algorithm="torch")
    assert all(length.counterexample and length.counterexample.realised for length in report.lengths)
    derived = {(length.counterexample.g, length.counterexample.max_norm) for length in report.lengths}
    for param in TORCH_COUNTEREXAMPLES:
        g, max_norm = param.values
        assert (tuple(g), max_norm) in derived, "the solver's models changed: update TORCH_COUNTEREXAMPLES"


def test_concretisation_gives_up_where_torch_is_right() -> None:
    assert concretise_torch_counterexample([1.0], 2.0, tries=50) is None


def test_replay_refuses_values_float32_cannot_hold() -> None:
    with pytest.raises(ValueError, match=re.escape("expected a non-empty list of finite float32 values")):
        replay_torch_clip([0.1], 1.0)


def test_torch_float64_sqrt_keeps_the_stubs_error_contract() -> None:
    """The stub assumes |r - sqrt(S)| <= SQRT_ERROR sqrt(S); torch's CPU sqrt is not always correctly rounded."""
    generator = torch.Generator().manual_seed(0)
    squares = torch.ldexp(1 + 3 * torch.rand(100_000, dtype=torch.float64, generator=generator), torch.tensor(-40))
    roots = torch.sqrt(squares)  # the vectorised path; clip's 0-d call is checked by the lockstep tests
    for s, r in zip(squares.tolist(), roots.tolist(), strict=True):
        if r != math.sqrt(s):  # a correctly rounded root is within u
            bound = Fraction(s) * (1 + SQRT_ERROR) ** 2, Fraction(s) * (1 - SQRT_ERROR) ** 2
            assert bound[1] <= Fraction(r) ** 2 <= bound[0], (s, r)
