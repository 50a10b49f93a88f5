"""The z3 encodings behind :mod:`provetrain.verify.prove`: provetrain's clip, torch's clip, and their lemmas.

Everything here mirrors one of two algorithms step by step, for float32 gradients ``g_1..g_n`` and a clip
value ``c``; :func:`reference_clip` is the same steps in plain Python floats, tested bit-for-bit against
:mod:`provetrain.ops.clip`, and :func:`trace_values` evaluates a concrete run in the encoding's variables
so the tests can check that real runs satisfy every assumption of the encoding.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import z3

from provetrain.ops.clip import SMALLEST_SUBNORMAL, UNIT_ROUNDOFF
from provetrain.verify.smt_derivation import Derivation, StepResult, check_unsat

__all__ = [
    "SQRT_ERROR",
    "ClipBranch",
    "ClipVars",
    "TorchVars",
    "accumulation_step",
    "clip_branches",
    "exhaustive_cases",
    "fp_exact_squares",
    "fp_output_rounding",
    "margin_numerator",
    "reference_clip",
    "sum_of_squares",
    "to_float32",
    "torch_assumptions",
    "torch_sqrt",
    "trace_values",
    "upper_factor",
]

# Rounding constants, read from the shipped clip so the encoding cannot drift from it.
U = UNIT_ROUNDOFF[torch.float64]  # 2^-53
U32 = UNIT_ROUNDOFF[torch.float32]  # 2^-24
ETA32 = SMALLEST_SUBNORMAL[torch.float32]  # 2^-149
ETA64 = SMALLEST_SUBNORMAL[torch.float64]  # 2^-1074
MAX32 = Fraction((2**24 - 1) * 2**104)
FIN32 = Fraction(2**128 - 2**103)  # float32 RNE of |x| < FIN32 is finite; FIN32 itself rounds to inf
MAX64 = Fraction((2**53 - 1) * 2**971)
TORCH_EPS = Fraction(struct.unpack("f", struct.pack("f", 1e-6))[0])  # torch adds 1e-6 in float32

# The sqrt stub's contract: |r - sqrt(S_hat)| <= SQRT_ERROR sqrt(S_hat). IEEE's correctly rounded sqrt gives
# u, but torch 2.13's CPU float64 sqrt (MKL/vectorised) is only faithful: measured up to 0.74 ulp from the
# true root, 1.26 u relative, on 10^6 random inputs. One ulp (< 2u relative) is the contract assumed.
SQRT_ERROR = 2 * U

# |y_i| <= A_REL k |g_i| + H_ABS for y_i = fl32(fl64(g_i k)): float64 product then float32 cast.
A_REL = (1 + U) * (1 + U32)
H_ABS = ETA32 / 2 + (1 + U32) * ETA64 / 2


def upper_factor(n: int) -> Fraction:
    """``C = 1 + ceil((n + 4) / 2) 2^-52 >= 1 + (n + 4) u``, exact in float64 (clip_coefficient's factor)."""
    return 1 + Fraction((n + 5) // 2, 2**52)


def margin_numerator(c: Fraction, n: int) -> Fraction:
    """``A = c (1 - 4 u32) - eta32 (isqrt(n) + 1)``, exactly; the shipped code rounds it down to float64."""
    return c * (1 - 4 * U32) - ETA32 * (math.isqrt(n) + 1)


def _q(value: Fraction | int) -> z3.RatNumRef:
    return z3.RealVal(Fraction(value))


def _abs(x: z3.ArithRef) -> z3.ArithRef:
    return z3.If(x >= 0, x, -x)


def _within(x: z3.ArithRef, bound: Fraction) -> z3.BoolRef:
    return z3.And(x >= -_q(bound), x <= _q(bound))


def _reals(prefix: str, n: int) -> tuple[z3.ArithRef, ...]:
    return tuple(z3.Real(f"{prefix}[{i}]") for i in range(1, n + 1))


# --------------------------------------------------------------------------------------------------
# Bit-precise lemmas (QF_FP, RNE): the float32 inputs and outputs, independent of n.

_QUAD = z3.FPSort(15, 113)  # every value compared below is exact in this format


def _finite(x: z3.FPRef) -> z3.BoolRef:
    return z3.Not(z3.Or(z3.fpIsInf(x), z3.fpIsNaN(x)))


def fp_output_rounding(*, timeout_s: float) -> StepResult:
    """For every finite float64 ``p`` with ``|p| < FIN32``: ``y = fl32(p)`` (RNE) is finite and
    ``|y - p| <= u32 |p| + eta32 / 2``.

    Relative ``u32`` for normal results, absolute ``eta32 / 2`` for subnormal ones. Checked in a 113-bit
    format with a directed-rounding sandwich (``RTP``/``RTN`` differences against an ``RTN`` bound), so the
    check is rigorous even without arguing that those operations are exact.
    """
    rne = z3.RNE()
    p = z3.FP("p", z3.Float64())
    y = z3.fpToFP(rne, p, z3.Float32())
    big_p, big_y = z3.fpToFP(rne, p, _QUAD), z3.fpToFP(rne, y, _QUAD)
    bound = z3.fpAdd(
        z3.RTN(),
        z3.fpMul(z3.RTN(), z3.fpAbs(big_p), z3.FPVal(float(U32), _QUAD)),
        z3.FPVal(float(ETA32 / 2), _QUAD),
    )
    claim_fails = z3.Or(
        z3.Not(_finite(y)),
        z3.fpGT(z3.fpSub(z3.RTP(), big_y, big_p), bound),
        z3.fpLT(z3.fpSub(z3.RTN(), big_y, big_p), z3.fpNeg(bound)),
    )
    hypotheses = [_finite(p), z3.fpLT(z3.fpAbs(big_p), z3.FPVal(float(FIN32), _QUAD))]
    name = "float32 output rounding: fl32(p) finite, |fl32(p) - p| <= u32 |p| + 2^-150 (bit-precise)"
    return check_unsat(name, [*hypotheses, claim_fails], timeout_s=timeout_s, logic="QF_FP")[0]


def fp_exact_squares(*, timeout_s: float) -> StepResult:
    """For every finite float32 ``g``: ``float64(g) * float64(g)`` is exact and finite.

    Rounding down and rounding up give the same float64 only when the product is representable.
    """
    g = z3.FP("g", z3.Float32())
    wide = z3.fpToFP(z3.RNE(), g, z3.Float64())
    down, up = z3.fpMul(z3.RTN(), wide, wide), z3.fpMul(z3.RTP(), wide, wide)
    claim_fails = z3.Or(z3.Not(z3.fpEQ(down, up)), z3.Not(_finite(up)))
    name = "float32 inputs: float64(g)^2 exact and finite (bit-precise)"
    return check_unsat(name, [_finite(g), claim_fails], timeout_s=timeout_s, logic="QF_FP")[0]


# --------------------------------------------------------------------------------------------------
# The float64 accumulation, by induction over the summation tree.


def accumulation_step(left: int, right: int, *, timeout_s: float) -> StepResult:
    """Joining two subtrees with ``left`` and ``right`` leaves keeps the accumulation bound.

    If ``a`` (the float64 sum of ``left`` exact squares with exact sum ``A``) lies in
    ``[(1-u)^(left-1) A, (1+u)^(left-1) A]``, ``b`` likewise, then ``fl(a + b) = (a + b)(1 + d)`` lies in
    ``[(1-u)^(m-1) (A+B), (1+u)^(m-1) (A+B)]`` with ``m = left + right``. With the leaves (``m = 1``,
    exact squares) this bounds every summation tree, hence any order torch uses.
    """
    a, b, big_a, big_b, d = z3.Reals("a b A B d")
    m = left + right
    hypotheses = [
        big_a >= 0,
        big_b >= 0,
        a >= _q((1 - U) ** (left - 1)) * big_a,
        a <= _q((1 + U) ** (left - 1)) * big_a,
        b >= _q((1 - U) ** (right - 1)) * big_b,
        b <= _q((1 + U) ** (right - 1)) * big_b,
        _within(d, U),
    ]
    total = (a + b) * (1 + d)
    claim = z3.And(total >= _q((1 - U) ** (m - 1)) * (big_a + big_b), total <= _q((1 + U) ** (m - 1)) * (big_a + big_b))
    name = f"accumulation: subtrees of {left} and {right} leaves join within (1±u)^{m - 1}"
    return check_unsat(name, [*hypotheses, z3.Not(claim)], timeout_s=timeout_s)[0]


# --------------------------------------------------------------------------------------------------
# provetrain's clip: variables, assumptions, and the derivation per branch.


@dataclass(frozen=True)
class ClipVars:
    """The encoding's variables for length ``n``: algorithm values, rounding errors, proof abbreviations."""

    n: int
    g: tuple[z3.ArithRef, ...]  # float32 inputs, as reals
    c: z3.ArithRef  # max_norm, a float64, as a real
    s: z3.ArithRef  # exact sum of squares
    s_hat: z3.ArithRef  # float64 accumulated sum
    r: z3.ArithRef  # float64 sqrt(s_hat): the stub
    d0: z3.ArithRef
    n_up: z3.ArithRef
    a_lo: z3.ArithRef  # the numerator, rounded down to float64
    d1: z3.ArithRef
    x: z3.ArithRef  # a_lo / n_up as computed, before the subnormal step toward 0
    k: z3.ArithRef
    d: tuple[z3.ArithRef, ...]
    e: tuple[z3.ArithRef, ...]
    p: tuple[z3.ArithRef, ...]  # float64 products g_i k
    y: tuple[z3.ArithRef, ...]  # float32 outputs, as reals
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
        names = "c s s_hat r d0 n_up a_lo d1 x k norm root_n l1 kk t"
        scalars = dict(zip(names.split(), z3.Reals(names), strict=True))
        vectors = {name: _reals(name, n) for name in ("g", "d", "e", "p", "y", "b", "v")}
        finite = tuple(z3.Bool(f"finite(y[{i}])") for i in range(1, n + 1))
        return cls(n=n, finite=finite, **scalars, **vectors)

    def goal(self) -> z3.BoolRef:
        """The contract's postconditions: ``||y||^2 <= c^2`` exactly, and every ``y_i`` finite."""
        return z3.And(z3.Sum([y * y for y in self.y]) <= self.c * self.c, *self.finite)


class _Facts:
    """The assumptions of the encoding, each one z3 term so derivation steps can cite it."""

    def __init__(self, v: ClipVars, margin: Fraction) -> None:
        n = v.n
        self.g = [_within(g, MAX32) for g in v.g]
        self.s = v.s == z3.Sum([g * g for g in v.g])
        # Accumulation (accumulation_step, by induction) of the exact squares (fp_exact_squares).
        self.s_hat = z3.And(v.s_hat >= _q((1 - U) ** (n - 1)) * v.s, v.s_hat <= _q((1 + U) ** (n - 1)) * v.s)
        # The stub for sqrt: only its error contract |r - sqrt(s_hat)| <= SQRT_ERROR sqrt(s_hat), without sqrt.
        low, high = _q((1 - SQRT_ERROR) ** 2), _q((1 + SQRT_ERROR) ** 2)
        self.r = z3.And(v.r >= 0, v.r * v.r >= low * v.s_hat, v.r * v.r <= high * v.s_hat)
        self.n_up = z3.And(_within(v.d0, U), v.n_up == v.r * _q(upper_factor(n)) * (1 + v.d0))
        self.c = z3.And(v.c > 0, v.c <= _q(MAX64))
        self.keep = v.n_up <= v.c
        self.clip = v.n_up > v.c
        self.a_lo = v.a_lo <= v.c * _q(1 - margin) - _q(ETA32 * (math.isqrt(n) + 1))
        self.a_pos = v.a_lo > 0
        self.a_nonpos = v.a_lo <= 0
        # k = fl(a_lo / n_up), then one subnormal step toward 0 when below 2^-1022: 0 <= k <= x.
        self.k = z3.And(_within(v.d1, U), v.x * v.n_up == v.a_lo * (1 + v.d1), v.k >= 0, v.k <= v.x)
        self.p = [
            z3.And(_within(d, U), _within(e, ETA64 / 2), p == g * v.k * (1 + d) + e)
            for g, d, e, p in zip(v.g, v.d, v.e, v.p, strict=True)
        ]
        # fl32 of a float64 p: fp_output_rounding, valid where |p| < FIN32.
        self.y = [
            z3.Implies(_abs(p) < _q(FIN32), z3.And(fin, _abs(y - p) <= _q(U32) * _abs(p) + _q(ETA32 / 2)))
            for p, y, fin in zip(v.p, v.y, v.finite, strict=True)
        ]
        self.unchanged = [z3.And(p == g, y == g, fin) for g, p, y, fin in zip(v.g, v.p, v.y, v.finite, strict=True)]
        self.zeroed = [z3.And(p == 0, y == 0, fin) for p, y, fin in zip(v.p, v.y, v.finite, strict=True)]
        # Definitions of the abbreviations.
        self.norm = z3.And(v.norm >= 0, v.norm * v.norm == v.s)
        self.root_n = z3.And(v.root_n >= 0, v.root_n * v.root_n == n)
        self.b = [z3.And(b >= 0, b * b == g * g) for b, g in zip(v.b, v.g, strict=True)]
        self.l1 = v.l1 == z3.Sum(list(v.b))
        self.kk = v.kk == _q(A_REL) * v.k
        self.v = [vi == v.kk * b + _q(H_ABS) for vi, b in zip(v.v, v.b, strict=True)]
        self.t = v.t == v.kk * v.norm + v.root_n * _q(H_ABS)

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


def exhaustive_cases(branches: Sequence[ClipBranch], *, timeout_s: float) -> StepResult:
    """The guards cover every run (``N_up <= c``; else ``A_lo <= 0`` or ``A_lo > 0``)."""
    name = "the cases k = 1, k = 0, clip cover every run"
    return check_unsat(name, [z3.Not(z3.Or(*[b.guard for b in branches]))], timeout_s=timeout_s)[0]


def clip_branches(v: ClipVars, *, margin: Fraction = 4 * U32) -> list[ClipBranch]:
    """The derivations of ``v.goal()`` for ``k = 1`` (no clipping), ``k = 0``, and clipping.

    ``margin`` is the relative margin in the numerator ``c (1 - margin) - eta32 (isqrt(n) + 1)``: the shipped
    ``4 u32`` by default; a smaller one lets the tests watch the proof fail.
    """
    f = _Facts(v, margin)
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
        k_small = v.k * _q(1 + U) <= 1
        dv.derive("k (1+u) <= 1", [k_n_up, n_up_pos, f.clip, f.a_lo, f.c], k_small)
        kk_pos = z3.And(v.k >= 0, v.kk >= 0)
        dv.derive("k >= 0, A_REL k >= 0", [f.k, f.kk], kk_pos)
        kk_norm = v.kk * v.norm <= _q(A_REL * (1 + U)) * v.a_lo
        dv.derive("A_REL k ||g|| <= A_REL (1+u) A_lo", [k_n_up, norm_below_n_up, f.kk, f.norm, kk_pos], kk_norm)
        scale = z3.And(v.t >= 0, v.t <= v.c)
        dv.derive(
            "0 <= T = A_REL k ||g|| + sqrt(n) H_ABS <= c", [kk_norm, f.t, f.a_lo, f.root_n, f.c, f.norm, kk_pos], scale
        )
        elements = []
        for i in range(v.n):
            in_range = _abs(v.p[i]) < _q(FIN32)
            dv.derive(f"|p[{i + 1}]| < FIN32 (no float32 overflow)", [f.g[i], kk_pos, k_small, f.p[i]], in_range)
            element = z3.And(v.y[i] * v.y[i] <= v.v[i] * v.v[i], v.finite[i])
            hypotheses = [in_range, f.y[i], f.p[i], kk_pos, f.kk, f.b[i], f.v[i]]
            dv.derive(f"y[{i + 1}]^2 <= V[{i + 1}]^2 = (A_REL k |g[{i + 1}]| + H_ABS)^2", hypotheses, element)
            elements.append(element)
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
        squares = [
            x * x == v.kk * v.kk * b * b + _q(2 * H_ABS) * v.kk * b + _q(H_ABS**2)
            for x, b in zip(v.v, v.b, strict=True)
        ]
        for i, (square, definition) in enumerate(zip(squares, f.v, strict=True)):
            dv.derive(f"V[{i + 1}]^2 expanded", [definition], square)
        t_square = v.t * v.t == v.kk * v.kk * v.norm * v.norm + _q(2 * H_ABS) * v.kk * v.root_n * v.norm + _q(
            v.n * H_ABS**2
        )
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

    base = f.base()
    clipping = [f.clip, f.a_lo, f.a_pos, f.k, *f.p, *f.y]
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
# The same steps in Python floats (lockstep with provetrain.ops.clip), and a run in the encoding's terms.


def to_float32(x: float) -> float:
    """``x`` rounded to float32, to nearest even (the C cast ``struct`` uses), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def torch_sqrt(x: float) -> float:
    """torch's float64 sqrt, the stub's subject: not always correctly rounded on CPU (see ``SQRT_ERROR``)."""
    return torch.sqrt(torch.tensor(x, dtype=torch.float64)).item()


def _round_down(value: Fraction) -> float:
    nearest = float(value)
    return math.nextafter(nearest, -math.inf) if Fraction(nearest) > value else nearest


def sum_of_squares(g: Sequence[float]) -> float:
    """One admissible accumulation: float64 squares (exact for float32 values) added left to right."""
    total = 0.0
    for x in g:
        total += x * x
    return total


def reference_clip(
    g: Sequence[float], max_norm: float, *, s_hat: float | None = None
) -> tuple[float, tuple[float, ...]]:
    """``(k, y)`` for float32 values ``g`` by the encoded steps, in IEEE float64 with a float32 cast at the end.

    Every step is Python float arithmetic (correctly rounded) except the square root, torch's own.

    ``s_hat`` is the float64 sum of squares in whatever order the caller's backend used (default: left to
    right); the encoding allows every order. For float32 inputs ``k`` is never subnormal, so dividing
    ``A_lo / N_up`` in one step equals clip's scaled division.
    """
    n = len(g)
    s_hat = sum_of_squares(g) if s_hat is None else s_hat
    n_up = torch_sqrt(s_hat) * float(upper_factor(n))
    if n_up <= max_norm:
        k = 1.0
    else:
        a_lo = _round_down(margin_numerator(Fraction(max_norm), n))
        k = 0.0 if a_lo <= 0 else a_lo / n_up
        if k < 2.0**-1022:
            k = math.nextafter(k, 0.0)
    return k, tuple(to_float32(x * k) for x in g)


def trace_values(g: Sequence[float], max_norm: float, s_hat: float) -> tuple[str, dict[str, Fraction | bool]]:
    """The branch a concrete run takes and the values of the encoding's variables in it.

    Rounding errors are solved from the computed values (``d = computed / exact - 1``, or an absolute ``e``
    where the exact value is below float64's normal range), so the assumptions of that branch can be
    evaluated on the run. The proof's abbreviations (irrational in general) are not included.
    """
    n = len(g)
    k, y = reference_clip(g, max_norm, s_hat=s_hat)
    r = torch_sqrt(s_hat)
    n_up = r * float(upper_factor(n))
    values: dict[str, Fraction | bool] = {"c": Fraction(max_norm), "s_hat": Fraction(s_hat), "r": Fraction(r)}
    values["s"] = sum((Fraction(x) ** 2 for x in g), Fraction(0))
    values["n_up"] = Fraction(n_up)
    values["d0"] = Fraction(n_up) / (Fraction(r) * upper_factor(n)) - 1 if r else Fraction(0)
    for i, x in enumerate(g, start=1):
        values[f"g[{i}]"] = Fraction(x)
        values[f"y[{i}]"] = Fraction(y[i - 1])
        values[f"finite(y[{i}])"] = math.isfinite(y[i - 1])
    if n_up <= max_norm:
        values.update({f"p[{i}]": Fraction(x) for i, x in enumerate(g, start=1)})
        return "keep", values
    a_lo = _round_down(margin_numerator(Fraction(max_norm), n))
    values["a_lo"] = Fraction(a_lo)
    if a_lo <= 0:
        values.update({f"p[{i}]": Fraction(0) for i in range(1, n + 1)})
        return "zero", values
    x = a_lo / n_up
    values.update({"x": Fraction(x), "k": Fraction(k), "d1": Fraction(x) * Fraction(n_up) / Fraction(a_lo) - 1})
    for i, gi in enumerate(g, start=1):
        exact, computed = Fraction(gi) * Fraction(k), Fraction(gi * k)
        relative = abs(exact) >= Fraction(2) ** -1022
        values[f"p[{i}]"] = computed
        values[f"d[{i}]"] = computed / exact - 1 if relative else Fraction(0)
        values[f"e[{i}]"] = Fraction(0) if relative else computed - exact
    return "clip", values
