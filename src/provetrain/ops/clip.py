r"""Global-norm gradient clipping with a rigorous bound: ``||clip(g)|| <= max_norm`` on the stored values.

Serves the contract equation ``gradient_norm`` (postcondition ``grad_norm <= clip_value``) and the
falsification test FALSIFY-TRAIN-001.

The clip, in exact arithmetic::

    N = ||g||_2,   y = g                      if N <= c
                   y = g * c (1 - a) / N      otherwise   (a: a margin for the rounding of y itself)

computed as five small steps, each a function below:

1. ``S_hat``: sum of ``g_i^2`` accumulated in float64 (:func:`global_sum_of_squares`,
   :func:`scaled_sum_of_squares`); ``N_hat = sqrt(S_hat)`` is the returned pre-clip norm.
2. ``N_up = N_hat * (1 + (n + 4) u)``: a float64 value proven ``>= N`` (:func:`clip_coefficient`).
3. No clipping iff ``N_up <= max_norm``: then ``k = 1.0`` exactly and every gradient stays bit-for-bit.
4. Otherwise ``k = (max_norm (1 - 4 u_d) - eta_d (floor(sqrt n) + 1)) / N_up``, and ``k = 0`` when that
   numerator is ``<= 0``.
5. ``y_i = round_d(float64(g_i) * k)`` (:func:`scale_gradient`, the one definition of the clipped value).

Notation: ``u = 2^-53`` (float64 unit roundoff); for a gradient dtype ``d``, ``u_d`` is its unit roundoff
(float32 ``2^-24``, float16 ``2^-11``, bfloat16 ``2^-8``, float64 ``2^-53``) and ``eta_d`` its smallest
positive subnormal (``2^-149``, ``2^-24``, ``2^-133``, ``2^-1074``); for lists of several dtypes both are
the maximum over the dtypes present. ``n`` is the total element count, ``fl`` float64 rounding to nearest.

Guarantees
----------
For every list of finite float16 / bfloat16 / float32 / float64 gradients, ``n < 2^40`` and
``0 < max_norm < inf``, with ``N`` the exact real norm of the input and ``y`` the values stored after
:func:`clip_grad_norm_`:

* **Bound** (the contract): ``||y||_2 <= max_norm``, exactly, in real arithmetic on the stored values.
* **Untouched below the threshold**: if ``N_up <= max_norm`` (in particular whenever ``N <= max_norm / 2``,
  and in fact whenever ``N (1 + 1.51 (n + 5) u) <= max_norm``) every gradient is bit-for-bit unchanged.
* **Direction**: ``y_i = round_d(g_i k)`` with one ``k in [0, 1)``: signs are kept or become zero, zeros stay
  zeros, ratios ``y_i / y_j`` match ``g_i / g_j`` up to the rounding of each ``y_i``.
* **Not over-clipped**: when it clips and ``k >= 2^-1022``,
  ``||y|| >= max_norm (1 - 5.01 u_d - 2 (n + 7) u) - 1.6 (sqrt(n) + 1) eta_d``; for float32 with
  ``n <= 2^28`` (float16 / bfloat16 for any ``n < 2^40``) and ``max_norm >= 2^10 (sqrt(n) + 1) eta_d / u_d``
  that is ``||y|| >= max_norm (1 - 8 u_d)``.
* **Returned norm**: ``total_norm = N_hat`` is float64 and ``|N_hat - N| <= 0.51 (n + 4) u N``. It is finite
  for every finite float16 / bfloat16 / float32 input (float32 ``[3e38, 3e38]`` gives ``4.24e38``).
* **Idempotent** for float16 / bfloat16 / float32 lists with ``n <= 2^28``: clipping ``y`` again is a
  bit-for-bit no-op (``N_up(y) <= max_norm``). Not promised with float64 gradients (``u_d = u`` leaves no
  room for the second ``N_up`` margin).

Exceptions, all float64-only: ``total_norm`` is ``inf`` when ``N`` exceeds float64's largest value and is
rounded to a subnormal (absolute error ``<= 2^-1075``) when ``N < 2^-1022``; clipping is still correct then
because ``k`` is computed in the scaled domain. When ``max_norm / N < 2^-1022`` (``k`` subnormal) the bound
holds but ``k`` is rounded toward zero by up to one subnormal step, so "not over-clipped" does not hold.

Proof
-----
Every float64 operation used (``+ * /``, power-of-two scaling, casts) is IEEE round-to-nearest on CPU
and CUDA, so for a real ``x >= 0``: ``fl(x) in [x (1 - u), x (1 + u)]``, or ``|fl(x) - x| <= 2^-1075``
where ``x < 2^-1022`` (subnormal); overflow gives ``inf``. (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., §2.1-2.2, §4.2.) ``sqrt`` is assumed only *faithful* (within one ulp,
``fl(sqrt x) in [sqrt(x) (1 - u)^2, sqrt(x) (1 + u)^2]``): torch's vectorised CPU float64 sqrt (MKL) is
not correctly rounded (measured: 0.7% of 10^6 random inputs differ from ``math.sqrt``, relative error up
to 1.26 u); ``tests/verify/test_prove.py`` checks the one-ulp bound, and the SMT harness
``train-kani-001`` proves the clip bound under exactly this sqrt contract.

*Step 1, sum.* float16 / bfloat16 / float32 values have at most 24 significant bits and exponents in
``[-149, 127]``, so each ``g_i^2`` is exact in float64 and every partial sum lies in ``[2^-298, n 2^256]``
(normal). Summing ``n`` non-negative terms in any tree (a ``torch.dot`` per chunk of ``CHUNK`` elements,
BLAS blocking, threads, the sums over chunks and tensors) passes each term through at most ``n - 1``
roundings (an addition of an exact 0 does not round):
``S (1 - u)^(n-1) <= S_hat <= S (1 + u)^(n-1)``. float64 squares can overflow or underflow, so when any
float64 gradient is present all values are first scaled by ``2^-e``, ``e`` the binary exponent of
``M = max |g_i|`` (``torch.frexp``, on device): ``t_i = g_i 2^-e`` in two power-of-two steps, exact except
for values that land below ``2^-1022``, where ``|t_i - g_i 2^-e| <= 2^-1074``; the largest ``t_i`` lies
exactly in ``[1/2, 1)``. Squares now round too (at most ``n`` roundings per term, ``2n`` absolute
``2^-1075`` terms in all) and ``S = s 4^e``; as ``sum t_i^2 >= 1/4``, the absolute terms are a relative
``delta <= n 2^-1070``: ``N <= sqrt(s) 2^e (1 - u)^(-p) (1 + delta)`` with ``p = (n - 1) / 2`` (exact
squares, ``delta = 0``) or ``p = n / 2`` (float64 present).

*Step 2, upper bound.* ``N_hat_s = fl(sqrt(s)) >= sqrt(s) (1 - u)^2`` (faithful sqrt);
``C = 1 + ceil((n + 4) / 2) 2^-52 >= 1 + (n + 4) u`` is exact in float64;
``N_up_s = fl(N_hat_s C) >= N_hat_s C (1 - u)``; ``N_up = N_up_s 2^e`` (kept as a pair, never rounded).
So ``N_up >= N`` once ``(1 - u)^(-P) (1 + delta) <= 1 + (n + 4) u`` with ``P = p + 3 <= (n + 6) / 2``:
``(1 - u)^(-P) <= 1 / (1 - P u) <= 1 + P u + 2 P^2 u^2`` for ``P u <= 1/2``, and
``(n + 4) u - P u >= (n + 2) u / 2``, which dwarfs ``2 P^2 u^2 + delta`` for ``n < 2^40`` (enforced).
The same steps give ``N_up <= N (1 + 1.51 (n + 5) u)`` and ``|N_hat - N| <= 0.51 (n + 4) u N``.

*Step 3, decision.* ``N_up <= max_norm`` is decided exactly (binary exponents, then mantissas). ``k = 1.0``
makes ``float64(g_i) * 1`` and the cast back exact: bit-for-bit.

*Step 4, scale.* The numerator ``A = max_norm (1 - 4 u_d) - eta_d (floor(sqrt n) + 1)`` is evaluated in
rationals on the host and rounded down to a float64 ``A_lo <= A``. With ``A_lo = a 2^(e_a)``,
``q = fl(a / N_up_s)`` and ``k = fl(q 2^(e_a - e))`` (exact power-of-two scaling, one rounding, moved one
subnormal step toward 0 when below ``2^-1022``): ``k <= (A_lo / N_up) (1 + u)^2``, ``k < 1``, and
``k >= (A_lo / N_up) (1 - u)^2`` when ``k >= 2^-1022``. Hence ``k N <= A (1 + u)^2``.

*Step 5, product.* ``fl(g_i k)`` is within ``(1 + u)`` relative, or is ``< 2^-1022`` and then casts to 0
for ``d != float64``. The cast to float32 is correctly rounded: ``(1 + u_d)`` relative or ``eta_d / 2``
absolute (subnormal). torch casts float64 to float16 / bfloat16 through float32 (double rounding, measured on
torch 2.13: ``1 + 2^-11 + 2^-40`` casts to float16 ``1.0``), so there ``(1 + 2^-24)(1 + u_d)`` relative and
``eta_d / 2 + 2^-150`` absolute. By Minkowski's inequality::

    ||y|| <= k N (1 + u)(1 + u_d)(1 + 2^-24) + sqrt(n) (eta_d / 2)(1 + 2^-15)
          <= max_norm (1 - 4 u_d)(1 + u_d)(1 + u)^3 (1 + 2^-24) - eta_d ((floor(sqrt n) + 1) - sqrt(n) 0.51)
          <= max_norm

because ``(1 - 4 x)(1 + x) <= 1 - 3 x`` and ``3 u_d`` exceeds the ``(1 + u)^3 (1 + 2^-24)`` excess for every
``d`` (for float64, ``(1 - 4 u)(1 + u)^4 < 1``; the ``2^-24`` factor only exists for float16 / bfloat16), and
``floor(sqrt n) + 1 > sqrt n``. If ``A <= 0`` then ``k = 0`` and ``y = 0``: this happens only when
``max_norm`` is within ``floor(sqrt n) + 1`` subnormal steps of zero. The lower bound is the same chain with
every factor at its other end and ``N_up <= N (1 + 1.51 (n + 5) u)``.

Differences from ``torch.nn.utils.clip_grad_norm_``
---------------------------------------------------
* torch scales by ``max_norm / (N + 1e-6)`` computed in the gradient dtype with no margin: the stored norm
  exceeds ``max_norm`` in about half of random float32 cases (by up to ``2.7e-7`` relative), and gradients far
  below ``1e-6`` are over-clipped. Here the bound is rigorous and there is no ``1e-6``.
* torch's float32 norm overflows to ``inf`` for finite gradients (``[3e38, 3e38, 1, 1]``) and zeroes every
  gradient; here the norm is float64 and finite, and the direction is kept.
* torch silently turns a NaN/Inf gradient into NaN everywhere; here it is a contract precondition violation
  that names the parameter and leaves every gradient untouched.
* torch accepts ``max_norm <= 0`` (a negative one reverses every gradient, pytorch #31367); here it is refused.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Collection, Iterable, Sequence
from fractions import Fraction

import torch

from provetrain.errors import ContractViolation

__all__ = [
    "check_gradual_underflow",
    "check_writable",
    "clip_coefficient",
    "clip_coefficient_on_host",
    "clip_grad_norm_",
    "clip_grads_",
    "first_nonfinite_gradient",
    "flush_to_zero_enabled",
    "global_sum_of_squares",
    "margin_terms",
    "round_down",
    "scale_gradient",
    "scaled_sum_of_squares",
    "toward_zero_if_subnormal",
    "toward_zero_if_subnormal_tensor",
    "unscale_clip_target",
    "upper_factor",
]

EQUATION = "gradient_norm"
CLAUSE_CLIP_VALUE = "clip_value > 0.0"
CLAUSE_NOT_EMPTY = "!gradients.is_empty()"
CLAUSE_FINITE = "gradients.iter().all(|g| g.is_finite())"

MAX_NUMEL = 2**40
"""Largest total element count the error analysis is stated for (it holds up to ``2^52``)."""

UNIT_ROUNDOFF: dict[torch.dtype, Fraction] = {
    torch.float16: Fraction(1, 2**11),
    torch.bfloat16: Fraction(1, 2**8),
    torch.float32: Fraction(1, 2**24),
    torch.float64: Fraction(1, 2**53),
}
"""``u_d`` per supported gradient dtype."""

SMALLEST_SUBNORMAL: dict[torch.dtype, Fraction] = {
    torch.float16: Fraction(1, 2**24),
    torch.bfloat16: Fraction(1, 2**133),
    torch.float32: Fraction(1, 2**149),
    torch.float64: Fraction(1, 2**1074),
}
"""``eta_d`` per supported gradient dtype."""

_SMALLEST_NORMAL_F64 = 2.0**-1022

CHUNK = 2**16
"""Elements converted to float64 at a time (512 KiB): the reference path stays cache-resident."""


# --------------------------------------------------------------------------------------------------
# Exact power-of-two scaling on device (sync-free: no .item(), no branching on values).


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` as float64, built from its bits so it is exact; valid for integer ``k in [-1022, 1023]``."""
    return torch.bitwise_left_shift(k.to(torch.int64) + 1023, 52).view(torch.float64)


