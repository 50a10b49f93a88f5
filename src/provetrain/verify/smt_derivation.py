"""A derivation: a proof as a chain of z3-checked steps over shared variables.

Each step states hypotheses and a conclusion; z3 must answer ``unsat`` for ``hypotheses and not
conclusion``. A hypothesis must be an assumption (the encoding of the algorithm) or the conclusion of an
earlier proved step, so once every step is proved the last conclusion follows from the assumptions alone
(modus ponens along the chain). Small steps keep every z3 call to a few variables, which is what makes
the nonlinear real arithmetic solve in milliseconds where one monolithic query times out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import z3

__all__ = ["DEFAULT_RLIMIT", "Derivation", "StepResult", "check_satisfiable", "check_unsat", "linearize"]

StepVerdict = Literal["proved", "refuted", "unknown"]


DEFAULT_RLIMIT = 2_000_000_000
"""z3 resource units allowed per solver call by default: a count of solver work, not wall time, so a verdict
does not depend on machine load. The largest call of ``prove_clip_bound`` (the bit-precise float32 output
lemma) uses about 40 million, 2 % of it. Units are not seconds: here z3 did 0.07 to 2 million a second,
depending on the query. A fresh process repeats a run's counts (the CLI); within one process z3's shared
context makes them drift, and two CLI runs differed by up to 1.6x on a few lengths (see README)."""


@dataclass(frozen=True)
class StepResult:
    """One solver call: ``proved`` is z3's ``unsat`` for the negation; ``refuted`` its ``sat``.

    Attributes:
        name: what the step shows, in words.
        verdict: ``proved``, ``refuted`` (the negation has a model) or ``unknown`` (the resource limit, or
            z3 incomplete).
        seconds: wall time of the solver call (reported, never used for the verdict).
        reason: z3's ``reason_unknown`` for ``unknown``, else empty.
        rlimit: z3 resource units the call used (its ``rlimit count``): the same on every machine and load.
    """

    name: str
    verdict: StepVerdict
    seconds: float
    reason: str = ""
    rlimit: int = 0


def check_unsat(
    name: str, assertions: Iterable[z3.BoolRef], *, rlimit: int, logic: str = "QF_NRA"
) -> tuple[StepResult, z3.ModelRef | None]:
    """Check ``assertions`` (a negated claim) with at most ``rlimit`` z3 resource units; the model when ``sat``."""
    solver = z3.SolverFor(logic)
    solver.set("rlimit", rlimit)  # counted from this call's start
    before = _rlimit_count(solver)  # z3's counter runs on over the whole context
    solver.add(*assertions)
    start = time.perf_counter()
    answer = solver.check()
    seconds = time.perf_counter() - start
    used = _rlimit_count(solver) - before
    if answer == z3.unsat:
        return StepResult(name, "proved", seconds, rlimit=used), None
    if answer == z3.sat:
        return StepResult(name, "refuted", seconds, rlimit=used), solver.model()
    return StepResult(name, "unknown", seconds, solver.reason_unknown(), used), None


def _rlimit_count(solver: z3.Solver) -> int:
    statistics = solver.statistics()
    keys = statistics.keys()
    return int(statistics.get_key_value("rlimit count")) if "rlimit count" in keys else 0


def check_satisfiable(name: str, assertions: Iterable[z3.BoolRef], *, rlimit: int) -> StepResult:
    """A vacuity check: ``proved`` when z3 finds a model, so the assumptions are not contradictory."""
    result, model = check_unsat(name, assertions, rlimit=rlimit)
    if model is not None:
        return StepResult(name, "proved", result.seconds, rlimit=result.rlimit)
    if result.verdict == "proved":  # unsat: contradictory assumptions would make every step vacuous
        return StepResult(name, "refuted", result.seconds, "the assumptions are contradictory", result.rlimit)
    return result


def _power_factors(term: z3.ExprRef) -> list[z3.ExprRef] | None:
    """The factors of ``x ** k`` for a positive integer ``k``, else None."""
    base, exponent = term.children()
    if z3.is_int_value(exponent) or (z3.is_rational_value(exponent) and exponent.denominator_as_long() == 1):
        count = exponent.as_long() if z3.is_int_value(exponent) else exponent.numerator_as_long()
        if count >= 1:
            return [base] * count
    return None


def _split_monomial(term: z3.ExprRef) -> tuple[list[z3.ExprRef], list[z3.ExprRef]] | None:
    """``(constants, variable factors)`` of a product or integer power, flattened; None for anything else."""
    if z3.is_app_of(term, z3.Z3_OP_POWER):
        factors = _power_factors(term)
        return None if factors is None else ([], factors)
    if not z3.is_mul(term):
        return None
    constants, factors = [], []
    for child in term.children():
        nested = _split_monomial(child)
        if z3.is_rational_value(child):
            constants.append(child)
        elif nested is not None:
            constants += nested[0]
            factors += nested[1]
        else:
            factors.append(child)
    return constants, factors


def linearize(formulas: Sequence[z3.BoolRef]) -> list[z3.BoolRef]:
    """Replace every nonlinear monomial by a fresh real, the same one wherever the monomial recurs.

    Each formula is first put in sum-of-monomials form; a monomial is identified by the sorted multiset of
    its factors, so ``x*y``, ``y*x`` and ``x**2``, ``x*x`` each share one atom. The result over-approximates
    the input: a model of the input gives one of the result (each fresh real set to its monomial's value),
    so ``unsat`` for the result is ``unsat`` for the input. It suits steps that are linear combinations of
    nonlinear facts, which nlsat (reasoning over the variables, not the monomials) can take minutes to find.
    """
    atoms: dict[tuple[str, ...], z3.ArithRef] = {}

    def rewrite(term: z3.ExprRef) -> z3.ExprRef:
        split = _split_monomial(term) if z3.is_arith(term) else None
        if split is not None and len(split[1]) >= 2:
            constants, factors = split
            key = tuple(sorted(factor.sexpr() for factor in factors))
            atom = atoms.setdefault(key, z3.FreshReal("monomial"))
            return z3.Product(*constants, atom) if constants else atom
        if z3.is_app(term) and term.num_args() > 0:
            return term.decl()(*[rewrite(child) for child in term.children()])
        return term

    return [rewrite(z3.simplify(formula, som=True, som_blowup=10**6)) for formula in formulas]


class Derivation:
    """Assumptions plus the conclusions proved so far; :meth:`derive` adds one checked step."""

    def __init__(self, assumptions: Iterable[z3.BoolRef], *, rlimit: int) -> None:
        self.assumptions = tuple(assumptions)
        self.rlimit = rlimit
        self.steps: list[StepResult] = []
        # Facts are kept alive with their ids: a freed term's id could be reused by a different term.
        self._known = {fact.get_id(): fact for fact in self.assumptions}

    def holds(self, fact: z3.BoolRef) -> bool:
        """Whether ``fact`` is an assumption or an already proved conclusion (z3 terms are hash-consed)."""
        known = self._known.get(fact.get_id())
        return known is not None and known.eq(fact)

    @property
    def failed(self) -> bool:
        return any(step.verdict != "proved" for step in self.steps)

    def derive(
        self, name: str, hypotheses: Sequence[z3.BoolRef], conclusion: z3.BoolRef, *, linear: bool = False
    ) -> bool:
        """Prove ``hypotheses -> conclusion``; on success the conclusion becomes usable. False once any failed.

        ``linear``: check the negation after :func:`linearize`, in linear real arithmetic (sound, see there).
        """
        if self.failed:
            return False
        missing = [h for h in hypotheses if not self.holds(h)]
        if missing:
            raise ValueError(f"step {name!r} uses facts that are neither assumed nor derived: {missing}")
        negation = [*hypotheses, z3.Not(conclusion)]
        if linear:
            result, _ = check_unsat(name, linearize(negation), rlimit=self.rlimit, logic="QF_LRA")
        else:
            result, _ = check_unsat(name, negation, rlimit=self.rlimit)
        self.steps.append(result)
        if result.verdict == "proved":
            self._known[conclusion.get_id()] = conclusion
        return result.verdict == "proved"
