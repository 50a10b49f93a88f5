"""The two errors provetrain raises on purpose.

``ContractError``: the contract *file* is wrong (bad YAML, wrong type, dangling reference). It carries the
file, line and column where the YAML gives them, the offending key and what was expected.

``ContractViolation``: a clause of a valid contract did not hold at run time (or a caller broke a
precondition). It carries the equation, the clause text exactly as written in the YAML, the step when known
and the observed values, and its message says what to do.

``ArgumentViolation``: a ``ContractViolation`` of a precondition on an argument (``lr > 0.0``,
``!params.is_empty()``, ``clip_value > 0.0``), raised where the argument is given. It is also a
``ValueError``, the type ``torch.optim`` raises for the same arguments, so code written for torch catches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["ArgumentViolation", "ConfigError", "ContractError", "ContractViolation", "LocatedError"]


class LocatedError(ValueError):
    """A YAML file (contract or training config) that cannot be used, located as precisely as the YAML allows.

    Attributes:
        path: the file, or ``None`` for text that did not come from a file.
        line, column: 1-based position in the file, or ``None`` where the YAML gives none.
        key: dotted path of the offending key (``equations.loss_decrease.preconditions[1]``), or ``None``.
        expected: what would have been valid there.
        problem: what was found instead.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
        expected: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = str(path) if path is not None else None
        self.line = line
        self.column = column
        self.key = key
        self.expected = expected
        super().__init__(self._format())

    default_source = "<yaml>"

    @property
    def location(self) -> str:
        """``file:line:column`` with whatever parts are known."""
        parts = [self.path or self.default_source]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def _format(self) -> str:
        text = f"{self.location}: "
        if self.key:
            text += f"key '{self.key}': "
        text += self.problem
        if self.expected:
            text += f" (expected {self.expected})"
        return text


class ContractError(LocatedError):
    """A contract file that cannot be loaded (bad YAML, wrong type, unknown strategy, dangling reference)."""

    default_source = "<contract>"


class ConfigError(LocatedError):
    """A training configuration that cannot be used; nothing has been written when it is raised."""

    default_source = "<config>"


def _format_value(value: Any) -> str:
    """Short, one-line rendering of an observed value (tensors by their item when 0-d)."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            if value.numel() == 1:
                return repr(value.detach().cpu().item())
            return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ContractViolation(RuntimeError):
    """A clause of the training-loop contract did not hold.

    Attributes:
        equation: the contract equation or section the clause belongs to (``gradient_norm``).
        clause: the clause text exactly as in the YAML (``grad_norm <= clip_value``).
        kind: ``precondition``, ``postcondition``, ``invariant`` or ``obligation``.
        step: the training step at which it failed, when known.
        observed: the values that broke it, by name.
        hint: what the user can do about it.
    """

    def __init__(
        self,
        equation: str,
        clause: str,
        *,
        kind: str = "precondition",
        step: int | None = None,
        observed: Mapping[str, Any] | None = None,
        hint: str = "",
    ) -> None:
        self.equation = equation
        self.clause = clause
        self.kind = kind
        self.step = step
        self.observed = dict(observed or {})
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        text = f"contract {self.equation} {self.kind} `{self.clause}` violated{where}"
        if self.observed:
            seen = ", ".join(f"{name}={_format_value(v)}" for name, v in self.observed.items())
            text += f": observed {seen}"
        if self.hint:
            text += f". {self.hint}"
        return text


class ArgumentViolation(ContractViolation, ValueError):
    """A :class:`ContractViolation` of a precondition on an argument, raised where the argument is given.

    Also a ``ValueError``: ``torch.optim.Adam(params, lr=-1.0)`` raises ``ValueError``, and a drop-in
    replacement must be caught by the same ``except``. ``except ContractViolation`` catches it as before.
    """