def _mul_pow2(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``x * 2^k`` for ``k in [-2044, 2046]`` in two steps of at most ``2^±1023`` each.

    Exact unless the result overflows (``inf``) or falls below ``2^-1022`` (absolute error ``<= 2^-1074``);
    a single rounding whenever ``|x|`` is within ``2^±480`` (the intermediate stays normal).
    """
    half = torch.div(k, 2, rounding_mode="floor")
    return (x * _pow2(half)) * _pow2(k - half)


# --------------------------------------------------------------------------------------------------
# Step 1: the float64 sum of squares.


def _check_gradient(grad: torch.Tensor, what: str) -> None:
    if grad.layout != torch.strided:
        raise TypeError(
            f"{what} is a {grad.layout} tensor; provetrain clips dense gradients only. "
            "Densify it (grad.to_dense()) or use a dense embedding (sparse=False)."
        )
    if grad.dtype not in UNIT_ROUNDOFF:
        raise TypeError(
            f"{what} has dtype {grad.dtype}; supported gradient dtypes are float16, bfloat16, float32 "
            "and float64. Cast the parameter to one of them."
        )


def scaled_sum_of_squares(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The sum of squares of all gradient elements as a pair ``(s, e)`` with ``S = s 4^e``.

    .. math:: S = \sum_i g_i^2 = s \cdot 4^{e}

    ``e`` is 0 unless a float64 gradient is present; then every value is first scaled by ``2^-e``, ``e`` the
    binary exponent of ``max |g_i|`` (so the largest scaled value lies in ``[1/2, 1)`` and ``s`` can neither
    overflow nor underflow). The scaling is exact powers of two; see the module's *Proof*, step 1.

    Args:
        grads: dense float16 / bfloat16 / float32 / float64 tensors, possibly on several devices.

    Returns:
        ``(s, e)``: 0-d float64 and 0-d int64 tensors on ``grads[0].device``. Partial sums of gradients on
        other devices are moved there. No host-device synchronisation.

    Guarantees:
        ``S (1 - u)^(n-1) <= s 4^e <= S (1 + u)^(n-1)`` without float64 gradients (each square is exact);
        with them, the same with ``n`` in place of ``n - 1`` up to a relative ``n 2^-1070``. ``s`` is
        finite iff every gradient is finite.
    """
    if len(grads) == 0:
        raise ValueError("grads is empty; pass at least one gradient tensor")
    for i, grad in enumerate(grads):
        _check_gradient(grad, f"grads[{i}]")
    device = grads[0].device
    flat = [g.detach().reshape(-1) for g in grads]
    if any(g.dtype == torch.float64 for g in grads):  # dtype is host metadata: no sync
        exponent = _max_abs_exponent(flat, device)
        partials = [_chunked_sum_of_squares(x, exponent.to(x.device)) for x in flat]
    else:
        exponent = torch.zeros((), dtype=torch.int64, device=device)
        partials = [_chunked_sum_of_squares(x, None) for x in flat]
    return torch.stack([p.to(device) for p in partials]).sum(), exponent


SUM_CHUNK = 2**15
"""Elements per partial sum: torch's ``GRAIN_SIZE``, below which a CPU reduction runs on one thread, so the
float64 sum is the same bits for every thread count (``torch.dot`` is not: BLAS splits it by thread)."""


def _chunked_sum_of_squares(x: torch.Tensor, exponent: torch.Tensor | None) -> torch.Tensor:
    """``sum (x_i 2^-e)^2`` in float64 (``e = 0`` for None), converting ``SUM_CHUNK`` elements at a time.

    Chunks keep the float64 copy in cache (about 4x faster than one full copy on CPU) and each is reduced
    on one thread; per-chunk sums added afterwards are still a summation tree (module *Proof*, step 1).
    """
    partials = [torch.zeros((), dtype=torch.float64, device=x.device)]
    for chunk in x.split(SUM_CHUNK):
        wide = chunk.to(torch.float64)
        if exponent is not None:
            wide = _mul_pow2(wide, -exponent)
        partials.append(wide.square().sum())
    return torch.stack(partials).sum()


def _max_abs_exponent(flat: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Binary exponent ``e`` of ``M = max |x_i|`` (``M = m 2^e``, ``m in [1/2, 1)``), clamped to ``[-1073, 1024]``."""
    maxima = [torch.linalg.vector_norm(x, math.inf).to(device, torch.float64) for x in flat if x.numel() > 0]
    if not maxima:
        return torch.zeros((), dtype=torch.int64, device=device)
    _, exponent = torch.frexp(torch.stack(maxima).amax())
    # frexp of inf/nan gives an unspecified exponent; the clamp keeps the scaling finite so they propagate.
    return exponent.to(torch.int64).clamp(-1073, 1024)


def global_sum_of_squares(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The sum of squares of all gradient elements, accumulated in float64.

    .. math:: \hat S = \mathrm{fl}\Big(\sum_i g_i^2\Big)

    Args:
        grads: dense float16 / bfloat16 / float32 / float64 tensors, possibly on several devices.

    Returns:
        A 0-d float64 tensor on ``grads[0].device``. No host-device synchronisation.

    Guarantees:
        For float16 / bfloat16 / float32 gradients every square is exact and
        ``|S_hat - S| <= gamma_(n-1) S``, ``gamma_m = m u / (1 - m u)``, for any summation order; it is
        finite for every finite input. With float64 gradients it is ``s 4^e`` from
        :func:`scaled_sum_of_squares`, so it overflows to ``inf`` when ``S > 1.8e308`` (a norm above
        ``1.34e154``) or rounds to a subnormal when ``S < 2^-1022``: callers that may see such float64
        gradients pass ``(s, e)`` from :func:`scaled_sum_of_squares` to :func:`clip_coefficient` instead.
    """
    s, e = scaled_sum_of_squares(grads)
    # s in [1/5, n]: past e = -1022 or 1023 the result is 0 or inf with or without the clamp.
    return _mul_pow2(s, 2 * e.clamp(-1022, 1023))


# --------------------------------------------------------------------------------------------------
# Steps 2-4: the coefficient.


def _check_max_norm(max_norm: object) -> float:
    """``max_norm`` as a float, or ContractViolation on ``clip_value > 0.0`` (math.inf allowed: never clip)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise ContractViolation(
            EQUATION,
            CLAUSE_CLIP_VALUE,
            kind="precondition",
            observed={"max_norm": max_norm, "type": type(max_norm).__name__},
            hint="max_norm must be a real number > 0 (a Python float); pass e.g. max_norm=1.0",
        )
    value = float(max_norm)
    if not value > 0.0:  # also catches NaN
        raise ContractViolation(
            EQUATION,
            CLAUSE_CLIP_VALUE,
            kind="precondition",
            observed={"max_norm": value},
            hint=(
                "max_norm must be > 0 (valid range: (0, inf], inf meaning measure only). "
                "A negative value would reverse every gradient; pass a positive threshold such as 1.0"
            ),
        )
    return value


def _rounding_constants(dtypes: Collection[torch.dtype]) -> tuple[Fraction, Fraction]:
    """``(u_d, eta_d)``: the largest unit roundoff and smallest subnormal over ``dtypes``."""
    if not dtypes:
        raise ValueError("dtypes is empty; pass the set of gradient dtypes, e.g. {g.dtype for g in grads}")
    unknown = [d for d in dtypes if d not in UNIT_ROUNDOFF]
    if unknown:
        raise TypeError(f"dtypes contains {unknown}; supported gradient dtypes are float16, bfloat16, float32, float64")
    return max(UNIT_ROUNDOFF[d] for d in dtypes), max(SMALLEST_SUBNORMAL[d] for d in dtypes)


# The definitions below are shared with the SMT harness (provetrain.verify.smt_clip), which proves the bound
# for these exact constants: changing one here changes what is proved.


def upper_factor(numel: int, extra_roundings: int = 0) -> float:
    """``C = 1 + ceil((n + 4 + x) / 2) 2^-52 >= 1 + (n + 4 + x) u``, exact in float64 (*Proof*, step 2)."""
    return 1.0 + ((numel + 5 + extra_roundings) // 2) * 2.0**-52


def margin_terms(numel: int, u_d: Fraction, eta_d: Fraction) -> tuple[Fraction, Fraction]:
    """``(a, b)`` of the numerator ``A = max_norm a - b``: ``a = 1 - 4 u_d``, ``b = eta_d (isqrt(n) + 1)`` (step 4)."""
    return 1 - 4 * u_d, eta_d * (math.isqrt(numel) + 1)


def round_down(exact: Fraction) -> float:
    """The largest float64 ``<= exact`` (``exact`` within float64's range)."""
    rounded = float(exact)  # int / int true division: correctly rounded
    return math.nextafter(rounded, -math.inf) if Fraction(rounded) > exact else rounded


def toward_zero_if_subnormal(k: float) -> float:
    """A quotient ``k >= 0`` below ``2^-1022`` moved one subnormal step toward 0 (step 4).

    There the rounding is absolute, up to half a subnormal step: after the step ``k`` is at most the exact
    quotient.
    """
    return math.nextafter(k, 0.0) if k < _SMALLEST_NORMAL_F64 else k


def toward_zero_if_subnormal_tensor(k: torch.Tensor) -> torch.Tensor:
    """:func:`toward_zero_if_subnormal` on a float64 tensor (NaN and inf pass through)."""
    return torch.where(k < _SMALLEST_NORMAL_F64, torch.nextafter(k, k * 0.0), k)


@functools.lru_cache(maxsize=256)
def _margin_numerator(max_norm: float, numel: int, u_d: Fraction, eta_d: Fraction) -> float:
    """``A_lo``: ``max_norm (1 - 4 u_d) - eta_d (isqrt(n) + 1)`` rounded down to float64 (exact rationals)."""
    scale, offset = margin_terms(numel, u_d, eta_d)
    return round_down(Fraction(max_norm) * scale - offset)


def unscale_clip_target(max_norm: float, *, numel: int, dtypes: Collection[torch.dtype]) -> float:
    """The clip value to decide with when the gradient must still be divided by a loss scale.

    Without clipping, an unscaled gradient ``fl(g_scaled / sigma)`` rounds (``sigma`` not a power of two,
    or a subnormal result), so "no clip" is only safe once ``N_up <= A_lo``, the margin numerator of
    *Proof* step 4: then the rounding chain of step 5 bounds the stored norm by ``max_norm``. Deciding (and
    clipping) against ``A_lo`` instead of ``max_norm`` gives exactly that; ``A_lo <= 0`` becomes the smallest
    subnormal, where every nonzero gradient is clipped to 0.
    """
    u_d, eta_d = _rounding_constants(dtypes)
    target = _margin_numerator(_check_max_norm(max_norm), numel, u_d, eta_d)
    return target if target > 0.0 else math.ulp(0.0)


def clip_coefficient(
    sum_sq: torch.Tensor,
    max_norm: float,
    *,
    numel: int,
    dtypes: Collection[torch.dtype],
    exponent: torch.Tensor | int = 0,
    extra_roundings: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The pre-clip norm and the clip coefficient from a float64 sum of squares.

    .. math::
        \hat N = \sqrt{\hat S},\quad N_{up} = \hat N\,(1 + (n + 4)u),\quad
        k = \begin{cases} 1 & N_{up} \le c \\
        \max\!\Big(0, \dfrac{c\,(1 - 4u_d) - \eta_d(\lfloor\sqrt n\rfloor + 1)}{N_{up}}\Big) & \text{else}
        \end{cases}

    Args:
        sum_sq: 0-d float64 ``S_hat`` from :func:`global_sum_of_squares`, or ``s`` from
            :func:`scaled_sum_of_squares` together with its ``exponent``.
        max_norm: the clip value ``c``, in ``(0, inf]``; ``math.inf`` means measure only (``k = 1``).
        numel: total element count ``n`` of the gradients, ``0 <= n < 2^40``.
        dtypes: the gradient dtypes present (``u_d`` and ``eta_d`` are their maxima).
        exponent: ``e`` with ``S = sum_sq 4^e`` (0-d int tensor or int in ``[-1073, 1024]``), default 0.
        extra_roundings: ``x >= 0``, the roundings a term of ``sum_sq`` may pass through beyond the ``n - 1``
            of a plain float64 sum of exact squares (:mod:`provetrain.ops.multi_tensor` forms it from
            per-tensor norms: ``x = 5``). The margin becomes ``N_up = N_hat (1 + (n + 4 + x) u)``, which the
            *Proof*, step 2, covers for ``n - 1 + x`` roundings per term.

    Returns:
        ``(total_norm, k)``: 0-d float64 tensors on ``sum_sq.device``. ``total_norm = N_hat`` (the norm
        before clipping); ``k == 1.0`` exactly when no clipping is needed, else ``0 <= k < 1``. A NaN
        ``sum_sq`` gives NaN for both; an infinite one ``k = 0``. No host-device synchronisation.

    Raises:
        ContractViolation: ``clip_value > 0.0`` when ``max_norm`` is not a real number in ``(0, inf]``.

    Guarantees:
        ``N_up >= N`` and ``k N <= A (1 + u)^2`` with ``A`` the numerator above, hence
        ``||round_d(g k)|| <= max_norm`` (module *Proof*, steps 2-5). ``|N_hat - N| <= 0.51 (n + 4) u N``.
    """
    max_norm = _check_max_norm(max_norm)
    _check_counts(numel, extra_roundings)
    u_d, eta_d = _rounding_constants(dtypes)
    device = sum_sq.device
    sum_sq = sum_sq.to(torch.float64)
    if isinstance(exponent, int) and exponent == 0:
        return _clip_coefficient_unscaled(sum_sq, max_norm, numel, u_d, eta_d, extra_roundings)
    if isinstance(exponent, torch.Tensor):
        e = exponent.to(device, torch.int64).clamp(-1073, 1024)
    else:  # a fill, not a host-to-device copy
        e = torch.full((), min(max(exponent, -1073), 1024), dtype=torch.int64, device=device)

    norm_s = torch.sqrt(sum_sq)
    total_norm = _mul_pow2(norm_s, e)
    upper_s = norm_s * upper_factor(numel, extra_roundings)  # C >= 1 + (n + 4 + x) u, exact
    nan = torch.full((), math.nan, dtype=torch.float64, device=device)
    if max_norm == math.inf:
        return total_norm, torch.where(torch.isnan(upper_s), nan, 1.0)

    # Decide N_up = upper_s * 2^e <= max_norm exactly, without forming N_up (it may overflow).
    mantissa, exp_s = torch.frexp(upper_s)
    exp_up = exp_s.to(torch.int64) + e
    max_mantissa, max_exp = math.frexp(max_norm)
    below = (exp_up < max_exp) | ((exp_up == max_exp) & (mantissa <= max_mantissa))
    no_clip = (upper_s == 0) | (torch.isfinite(upper_s) & below)

    numerator = _margin_numerator(max_norm, numel, u_d, eta_d)
    if numerator <= 0.0:
        k_clip = torch.zeros((), dtype=torch.float64, device=device)
    else:
        k_clip = _divide_scaled(numerator, upper_s, e)
    k = torch.where(no_clip, 1.0, k_clip)
    return total_norm, torch.where(torch.isnan(upper_s), nan, k)


def clip_coefficient_on_host(
    sum_sq: float,
    max_norm: float,
    *,
    numel: int,
    dtypes: Collection[torch.dtype],
    exponent: int = 0,
    extra_roundings: int = 0,
) -> tuple[float, float]:
    """:func:`clip_coefficient` in Python floats, for sums already on the host (CPU paths: no tensor ops).

    The same operations in the same order, each an IEEE-754 double operation rounded to nearest (Python's
    ``*``, ``/``, ``math.frexp``, powers of two), so the *Proof* holds as stated; ``math.sqrt`` is correctly
    rounded, a special case of the faithful sqrt it assumes. It matches :func:`clip_coefficient` bit for bit
    wherever torch's ``sqrt`` rounds correctly too (tested).

    Returns:
        ``(total_norm, k)`` as Python floats, with the meaning and guarantees of :func:`clip_coefficient`.
    """
    max_norm = _check_max_norm(max_norm)
    _check_counts(numel, extra_roundings)
    u_d, eta_d = _rounding_constants(dtypes)
    e = min(max(exponent, -1073), 1024)
    norm_s = math.sqrt(sum_sq) if not sum_sq < 0 else math.nan
    total_norm = _mul_pow2_host(norm_s, e)
    upper_s = norm_s * upper_factor(numel, extra_roundings)
    if math.isnan(upper_s):
        return total_norm, math.nan
    if max_norm == math.inf:
        return total_norm, 1.0
    if upper_s == 0 or (math.isfinite(upper_s) and _at_most(upper_s, e, max_norm)):
        return total_norm, 1.0
    numerator = _margin_numerator(max_norm, numel, u_d, eta_d)
    if numerator <= 0.0:
        return total_norm, 0.0
    mantissa, exp_a = math.frexp(numerator)
    q = mantissa / upper_s
    shift = min(max(exp_a - e, -1100), 1023)
    big = max(shift, -1022)
    k = (q * 2.0 ** (shift - big)) * 2.0**big
    return total_norm, toward_zero_if_subnormal(k)


def _at_most(upper_s: float, e: int, max_norm: float) -> bool:
    """``upper_s 2^e <= max_norm``, decided exactly on binary exponents and mantissas."""
    mantissa, exp_s = math.frexp(upper_s)
    max_mantissa, max_exp = math.frexp(max_norm)
    return exp_s + e < max_exp or (exp_s + e == max_exp and mantissa <= max_mantissa)


def _mul_pow2_host(x: float, k: int) -> float:
    """:func:`_mul_pow2` in Python floats: ``x 2^k`` in two power-of-two steps."""
    half = k // 2
    return (x * 2.0**half) * 2.0 ** (k - half)


def _check_counts(numel: object, extra_roundings: object) -> None:
    if isinstance(numel, bool) or not isinstance(numel, int) or not 0 <= numel < MAX_NUMEL:
        raise ValueError(f"numel={numel!r}; expected an int in [0, 2**40): the total gradient element count")
    if isinstance(extra_roundings, bool) or not isinstance(extra_roundings, int) or not 0 <= extra_roundings < 64:
        raise ValueError(f"extra_roundings={extra_roundings!r}; expected an int in [0, 64)")


def _clip_coefficient_unscaled(
    sum_sq: torch.Tensor, max_norm: float, numel: int, u_d: Fraction, eta_d: Fraction, extra_roundings: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_coefficient` for a host-known ``e = 0`` (no float64 gradient): the same values in fewer ops.

    With ``e = 0`` there is nothing to scale: ``N_up = upper_s`` is a float64 number (finite for every
    finite input, as ``S < 2^297``), compared with ``max_norm`` directly (exact), and ``k = fl(A_lo /
    N_up)`` is one division (the scaled form's ``q 2^(e_a)`` is that quotient too, with one rounding when
    normal). NaN propagates through every operation, so no extra select is needed.
    """
    norm_s = torch.sqrt(sum_sq)
    upper_s = norm_s * upper_factor(numel, extra_roundings)  # C >= 1 + (n + 4 + x) u, exact
    if max_norm == math.inf:
        return norm_s, torch.where(torch.isnan(upper_s), upper_s, 1.0)
    numerator = _margin_numerator(max_norm, numel, u_d, eta_d)
    if numerator <= 0.0:
        k_clip = torch.where(torch.isnan(upper_s), upper_s, 0.0)
    else:
        k_clip = torch.div(torch.full_like(upper_s, numerator), upper_s)
        k_clip = toward_zero_if_subnormal_tensor(k_clip)
    return norm_s, torch.where(upper_s <= max_norm, 1.0, k_clip)


def _divide_scaled(numerator: float, upper_s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``numerator / (upper_s 2^e)`` with one rounding, rounded toward 0 when subnormal (Proof, step 4)."""
    mantissa, exp_a = math.frexp(numerator)
    # A tensor-by-tensor division rounds once; ``float / tensor`` would run as reciprocal() * float (twice).
    q = torch.div(torch.full_like(upper_s, mantissa), upper_s)
    shift = (exp_a - e).clamp(-1100, 1023)  # below -1100 the result is 0 either way
    big = shift.clamp(min=-1022)
    k = (q * _pow2(shift - big)) * _pow2(big)  # first factor is exact (q 2^[-78, 0] stays normal)
    return toward_zero_if_subnormal_tensor(k)


# --------------------------------------------------------------------------------------------------
# Step 5: the product.


def scale_gradient(grad: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    r"""The clipped value, out of place: :math:`y = \mathrm{round}_d(\mathrm{float64}(g)\,k)`.

    ``round_d`` is torch's cast from float64 to ``grad.dtype`` (for float16 / bfloat16 it rounds through
    float32; the module *Proof*, step 5, accounts for it). This is the one definition of the clipped value:
    fast paths are tested against it.

    Args:
        grad: a dense gradient, float16 / bfloat16 / float32 / float64.
        k: 0-d float64 coefficient from :func:`clip_coefficient` (moved to ``grad.device`` if needed).

    Returns:
        A new tensor of ``grad``'s dtype, shape and device.

    Guarantees:
        With ``k == 1.0`` the result is bit-for-bit ``grad``. Otherwise
        ``|y_i| <= |g_i| k (1 + u)(1 + u_d)(1 + 2^-24) + 0.51 eta_d``, and ``y_i`` has the sign of ``g_i`` or
        is zero.
    """
    if k.dtype != torch.float64:
        raise TypeError(f"k has dtype {k.dtype}; expected the 0-d float64 tensor from clip_coefficient")
    return (grad.to(torch.float64) * k.to(grad.device)).to(grad.dtype)


def clip_grads_(grads: Iterable[torch.Tensor], k: torch.Tensor, *, names: Sequence[str] | None = None) -> None:
    """Write :func:`scale_gradient` ``(g, k)`` into each ``g`` in place. No host-device synchronisation.

    Every gradient is checked writable first (:func:`check_writable`), so an error leaves all of them as they
    were, never some clipped and some not. Contiguous gradients are processed ``CHUNK`` elements at a time
    (the values are the same: the map is elementwise).
    """
    grads = list(grads)
    check_writable(zip(names or [f"grads[{i}]" for i in range(len(grads))], grads, strict=True))
    for grad in grads:
        pieces = grad.view(-1).split(CHUNK) if grad.is_contiguous() else [grad]
        for piece in pieces:
            piece.copy_(scale_gradient(piece, k))


# --------------------------------------------------------------------------------------------------
# The drop-in for torch.nn.utils.clip_grad_norm_.


def _named_gradients(
    parameters: torch.Tensor | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    names: Sequence[str] | None,
) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """``(number of parameters, [(name, grad)])`` for the parameters whose ``.grad`` is not None."""
    items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    pairs = [isinstance(item, tuple) for item in items]
    if any(pairs):
        if not all(pairs) or names is not None:
            raise TypeError(
                "parameters mixes (name, tensor) pairs with other items or with names=; pass either "
                "model.named_parameters(), or tensors with an optional names= list"
            )
        names, items = [name for name, _ in items], [param for _, param in items]
    elif names is None:
        names = [f"parameters[{i}]" for i in range(len(items))]
    elif len(names) != len(items):
        raise ValueError(f"names has {len(names)} entries for {len(items)} parameters; pass one per parameter")
    named = [(name, p.grad) for name, p in zip(names, items, strict=True) if p.grad is not None]
    for name, grad in named:
        _check_gradient(grad, f"the gradient of {name!r}")
    return len(items), named


def check_writable(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` naming the first gradient that cannot be written in place.

    An expanded gradient (several elements sharing one memory location, e.g. from ``expand``) or an
    inference-mode tensor outside inference mode would make an in-place clip fail half-way.
    """
    inference_mode = torch.is_inference_mode_enabled()
    for name, grad in named:
        if torch._debug_has_internal_overlap(grad) == 1:  # 1: overlapping; 0 or 2 (cannot tell): copy_ accepts
            raise ValueError(
                f"the gradient of {name!r} has elements that share memory (an expanded tensor, strides "
                f"{tuple(grad.stride())}), so it cannot be clipped in place; no gradient was changed. Make it "
                "a real tensor first, e.g. p.grad = p.grad.clone()"
            )
        if grad.is_inference() and not inference_mode:
            raise ValueError(
                f"the gradient of {name!r} is an inference tensor, which cannot be changed outside "
                "torch.inference_mode(); no gradient was changed. Compute gradients outside inference mode"
            )


_SUBNORMAL_PROBE = 2.0**-1073  # a module variable: the product below runs at call time, under the current mode


def flush_to_zero_enabled() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormals to zero (``torch.set_flush_denormal(True)``).

    The flag is per-thread CPU state (x86 MXCSR FTZ/DAZ, which torch also sets on its worker threads) and
    also governs Python's float arithmetic, so one subnormal product tells (about 50 ns).
    """
    return _SUBNORMAL_PROBE * 1.5 == 0.0


def check_gradual_underflow(devices: Iterable[torch.device]) -> None:
    """Refuse to clip on CPU while subnormals are flushed to zero: the *Proof* assumes gradual underflow.

    Under flush-to-zero, float32 gradients ``[1e-39, 1e-39]`` sum to 0 and escape a clip value of
    ``1e-40`` (their stored norm is 14x it). CUDA kernels do not flush (torch builds them without
    fast-math), so only CPU gradients are refused.

    Raises:
        ContractViolation: ``grad_norm <= clip_value``, naming the setting and the fix.
    """
    if any(device.type == "cpu" for device in devices) and flush_to_zero_enabled():
        raise ContractViolation(
            EQUATION,
            "grad_norm <= clip_value",
            kind="postcondition",
            observed={"flush_denormal": True},
            hint=(
                "subnormal numbers are flushed to zero on this thread (torch.set_flush_denormal(True)), and the "
                "clip's bound is proven for IEEE gradual underflow: tiny gradients would escape the clip. Call "
                "torch.set_flush_denormal(False) before training; nothing was changed"
            ),
        )


def first_nonfinite_gradient(
    named: Iterable[tuple[str, torch.Tensor]],
) -> tuple[str, torch.Tensor, int, int] | None:
    """``(name, grad, nans, infs)`` of the first gradient holding a NaN or Inf, or None when all are finite.

    An error-path helper: it reads one flag per gradient to the host until it finds the offender.
    """
    for name, grad in named:
        if not bool(torch.isfinite(grad).all()):
            return name, grad, int(torch.isnan(grad).sum()), int(torch.isinf(grad).sum())
    return None


def _raise_first_nonfinite(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Raise the ``is_finite`` violation naming the first parameter with a NaN/Inf gradient (error path)."""
    name, grad, nans, infs = first_nonfinite_gradient(named) or (*named[0], 0, 0)
    raise ContractViolation(
        EQUATION,
        CLAUSE_FINITE,
        kind="precondition",
        observed={"parameter": name, "nonfinite": nans + infs, "nan": nans, "inf": infs},
        hint=(
            f"the gradient of {name!r} holds {nans + infs} non-finite values ({nans} NaN, {infs} Inf) "
            f"out of {grad.numel()}; no gradient was changed. Look for an overflowing loss or "
            "activation in that layer, lower the learning rate, or skip the step explicitly"
        ),
    )


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    r"""Clip the gradients' global 2-norm to ``max_norm`` in place, with the bound proven on stored values.

    A drop-in for ``torch.nn.utils.clip_grad_norm_`` (see the module docstring for what differs):

    .. math:: g \leftarrow \mathrm{round}_d(g\,k),\qquad \|g\|_2 \le \text{max\_norm afterwards}

    Args:
        parameters: a tensor, an iterable of tensors, or ``(name, tensor)`` pairs such as
            ``model.named_parameters()``; their ``.grad`` is clipped, those with ``grad is None`` ignored.
        max_norm: the clip value, in ``(0, inf]``. ``math.inf`` measures the norm and never clips (it
            satisfies ``clip_value > 0.0`` and the bound trivially).
        norm_type: accepted for drop-in compatibility; only 2 is supported.
        names: one name per parameter for error messages (default ``parameters[i]``).

    Returns:
        The total norm *before* clipping: a 0-d **float64** tensor on the first gradient's device (float64 so
        it stays finite where torch's float32 norm overflows).

    Raises:
        ContractViolation: a ``gradient_norm`` precondition, checked before any gradient is touched:
            ``clip_value > 0.0`` (``max_norm`` not a real number > 0), ``!gradients.is_empty()`` (no
            parameter has a gradient), ``gradients.iter().all(|g| g.is_finite())`` (names the first
            parameter with a NaN/Inf gradient and counts them).
        TypeError: sparse gradients or an unsupported dtype.

    Guarantees:
        Those of the module docstring: ``||g|| <= max_norm`` afterwards, bit-for-bit unchanged when
        ``N_up <= max_norm``, not over-clipped, direction kept. This reads two flags to the host in one
        transfer (finite? clipped?), as torch's ``error_if_nonfinite`` does; use
        :func:`scaled_sum_of_squares`, :func:`clip_coefficient` and :func:`clip_grads_` for a sync-free path.
    """
    max_norm = _check_max_norm(max_norm)
    if norm_type != 2:
        raise ValueError(f"norm_type={norm_type!r}; provetrain bounds the Euclidean norm only: pass 2.0")
    count, named = _named_gradients(parameters, names)
    check_gradual_underflow({grad.device for _, grad in named})
    if not named:
        raise ContractViolation(
            EQUATION,
            CLAUSE_NOT_EMPTY,
            kind="precondition",
            observed={"parameters": count, "with_grad": 0},
            hint="no parameter has a gradient: call loss.backward() first and check requires_grad",
        )
    grads = [grad for _, grad in named]
    sum_sq, exponent = scaled_sum_of_squares(grads)
    total_norm, k = clip_coefficient(
        sum_sq,
        max_norm,
        numel=sum(g.numel() for g in grads),
        dtypes={g.dtype for g in grads},
        exponent=exponent,
    )
    # The one host read: sum_sq is finite iff every gradient is (scaled_sum_of_squares' guarantee).
    finite, clip = torch.stack([torch.isfinite(sum_sq), k != 1.0]).tolist()
    if not finite:
        _raise_first_nonfinite(named)
    if clip:
        clip_grads_(grads, k, names=[name for name, _ in named])
    return total_norm
