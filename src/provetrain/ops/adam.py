r"""Adam and AdamW behind a global-norm clip and a finite guard, decided on the device.

One step, for the gradients :math:`g` of every parameter that has one (all groups together):

.. math::
    S &= \sum_i g_i^2 \quad\text{(float64)}, \qquad
    \text{skip} = \lnot\operatorname{isfinite}(S) \lor \lnot\operatorname{isfinite}(\text{loss}) \\
    k &= \text{clip\_coefficient}(S, c), \qquad y = \operatorname{fl}(g \cdot k) \\
    t &\leftarrow t + 1, \quad y \leftarrow -y \text{ if maximize}, \quad
    y \leftarrow y + \lambda\theta \text{ (Adam)} \quad\text{or}\quad
    \theta \leftarrow \theta (1 - \eta\lambda) \text{ (AdamW)} \\
    m &\leftarrow \operatorname{lerp}(m, y, 1 - \beta_1), \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2)\, y^2 \\
    \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}
        \cdot \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

and when ``skip`` holds, :math:`\theta, m, v, t` keep their previous values. The clip (:math:`c` =
``clip_value``, one global norm over all parameters, like ``clip_grad_norm_(model.parameters())``) comes
from :mod:`provetrain.ops.clip`; Adam is Kingma & Ba's bias-corrected update with the operations in the
order ``torch.optim.Adam(foreach=False)`` uses, and AdamW decouples the weight decay from the moments as
Loshchilov & Hutter propose.

The clip, the finite guard, the skip and raise policies, :meth:`~provetrain.ops.guarded.GuardedOptimizer.observe_loss`
and the counters are :mod:`provetrain.ops.guarded`'s, shared with :class:`~provetrain.ops.sgd.SGD`; this module
adds Adam's update, its state and its paths.

Two implementations: :func:`adam_step_`, the reference (any device and floating dtype, all decisions on
the device), and the C kernel of :mod:`provetrain.ops.fused` for contiguous float32 CPU tensors, which the
optimizers use when it is available. They are tested against each other and against ``torch.optim``.

Guarantees:
    * A skipped step leaves parameters, both moments and the step counts bit-for-bit unchanged: the new
      values are computed out of place and ``torch.where(skip, old, new)`` keeps the old bits (a NaN is
      never multiplied by 0). With ``on_nonfinite="skip"`` the reference path makes no host-device
      synchronisation: the decision, the step counts and the bias corrections stay on the device.
    * ``skip`` holds exactly when the loss or some gradient element is NaN or infinite: the sum of squares
      is formed by :func:`~provetrain.ops.clip.scaled_sum_of_squares`, finite iff every gradient is, for
      every dtype (float64 included).
    * The gradient that Adam sees is :math:`y`, whose norm obeys the bound of the contract clause
      ``grad_norm <= clip_value`` (``gradient_norm``), as proven for :mod:`provetrain.ops.clip`; it is
      reported as ``last_clipped_grad_norm``. With ``k == 1`` (or no clip), :math:`y = g` bit for bit.
    * Without clipping, on CPU, the reference path performs torch's own kernels on the same values in the
      same order as ``torch.optim.Adam(foreach=False)``, for float32, bfloat16 and float16 parameters.

References:
    * D. P. Kingma, J. Ba. *Adam: A Method for Stochastic Optimization*. ICLR 2015. arXiv:1412.6980.
    * I. Loshchilov, F. Hutter. *Decoupled Weight Decay Regularization*. ICLR 2019. arXiv:1711.05101.
    * R. Pascanu, T. Mikolov, Y. Bengio. *On the difficulty of training recurrent neural networks*.
      ICML 2013 (gradient-norm clipping).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor

from provetrain.ops import fused, multi_tensor
from provetrain.ops.clip import (
    check_gradual_underflow,
    clip_coefficient_on_host,
    scale_gradient,
    scaled_sum_of_squares,
)
from provetrain.ops.guarded import (
    NOT_DIFFERENTIABLE,
    GroupBatch,
    GuardedOptimizer,
    OnEmpty,
    OnNonfinite,
    check_differentiable,
    check_learning_rate,
    clip_metadata,
    is_real,
    is_set,
    loss_is_finite,
    param_label,
    real_view,
    unscale_,
)
from provetrain.ops.state_cache import StateCache

__all__ = ["Adam", "AdamW", "adam_step_"]

_STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
_AMSGRAD_STATE_KEYS = _STATE_KEYS | {"max_exp_avg_sq"}
# Keys torch.optim.Adam keeps in each parameter group that are optimizer-wide here (foreach and fused name
# provetrain's paths) or refused (differentiable=True, on load).
_TORCH_ONLY_GROUP_KEYS = ("foreach", "differentiable", "fused")
_REDUCED_DTYPES = (torch.bfloat16, torch.float16)
_FLOAT32_STEP = torch.zeros((), dtype=torch.float32)
# Reading a CPU tensor costs no device synchronisation, so CPU steps use such reads: the step scalars from
# the count (bit parity with torch's Python arithmetic) and the multi-tensor path's overflow check. Tests
# turn them off to run, on CPU, exactly the device-side code that CUDA runs.
_FREE_CPU_READS = True


def adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    skip: Tensor | None = None,
    k: Tensor | None = None,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    max_exp_avg_sqs: Sequence[Tensor] | None = None,
    capturable: bool = False,
) -> Tensor | None:
    r"""One clipped Adam (or AdamW) step, in place, unless ``skip``: the reference implementation.

    For each parameter :math:`\theta` with gradient :math:`g`, moments :math:`m, v` and step count
    :math:`t` (a 0-d tensor on :math:`\theta`'s device):

    .. math::
        y &= \operatorname{scale\_gradient}(g, k), \qquad t \leftarrow t + 1 \\
        m &\leftarrow \operatorname{lerp}(m, y, 1 - \beta_1), \qquad
        v \leftarrow \beta_2 v + (1 - \beta_2) y^2 \\
        \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}
            \cdot \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    with ``maximize`` negating :math:`y` first, then L2 weight decay :math:`y \leftarrow y + \lambda\theta`,
    or with ``decoupled_weight_decay`` :math:`\theta \leftarrow \theta(1 - \eta\lambda)` before the update.
    AMSGrad (Reddi et al., 2018; ``max_exp_avg_sqs`` given) keeps :math:`\hat v \leftarrow \max(\hat v, v)`
    and divides by :math:`\sqrt{\hat v}` instead of :math:`\sqrt{v}`.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: one tensor per parameter, each list in the same order; the
            moments have their parameter's dtype, as in ``torch.optim.Adam``.
        state_steps: the step counts, 0-d float tensors on their parameter's device.
        skip: 0-d bool tensor on any device; where it holds, nothing changes (bit for bit). ``None`` steps.
        k: 0-d float64 clip coefficient from :func:`provetrain.ops.clip.clip_coefficient`, or ``None`` to
            use the gradients as they are.
        lr, beta1, beta2, eps, weight_decay: :math:`\eta, \beta_1, \beta_2, \epsilon, \lambda`; ``lr`` and
            the betas may be 0-d tensors, used in tensor arithmetic exactly as ``torch.optim.Adam`` uses them.
        decoupled_weight_decay: AdamW's decay instead of Adam's L2 penalty.
        maximize: ascend instead of descend.
        max_exp_avg_sqs: AMSGrad's running maxima of :math:`v` (the parameters' dtype), or ``None``.
        capturable: the arithmetic of ``torch.optim.Adam(capturable=True)``: the bias corrections and the
            step size are 0-d tensors computed from the step count on the device (no host read even on CPU),
            and the update is ``theta + m / (sqrt(v) / (c2 * -s) + eps / -s)``, as torch forms it.

    Returns:
        With ``k``: ``(s, e)``, the sum of squares of the clipped gradients :math:`y` (before maximize and
        weight decay) in the scaled form of :func:`~provetrain.ops.clip.scaled_sum_of_squares`,
        :math:`s\,4^e`: it neither overflows nor underflows for float64 gradients. Without: ``None``, since
        :math:`y = g` and the caller has their sum already.

    Guarantees:
        No host-device synchronisation: ``skip``, ``k`` and the step counts are read only by device
        kernels. Under ``skip`` every input keeps its bits, however non-finite ``g`` or ``k`` are.

    Call it under ``torch.no_grad()``, as ``torch.optim``'s functional forms are called.
    """
    if not params:
        return None
    ys = list(grads) if k is None else [scale_gradient(g, k.to(g.device, non_blocking=True)) for g in grads]
    clipped_sum_sq = None if k is None else scaled_sum_of_squares(ys)
    for indices in _group_by_device_and_dtype(params).values():
        device = params[indices[0]].device
        _adam_group_(
            [params[i] for i in indices],
            [ys[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            None if max_exp_avg_sqs is None else [max_exp_avg_sqs[i] for i in indices],
            [state_steps[i] for i in indices],
            skip=None if skip is None else skip.to(device, non_blocking=True),
            lr=_to_scalar(lr),
            beta1=_to_scalar(beta1),
            beta2=_to_scalar(beta2),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
            capturable=capturable,
        )
    return clipped_sum_sq


def _adam_group_(
    params: list[Tensor],
    ys: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    steps: list[Tensor],
    *,
    skip: Tensor | None,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
) -> None:
    """:func:`adam_step_` for tensors of one device and dtype, with foreach kernels where they help.

    Each line performs the kernel ``torch.optim.Adam(foreach=False)`` performs, on the same operands (a
    tensor hyper-parameter stays a tensor), out of place, so that the skip can keep the old bits."""
    # Adding 0.0 leaves a count bitwise unchanged: the step advances or not without a host branch.
    advance = torch.ones_like(steps[0]) if skip is None else (~skip).to(steps[0].dtype)
    torch._foreach_add_(steps, [advance] * len(steps))

    if maximize:
        ys = torch._foreach_neg(ys)
    start = params
    if weight_decay != 0:
        if decoupled_weight_decay:
            start = _foreach_scale(params, 1 - lr * weight_decay)
        else:
            ys = [_add_weight_decay(y, p, weight_decay) for y, p in zip(ys, params, strict=True)]

    if isinstance(beta1, Tensor):  # torch casts a tensor beta1 to the parameters' device and dtype first
        weight = 1 - beta1.to(device=params[0].device, dtype=params[0].dtype, non_blocking=True)
        new_exp_avgs = [torch.lerp(m, y, weight) for m, y in zip(exp_avgs, ys, strict=True)]
    else:
        new_exp_avgs = torch._foreach_lerp(exp_avgs, ys, 1 - beta1)
    new_exp_avg_sqs = _foreach_scale(exp_avg_sqs, beta2)
    # A tensor value is read as a Scalar, as torch's addcmul_(value=1 - beta2) reads it.
    torch._foreach_addcmul_(new_exp_avg_sqs, ys, ys, value=float(1 - beta2))
    new_maxima = None if max_exp_avg_sqs is None else torch._foreach_maximum(max_exp_avg_sqs, new_exp_avg_sqs)
    second = new_exp_avg_sqs if new_maxima is None else new_maxima

    if capturable:
        new_params = [
            _capturable_update(p, m, v, t, lr, beta1, beta2, eps)
            for p, m, v, t in zip(start, new_exp_avgs, second, steps, strict=True)
        ]
    else:
        neg_step_sizes, bias_correction2_sqrts = zip(*(_step_scalars(t, lr, beta1, beta2) for t in steps), strict=True)
        denoms = torch._foreach_sqrt(second)
        torch._foreach_div_(denoms, list(bias_correction2_sqrts))
        torch._foreach_add_(denoms, eps)
        # torch computes addcdiv(theta, m, denom, value=-step_size) as theta + (value * m) / denom, the
        # product in float32 for reduced dtypes; a tensor step size cannot be `value`, so it is formed first.
        opmath = torch.float32 if params[0].dtype in _REDUCED_DTYPES else params[0].dtype
        scaled = torch._foreach_mul([m.to(opmath) for m in new_exp_avgs], list(neg_step_sizes))
        new_params = [torch.addcdiv(p, s, d).to(p.dtype) for p, s, d in zip(start, scaled, denoms, strict=True)]

    olds = chain(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or ())
    news = chain(new_params, new_exp_avgs, new_exp_avg_sqs, new_maxima or ())
    for old, new in zip(olds, news, strict=True):
        if skip is None:
            old.copy_(new)
        else:
            torch.where(skip, old, new, out=old)


def _add_weight_decay(y: Tensor, param: Tensor, weight_decay: float) -> Tensor:
    """``y + weight_decay * param``; for the real view of a complex parameter, formed in complex arithmetic
    as torch does it (before its ``view_as_real``): the complex kernel rounds the product before the sum."""
    base = param._base
    if base is not None and base.is_complex() and param.shape == (*base.shape, 2):
        return torch.view_as_real(torch.view_as_complex(y).add(base, alpha=weight_decay))
    return torch.add(y, param, alpha=weight_decay)


def _foreach_scale(tensors: list[Tensor], factor: float | Tensor) -> list[Tensor]:
    """``t * factor`` for each tensor: a float as a Scalar, a 0-d tensor as torch's ``mul_(tensor)`` takes it."""
    if isinstance(factor, Tensor):
        return [torch.mul(t, factor) for t in tensors]
    return torch._foreach_mul(tensors, factor)


