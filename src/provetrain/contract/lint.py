"""What a contract that loads may still get wrong: located warnings, each with the rule it breaks.

A contract that fits the schema loads; these are reported beside it (``provetrain contract status``) and
``provetrain contract lint`` fails on any of them. The rules:

- ``unknown-key``: a key the format does not define. It is kept (``model_extra``), never used; a typo of a
  known key (``precondtions``) would drop its clauses, so the closest known key is suggested.
- ``dangling-obligation``: a proof harness whose ``obligation`` is not exactly the ``property`` of a proof
  obligation of the same contract; the closest property is suggested. The harness is still a clause.
- the format's own validator warnings (``pv validate``, ``schema/validator.rs``), under its rule ids:
  ``SCHEMA-001`` no references (the format calls this an error; the contract still loads here),
  ``SCHEMA-006`` two obligations with the same ``formal`` predicate, ``SCHEMA-012`` a harness without a
  ``bound``. The format's ``SCHEMA-013`` (no ``qa_gate``) is not applied: no contract of entrenar's
  training family defines one, and provetrain does not run certeza gates.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from provetrain.contract.schema import Contract
from provetrain.yaml_schema import YamlDocument, dotted_key

__all__ = ["ContractWarning", "contract_warnings"]

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class ContractWarning:
    """One located warning.

    Attributes:
        rule: which rule it breaks (``unknown-key``, ``dangling-obligation``, ``SCHEMA-006``...).
        problem: what is wrong, in words.
        path: the file (None for text that did not come from one).
        line, column: 1-based position of the key or value, where the file has it.
        key: dotted key path (``kani_harnesses[0].obligation``).
        suggestion: the closest valid alternative, when there is one.
    """

    rule: str
    problem: str
    path: str | None = None
    line: int | None = None
    column: int | None = None
    key: str | None = None
    suggestion: str | None = None

    @property
    def location(self) -> str:
        """``file:line:column`` with whatever parts are known."""
        parts = [self.path or "<contract>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def __str__(self) -> str:
        text = f"{self.location}: warning [{self.rule}]: "
        if self.key:
            text += f"key '{self.key}': "
        text += self.problem
        if self.suggestion:
            text += f" (did you mean {self.suggestion!r}?)"
        return text


def contract_warnings(document: YamlDocument[Contract]) -> list[ContractWarning]:
    """Every warning for a validated contract, in file order."""
    found = [
        *_unknown_keys(document),
        *_dangling_obligations(document),
        *_format_validator(document),
    ]
    return sorted(found, key=lambda w: (w.line or 0, w.column or 0, w.rule))


def _warning(
    document: YamlDocument[Contract], rule: str, loc: Loc, problem: str, *, at_key: bool, suggestion: str | None = None
) -> ContractWarning:
    line, column = document.locate(loc, at_key=at_key) or (None, None)
    path = None if document.path is None else str(document.path)
    return ContractWarning(rule, problem, path, line, column, dotted_key(loc) or None, suggestion)


def _closest(word: str, candidates: list[str], cutoff: float) -> str | None:
    matches = difflib.get_close_matches(word, candidates, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.lower(), b.lower()).ratio()


def _unknown_keys(document: YamlDocument[Contract]) -> Iterator[ContractWarning]:
    for loc, model in _models(document.value, ()):
        for key in model.model_extra or {}:
            suggestion = _closest(str(key), list(type(model).model_fields), cutoff=0.75)
            problem = f"unknown key, kept but not used (the format does not define it on {type(model).__name__})"
            yield _warning(document, "unknown-key", (*loc, key), problem, at_key=True, suggestion=suggestion)


def _models(value: Any, loc: Loc) -> Iterator[tuple[Loc, BaseModel]]:
    """Every model in the validated tree with its key path (extras are raw data, not walked)."""
    if isinstance(value, BaseModel):
        yield loc, value
        for name in type(value).model_fields:
            yield from _models(getattr(value, name), (*loc, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _models(item, (*loc, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _models(item, (*loc, key))


def _dangling_obligations(document: YamlDocument[Contract]) -> Iterator[ContractWarning]:
    contract = document.value
    known = [o.property for o in contract.proof_obligations]
    for index, harness in enumerate(contract.kani_harnesses):
        if harness.obligation in known:
            continue
        problem = f"names obligation {harness.obligation!r}, which no proof obligation has as its property"
        if not known:
            problem += " (the contract has no proof obligations)"
        # The harness's own `property` (provable-contracts' harnesses cite obligations by an id such as
        # AW-INV-001 and describe them there) often says more than the name it cites.
        said = [harness.obligation] + ([harness.property] if harness.property else [])
        suggestion = max(known, key=lambda k: max(_similarity(k, s) for s in said)) if known else None
        loc = ("kani_harnesses", index, "obligation")
        yield _warning(document, "dangling-obligation", loc, problem, at_key=False, suggestion=suggestion)


def _format_validator(document: YamlDocument[Contract]) -> Iterator[ContractWarning]:
    contract = document.value
    if not contract.metadata.references:
        problem = "no references: the format asks every contract to cite its source paper(s)"
        yield _warning(document, "SCHEMA-001", ("metadata", "references"), problem, at_key=True)
    formals: dict[str, int] = {}
    for index, obligation in enumerate(contract.proof_obligations):
        if obligation.formal is None:
            continue
        if obligation.formal in formals:
            problem = f"the same formal predicate as proof_obligations[{formals[obligation.formal]}]"
            yield _warning(document, "SCHEMA-006", ("proof_obligations", index, "formal"), problem, at_key=False)
        formals.setdefault(obligation.formal, index)
    for index, harness in enumerate(contract.kani_harnesses):
        if harness.bound is None:
            problem = f"harness {harness.id!r} has no bound (Kani needs an unwind bound)"
            yield _warning(document, "SCHEMA-012", ("kani_harnesses", index), problem, at_key=True)
