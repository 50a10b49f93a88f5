r"""Analytical gradients against central finite differences, on a user's model (backward-pass-v1).

backward-pass-v1's proof obligations "Analytical gradient matches numerical gradient" (tolerance 1e-3) and
"Gradient finite", checked on any ``nn.Module`` at the cost of a few forward passes per parameter tensor, so
it runs on real models, not only on toy ones.

Method
------
The loss is a fixed random linear functional of the model's output, :math:`L(\theta) = \langle w, f(\theta;
x)\rangle / \sqrt{n}` with :math:`w \sim N(0, I)` seeded (or the caller's ``loss_fn``): its gradient is the
vector-Jacobian product of the whole output Jacobian with a random direction, so an error in any output's
backward shows up with probability one. The check runs on a **float64 copy** of the model in **eval mode**
(dropout draws random masks, which would make differences of two forwards meaningless; the user's model is
not touched). From one backward it takes the analytical gradient :math:`a = \partial L/\partial\theta`; then,
for ``samples`` coordinates :math:`i` of each parameter tensor, drawn without replacement by a seeded
generator, the central difference

.. math:: n_i = \frac{L(\theta + h e_i) - L(\theta - h e_i)}{(\theta_i + h) - (\theta_i - h)},
   \qquad h = 10^{-6} \max(1, |\theta_i|),

whose denominator is the step actually taken in float64. Cost: one backward and ``2 * samples`` forwards per
parameter tensor (``4 * samples`` at most, see the retry below).

Error
-----
.. math:: e_i = \frac{|a_i - n_i|}{\max(|a_i|,\ |n_i|,\ s)}, \qquad
   s = \max\bigl(\operatorname{rms}(a_{\text{tensor}}),\ 10^{-6} \max(1, |L|)\bigr).

A plain relative error :math:`|a-n|/\max(|a|,|n|)` is useless near 0: a coordinate whose true gradient is 0
(a dead ReLU unit, an unused embedding row) has :math:`a_i = 0` exactly and :math:`n_i` equal to rounding
noise, and scores 1, the worst possible. A plain absolute error depends on the loss's scale. The floor
:math:`s` makes the error relative for coordinates at or above the tensor's typical gradient magnitude and
absolute, at that magnitude, below it: a gradient 1e6 times smaller than its neighbours is compared at the
neighbours' scale, which is what matters for training. The second term keeps the floor above the float64
rounding noise of the difference (about :math:`10^{-16}|L|/h = 10^{-10}|L|`, a thousand times below
:math:`10^{-6}|L|`), so a tensor whose gradient is 0 everywhere is not failed on noise.

A coordinate whose error exceeds the tolerance is redone at :math:`h/10` and keeps the smaller error: a
wrong gradient is wrong at both steps, while a step that straddles a kink of a piecewise-linear function
(ReLU, max-pool, abs) is ten times less likely at the smaller step.

Guarantees
----------
- Every sampled coordinate has :math:`e_i \le` ``tolerance`` or the report fails and names the tensor, the
  coordinate, :math:`a_i` and :math:`n_i`. The check is a sample: coordinates not drawn are not checked.
- The float64 difference has truncation error :math:`O(h^2 |L'''|)` and rounding error about
  :math:`10^{-10}|L|`, both far below 1e-3 of the floor for smooth models; float32 is not used for the
  comparison, where rounding alone (about :math:`10^{-7}|L|/h`) would exceed any useful tolerance.
- "Gradient finite" is checked separately in the model's **own** dtype (a float32 overflow that float64
  would hide is caught): every gradient element of one backward of a copy of the model is finite.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_TOLERANCE", "GradientCheckReport", "TensorGradientCheck", "check_gradients"]

DEFAULT_TOLERANCE = 1e-3
"""backward-pass-v1's tolerance for "Analytical gradient matches numerical gradient"."""