def _capturable_update(
    param: Tensor,
    exp_avg: Tensor,
    second: Tensor,
    step: Tensor,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
) -> Tensor:
    r"""The new parameter as ``torch.optim.Adam(capturable=True)`` forms it, every scalar a device tensor:

    .. math::
        s = \eta / (1 - \beta_1^t), \qquad
        \theta + m \,/\, \bigl(\sqrt{v} / (\sqrt{1 - \beta_2^t} \cdot (-s)) + \epsilon / (-s)\bigr)
    """
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size_neg = (lr / bias_correction1).neg()
    bias_correction2_sqrt = bias_correction2.sqrt()
    denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
    return torch.addcdiv(param, exp_avg, denom)


def _to_scalar(value: float | Tensor) -> float | Tensor:
    """A 1-element tensor as a 0-d tensor (torch.optim.optimizer._to_scalar); anything else as it is."""
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value


def _step_scalars(
    step: Tensor, lr: float | Tensor, beta1: float | Tensor, beta2: float | Tensor
) -> tuple[Tensor, Tensor]:
    r"""``(-lr / (1 - beta1**t), sqrt(1 - beta2**t))`` as 0-d float64 tensors on the step's device.

    On CPU the count is read (no device synchronisation) and both are computed in Python floats exactly as
    ``torch.optim.Adam(foreach=False)`` computes them (``bias_correction2 ** 0.5``): torch's vectorised
    float64 ``sqrt`` is not always correctly rounded (measured at t = 38, beta2 = 0.999 on an AVX-512 CPU).
    Elsewhere they stay on the device; the division is a true division, not ``reciprocal() * lr``.
    Tensor hyper-parameters enter torch's expressions as tensors, as in torch (a float32 ``lr`` gives a
    float32 step size), and the results are widened to float64 exactly.
    """
    if step.device.type == "cpu" and _FREE_CPU_READS:
        t = max(float(step), 1.0)  # 0 only on a skipped first step, whose scalars are never used
        neg_step_size = -(lr / (1 - beta1**t))
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        return (
            torch.as_tensor(neg_step_size, dtype=torch.float64).clone(),
            torch.as_tensor(bias_correction2_sqrt, dtype=torch.float64).clone(),
        )
    t = step.to(torch.float64)
    bias_correction1 = 1 - _on(beta1, t) ** t
    bias_correction2 = 1 - _on(beta2, t) ** t
    neg_step_size = (
        (-_on(lr, t)).div(bias_correction1)
        if isinstance(lr, Tensor)
        else torch.full_like(t, -lr).div_(bias_correction1)
    )
    return neg_step_size.to(torch.float64), bias_correction2.sqrt().to(torch.float64)


