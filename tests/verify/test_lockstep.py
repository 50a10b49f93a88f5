"""Lockstep of every path with the specification, over every dtype and thousands of elements.

The specification is written out here, not read from the code: the norm comes from an exact integer square
root of the exact sum of squares (the code uses torch's or Python's float64 sqrt), and the numerator
``A = c (1 - 4 u_d) - eta_d (isqrt(n) + 1)`` from its formula. Each run must keep the exact bound, leave the
gradient unchanged where the norm is clearly below the clip value, and scale by a ``k`` (or ``1 / D``) with
``k N <= A (1 + u)^2`` and not below ``A (1 - u)^2 / (1 + 1.51 (n + 5 + x) u)`` (less ``2^-22`` for ``1 / D``).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from provetrain.ops.clip import clip_coefficient, clip_coefficient_on_host, clip_grad_norm_, scaled_sum_of_squares
from provetrain.ops.multi_tensor import EXTRA_ROUNDINGS
from tests.ops.test_multi_tensor import clip_through_kernel, divisor_of

U = Fraction(1, 2**53)
UNIT = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}
SUBNORMAL = {torch.float16: 2**-24, torch.bfloat16: 2**-133, torch.float32: 2**-149, torch.float64: 2**-1074}
EXPONENTS = {
    torch.float16: (-20, 12),
    torch.bfloat16: (-120, 100),
    torch.float32: (-120, 100),
    torch.float64: (-900, 900),
}
DTYPE_LISTS = [[torch.float16], [torch.bfloat16], [torch.float32], [torch.float64], list(EXPONENTS)]
RATIOS = [0.3, 1 - 2.0**-20, 1 - 2.0**-40, 1 + 2.0**-40, 2.0]


def gradients(dtypes: list[torch.dtype], n: int, seed: int) -> list[torch.Tensor]:
    """``n`` elements in three tensors per dtype, magnitudes spread over the dtype's range."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for dtype in dtypes:
        low, high = EXPONENTS[dtype]
        for size in (n // (3 * len(dtypes)), n // (2 * len(dtypes)), 7):
            exponents = torch.randint(low, high, (size,), generator=generator).double()
            values = torch.randn(size, generator=generator, dtype=torch.float64) * 2.0**exponents
            finite = float(torch.finfo(dtype).max)
            out.append(values.clamp(-finite, finite).to(dtype))
    return out


def exact_sum(tensors: list[torch.Tensor]) -> Fraction:
    return sum((Fraction(x) ** 2 for t in tensors for x in t.double().reshape(-1).tolist()), Fraction(0))


def norm_bracket(square: Fraction) -> tuple[Fraction, Fraction]:
    """``(lo, hi)`` with ``lo <= sqrt(square) <= hi`` and ``hi - lo <= 2^-80 hi``: integer square roots."""
    p, q = square.numerator, square.denominator
    shift = max(0, 80 - (p * q).bit_length() // 2 + 80)
    root = math.isqrt(p * q * 4**shift)
    scale = q * 2**shift
    return Fraction(root, scale), Fraction(root + 1, scale)


def numerator(max_norm: float, n: int, dtypes: set[torch.dtype]) -> Fraction:
    u_d, eta_d = max(Fraction(UNIT[d]) for d in dtypes), max(Fraction(SUBNORMAL[d]) for d in dtypes)
    return Fraction(max_norm) * (1 - 4 * u_d) - eta_d * (math.isqrt(n) + 1)


def check_factor(factor: Fraction, square: Fraction, max_norm: float, n: int, dtypes: set, extra: int) -> None:
    """``factor`` (``k``, or ``1 / D``) against the specification, with the exact norm bracketed.

    The multi-tensor divisor is a float32 rounded up from ``1 / k``: ``1 / D >= k (1 - 2^-22)``.
    """
    lo, hi = norm_bracket(square)
    if factor == 1:
        assert square <= Fraction(max_norm) ** 2
        return
    assert (1 + Fraction(151, 100) * (n + 5 + extra) * U) * lo > max_norm  # it clips only when it must
    a = numerator(max_norm, n, dtypes)
    if a <= 0:
        assert factor == 0
        return
    assert factor * lo <= a * (1 + U) ** 2
    if factor >= Fraction(2) ** -1022:
        slack = (1 - 2 * U) * (1 - Fraction(1, 2**22) if extra else 1)
        assert factor * hi >= a * (1 - U) ** 2 / (1 + Fraction(151, 100) * (n + 5 + extra) * U) * slack


@pytest.mark.parametrize("n", [1_000, 5_000])
@pytest.mark.parametrize("dtypes", DTYPE_LISTS, ids=lambda ds: "+".join(str(d)[6:] for d in ds))
def test_reference_device_and_host_coefficients_and_stored_values(dtypes: list[torch.dtype], n: int) -> None:
    grads = gradients(dtypes, n, seed=n + len(dtypes))
    square, numel, kinds = exact_sum(grads), sum(g.numel() for g in grads), {g.dtype for g in grads}
    s, e = scaled_sum_of_squares(grads)
    for ratio in RATIOS:
        max_norm = float(norm_bracket(square)[0]) * ratio
        _, k = clip_coefficient(s, max_norm, numel=numel, dtypes=kinds, exponent=e)
        _, k_host = clip_coefficient_on_host(s.item(), max_norm, numel=numel, dtypes=kinds, exponent=int(e))
        for factor in (Fraction(k.item()), Fraction(k_host)):
            check_factor(factor, square, max_norm, numel, kinds, 0)
        params = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        clip_grad_norm_(params, max_norm)
        stored = [p.grad for p in params]
        assert all(torch.isfinite(t).all() for t in stored)
        assert exact_sum(stored) <= Fraction(max_norm) ** 2
        if k.item() == 1.0:
            assert all(torch.equal(a, b) for a, b in zip(stored, grads, strict=True))


@pytest.mark.parametrize("n", [1_000, 5_000])
@pytest.mark.parametrize("dtypes", DTYPE_LISTS, ids=lambda ds: "+".join(str(d)[6:] for d in ds))
def test_multi_tensor_divisor_and_kernel_outputs(dtypes: list[torch.dtype], n: int) -> None:
    grads = gradients(dtypes, n, seed=7 * n + len(dtypes))
    square, numel, kinds = exact_sum(grads), sum(g.numel() for g in grads), {g.dtype for g in grads}
    for ratio in RATIOS:
        max_norm = float(norm_bracket(square)[0]) * ratio
        for on_host in (False, True):
            divisor = Fraction(divisor_of(grads, max_norm, on_host=on_host).item())
            factor = 1 / divisor if divisor != math.inf else Fraction(0)
            check_factor(factor, square, max_norm, numel, kinds, EXTRA_ROUNDINGS)
            clipped, _ = clip_through_kernel(grads, max_norm, on_host=on_host)
            assert all(torch.isfinite(t).all() for t in clipped)
            assert exact_sum(clipped) <= Fraction(max_norm) ** 2