_STEP = 1e-6
_NOISE_FLOOR = 1e-6

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TensorGradientCheck:
    """One parameter tensor's result.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        shape: its shape.
        coordinates: how many coordinates were sampled.
        max_error: the largest error :math:`e_i` over them (see the module docstring).
        worst_index: the coordinate (multi-index) with that error.
        analytical, numerical: :math:`a_i` and :math:`n_i` at that coordinate.
    """

    name: str
    shape: tuple[int, ...]
    coordinates: int
    max_error: float
    worst_index: tuple[int, ...]
    analytical: float
    numerical: float


@dataclass(frozen=True)
class GradientCheckReport:
    """The gradient check of a model.

    Attributes:
        tensors: one entry per trainable parameter tensor, in ``named_parameters()`` order.
        tolerance: the bound each sampled coordinate's error must keep.
        nonfinite: names of parameters whose gradient, in the model's own dtype, holds NaN or Inf.
        forward_passes: forwards run for the finite differences (the cost of the check).
    """

    tensors: tuple[TensorGradientCheck, ...]
    tolerance: float
    nonfinite: tuple[str, ...]
    forward_passes: int

    @property
    def max_error(self) -> float:
        return max((t.max_error for t in self.tensors), default=0.0)

    @property
    def gradients_match(self) -> bool:
        """ "Analytical gradient matches numerical gradient": every sampled error within the tolerance."""
        return all(t.max_error <= self.tolerance for t in self.tensors)

    @property
    def gradients_finite(self) -> bool:
        """ "Gradient finite": no NaN or Inf in any gradient of the model in its own dtype."""
        return not self.nonfinite

    @property
    def passed(self) -> bool:
        return self.gradients_match and self.gradients_finite

    def failures(self) -> list[str]:
        """One line per tensor over the tolerance, naming the coordinate and both values."""
        return [
            f"{t.name}{list(t.worst_index)}: analytical {t.analytical:.6e}, numerical {t.numerical:.6e}, "
            f"error {t.max_error:.2e} > {self.tolerance:g}"
            for t in self.tensors
            if t.max_error > self.tolerance
        ]


