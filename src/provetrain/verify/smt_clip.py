"""The z3 encodings behind :mod:`provetrain.verify.prove`: provetrain's clip on each path, torch's clip, lemmas.

One source of truth: the encoding reads its constants from the code that runs. The upper factor ``C``
(:func:`provetrain.ops.clip.upper_factor`), the numerator's margin (:func:`provetrain.ops.clip.margin_terms`),
the rounding constants ``u_d`` and ``eta_d`` of the dtypes present, and the multi-tensor path's extra roundings
(:data:`provetrain.ops.multi_tensor.EXTRA_ROUNDINGS`) are looked up on those modules each time an encoding is
built, so changing one there changes what is proved. What the code *does* with them (the rounding direction of
``A_lo``, the subnormal step of ``k``, the divisor rounded up, the order of the operations) enters the encoding
as per-step assumptions; :func:`binding_failures` runs the shipped functions on probe inputs and checks, in
exact rationals, that each run satisfies every assumption of its case, so a change of what the code does
fails the proof too.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
import z3

from provetrain.ops import clip as shipped
from provetrain.ops import multi_tensor as shipped_multi_tensor
from provetrain.verify.smt_derivation import Derivation, StepResult, check_unsat

__all__ = [
    "ARITHMETICS",
    "OUTPUT_ROUNDING",
    "SQRT_ERROR",
    "Arithmetic",
    "ClipBranch",
    "ClipVars",
    "OutputRounding",
    "TorchVars",
    "accumulation_step",
    "binding_failures",
    "clip_branches",
    "exhaustive_cases",
    "fp_exact_squares",
    "fp_output_rounding",
    "join_step",
    "norm_square_step",
    "probe_cases",
    "shipped_runs",
    "to_float32",
    "torch_assumptions",
]

U = shipped.UNIT_ROUNDOFF[torch.float64]  # 2^-53
U32 = shipped.UNIT_ROUNDOFF[torch.float32]  # 2^-24
ETA32 = shipped.SMALLEST_SUBNORMAL[torch.float32]  # 2^-149
ETA64 = shipped.SMALLEST_SUBNORMAL[torch.float64]  # 2^-1074
LARGEST = {d: Fraction(torch.finfo(d).max) for d in shipped.UNIT_ROUNDOFF}
MAX32 = LARGEST[torch.float32]
MAX64 = LARGEST[torch.float64]
TORCH_EPS = Fraction(struct.unpack("f", struct.pack("f", 1e-6))[0])  # torch adds 1e-6 in float32

# The sqrt stub's contract: |r - sqrt(S_hat)| <= SQRT_ERROR sqrt(S_hat). IEEE's correctly rounded sqrt gives
# u, but torch 2.13's CPU float64 sqrt (MKL/vectorised) is only faithful: measured up to 0.74 ulp from the
# true root, 1.26 u relative, on 10^6 random inputs. One ulp (< 2u relative) is the contract assumed.
SQRT_ERROR = 2 * U

# float64 scaling (clip's Proof, step 1): absolute 2^-1074 terms of the scaled values and squares, relative
# to a scaled sum >= 1/4, are at most a relative n 2^-1070.
SCALING_SLACK_PER_ELEMENT = Fraction(1, 2**1070)


@dataclass(frozen=True)
class OutputRounding:
    """``y = round(p)`` of a float64 ``p``: ``|y - p| <= relative |p| + absolute``, finite when ``|p| <= largest``.

    float16 / bfloat16 round through float32 (torch's cast, and the fused kernels' float32 op-math);
    float64 stores ``p`` itself.
    """

    dtype: torch.dtype
    relative: Fraction
    absolute: Fraction
    largest: Fraction


def _through_float32(dtype: torch.dtype) -> OutputRounding:
    u_d, eta_d = shipped.UNIT_ROUNDOFF[dtype], shipped.SMALLEST_SUBNORMAL[dtype]
    return OutputRounding(dtype, (1 + U32) * (1 + u_d) - 1, eta_d / 2 + (1 + u_d) * ETA32 / 2, LARGEST[dtype])


OUTPUT_ROUNDING = {
    torch.float32: OutputRounding(torch.float32, U32, ETA32 / 2, MAX32),
    torch.float16: _through_float32(torch.float16),
    torch.bfloat16: _through_float32(torch.bfloat16),
    torch.float64: OutputRounding(torch.float64, Fraction(0), Fraction(0), MAX64),
}

Path = Literal["reference", "multi-tensor"]
_SHORT = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


@dataclass(frozen=True)
class Arithmetic:
    """One execution path on a list of gradient dtypes, as the encoding models it.

    Attributes:
        path: ``reference``: ``y = round_d(fl64(g) k)`` (:func:`provetrain.ops.clip.scale_gradient`; the C
            kernel's ``(float)((double)g * k)`` and :func:`provetrain.train.distributed.clip_grad_norm_distributed_`
            are the same arithmetic). ``multi-tensor``: ``y = round(g / D)`` with a float32 ``D >= 1 / k``
            (:mod:`provetrain.ops.multi_tensor`, torch's fused kernels), the sum with extra roundings.
        dtypes: element ``i`` has dtype ``dtypes[i % len(dtypes)]`` (several: a mixed list).
        opmath: multi-tensor only: the value Adam uses inside the kernel (float32 for float16 / bfloat16
            gradients) rather than the one written back to ``.grad``.
    """

    path: Path
    dtypes: tuple[torch.dtype, ...]
    opmath: bool = False

    @property
    def name(self) -> str:
        kinds = "+".join(_SHORT[d] for d in self.dtypes)
        return f"{self.path} {kinds}" + (" (Adam's float32 op-math value)" if self.opmath else "")

    @property
    def extra_roundings(self) -> int:
        """``x`` of ``clip_coefficient``: 0 for the reference sum; the multi-tensor sum's, read from its module."""
        return 0 if self.path == "reference" else shipped_multi_tensor.EXTRA_ROUNDINGS

    def element_dtype(self, i: int) -> torch.dtype:
        return self.dtypes[i % len(self.dtypes)]

    def output(self, i: int) -> OutputRounding:
        dtype = self.element_dtype(i)
        if self.opmath and dtype in (torch.float16, torch.bfloat16):
            return OUTPUT_ROUNDING[torch.float32]
        return OUTPUT_ROUNDING[dtype]

    def present(self, n: int) -> set[torch.dtype]:
        return {self.element_dtype(i) for i in range(n)}

    def rounding_constants(self, n: int) -> tuple[Fraction, Fraction]:
        """``(u_d, eta_d)`` of the dtypes present, from the clip's own definition."""
        return shipped._rounding_constants(self.present(n))

    def sum_roundings(self, n: int) -> int:
        """Roundings per term of the float64 sum: ``n - 1 + x``, one more when float64 squares round."""
        return n - 1 + self.extra_roundings + (1 if torch.float64 in self.present(n) else 0)


_LOW = (torch.float16, torch.bfloat16, torch.float32)
ARITHMETICS: tuple[Arithmetic, ...] = (
    *(Arithmetic("reference", (d,)) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)),
    Arithmetic("reference", (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    *(Arithmetic("multi-tensor", (d,)) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)),
    *(Arithmetic("multi-tensor", (d,), opmath=True) for d in (torch.float16, torch.bfloat16)),
    Arithmetic("multi-tensor", (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
)
"""Every path x dtype the harness proves (``prove_clip_bound``'s default)."""


def _q(value: Fraction | int) -> z3.RatNumRef:
    return z3.RealVal(Fraction(value))


def _abs(x: z3.ArithRef) -> z3.ArithRef:
    return z3.If(x >= 0, x, -x)


def _within(x: z3.ArithRef, bound: Fraction) -> z3.BoolRef:
    return z3.And(x >= -_q(bound), x <= _q(bound))


def _reals(prefix: str, n: int) -> tuple[z3.ArithRef, ...]:
    return tuple(z3.Real(f"{prefix}[{i}]") for i in range(1, n + 1))


# --------------------------------------------------------------------------------------------------
# Bit-precise lemmas (QF_FP, RNE): the inputs and outputs, independent of n.

_QUAD = z3.FPSort(15, 113)  # every value compared below is exact in this format
_SORTS = {torch.float16: z3.FPSort(5, 11), torch.bfloat16: z3.FPSort(8, 8), torch.float32: z3.Float32()}


def _finite(x: z3.FPRef) -> z3.BoolRef:
    return z3.Not(z3.Or(z3.fpIsInf(x), z3.fpIsNaN(x)))


def fp_output_rounding(dtype: torch.dtype, *, rlimit: int) -> StepResult:
    """For every finite float64 ``p`` with ``|p| <= largest``: ``y`` (RNE to float32, then to ``dtype``) is
    finite and ``|y - p| <= relative |p| + absolute`` (:data:`OUTPUT_ROUNDING`).

    Checked in a 113-bit format with a directed-rounding sandwich (``RTP``/``RTN`` differences against an
    ``RTN`` bound), so the check is rigorous without arguing that those operations are exact.
    """
    rounding = OUTPUT_ROUNDING[dtype]
    rne = z3.RNE()
    p = z3.FP("p", z3.Float64())
    y = z3.fpToFP(rne, p, z3.Float32())
    if dtype != torch.float32:
        y = z3.fpToFP(rne, y, _SORTS[dtype])
    big_p, big_y = z3.fpToFP(rne, p, _QUAD), z3.fpToFP(rne, y, _QUAD)
    bound = z3.fpAdd(
        z3.RTN(),
        z3.fpMul(z3.RTN(), z3.fpAbs(big_p), z3.FPVal(float(rounding.relative), _QUAD)),
        z3.FPVal(float(rounding.absolute), _QUAD),
    )
    claim_fails = z3.Or(
        z3.Not(_finite(y)),
        z3.fpGT(z3.fpSub(z3.RTP(), big_y, big_p), bound),
        z3.fpLT(z3.fpSub(z3.RTN(), big_y, big_p), z3.fpNeg(bound)),
    )
    hypotheses = [_finite(p), z3.fpLEQ(z3.fpAbs(big_p), z3.FPVal(float(rounding.largest), _QUAD))]
    via = "" if dtype == torch.float32 else " via float32"
    name = f"{_SHORT[dtype]} output rounding{via}: finite, |y - p| <= rel |p| + abs (bit-precise)"
    return check_unsat(name, [*hypotheses, claim_fails], rlimit=rlimit, logic="QF_FP")[0]


def fp_exact_squares(*, rlimit: int) -> StepResult:
    """For every finite float32 ``g``: ``float64(g) * float64(g)`` is exact and finite.

    Rounding down and rounding up give the same float64 only when the product is representable. float16 and
    bfloat16 values are float32 values, so this covers them too.
    """
    g = z3.FP("g", z3.Float32())
    wide = z3.fpToFP(z3.RNE(), g, z3.Float64())
    down, up = z3.fpMul(z3.RTN(), wide, wide), z3.fpMul(z3.RTP(), wide, wide)
    claim_fails = z3.Or(z3.Not(z3.fpEQ(down, up)), z3.Not(_finite(up)))
    name = "float16/bfloat16/float32 inputs: float64(g)^2 exact and finite (bit-precise)"
    return check_unsat(name, [_finite(g), claim_fails], rlimit=rlimit, logic="QF_FP")[0]


# --------------------------------------------------------------------------------------------------
# The float64 accumulation, by induction over the summation tree.


def accumulation_step(left: int, right: int, *, rounded_leaves: bool = False, rlimit: int) -> StepResult:
    """Joining two subtrees with ``left`` and ``right`` leaves keeps the accumulation bound.

    With exact leaves (float16 / bfloat16 / float32 squares) a subtree of ``m`` leaves lies within
    ``(1 +- u)^(m - 1)`` of its exact sum; with rounded leaves (float64 squares) within ``(1 +- u)^m``. If
    ``a`` and ``b`` do, ``fl(a + b) = (a + b)(1 + d)`` does for ``m = left + right``: with the leaves this
    bounds every summation tree, hence any order torch, BLAS blocking or threads use.
    """
    a, b, big_a, big_b, d = z3.Reals("a b A B d")
    shift = 0 if rounded_leaves else 1
    m = left + right
    hypotheses = [
        big_a >= 0,
        big_b >= 0,
        a >= _q((1 - U) ** (left - shift)) * big_a,
        a <= _q((1 + U) ** (left - shift)) * big_a,
        b >= _q((1 - U) ** (right - shift)) * big_b,
        b <= _q((1 + U) ** (right - shift)) * big_b,
        _within(d, U),
    ]
    total = (a + b) * (1 + d)
    low, high = _q((1 - U) ** (m - shift)), _q((1 + U) ** (m - shift))
    claim = z3.And(total >= low * (big_a + big_b), total <= high * (big_a + big_b))
    name = f"accumulation: subtrees of {left} and {right} leaves join within (1±u)^{m - shift}"
    return check_unsat(name, [*hypotheses, z3.Not(claim)], rlimit=rlimit)[0]


def norm_square_step(*, rlimit: int) -> StepResult:
    """The multi-tensor sum's per-tensor step: ``fl(r^2)`` with ``r`` a faithful sqrt of ``s`` adds five roundings.

    If ``L S <= s <= H S`` (``L <= 1 <= H``), ``r >= 0`` is within ``(1 +- u)^2`` of ``sqrt(s)`` (a faithful
    sqrt) and ``t = r^2 (1 + d)``, then ``L (1 - u)^5 S <= t <= H (1 + u)^5 S``.
    """
    s, big_s, r, t, d, low, high = z3.Reals("s S r t d L H")
    hypotheses = [
        big_s >= 0,
        low > 0,
        low <= 1,
        high >= 1,
        s >= low * big_s,
        s <= high * big_s,
        r >= 0,
        r * r >= _q((1 - U) ** 4) * s,
        r * r <= _q((1 + U) ** 4) * s,
        _within(d, U),
        t == r * r * (1 + d),
    ]
    claim = z3.And(t >= low * _q((1 - U) ** 5) * big_s, t <= high * _q((1 + U) ** 5) * big_s)
    name = "multi-tensor: fl(fl(sqrt(s))^2) within (1±u)^5 more than s"
    return check_unsat(name, [*hypotheses, z3.Not(claim)], rlimit=rlimit)[0]


def join_step(*, rlimit: int) -> StepResult:
    """Any join of two partial sums within ``[L_a, H_a]`` and ``[L_b, H_b]`` of their exact sums is within
    ``[min(L) (1 - u), max(H) (1 + u)]``: each join adds one rounding to the worse of its two inputs."""
    a, b, big_a, big_b, d, la, ha, lb, hb, low, high = z3.Reals("a b A B d La Ha Lb Hb L H")
    hypotheses = [
        big_a >= 0,
        big_b >= 0,
        la > 0,
        lb > 0,
        low > 0,
        low <= la,
        low <= lb,
        high >= ha,
        high >= hb,
        a >= la * big_a,
        a <= ha * big_a,
        b >= lb * big_b,
        b <= hb * big_b,
        _within(d, U),
    ]
    total = (a + b) * (1 + d)
    claim = z3.And(total >= low * _q(1 - U) * (big_a + big_b), total <= high * _q(1 + U) * (big_a + big_b))
    name = "multi-tensor: a join adds one rounding to the worse of its inputs"
    return check_unsat(name, [*hypotheses, z3.Not(claim)], rlimit=rlimit)[0]


# --------------------------------------------------------------------------------------------------
# provetrain's clip: variables, assumptions, and the derivation per branch.


@dataclass(frozen=True)
class ClipVars:
    """The encoding's variables for length ``n``: algorithm values, rounding errors, proof abbreviations."""

    n: int
    g: tuple[z3.ArithRef, ...]  # the gradient values, as reals
    c: z3.ArithRef  # max_norm, a float64, as a real
    s: z3.ArithRef  # exact sum of squares
    s_hat: z3.ArithRef  # float64 accumulated sum (times 4^e when scaled: the scaling is exact)
    r: z3.ArithRef  # float64 sqrt(s_hat): the stub
    d0: z3.ArithRef
    n_up: z3.ArithRef
    a_lo: z3.ArithRef  # the numerator, rounded down to float64
    d1: z3.ArithRef
    x: z3.ArithRef  # a_lo / n_up as computed, before the subnormal step toward 0
    k: z3.ArithRef
    w: z3.ArithRef  # the factor applied: k (reference) or 1 / D <= k (multi-tensor)
    d: tuple[z3.ArithRef, ...]
    e: tuple[z3.ArithRef, ...]
    p: tuple[z3.ArithRef, ...]  # float64 products g_i w (exact quotients on the CPU kernels)
    y: tuple[z3.ArithRef, ...]  # stored outputs, as reals
    finite: tuple[z3.BoolRef, ...]  # y_i is finite
    # Abbreviations for the proof (definitional: they add no constraint on the variables above).
    norm: z3.ArithRef  # ||g||
    root_n: z3.ArithRef  # sqrt(n)
    b: tuple[z3.ArithRef, ...]  # |g_i|
    l1: z3.ArithRef  # sum |g_i|
    kk: z3.ArithRef  # A_REL k
    v: tuple[z3.ArithRef, ...]  # A_REL k |g_i| + H_ABS, the bound on |y_i|
    t: z3.ArithRef  # A_REL k ||g|| + sqrt(n) H_ABS, the bound on ||y||

    @classmethod
    def create(cls, n: int) -> ClipVars:
        names = "c s s_hat r d0 n_up a_lo d1 x k w norm root_n l1 kk t"
        scalars = dict(zip(names.split(), z3.Reals(names), strict=True))
        vectors = {name: _reals(name, n) for name in ("g", "d", "e", "p", "y", "b", "v")}
        finite = tuple(z3.Bool(f"finite(y[{i}])") for i in range(1, n + 1))
        return cls(n=n, finite=finite, **scalars, **vectors)

    def goal(self) -> z3.BoolRef:
        """The contract's postconditions: ``||y||^2 <= c^2`` exactly, and every ``y_i`` finite."""
        return z3.And(z3.Sum([y * y for y in self.y]) <= self.c * self.c, *self.finite)


def element_constants(arithmetic: Arithmetic, n: int) -> tuple[Fraction, Fraction]:
    """``(A_REL, H_ABS)``: ``|y_i| <= A_REL w |g_i| + H_ABS`` for every element (the largest over them)."""
    outputs = [arithmetic.output(i) for i in range(n)]
    a_rel = max((1 + U) * (1 + o.relative) for o in outputs)
    h_abs = max(o.absolute + (1 + o.relative) * ETA64 / 2 for o in outputs)
    return a_rel, h_abs


class _Facts:
    """The assumptions of the encoding, each one z3 term so derivation steps can cite it."""

    def __init__(self, v: ClipVars, arithmetic: Arithmetic) -> None:
        n = v.n
        a_rel, h_abs = element_constants(arithmetic, n)
        self.g = [_within(g, LARGEST[arithmetic.element_dtype(i)]) for i, g in enumerate(v.g)]
        self.s = v.s == z3.Sum([g * g for g in v.g])
        # Accumulation (accumulation_step / norm_square_step and join_step, by induction over the tree).
        m = arithmetic.sum_roundings(n)
        low, high = (1 - U) ** m, (1 + U) ** m
        if torch.float64 in arithmetic.present(n):
            low, high = low * (1 - n * SCALING_SLACK_PER_ELEMENT), high * (1 + n * SCALING_SLACK_PER_ELEMENT)
        self.s_hat = z3.And(v.s_hat >= _q(low) * v.s, v.s_hat <= _q(high) * v.s)
        # The stub for sqrt: only its error contract |r - sqrt(s_hat)| <= SQRT_ERROR sqrt(s_hat), without sqrt.
        low_r, high_r = _q((1 - SQRT_ERROR) ** 2), _q((1 + SQRT_ERROR) ** 2)
        self.r = z3.And(v.r >= 0, v.r * v.r >= low_r * v.s_hat, v.r * v.r <= high_r * v.s_hat)
        factor = Fraction(shipped.upper_factor(n, arithmetic.extra_roundings))  # the shipped C
        self.n_up = z3.And(_within(v.d0, U), v.n_up == v.r * _q(factor) * (1 + v.d0))
        self.c = z3.And(v.c > 0, v.c <= _q(MAX64))
        self.keep = v.n_up <= v.c
        self.clip = v.n_up > v.c
        scale, offset = shipped.margin_terms(n, *arithmetic.rounding_constants(n))  # the shipped margin
        self.a_lo = v.a_lo <= v.c * _q(scale) - _q(offset)
        self.a_pos = v.a_lo > 0
        self.a_nonpos = v.a_lo <= 0
        # k = fl(a_lo / n_up), then one subnormal step toward 0 when below 2^-1022: 0 <= k <= x.
        self.k = z3.And(_within(v.d1, U), v.x * v.n_up == v.a_lo * (1 + v.d1), v.k >= 0, v.k <= v.x)
        # Reference: g * k. Multi-tensor: g / D with D >= 1 / k rounded up, so the factor 1 / D is in [0, k].
        self.w = v.w == v.k if arithmetic.path == "reference" else z3.And(v.w >= 0, v.w <= v.k)
        self.p = [
            z3.And(_within(d, U), _within(e, ETA64 / 2), p == g * v.w * (1 + d) + e)
            for g, d, e, p in zip(v.g, v.d, v.e, v.p, strict=True)
        ]
        self.y = [self._output(arithmetic.output(i), v.p[i], v.y[i], v.finite[i]) for i in range(n)]
        self.unchanged = [z3.And(p == g, y == g, fin) for g, p, y, fin in zip(v.g, v.p, v.y, v.finite, strict=True)]
        self.zeroed = [z3.And(p == 0, y == 0, fin) for p, y, fin in zip(v.p, v.y, v.finite, strict=True)]
        # Definitions of the abbreviations.
        self.norm = z3.And(v.norm >= 0, v.norm * v.norm == v.s)
        self.root_n = z3.And(v.root_n >= 0, v.root_n * v.root_n == n)
        self.b = [z3.And(b >= 0, b * b == g * g) for b, g in zip(v.b, v.g, strict=True)]
        self.l1 = v.l1 == z3.Sum(list(v.b))
        self.kk = v.kk == _q(a_rel) * v.k
        self.v = [vi == v.kk * b + _q(h_abs) for vi, b in zip(v.v, v.b, strict=True)]
        self.t = v.t == v.kk * v.norm + v.root_n * _q(h_abs)

    @staticmethod
    def _output(rounding: OutputRounding, p: z3.ArithRef, y: z3.ArithRef, fin: z3.BoolRef) -> z3.BoolRef:
        """The stored value: :func:`fp_output_rounding` (float64: ``y = p``), valid where ``|p| <= largest``."""
        in_range = _abs(p) <= _q(rounding.largest)
        if rounding.dtype == torch.float64:
            return z3.Implies(in_range, z3.And(fin, y == p))
        error = _abs(y - p) <= _q(rounding.relative) * _abs(p) + _q(rounding.absolute)
        return z3.Implies(in_range, z3.And(fin, error))

    def base(self) -> list[z3.BoolRef]:
        return [*self.g, self.s, self.s_hat, self.r, self.n_up, self.c]


@dataclass(frozen=True)
class ClipBranch:
    """One case of the algorithm: when it applies, what the encoding assumes there, and the proof.

    Attributes:
        name: the case, in words; ``kind`` is ``keep``, ``zero`` or ``clip``.
        guard: the condition that selects this case.
        assumptions: the algorithm's steps in the rounding model (the guard included).
        definitions: the proof's abbreviations (``||g||``, ``sqrt(n)``, ``|g_i|``, ...): definitional, so they
            constrain nothing else.
        derive: adds the steps from the assumptions to the goal to a :class:`Derivation`.
    """

    name: str
    kind: str
    guard: z3.BoolRef
    assumptions: tuple[z3.BoolRef, ...]
    definitions: tuple[z3.BoolRef, ...]
    derive: Callable[[Derivation], None]


def exhaustive_cases(branches: Sequence[ClipBranch], *, rlimit: int) -> StepResult:
    """The guards cover every run (``N_up <= c``; else ``A_lo <= 0`` or ``A_lo > 0``)."""
    name = "the cases k = 1, k = 0, clip cover every run"
    return check_unsat(name, [z3.Not(z3.Or(*[b.guard for b in branches]))], rlimit=rlimit)[0]


def clip_branches(v: ClipVars, arithmetic: Arithmetic = ARITHMETICS[0]) -> list[ClipBranch]:
    """The derivations of ``v.goal()`` for ``k = 1`` (no clipping), ``k = 0``, and clipping, on ``arithmetic``."""
    f = _Facts(v, arithmetic)
    a_rel, h_abs = element_constants(arithmetic, v.n)
    norm_below_n_up = v.norm <= v.n_up
    goal = v.goal()

    def norm_bound(dv: Derivation) -> None:
        dv.derive(
            "||g|| <= N_up (accumulation, sqrt stub, upper factor)", [f.s_hat, f.r, f.n_up, f.norm], norm_below_n_up
        )

    def keep(dv: Derivation) -> None:
        norm_bound(dv)
        dv.derive("||g|| <= c", [norm_below_n_up, f.keep], v.norm <= v.c)
        dv.derive("||g||^2 <= c^2", [v.norm <= v.c, f.norm], v.s <= v.c * v.c)
        dv.derive("y = g: ||y||^2 <= c^2, y finite", [v.s <= v.c * v.c, f.s, *f.unchanged], goal)

    def zero(dv: Derivation) -> None:
        dv.derive("y = 0: ||y||^2 = 0 <= c^2", [f.c, *f.zeroed], goal)

    def clip(dv: Derivation) -> None:
        norm_bound(dv)
        n_up_pos = v.n_up > 0
        dv.derive("N_up > 0", [f.c, f.clip], n_up_pos)
        k_n_up = v.k * v.n_up <= v.a_lo * _q(1 + U)
        dv.derive("k N_up <= A_lo (1+u)", [f.k, n_up_pos], k_n_up)
        k_small = v.k * _q(1 + U) <= _q(1 - U)
        dv.derive("k (1+u) <= 1 - u", [k_n_up, n_up_pos, f.clip, f.a_lo, f.c], k_small)
        kk_pos = z3.And(v.k >= 0, v.kk >= 0, v.w >= 0, v.w <= v.k)
        dv.derive("0 <= w <= k, A_REL k >= 0", [f.k, f.kk, f.w], kk_pos)
        kk_norm = v.kk * v.norm <= _q(a_rel * (1 + U)) * v.a_lo
        dv.derive("A_REL k ||g|| <= A_REL (1+u) A_lo", [k_n_up, norm_below_n_up, f.kk, f.norm, kk_pos], kk_norm)
        scale = z3.And(v.t >= 0, v.t <= v.c)
        dv.derive(
            "0 <= T = A_REL k ||g|| + sqrt(n) H_ABS <= c", [kk_norm, f.t, f.a_lo, f.root_n, f.c, f.norm, kk_pos], scale
        )
        elements = []
        for i in range(v.n):
            largest = arithmetic.output(i).largest
            in_range = _abs(v.p[i]) <= _q(largest)
            dv.derive(f"|p[{i + 1}]| <= largest (no overflow)", [f.g[i], kk_pos, k_small, f.p[i]], in_range)
            element = z3.And(v.y[i] * v.y[i] <= v.v[i] * v.v[i], v.finite[i])
            hypotheses = [in_range, f.y[i], f.p[i], kk_pos, f.kk, f.b[i], f.v[i]]
            dv.derive(f"y[{i + 1}]^2 <= V[{i + 1}]^2 = (A_REL k |g[{i + 1}]| + H_ABS)^2", hypotheses, element)
            elements.append(element)
        _minkowski(dv, v, f, h_abs, (kk_pos, scale, elements), goal)

    base = f.base()
    clipping = [f.clip, f.a_lo, f.a_pos, f.k, f.w, *f.p, *f.y]
    return [
        ClipBranch("k = 1 (N_up <= c)", "keep", f.keep, (*base, f.keep, *f.unchanged), (f.norm,), keep),
        ClipBranch(
            "k = 0 (numerator <= 0)",
            "zero",
            z3.And(f.clip, f.a_nonpos),
            (*base, f.clip, f.a_lo, f.a_nonpos, *f.zeroed),
            (),
            zero,
        ),
        ClipBranch(
            "clip (0 < k < 1)",
            "clip",
            z3.And(f.clip, f.a_pos),
            (*base, *clipping),
            (f.norm, f.root_n, *f.b, f.l1, f.kk, *f.v, f.t),
            clip,
        ),
    ]


def _minkowski(
    dv: Derivation,
    v: ClipVars,
    f: _Facts,
    h_abs: Fraction,
    facts: tuple[z3.BoolRef, z3.BoolRef, list[z3.BoolRef]],
    goal: z3.BoolRef,
) -> None:
    """From ``0 <= w <= k``, ``0 <= T <= c`` and ``y_i^2 <= V_i^2`` to the goal: Cauchy-Schwarz, then Minkowski."""
    kk_pos, scale, elements = facts
    h = _q(h_abs)
    sum_b2 = z3.Sum([b * b for b in v.b]) == v.norm * v.norm
    dv.derive("sum |g_i|^2 = ||g||^2", [*f.b, f.s, f.norm], sum_b2, linear=True)
    pairs = [2 * v.b[i] * v.b[j] <= v.b[i] * v.b[i] + v.b[j] * v.b[j] for j in range(v.n) for i in range(j)]
    for pair in pairs:
        dv.derive("2 |g_i| |g_j| <= g_i^2 + g_j^2", [], pair)
    total_b = z3.Sum(list(v.b))
    cauchy_schwarz = total_b * total_b <= v.n * v.norm * v.norm
    dv.derive("(sum |g_i|)^2 <= n ||g||^2 (Cauchy-Schwarz)", [*pairs, sum_b2], cauchy_schwarz, linear=True)
    l1_square = v.l1 * v.l1 == total_b * total_b
    dv.derive("L^2 = (sum |g_i|)^2", [f.l1], l1_square)
    nonnegative = z3.And(v.l1 >= 0, v.norm >= 0, v.root_n >= 0)
    dv.derive("L, ||g||, sqrt(n) >= 0", [f.l1, *f.b, f.norm, f.root_n], nonnegative, linear=True)
    l1_bound = v.l1 <= v.root_n * v.norm
    dv.derive("L <= sqrt(n) ||g||", [l1_square, cauchy_schwarz, nonnegative, f.root_n], l1_bound)
    l1 = total_b <= v.root_n * v.norm
    dv.derive("sum |g_i| <= sqrt(n) ||g||", [f.l1, l1_bound], l1, linear=True)
    squares = [x * x == v.kk * v.kk * b * b + 2 * h * v.kk * b + h * h for x, b in zip(v.v, v.b, strict=True)]
    for i, (square, definition) in enumerate(zip(squares, f.v, strict=True)):
        dv.derive(f"V[{i + 1}]^2 expanded", [definition], square)
    t_square = v.t * v.t == v.kk * v.kk * v.norm * v.norm + 2 * h * v.kk * v.root_n * v.norm + v.n * h * h
    dv.derive("T^2 expanded", [f.t, f.root_n], t_square)
    scaled_b2 = v.kk * v.kk * z3.Sum([b * b for b in v.b]) == v.kk * v.kk * v.norm * v.norm
    dv.derive("(A_REL k)^2 sum |g_i|^2 = (A_REL k)^2 ||g||^2", [sum_b2], scaled_b2)
    scaled_l1 = v.kk * z3.Sum(list(v.b)) <= v.kk * v.root_n * v.norm
    dv.derive("A_REL k sum |g_i| <= A_REL k sqrt(n) ||g||", [l1, kk_pos], scaled_l1)
    expansion = z3.Sum([x * x for x in v.v]) <= v.t * v.t
    dv.derive("sum V_i^2 <= T^2 (Minkowski)", [*squares, t_square, scaled_b2, scaled_l1], expansion, linear=True)
    square = v.t * v.t <= v.c * v.c
    dv.derive("T^2 <= c^2", [scale], square)
    dv.derive("||y||^2 <= c^2 and y finite", [*elements, expansion, square], goal, linear=True)


# --------------------------------------------------------------------------------------------------
# torch.nn.utils.clip_grad_norm_, float32 throughout, in the same rounding model (one direct query).


@dataclass(frozen=True)
class TorchVars:
    """torch's clip for length ``n``: ``y = g * min(c / (||g|| + 1e-6), 1)``, every operation in float32."""

    n: int
    g: tuple[z3.ArithRef, ...]
    c: z3.ArithRef
    sq: tuple[z3.ArithRef, ...]  # fl32(g_i^2)
    ds: tuple[z3.ArithRef, ...]
    acc: tuple[z3.ArithRef, ...]  # float32 partial sums, left to right
    da: tuple[z3.ArithRef, ...]
    r: z3.ArithRef  # float32 sqrt: the stub
    den: z3.ArithRef  # fl32(r + 1e-6)
    d2: z3.ArithRef
    coef: z3.ArithRef  # fl32(c / den)
    d3: z3.ArithRef
    y: tuple[z3.ArithRef, ...]
    dy: tuple[z3.ArithRef, ...]

    @classmethod
    def create(cls, n: int) -> TorchVars:
        scalars = dict(zip(("c", "r", "den", "d2", "coef", "d3"), z3.Reals("c r den d2 coef d3"), strict=True))
        vectors = {name: _reals(name, n) for name in ("g", "sq", "ds", "acc", "da", "y", "dy")}
        return cls(n=n, **scalars, **vectors)

    def goal(self) -> z3.BoolRef:
        return z3.Sum([y * y for y in self.y]) <= self.c * self.c


TORCH_BOX = (Fraction(2**6), Fraction(2**30))
TORCH_CLIP = Fraction(1, 2**8)


def torch_assumptions(v: TorchVars) -> list[z3.BoolRef]:
    """The standard model of torch's float32 clip, the sum left to right, searched in a box.

    The box (``c`` and every ``|g_i|`` in ``[2^6, 2^30]``) keeps every float32 operation in the
    normal range, where the relative model ``(x op y)(1 + d)`` is the whole truth (outside it, absolute
    subnormal terms would let ``fl32(0 * coef)`` be nonzero, a spurious violation), and makes the ``1e-6``
    smaller than half an ulp of the norm; and the coefficient is kept below ``1 - 2^-8``, a real clip whose
    rounding errors are not pinned by exact values (``fl32(65 (1 - 2^-31)) = 65`` exactly, whatever the
    model's ``d`` says). Both only make the model's violations likelier to survive real rounding.
    """
    low, high = _q(TORCH_BOX[0]), _q(TORCH_BOX[1])
    facts = [z3.And(_abs(g) >= low, _abs(g) <= high) for g in v.g]
    facts += [v.c >= low, v.c <= high]
    for g, sq, ds in zip(v.g, v.sq, v.ds, strict=True):
        facts += [_within(ds, U32), sq == g * g * (1 + ds)]
    facts += [v.acc[0] == v.sq[0]]
    for i in range(1, v.n):
        facts += [_within(v.da[i], U32), v.acc[i] == (v.acc[i - 1] + v.sq[i]) * (1 + v.da[i])]
    total = v.acc[-1]
    facts += [v.r >= 0, v.r * v.r >= _q((1 - U32) ** 2) * total, v.r * v.r <= _q((1 + U32) ** 2) * total]
    facts += [_within(v.d2, U32), v.den == (v.r + _q(TORCH_EPS)) * (1 + v.d2)]
    facts += [_within(v.d3, U32), v.coef * v.den == v.c * (1 + v.d3), v.coef <= _q(1 - TORCH_CLIP)]
    for g, y, dy in zip(v.g, v.y, v.dy, strict=True):
        facts += [_within(dy, U32), y == g * v.coef * (1 + dy)]
    return facts


# --------------------------------------------------------------------------------------------------
# Binding: runs of the shipped code, in the encoding's variables, must satisfy their case's assumptions.


def to_float32(x: float) -> float:
    """``x`` rounded to float32, to nearest even (the C cast ``struct`` uses), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


_EXPONENTS = {
    torch.float16: (-24, -16, -3, 0, 6, 15),
    torch.bfloat16: (-133, -120, -20, 0, 40, 127),
    torch.float32: (-149, -130, -20, 0, 40, 127),
    torch.float64: (-1000, -300, 0, 300, 900),
}


def probe_cases(arithmetic: Arithmetic, n: int, count: int = 12) -> list[tuple[list[float], float]]:
    """``count`` deterministic ``(g, max_norm)`` inputs of length ``n`` for :func:`binding_failures`.

    Magnitudes across each dtype's range (subnormals and the largest values included) and clip values that
    keep, barely keep, barely clip, clip hard, zero, and (with float64) give a subnormal ``k``.
    """
    rng = random.Random(f"{arithmetic.name}/{n}")
    cases = []
    for index in range(count):
        g = []
        for i in range(n):
            dtype = arithmetic.element_dtype(i)
            value = rng.uniform(-1, 1) * 2.0 ** rng.choice(_EXPONENTS[dtype])
            largest = float(LARGEST[dtype])
            g.append(torch.tensor(max(-largest, min(largest, value)), dtype=dtype).item())
        norm = math.sqrt(math.fsum(x * x for x in g)) if max(map(abs, g)) < 1e150 else max(map(abs, g))
        ratios = (2.0, 1 + 2**-40, 1.0, 1 - 2**-40, 0.7, 1e-3, 2.0**-60)
        _, eta_d = arithmetic.rounding_constants(n)
        subnormal_k = norm * 2.0 ** rng.uniform(-1070, -1060) if norm > 2.0**-40 else 1.0
        absolute = (float(eta_d) * rng.choice((0.5, 2, 3, 40)), subnormal_k, subnormal_k * 1.5)
        choice = index % (len(ratios) + len(absolute))
        max_norm = norm * ratios[choice] if choice < len(ratios) else absolute[choice - len(ratios)]
        cases.append((g, max_norm if 0 < max_norm < math.inf else 1.0))
    return cases


def _fraction_values(g: Sequence[float], **scalars: Fraction | float) -> dict[str, Fraction | bool]:
    values: dict[str, Fraction | bool] = {name: Fraction(value) for name, value in scalars.items()}
    values.update({f"g[{i}]": Fraction(x) for i, x in enumerate(g, start=1)})
    return values


def shipped_runs(arithmetic: Arithmetic, g: Sequence[float], max_norm: float) -> list[tuple[str, dict]]:
    """The shipped code on ``(g, max_norm)``: the case taken and the encoding's variables, per code path.

    One run through the device functions (:func:`~provetrain.ops.clip.clip_coefficient`, and for the
    multi-tensor path :func:`~provetrain.ops.multi_tensor.clip_divisor` and torch's fused kernel), one through
    the host functions (``*_on_host``). ``g`` must hold values of the elements' dtypes. The values the code
    computes are read from it (``k``, ``A_lo``, ``D``, the stored ``y``, the norm); the encoding's rounding
    errors are solved from them.
    """
    n = len(g)
    dtypes = [arithmetic.element_dtype(i) for i in range(n)]
    grads = [torch.tensor([x], dtype=d) for x, d in zip(g, dtypes, strict=True)]
    extra = arithmetic.extra_roundings
    if arithmetic.path == "reference":
        s, e = shipped.scaled_sum_of_squares(grads)
    else:
        s, e = shipped_multi_tensor.scaled_sum_of_squares_multi_tensor(grads)
    exponent = int(e)
    metadata = {"numel": n, "dtypes": set(dtypes), "exponent": exponent, "extra_roundings": extra}
    norm_device, k_device = shipped.clip_coefficient(s, max_norm, **metadata)
    norm_host, k_host = shipped.clip_coefficient_on_host(s.item(), max_norm, **metadata)
    runs = []
    for norm, k, on_host in ((norm_device.item(), k_device.item(), False), (norm_host, k_host, True)):
        if arithmetic.path == "reference":
            y = [shipped.scale_gradient(grad, torch.tensor(k, dtype=torch.float64)).item() for grad in grads]
            w = Fraction(k)
            products = [Fraction(x * k) for x in g]  # fl64(g k), as scale_gradient computes it
        else:
            w, y = _through_fused_kernel(grads, s, exponent, max_norm, on_host=on_host)
            # The CPU kernel rounds g / D once, in float64 for float64 (p is then y) and in float32 otherwise.
            products = [
                Fraction(yi) if d == torch.float64 else Fraction(x) * w for x, yi, d in zip(g, y, dtypes, strict=True)
            ]
        runs.append(_trace(arithmetic, g, max_norm, s.item(), exponent, norm, k, w, products, y))
    return runs


def _through_fused_kernel(
    grads: list[torch.Tensor], s: torch.Tensor, exponent: int, max_norm: float, *, on_host: bool
) -> tuple[Fraction, list[float]]:
    """``(1 / D, y)``: the shipped divisor and what torch's fused Adam kernel writes back to ``.grad``."""
    metadata = {"numel": len(grads), "dtypes": [g.dtype for g in grads]}
    if on_host:
        _, value = shipped_multi_tensor.clip_divisor_on_host(s.item(), exponent, max_norm, **metadata)
        divisor = torch.tensor(value, dtype=torch.float32)
    else:
        divisor = shipped_multi_tensor.clip_divisor(s, torch.tensor(exponent), max_norm, **metadata)[1]
    grads = [g.clone() for g in grads]
    for g in grads:
        shipped_multi_tensor.adam_update_multi_tensor_(
            [torch.zeros_like(g)],
            [g],
            [torch.zeros_like(g)],
            [torch.zeros_like(g)],
            [torch.zeros((), dtype=torch.float32)],
            divisor=divisor,
            found_inf=torch.zeros((), dtype=torch.float32),
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled_weight_decay=False,
            maximize=False,
        )
    divisor_value = divisor.item()
    w = 1 / Fraction(divisor_value) if math.isfinite(divisor_value) else Fraction(0)  # g / inf = 0
    return w, [g.item() for g in grads]


def _trace(
    arithmetic: Arithmetic,
    g: Sequence[float],
    max_norm: float,
    s: float,
    exponent: int,
    norm: float,
    k: float,
    w: Fraction,
    products: list[Fraction],
    y: list[float],
) -> tuple[str, dict[str, Fraction | bool]]:
    n = len(g)
    scale = Fraction(2) ** exponent
    r_scaled = norm / 2.0**exponent if exponent else norm  # exact: the probes keep the norm normal
    n_up_scaled = r_scaled * shipped.upper_factor(n, arithmetic.extra_roundings)
    values = _fraction_values(g, c=max_norm, s_hat=Fraction(s) * scale * scale, r=Fraction(r_scaled) * scale)
    values["s"] = sum((Fraction(x) ** 2 for x in g), Fraction(0))
    values["n_up"] = Fraction(n_up_scaled) * scale
    exact_up = Fraction(r_scaled) * Fraction(shipped.upper_factor(n, arithmetic.extra_roundings))
    values["d0"] = Fraction(n_up_scaled) / exact_up - 1 if r_scaled else Fraction(0)
    values["k"], values["w"] = Fraction(k), w
    for i, value in enumerate(y, start=1):
        values[f"y[{i}]"], values[f"finite(y[{i}])"] = (
            Fraction(value) if math.isfinite(value) else 0,
            math.isfinite(value),
        )
    if k == 1.0:
        values.update({f"p[{i}]": Fraction(x) for i, x in enumerate(g, start=1)})
        return "keep", values
    u_d, eta_d = arithmetic.rounding_constants(n)
    a_lo = shipped._margin_numerator(max_norm, n, u_d, eta_d)  # the shipped numerator
    values["a_lo"] = Fraction(a_lo)
    if a_lo <= 0:  # k = 0 with a positive A_lo is the clip case whose quotient underflowed
        values.update({f"p[{i}]": Fraction(0) for i in range(1, n + 1)})
        return "zero", values
    quotient = Fraction(a_lo) / values["n_up"]
    x = max(Fraction(k), quotient * (1 - U))  # the encoding's x: k <= x, |x n_up / a_lo - 1| <= u iff k fits
    values.update({"x": x, "d1": x / quotient - 1})
    for i, (gi, product) in enumerate(zip(g, products, strict=True), start=1):
        exact = Fraction(gi) * w
        relative = abs(exact) >= Fraction(2) ** -1022 or product == exact
        values[f"p[{i}]"] = product
        values[f"d[{i}]"] = product / exact - 1 if relative and exact else Fraction(0)
        values[f"e[{i}]"] = Fraction(0) if relative else product - exact
    return "clip", values


def _holds(formula: z3.BoolRef, values: dict[str, Fraction | bool]) -> bool:
    pairs = [
        (z3.Bool(name), z3.BoolVal(value)) if isinstance(value, bool) else (z3.Real(name), z3.RealVal(value))
        for name, value in values.items()
    ]
    return z3.is_true(z3.simplify(z3.substitute(formula, *pairs)))


def binding_failures(arithmetic: Arithmetic, n: int, *, count: int = 12) -> list[str]:
    """Every way the shipped code breaks the encoding's assumptions on :func:`probe_cases` (empty: none).

    A run that takes a case must satisfy that case's guard and every assumption of it; its rounding errors
    are solved from the values the code computed, so an assumption fails exactly when the code does something
    the encoding does not allow (rounds the numerator up, skips the subnormal step, rounds ``D`` down, ...).
    """
    if arithmetic.opmath:
        return []  # the kernel's op-math value is internal to it; its inputs are bound by the stored run
    branches = {b.kind: b for b in clip_branches(ClipVars.create(n), arithmetic)}
    failures = []
    for g, max_norm in probe_cases(arithmetic, n, count):
        for path, (kind, values) in zip(("device", "host"), shipped_runs(arithmetic, g, max_norm), strict=True):
            branch = branches[kind]
            broken = [str(fact) for fact in (branch.guard, *branch.assumptions) if not _holds(fact, values)]
            if broken:
                failures.append(f"{path} run g={g}, max_norm={max_norm!r} ({kind}): {broken[0]}")
    return failures
