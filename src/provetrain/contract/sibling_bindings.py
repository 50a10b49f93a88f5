"""Bindings of the training siblings of the seed contract (optimizer-v1, backward-pass-v1, ...), by stem.

Placeholder: the sibling bindings are added by their own change. ``SIBLING_BINDINGS[stem]`` maps a clause's
``(owner, kind, text)`` to its :class:`~provetrain.contract.bindings.Binding`, or to :class:`NotApplicable`
with the reason the clause has no meaning for provetrain (never to a check that does not test it).
"""

from __future__ import annotations

from dataclasses import dataclass

from provetrain.contract.bindings import Binding, BindingKey

__all__ = ["SIBLING_BINDINGS", "NotApplicable"]


@dataclass(frozen=True)
class NotApplicable:
    """A clause that has no meaning for provetrain, and why (e.g. it is about entrenar's Rust internals)."""

    reason: str


SIBLING_BINDINGS: dict[str, dict[BindingKey, Binding | NotApplicable]] = {}
