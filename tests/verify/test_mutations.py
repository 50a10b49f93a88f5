"""Mutation check: each named mutant of the clip must fail the bounded proof or the exact-arithmetic tests.

A mutant replaces one of the definitions that :mod:`provetrain.ops.clip` executes and the SMT harness reads
(the upper factor, the margin, the rounding of the numerator, the subnormal step), by monkeypatching it on the
module, so the run-time path and the proof see the same change. The table of which check caught which mutant
is printed and pinned.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch

from provetrain.ops import clip
from provetrain.verify.prove import prove_length
from provetrain.verify.smt_clip import Arithmetic

REFERENCE_32 = Arithmetic("reference", (torch.float32,))
REFERENCE_64 = Arithmetic("reference", (torch.float64,))
PROOF_CASES = [(REFERENCE_32, 1), (REFERENCE_32, 5), (REFERENCE_64, 1), (REFERENCE_64, 2)]
"""Lengths the mutants are proved at: 1 and 2 as in the contract's bound; 5, the first where ``sqrt(n)``
half-subnormals exceed ``eta (isqrt(n) + 1) = 3 eta`` without the ``isqrt`` term."""
RLIMIT = 20_000_000  # ample for every step of these lengths (the largest uses about 0.1 %)


def _round_up(exact: Fraction) -> float:
    rounded = float(exact)
    return math.nextafter(rounded, math.inf) if Fraction(rounded) < exact else rounded


MUTANTS: dict[str, dict[str, Callable]] = {
    "margin removed": {"margin_terms": lambda n, u_d, eta_d: (Fraction(1), eta_d * (math.isqrt(n) + 1))},
    "N_up not inflated": {"upper_factor": lambda n, extra_roundings=0: 1.0},
    "rounding direction flipped": {"round_down": _round_up},
    "isqrt term dropped": {"margin_terms": lambda n, u_d, eta_d: (1 - 4 * u_d, eta_d)},
    "subnormal step removed": {
        "toward_zero_if_subnormal": lambda k: k,
        "toward_zero_if_subnormal_tensor": lambda k: k,
    },
}


# --------------------------------------------------------------------------------------------------
# The exact-arithmetic checks: the shipped clip on concrete inputs, its stored norm compared exactly.


def _exceeds(grads: list[torch.Tensor], max_norm: float) -> bool:
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad.clone()
    clip.clip_grad_norm_(params, max_norm)
    stored = sum((Fraction(x) ** 2 for p in params for x in p.grad.double().reshape(-1).tolist()), Fraction(0))
    return stored > Fraction(max_norm) ** 2


def near_the_threshold() -> bool:
    """300 random float32 gradients, clip values within a few ulps of their norm: the bound holds."""
    rng = random.Random(0)
    for _ in range(300):
        g = torch.tensor([rng.uniform(-1, 1) * 2.0 ** rng.randint(-20, 20) for _ in range(rng.randint(1, 8))])
        norm = math.sqrt(math.fsum(x * x for x in g.double().tolist()))
        if norm > 0 and _exceeds([g], norm * (1 - rng.randint(1, 64) * 2.0**-24)):
            return False
    return True


def subnormal_outputs() -> bool:
    """Clip values a few smallest subnormals wide, on long gradients of subnormals: each output rounds absolutely."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        eta = float(clip.SMALLEST_SUBNORMAL[dtype])
        g = torch.full((2_500,), eta, dtype=dtype)  # ||g|| = 50 eta
        if any(_exceeds([g], eta * multiple) for multiple in (30, 40, 49)):
            return False
    return True


def subnormal_coefficient() -> bool:
    """float64 gradients clipped by a factor below 2^-1022 (``k`` subnormal), on the reference and host paths."""
    g = torch.tensor([2.0**100], dtype=torch.float64)
    for j in range(64):
        max_norm = 2.0**100 * (4096 + j + 0.6) * 2.0**-1074  # max_norm / ||g|| just above a subnormal midpoint
        if _exceeds([g], max_norm):
            return False
        _, k = clip.clip_coefficient_on_host(2.0**200, max_norm, numel=1, dtypes={torch.float64})
        if Fraction(k) * 2**100 > Fraction(max_norm):
            return False
    return True


EXACT_CHECKS: dict[str, Callable[[], bool]] = {
    "exact: near the threshold": near_the_threshold,
    "exact: subnormal outputs": subnormal_outputs,
    "exact: subnormal k": subnormal_coefficient,
}


def caught_by() -> set[str]:
    """The checks that fail on the clip as it is now (patched or not)."""
    caught = set()
    for arithmetic, n in PROOF_CASES:
        result = prove_length(arithmetic, n, rlimit=RLIMIT, direct_rlimit=0)  # a failed step is enough
        binding = result.steps[-1]
        if any(step.verdict != "proved" for step in result.steps[:-1]):
            caught.add(f"proof: {arithmetic.name}, n={n}")
        if binding.verdict != "proved":
            caught.add(f"binding: {arithmetic.name}, n={n}")
    caught |= {name for name, check in EXACT_CHECKS.items() if not check()}
    return caught


ALL_PROOFS = {f"proof: {a.name}, n={n}" for a, n in PROOF_CASES}
EXPECTED = {
    # The proof reads the margin: T <= c fails; the clip exceeds the bound near the threshold.
    "margin removed": ALL_PROOFS | {"exact: near the threshold"},
    # The proof reads C: ||g|| <= N_up fails at every length. No sampled run exceeds (the 4 u_d margin hides it).
    "N_up not inflated": ALL_PROOFS,
    # A_lo above the exact numerator breaks the assumption A_lo <= A on runs; too small to exceed in samples.
    "rounding direction flipped": {f"binding: {a.name}, n={n}" for a, n in PROOF_CASES},
    # Invisible up to n = 4 (eta and 3 eta both exceed sqrt(n) H); the proof at n = 5 and subnormal outputs.
    "isqrt term dropped": {"proof: reference float32, n=5", "exact: subnormal outputs"},
    # k is subnormal only with float64 gradients: runs there break k <= A_lo / N_up (1 + u).
    "subnormal step removed": {
        "binding: reference float64, n=1",
        "binding: reference float64, n=2",
        "exact: subnormal k",
    },
}


@pytest.fixture
def fresh_numerator():
    clip._margin_numerator.cache_clear()  # it caches A_lo: a mutant must not see values of the real clip
    yield
    clip._margin_numerator.cache_clear()


def test_the_shipped_clip_passes_every_check(fresh_numerator: None) -> None:
    assert caught_by() == set()


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_each_mutant_is_caught(mutant: str, monkeypatch: pytest.MonkeyPatch, fresh_numerator: None) -> None:
    for name, replacement in MUTANTS[mutant].items():
        monkeypatch.setattr(clip, name, replacement)
    caught = caught_by()
    print(f"{mutant:28} caught by: {', '.join(sorted(caught)) or 'NOTHING'}")
    assert caught, f"the mutant {mutant!r} passed every check"
    assert caught == EXPECTED[mutant]
