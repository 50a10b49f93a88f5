r"""The clipped, finite-guarded Adam step on torch's multi-tensor kernels: O(1) launches per tensor group.

What runs on CUDA (and on CPU for tensors the C kernel of :mod:`provetrain.ops.fused` does not take, or when
chosen with ``foreach=True``). Per (device, dtype) group of gradients:

1. **Sum of squares** (:func:`scaled_sum_of_squares_multi_tensor`): ``torch._foreach_norm(g, 2,
   dtype=float64)`` gives each tensor's float64 norm ``r_j`` in one launch; ``s_g = dot(r, r)``. float64
   gradients are first scaled by ``2^-e`` (``e`` the binary exponent of their largest magnitude, from one
   ``_foreach_norm(g, inf)``), so nothing overflows. The groups are combined in the scaled form
   ``S = s 4^e`` (:func:`combine_scaled_sums`). ``s`` is finite iff every gradient is: the finite guard.
2. **Divisor** (:func:`clip_divisor`): the clip coefficient ``k`` of :func:`provetrain.ops.clip.clip_coefficient`
   (with ``extra_roundings`` for step 1's extra roundings), turned into a float32 divisor
   ``D >= sigma / k`` rounded *up* (``sigma``: a GradScaler's loss scale, else 1), and ``D = sigma`` exactly
   when ``k == 1``. No host read.
3. **Update**: ``torch._fused_adam_`` / ``torch._fused_adamw_`` with ``grad_scale=D`` and ``found_inf`` = the
   skip flag: the kernel divides each gradient by ``D`` (writing the clipped gradient back to ``.grad``) and
   does nothing at all when ``found_inf`` is 1. Step counts advance before the kernel and are restored by
   ``found_inf`` after it, as ``torch.optim.Adam(fused=True)`` does under a GradScaler.

Error analysis (extends the *Proof* of :mod:`provetrain.ops.clip`)
-----------------------------------------------------------------
*Step 1.* For float16 / bfloat16 / float32 gradients each square is exact in float64 (torch's CPU norm casts
the tensor to float64 first; the CUDA kernel casts each element and accumulates in float64, FMA or not): the
per-tensor sum ``s_j`` is a sum of exact squares in some order, ``(1 +- u)^(n_j - 1)``. ``r_j = fl(sqrt
s_j)`` is faithful, ``(1 +- u)^2`` (the assumption of the clip proof), ``fl(r_j^2)`` adds one rounding, and
the dot over tensors and the sums over groups add at most ``T - 1``. A term therefore passes through at
most ``(n_j - 1) + 5 + (T - 1) <= n + 4`` roundings (``n_j + T - 1 <= n``): five more than the ``n - 1`` of
the reference sum. For
float64 gradients the scaled squares round too (``n + 4`` in all, up to the absolute ``2^-1074`` terms of
the reference proof). Combining groups rescales by exact powers of two (only results below ``2^-1022``
round, the reference proof's ``delta``). So ``clip_coefficient(..., extra_roundings=5)`` keeps
``N_up >= N`` (its margin ``C = 1 + (n + 4 + x) u`` covers ``n - 1 + x`` roundings per term, ``x = 5``).
With a loss scale ``sigma = m 2^j`` (``m in [1/2, 1)``), ``S / sigma^2 = fl(fl(s / m) / m) 4^(e - j)``:
two more roundings (none when ``sigma`` is a power of two, GradScaler's default), ``x = 7``. Dividing by
``sigma`` itself rounds too, even with no clip, so under a loss scale the decision and ``k`` are taken
against ``A_lo`` (:func:`~provetrain.ops.clip.unscale_clip_target`) instead of ``max_norm``: the chain of
*Step 3* then bounds the unscaled gradient whether it is clipped or not.

*Step 2.* ``k N <= A (1 + u)^2`` (clip proof, step 4). ``D`` is ``sigma * (1 / k)`` evaluated in float64
and moved one float64 step up, then cast to float32 and moved one float32 step up if the cast went down:
``D >= sigma / k`` exactly (``inf`` when ``k = 0`` or on overflow; ``g / inf = 0``). ``k == 1`` gives
``D = sigma`` bit for bit, so without a scaler and without clipping every gradient is unchanged. (The
device code forms this same ``D`` in fewer ops, :func:`_round_up_to_float32` and, with neither a loss scale
nor a float64 gradient, :func:`_clip_divisor_unscaled`: each says why the value is the same, and
``tests/ops/test_op_count.py`` checks it against the host form.)

*Step 3.* The kernels compute ``y = g_scaled / D`` in the op-math type (float32 for float16 / bfloat16 /
float32 parameters, float64 for float64), CUDA's through a float64 quotient first (``g /=
static_cast<double>(D)``): ``|y_i| <= |g_i| (k / sigma)... = |g_i| k (1 + u)(1 + u_op)`` relative, or a
subnormal absolute error. Adam uses ``y``; the gradient written back to ``.grad`` is ``y`` cast to the
parameter dtype (``(1 + u_d)`` more, or ``eta_d / 2`` absolute). By Minkowski::

    ||y|| <= k N (1 + u)(1 + u_op)(1 + u_d) + sqrt(n) (eta_d / 2)(1 + 2^-15)
          <= max_norm (1 - 4 u_d)(1 + u)^3 (1 + u_op)(1 + u_d) - eta_d (floor(sqrt n) + 1 - 0.51 sqrt n)
          <= max_norm

for float32 / bfloat16 / float16 (``u_op = 2^-24 <= u_d``: ``(1 - 4x)(1 + x)^2 <= 1 - 2x`` and ``2 u_d``
dwarfs ``(1 + u)^3``) and for float64 (``u_op = u_d = u`` and no second cast: ``(1 - 4u)(1 + u)^4 < 1``).
So the contract's ``grad_norm <= clip_value`` holds on this path for what Adam uses and what ``.grad``
holds, as on the reference path. ``tests/ops/test_multi_tensor.py`` checks it in exact arithmetic.

*Not over-clipped.* ``D <= (sigma / k)(1 + 2u)(1 + 2^-23)``: the clipped norm is at least the reference
path's lower bound times ``(1 - 2^-22)``.

*Overflow of the divisor.* ``D`` is float32 (the kernels' ``grad_scale``): when ``sigma / k`` exceeds
float32's largest value (a clipped gradient whose norm is over ``3.4e38`` times the clip value) ``D = inf``
and the kernel writes zeros: the bound holds but the direction is lost. :class:`provetrain.Adam` sees it
on CPU (a free read) and takes the reference path for that step; on CUDA it cannot look without a
synchronisation, so there such a step applies a zero gradient (Adam's moments still decay).

*Skip.* ``found_inf = 1`` makes the kernels return before touching anything, and the step counts get
``+1`` then ``-1`` (exact for counts below ``2^24``): parameters, moments, counts and gradients keep their bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy
import torch
from torch import Tensor

from provetrain.ops import clip as clip_module
from provetrain.ops import fused
from provetrain.ops.clip import _mul_pow2, _pow2, clip_coefficient, clip_coefficient_on_host, unscale_clip_target

__all__ = [
    "EXTRA_ROUNDINGS",
    "adam_update_multi_tensor_",
    "clip_divisor",
    "clip_divisor_on_host",
    "combine_scaled_sums",
    "device_constant",
    "fused_kernel_supports",
    "scaled_sum_of_squares_multi_tensor",
]

EXTRA_ROUNDINGS = 5
"""Roundings per term of the multi-tensor sum of squares beyond the reference sum's ``n - 1`` (*Step 1*)."""

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# CPU groups use the C kernel's pass 1 when it takes them; tests turn this off to run torch's norm on CPU.
_C_PASS1_ON_CPU = True

