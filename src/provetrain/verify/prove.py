r"""SMT harness ``train-kani-001``: the gradient norm is bounded after clipping, proven with z3 up to a bound.

Obligation (contract ``training-loop-v1``, ``kani_harnesses``: "Gradient norm bounded after clipping",
bound 4, strategy ``stub_float``). For every execution path and gradient dtype of
:data:`~provetrain.verify.smt_clip.ARITHMETICS`, every length ``n`` in ``1..bound``, every vector ``g`` of ``n``
finite values of those dtypes and every finite **float64** ``c > 0``, the clip stores ``y`` with

.. math:: \sum_i y_i^2 \le c^2 \ \text{(exactly, in real arithmetic)} \quad\text{and every } y_i \text{ finite.}

(``c = inf`` is the measure-only path: ``k = 1``, ``y = g``, trivially bounded.) Each step is a z3 call
that must answer ``unsat`` for the negation of its claim within a **resource limit** (z3's ``rlimit``, a count
of solver work: the same verdict on an idle or a busy machine; wall time is reported beside it, never used);
``unknown`` is reported as such, never as proven.

One source of truth
-------------------
The encoding reads what the code executes: the upper factor ``C`` (:func:`provetrain.ops.clip.upper_factor`),
the numerator's margin (:func:`provetrain.ops.clip.margin_terms`), ``u_d`` and ``eta_d`` of the dtypes present
(the clip's ``_rounding_constants``) and the multi-tensor sum's extra roundings
(:data:`provetrain.ops.multi_tensor.EXTRA_ROUNDINGS`), looked up when each encoding is built. What the code
*does* with them enters as per-step assumptions (``A_lo <= A``; ``k N_up <= A_lo (1 + u)``; ``0 <= 1 / D <= k``;
the stored value within its rounding of ``g k``), and each length ends with a *binding* check: 24 runs of the
shipped functions (device and host code, the fused kernel for the multi-tensor path) on probe inputs across
each dtype's range, every one of which must satisfy every assumption of its case, evaluated exactly. A change
to a constant changes the proof; a change to an operation breaks the binding (``tests/verify/test_mutations.py``
checks five named mutants of the clip and pins which check catches each).

The model, and what each step rests on
--------------------------------------
Per arithmetic (``reference``: ``y = round_d(fl64(g) k)``; ``multi-tensor``: ``y = round(g / D)``)::

    S_hat = float64 sum of g_i^2                      (any summation tree; scaled by 4^-e with float64)
    r     = float64 sqrt(S_hat)                       (the stub)
    N_up  = fl(r * C)                                 (C = upper_factor(n, x), x = 0 or EXTRA_ROUNDINGS)
    k     = 1 if N_up <= c;  0 if A_lo <= 0;  else fl(A_lo / N_up), one subnormal step toward 0
    A_lo  = c a - b rounded down to float64,          (a, b) = margin_terms(n, u_d, eta_d)
    w     = k (reference), or 1 / D in [0, k] (multi-tensor: D a float32 rounded up from 1 / k)
    y_i   = round(fl64(g_i w))                        (through float32 for float16 / bfloat16)

===========================  ==================================================================================
step                          rests on
===========================  ==================================================================================
inputs                        reals ``|g_i| <= largest`` of their dtype, ``c`` in ``(0, MAX64]``: supersets
squares (fp16, bf16, fp32)    lemma, bit-precise: ``float64(g)^2`` exact and finite (float16 / bfloat16 values
                              are float32 values)
sum, reference                z3 joins of subtrees (exact leaves: ``(1 +- u)^(n-1)``; float64's rounded
                              squares: ``(1 +- u)^n``), by induction any tree: torch's order, BLAS blocking,
                              threads, the C kernel's lanes, the distributed clip's ranks (rank order)
sum, multi-tensor             z3 lemmas: ``fl(fl(sqrt s_j)^2)`` adds 5 roundings, a join adds 1 to the worse
                              input; so ``n - 1 + EXTRA_ROUNDINGS`` per term (counted in
                              :mod:`provetrain.ops.multi_tensor`, *Step 1*)
float64 scaling               paper: clip's *Proof*, step 1 (absolute ``2^-1074`` terms are a relative
                              ``n 2^-1070``; encoded as that factor); distributed rank combination: its
                              ``scaled_sum_of_squares_across_ranks`` guarantee (same slack)
sqrt                          the stub: one ulp, checked against torch's float64 sqrt by the tests
N_up, decision, k, A_lo       the standard model ``(1 + d)``, ``|d| <= u``, and the binding check
divisor ``D >= 1 / k``        the binding check on ``clip_divisor`` / ``clip_divisor_on_host``
product / quotient            ``(1 + d)`` and an absolute ``2^-1075`` (CUDA's float64 quotient; the CPU
                              kernels' single rounding is the case ``d = 0``)
output rounding               lemmas, bit-precise (RNE): float32; float16 and bfloat16 through float32
                              (torch's cast, and the fused kernels' float32 op-math then the cast back);
                              float64 stores ``p``
mixed lists                   each element its own dtype's facts; the margin with the largest ``u_d``, ``eta_d``
===========================  ==================================================================================

Per length ``n``: a check that the cases (``N_up <= c``; ``A_lo <= 0``; ``A_lo > 0``) cover every run; per
case, a satisfiability check of its assumptions (so the proof is not vacuous) and a *derivation*
(:class:`~provetrain.verify.smt_derivation.Derivation`) of the goal: small z3 steps, each citing only the
case's assumptions or conclusions proved before it: ``||g|| <= N_up``; ``k N_up <= A_lo (1 + u)``;
``k (1 + u) <= 1 - u`` (no overflow); per element ``|y_i| <= V_i = A_REL k |g_i| + H``; Cauchy-Schwarz and
Minkowski by expansion; ``T = A_REL k ||g|| + sqrt(n) H <= c`` (the margins ``4 u_d`` and
``eta_d (isqrt(n) + 1)`` pay for the rounding of ``y``). Steps that are linear combinations of nonlinear
facts are checked after :func:`~provetrain.verify.smt_derivation.linearize` (sound over-approximation).
When a step fails, the case is searched directly for a model (a counterexample), with a smaller budget.

Outside the proof: lengths above ``bound``; a GradScaler scale ``sigma != 1`` on the multi-tensor path (the
"no clip" case divides by ``D = sigma``, which rounds: the keep case is no longer bit-exact, and with a
scale that is not a power of two the stored norm can exceed ``c`` near the threshold); flush-to-zero
(``torch.set_flush_denormal``) and the CUDA kernels' denormal modes; that torch's ``*``, ``/``, casts and sums
are IEEE round-to-nearest operations (the binding check and the tests run them on the CPU only).

torch's algorithm
-----------------
``algorithm="torch"`` encodes ``torch.nn.utils.clip_grad_norm_`` for one float32 tensor in the same model:
float32 squares and sums (relative ``u32``), the sqrt stub (``u32``), ``den = fl32(r + 1e-6)``,
``coef = fl32(c / den)``, ``y_i = fl32(g_i coef)``, in a box where every float32 operation is normal and the
coefficient really clips. z3 finds violating models in well under a second for every ``n``; a model's
rounding errors need not be realisable, so each is *concretised*: rounded to float32 and moved by a few
ulps until torch itself, replayed, stores ``||y||^2 > c^2`` (exact, with :class:`fractions.Fraction`). Found
here: ``g = [65.00019073486328]``, ``c = 64.49990844726562`` (torch stores ``y`` one float32 ulp above
``c``: ``||y||^2 - c^2 = 2.4e-7 c^2``), and for ``n = 4``
``g = [-65.0, -65.00000762939453, -65.00000762939453, -64.99999237060547]``, ``c = 65`` (the coefficient
rounds to exactly 1/2: ``5.9e-8 c^2``).
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import torch
import z3

from provetrain.verify.smt_clip import (
    ARITHMETICS,
    Arithmetic,
    ClipVars,
    TorchVars,
    accumulation_step,
    binding_failures,
    clip_branches,
    exhaustive_cases,
    fp_exact_squares,
    fp_output_rounding,
    join_step,
    norm_square_step,
    to_float32,
    torch_assumptions,
)
from provetrain.verify.smt_derivation import DEFAULT_RLIMIT, Derivation, check_satisfiable, check_unsat
from provetrain.verify.smt_derivation import StepResult as StepResult

__all__ = [
    "DEFAULT_RLIMIT",
    "HARNESS_ID",
    "PROOF_COLUMNS",
    "Counterexample",
    "LengthResult",
    "ProofReport",
    "StepResult",
    "TorchReplay",
    "concretise_torch_counterexample",
    "proof_rows",
    "prove_clip_bound",
    "prove_length",
    "replay_torch_clip",
]

HARNESS_ID = "train-kani-001"
PROOF_COLUMNS = ("arithmetic", "n", "result", "rlimit", "seconds", "detail")
"""Column names of :func:`proof_rows`."""

Algorithm = Literal["provetrain", "torch"]
Result = Literal["proved", "counterexample", "unknown", "code differs"]
MAX_BOUND = 64
BINDING_PROBES = 12
"""Runs of the shipped code per arithmetic and length that must satisfy the encoding's assumptions."""
DIRECT_QUERY_RLIMIT = 1_000_000
"""z3 resource units for the search for a model after a failed step (it finds nothing to prove, only a
counterexample to show). nlsat spends units slowly on these queries: 1,000,000 took 14 s on a 5-element one."""


