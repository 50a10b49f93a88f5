"""What :class:`provetrain.Adam` re-uses between steps: each parameter's state tensors, already fetched.

Fetching a parameter's state (``Optimizer.state[p]``, three dictionary reads) and checking it cost about 2 us a
parameter: 0.4 ms of a 2.0 ms step at 200 tensors of 5,000 elements. A :class:`StateCache` keeps, for the
parameters that had a gradient last step, their state dictionaries and tensors, and whether torch's fused kernel
took them. It stands only while it provably describes the optimizer:

* the same parameters with a gradient, group by group, in the same order (by identity), with the same
  ``amsgrad`` setting, and
* for each of them, the same state dictionary holding the same tensors (by identity: ``load_state_dict``
  makes new dictionaries, and a state entry replaced, as Lightning does when it moves a state to another
  device, ends the cache).

Checking that is about 0.3 us a parameter. A state tensor that is still the same object may still have changed
in place (``.data`` assigned, ``set_``, ``resize_``, ``transpose_``): the kernels' checks therefore still run
every step on what can change (the C kernel: dtype, device and contiguity of every moment and count, element
counts against the parameters; torch's fused kernel: dtype, shape and strides against the parameters), and only
a tensor's Python type, which cannot change, is not checked again. A mismatch leaves the fast paths, and a moment
whose shape or dtype is not its parameter's is refused by name before anything changes.

The cache holds last step's state tensors until the next step or until the optimizer goes: state dropped from
``Optimizer.state`` by hand (``state.clear()``) is freed at the next step, not at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import is_
from typing import Any

from torch import Tensor

__all__ = ["StateCache"]

_NAMES = ("exp_avg", "exp_avg_sq", "step")
_NAMES_AMSGRAD = (*_NAMES, "max_exp_avg_sq")


@dataclass
class _BatchState:
    group_index: int
    amsgrad: bool
    keys: list[Tensor]
    exp_avgs: list[Tensor]  # real views, as the batch holds them
    exp_avg_sqs: list[Tensor]
    steps: list[Tensor]
    max_exp_avg_sqs: list[Tensor]


@dataclass
class StateCache:
    """The state tensors of one step's parameters, batch by batch (see the module docstring)."""

    batches: list[_BatchState]
    states: list[tuple[dict[str, Any], tuple[Tensor, ...]]]  # per key, all batches in turn: the dict, its tensors
    numels: list[int]  # the element counts of the parameters (real views), all batches in turn, when cached
    multi_tensor_ready: bool = field(default=False)  # torch's fused kernel takes the state (False: not checked)

    @classmethod
    def of(cls, container: Mapping[Tensor, Any], batches: Sequence[Any]) -> StateCache:
        """The cache of ``batches``, whose state exists and is attached (after the optimizer attached it)."""
        cached, states = [], []
        for b in batches:
            cached.append(_BatchState(b.group_index, b.amsgrad, list(b.keys), list(b.exp_avgs),
                                      list(b.exp_avg_sqs), list(b.steps), list(b.max_exp_avg_sqs)))  # fmt: skip
            names = _NAMES_AMSGRAD if b.amsgrad else _NAMES
            for p in b.keys:
                state = container[p]
                states.append((state, tuple(state[name] for name in names)))
        return cls(cached, states, [p.numel() for b in batches for p in b.params])

    def describes(self, container: Mapping[Tensor, Any], batches: Sequence[Any]) -> bool:
        """Whether this cache still holds the state of ``batches`` (see the module docstring)."""
        if len(batches) != len(self.batches):
            return False
        for b, c in zip(batches, self.batches, strict=True):
            if b.group_index != c.group_index or b.amsgrad != c.amsgrad or len(b.keys) != len(c.keys):
                return False
            if not all(map(is_, b.keys, c.keys)):  # identity, element by element, without a Python frame each
                return False
        get = container.get
        keys = (p for c in self.batches for p in c.keys)
        for p, (state, tensors) in zip(keys, self.states, strict=True):
            if get(p) is not state or not all(map(is_, map(state.get, _NAMES_AMSGRAD), tensors)):
                return False
        return True

    def attach(self, batches: Sequence[Any]) -> None:
        """Fill each batch's state lists from the cache (``describes(..., batches)`` must hold)."""
        for b, c in zip(batches, self.batches, strict=True):
            b.exp_avgs[:] = c.exp_avgs
            b.exp_avg_sqs[:] = c.exp_avg_sqs
            b.steps[:] = c.steps
            b.max_exp_avg_sqs[:] = c.max_exp_avg_sqs
