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

Several contracts. Each contract has its own table, chosen by its name (the file's stem):
``training-loop-v1`` the seed's :data:`~provetrain.contract.bindings.BINDINGS`, a training sibling
(``optimizer-v1``...) its entry of :data:`~provetrain.contract.sibling_bindings.SIBLING_BINDINGS` (none: an
empty table), any other name the seed's table (a user's edited copy of the seed keeps its bindings; another
contract matches it only where an owner, equation or section, and a clause text are the seed's own). An entry
is a binding or :class:`~provetrain.contract.sibling_bindings.NotApplicable` with its reason: a clause with no
meaning here, shown as such, distinct from a gap. A clause with no entry takes, by its exact text, the seed's
binding for one of :data:`~provetrain.contract.bindings.CARRIED_TEXTS` (``lr > 0.0``,
``!params.is_empty()``...): the same code checks those wherever they are quoted. Nothing else carries from one
contract to another.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from provetrain.contract.bindings import (
    BINDINGS,
    CARRIED_TEXTS,
    SEED,
    THEOREMS,
    Binding,
    BindingKey,
    Evidence,
    EvidenceKind,
    TheoremBinding,
    TheoremKey,
)
from provetrain.contract.clauses import Clause, ClauseKind, enumerate_clauses
from provetrain.contract.load import bundled_contract_names
from provetrain.contract.predicates import Predicate, predicate_for
from provetrain.contract.schema import Contract
from provetrain.contract.sibling_bindings import SIBLING_BINDINGS, NotApplicable

__all__ = [
    "BINDINGS",
    "THEOREMS",
    "Binding",
    "ClauseState",
    "ClauseStatus",
    "Evidence",
    "EvidenceKind",
    "NotApplicable",
    "TheoremBinding",
    "TheoremStatus",
    "bindings_for",
    "clause_statuses",
    "resolve_dotted",
    "theorem_statuses",
]


ClauseState = Literal["bound", "not applicable", "unbound"]
BindingTable = Mapping[BindingKey, Binding | NotApplicable]


@dataclass(frozen=True)
class ClauseStatus:
    """A clause with its binding, and the gaps that keep it from being bound.

    Attributes:
        clause: the clause.
        predicate: its executable meaning (pre- and postconditions), or None.
        binding: the code that enforces it and the evidence (empty when not applicable or unbound).
        gaps: what is missing; empty when bound or not applicable.
        not_applicable: why the clause has no meaning for provetrain, or None.
        carried_from: the contract whose binding of the same text this is (``training-loop-v1``), or None
            when the binding is this contract's own entry.
    """

    clause: Clause
    predicate: Predicate | None
    binding: Binding
    gaps: tuple[str, ...] = field(default=())
    not_applicable: str | None = None
    carried_from: str | None = None

    @property
    def bound(self) -> bool:
        """Enforced and evidenced (a not-applicable clause is not bound, and not a gap either)."""
        return not self.gaps and self.not_applicable is None

    @property
    def state(self) -> ClauseState:
        if self.not_applicable is not None:
            return "not applicable"
        return "unbound" if self.gaps else "bound"


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


def bindings_for(name: str) -> BindingTable:
    """The binding table of the contract named ``name`` (a file stem); see the module docstring."""
    if name in SIBLING_BINDINGS:
        return SIBLING_BINDINGS[name]
    if name != SEED and name in bundled_contract_names():
        return {}  # a shipped sibling without a table: nothing of the seed's binds it but the carried texts
    return BINDINGS


def clause_statuses(
    contract: Contract, bindings: BindingTable | None = None, *, name: str = SEED
) -> list[ClauseStatus]:
    """Every clause of ``contract`` with its predicate, binding or not-applicable reason, and gaps, in file order.

    Args:
        contract: the contract.
        bindings: the table to use instead of the contract's own (nothing then carries by text).
        name: the contract's name (its file stem), which chooses its table: :func:`bindings_for`.
    """
    table = bindings_for(name) if bindings is None else bindings
    statuses = []
    for clause in enumerate_clauses(contract):
        predicate = predicate_for(clause.text) if clause.kind in _NEEDS_PREDICATE else None
        entry, carried_from = table.get(clause.key), None
        if entry is None and bindings is None and (clause.kind, clause.text) in CARRIED_TEXTS:
            entry, carried_from = _seed_binding(clause), SEED
        if isinstance(entry, NotApplicable):
            statuses.append(ClauseStatus(clause, predicate, Binding(), (), entry.reason))
            continue
        binding = entry or Binding()
        statuses.append(ClauseStatus(clause, predicate, binding, _gaps(clause, predicate, binding), None, carried_from))
    return statuses


def _seed_binding(clause: Clause) -> Binding | None:
    for (_, kind, text), binding in BINDINGS.items():
        if (kind, text) == (clause.kind, clause.text):
            return binding
    return None


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
