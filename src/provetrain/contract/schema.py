"""Typed schema of a training-loop contract file (pydantic v2).

Every section of ``training-loop-v1.yaml`` has a model here. Unknown keys are rejected (a typo such as
``precondtions`` would otherwise drop clauses silently), and cross-references are checked after the fields:
ids are unique, and each proof harness names an existing proof obligation by its ``property``.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from provetrain.yaml_schema import LocatedProblem

__all__ = [
    "HARNESS_STRATEGIES",
    "OBLIGATION_TYPES",
    "Contract",
    "Equation",
    "FalsificationTest",
    "Metadata",
    "ProofHarness",
    "ProofObligation",
]

OBLIGATION_TYPES = ("bound", "invariant", "equivalence", "monotonicity", "idempotence", "linearity")
HARNESS_STRATEGIES = ("stub_float", "exhaustive", "compositional", "bounded_int")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the clause is blank")
    return text


ClauseText = Annotated[str, AfterValidator(_not_blank)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Metadata(_Strict):
    """Who wrote the contract, when, and what it rests on."""

    version: str = Field(min_length=1)
    created: str | date
    author: str = Field(min_length=1)
    description: str = Field(min_length=1)
    references: list[str] = []


class Equation(_Strict):
    """One equation and its clauses, each clause written in Rust-like syntax (``!params.is_empty()``)."""

    formula: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    preconditions: list[ClauseText] = []
    postconditions: list[ClauseText] = []
    invariants: list[ClauseText] = []
    lean_theorem: str | None = None


class ProofObligation(_Strict):
    """A property every implementation must prove or evidence; ``property`` is its name."""

    type: Literal[OBLIGATION_TYPES]  # type: ignore[valid-type]
    property: str = Field(min_length=1)
    formal: str = Field(min_length=1)
    tolerance: float | None = Field(default=None, gt=0)
    applies_to: str = Field(min_length=1)

    @field_validator("tolerance", mode="before")
    @classmethod
    def _int_tolerance_is_a_float(cls, value: object) -> object:
        # YAML writes 1e-4 as a float but 1 as an int; accept both as numbers (bool is not one).
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class FalsificationTest(_Strict):
    """A prediction that a test tries to break: what it checks and what a failure would mean."""

    id: str = Field(min_length=1)
    rule: str = Field(min_length=1)
    prediction: str = Field(min_length=1)
    test: str = Field(min_length=1)
    if_fails: str = Field(min_length=1)


class ProofHarness(_Strict):
    """A bounded proof of one obligation (``obligation`` names a ``ProofObligation.property``)."""

    id: str = Field(min_length=1)
    obligation: str = Field(min_length=1)
    bound: int = Field(ge=1)
    strategy: Literal[HARNESS_STRATEGIES]  # type: ignore[valid-type]


class Contract(_Strict):
    """A whole contract file."""

    metadata: Metadata
    equations: dict[str, Equation] = Field(min_length=1)
    proof_obligations: list[ProofObligation] = []
    falsification_tests: list[FalsificationTest] = []
    kani_harnesses: list[ProofHarness] = []

    @model_validator(mode="after")
    def _references_resolve(self) -> Contract:
        _require_unique("proof_obligations", "property", [o.property for o in self.proof_obligations])
        _require_unique("falsification_tests", "id", [t.id for t in self.falsification_tests])
        _require_unique("kani_harnesses", "id", [h.id for h in self.kani_harnesses])
        known = [o.property for o in self.proof_obligations]
        for index, harness in enumerate(self.kani_harnesses):
            if harness.obligation not in known:
                raise LocatedProblem(
                    ("kani_harnesses", index, "obligation"),
                    f"names obligation {harness.obligation!r}, which no proof obligation has as its property",
                    expected="one of " + ", ".join(repr(k) for k in known) if known else "a proof obligation",
                )
        return self


def _require_unique(section: str, field: str, values: list[str]) -> None:
    seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in seen:
            raise LocatedProblem(
                (section, index, field),
                f"duplicate {field} {value!r} (already used by entry {seen[value]})",
                expected=f"each {field} to be unique within {section}",
            )
        seen[value] = index