@dataclass(frozen=True)
class TorchReplay:
    """``torch.nn.utils.clip_grad_norm_`` run on concrete float32 values.

    Attributes:
        y: the clipped gradient torch stored.
        excess: ``sum(y_i^2) - max_norm^2``, exact; positive means the bound is violated.
    """

    y: tuple[float, ...]
    excess: Fraction

    @property
    def violated(self) -> bool:
        return self.excess > 0


@dataclass(frozen=True)
class Counterexample:
    """Values that violate the bound in the model, and whether they do in reality.

    Attributes:
        g: the gradient values (for torch: float32, the concretised values when ``realised``).
        max_norm: the clip value ``c`` (a float32 value for torch).
        model: z3's model, every variable as a decimal string (rounding errors included).
        realised: torch only: the concrete ``g, max_norm`` break ``torch.nn.utils.clip_grad_norm_`` when
            replayed; ``None`` when not replayed.
        excess: exact ``||y||^2 - max_norm^2`` of the replay (``None`` when not replayed).
    """

    g: tuple[float, ...]
    max_norm: float
    model: Mapping[str, str]
    realised: bool | None = None
    excess: Fraction | None = None


@dataclass(frozen=True)
class LengthResult:
    """The harness for one arithmetic and one length ``n``.

    Attributes:
        n: the vector length.
        result: ``proved`` (every step ``unsat`` and the shipped code within the encoding), ``counterexample``
            (the model's negation is ``sat``), ``code differs`` (a run of the shipped code breaks an
            assumption of the encoding: the proof is not about that code), or ``unknown`` (a step hit the
            resource limit, or failed while the direct query found no model).
        seconds: wall time for this length (reported only; no verdict depends on it).
        steps: every solver call, in order, then the binding check.
        counterexample: the violating values, for ``counterexample``.
        arithmetic: the path and dtypes (:attr:`provetrain.verify.smt_clip.Arithmetic.name`).
    """

    n: int
    result: Result
    seconds: float
    steps: tuple[StepResult, ...] = ()
    counterexample: Counterexample | None = None
    arithmetic: str = "reference float32"

    @property
    def rlimit(self) -> int:
        """z3 resource units used by this length's solver calls."""
        return sum(step.rlimit for step in self.steps)


