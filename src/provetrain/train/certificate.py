"""The run certificate: for each clause of the contract, how often it was checked, how often it failed, and
what the declared policy did about it.

The Trainer records into a :class:`ClauseLedger` at fixed points (before training, after each step read
back from the device, at checkpoint); :meth:`ClauseLedger.certificate` turns it into the JSON written as
``certificate.json``, with each clause's evidence taken from the clause registry.

A run is certified against several contracts (the config's ``contracts``, default ``[training-loop-v1]``):
the certificate's ``contracts`` holds a section per contract, each clause with its state (bound, not
applicable with the reason, or unbound with its gaps), its binding, and its run-time counts where the run
evaluates it. Counts come from the one ledger the loop records into: a clause of the ledger's own contract
has its own counts; a clause of another contract has the counts of the seed's clause only when its binding
is carried by text (the same check, see :mod:`provetrain.contract.registry`); any other clause has
``checks: null`` (not evaluated at run time: it is evidenced by the tests and proofs its binding lists).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provetrain.contract.clauses import Clause
from provetrain.contract.load import (
    DEFAULT_CONTRACTS,
    LoadedContract,
    bundled_contract_names,
    bundled_contract_path,
    load_contract_with_warnings,
    resolve_contract_path,
)
from provetrain.contract.registry import ClauseStatus, clause_statuses
from provetrain.contract.schema import Contract
from provetrain.errors import ContractError, ContractViolation
from provetrain.train.config import TrainConfig, config_error

__all__ = [
    "ClauseLedger",
    "ClauseRecord",
    "ContractSpec",
    "certify_step",
    "config_contracts",
    "load_contracts",
    "outcome_of",
]

# A contract a run is certified against: a file, the name of a bundled contract (optimizer-v1), or one loaded.
ContractSpec = str | Path | LoadedContract


def load_contracts(specs: Sequence[ContractSpec] | None = None) -> tuple[LoadedContract, ...]:
    """Each contract of ``specs`` loaded (default: ``training-loop-v1``), in order, duplicates dropped.

    Raises:
        ContractError: a contract cannot be found or does not load (located in its file).
    """
    loaded: list[LoadedContract] = []
    for spec in DEFAULT_CONTRACTS if specs is None else specs:
        contract = spec if isinstance(spec, LoadedContract) else load_contract_with_warnings(spec)
        if all((c.name, c.contract) != (contract.name, contract.contract) for c in loaded):
            loaded.append(contract)
    return tuple(loaded)


def config_contracts(config: TrainConfig) -> tuple[LoadedContract, ...]:
    """The config's ``contracts``, loaded.

    Raises:
        ConfigError: located at the entry (``contracts[1]``) that names no file and no bundled contract, or
            whose contract does not load (the message then locates the problem in the contract's file too).
    """
    loaded = []
    for index, spec in enumerate(config.contracts):
        key = f"contracts[{index}]"
        if not resolve_contract_path(spec).exists():
            raise config_error(
                config,
                f"{spec!r} is neither a contract file nor a bundled contract",
                key=key,
                expected="a path to a contract YAML, or one of " + ", ".join(bundled_contract_names()),
            )
        try:
            loaded.append(load_contract_with_warnings(spec))
        except ContractError as error:
            raise config_error(config, f"the contract does not load: {error}", key=key) from None
    return load_contracts(loaded)


# The clauses a training step is certified against, exactly as training-loop-v1.yaml writes them.
LOSS = "loss_decrease"
GRAD = "gradient_norm"
LOSS_FINITE = "loss.is_finite()"
LOSS_NOT_NAN = "!loss.is_nan()"
GRADS_FINITE = "gradients.iter().all(|g| g.is_finite())"
NORM_BOUND = "grad_norm <= clip_value"
LOSS_TREND = "Loss monotonically non-increasing (in expectation)"
NORM_INVARIANT = "Gradient norm bounded by clip_value"


@dataclass
class ClauseRecord:
    """Counters for one clause: checks, violations, and policy actions by name (``skip``, ``rollback``...)."""

    checks: int = 0
    violations: int = 0
    first_violation_step: int | None = None
    actions: Counter[str] = field(default_factory=Counter)


class ClauseLedger:
    """Per-clause counters for one run, keyed like the registry: ``(owner, kind, text)``."""

    def __init__(self, contract: Contract, *, contracts: Sequence[ContractSpec] | None = None) -> None:
        self.contract = contract
        self.contracts = load_contracts(contracts)
        self._statuses = clause_statuses(contract)
        self.records: dict[tuple[str, str, str], ClauseRecord] = {s.clause.key: ClauseRecord() for s in self._statuses}

    def clause(self, owner: str, kind: str, text: str) -> Clause:
        """The contract's clause at this key (KeyError names it if the contract lacks it)."""
        for status in self._statuses:
            if status.clause.key == (owner, kind, text):
                return status.clause
        raise KeyError(f"the contract has no {kind} {text!r} in {owner}")

    def check(
        self,
        owner: str,
        kind: str,
        text: str,
        *,
        passed: int = 1,
        failed: int = 0,
        first_failed_step: int | None = None,
    ) -> None:
        """Record ``passed + failed`` evaluations of a clause, ``failed`` of them violations."""
        record = self.records.get((owner, kind, text))
        if record is None:  # the user's contract does not have this clause: nothing to certify
            return
        record.checks += passed + failed
        record.violations += failed
        if failed and record.first_violation_step is None:
            record.first_violation_step = first_failed_step

    def act(self, owner: str, kind: str, text: str, action: str, count: int = 1) -> None:
        """Record that a policy acted on a violation of this clause."""
        record = self.records.get((owner, kind, text))
        if record is not None:
            record.actions[action] += count

    def state_dict(self) -> list[dict[str, Any]]:
        """The counters as plain data (a checkpoint keeps them, so a resumed run certifies the whole run)."""
        return [
            {
                "owner": owner,
                "kind": kind,
                "text": text,
                "checks": record.checks,
                "violations": record.violations,
                "first_violation_step": record.first_violation_step,
                "actions": dict(record.actions),
            }
            for (owner, kind, text), record in self.records.items()
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Replace the counters with :meth:`state_dict`'s; ``ValueError`` names a clause this contract lacks."""
        records = {}
        for saved in state:
            key = (saved["owner"], saved["kind"], saved["text"])
            if key not in self.records:
                raise ValueError(
                    f"the saved certificate counts the {key[1]} {key[2]!r} of {key[0]}, which this run's contract "
                    "does not have; resume under the contract the run started with"
                )
            records[key] = ClauseRecord(
                saved["checks"], saved["violations"], saved["first_violation_step"], Counter(saved["actions"])
            )
        self.records.update(records)

    def certificate(self, *, run: dict[str, Any], outcome: str) -> dict[str, Any]:
        """The JSON-ready certificate: the contract, the run, and each clause with counts and evidence."""
        clauses = []
        for status in self._statuses:
            record = self.records[status.clause.key]
            clauses.append(
                {
                    "id": status.clause.id,
                    "kind": status.clause.kind,
                    "text": status.clause.text,
                    "checks": record.checks,
                    "violations": record.violations,
                    "first_violation_step": record.first_violation_step,
                    "actions": dict(record.actions),
                    "enforced_by": list(status.binding.enforced_by),
                    "evidence": [{"kind": e.kind, "ref": e.ref} for e in status.binding.evidence],
                    "bound": status.bound,
                }
            )
        return {
            "contract": {"description": self.contract.metadata.description, "version": self.contract.metadata.version},
            "outcome": outcome,
            "run": run,
            "clauses": clauses,
            "contracts": [self._section(loaded) for loaded in self.contracts],
        }

    def _section(self, loaded: LoadedContract) -> dict[str, Any]:
        """One contract's section: where it came from, its warnings, and each clause with state and counts."""
        statuses = clause_statuses(loaded.contract, name=loaded.name)
        own = loaded.contract == self.contract
        clauses = [_section_clause(status, self._record_for(status, own=own)) for status in statuses]
        return {
            "name": loaded.name,
            "source": _source(loaded),
            "sha256": hashlib.sha256(loaded.path.read_bytes()).hexdigest() if loaded.path else None,
            "version": loaded.contract.metadata.version,
            "description": loaded.contract.metadata.description,
            "warnings": [str(w) for w in loaded.warnings],
            "summary": {
                "total": len(statuses),
                "bound": sum(s.bound for s in statuses),
                "not_applicable": sum(s.not_applicable is not None for s in statuses),
                "unbound": sum(bool(s.gaps) for s in statuses),
                "checked_at_run_time": sum(bool(c["checks"]) for c in clauses),
            },
            "clauses": clauses,
        }

    def _record_for(self, status: ClauseStatus, *, own: bool) -> ClauseRecord | None:
        """The counts of a clause: its own in the ledger's contract; else the seed's for a binding carried
        by text (the same check); else None."""
        if own:
            return self.records.get(status.clause.key)
        if status.carried_from is None:
            return None
        kind_text = (status.clause.kind, status.clause.text)
        return next((r for (_, kind, text), r in self.records.items() if (kind, text) == kind_text), None)


def _source(loaded: LoadedContract) -> str | None:
    if loaded.path is None:
        return None
    return "bundled" if loaded.path == bundled_contract_path(loaded.name) else str(loaded.path)


def _section_clause(status: ClauseStatus, record: ClauseRecord | None) -> dict[str, Any]:
    counts: dict[str, Any] = {"checks": None, "violations": None, "first_violation_step": None, "actions": {}}
    if record is not None:
        counts = {
            "checks": record.checks,
            "violations": record.violations,
            "first_violation_step": record.first_violation_step,
            "actions": dict(record.actions),
        }
    return {
        "id": status.clause.id,
        "kind": status.clause.kind,
        "text": status.clause.text,
        "state": status.state,
        "not_applicable": status.not_applicable,
        "gaps": list(status.gaps),
        "carried_from": status.carried_from,
        **counts,
        "enforced_by": list(status.binding.enforced_by),
        "evidence": [{"kind": e.kind, "ref": e.ref} for e in status.binding.evidence],
    }


def outcome_of(error: BaseException | None) -> str:
    """The certificate's ``outcome``: ``kept`` when the run finished (every violation met by its declared
    policy, as counted under ``actions``), ``violated: <clause>`` when a contract clause ended it, and
    ``failed: <exception>`` for any other end (an error, Ctrl-C, SIGTERM, a full disk, a lost peer)."""
    if error is None:
        return "kept"
    if isinstance(error, ContractViolation):
        return f"violated: {error}"
    detail = str(error)
    return f"failed: {type(error).__name__}" + (f": {detail}" if detail else "")


NORM_RESOLUTION = 2.0**-20
"""Relative error bound of the recorded clipped norm: the float64 sums (``(n + 8) u <= 2^-22`` for
``n < 2^31``) and, on the multi-tensor path, the estimate ``N_hat sigma / D`` (``D`` float32: ``2^-23``)."""


def certify_step(
    ledger: ClauseLedger, step: int, *, loss: float | None, clipped_norm: float, skipped: bool, clip_value: float | None
) -> None:
    """Count one optimizer step's postconditions in ``ledger``, as the Trainer counts them.

    A skipped step with a non-finite loss is the loss's violation; skipped with a finite (or unknown) loss, the
    gradients'. ``grad_norm <= clip_value`` is counted on applied steps when there is a clip.

    ``clipped_norm`` is the optimizer's float64 estimate of the clipped gradient's norm (relative error below
    :data:`NORM_RESOLUTION` for fewer than ``2^31`` elements on every path), so the bound counts as violated
    only when the estimate exceeds ``clip_value`` by more than that: a rounding of the estimate never reports
    a violation that did not happen. The bound itself is proven for the stored values (``ops/clip.py``).

    Raises:
        ContractViolation: the clipped norm exceeds ``clip_value`` (impossible by construction; never silent).
    """
    finite = loss is None or math.isfinite(loss)
    if loss is not None:
        nan = math.isnan(loss)
        ledger.check(
            LOSS, "postcondition", LOSS_FINITE, passed=int(finite), failed=int(not finite), first_failed_step=step
        )
        ledger.check(LOSS, "postcondition", LOSS_NOT_NAN, passed=int(not nan), failed=int(nan), first_failed_step=step)
    grads_bad = skipped and finite
    ledger.check(
        GRAD, "precondition", GRADS_FINITE, passed=int(not grads_bad), failed=int(grads_bad), first_failed_step=step
    )
    if skipped or clip_value is None:
        return
    within = clipped_norm <= clip_value * (1 + NORM_RESOLUTION)
    for kind, text in (("postcondition", NORM_BOUND), ("invariant", NORM_INVARIANT)):
        ledger.check(GRAD, kind, text, passed=int(within), failed=int(not within), first_failed_step=step)
    clipped_finite = math.isfinite(clipped_norm)
    ledger.check(GRAD, "postcondition", GRADS_FINITE, passed=int(clipped_finite), failed=int(not clipped_finite))
    if not within:
        raise ContractViolation(
            GRAD,
            NORM_BOUND,
            kind="postcondition",
            step=step,
            observed={"grad_norm": clipped_norm, "clip_value": clip_value},
            hint="This is a provetrain bug; please report it with the run's metrics.",
        )
