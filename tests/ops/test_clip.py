"""Tests for provetrain.ops.clip: every Guarantee of the module docstring, checked exactly.

Norms of stored values are computed exactly: each stored float is a dyadic rational, so the squared norm is
an exact ``Fraction`` and is compared with ``max_norm ** 2`` as rationals (no rounding anywhere).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provetrain.errors import ContractViolation
from provetrain.ops.adam import Adam
from provetrain.ops.clip import (
    SMALLEST_SUBNORMAL,
    UNIT_ROUNDOFF,
    clip_coefficient,
    clip_grad_norm_,
    clip_grads_,
    global_sum_of_squares,
    scale_gradient,
    scaled_sum_of_squares,
)

U = Fraction(1, 2**53)
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LOW_PRECISION = [torch.float16, torch.bfloat16, torch.float32]
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
INT_VIEW[torch.float64] = torch.int64
BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
MAX_EXP = {torch.float16: 15, torch.bfloat16: 127, torch.float32: 127, torch.float64: 1023}

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------------------------------
# Exact arithmetic on stored values.


def values(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Every element as a Python float (exact: all supported dtypes embed in float64)."""
    return [v for t in tensors for v in t.detach().double().reshape(-1).tolist()]


def exact_sum_sq(tensors: Sequence[torch.Tensor]) -> Fraction:
    """The exact squared 2-norm of the stored values."""
    ratios = [v.as_integer_ratio() for v in values(tensors)]
    if not ratios:
        return Fraction(0)
    den = max(d for _, d in ratios)  # powers of two: each divides the largest
    return Fraction(sum(n * n * (den // d) ** 2 for n, d in ratios), den * den)


def approx_sqrt(s: Fraction) -> float:
    """sqrt(s) to a few ulps, inf on overflow: only used to pick thresholds near the norm."""
    if s == 0:
        return 0.0
    shift = (s.numerator.bit_length() - s.denominator.bit_length()) // 2
    try:
        return math.ldexp(math.sqrt(float(s / Fraction(4) ** shift)), shift)
    except OverflowError:
        return math.inf


def bits(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().view(INT_VIEW[t.dtype]) for t in tensors]


def same_bits(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(bits(a), bits(b), strict=True))


def params_with(grads: Sequence[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def grads_of(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params]


def constants(grads: Sequence[torch.Tensor]) -> tuple[Fraction, Fraction, int]:
    dtypes = {g.dtype for g in grads}
    return (
        max(UNIT_ROUNDOFF[d] for d in dtypes),
        max(SMALLEST_SUBNORMAL[d] for d in dtypes),
        sum(g.numel() for g in grads),
    )


def coefficient(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    s, e = scaled_sum_of_squares(grads)
    _, k = clip_coefficient(
        s, max_norm, numel=sum(g.numel() for g in grads), dtypes={g.dtype for g in grads}, exponent=e
    )
    return k.item()


# --------------------------------------------------------------------------------------------------
# Strategies: bit patterns cover every exponent (subnormals, the largest finite values); scaled uniform
# values cover gradients of similar magnitude.


@st.composite
def tensors(draw: st.DrawFn, dtype: torch.dtype, max_len: int = 12) -> torch.Tensor:
    n = draw(st.integers(0, max_len))
    if draw(st.booleans()):
        half = 2 ** (BITS[dtype] - 1)
        raw = draw(st.lists(st.integers(-half, half - 1), min_size=n, max_size=n))
        t = torch.tensor(raw, dtype=INT_VIEW[dtype]).view(dtype)
    else:
        scale = draw(st.integers(-MAX_EXP[dtype] - 20, MAX_EXP[dtype] - 1))
        raw = draw(st.lists(st.floats(-1.0, 1.0), min_size=n, max_size=n))
        t = (torch.tensor(raw, dtype=torch.float64) * 2.0**scale).to(dtype)
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


@st.composite
def gradient_lists(draw: st.DrawFn, dtypes: Sequence[torch.dtype] = tuple(DTYPES)) -> list[torch.Tensor]:
    count = draw(st.integers(1, 3))
    return [draw(tensors(draw(st.sampled_from(dtypes)))) for _ in range(count)]


@st.composite
def thresholds(draw: st.DrawFn, grads: Sequence[torch.Tensor]) -> float:
    """A max_norm: anywhere in (0, max], or near the norm (just below, at, just above, a factor away)."""
    norm = approx_sqrt(exact_sum_sq(grads))
    if norm == 0.0 or not math.isfinite(norm) or draw(st.booleans()):
        return draw(st.floats(5e-324, 1.7e308))
    near = draw(st.sampled_from([norm, math.nextafter(norm, 0), math.nextafter(norm, math.inf)]))
    factor = draw(st.sampled_from([1.0, 1.0, 0.5, 2.0**-20, 0.999, 1.001, 1e-3, 3.0]))
    candidate = near * factor
    return candidate if 0.0 < candidate < math.inf else near


# --------------------------------------------------------------------------------------------------
# The contract: the bound on stored values.


@pytest.mark.contract("FALSIFY-TRAIN-001")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magnitude", [1e3, 1e30, 3e38])
def test_inject_large_gradients_verify_clipped(dtype: torch.dtype, magnitude: float) -> None:
    """FALSIFY-TRAIN-001: inject large gradients into a model, clip, and check ||g|| <= clip_value exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)
    model(torch.randn(5, 8, dtype=dtype)).square().sum().backward()
    finfo_max = torch.finfo(dtype).max
    for p in model.parameters():
        p.grad.mul_(min(magnitude, finfo_max) / p.grad.abs().max().clamp(min=1e-3))
        p.grad.nan_to_num_(posinf=finfo_max, neginf=-finfo_max)
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm_(model.parameters(), 1.0)
    after = grads_of(list(model.parameters()))
    assert exact_sum_sq(after) <= 1
    assert all(torch.isfinite(g).all() for g in after)
    assert norm.dtype == torch.float64 and math.isfinite(norm.item())
    assert exact_sum_sq(after) >= not_over_clipped_floor(after, 1.0) ** 2
    assert all(((torch.sign(a) == torch.sign(b)) | (a == 0)).all() for a, b in zip(after, before, strict=True))


@PROPERTY
@given(data=st.data(), grads=gradient_lists())
def test_bound_holds_for_every_finite_input(data: st.DataObject, grads: list[torch.Tensor]) -> None:
    max_norm = data.draw(thresholds(grads))
    params = params_with(grads)
    clip_grad_norm_(params, max_norm)
    after = grads_of(params)
    assert exact_sum_sq(after) <= Fraction(max_norm) ** 2
    assert all(torch.isfinite(g).all() for g in after)


@pytest.mark.parametrize(
    ("dtype", "grad", "max_norm"),
    [
        (torch.float32, [3e38, 3e38, 1.0, 1.0], 1.0),
        (torch.float32, [3.4e38, -3.4e38, 3.4e38, 1e-45], 1e-30),
        (torch.float32, [1e-45, 2e-45, -1e-45], 1e-45),
        (torch.float32, [1e-45, 2e-45, -1e-45], 1e-300),
        (torch.float32, [1e-40] * 7, 5e-324),
        (torch.float16, [65504.0, 65504.0, 6e-8], 1.0),
        (torch.float16, [6e-8, 6e-8], 6e-8),
        (torch.bfloat16, [3.38e38, 3.38e38], 1e-38),
        (torch.bfloat16, [1e-40, -1e-40], 1e-40),
        (torch.float64, [1.7e308, 1.7e308, 1.0], 1.0),
        (torch.float64, [1.7e308, 1.7e308], 1e-300),
        (torch.float64, [5e-324, 1e-323], 5e-324),
        (torch.float64, [1e-310, 3e-310], 1e-320),
    ],
)
def test_bound_holds_at_the_extremes(dtype: torch.dtype, grad: list[float], max_norm: float) -> None:
    params = params_with([torch.tensor(grad, dtype=dtype)])
    clip_grad_norm_(params, max_norm)
    assert exact_sum_sq(grads_of(params)) <= Fraction(max_norm) ** 2


def test_overflowing_float32_norm_keeps_direction() -> None:
    """torch zeroes [3e38, 3e38, 1, 1] (its float32 norm is inf); here the norm is finite and the ratios kept."""
    (p,) = params_with([torch.tensor([3e38, 3e38, 1.0, 1.0])])
    norm = clip_grad_norm_(p, 1.0)
    stored = torch.tensor(3e38).item()
    assert norm.item() == pytest.approx(math.sqrt(2) * stored, rel=1e-15)
    assert p.grad[0] == p.grad[1] and p.grad[2] == p.grad[3]
    assert p.grad[0].item() == pytest.approx(math.sqrt(0.5), rel=1e-6)
    assert p.grad[2].item() > 0.0  # 1 * k = 2.36e-39 is a float32 subnormal, not 0
    assert exact_sum_sq([p.grad]) <= 1


def test_float64_norm_beyond_float64_range_is_inf_but_clips_correctly() -> None:
    (p,) = params_with([torch.tensor([1.5e308, 1.5e308, 1.0], dtype=torch.float64)])
    norm = clip_grad_norm_(p, 1.0)
    assert norm.item() == math.inf
    assert p.grad[0].item() == pytest.approx(math.sqrt(0.5), rel=1e-14)
    assert p.grad[2].item() > 0.0
    assert exact_sum_sq([p.grad]) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [-1, 0, 1])
def test_exact_boundary(dtype: torch.dtype, step: int) -> None:
    """Norm exactly max_norm (3-4-5), and max_norm one ulp either side: clipped, and the bound holds."""
    max_norm = math.nextafter(5.0, math.inf * step) if step else 5.0
    (p,) = params_with([torch.tensor([3.0, 4.0], dtype=dtype)])
    clip_grad_norm_(p, max_norm)
    assert exact_sum_sq([p.grad]) <= Fraction(max_norm) ** 2
    assert not torch.equal(p.grad, torch.tensor([3.0, 4.0], dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sweep_of_thresholds_on_long_gradients(dtype: torch.dtype) -> None:
    """optax-style sweep: long random gradients (crossing the float64 conversion chunks) x 12 thresholds."""
    generator = torch.Generator().manual_seed(3)
    grads = [
        (torch.randn(70_000, generator=generator) * 1e3).to(dtype),
        (torch.rand(3, 1000, generator=generator) - 0.5).to(dtype).t(),  # non-contiguous
        torch.randn(1, generator=generator).to(dtype),
    ]
    norm = approx_sqrt(exact_sum_sq(grads))
    for factor in [2.0**-60, 1e-9, 1e-3, 0.1, 0.5, 0.9, 0.999, 0.999999, 1.0, 1.000001, 1.5, 10.0]:
        max_norm = norm * factor
        params = params_with(grads)
        clip_grad_norm_(params, max_norm)
        after = exact_sum_sq(grads_of(params))
        assert after <= Fraction(max_norm) ** 2
        floor = not_over_clipped_floor(grads, max_norm)
        assert factor >= 1 or floor <= 0 or after >= floor**2
        if factor >= 1.5:
            assert same_bits(grads_of(params), grads)


# --------------------------------------------------------------------------------------------------
# The other guarantees.


def not_over_clipped_floor(grads: Sequence[torch.Tensor], max_norm: float) -> Fraction:
    """max_norm (1 - 5.01 u_d - 2 (n + 7) u) - 1.6 (sqrt(n) + 1) eta_d, with sqrt(n) rounded up."""
    u_d, eta_d, n = constants(grads)
    relative = 1 - Fraction(501, 100) * u_d - 2 * (n + 7) * U
    return Fraction(max_norm) * relative - Fraction(16, 10) * (math.isqrt(n) + 2) * eta_d


@PROPERTY
@given(data=st.data(), grads=gradient_lists())
def test_not_over_clipped(data: st.DataObject, grads: list[torch.Tensor]) -> None:
    max_norm = data.draw(thresholds(grads))
    before = exact_sum_sq(grads)
    k = coefficient(grads, max_norm)
    params = params_with(grads)
    clip_grad_norm_(params, max_norm)
    after = exact_sum_sq(grads_of(params))
    if before > Fraction(max_norm) ** 2 and k >= 2.0**-1022:
        floor = not_over_clipped_floor(grads, max_norm)
        assert floor <= 0 or after >= floor**2
        u_d, eta_d, n = constants(grads)
        if UNIT_ROUNDOFF[torch.float64] < u_d and Fraction(max_norm) * u_d >= 2**10 * (math.isqrt(n) + 2) * eta_d:
            assert after >= (Fraction(max_norm) * (1 - 8 * u_d)) ** 2


@PROPERTY
@given(grads=gradient_lists(), slack=st.sampled_from([0, 1, 2**-20, 1.0]))
def test_untouched_below_the_threshold(grads: list[torch.Tensor], slack: float) -> None:
    """N (1 + 1.51 (n + 5) u) <= max_norm (slack 0) and N <= max_norm / 2 (slack 1) leave bits unchanged."""
    s = exact_sum_sq(grads)
    _, _, n = constants(grads)
    factor = (1 + Fraction(151, 100) * (n + 5) * U) * (1 + Fraction(slack))
    max_norm = approx_sqrt(s * factor**2) or 1.0
    while math.isfinite(max_norm) and Fraction(max_norm) ** 2 < s * factor**2:
        max_norm = math.nextafter(max_norm, math.inf)
    params = params_with(grads)
    clip_grad_norm_(params, max_norm)
    assert same_bits(grads_of(params), grads)


@PROPERTY
@given(data=st.data(), grads=gradient_lists(LOW_PRECISION))
def test_clipping_twice_changes_nothing_the_second_time(data: st.DataObject, grads: list[torch.Tensor]) -> None:
    max_norm = data.draw(thresholds(grads))
    params = params_with(grads)
    clip_grad_norm_(params, max_norm)
    once = [g.clone() for g in grads_of(params)]
    clip_grad_norm_(params, max_norm)
    assert same_bits(grads_of(params), once)


@PROPERTY
@given(data=st.data(), grads=gradient_lists())
def test_direction_is_kept(data: st.DataObject, grads: list[torch.Tensor]) -> None:
    """y_i = round_d(g_i k): same sign or zero, zeros stay zero, |y_i - g_i k| within the rounding bound."""
    max_norm = data.draw(thresholds(grads))
    k = coefficient(grads, max_norm)
    assert k == 1.0 or 0.0 <= k < 1.0
    params = params_with(grads)
    clip_grad_norm_(params, max_norm)
    for g, y in zip(grads, grads_of(params), strict=True):
        u_d, eta_d = UNIT_ROUNDOFF[g.dtype], SMALLEST_SUBNORMAL[g.dtype]
        for gi, yi in zip(values([g]), values([y]), strict=True):
            assert yi == 0.0 or math.copysign(1, yi) == math.copysign(1, gi)
            assert gi != 0.0 or yi == 0.0
            error = abs(Fraction(yi) - Fraction(gi) * Fraction(k))
            assert error <= abs(Fraction(gi) * Fraction(k)) * (U + u_d + Fraction(1, 2**24) + 4 * u_d * u_d) + eta_d


@PROPERTY
@given(grads=gradient_lists())
def test_returned_norm_is_accurate(grads: list[torch.Tensor]) -> None:
    """|N_hat - N| <= 0.51 (n + 4) u N; finite for float16 / bfloat16 / float32."""
    s = exact_sum_sq(grads)
    _, _, n = constants(grads)
    norm = clip_grad_norm_(params_with(grads), math.inf)
    assert norm.dtype == torch.float64
    has_float64 = any(g.dtype == torch.float64 for g in grads)
    if not has_float64:
        assert math.isfinite(norm.item())
    if math.isfinite(norm.item()) and (norm.item() >= 2.0**-1022 or not has_float64):
        r = Fraction(51, 100) * (n + 4) * U
        assert s * (1 - r) ** 2 <= Fraction(norm.item()) ** 2 <= s * (1 + r) ** 2


@PROPERTY
@given(grads=gradient_lists())
def test_sum_of_squares_within_gamma(grads: list[torch.Tensor]) -> None:
    s = exact_sum_sq(grads)
    _, _, n = constants(grads)
    got = global_sum_of_squares(grads)
    assert got.dtype == torch.float64 and got.shape == ()
    if all(g.dtype != torch.float64 for g in grads):
        gamma = (n - 1) * U / (1 - (n - 1) * U) if n > 1 else Fraction(0)
        assert abs(Fraction(got.item()) - s) <= gamma * s


def test_sum_of_squares_is_exact_for_small_integers() -> None:
    grads = [
        torch.tensor([3.0, -4.0]),
        torch.tensor([[12.0]], dtype=torch.bfloat16),
        torch.tensor([], dtype=torch.float16),
    ]
    assert global_sum_of_squares(grads).item() == 169.0
    s, e = scaled_sum_of_squares([torch.tensor([3.0, -4.0], dtype=torch.float64)])
    assert (s.item(), e.item()) == (25 / 64, 3)


# --------------------------------------------------------------------------------------------------
# The building blocks.


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_gradient_by_one_is_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.tensor([0.0, -0.0, 1.0, -3.5, 1e-45, 6e-8, 65504.0], dtype=torch.float64).to(dtype)
    g = torch.cat([g, torch.tensor([torch.finfo(dtype).max, torch.finfo(dtype).tiny], dtype=dtype)])
    y = scale_gradient(g, torch.tensor(1.0, dtype=torch.float64))
    assert y.dtype == dtype and y is not g
    assert same_bits([y], [g])


def test_scale_gradient_rejects_a_float32_coefficient() -> None:
    with pytest.raises(TypeError, match=re.escape("expected the 0-d float64 tensor from clip_coefficient")):
        scale_gradient(torch.ones(2), torch.tensor(0.5))


def test_clip_grads_matches_clip_grad_norm() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(50) * 10, torch.randn(3, 4, dtype=torch.float64), torch.randn(7).to(torch.bfloat16)]
    params = params_with(grads)
    clip_grad_norm_(params, 0.5)
    copies = [g.clone() for g in grads]
    s, e = scaled_sum_of_squares(copies)
    _, k = clip_coefficient(s, 0.5, numel=sum(g.numel() for g in copies), dtypes={g.dtype for g in copies}, exponent=e)
    clip_grads_(copies, k)
    assert same_bits(copies, grads_of(params))


@pytest.mark.parametrize(
    ("sum_sq", "max_norm", "norm", "k"),
    [
        (25.0, math.inf, 5.0, 1.0),
        (25.0, 10.0, 5.0, 1.0),
        (0.0, 1e-300, 0.0, 1.0),
        (math.nan, 1.0, math.nan, math.nan),
        (math.nan, math.inf, math.nan, math.nan),
        (math.inf, 1.0, math.inf, 0.0),
    ],
)
def test_clip_coefficient_table(sum_sq: float, max_norm: float, norm: float, k: float) -> None:
    got_norm, got_k = clip_coefficient(
        torch.tensor(sum_sq, dtype=torch.float64), max_norm, numel=2, dtypes={torch.float32}
    )
    assert got_norm.dtype == got_k.dtype == torch.float64
    torch.testing.assert_close(got_norm.item(), norm, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(got_k.item(), k, equal_nan=True, rtol=0, atol=0)


def test_clip_coefficient_when_clipping() -> None:
    norm, k = clip_coefficient(torch.tensor(25.0, dtype=torch.float64), 1.0, numel=2, dtypes={torch.float32})
    assert norm.item() == 5.0
    assert 0.2 * (1 - 5 * 2**-24) < k.item() < 0.2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"numel": -1}, ValueError, "numel=-1; expected an int in [0, 2**40)"),
        ({"numel": 2**40}, ValueError, "expected an int in [0, 2**40)"),
        ({"dtypes": set()}, ValueError, "dtypes is empty"),
        ({"dtypes": {torch.int32}}, TypeError, "supported gradient dtypes are float16"),
    ],
)
def test_clip_coefficient_rejects_bad_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    arguments = {"numel": 2, "dtypes": {torch.float32}} | kwargs
    with pytest.raises(error, match=re.escape(message)):
        clip_coefficient(torch.tensor(1.0, dtype=torch.float64), 1.0, **arguments)


# --------------------------------------------------------------------------------------------------
# Preconditions: a table of (input, clause), each leaving every gradient untouched.

CLAUSE_CASES = [
    (
        "nan gradient",
        [[1.0, math.nan, math.nan]],
        1.0,
        "gradients.iter().all(|g| g.is_finite())",
        "2 non-finite values (2 NaN, 0 Inf)",
    ),
    (
        "+inf gradient",
        [[1.0, math.inf]],
        1.0,
        "gradients.iter().all(|g| g.is_finite())",
        "1 non-finite values (0 NaN, 1 Inf)",
    ),
    (
        "-inf gradient",
        [[-math.inf, 2.0]],
        1.0,
        "gradients.iter().all(|g| g.is_finite())",
        "1 non-finite values (0 NaN, 1 Inf)",
    ),
    ("max_norm 0", [[1.0]], 0.0, "clip_value > 0.0", "max_norm must be > 0"),
    ("max_norm -1", [[1.0]], -1.0, "clip_value > 0.0", "would reverse every gradient"),
    ("max_norm nan", [[1.0]], math.nan, "clip_value > 0.0", "max_norm=nan"),
    ("max_norm bool", [[1.0]], True, "clip_value > 0.0", "must be a real number > 0"),
    ("max_norm str", [[1.0]], "1.0", "clip_value > 0.0", "must be a real number > 0"),
    ("no gradients", [], 1.0, "!gradients.is_empty()", "call loss.backward() first"),
]


@pytest.mark.parametrize(
    ("case", "grads", "max_norm", "clause", "message"), CLAUSE_CASES, ids=[c[0] for c in CLAUSE_CASES]
)
def test_precondition_violations(
    case: str, grads: list[list[float]], max_norm: object, clause: str, message: str
) -> None:
    encoder, head = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(len(grads[0]) if grads else 2))
    if grads:
        encoder.grad, head.grad = torch.tensor([0.5, -7.0, 2.0]), torch.tensor(grads[0])
    named = [("encoder.weight", encoder), ("head.bias", head)]
    before = [p.grad.clone() if p.grad is not None else None for _, p in named]
    with pytest.raises(ContractViolation, match=re.escape(message)) as raised:
        clip_grad_norm_(named, max_norm)
    violation = raised.value
    assert (violation.equation, violation.clause, violation.kind) == ("gradient_norm", clause, "precondition")
    assert f"`{clause}` violated" in str(violation)
    if "gradient" in case and grads:
        assert violation.observed["parameter"] == "head.bias"
        assert "'head.bias'" in str(violation)
    for b, (_, p) in zip(before, named, strict=True):
        assert (b is None and p.grad is None) or same_bits([p.grad], [b])


def test_names_keyword_names_the_offender() -> None:
    params = params_with([torch.ones(2), torch.tensor([1.0, math.nan])])
    with pytest.raises(ContractViolation, match=re.escape("parameter='blocks.1.mlp'")):
        clip_grad_norm_(params, 1.0, names=["blocks.0.mlp", "blocks.1.mlp"])
    with pytest.raises(ContractViolation, match=re.escape("parameter='parameters[1]'")):
        clip_grad_norm_(params, 1.0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p: clip_grad_norm_(p, 1.0, names=["a"]), ValueError, "names has 1 entries for 2 parameters"),
        (lambda p: clip_grad_norm_([("a", p[0]), p[1]], 1.0), TypeError, "mixes (name, tensor) pairs"),
        (lambda p: clip_grad_norm_(p, 1.0, norm_type=1.0), ValueError, "Euclidean norm only: pass 2.0"),
    ],
)
def test_bad_arguments(call, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call(params_with([torch.ones(2), torch.ones(3)]))


def test_sparse_and_integer_gradients_are_rejected() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(TypeError, match=re.escape("clips dense gradients only")):
        clip_grad_norm_([p], 1.0)
    with pytest.raises(TypeError, match=re.escape("has dtype torch.int64")):
        global_sum_of_squares([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match=re.escape("grads is empty")):
        global_sum_of_squares([])


def test_accepts_a_tensor_generators_and_skips_missing_gradients() -> None:
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 4.0)
    norm = clip_grad_norm_(model.parameters(), 1.0)  # bias.grad is None: ignored
    assert norm.item() == pytest.approx(math.sqrt(96))
    assert exact_sum_sq([model.weight.grad]) <= 1
    assert clip_grad_norm_(model.weight, math.inf).item() <= 1.0


# --------------------------------------------------------------------------------------------------
# Why this exists: torch's clip breaks the bound on ordinary inputs.


def test_torch_violates_the_bound_where_provetrain_does_not() -> None:
    gradient = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 10
    (theirs,) = params_with([gradient])
    torch.nn.utils.clip_grad_norm_([theirs], 1.0)
    assert exact_sum_sq([theirs.grad]) > 1, "torch no longer violates the bound on this input: pick another"
    (ours,) = params_with([gradient])
    clip_grad_norm_([ours], 1.0)
    assert exact_sum_sq([ours.grad]) <= 1
    assert exact_sum_sq([ours.grad]) >= (1 - 8 * UNIT_ROUNDOFF[torch.float32]) ** 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_bit_for_bit() -> None:
    torch.manual_seed(2)
    grads = [torch.randn(1000) * 100, torch.randn(10, dtype=torch.float64), torch.randn(33).half()]
    on_cpu, on_cuda = params_with(grads), params_with([g.cuda() for g in grads])
    clip_grad_norm_(on_cpu, 1.0)
    clip_grad_norm_(on_cuda, 1.0)
    assert exact_sum_sq(grads_of(on_cuda)) <= 1
    for a, b in zip(grads_of(on_cuda), grads_of(on_cpu), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)  # summation order differs by device


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_building_blocks_do_not_synchronise_on_cuda() -> None:
    grads = [torch.randn(1000, device="cuda") * 100, torch.randn(10, dtype=torch.float64, device="cuda")]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s, e = scaled_sum_of_squares(grads)
        _, k = clip_coefficient(s, 1.0, numel=1010, dtypes={torch.float32, torch.float64}, exponent=e)
        clip_grads_(grads, k)
        clip_coefficient(global_sum_of_squares(grads[:1]), 1.0, numel=1000, dtypes={torch.float32})
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_clip_coefficient_quotient_is_rounded_once() -> None:
    """k is the correctly rounded quotient (Proof, step 4): never reciprocal-then-multiply's double rounding."""
    import random
    from fractions import Fraction

    from provetrain.ops.clip import _divide_scaled

    rng = random.Random(0)
    for _ in range(2000):
        numerator, upper = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
        k = float(_divide_scaled(numerator, torch.tensor(upper, dtype=torch.float64), torch.tensor(0)))
        assert k == float(Fraction(numerator) / Fraction(upper)), (numerator, upper)


def test_an_unwritable_gradient_is_refused_before_any_gradient_changes() -> None:
    first = torch.nn.Parameter(torch.zeros(4))
    second = torch.nn.Parameter(torch.zeros(2, 3))
    first.grad = torch.full((4,), 3.0)
    second.grad = torch.tensor([1.0, 2.0, 3.0]).expand(2, 3)  # six elements over three memory locations
    before = first.grad.clone()
    with pytest.raises(ValueError, match=r"the gradient of 'second' has elements that share memory"):
        clip_grad_norm_([("first", first), ("second", second)], 1.0)
    assert torch.equal(first.grad, before)  # no partial clip


@pytest.mark.parametrize(("values", "max_norm"), [([1e-39, 1e-39], 1e-40), ([2.0**-149], 1e-46)])
def test_flush_to_zero_is_refused_and_gradual_underflow_keeps_the_bound(values: list[float], max_norm: float) -> None:
    # The two counterexamples of issue 11: under flush-to-zero the sum is 0 and the gradients escape the clip.
    param = torch.nn.Parameter(torch.zeros(len(values)))
    param.grad = torch.tensor(values)
    before = param.grad.clone()
    torch.set_flush_denormal(True)
    try:
        with pytest.raises(ContractViolation, match=r"torch\.set_flush_denormal\(False\)"):
            clip_grad_norm_([param], max_norm)
        opt = Adam([param], lr=1e-3, clip_value=max_norm)
        with pytest.raises(ContractViolation, match="flushed to zero"):
            opt.step()
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(param.grad, before) and not param.detach().any()
    clip_grad_norm_([param], max_norm)
    exact = sum(Fraction(x) ** 2 for x in param.grad.double().tolist())
    assert exact <= Fraction(max_norm) ** 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_float64_sum_is_the_same_bits_for_every_thread_count(dtype: torch.dtype) -> None:
    grads = [torch.randn(700_001, generator=torch.Generator().manual_seed(0)).to(dtype), torch.randn(33).to(dtype)]
    before = torch.get_num_threads()
    sums = []
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            s, e = scaled_sum_of_squares(grads)
            sums.append((s.item().hex(), int(e)))
    finally:
        torch.set_num_threads(before)
    assert sums[0] == sums[1] == sums[2]