def _on(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A tensor hyper-parameter on ``like``'s device (float64), a float as it is."""
    return value.to(device=like.device, dtype=torch.float64, non_blocking=True) if isinstance(value, Tensor) else value


def _group_by_device_and_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


@dataclass
class _GroupBatch(GroupBatch):
    """One group's parameters with a gradient this step, with their Adam state (real views of complex ones)."""

    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)  # AMSGrad groups only
    steps: list[Tensor] = field(default_factory=list)

    @property
    def amsgrad(self) -> bool:
        return bool(self.group.get("amsgrad", False))

    def hyperparameters(self) -> dict[str, Any]:
        g = self.group
        beta1, beta2 = g["betas"]
        return {
            "lr": g["lr"],
            "beta1": beta1,
            "beta2": beta2,
            "eps": g["eps"],
            "weight_decay": g["weight_decay"],
            "decoupled_weight_decay": g["decoupled_weight_decay"],
            "maximize": g["maximize"],
        }

    def reference_arguments(self) -> dict[str, Any]:
        """The hyper-parameters and AMSGrad/capturable state as :func:`adam_step_` takes them."""
        return {
            **self.hyperparameters(),
            "max_exp_avg_sqs": self.max_exp_avg_sqs if self.amsgrad else None,
            "capturable": bool(self.group.get("capturable", False)),
        }


