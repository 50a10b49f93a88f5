"""Python predicates for the contract's Rust-like clause text, bound by the exact text.

The contract writes clauses as Rust expressions (``!params.is_empty()``,
``gradients.iter().all(|g| g.is_finite())``). Each has one Python predicate here, registered under that
exact text; a clause whose text has no predicate is an unbound clause (a gap), never silently true.

A predicate's parameter names are the clause's free variables. Predicates over tensors return a 0-d bool
tensor on the tensors' device, so a caller can keep the check on the GPU and read it when it chooses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PREDICATES", "Predicate", "predicate_for"]


@dataclass(frozen=True)
class Predicate:
    """A clause's executable meaning.

    Attributes:
        text: the clause exactly as written in the contract.
        function: the Python predicate; its parameters are the clause's variables.
    """

    text: str
    function: Callable[..., bool | torch.Tensor]

    @property
    def name(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(inspect.signature(self.function).parameters)

    def __call__(self, **values: Any) -> bool | torch.Tensor:
        return self.function(**{name: values[name] for name in self.variables})


PREDICATES: dict[str, Predicate] = {}


def _binds(text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        PREDICATES[text] = Predicate(text, function)
        return function

    return register


def predicate_for(text: str) -> Predicate | None:
    """The predicate bound to this exact clause text, or None (an unbound clause)."""
    return PREDICATES.get(text)


@_binds("lr > 0.0")
def lr_is_positive(lr: float) -> bool:
    """``lr > 0.0``: false for NaN as well."""
    return lr > 0.0


@_binds("lr < lr_max")
def lr_is_below_lr_max(lr: float, lr_max: float) -> bool:
    """``lr < lr_max``: the largest stable learning rate is exclusive."""
    return lr < lr_max


@_binds("!params.is_empty()")
def params_are_not_empty(params: Iterable[torch.Tensor]) -> bool:
    """``!params.is_empty()``: at least one parameter tensor holding at least one element."""
    return any(p.numel() > 0 for p in params)


@_binds("loss.is_finite()")
def loss_is_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss.is_finite()``: neither NaN nor ±Inf (0-d bool tensor, no host sync)."""
    return torch.isfinite(loss).all()


@_binds("!loss.is_nan()")
def loss_is_not_nan(loss: torch.Tensor) -> torch.Tensor:
    """``!loss.is_nan()`` (0-d bool tensor, no host sync)."""
    return ~torch.isnan(loss).any()


@_binds("clip_value > 0.0")
def clip_value_is_positive(clip_value: float) -> bool:
    """``clip_value > 0.0``: false for NaN as well."""
    return clip_value > 0.0


@_binds("!gradients.is_empty()")
def gradients_are_not_empty(gradients: Iterable[torch.Tensor]) -> bool:
    """``!gradients.is_empty()``: at least one gradient tensor."""
    return any(True for _ in gradients)


@_binds("gradients.iter().all(|g| g.is_finite())")
def gradients_are_finite(gradients: Iterable[torch.Tensor]) -> torch.Tensor:
    """``gradients.iter().all(|g| g.is_finite())`` (0-d bool tensor on the first gradient's device)."""
    flags = [torch.isfinite(g).all() for g in gradients]
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


@_binds("grad_norm <= clip_value")
def grad_norm_is_within_clip(grad_norm: float | torch.Tensor, clip_value: float) -> bool | torch.Tensor:
    """``grad_norm <= clip_value``, where ``grad_norm`` is the norm of the gradient after clipping."""
    return grad_norm <= clip_value


# The training siblings' clauses (optimizer-v1, batch-v1, checkpoint-v1, backward-pass-v1), registered here too.
from provetrain.contract import family_predicates as _family_predicates  # noqa: E402, F401
