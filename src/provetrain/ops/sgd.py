r"""SGD with momentum behind the global-norm clip and the finite guard of :mod:`provetrain.ops.guarded`.

One step, for the gradients :math:`g` of every parameter that has one (all groups together), with
:math:`k` the clip coefficient of the global norm (``clip_value``), :math:`\mu` the momentum,
:math:`\tau` the dampening, :math:`\lambda` the weight decay and :math:`\eta` the learning rate:

.. math::
    y &= \operatorname{fl}(g \cdot k), \qquad y \leftarrow -y \text{ if maximize}, \qquad
    y \leftarrow y + \lambda\theta \\
    b &\leftarrow y \text{ (first step)}, \quad\text{else}\quad b \leftarrow \mu b + (1 - \tau) y \\
    d &= y + \mu b \text{ (Nesterov)}, \quad d = b \text{ (momentum)}, \quad d = y \text{ (}\mu = 0\text{)} \\
    \theta &\leftarrow \theta - \eta d

and when the guard's ``skip`` holds, :math:`\theta` and :math:`b` keep their bits (a momentum buffer that
did not exist is not created). The operations are ``torch.optim.SGD(foreach=False)``'s, in its order, on the
same operands: without clipping (or when nothing is clipped, :math:`k = 1`) the trajectory is torch's bit
for bit. Momentum is Polyak's heavy ball in Sutskever et al.'s form, Nesterov's variant as torch writes it.

Guarantees:
    * The gradient SGD uses is :math:`y`, whose norm obeys the contract clause ``grad_norm <= clip_value``
      (the clip of :mod:`provetrain.ops.clip`); it is reported as ``last_clipped_grad_norm``.
    * A skipped step changes no parameter and no momentum buffer and counts once in ``skipped_steps``.
    * With ``on_nonfinite="skip"`` a step makes no host-device synchronisation, except the first step of
      a parameter group with momentum: torch starts the buffer as a copy of the first gradient, so whether
      to create it is read from the skip flag once (free on CPU).

References:
    * B. T. Polyak. *Some methods of speeding up the convergence of iteration methods*. 1964.
    * I. Sutskever, J. Martens, G. Dahl, G. Hinton. *On the importance of initialization and momentum in
      deep learning*. ICML 2013.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from provetrain.ops.clip import check_gradual_underflow, scale_gradient, scaled_sum_of_squares
from provetrain.ops.guarded import (
    GroupBatch,
    GuardedOptimizer,
    OnEmpty,
    OnNonfinite,
    check_differentiable,
    check_learning_rate,
    is_real,
    is_set,
    real_view,
    unscale_,
)

__all__ = ["SGD", "sgd_step_"]

_STATE_KEYS = frozenset({"momentum_buffer"})


def sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    skip: Tensor | None = None,
    k: Tensor | None = None,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[Tensor, Tensor] | None:
    r"""One clipped SGD step, in place, unless ``skip``: the reference implementation.

    Args:
        params, grads: one tensor per parameter, in the same order.
        momentum_buffers: each parameter's buffer :math:`b`, or ``None`` before its first step; a new
            buffer is written into the list (when ``momentum != 0``). A ``None`` entry requires ``skip`` to
            be ``None`` (the caller has decided, on the host, that this step is applied).
        skip: 0-d bool tensor; where it holds nothing changes (bit for bit). ``None`` steps.
        k: 0-d float64 clip coefficient from :func:`provetrain.ops.clip.clip_coefficient`, or ``None``.
        lr, momentum, dampening, weight_decay: :math:`\eta, \mu, \tau, \lambda` (``lr`` may be a 0-d
            tensor, read as torch's ``add_(alpha=-lr)`` reads it).
        nesterov, maximize: Nesterov momentum; ascend instead of descend.

    Returns:
        With ``k``: the scaled sum of squares ``(s, e)`` of the clipped gradients :math:`y` (before maximize
        and weight decay), :math:`s\,4^e`. Without: ``None``.

    Call it under ``torch.no_grad()``.
    """
    if not params:
        return None
    if skip is not None and momentum != 0 and any(b is None for b in momentum_buffers):
        raise ValueError("sgd_step_: a parameter without a momentum buffer needs skip=None (decide on the host)")
    ys = list(grads) if k is None else [scale_gradient(g, k.to(g.device, non_blocking=True)) for g in grads]
    clipped_sum_sq = None if k is None else scaled_sum_of_squares(ys)
    alpha = -(lr.squeeze() if isinstance(lr, Tensor) else lr)
    for i, (param, y) in enumerate(zip(params, ys, strict=True)):
        d = y if not maximize else -y
        if weight_decay != 0:
            d = d.add(param, alpha=weight_decay)
        new_buffer = None
        if momentum != 0:
            buffer = momentum_buffers[i]
            new_buffer = d.detach().clone() if buffer is None else buffer.mul(momentum).add_(d, alpha=1 - dampening)
            d = d.add(new_buffer, alpha=momentum) if nesterov else new_buffer
        new_param = param.add(d, alpha=alpha)
        _keep_or_write(param, new_param, skip)
        if new_buffer is not None:
            if momentum_buffers[i] is None:
                momentum_buffers[i] = new_buffer
            else:
                _keep_or_write(momentum_buffers[i], new_buffer, skip)  # type: ignore[arg-type]
    return clipped_sum_sq


def _keep_or_write(old: Tensor, new: Tensor, skip: Tensor | None) -> None:
    if skip is None:
        old.copy_(new)
    else:
        torch.where(skip.to(old.device, non_blocking=True), old, new, out=old)


@dataclass
class _SGDBatch(GroupBatch):
    """One group's parameters with a gradient this step and their momentum buffers (``None``: none yet)."""

    momentum_buffers: list[Tensor | None] = field(default_factory=list)

    def hyperparameters(self) -> dict[str, Any]:
        g = self.group
        return {name: g[name] for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}


class SGD(GuardedOptimizer):
    r"""Stochastic gradient descent with momentum, a global-norm gradient clip and a finite guard.

    A drop-in for ``torch.optim.SGD`` + ``torch.nn.utils.clip_grad_norm_``: the same keywords and the same
    trajectory (bit for bit when nothing is clipped), with Adam's clip, guard, counters and policies
    (see :class:`~provetrain.ops.adam.Adam` and the module docstring for the math):

    * ``clip_value``: one global norm over all parameters, the contract's ``grad_norm <= clip_value``.
    * ``on_nonfinite="skip"`` (default): a non-finite loss, observed micro-step loss
      (:meth:`observe_loss`) or gradient skips the step: parameters and momentum buffers keep their bits,
      ``skipped_steps`` grows by one. ``"raise"``: nothing changes and
      :class:`~provetrain.errors.ContractViolation` names the loss or the first bad parameter.
    * ``on_empty``: a step without any gradient raises (the contract's ``!gradients.is_empty()``) or, with
      ``"skip"``, changes nothing and counts in ``empty_steps``.
    * Counters ``skipped_steps``, ``last_grad_norm``, ``last_clipped_grad_norm``, ``empty_steps``, saved by
      :meth:`state_dict` beside torch's state (``momentum_buffer`` per parameter, torch's layout: state
      dicts move both ways between this class and ``torch.optim.SGD``).

    Args:
        params: tensors, ``model.named_parameters()`` (names then appear in errors), or parameter-group
            dicts that may override the hyper-parameters below.
        lr: learning rate :math:`\eta > 0` (contract clause ``lr > 0.0``); a 1-element tensor is kept as a
            tensor, as in torch.
        momentum: :math:`\mu \ge 0`.
        dampening: :math:`\tau`, the share of the gradient left out of the buffer's update.
        weight_decay: :math:`\lambda \ge 0`, an L2 penalty added to the gradient.
        nesterov: Nesterov momentum (requires ``momentum > 0`` and ``dampening == 0``, as torch).
        clip_value, on_nonfinite, on_empty: as above.
        maximize: ascend the objective instead of descending it.
        foreach, fused: torch's implementation choices, accepted (``None``, ``True`` or ``False``) and
            without effect: provetrain's SGD has one implementation, the reference path, torch's loop.
        differentiable: ``False`` only; ``True`` is refused with the reason.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = SGD(model.named_parameters(), lr=0.1, momentum=0.9, clip_value=1.0)
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> opt.step()
        >>> opt.last_clipped_grad_norm <= 1.0
        tensor(True)
    """

    _batch_type = _SGDBatch
    _algorithm = "SGD"
    _sparse_alternative = "torch.optim.SGD (provetrain's clip and guard need dense gradients)"
    _untouched = "Nothing was updated: parameters and momentum buffers are as before this step."

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        clip_value: float | None = None,
        on_nonfinite: OnNonfinite = "skip",
        on_empty: OnEmpty = "raise",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_differentiable(
            differentiable, alternative="Use torch.optim.SGD(differentiable=True) with torch's clip for meta-learning"
        )
        for name, value in (("foreach", foreach), ("fused", fused)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True, False or None")
        if foreach and fused:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = _check_hyperparameters(
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": maximize,
            },
            where="",
        )
        self._init_guard(clip_value, on_nonfinite, on_empty)
        self.foreach, self.fused = foreach, fused
        self._init_params(params, defaults)
        # Steps taken with gradients since construction: a host count, for messages only.
        self._steps_taken = 0

    # -- the step ---------------------------------------------------------------------------------

    def _step_batches(
        self,
        batches: list[_SGDBatch],
        loss: Tensor | float | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        observed: Tensor | None,
    ) -> None:
        if self.clip_value is not None:
            check_gradual_underflow({b.params[0].device for b in batches})
        if grad_scale is not None:
            unscale_(batches, grad_scale)
        self._step_reference(batches, loss, None if found_inf is None else found_inf > 0, observed)
        self._steps_taken += 1  # applied or skipped; a step that raised was not taken

    def _attach_state(self, batches: list[_SGDBatch], step_dtype: torch.dtype) -> None:
        for b in batches:
            if b.group["momentum"] == 0:
                continue
            for p in b.keys:
                buffer = self.state[p].get("momentum_buffer")
                b.momentum_buffers.append(None if buffer is None else real_view(buffer))

    def _update_reference(self, batch: _SGDBatch, skip: Tensor, k: Tensor | None) -> tuple[Tensor, Tensor] | None:
        b = batch
        h = b.hyperparameters()
        buffers = b.momentum_buffers if h["momentum"] != 0 else [None] * len(b.params)
        step_skip: Tensor | None = skip
        if h["momentum"] != 0 and any(buffer is None for buffer in buffers):
            # torch starts a buffer as a copy of the first gradient: create it only if the step applies, a
            # host read of the flag (free on CPU), once per parameter.
            if is_set(skip):
                ys = b.grads if k is None else [scale_gradient(g, k.to(g.device)) for g in b.grads]
                return None if k is None else scaled_sum_of_squares(ys)
            step_skip = None
        clipped = sgd_step_(b.params, b.grads, buffers, skip=step_skip, k=k, **h)
        if h["momentum"] != 0:
            for p, buffer in zip(b.keys, buffers, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state or state["momentum_buffer"] is None:
                    state["momentum_buffer"] = torch.view_as_complex(buffer) if p.is_complex() else buffer
        return clipped

    def _current_step(self) -> int:
        """1-based number of this step: the steps taken (applied or skipped, empty ones not counted), plus one."""
        return self._steps_taken + 1

    # -- parameter groups and state dicts ---------------------------------------------------------

    def _check_group(self, merged: dict[str, Any], *, where: str) -> dict[str, Any]:
        return _check_hyperparameters(merged, where=where)

    def _pickled_attributes(self) -> tuple[str, ...]:
        return (*super()._pickled_attributes(), "foreach", "fused", "_steps_taken")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_steps_taken", 0)
        for group in self.param_groups:
            for key in ("foreach", "fused", "differentiable"):
                group.pop(key, None)
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _check_loadable(self, state_dict: Mapping[str, Any]) -> None:
        super()._check_loadable(state_dict)
        for label, p, p_state, _ in self._saved_parameter_states(state_dict):
            if not set(p_state) <= _STATE_KEYS:
                raise ValueError(
                    f"state_dict holds keys {sorted(p_state)} for {label}, expected {sorted(_STATE_KEYS)}: "
                    "it was not saved by SGD (provetrain or torch.optim)."
                )
            buffer = p_state.get("momentum_buffer")
            if buffer is not None and tuple(buffer.shape) != tuple(p.shape):
                raise ValueError(
                    f"state_dict momentum_buffer for {label} has shape {tuple(buffer.shape)} but the parameter "
                    f"has shape {tuple(p.shape)}: the state dict belongs to a different model."
                )


def _check_hyperparameters(values: dict[str, Any], *, where: str) -> dict[str, Any]:
    """Raise for the first invalid value (torch's order and types), naming it and a fix; return ``values``."""
    lr = values["lr"]
    check_learning_rate(lr, where=where)
    if isinstance(lr, Tensor) and lr.dim() != 0:
        values["lr"] = lr.squeeze()  # as torch's _to_scalar uses it
    for name, typical in (("momentum", "0.9"), ("weight_decay", "0.0 or 1e-4")):
        value = values[name]
        if not is_real(value):
            raise TypeError(f"{where}{name}={value!r} must be a float, e.g. {name}={typical}")
        if not (value >= 0.0 and math.isfinite(value)):
            raise ValueError(f"{where}Invalid {name} value: {value!r}; it must be finite and >= 0, e.g. {typical}")
    dampening = values["dampening"]
    if not is_real(dampening) or not math.isfinite(dampening):
        raise TypeError(f"{where}dampening={dampening!r} must be a finite float, e.g. dampening=0.0")
    for name in ("nesterov", "maximize"):
        if not isinstance(values[name], bool):
            raise TypeError(f"{where}{name}={values[name]!r} must be True or False")
    if values["nesterov"] and (values["momentum"] <= 0 or dampening != 0):
        raise ValueError(
            f"{where}Nesterov momentum requires a momentum and zero dampening: got momentum={values['momentum']!r}, "
            f"dampening={dampening!r}; pass e.g. momentum=0.9, dampening=0.0"
        )
    if values.get("differentiable"):
        check_differentiable(True, alternative="Use torch.optim.SGD(differentiable=True)")
    return values