class Adam(GuardedOptimizer):
    r"""Adam with a global-norm gradient clip and a finite guard (Kingma & Ba, 2015).

    Each :meth:`step` clips the gradients of all parameters together to the norm ``clip_value`` (one
    global norm, like ``torch.nn.utils.clip_grad_norm_(model.parameters(), clip_value)``), checks that the
    loss and every gradient element are finite, and takes one Adam step with the clipped gradients
    (see the module docstring for the math). When something is non-finite, ``on_nonfinite`` decides:

    * ``"skip"`` (default): the step changes nothing (parameters, moments and step counts keep their bits)
      and ``skipped_steps`` grows by one. The decision stays on the device: on CUDA the step makes **no
      host-device synchronisation**, so reading the counters, and when, is the caller's choice.
    * ``"raise"``: nothing changes and :class:`~provetrain.errors.ContractViolation` names the first
      parameter (by name when given with ``named_parameters()``) whose gradient is non-finite and how many
      of its values are, or the non-finite loss. This mode reads one flag on the host every step (a
      synchronisation on CUDA).

    Counters, 0-d tensors on the device of the first parameter, saved by :meth:`state_dict`:

    * ``skipped_steps`` (int64): steps skipped for a non-finite loss or gradient.
    * ``last_grad_norm`` (float64): the global gradient norm of the last step, before clipping (NaN
      before the first step).
    * ``last_clipped_grad_norm`` (float64): the norm of the clipped gradient the last step used: at most
      ``clip_value`` (contract clause ``grad_norm <= clip_value``); NaN when the last step was skipped.

    Args:
        params: tensors (real or complex), ``model.named_parameters()`` (names then appear in errors), or
            parameter-group dicts that may override ``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``amsgrad``, ``capturable`` and ``maximize``. A complex parameter is stepped as its real view
            (``torch.view_as_real``), as torch does: its gradient's norm is the norm of the real view.
        lr: learning rate :math:`\eta > 0` (contract clause ``lr > 0.0``).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon \ge 0`, added to the denominator.
        weight_decay: :math:`\lambda \ge 0`; an L2 penalty added to the gradient (decoupled in AdamW).
        clip_value: the bound on the global gradient norm (contract clause ``clip_value > 0.0``), or
            ``None`` for no clipping.
        on_nonfinite: ``"skip"`` or ``"raise"``, as above.
        on_empty: a step in which no parameter has a gradient: ``"raise"`` (default), the contract's
            precondition ``!gradients.is_empty()`` as a :class:`~provetrain.errors.ContractViolation`, or
            ``"skip"``, which changes nothing, as ``torch.optim`` does, and counts it in ``empty_steps``
            (frameworks with frozen phases, or a Lightning ``training_step`` that returns ``None``).
        maximize: ascend the objective instead of descending it.
        fused: ``True`` to require the C kernel of :mod:`provetrain.ops.fused` (contiguous float32 CPU
            tensors), ``False`` for the reference path, ``None`` to use the kernel whenever it is available
            and supports every tensor of the step.
        decoupled_weight_decay: AdamW's decay (Loshchilov & Hutter, 2019); prefer :class:`AdamW`.
        amsgrad: AMSGrad (Reddi et al., 2018), torch's meaning: keep ``max_exp_avg_sq``, the running maximum
            of ``exp_avg_sq``, and divide by its root; a skipped step keeps the maximum too. Runs on the
            reference and multi-tensor paths (the C kernel has none).
        capturable: torch's ``capturable=True`` arithmetic: the bias corrections and the step size are
            device tensors computed from the count, so the step makes no host read and can be captured in
            a CUDA graph (with ``on_nonfinite="skip"``). Unlike torch it also runs on CPU.
        differentiable: ``False`` only; ``True`` is refused with the reason (a guarded, clipped step is not
            differentiable).

    ``lr`` and ``betas`` may be 1-element tensors, as in torch (with torch's rules: both betas or neither,
    and with ``foreach=True`` only when ``capturable``); they stay tensors and enter the arithmetic as
    torch's does, so a scheduler may fill a tensor ``lr`` in place. ``fused`` and ``foreach`` name
    provetrain's paths: ``fused=True`` is provetrain's C kernel (contiguous float32 CPU tensors),
    ``foreach=True`` the multi-tensor path on torch's own fused Adam kernel (``torch._fused_adam_``, any
    device), ``False`` for either excludes that path; every path takes the same clip and guard.

    The state of each parameter is ``step`` (0-d float32 tensor on the parameter's device), ``exp_avg`` and
    ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), in the parameter's dtype, the layout of
    ``torch.optim.Adam(capturable=True)``: state dicts move both ways between this class and
    ``torch.optim.Adam``/``AdamW``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Adam(model.named_parameters(), lr=1e-2, clip_value=1.0)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> opt.step()
        >>> opt.last_clipped_grad_norm <= 1.0
        tensor(True)
    """

    _batch_type = _GroupBatch
    _algorithm = "Adam"
    _sparse_alternative = "torch.optim.SparseAdam"
    _untouched = "Nothing was updated: parameters, moments and step counts are as before this step."
    _overflow_hint = (
        "The gradient is finite but so large that Adam's second moment (its square) would overflow the "
        "parameters' dtype. {untouched} Set a clip_value, lower the learning rate, or use wider parameters "
        "(float32 or bfloat16)."
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        clip_value: float | None = None,
        on_nonfinite: OnNonfinite = "skip",
        maximize: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
        decoupled_weight_decay: bool = False,
        on_empty: OnEmpty = "raise",
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_differentiable(
            differentiable, alternative="Use torch.optim.Adam(differentiable=True) with torch's clip for meta-learning"
        )
        # torch's order: the hyper-parameters first, then the parameters (params=None is a TypeError after).
        defaults = _check_hyperparameters(
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
                "maximize": maximize,
                "capturable": capturable,
                "decoupled_weight_decay": decoupled_weight_decay,
            },
            where="",
        )
        self._init_guard(clip_value, on_nonfinite, on_empty)
        self.fused = _check_fused(fused)
        self.foreach = _check_foreach(foreach, self.fused)
        _check_tensor_hyperparameters_with_foreach(defaults, self.foreach)
        if self.fused is True and amsgrad:
            raise ValueError(
                "fused=True with amsgrad=True: provetrain's C kernel keeps no running maximum of exp_avg_sq; "
                "pass fused=None (torch's fused kernel on the multi-tensor path takes amsgrad) or foreach=True"
            )
        self._init_params(params, defaults)
        self._forget_state_cache()

    # -- counters ---------------------------------------------------------------------------------

    # -- the step ---------------------------------------------------------------------------------

    def _step_batches(
        self,
        batches: list[_GroupBatch],
        loss: Tensor | float | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        observed: Tensor | None,
    ) -> None:
        """Refuse updates that could overflow, then take the chosen path's step."""
        _check_update_stays_finite(batches, self.clip_value)
        if self.clip_value is not None:
            check_gradual_underflow({b.params[0].device for b in batches})
        from provetrain.ops import sharded  # imported here: it builds on this module's adam_step_

        cache = self._state_cache
        self._step_cache = cache if cache is not None and cache.describes(self.state, batches) else None
        try:
            if sharded.holds_dtensors([p for b in batches for p in b.params]):  # FSDP2: one collective, shards
                self._step_sharded(batches, sharded, loss, grad_scale, found_inf, observed)
                return
            path = self._choose_path(batches)
            if path == "multi_tensor":
                self._step_multi_tensor(batches, loss, grad_scale, found_inf, observed)
                return
            if grad_scale is not None:
                # The other paths clip what is stored: unscale first, as GradScaler.unscale_ would.
                unscale_(batches, grad_scale)
            skip_scaled = None if found_inf is None else found_inf > 0
            if path == "fused":
                self._step_fused(batches, loss, skip_scaled, observed)
            else:
                self._check_state_matches_params(batches)
                _check_eps_fits_float16(batches)
                self._step_reference(batches, loss, skip_scaled, observed)
        finally:
            self._step_cache = None  # it describes this step's batches only

    def _check_state_matches_params(self, batches: list[_GroupBatch]) -> None:
        """Refuse, before anything changes, a moment whose shape or dtype is not its parameter's (the fast paths
        refuse it by their layout checks and hand the step here): ``p.data`` resized, replaced or cast after
        steps (``model.half()`` after the optimizer was made; torch's ``load_state_dict`` casts moments to
        their parameter's dtype, so a loaded state always matches)."""
        for b in batches:
            for position, p in zip(b.positions, b.keys, strict=True):
                state = self.state.get(p) or {}
                for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    moment = state.get(name)
                    if moment is not None and (moment.shape != p.shape or moment.dtype != p.dtype):
                        raise ValueError(
                            f"{param_label(b.group, b.group_index, position)} is a {p.dtype} tensor of shape "
                            f"{tuple(p.shape)} but its {name} is a {moment.dtype} tensor of shape "
                            f"{tuple(moment.shape)}: the optimizer state is not this parameter's (was the "
                            "parameter resized, replaced or cast, e.g. by model.half(), after steps?); save and load "
                            "the optimizer's state dict after the change (it casts the moments), or construct a new "
                            "optimizer."
                        )

    def _step_sharded(
        self,
        batches: list[_GroupBatch],
        sharded: Any,
        loss: Tensor | float | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        observed: Tensor | None,
    ) -> None:
        """FSDP2 parameters: :func:`provetrain.ops.sharded.sharded_adam_step_` (one collective, local shards)."""
        for b in batches:
            unsupported = [k for k in ("amsgrad", "capturable") if b.group.get(k, False)]
            unsupported += [k for k in ("lr", "betas") if _holds_tensor(b.group[k])]
            if unsupported:
                raise ValueError(
                    f"{', '.join(unsupported)} is not supported with FSDP2 (DTensor) parameters yet: "
                    "the sharded step takes float hyper-parameters without amsgrad or capturable"
                )
        if observed is not None:  # an observed non-finite micro-step loss poisons the step like step(loss=nan)
            base = torch.as_tensor(0.0 if loss is None else loss, dtype=torch.float64, device=observed.device)
            loss = torch.where(observed, math.nan, base)
        groups = [sharded.ShardedGroup(b.keys, b.grads, b.hyperparameters()) for b in batches]
        self._record(
            *sharded.sharded_adam_step_(
                groups,
                self.state,
                clip_value=self.clip_value,
                loss=loss,
                on_nonfinite=self.on_nonfinite,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
        )

    def _extra_skip_flag(self, batches: list[_GroupBatch], total_norm: Tensor) -> Tensor | None:
        """A finite step whose update could overflow the second moment (see :func:`_update_overflow_flag`)."""
        return _update_overflow_flag(batches, total_norm, self.clip_value)

    def _reference_step_dtype(self) -> torch.dtype:
        return _default_step_dtype()

    def _update_reference(self, batch: _GroupBatch, skip: Tensor, k: Tensor | None) -> tuple[Tensor, Tensor] | None:
        b = batch
        return adam_step_(
            b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.steps, skip=skip, k=k, **b.reference_arguments()
        )

    def _choose_path(self, batches: list[_GroupBatch]) -> Literal["fused", "multi_tensor", "reference"]:
        """The C kernel where it takes every tensor (unless foreach=True), else torch's multi-tensor kernels
        (by default, or with foreach=True), else the reference path; fused=False and foreach=False exclude."""
        if self.foreach is not True and self._use_fused(batches):
            return "fused"
        if (self.foreach is True or (self.foreach is None and self.fused is None)) and self._multi_tensor_fits(batches):
            return "multi_tensor"
        return "reference"

    def _attach_state(self, batches: list[_GroupBatch], step_dtype: torch.dtype) -> None:
        """Fetch each parameter's state, creating it (zeros, step 0) on first use, after the raise check.

        A new count is float32 on the fast paths (their kernels read float32 counts, as torch's fused Adam
        does) and otherwise float64 under ``torch.set_default_dtype(torch.float64)``, as in torch. While the
        parameters and their state are last step's (:class:`~provetrain.ops.state_cache.StateCache`), the
        lists are last step's too."""
        if self._step_cache is not None:
            self._step_cache.attach(batches)
            return
        for b in batches:
            if b.exp_avgs:
                continue  # attached already (a path that hands the step over to the reference path)
            for p in b.keys:
                state = self.state[p]
                if not state:
                    state.update(_fresh_state(p, step_dtype))
                b.exp_avgs.append(real_view(state["exp_avg"]))
                b.exp_avg_sqs.append(real_view(state["exp_avg_sq"]))
                if b.amsgrad:
                    # Absent when amsgrad was switched on after steps without it: its maximum starts at 0,
                    # as it does for a new parameter.
                    if "max_exp_avg_sq" not in state:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    b.max_exp_avg_sqs.append(real_view(state["max_exp_avg_sq"]))
                b.steps.append(state["step"])
        self._state_cache = StateCache.of(self.state, batches)

    def _forget_state_cache(self) -> None:
        self._state_cache: StateCache | None = None
        self._step_cache: StateCache | None = None  # the cache when it describes this step's batches

    def _multi_tensor_fits(self, batches: list[_GroupBatch]) -> bool:
        """Whether torch's fused kernel takes every parameter, gradient and moment of the step."""
        cache = self._step_cache
        if cache is not None and cache.multi_tensor_ready:
            # The state was checked with this cache: the parameters and gradients are checked again, and each
            # moment's dtype, shape and strides against its parameter's (p.data or a moment's may have been
            # replaced in place: model.half(), channels_last, a resize).
            return all(
                multi_tensor.fused_kernel_supports(
                    b.params, b.grads, same_layout=[t for t in (c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs) if t]
                )
                for b, c in zip(batches, cache.batches, strict=True)
            )
        for b in batches:
            # A parameter without state yet gets zeros_like(p) (same strides): p stands in for its moments.
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if b.amsgrad else ("exp_avg", "exp_avg_sq")
            states = [self.state.get(p) or dict.fromkeys(keys, p) for p in b.keys]
            if any(s.get("step", _FLOAT32_STEP).dtype != torch.float32 for s in states):
                return False  # a float64 count (torch's under a float64 default dtype): the kernel reads float32
            moments = [[real_view(s.get(key, p)) for s, p in zip(states, b.keys, strict=True)] for key in keys]
            if not multi_tensor.fused_kernel_supports(b.params, b.grads, *moments):
                return False
        if cache is not None:
            cache.multi_tensor_ready = True
        return True

    def _use_fused(self, batches: list[_GroupBatch]) -> bool:
        """Whether the C kernel takes this step; checked once here, so the kernel calls skip their checks."""
        if self.fused is False or (self.fused is None and not fused.fused_available()):
            return False
        if any(b.amsgrad for b in batches):
            if self.fused:
                raise ValueError(
                    "fused=True, but a parameter group has amsgrad=True and provetrain's C kernel keeps no "
                    "running maximum of exp_avg_sq; construct with fused=None to use torch's fused kernel."
                )
            return False
        tensors = [t for b in batches for t in chain(b.params, b.grads)]
        # The kernel reads raw memory: every tensor it touches is checked every step. A cache spares the state
        # lookups, and its tensors' Python types (fixed for an object) the type check.
        cache = self._step_cache
        if cache is not None:
            cached_moments = [t for c in cache.batches for t in chain(c.exp_avgs, c.exp_avg_sqs)]
            counts = [t for c in cache.batches for t in c.steps]
        else:
            cached_moments, counts = [], []
            for p in (p for b in batches for p in b.keys):
                state = self.state.get(p)
                if state:  # else created by _attach_state as zeros_like(p): as p, which is checked
                    tensors += [real_view(state["exp_avg"]), real_view(state["exp_avg_sq"])]
                    counts.append(state["step"])
        if cache is not None and [p.numel() for b in batches for p in b.params] != cache.numels:
            # p.data resized after steps: raise, naming the parameter (pass 2 compares every moment's element
            # count with its parameter's too, the kernel's own guard, but names no parameter)
            self._check_state_matches_params(batches)
        bad_count = next((c for c in counts if not fused.is_step_count(c)), None)
        if bad_count is not None:
            if self.fused:
                raise ValueError(
                    f"fused=True, but a step count is a {bad_count.dtype} tensor of {bad_count.numel()} "
                    f"element(s) on {bad_count.device} (a state made or loaded under "
                    "torch.set_default_dtype(torch.float64) counts in float64) and the fused kernel takes 0-d "
                    "float32 CPU counts; construct with fused=None to fall back to the reference path."
                )
            return False
        if not fused.fits_kernel(cached_moments):
            tensors += cached_moments  # checked in full below, so that the error names the tensor
        if self.fused is None:
            if not fused.supports(tensors):
                return False
        else:
            unsupported = next((t for t in tensors if not fused.supports([t])), None)
            if unsupported is not None:
                raise ValueError(
                    f"fused=True, but a {unsupported.dtype} tensor on {unsupported.device} (contiguous="
                    f"{unsupported.is_contiguous()}) takes part in this step and the fused kernel takes "
                    "contiguous float32 CPU tensors only; construct with fused=None to fall back to the "
                    "reference path."
                )
        return True

    def _step_multi_tensor(
        self,
        batches: list[_GroupBatch],
        loss: Tensor | float | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        observed: Tensor | None = None,
    ) -> None:
        grads = [g for b in batches for g in b.grads]
        # Pass 1: s 4^e = sum of squares, O(1) launches per (device, dtype); finite iff every gradient is.
        sum_sq, exponent = multi_tensor.scaled_sum_of_squares_multi_tensor(grads)
        if sum_sq.is_cpu and _FREE_CPU_READS:
            self._step_multi_tensor_on_host(batches, grads, sum_sq, exponent, loss, grad_scale, found_inf, observed)
            return
        # In skip mode the norm is written straight into its counter (no copy); raise mode may stop before
        # recording, so there the counters are written only by _record.
        norm_out = self._counters_on(sum_sq.device)["last_grad_norm"] if self.on_nonfinite == "skip" else None
        total_norm, divisor = multi_tensor.clip_divisor(
            sum_sq, exponent, self.clip_value, grad_scale=grad_scale, norm_out=norm_out, **clip_metadata(grads)
        )
        skip = self._guard(batches, sum_sq, total_norm, loss, found_inf, observed, step_dtype=torch.float32)
        # Pass 2: torch's fused kernel divides each gradient by the divisor, or does nothing when skipping.
        self._update_multi_tensor(batches, divisor, skip.to(torch.float32))
        # The clipped norm is N_hat sigma / D: no second pass over the gradients (ops.multi_tensor docstring).
        # float64 / float32 divides in float64 (D widens exactly): the same value as dividing by D.double().
        if grad_scale is None:
            clipped_norm = total_norm / divisor
        else:
            clipped_norm = total_norm / (divisor.double() / grad_scale.to(divisor.device).double())
        self._record(skip, total_norm, clipped_norm)

    def _step_multi_tensor_on_host(
        self,
        batches: list[_GroupBatch],
        grads: list[Tensor],
        sum_sq: Tensor,
        exponent: Tensor,
        loss: Tensor | float | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        observed: Tensor | None,
    ) -> None:
        """The multi-tensor step with the sum on the CPU: its scalar math in Python floats (free reads)."""
        s, e = float(sum_sq), int(exponent)
        sigma = None if grad_scale is None else float(grad_scale)
        total_norm, divisor = multi_tensor.clip_divisor_on_host(
            s, e, self.clip_value, grad_scale=sigma, **clip_metadata(grads)
        )
        skip = not (math.isfinite(s) and loss_is_finite(loss)) or (found_inf is not None and bool(found_inf > 0))
        skip = skip or is_set(observed) or bool(_update_overflow_flag(batches, total_norm, self.clip_value))
        if skip and self.on_nonfinite == "raise":
            self._raise_nonfinite(batches, loss, total_norm, observed)
        self._attach_state(batches, torch.float32)
        if skip:
            self._record_on_host(True, total_norm, math.nan)
            return
        if math.isinf(divisor):
            # N / c beyond float32's range: the kernel would zero the gradient. Take the reference path
            # (float64 k) and keep the direction; on other devices see ops.multi_tensor.
            if grad_scale is not None:
                torch._foreach_div_(grads, grad_scale)
            self._step_reference(batches, loss, None if found_inf is None else found_inf > 0)
            return
        # Known on the host: not skipped (no flag to pass), and D = 1 (no clip, no loss scale) divides by
        # nothing: the kernel then neither divides nor writes the gradients back (the same bits, less traffic).
        scale = None if divisor == 1.0 else torch.tensor(divisor, dtype=torch.float32)
        self._update_multi_tensor(batches, scale, None)
        self._record_on_host(False, total_norm, total_norm * (sigma or 1.0) / divisor)

    def _update_multi_tensor(self, batches: list[_GroupBatch], divisor: Tensor | None, found: Tensor | None) -> None:
        for b in batches:
            hyper = b.hyperparameters()
            for indices in _group_by_device_and_dtype(b.params).values():
                multi_tensor.adam_update_multi_tensor_(
                    [b.params[i] for i in indices],
                    [b.grads[i] for i in indices],
                    [b.exp_avgs[i] for i in indices],
                    [b.exp_avg_sqs[i] for i in indices],
                    [b.steps[i] for i in indices],
                    divisor=divisor,
                    found_inf=found,
                    max_exp_avg_sqs=[b.max_exp_avg_sqs[i] for i in indices] if b.amsgrad else None,
                    **hyper,
                )

    def _step_fused(
        self,
        batches: list[_GroupBatch],
        loss: Tensor | float | None,
        skip_scaled: Tensor | None = None,
        observed: Tensor | None = None,
    ) -> None:
        # Everything here is on the CPU: reading a flag or a count costs no device synchronisation.
        grads = [g for b in batches for g in b.grads]
        sum_sq, grads_finite = fused.sum_sq_and_finite(grads, check=False)  # _use_fused checked them
        skip = not (grads_finite and loss_is_finite(loss)) or (skip_scaled is not None and bool(skip_scaled))
        skip = skip or is_set(observed)
        max_norm = math.inf if skip or self.clip_value is None else self.clip_value
        total_norm, k = clip_coefficient_on_host(sum_sq, max_norm, **clip_metadata(grads))
        skip = skip or bool(_update_overflow_flag(batches, total_norm, self.clip_value))
        if skip and self.on_nonfinite == "raise":
            self._raise_nonfinite(batches, loss, total_norm, observed)
        self._attach_state(batches, torch.float32)
        if skip:
            self._record_on_host(True, total_norm, math.nan)
            return  # pass 2 advances the moments: it must not run on a skipped step
        clipped_sum_sq = sum(_fused_group_step_(b, k) for b in batches)
        # k == 1 leaves every gradient bit for bit, so the clipped norm is the pre-clip norm: pass 2's sum
        # of the same squares, vectorised differently, may differ from pass 1's in its last bit.
        self._record_on_host(False, total_norm, total_norm if k == 1.0 else math.sqrt(clipped_sum_sq))

    def _current_step(self) -> int:
        """1-based number of this step: the most advanced step count plus the skipped steps, plus one."""
        # Other keys of self.state may hold anything (torch's own hook tests store a bool there).
        counts = (state["step"] for state in self.state.values() if isinstance(state, Mapping) and "step" in state)
        steps = max(map(int, counts), default=0)
        return steps + int(self.skipped_steps) + 1

    def _policy_repr(self) -> str:
        return f"{super()._policy_repr()}, fused={self.fused}, foreach={self.foreach}"

    # -- parameter groups and state dicts ---------------------------------------------------------

    def _check_group(self, merged: dict[str, Any], *, where: str) -> dict[str, Any]:
        return _check_hyperparameters(merged, where=where)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._forget_state_cache()  # loaded moments are fetched and checked afresh
        for group in self.param_groups:
            for key in _TORCH_ONLY_GROUP_KEYS:
                group.pop(key, None)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("amsgrad", False)
            group.setdefault("capturable", False)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    # torch.optim.Adam keeps its count on the CPU (capturable=False): move it to the device.
                    # A float64 count (torch's under a float64 default dtype) stays float64, as in torch.
                    step = torch.as_tensor(p_state["step"])
                    dtype = step.dtype if step.dtype in (torch.float32, torch.float64) else torch.float32
                    p_state["step"] = step.to(device=p.device, dtype=dtype)

    def _pickled_attributes(self) -> tuple[str, ...]:
        return (*super()._pickled_attributes(), "fused", "foreach")

    def _check_loadable(self, state_dict: Mapping[str, Any]) -> None:
        super()._check_loadable(state_dict)
        for label, p, p_state, saved_group in self._saved_parameter_states(state_dict):
            # The loaded group's amsgrad decides (torch takes the saved hyper-parameters); a state saved
            # with amsgrad and loaded into a group without it keeps its maximum, as torch's would.
            expected = _AMSGRAD_STATE_KEYS if saved_group.get("amsgrad", False) else _STATE_KEYS
            if not expected <= set(p_state) <= _AMSGRAD_STATE_KEYS:
                raise ValueError(
                    f"state_dict holds keys {sorted(p_state)} for {label}, expected {sorted(expected)}: "
                    "it was not saved by Adam or AdamW (provetrain or torch.optim)."
                )
            for key in sorted(set(p_state) - {"step"}):
                if tuple(p_state[key].shape) != tuple(p.shape):
                    raise ValueError(
                        f"state_dict {key} for {label} has shape {tuple(p_state[key].shape)} but the parameter "
                        f"has shape {tuple(p.shape)}: the state dict belongs to a different model."
                    )


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter, 2019), clip and finite guard as :class:`Adam`.

    The decay shrinks the parameters directly, :math:`\theta \leftarrow \theta(1 - \eta\lambda)`, before
    the Adam update, instead of adding :math:`\lambda\theta` to the gradient, so the moments never see it.
    Defaults follow ``torch.optim.AdamW`` (``weight_decay=1e-2``); everything else is as in :class:`Adam`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        clip_value: float | None = None,
        on_nonfinite: OnNonfinite = "skip",
        maximize: bool = False,
        fused: bool | None = None,
        foreach: bool | None = None,
        on_empty: OnEmpty = "raise",
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            clip_value=clip_value,
            on_nonfinite=on_nonfinite,
            maximize=maximize,
            fused=fused,
            foreach=foreach,
            decoupled_weight_decay=True,
            on_empty=on_empty,
            amsgrad=amsgrad,
            capturable=capturable,
            differentiable=differentiable,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Like torch.optim.AdamW: a loaded Adam state dict does not turn the decay back into L2.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


