"""From what a model's forward returns to the loss: ``output_key`` and the loss function.

Models return a tensor of logits, a tuple (nanoGPT returns ``(logits, loss)``), a dict, or a Hugging Face
``ModelOutput`` (a dict that also indexes by position). ``output_key`` picks the part the loss is computed
from: an ``int`` indexes a tuple, a list or a ``ModelOutput``; a ``str`` is a key of a mapping (``dict``,
``ModelOutput``) or an attribute of a named tuple. The loss is then ``loss_fn(selected, targets)``;
without ``output_key``, ``loss_fn`` gets the whole output (a custom ``loss_fn`` may take a tuple).

The default loss is cross-entropy (per token for a language model) and needs a tensor of logits: any other
output is refused by :class:`ModelOutputError`, which names the ``output_key`` to set, not Python's
``AttributeError: 'tuple' object has no attribute 'flatten'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossFn", "ModelOutputError", "default_loss", "describe_output", "loss_on_output", "select_output"]

LossFn = Callable[[Any, Tensor], Tensor]
OutputKey = int | str | None


class ModelOutputError(TypeError):
    """The model's output is not what the loss needs; ``key`` is the setting to change (``output_key``)."""

    def __init__(self, message: str, *, key: str = "output_key") -> None:
        super().__init__(message)
        self.key = key


def describe_output(output: Any) -> str:
    """``tuple of 2 (Tensor[8, 65, 10], Tensor[])``, ``dict with keys 'loss', 'logits'``: for messages."""
    if isinstance(output, Tensor):
        return f"Tensor{list(output.shape)}"
    if isinstance(output, Mapping):
        return f"{type(output).__name__} with keys {', '.join(repr(k) for k in output)}"
    if isinstance(output, tuple | list):
        parts = ", ".join(describe_output(part) if isinstance(part, Tensor) else type(part).__name__ for part in output)
        return f"{type(output).__name__} of {len(output)} ({parts})"
    return type(output).__name__


def _suggestion(output: Any) -> str:
    """The ``output_key`` most likely meant: ``logits`` when a mapping has it, else the first tensor."""
    if isinstance(output, Mapping):
        keys = list(output)
        return repr("logits" if "logits" in keys else next(iter(keys), "logits"))
    if isinstance(output, tuple | list):
        return str(next((i for i, part in enumerate(output) if isinstance(part, Tensor)), 0))
    return "0"


def select_output(output: Any, key: OutputKey) -> Any:
    """The part of ``output`` at ``key`` (``output`` itself for ``None``).

    Raises:
        ModelOutputError: ``key`` does not index this kind of output, or is not in it.
    """
    if key is None:
        return output
    if isinstance(key, str):
        if isinstance(output, Mapping):
            if key in output:
                return output[key]
        elif not isinstance(output, Tensor) and hasattr(output, key):  # a named tuple, a dataclass
            return getattr(output, key)
        raise ModelOutputError(
            f"output_key {key!r} is not in the model's output, a {describe_output(output)}; "
            f"set output_key to one of its keys (e.g. {_suggestion(output)})"
        )
    if isinstance(output, Mapping) and key not in output and hasattr(output, "to_tuple"):
        output = output.to_tuple()  # a Hugging Face ModelOutput indexes by position like this
    if isinstance(output, tuple | list):
        if -len(output) <= key < len(output):
            return output[key]
        raise ModelOutputError(
            f"output_key {key} is out of range for the model's output, a {describe_output(output)}; "
            f"set output_key to an index from 0 to {len(output) - 1}"
        )
    raise ModelOutputError(
        f"output_key {key} indexes a tuple or list, but the model's output is a {describe_output(output)}; "
        + ("remove output_key" if isinstance(output, Tensor) else f"use one of its keys (e.g. {_suggestion(output)})")
    )


def default_loss(task: str) -> LossFn:
    """Cross-entropy on a tensor of logits: per token for ``language-model`` (logits ``(B, T, V)``, targets
    ``(B, T)``), per example otherwise; any other output raises :class:`ModelOutputError`."""

    def loss(logits: Any, targets: Tensor) -> Tensor:
        if not isinstance(logits, Tensor):
            raise ModelOutputError(
                f"the model returned a {describe_output(logits)}, and the default loss (cross-entropy) needs a "
                f"tensor of logits: set output_key to the part holding them (output_key: {_suggestion(logits)}), "
                "or set loss_fn: module:function to compute the loss from the whole output"
            )
        if task == "language-model":
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return F.cross_entropy(logits, targets)

    return loss


def loss_on_output(loss_fn: LossFn, key: OutputKey) -> LossFn:
    """``(output, targets) -> loss_fn(select_output(output, key), targets)``."""
    if key is None:
        return loss_fn
    return lambda output, targets: loss_fn(select_output(output, key), targets)