NO_EXPONENT = -1073
"""The exponent of an all-zero partial sum: it never sets the common scale in :func:`combine_scaled_sums`."""

# Devices with torch's fused Adam kernels (torch.optim.Adam(fused=True) supports these).
_FUSED_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu"})
_FUSED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def device_constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A 0-d tensor holding ``value``, made once per (value, dtype, device) and reused: an operand of the
    step's scalar ops that costs no fill kernel per step. Read only: never write into it.

    While a CUDA graph is being captured it is a fresh fill instead, captured with the step: a cached tensor
    made during capture would hold its value only after a replay, and one that the cache later drops would
    leave the graph reading freed memory.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.full((), value, dtype=dtype, device=device)
    return _device_constant(float(value).hex(), dtype, device)


@functools.lru_cache(maxsize=128)
def _device_constant(value_hex: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Keyed by the hex form: NaN equals itself there, and 0.0 and -0.0 differ.
    return torch.full((), float.fromhex(value_hex), dtype=dtype, device=device)


def _round_up_to_float32(quotient: Tensor) -> Tensor:
    r"""``ceil_32(nextup_64(q))`` for a 0-d float64 ``q > 0``: the least float32 strictly above ``q`` when
    ``q`` is a float32 value, else the least float32 above it (``inf`` past float32's range, NaN for NaN).

    Formed as ``r = round_32(q)`` (to nearest), kept when ``r > q`` and moved one float32 step up otherwise:
    if ``q`` is a float32 value, ``r = q`` and the result is ``nextup_32(q)``; if not, ``r`` is ``q``'s
    float32 ceiling (kept) or floor (whose next step up is the ceiling). Either way it is the float32 ceiling
    of ``nextup_64(q)``, since every float32 value above ``q`` is a float64 value ``>= nextup_64(q)``:
    the divisor of *Step 2* in three ops, without forming ``nextup_64(q)``.
    """
    narrow = quotient.to(torch.float32)
    up = torch.nextafter(narrow, device_constant(math.inf, torch.float32, quotient.device))
    return torch.where(narrow > quotient, narrow, up)


def combine_scaled_sums(sums: Sequence[Tensor], exponents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    r"""``(s, e)`` with :math:`s\,4^e = \sum_g s_g 4^{e_g}`: partial sums in scaled form, combined exactly.

    :math:`e = \max e_g` over the partial sums that are not zero; each :math:`s_g 4^{e_g - e}` is an exact
    power-of-two scaling unless it falls below ``2^-1022`` (absolute error ``<= 2^-1074``, negligible since
    the partial that attains ``e`` is ``>= 2^-298``). All on ``sums[0].device``; no host read.
    """
    device = sums[0].device
    if len(sums) == 1:
        return sums[0], exponents[0].to(device)
    s = torch.stack([x.to(device, non_blocking=True) for x in sums])
    e = torch.stack([x.to(device, non_blocking=True) for x in exponents])
    e = torch.where(s == 0, NO_EXPONENT, e)
    top = e.amax()
    # Below 4^-1022 a partial sum (< 2^300) is 0 in float64 either way; the clamp keeps _mul_pow2 in range.
    total = _mul_pow2(s, (2 * (e - top)).clamp(min=-2044)).sum()
    return total, torch.where(total == 0, 0, top)


def scaled_sum_of_squares_multi_tensor(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor | int]:
    r"""``(s, e)`` with :math:`s\,4^e = \sum_i g_i^2`, with O(1) kernel launches per (device, dtype) group.

    Args:
        grads: dense float16 / bfloat16 / float32 / float64 tensors, possibly on several devices.

    Returns:
        0-d float64 ``s`` on ``grads[0].device``, and ``e``: the int 0 when no gradient is float64 (nothing
        was scaled; :func:`~provetrain.ops.clip.clip_coefficient` then needs no scaling ops), else a 0-d
        int64 tensor. No host-device synchronisation.

    Guarantees:
        A term of ``s`` passes through at most ``n - 1 + EXTRA_ROUNDINGS`` float64 roundings (module
        *Step 1*); pass ``extra_roundings=EXTRA_ROUNDINGS`` to :func:`~provetrain.ops.clip.clip_coefficient`.
        ``s`` is finite iff every gradient element is.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    device = grads[0].device
    if all(dtype != torch.float64 for _, dtype in groups):
        # Sums of exact squares (< 2^297 each): add them up, no scaling anywhere.
        sums = [_exact_squares_sum(group) for group in groups.values()]
        total = sums[0] if len(sums) == 1 else torch.stack([x.to(device, non_blocking=True) for x in sums]).sum()
        return total, 0
    sums, exponents = [], []
    for (group_device, dtype), group in groups.items():
        if dtype == torch.float64:
            s, e = _float64_group_sum(group)
        else:
            s, e = _exact_squares_sum(group), torch.zeros((), dtype=torch.int64, device=group_device)
        sums.append(s)
        exponents.append(e)
    return combine_scaled_sums(sums, exponents)


def _exact_squares_sum(group: list[Tensor]) -> Tensor:
    """float64 sum of the exact squares of float16 / bfloat16 / float32 values: one norm per tensor, dotted.

    On CPU, contiguous float32, bfloat16 and float16 groups go through the C kernel's pass 1 when it is available: it
    reads each element once and widens it in registers, where torch's CPU norm first copies each tensor to
    float64 (2x to 4x its bytes; the multi-tensor path's CPU bottleneck). Its sum has at most ``n - 1``
    roundings per term, inside the ``n - 1 + EXTRA_ROUNDINGS`` budget, and does not depend on the thread
    count.
    """
    if group[0].is_cpu and _C_PASS1_ON_CPU and fused.fused_available() and fused.supports_sum(group):
        return torch.tensor(fused.sum_sq_and_finite(group, check=False)[0], dtype=torch.float64)
    norms = torch.stack(torch._foreach_norm(group, 2, dtype=torch.float64))
    return torch.dot(norms, norms)


def _float64_group_sum(group: list[Tensor]) -> tuple[Tensor, Tensor]:
    """float64 gradients scaled by ``2^-e`` (``e``: exponent of their largest magnitude) before squaring."""
    maxima = torch.stack(torch._foreach_norm(group, math.inf))
    _, exponent = torch.frexp(maxima.amax())
    # frexp of inf/nan gives an unspecified exponent; the clamp keeps the scaling finite so they propagate.
    exponent = exponent.to(torch.int64).clamp(-1073, 1024)
    half = torch.div(exponent, 2, rounding_mode="floor")
    scaled = torch._foreach_mul(group, _pow2(-half))
    torch._foreach_mul_(scaled, _pow2(half - exponent))
    norms = torch.stack(torch._foreach_norm(scaled, 2))
    return torch.dot(norms, norms), exponent


def clip_divisor(
    sum_sq: Tensor,
    exponent: Tensor | int,
    max_norm: float | None,
    *,
    numel: int,
    dtypes: Sequence[torch.dtype],
    grad_scale: Tensor | None = None,
    norm_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The pre-clip norm and the float32 divisor ``D`` that clips a (loss-scaled) gradient: ``y = g / D``.

    .. math:: D = \lceil \sigma / k \rceil_{32} \;(D = \sigma \text{ when } k = 1), \qquad
              k = \text{clip\_coefficient}(S / \sigma^2, c)

    Args:
        sum_sq, exponent: ``(s, e)`` from :func:`scaled_sum_of_squares_multi_tensor` of the gradients as
            stored (multiplied by ``sigma`` under a GradScaler).
        max_norm: the clip value ``c``, or None for no clipping (``D = sigma``).
        numel, dtypes: total element count and the gradient dtypes.
        grad_scale: GradScaler's 0-d float32 scale ``sigma`` on the gradients' device, or None (``sigma = 1``).
        norm_out: a 0-d float64 tensor on ``sum_sq``'s device that may receive the norm (then returned as
            ``total_norm``): written in place when there is no ``grad_scale`` and no float64 gradient, saving
            a copy into a counter; otherwise untouched.

    Returns:
        ``(total_norm, D)``: the float64 norm of the *unscaled* gradient before clipping, and the 0-d float32
        divisor for ``grad_scale=`` of torch's fused kernels. No host read.

    Guarantees:
        ``D >= sigma / k`` exactly, so ``||g / D|| <= c`` in the kernels' arithmetic (module docstring).
    """
    device = sum_sq.device
    if grad_scale is None and isinstance(exponent, int) and exponent == 0:
        sum_sq = sum_sq.to(torch.float64)
        if max_norm is None:  # nothing to scale, nothing to clip: the norm, and D = 1
            total_norm = torch.sqrt(sum_sq) if norm_out is None else torch.sqrt(sum_sq, out=norm_out)
            return total_norm, device_constant(1.0, torch.float32, device)
        if max_norm != math.inf:
            return _clip_divisor_unscaled(sum_sq, max_norm, numel, dtypes, norm_out)
    extra = EXTRA_ROUNDINGS
    if grad_scale is not None:
        # S / sigma^2 with sigma = m 2^j: two roundings by m (none for a power of two), exact shift of e.
        mantissa, shift = torch.frexp(grad_scale.to(device, torch.float64))
        if max_norm is not None:  # dividing by sigma rounds: decide against the margin (unscale_clip_target)
            max_norm = unscale_clip_target(max_norm, numel=numel, dtypes=set(dtypes))
        sum_sq = sum_sq / mantissa / mantissa
        exponent = exponent - shift.to(torch.int64)
        extra += 2
    total_norm, k = clip_coefficient(
        sum_sq,
        math.inf if max_norm is None else max_norm,
        numel=numel,
        dtypes=set(dtypes),
        exponent=exponent,
        extra_roundings=extra,
    )
    if max_norm is None:
        unit = device_constant(1.0, torch.float32, device)
        return total_norm, unit if grad_scale is None else grad_scale.to(device, torch.float32)
    # sigma / k rounds to nearest once; one float64 step up makes it >= the exact quotient (inf when k = 0),
    # then the float32 ceiling of that (_round_up_to_float32 forms both at once).
    quotient = torch.reciprocal(k) if grad_scale is None else grad_scale.to(device, torch.float64) / k
    narrow = _round_up_to_float32(quotient)
    sigma = device_constant(1.0, torch.float32, device) if grad_scale is None else grad_scale.to(device, torch.float32)
    return total_norm, torch.where(k == 1.0, sigma, narrow)


def _clip_divisor_unscaled(
    sum_sq: Tensor, max_norm: float, numel: int, dtypes: Sequence[torch.dtype], norm_out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r""":func:`clip_divisor` with a clip value, no loss scale and ``e = 0`` (no float64 gradient): the same
    ``(total_norm, D)``, bit for bit, in eight ops (the general form takes about twenty).

    It is :func:`~provetrain.ops.clip.clip_coefficient`'s unscaled form followed by *Step 2*, with three
    steps left out because they cannot change ``D``:

    - *The subnormal step of k.* ``A_lo > 0`` exceeds ``eta_d >= 2^-149`` and ``N_up < 2^150`` (``S <
      2^297``), so ``k = fl(A_lo / N_up) > 2^-300`` is never subnormal; and where ``A_lo <= 0``, ``k = 0 /
      N_up`` is the ``0`` (NaN for NaN) that the general form selects.
    - *The select of k = 1 before the divisor.* ``D`` is selected as 1 directly where ``N_up <= c``. Elsewhere
      ``N_up > c`` and ``A_lo <= c (1 - 4 u_d)`` give ``A_lo / N_up < 1 - 2^-22``, so ``k < 1``: the general
      form's test ``k == 1`` is exactly ``N_up <= c`` (both false for NaN).
    - *The separate float64 step up* (:func:`_round_up_to_float32`).

    Operands are cached constants (:func:`device_constant`); the clip module's ``upper_factor`` and
    ``_margin_numerator`` are read from it on each call, as the proof harness and its mutants see them.
    """
    max_norm = clip_module._check_max_norm(max_norm)
    clip_module._check_counts(numel, EXTRA_ROUNDINGS)
    device = sum_sq.device
    u_d, eta_d = clip_module._rounding_constants(set(dtypes))
    total_norm = torch.sqrt(sum_sq) if norm_out is None else torch.sqrt(sum_sq, out=norm_out)
    upper = total_norm * clip_module.upper_factor(numel, EXTRA_ROUNDINGS)  # C >= 1 + (n + 4 + x) u, exact
    numerator = clip_module._margin_numerator(max_norm, numel, u_d, eta_d)
    # A tensor-by-tensor division rounds once (a float / tensor would be reciprocal() * float: twice).
    k = torch.div(device_constant(max(numerator, 0.0), torch.float64, device), upper)
    divisor = _round_up_to_float32(torch.reciprocal(k))
    return total_norm, torch.where(upper <= max_norm, device_constant(1.0, torch.float32, device), divisor)


def clip_divisor_on_host(
    sum_sq: float,
    exponent: int,
    max_norm: float | None,
    *,
    numel: int,
    dtypes: Sequence[torch.dtype],
    grad_scale: float | None = None,
) -> tuple[float, float]:
    """:func:`clip_divisor` in Python floats, for sums on the CPU (no tensor ops; the same operations).

    Returns ``(total_norm, D)`` with ``D`` a float32 value held in a Python float.
    """
    extra = EXTRA_ROUNDINGS
    if grad_scale is not None:
        mantissa, shift = math.frexp(grad_scale)
        if max_norm is not None:  # dividing by sigma rounds: decide against the margin (unscale_clip_target)
            max_norm = unscale_clip_target(max_norm, numel=numel, dtypes=set(dtypes))
        sum_sq, exponent, extra = sum_sq / mantissa / mantissa, exponent - shift, extra + 2
    total_norm, k = clip_coefficient_on_host(
        sum_sq,
        math.inf if max_norm is None else max_norm,
        numel=numel,
        dtypes=set(dtypes),
        exponent=exponent,
        extra_roundings=extra,
    )
    sigma = 1.0 if grad_scale is None else grad_scale
    if max_norm is None or k == 1.0 or math.isnan(k):
        return total_norm, sigma if not math.isnan(k) else math.nan
    wide = math.nextafter(sigma / k, math.inf) if k > 0 else math.inf
    if wide > _FLOAT32_MAX:
        return total_norm, math.inf
    narrow = numpy.float32(wide)  # to nearest
    if float(narrow) < wide:
        narrow = numpy.nextafter(narrow, numpy.float32(math.inf))
    return total_norm, float(narrow)


def fused_kernel_supports(
    params: Sequence[Tensor], *others: Sequence[Tensor], same_layout: Sequence[Sequence[Tensor]] = ()
) -> bool:
    """Whether torch's fused Adam kernel can take these tensors, one (device, dtype) group at a time.

    Each parameter a plain tensor (not a subclass) of a floating dtype on a device with a fused kernel; the
    parameters may mix dtypes and devices (the step runs the kernel once per group, as torch's fused Adam
    does). Each gradient and moment a plain tensor of its parameter's dtype and device, dense and
    non-overlapping, with its parameter's shape and strides: the CPU kernel walks memory linearly and checks
    neither layout nor size (a moment smaller than its parameter is read and written past its end), so ``p``,
    ``g``, ``m`` and ``v`` must lay their elements out alike. The tensors of ``same_layout`` were checked
    before (a state that has not changed, whose Python type cannot have): their dtype, shape and strides are
    compared with the parameter's.
    """
    # Per tensor, the cheap reads only (this runs for every tensor at every step): the device by is_cpu and
    # its index (-1 on the CPU and on meta) rather than a torch.device object, which only a parameter on
    # neither the CPU nor CUDA needs.
    for i, p in enumerate(params):
        dtype, cpu, index = p.dtype, p.is_cpu, p.get_device()
        if type(p) not in _PLAIN_TENSOR_TYPES or dtype not in _FUSED_DTYPES or not _dense(p):
            return False
        if not (cpu or p.is_cuda or p.device.type in _FUSED_DEVICE_TYPES):
            return False
        stride = p.stride()
        for tensors in others:
            t = tensors[i]
            if (
                type(t) not in _PLAIN_TENSOR_TYPES
                or t.dtype is not dtype
                or t.is_cpu is not cpu
                or t.get_device() != index
            ):
                return False
            if t.stride() != stride or t.shape != p.shape or not _dense(t):
                return False
        for tensors in same_layout:
            t = tensors[i]
            if t.dtype is not dtype or t.stride() != stride or t.shape != p.shape:
                return False
    return True


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive slots exactly once (any dimension order)."""
    if t.layout is not torch.strided:
        return False
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def adam_update_multi_tensor_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    divisor: Tensor | None,
    found_inf: Tensor | None,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    max_exp_avg_sqs: list[Tensor] | None = None,
) -> None:
    r"""One Adam (AdamW) step of one (device, dtype) group in torch's fused kernel, clipped by ``divisor``.

    Each gradient is divided by ``divisor`` in the kernel (and written back to ``.grad`` divided); nothing
    changes where ``found_inf`` is 1 (0-d float32). ``divisor=None`` divides by nothing (the kernel's own
    path for ``D = 1``, bit for bit the same, without writing the gradients back) and ``found_inf=None`` never
    skips (no count to take back): what the CPU branch passes, which knows both on the host.
    The tensors must satisfy :func:`fused_kernel_supports`.
    ``steps`` are 0-d float32 counts on the parameters' device. No host read on CUDA (a tensor ``beta1`` or
    ``beta2`` is read once as a float, as torch's fused Adam reads it). ``max_exp_avg_sqs``: AMSGrad's
    maxima of ``v`` (the kernel's ``amsgrad=True``), laid out like the moments.
    """
    device = params[0].device
    divisor = None if divisor is None else divisor.to(device, non_blocking=True)
    found_inf = None if found_inf is None else found_inf.to(device, non_blocking=True)
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    if isinstance(lr, Tensor):
        lr = lr.squeeze() if lr.device.type == "cpu" else lr.to(device, non_blocking=True).squeeze()
    if found_inf is None and device.type == "cpu" and fused.fused_available():
        fused.advance_step_counts_(steps)  # one C call; _foreach_add_ costs about 1.7 us a 0-d CPU tensor
    else:
        torch._foreach_add_(steps, 1.0)
    kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs or [],
        steps,
        lr=lr,
        beta1=float(beta1),
        beta2=float(beta2),
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=max_exp_avg_sqs is not None,
        maximize=maximize,
        grad_scale=divisor,
        found_inf=found_inf,
    )
    # As torch.optim.Adam(fused=True) under a GradScaler: a skipped step takes back its count.
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