# -- helpers ----------------------------------------------------------------------------------------


def _fused_group_step_(batch: _GroupBatch, k: float) -> float:
    """Pass 2 of the fused kernel for one group, one call per distinct step count (a single call over the
    whole group in the usual case of one count); returns sum of y**2."""
    h = batch.hyperparameters()
    counts = torch.stack(batch.steps).tolist()  # CPU tensors, one read: no synchronisation
    if counts.count(counts[0]) == len(counts):  # the usual case: one count for the whole group
        by_step = {counts[0]: None}
    else:
        by_step = {}
        for i, count in enumerate(counts):
            by_step.setdefault(count, []).append(i)
    clipped_sum_sq = 0.0
    for step, indices in by_step.items():
        t = step + 1
        clipped_sum_sq += fused.adam_update_(
            *(
                state if indices is None else [state[i] for i in indices]
                for state in (batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs)
            ),
            k=k,
            lr=float(h["lr"]),  # CPU tensors (the C kernel's tensors are on the CPU): no synchronisation
            beta1=float(h["beta1"]),
            beta2=float(h["beta2"]),
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            decoupled=h["decoupled_weight_decay"],
            maximize=h["maximize"],
            bias_correction1=1 - float(h["beta1"]) ** t,
            bias_correction2_sqrt=(1 - float(h["beta2"]) ** t) ** 0.5,
            check=False,  # Adam._use_fused checked every tensor of the step
        )
    fused.advance_step_counts_(batch.steps, check=False)  # float32 CPU counts: Adam._use_fused checked them
    return clipped_sum_sq


