"""Typed schema of a contract file of the provable-contracts format (pydantic v2).

Every field the format defines has a typed model here, read from the format's own schema
(``crates/provable-contracts/src/schema/types.rs`` and ``book/src/contract-schema.md`` in
paiml/provable-contracts), plus the clause lists entrenar's contracts add to an equation (``preconditions``,
``postconditions``, ``lean_theorem``). What the format requires is required here; what it leaves optional is
optional; wrong types are errors.

A key the schema does not know is *kept* (``model.model_extra``) and reported as a located warning by
:mod:`provetrain.contract.lint` (with the closest known key suggested), not refused: the format's own tool
ignores unknown keys, and the ecosystem's contracts use many (``lessons_learned``, a harness
``description``...). Cross-references that do not resolve (a harness ``obligation`` that names no
obligation's ``property`` exactly) are warnings there too. Ids that must be unique (obligation properties,
falsification test ids, harness ids) are checked here and are errors: bindings are keyed by them.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from provetrain.yaml_schema import LocatedProblem

__all__ = [
    "HARNESS_STRATEGIES",
    "LEAN_STATUSES",
    "OBLIGATION_TYPES",
    "Contract",
    "EnforcementRule",
    "Equation",
    "FalsificationTest",
    "KernelPhase",
    "KernelStructure",
    "LeanProof",
    "Metadata",
    "ProofHarness",
    "ProofObligation",
    "QaGate",
    "VerificationSummary",
]

# The format's ObligationType (types.rs), lowercase as it serialises them.
OBLIGATION_TYPES = (
    "invariant",
    "equivalence",
    "bound",
    "monotonicity",
    "idempotency",
    "linearity",
    "symmetry",
    "associativity",
    "conservation",
    "ordering",
    "completeness",
    "soundness",
)
HARNESS_STRATEGIES = ("stub_float", "exhaustive", "compositional", "bounded_int")
LEAN_STATUSES = ("proved", "sorry", "wip", "not-applicable")

# A YAML 1.2 float such as 1e-5: the format's parser (serde_yaml) is YAML 1.2 and reads it as a number, PyYAML
# (YAML 1.1, which wants a dot: 1.0e-5) as a string. Four obligations in provable-contracts write it so.
_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("the clause is blank")
    return text


ClauseText = Annotated[str, AfterValidator(_not_blank)]
Text = Annotated[str, Field(min_length=1)]


class _Open(BaseModel):
    """Typed known fields, strict types; unknown keys kept in ``model_extra`` (reported by the linter)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class Metadata(_Open):
    """Who wrote the contract, when, what it rests on, and which contracts it composes (``depends_on``:
    contract stems such as ``silu-kernel-v1``)."""

    version: Text
    created: str | date | None = None
    author: Text | None = None
    description: Text
    references: list[str] = []
    depends_on: list[str] = []


class Equation(_Open):
    """One equation and its clauses. ``preconditions``, ``postconditions`` and ``lean_theorem`` are entrenar's
    additions to the format's equation; clauses are written in Rust-like syntax (``!params.is_empty()``)."""

    formula: Text
    domain: Text | None = None
    codomain: str | None = None
    preconditions: list[ClauseText] = []
    postconditions: list[ClauseText] = []
    invariants: list[ClauseText] = []
    lean_theorem: str | None = None


class LeanProof(_Open):
    """The Lean 4 proof of an obligation: theorem, module, status (``sorry`` when not given, as the format)."""

    theorem: Text
    module: str | None = None
    status: Literal[LEAN_STATUSES] = "sorry"  # type: ignore[valid-type]
    depends_on: list[str] = []
    mathlib_imports: list[str] = []
    notes: str | None = None


class ProofObligation(_Open):
    """A property every implementation must prove or evidence; ``property`` is its name, which harnesses cite.

    ``applies_to`` is ``all``, ``scalar``, ``simd``, ``converter`` or an algorithm-specific target (the
    format accepts any word there)."""

    type: Literal[OBLIGATION_TYPES]  # type: ignore[valid-type]
    property: Text
    formal: Text | None = None
    tolerance: float | None = Field(default=None, ge=0)  # 0: exact (bitwise) equivalence
    applies_to: Text | None = None
    lean: LeanProof | None = None

    @field_validator("tolerance", mode="before")
    @classmethod
    def _tolerance_is_a_number(cls, value: object) -> object:
        # YAML writes 1e-4 with a dot as a float but 1 as an int; accept both as numbers (bool is not one),
        # and a YAML 1.2 float that PyYAML read as a string (1e-5).
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)
        return value


class KernelPhase(_Open):
    """One phase of a kernel, and what must hold after it."""

    name: Text
    description: str
    invariant: str | None = None


class KernelStructure(_Open):
    """The kernel's phase decomposition."""

    phases: list[KernelPhase]


class EnforcementRule(_Open):
    """A rule an implementation is held to, and how it is checked."""

    description: str
    check: str | None = None
    severity: str | None = None
    reference: str | None = None


class FalsificationTest(_Open):
    """A prediction that a test tries to break: what it checks and what a failure would mean."""

    id: Text
    rule: Text
    prediction: Text
    test: Text | None = None
    if_fails: Text


class ProofHarness(_Open):
    """A bounded proof (a Kani harness) of one obligation; ``obligation`` should name a
    ``ProofObligation.property`` exactly (a warning when it does not)."""

    id: Text
    obligation: Text
    property: str | None = None
    bound: int | None = Field(default=None, ge=1)
    strategy: Literal[HARNESS_STRATEGIES] | None = None  # type: ignore[valid-type]
    solver: str | None = None
    harness: str | None = None


class QaGate(_Open):
    """The quality gate (certeza) a contract defines."""

    id: Text
    name: Text
    description: str | None = None
    checks: list[str] = []
    pass_criteria: str | None = None
    falsification: str | None = None


class VerificationSummary(_Open):
    """How many obligations are evidenced at each level (property test, Kani, Lean)."""

    total_obligations: int = Field(ge=0)
    l2_property_tested: int = Field(default=0, ge=0)
    l3_kani_proved: int = Field(default=0, ge=0)
    l4_lean_proved: int = Field(default=0, ge=0)
    l4_sorry_count: int = Field(default=0, ge=0)
    l4_not_applicable: int = Field(default=0, ge=0)


class Contract(_Open):
    """A whole contract file."""

    metadata: Metadata
    equations: dict[str, Equation] = Field(min_length=1)
    proof_obligations: list[ProofObligation] = []
    kernel_structure: KernelStructure | None = None
    simd_dispatch: dict[str, dict[str, str]] = {}
    enforcement: dict[str, EnforcementRule] = {}
    falsification_tests: list[FalsificationTest] = []
    kani_harnesses: list[ProofHarness] = []
    qa_gate: QaGate | None = None
    verification_summary: VerificationSummary | None = None

    @model_validator(mode="after")
    def _ids_are_unique(self) -> Contract:
        _require_unique("proof_obligations", "property", [o.property for o in self.proof_obligations])
        _require_unique("falsification_tests", "id", [t.id for t in self.falsification_tests])
        _require_unique("kani_harnesses", "id", [h.id for h in self.kani_harnesses])
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