@dataclass(frozen=True)
class ProofReport:
    """The harness ``train-kani-001`` run up to ``bound``.

    Attributes:
        algorithm: ``provetrain`` (the shipped clip) or ``torch`` (``torch.nn.utils.clip_grad_norm_``).
        bound: the largest length checked; ``lengths`` holds ``1..bound`` per arithmetic.
        rlimit: the z3 resource limit of each solver call.
        lemmas: the length-independent lemmas (provetrain only).
        lengths: one result per arithmetic and length.
        seconds: wall time in all (reported only).
    """

    algorithm: Algorithm
    bound: int
    rlimit: int
    lemmas: tuple[StepResult, ...]
    lengths: tuple[LengthResult, ...]
    seconds: float
    harness: str = field(default=HARNESS_ID)

    @property
    def proved(self) -> bool:
        """Every lemma and every length proved: the obligation holds up to ``bound``."""
        lemmas = all(step.verdict == "proved" for step in self.lemmas)
        return lemmas and all(length.result == "proved" for length in self.lengths)

    @property
    def rlimit_used(self) -> int:
        """z3 resource units used in all: the same on a busy machine as on an idle one."""
        return sum(step.rlimit for step in self.lemmas) + sum(length.rlimit for length in self.lengths)


def prove_clip_bound(
    bound: int = 4,
    *,
    rlimit: int = DEFAULT_RLIMIT,
    algorithm: Algorithm = "provetrain",
    arithmetics: Sequence[Arithmetic] = ARITHMETICS,
) -> ProofReport:
    """Run the harness ``train-kani-001`` for lengths ``1..bound``.

    Args:
        bound: the largest vector length, in ``[1, 64]`` (the contract's bound is 4).
        rlimit: z3 resource units allowed per solver call (an int > 0): a count of solver work, so the
            verdict is the same on a busy machine. ``DEFAULT_RLIMIT`` leaves every call about 40x room.
        algorithm: ``"provetrain"`` proves :mod:`provetrain.ops.clip` on each of ``arithmetics``;
            ``"torch"`` looks for counterexamples to ``torch.nn.utils.clip_grad_norm_`` (float32) and replays
            them in torch.
        arithmetics: the execution paths x dtypes to prove (default: all, see
            :data:`provetrain.verify.smt_clip.ARITHMETICS`).

    Returns:
        A :class:`ProofReport`; ``report.proved`` is True only if z3 answered ``unsat`` everywhere and the
        shipped code stayed within the encoding on every probe run.

    Examples:
        >>> prove_clip_bound(1, arithmetics=ARITHMETICS[:1]).lengths[0].result
        'proved'
    """
    _check_arguments(bound, rlimit, algorithm)
    start = time.perf_counter()
    if algorithm == "provetrain":
        lemmas = _lemmas(arithmetics, bound, rlimit)
        lengths = tuple(prove_length(a, n, rlimit=rlimit) for a in arithmetics for n in range(1, bound + 1))
    else:
        lemmas = ()
        lengths = tuple(_refute_torch_length(n, rlimit) for n in range(1, bound + 1))
    return ProofReport(algorithm, bound, rlimit, lemmas, lengths, time.perf_counter() - start)


