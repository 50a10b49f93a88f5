"""The clauses of a contract, enumerated in file order, each with a stable id and its exact text.

A clause is anything the contract promises that must be enforced or evidenced: an equation's
preconditions, postconditions and invariants, each proof obligation, each falsification test and each
proof harness.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from provetrain.contract.schema import Contract

__all__ = ["Clause", "ClauseKind", "enumerate_clauses"]

ClauseKind = Literal["precondition", "postcondition", "invariant", "obligation", "falsification", "harness"]

_EQUATION_SECTIONS: tuple[tuple[str, ClauseKind], ...] = (
    ("preconditions", "precondition"),
    ("postconditions", "postcondition"),
    ("invariants", "invariant"),
)


@dataclass(frozen=True)
class Clause:
    """One clause.

    Attributes:
        id: where it sits in the file: ``gradient_norm.postconditions[0]``, ``proof_obligations[2]``, or the
            test/harness id (``FALSIFY-TRAIN-001``, ``train-kani-001``).
        kind: what sort of promise it is.
        owner: the equation name, or the section (``proof_obligations``...) for the other kinds.
        text: the exact text bindings are keyed by: the clause as written, an obligation's ``property``,
            or a test/harness ``id``.
        detail: a human description (the obligation's ``formal``, the test's ``prediction``...).
    """

    id: str
    kind: ClauseKind
    owner: str
    text: str
    detail: str = ""

    @property
    def key(self) -> tuple[str, ClauseKind, str]:
        """What a binding is registered under: the same text in another role is another clause."""
        return (self.owner, self.kind, self.text)


def enumerate_clauses(contract: Contract) -> list[Clause]:
    """Every clause of ``contract``, in file order."""
    clauses: list[Clause] = []
    for name, equation in contract.equations.items():
        for section, kind in _EQUATION_SECTIONS:
            for index, text in enumerate(getattr(equation, section)):
                clauses.append(Clause(f"{name}.{section}[{index}]", kind, name, text, equation.formula))
    for index, obligation in enumerate(contract.proof_obligations):
        clauses.append(
            Clause(
                f"proof_obligations[{index}]",
                "obligation",
                "proof_obligations",
                obligation.property,
                f"{obligation.type}: {obligation.formal or obligation.property}",
            )
        )
    for test in contract.falsification_tests:
        clauses.append(Clause(test.id, "falsification", "falsification_tests", test.id, test.prediction))
    for harness in contract.kani_harnesses:
        settings = ", ".join(
            f"{name} {value}" for name, value in (("bound", harness.bound), ("strategy", harness.strategy)) if value
        )
        detail = f"{harness.obligation} ({settings})" if settings else harness.obligation
        clauses.append(Clause(harness.id, "harness", "kani_harnesses", harness.id, detail))
    return clauses
