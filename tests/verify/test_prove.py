"""The SMT harness train-kani-001: the proof, its soundness checks, lockstep with the shipped clip, torch's
counterexamples replayed in torch."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from provetrain import cli
from provetrain.ops import clip
from provetrain.verify.prove import (
    PROOF_COLUMNS,
    ProofReport,
    concretise_torch_counterexample,
    proof_rows,
    prove_clip_bound,
    replay_torch_clip,
)
from provetrain.verify.smt_clip import (
    ARITHMETICS,
    SQRT_ERROR,
    Arithmetic,
    ClipVars,
    binding_failures,
    clip_branches,
    shipped_runs,
    to_float32,
)
from provetrain.verify.smt_derivation import DEFAULT_RLIMIT, Derivation, check_unsat, linearize

CONTRACT_BOUND = 4


@pytest.fixture(scope="module")
def contract_report() -> ProofReport:
    return prove_clip_bound(CONTRACT_BOUND)


# --------------------------------------------------------------------------------------------------
# The proof.


@pytest.mark.contract("train-kani-001")
def test_harness_proves_the_bound_for_every_path_and_dtype_up_to_the_contract_bound(
    contract_report: ProofReport,
) -> None:
    assert contract_report.harness == "train-kani-001"
    assert contract_report.proved, proof_rows(contract_report)
    cases = [(length.arithmetic, length.n) for length in contract_report.lengths]
    assert cases == [(a.name, n) for a in ARITHMETICS for n in range(1, 5)]
    assert {step.verdict for step in contract_report.lemmas} == {"proved"}


def test_every_path_and_dtype_is_covered() -> None:
    names = {a.name for a in ARITHMETICS}
    for dtype in ("float16", "bfloat16", "float32", "float64", "float16+bfloat16+float32+float64"):
        assert f"reference {dtype}" in names
        assert f"multi-tensor {dtype}" in names
    assert {a.name for a in ARITHMETICS if a.opmath} == {
        "multi-tensor float16 (Adam's float32 op-math value)",
        "multi-tensor bfloat16 (Adam's float32 op-math value)",
    }


@pytest.mark.parametrize("index", range(len(ARITHMETICS) * CONTRACT_BOUND))
def test_each_length_is_proved_by_unsat_steps_within_the_resource_limit(
    contract_report: ProofReport, index: int
) -> None:
    length = contract_report.lengths[index]
    assert length.result == "proved"
    assert length.counterexample is None
    assert all(step.verdict == "proved" for step in length.steps)
    assert 0 < max(step.rlimit for step in length.steps) < DEFAULT_RLIMIT // 20  # room for other z3 builds
    assert length.steps[-1].name.startswith("binding:")


def test_rows_have_the_lemmas_then_one_row_per_arithmetic_and_length(contract_report: ProofReport) -> None:
    rows = proof_rows(contract_report)
    assert PROOF_COLUMNS == ("arithmetic", "n", "result", "rlimit", "seconds", "detail")
    assert rows[0][:3] == ("lemmas", "", "proved")
    assert [row[:3] for row in rows[1:]] == [(a.name, str(n), "proved") for a in ARITHMETICS for n in range(1, 5)]
    assert all(len(row) == len(PROOF_COLUMNS) for row in rows)
    assert sum(int(row[3]) for row in rows) == contract_report.rlimit_used


RESOURCE_COUNTS = """
from provetrain.verify.prove import prove_clip_bound
from provetrain.verify.smt_clip import ARITHMETICS
report = prove_clip_bound(1, arithmetics=ARITHMETICS[:1])
print(report.proved, [s.rlimit for s in report.lemmas], [s.rlimit for x in report.lengths for s in x.steps])
"""


def test_the_same_command_uses_the_same_resource_count() -> None:
    """The verdict depends on a count of solver work, which a fresh process reproduces exactly.

    (Within one process z3's shared context makes later counts differ: the CLI is one fresh process.)
    """
    runs = [
        subprocess.run([sys.executable, "-c", RESOURCE_COUNTS], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert runs[0].startswith("True [")
    assert runs[0] == runs[1]


def test_a_resource_limit_too_small_gives_unknown_not_proved() -> None:
    report = prove_clip_bound(1, rlimit=50, arithmetics=ARITHMETICS[:1])
    assert not report.proved
    assert {length.result for length in report.lengths} == {"unknown"}


def test_the_cli_default_limit_is_the_librarys() -> None:
    assert cli.PROVE_RLIMIT == DEFAULT_RLIMIT


@pytest.mark.parametrize("bound", [pytest.param(8), pytest.param(16, marks=pytest.mark.slow)])
def test_the_proof_extends_beyond_the_contract_bound(bound: int) -> None:
    """The float32 reference path (the contract's harness) beyond the contract's bound: 8 in CI, 16 when slow."""
    report = prove_clip_bound(bound, arithmetics=ARITHMETICS[:1])
    assert report.proved, proof_rows(report)


def test_the_proof_reads_the_shipped_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous and not a transcription: with the margin removed from ops.clip, the clip case has a model."""
    monkeypatch.setattr(clip, "margin_terms", lambda n, u_d, eta_d: (Fraction(1), eta_d * (math.isqrt(n) + 1)))
    variables = ClipVars.create(1)
    branch = next(b for b in clip_branches(variables, ARITHMETICS[0]) if b.kind == "clip")
    derivation = Derivation((*branch.assumptions, *branch.definitions), rlimit=DEFAULT_RLIMIT)
    branch.derive(derivation)
    assert derivation.failed
    result, model = check_unsat("direct", [*branch.assumptions, z3.Not(variables.goal())], rlimit=DEFAULT_RLIMIT)
    assert result.verdict == "refuted"
    assert model is not None


def test_a_step_citing_an_unproved_fact_is_refused() -> None:
    x = z3.Real("x")
    derivation = Derivation([x >= 1], rlimit=10**6)
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
        ({"bound": 1, "rlimit": 0}, "rlimit=0; expected an int in [1, 2**32)"),
        ({"bound": 1, "rlimit": 1.5}, "rlimit=1.5; expected an int in [1, 2**32)"),
        ({"bound": 1, "algorithm": "optax"}, "algorithm='optax'; expected 'provetrain' or 'torch'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        prove_clip_bound(**kwargs)


# --------------------------------------------------------------------------------------------------
# Binding: runs of the shipped code satisfy every assumption of their case.

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


def _holds(formula: z3.BoolRef, values: dict[str, Fraction | bool]) -> bool:
    pairs = [
        (z3.Bool(name), z3.BoolVal(value)) if isinstance(value, bool) else (z3.Real(name), z3.RealVal(value))
        for name, value in values.items()
    ]
    return z3.is_true(z3.simplify(z3.substitute(formula, *pairs)))


@settings(max_examples=200, deadline=None)
@given(clip_cases(), st.sampled_from([ARITHMETICS[0], next(a for a in ARITHMETICS if a.path == "multi-tensor")]))
def test_real_runs_satisfy_every_assumption_of_the_encoding(case: tuple[list[float], float], arithmetic) -> None:
    """The encoding over-approximates the shipped clip: each run (device and host code) is a model of its case."""
    g, max_norm = case
    branches = {b.kind: b for b in clip_branches(ClipVars.create(len(g)), arithmetic)}
    for kind, values in shipped_runs(arithmetic, g, max_norm):
        branch = branches[kind]
        assert _holds(branch.guard, values)
        failing = [str(fact) for fact in branch.assumptions if not _holds(fact, values)]
        assert not failing, failing


@pytest.mark.parametrize("arithmetic", [a for a in ARITHMETICS if not a.opmath], ids=lambda a: a.name)
def test_probe_runs_of_every_path_satisfy_the_encoding(arithmetic: Arithmetic) -> None:
    assert binding_failures(arithmetic, 3, count=24) == []


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
    report = prove_clip_bound(2, algorithm="torch")
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
    clip.clip_grad_norm_([ours], max_norm)
    assert sum(Fraction(y) ** 2 for y in ours.grad.tolist()) <= Fraction(max_norm) ** 2


@pytest.mark.slow
def test_the_hard_coded_torch_counterexamples_are_rederived_by_the_solver() -> None:
    report = prove_clip_bound(4, algorithm="torch")
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