def _lemmas(arithmetics: Sequence[Arithmetic], bound: int, rlimit: int) -> tuple[StepResult, ...]:
    """The length-independent lemmas the chosen arithmetics rest on, and the summation-tree joins."""
    outputs = {a.output(i).dtype for a in arithmetics for i in range(min(bound, len(a.dtypes)))}
    lemmas = [
        fp_output_rounding(d, rlimit=rlimit) for d in (torch.float32, torch.float16, torch.bfloat16) if d in outputs
    ]
    if any(d != torch.float64 for a in arithmetics for d in a.dtypes):
        lemmas.append(fp_exact_squares(rlimit=rlimit))
    if any(a.path == "multi-tensor" for a in arithmetics):
        lemmas += [norm_square_step(rlimit=rlimit), join_step(rlimit=rlimit)]
    for rounded in sorted({torch.float64 in a.dtypes for a in arithmetics if a.path == "reference"}):
        for n in range(2, bound + 1):
            lemmas += [
                accumulation_step(left, n - left, rounded_leaves=rounded, rlimit=rlimit)
                for left in range(1, n // 2 + 1)
            ]
    return tuple(lemmas)


def _check_arguments(bound: object, rlimit: object, algorithm: object) -> None:
    if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_BOUND:
        raise ValueError(f"bound={bound!r}; expected an int in [1, {MAX_BOUND}] (the contract's bound is 4)")
    if isinstance(rlimit, bool) or not isinstance(rlimit, int) or not 0 < rlimit < 2**32:
        raise ValueError(f"rlimit={rlimit!r}; expected an int in [1, 2**32): z3 resource units per solver call")
    if algorithm not in ("provetrain", "torch"):
        raise ValueError(f"algorithm={algorithm!r}; expected 'provetrain' or 'torch'")


def prove_length(
    arithmetic: Arithmetic, n: int, *, rlimit: int = DEFAULT_RLIMIT, direct_rlimit: int = DIRECT_QUERY_RLIMIT
) -> LengthResult:
    """The proof for one arithmetic and length ``n``: cases, non-vacuity, derivations, binding to the code.

    The summation-tree joins and the bit-precise lemmas are length-independent (or shared) and checked once
    by :func:`prove_clip_bound`. After a failed step the case is searched for a counterexample with at most
    ``min(rlimit, direct_rlimit)`` units (0: not searched; the result is then ``unknown``).
    """
    start = time.perf_counter()
    variables = ClipVars.create(n)
    branches = clip_branches(variables, arithmetic)
    steps = [exhaustive_cases(branches, rlimit=rlimit)]
    counterexample = None
    for branch in branches:
        name = f"{branch.name}: the assumptions have a model (the proof is not vacuous)"
        steps.append(check_satisfiable(name, [*branch.assumptions, *branch.definitions], rlimit=rlimit))
        derivation = Derivation((*branch.assumptions, *branch.definitions), rlimit=rlimit)
        branch.derive(derivation)
        steps += [
            StepResult(f"{branch.name}: {s.name}", s.verdict, s.seconds, s.reason, s.rlimit) for s in derivation.steps
        ]
        if derivation.failed and counterexample is None and direct_rlimit > 0:
            # A failed step proves nothing either way: ask the whole case directly for a model.
            direct, model = check_unsat(
                f"{branch.name}: direct query",
                [*branch.assumptions, z3.Not(variables.goal())],
                rlimit=min(rlimit, direct_rlimit),
            )
            steps.append(direct)
            if model is not None:
                counterexample = _model_counterexample(model, variables.g, variables.c, c_float32=False)
    binding_start = time.perf_counter()
    broken = binding_failures(arithmetic, n, count=BINDING_PROBES)
    binding = f"binding: {2 * BINDING_PROBES} runs of the shipped code satisfy their case's assumptions"
    seconds = time.perf_counter() - binding_start
    steps.append(StepResult(binding, "refuted" if broken else "proved", seconds, broken[0] if broken else ""))
    proved = all(s.verdict == "proved" for s in steps)
    result: Result = "proved" if proved else ("code differs" if broken else "unknown")
    if counterexample is not None:
        result = "counterexample"
    return LengthResult(n, result, time.perf_counter() - start, tuple(steps), counterexample, arithmetic.name)


def _refute_torch_length(n: int, rlimit: int) -> LengthResult:
    start = time.perf_counter()
    variables = TorchVars.create(n)
    negation = [*torch_assumptions(variables), z3.Not(variables.goal())]
    step, model = check_unsat(f"torch clip_grad_norm_, n = {n}: ||y|| <= c", negation, rlimit=rlimit)
    if model is None:
        result: Result = "proved" if step.verdict == "proved" else "unknown"
        return LengthResult(n, result, time.perf_counter() - start, (step,), arithmetic="torch float32")
    found = _model_counterexample(model, variables.g, variables.c, c_float32=True)
    concrete = concretise_torch_counterexample(found.g, found.max_norm)
    if concrete is None:
        replay = replay_torch_clip(found.g, found.max_norm)
        found = Counterexample(found.g, found.max_norm, found.model, replay.violated, replay.excess)
    else:
        g, max_norm, replay = concrete
        found = Counterexample(g, max_norm, found.model, True, replay.excess)
    return LengthResult(n, "counterexample", time.perf_counter() - start, (step,), found, "torch float32")


def _fraction(value: z3.ExprRef) -> Fraction:
    if z3.is_algebraic_value(value):
        value = value.approx(40)
    if z3.is_rational_value(value):
        return Fraction(value.numerator_as_long(), value.denominator_as_long())
    raise TypeError(f"z3 model value {value} is not a number")


def _model_counterexample(
    model: z3.ModelRef, g: Sequence[z3.ArithRef], c: z3.ArithRef, *, c_float32: bool
) -> Counterexample:
    """The model's values: every variable exactly, ``g`` rounded to float32, ``c`` to float32 or float64."""
    values = {}
    for declaration in model.decls():
        value = model[declaration]
        if z3.is_arith(value):
            values[declaration.name()] = str(_fraction(value))
        else:
            values[declaration.name()] = str(value)
    concrete = [to_float32(float(_fraction(model.eval(x, model_completion=True)))) for x in g]
    clip_value = float(_fraction(model.eval(c, model_completion=True)))
    return Counterexample(tuple(concrete), to_float32(clip_value) if c_float32 else clip_value, values)


# --------------------------------------------------------------------------------------------------
# Replaying torch on concrete values.


def _is_float32(x: float) -> bool:
    return math.isfinite(x) and to_float32(x) == x


def replay_torch_clip(g: Sequence[float], max_norm: float) -> TorchReplay:
    """Run ``torch.nn.utils.clip_grad_norm_`` on one float32 gradient ``g`` and measure the result exactly.

    Args:
        g: finite float32 values (Python floats that float32 represents exactly), at least one.
        max_norm: the clip value passed to torch, > 0.

    Returns:
        The stored gradient and ``||y||^2 - max_norm^2`` in exact rationals.
    """
    if not g or not all(_is_float32(x) for x in g):
        raise ValueError(f"g={list(g)!r}; expected a non-empty list of finite float32 values (to_float32(x) == x)")
    if not 0 < max_norm < math.inf:
        raise ValueError(f"max_norm={max_norm!r}; expected a finite value > 0")
    parameter = torch.zeros(len(g), dtype=torch.float32, requires_grad=True)
    parameter.grad = torch.tensor(list(g), dtype=torch.float32)
    torch.nn.utils.clip_grad_norm_([parameter], max_norm)
    y = tuple(parameter.grad.tolist())
    excess = sum((Fraction(v) ** 2 for v in y), Fraction(0)) - Fraction(max_norm) ** 2
    return TorchReplay(y, excess)


def _step_float32(x: float, ulps: int) -> float:
    """``x`` moved by ``ulps`` float32 steps (through zero if needed), clamped to the finite range."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    ordered = bits if bits < 0x80000000 else -(bits - 0x80000000)
    ordered = max(-0x7F7FFFFF, min(0x7F7FFFFF, ordered + ulps))
    bits = ordered if ordered >= 0 else 0x80000000 - ordered
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def concretise_torch_counterexample(
    g: Sequence[float], max_norm: float, *, tries: int = 4000, seed: int = 0
) -> tuple[tuple[float, ...], float, TorchReplay] | None:
    """Search float32 values near ``(g, max_norm)`` on which torch itself violates the bound.

    The model's rounding errors are chosen by the solver and may not be the ones torch makes, so its values
    are a starting point: first the values themselves rounded to float32, then random moves of each nonzero
    value and of ``max_norm`` by a few ulps (one more every 100 tries), deterministic for a ``seed``.

    Returns:
        ``(g, max_norm, replay)`` with ``replay.violated``, or None if ``tries`` candidates all respect it.
    """
    start = tuple(to_float32(float(x)) for x in g)
    clip_value = to_float32(float(max_norm))
    rng = random.Random(seed)
    for attempt in range(tries):
        width = 1 + attempt // 100
        moved = tuple(_step_float32(x, rng.randint(-width, width)) if x else x for x in start)
        candidate = start if attempt == 0 else moved
        c = clip_value if attempt == 0 else _step_float32(clip_value, rng.randint(-width, width))
        if not c > 0:
            continue
        replay = replay_torch_clip(candidate, c)
        if replay.violated:
            return candidate, c, replay
    return None


# --------------------------------------------------------------------------------------------------
# Rows for the command line.


def proof_rows(report: ProofReport) -> list[tuple[str, ...]]:
    """The report as rows of :data:`PROOF_COLUMNS` for a table.

    The first row (provetrain only) is the length-independent lemmas; then one row per arithmetic and length.
    ``rlimit`` is the z3 resource units used (the same at any machine load), ``seconds`` the wall time.
    """
    rows = []
    if report.lemmas:
        verdict = "proved" if all(s.verdict == "proved" for s in report.lemmas) else "unknown"
        seconds = sum(s.seconds for s in report.lemmas)
        used = sum(s.rlimit for s in report.lemmas)
        failed = [s for s in report.lemmas if s.verdict != "proved"]
        detail = f"{failed[0].name}: {failed[0].verdict} {failed[0].reason}" if failed else _lemma_names(report)
        rows.append(("lemmas", "", verdict, str(used), f"{seconds:.2f}", detail))
    for length in report.lengths:
        row = (length.arithmetic, str(length.n), length.result, str(length.rlimit), f"{length.seconds:.2f}")
        rows.append((*row, _detail(length)))
    return rows


def _lemma_names(report: ProofReport) -> str:
    joins = [s for s in report.lemmas if s.name.startswith("accumulation")]
    others = [s.name for s in report.lemmas if not s.name.startswith("accumulation")]
    return "; ".join([*others, f"{len(joins)} summation-tree joins"] if joins else others)


def _detail(length: LengthResult) -> str:
    if length.counterexample is not None:
        found = length.counterexample
        text = f"g={list(found.g)}, max_norm={found.max_norm!r}"
        if found.excess is not None:
            relative = float(found.excess / Fraction(found.max_norm) ** 2)
            replayed = "violates in torch" if found.realised else "holds in torch (model only)"
            text += f"; replayed: ||y||^2 - c^2 = {relative:.3g} c^2, {replayed}"
        return text
    failed = [s for s in length.steps if s.verdict != "proved"]
    if failed:
        return f"{failed[0].name}: {failed[0].verdict} {failed[0].reason}".strip()
    largest = max(length.steps, key=lambda s: s.rlimit)
    return f"{len(length.steps)} checks, all as required; largest {largest.rlimit} units: {largest.name}"