def _fresh_state(p: Tensor, step_dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        "step": torch.zeros((), dtype=step_dtype, device=p.device),
        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
    }


def _default_step_dtype() -> torch.dtype:
    """torch.optim.Adam's step count dtype off its fused path (torch.optim.optimizer._get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def moment_limit(dtype: torch.dtype) -> float:
    r"""The largest gradient bound :math:`Y` whose square, with rounding, stays finite in ``dtype``:
    :math:`\sqrt{\max_d}\,(1 - 2^{-19})`. Adam's second moment stays finite while every gradient element
    it sees is at most this (see :func:`_check_update_stays_finite`)."""
    return math.sqrt(torch.finfo(dtype).max) * (1 - 2**-19)


def _update_overflow_flag(
    batches: list[_GroupBatch], total_norm: Tensor | float, clip_value: float | None
) -> Tensor | bool | None:
    r"""True when the update could overflow the second moment although every input is finite.

    Each clipped gradient element has :math:`|y_i| \le Y = \min(N, c)` (the global norm bounds every
    element), and L2 weight decay adds :math:`\lambda\theta_i`, so the gradient Adam uses is bounded by
    :math:`Y + \lambda \max|\theta|`. Up to :func:`moment_limit` the second moment stays finite (see
    :func:`_check_update_stays_finite`); at or above it the step is skipped like a non-finite one (or raises).
    With a clip value and no L2 decay the precondition already keeps :math:`c` below that: ``None``, no work.
    L2 decay reads :math:`\max|\theta|` (one ``_foreach_norm(inf)`` over that group's parameters). A tensor
    ``total_norm`` gives a device flag (no host read); a float gives a bool.
    """
    on_device = isinstance(total_norm, Tensor)
    flags = []
    for b in batches:
        g = b.group
        l2 = 0.0 if g["decoupled_weight_decay"] else g["weight_decay"]
        if clip_value is not None and l2 == 0:
            continue
        limit = min(moment_limit(p.dtype) for p in b.params)
        bound = (
            total_norm
            if clip_value is None
            else (torch.clamp(total_norm, max=clip_value) if on_device else min(total_norm, clip_value))
        )
        bound = bound * (1 + 2**-20)
        if l2:
            theta = torch.stack(torch._foreach_norm(b.params, math.inf)).amax().double()
            bound = bound + l2 * (theta.to(total_norm.device, non_blocking=True) if on_device else float(theta))
        flags.append(bound > limit)
    if not flags:
        return None
    if not on_device:
        return any(flags)
    return torch.stack(flags).any() if len(flags) > 1 else flags[0]


def _check_update_stays_finite(batches: list[_GroupBatch], clip_value: float | None) -> None:
    r"""Refuse settings under which the update itself could overflow from finite inputs (host values only).

    * AdamW's decay multiplies the parameters by :math:`1 - \eta\lambda`; with :math:`\eta\lambda > 1` it
      flips their sign and grows them (``weight_decay=1e30`` overflows at once). Required: ``lr *
      weight_decay <= 1``.
    * With a clip value :math:`c` each clipped gradient element has :math:`|y| \le c (1 + 2^{-22})`, and
      :math:`v' = \beta_2 v + (1 - \beta_2) y^2` is a convex combination: by induction, with rounding to
      nearest being monotone, every stored :math:`v` stays at most :math:`\max(v_0, B)`, :math:`B` the
      value of dtype :math:`d` next above :math:`c^2 (1 + 2^{-20})` (a :math:`v` above :math:`c^2` only
      decays, and rounds to at most itself). Required: :math:`c \le` :func:`moment_limit` of :math:`d`,
      :math:`\sqrt{\max_d}\,(1 - 2^{-19})` (float16: 255.9; float32 and bfloat16: 1.8e19).

    Outside these (L2 decay, which adds :math:`\lambda\theta` to the gradient, or no clip value) the update is
    not bounded by the hyper-parameters alone; a non-finite moment is then caught by the checkpoint's
    finiteness rule.
    """
    for b in batches:
        g = b.group
        label = f"param_groups[{b.group_index}]"
        # A device tensor lr (capturable) is not read: no synchronisation.
        lr = _host_value(g["lr"]) if g["decoupled_weight_decay"] and g["weight_decay"] else None
        if lr is not None and lr * g["weight_decay"] > 1:
            raise ValueError(
                f"{label}: lr * weight_decay = {lr * g['weight_decay']:.3g} > 1: AdamW's decay "
                f"theta * (1 - lr * weight_decay) would flip and grow the parameters until they overflow; use "
                "weight_decay <= 1 / lr (typically 0.01 to 0.1)"
            )
        if clip_value is None:
            continue
        for dtype in {p.dtype for p in b.params}:
            largest = moment_limit(dtype) if dtype.is_floating_point else math.inf
            if clip_value > largest:  # c^2 past the dtype's range, without squaring c (it may overflow a float)
                raise ValueError(
                    f"{label}: clip_value={clip_value!r} is too large for {dtype} parameters: exp_avg_sq, which "
                    f"grows to about clip_value**2, could overflow {dtype}; use clip_value <= {largest:.4g} or "
                    "wider parameters"
                )


_FLOAT16_EPS_FLOOR = 2.0**-25
"""The largest eps that rounds to 0 in float16: half of float16's smallest value, 2^-24 (ties go to even, 0)."""


def _check_eps_fits_float16(batches: list[_GroupBatch]) -> None:
    """Refuse float16 parameters on the reference path when eps rounds to 0 in float16.

    The reference path computes in the parameters' dtype, as torch's loop does: ``denom = sqrt(v) /
    sqrt(bias_correction2) + eps`` is 0 in float16 wherever the second moment is 0 (a zero or underflowing
    gradient element), and the update ``m / denom`` writes 0/0 = NaN or m/0 = inf into the weights from finite
    inputs. (The multi-tensor path, which contiguous float16 tensors take by default, computes in float32.)
    """
    for b in batches:
        eps = b.group["eps"]
        if eps <= _FLOAT16_EPS_FLOOR and any(p.dtype is torch.float16 for p in b.params):
            raise ValueError(
                f"param_groups[{b.group_index}]: eps={eps!r} rounds to 0 in float16, and this step takes the "
                "reference path (fused=False, or a tensor no kernel takes: strided, a subclass), which computes "
                "in the parameters' dtype as torch's loop does: an element whose second moment is 0 would get "
                "0/0 = NaN written into the weights. Use eps >= 6e-8 (float16's smallest value), or let the "
                "float16 parameters take the multi-tensor path (fused=None with contiguous tensors), which "
                "computes in float32."
            )


def _check_hyperparameters(values: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Raise for the first invalid value, naming it, its valid range and a fix; return ``values``."""
    # A tensor lr is kept as the tensor it is (a scheduler fills it in place, as in torch); its value is checked.
    check_learning_rate(values["lr"], where=where)
    betas = values["betas"]
    tensor_betas = isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas)
    if tensor_betas:
        if not all(isinstance(b, Tensor) for b in betas):
            raise ValueError(f"{where}betas must be either both floats or both Tensors, got {betas!r}")
        for i, b in enumerate(betas):
            if b.numel() != 1:
                raise ValueError(f"{where}Tensor betas[{i}] must be 1-element, e.g. betas=(0.9, 0.999)")
        stored = tuple(_to_scalar(b) for b in betas)  # torch keeps 0-d tensors
        betas = tuple(float(b) for b in betas)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(is_real(b) for b in betas):
        raise TypeError(f"{where}betas={betas!r} must be a pair of floats, e.g. betas=(0.9, 0.999)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(
                f"{where}betas[{i}]={beta!r} is outside [0, 1): each moment decay rate must satisfy "
                "0 <= beta < 1, e.g. betas=(0.9, 0.999)"
            )
    values["betas"] = stored if tensor_betas else (float(betas[0]), float(betas[1]))
    for name, typical in (("eps", "1e-8"), ("weight_decay", "0.0 or 1e-2")):
        value = values[name]
        if not is_real(value):
            raise TypeError(f"{where}{name}={value!r} must be a float, e.g. {name}={typical}")
        if not (value >= 0.0 and math.isfinite(value)):
            raise ValueError(f"{where}{name}={value!r} must be finite and >= 0, e.g. {name}={typical}")
    if values["eps"] == 0.0:
        # m / (sqrt(v) + 0) is 0/0 = NaN wherever a gradient entry and its moments are exactly 0: a finite
        # loss and finite gradients would write NaN weights (the optimizer contract's `epsilon > 0.0`).
        raise ValueError(f"{where}eps=0.0 must be > 0: Adam divides by sqrt(v) + eps; pass e.g. eps=1e-8")
    for name in ("maximize", "decoupled_weight_decay", "amsgrad", "capturable"):
        if name in values and not isinstance(values[name], bool):
            raise TypeError(f"{where}{name}={values[name]!r} must be True or False")
    if values.get("differentiable"):
        raise ValueError(f"{where}differentiable=True is not supported: {NOT_DIFFERENTIABLE}")
    return values


def _host_value(value: float | Tensor) -> float | None:
    """A hyper-parameter as a float when reading it is free (a float or a CPU tensor), else ``None``."""
    if isinstance(value, Tensor):
        return float(value) if value.device.type == "cpu" else None
    return float(value)


def _check_tensor_hyperparameters_with_foreach(defaults: Mapping[str, Any], foreach: bool | None) -> None:
    """torch's rule: a Tensor lr or Tensor betas with ``foreach=True`` needs ``capturable=True``."""
    if foreach is not True or defaults["capturable"]:
        return
    if isinstance(defaults["lr"], Tensor):
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    for i, beta in enumerate(defaults["betas"]):
        if isinstance(beta, Tensor):
            raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")


def _check_foreach(value: object, fused_value: bool | None) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"foreach={value!r} must be True, False or None (choose the path automatically)")
    if value is True and fused_value is True:
        raise ValueError(
            "foreach=True and fused=True name two different paths; pass one of them (fused=True: the C kernel "
            "for float32 CPU tensors; foreach=True: torch's multi-tensor kernels on any device)"
        )
    return value


def _check_fused(value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"fused={value!r} must be True, False or None (use the kernel when available)")
    if value is True and not fused.fused_available():
        raise RuntimeError(
            f"fused=True, but the fused Adam kernel is unavailable ({fused.fused_unavailable_reason()}); "
            "pass fused=None to use it only when available, or fused=False."
        )
    return value


def _holds_tensor(value: object) -> bool:
    """``value`` is a Tensor, or a tuple holding one (Tensor ``betas``)."""
    return isinstance(value, Tensor) or (isinstance(value, tuple) and any(isinstance(v, Tensor) for v in value))
