"""The clause registry: each clause of the contract, the code that enforces it, and its evidence.

A clause is *bound* only when all that it needs is present:

- an equation's precondition or postcondition: a predicate for its exact text (``predicates.py``), the
  code that evaluates it at run time, and evidence (tests, proofs) that the code keeps it;
- an invariant or proof obligation: the code that enforces or checks it, and evidence;
- a falsification test or proof harness: the tests or proof that carry it out.

Anything missing is a gap, reported by ``provetrain contract audit``; nothing is silently true. A theorem the
contract cites (``lean_theorem``) is bound to what is really shown for it (:func:`theorem_statuses`). Bindings
are plain data below, keyed by ``(owner, kind, text)`` so they follow the clause if the file is reordered.
Enforcement sites are dotted paths (checked importable by the test suite) and evidence names pytest node
ids or proof commands (checked to exist by the test suite), so this table cannot drift from the code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from provetrain.contract.bindings import (
    BINDINGS,
    THEOREMS,
    Binding,
    BindingKey,
    Evidence,
    EvidenceKind,
    TheoremBinding,
    TheoremKey,
)
from provetrain.contract.clauses import Clause, ClauseKind, enumerate_clauses
from provetrain.contract.predicates import Predicate, predicate_for
from provetrain.contract.schema import Contract

__all__ = [
    "BINDINGS",
    "THEOREMS",
    "Binding",
    "ClauseStatus",
    "Evidence",
    "EvidenceKind",
    "TheoremBinding",
    "TheoremStatus",
    "clause_statuses",
    "resolve_dotted",
    "theorem_statuses",
]


@dataclass(frozen=True)
class ClauseStatus:
    """A clause with its binding, and the gaps that keep it from being bound."""

    clause: Clause
    predicate: Predicate | None
    binding: Binding
    gaps: tuple[str, ...] = field(default=())

    @property
    def bound(self) -> bool:
        return not self.gaps


@dataclass(frozen=True)
class TheoremStatus:
    """A theorem the contract cites (``equation.lean_theorem``), with what is really shown for it; ``binding``
    is None when nothing is, and the citation is then a gap."""

    equation: str
    theorem: str
    binding: TheoremBinding | None

    @property
    def bound(self) -> bool:
        return self.binding is not None and bool(self.binding.evidence)


_NEEDS_PREDICATE: frozenset[ClauseKind] = frozenset({"precondition", "postcondition"})
_NEEDS_ENFORCEMENT: frozenset[ClauseKind] = frozenset({"precondition", "postcondition", "invariant", "obligation"})


def clause_statuses(contract: Contract, bindings: dict[BindingKey, Binding] | None = None) -> list[ClauseStatus]:
    """Every clause of ``contract`` with its predicate, binding and gaps, in file order."""
    table = BINDINGS if bindings is None else bindings
    statuses = []
    for clause in enumerate_clauses(contract):
        predicate = predicate_for(clause.text) if clause.kind in _NEEDS_PREDICATE else None
        binding = table.get(clause.key, Binding())
        statuses.append(ClauseStatus(clause, predicate, binding, _gaps(clause, predicate, binding)))
    return statuses


def theorem_statuses(
    contract: Contract, theorems: dict[TheoremKey, TheoremBinding] | None = None
) -> list[TheoremStatus]:
    """Every theorem ``contract`` cites, in file order, with its binding (None: nothing shown for it)."""
    table = THEOREMS if theorems is None else theorems
    return [
        TheoremStatus(name, equation.lean_theorem, table.get((name, equation.lean_theorem)))
        for name, equation in contract.equations.items()
        if equation.lean_theorem is not None
    ]


def _gaps(clause: Clause, predicate: Predicate | None, binding: Binding) -> tuple[str, ...]:
    gaps = []
    if clause.kind in _NEEDS_PREDICATE and predicate is None:
        gaps.append("no predicate for this clause text")
    if clause.kind in _NEEDS_ENFORCEMENT and not binding.enforced_by:
        gaps.append("no code enforces it")
    if not binding.evidence:
        gaps.append("no test" if clause.kind == "falsification" else "no evidence")
    return tuple(gaps)


def resolve_dotted(path: str) -> object:
    """Import ``package.module.attr.attr`` and return the object (raises ImportError/AttributeError)."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(f"cannot import any prefix of {path!r}")