def check_gradients(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    loss_fn: LossFn | None = None,
    samples: int = 3,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> GradientCheckReport:
    """Compare ``model``'s analytical gradients with central differences in float64 (see the module docstring).

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        inputs: the forward's input tensor, or a sequence of positional inputs. Floating inputs are cast to
            float64 for the float64 copy; integer inputs (token ids) are passed as they are.
        loss_fn: ``loss_fn(outputs) -> scalar``; default a seeded random linear functional of the output
            (the first tensor of a tuple output, or ``logits`` of a mapping).
        samples: coordinates drawn per parameter tensor (all of them when the tensor is smaller).
        tolerance: the bound on each coordinate's error (default backward-pass-v1's 1e-3).
        seed: seeds the coordinate draw and the random functional.

    Raises:
        ValueError: bad arguments, a model without trainable parameters, or a forward that fails in float64
            or returns no tensor; the message says which.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1 (coordinates per parameter tensor), got {samples!r}")
    if not (isinstance(tolerance, float | int) and tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite number > 0, e.g. {DEFAULT_TOLERANCE}, got {tolerance!r}")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameters: there is no gradient to check")
    generator = torch.Generator().manual_seed(seed)
    loss_of = loss_fn or _random_functional(generator)
    nonfinite = _nonfinite_gradients(model, args, loss_of)
    net = copy.deepcopy(model).to(torch.float64).eval()
    args64 = tuple(a.to(torch.float64) if a.is_floating_point() else a for a in args)
    params = dict(net.named_parameters())

    def loss_at() -> Tensor:
        return _scalar(loss_of(_forward(net, args64, "float64")))

    loss = loss_at()
    grads = _backward(lambda: torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True), "float64")
    floor = _NOISE_FLOOR * max(1.0, abs(float(loss.detach())))
    results, forwards = [], 0
    with torch.no_grad():
        for name, grad in zip(names, grads, strict=True):
            param = params[name]
            analytical = torch.zeros_like(param) if grad is None else grad
            finite = analytical[torch.isfinite(analytical)]  # a NaN would make the floor NaN, and 0 / 0 follow
            scale = max(float(finite.pow(2).mean().sqrt()) if finite.numel() else 0.0, floor)
            result, used = _check_tensor(name, param, analytical, loss_at, scale, samples, tolerance, generator)
            results.append(result)
            forwards += used
    return GradientCheckReport(tuple(results), float(tolerance), nonfinite, forwards)


def _check_tensor(
    name: str,
    param: Tensor,
    analytical: Tensor,
    loss_at: Callable[[], Tensor],
    scale: float,
    samples: int,
    tolerance: float,
    generator: torch.Generator,
) -> tuple[TensorGradientCheck, int]:
    flat, flat_grad = param.view(-1), analytical.reshape(-1)
    chosen = torch.randperm(flat.numel(), generator=generator)[:samples].tolist()
    worst = (-1.0, 0, 0.0, 0.0)
    forwards = 0
    for index in chosen:
        a = float(flat_grad[index])
        best = math.inf
        for step in (_STEP, _STEP / 10):
            n = _central_difference(flat, index, step, loss_at)
            forwards += 2
            error = abs(a - n) / max(abs(a), abs(n), scale)
            if math.isnan(error):  # a non-finite gradient, analytical or numerical, matches nothing
                error = math.inf
            if error <= best:
                best, numerical = error, n
            if best <= tolerance:
                break
        if best > worst[0]:
            worst = (best, index, a, numerical)
    error, index, a, n = worst
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), param.shape)) if param.dim() else ()
    return TensorGradientCheck(name, tuple(param.shape), len(chosen), error, where, a, n), forwards


def _central_difference(flat: Tensor, index: int, step: float, loss_at: Callable[[], Tensor]) -> float:
    original = float(flat[index])
    h = step * max(1.0, abs(original))
    up, down = original + h, original - h
    flat[index] = up
    loss_up = float(loss_at())
    flat[index] = down
    loss_down = float(loss_at())
    flat[index] = original
    return (loss_up - loss_down) / (up - down)


def _nonfinite_gradients(model: nn.Module, args: tuple[Tensor, ...], loss_of: LossFn) -> tuple[str, ...]:
    """Names of the parameters whose gradient holds NaN/Inf after one backward of a copy in its own dtype."""
    net = copy.deepcopy(model).eval()
    loss = _scalar(loss_of(_forward(net, args, "its own dtype")))
    _backward(loss.backward, "its own dtype")
    return tuple(
        name
        for name, p in net.named_parameters()
        if p.requires_grad and p.grad is not None and not bool(torch.isfinite(p.grad).all())
    )


def _forward(net: nn.Module, args: tuple[Tensor, ...], where: str) -> Tensor:
    try:
        output = net(*args)
    except Exception as error:
        raise ValueError(
            f"the gradient check runs the model in {where}, and its forward raised {type(error).__name__}: {error}"
        ) from None
    return _output_tensor(output)


def _backward(run: Callable[[], Any], where: str) -> Any:
    try:
        return run()
    except RuntimeError as error:  # a custom backward without this dtype, a graph that does not reach the loss
        raise ValueError(
            f"the gradient check runs the model in {where}, and its backward raised RuntimeError: {error}"
        ) from None


def _output_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ValueError(
        f"the gradient check needs the forward to return a tensor (or a tuple starting with one, or a mapping "
        f"with 'logits'); it returned {type(output).__name__}: pass loss_fn to reduce it to a scalar"
    )


def _scalar(loss: Tensor) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a floating scalar tensor, got {shape}")
    return loss.reshape(())


def _random_functional(generator: torch.Generator) -> LossFn:
    """``<w, output> / sqrt(n)`` with ``w`` drawn once (on first use, for the output's shape) and kept."""
    weights: dict[tuple[int, ...], Tensor] = {}

    def loss(output: Tensor) -> Tensor:
        shape = tuple(output.shape)
        if shape not in weights:
            weights[shape] = torch.randn(shape, generator=generator, dtype=torch.float64)
        w = weights[shape].to(device=output.device, dtype=output.dtype)
        return (w * output).sum() / math.sqrt(max(output.numel(), 1))

    return loss
