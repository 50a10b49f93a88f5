"""What :class:`provetrain.Adam` re-uses between steps: each parameter's state tensors, already fetched and checked.

Fetching a parameter's state (``Optimizer.state[p]``, three dictionary reads) and checking its moments for the C
kernel cost about 2 us a parameter: 0.4 ms of a 2.0 ms step at 200 tensors of 5,000 elements. A :class:`StateCache`
keeps, for the parameters that had a gradient last step, their state dictionaries and tensors, and whether the C
kernel and torch's fused kernel take them (checked once per cache). It stands only while it provably describes the
optimizer:

* the same parameters with a gradient, group by group, in the same order (by identity), with the same
  ``amsgrad`` setting, and
* for each of them, the same state dictionary holding the same tensors (by identity: ``load_state_dict``
  makes new dictionaries, and a state entry replaced, as Lightning does when it moves a state to another
  device, ends the cache).

Checking that is about 0.3 us a parameter. What is *not* re-checked is the metadata of a state tensor that is still
the same object (dtype, device, contiguity): only ``Tensor.set_`` or an assignment to ``.data`` of a moment could
change it. Addresses and element counts are read afresh every step, and parameters and gradients are checked every
step.
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
    kernel_ready: bool = field(default=False)  # the C kernel takes the state (False: not checked, or not)
    multi_tensor_ready: bool = field(default=False)  # torch's fused kernel takes it (likewise)

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
        return cls(cached, states)

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
