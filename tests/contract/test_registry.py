"""The clause registry: enumeration, predicates bound by exact text, and honest gaps."""

from __future__ import annotations

import math

import pytest
import torch

from provetrain import load_contract, parse_contract
from provetrain.contract import bundled_contract_path, clause_statuses, enumerate_clauses
from provetrain.contract.predicates import PREDICATES, predicate_for
from provetrain.contract.registry import Binding, Evidence


def test_shipped_contract_has_19_clauses_in_file_order() -> None:
    clauses = enumerate_clauses(load_contract())
    kinds = [c.kind for c in clauses]
    assert kinds.count("precondition") == 6
    assert kinds.count("postcondition") == 4
    assert kinds.count("invariant") == 2
    assert kinds.count("obligation") == 3
    assert kinds.count("falsification") == 3
    assert kinds.count("harness") == 1
    assert [c.id for c in clauses][:3] == [
        "loss_decrease.preconditions[0]",
        "loss_decrease.preconditions[1]",
        "loss_decrease.preconditions[2]",
    ]
    assert clauses[-1].id == "train-kani-001"


def test_same_text_in_two_roles_is_two_clauses() -> None:
    finite = "gradients.iter().all(|g| g.is_finite())"
    keys = [c.key for c in enumerate_clauses(load_contract()) if c.text == finite]
    assert keys == [("gradient_norm", "precondition", finite), ("gradient_norm", "postcondition", finite)]


def test_every_rust_clause_of_the_shipped_contract_has_a_predicate() -> None:
    for clause in enumerate_clauses(load_contract()):
        if clause.kind in ("precondition", "postcondition"):
            assert predicate_for(clause.text) is not None, clause.text


# (clause text, values, expected truth)
PREDICATE_CASES = [
    ("lr > 0.0", {"lr": 1e-3}, True),
    ("lr > 0.0", {"lr": 0.0}, False),
    ("lr > 0.0", {"lr": math.nan}, False),
    ("lr < lr_max", {"lr": 0.1, "lr_max": 0.2}, True),
    ("lr < lr_max", {"lr": 0.2, "lr_max": 0.2}, False),
    ("!params.is_empty()", {"params": [torch.zeros(3)]}, True),
    ("!params.is_empty()", {"params": []}, False),
    ("!params.is_empty()", {"params": [torch.zeros(0)]}, False),
    ("loss.is_finite()", {"loss": torch.tensor(1.5)}, True),
    ("loss.is_finite()", {"loss": torch.tensor(math.inf)}, False),
    ("loss.is_finite()", {"loss": torch.tensor(math.nan)}, False),
    ("!loss.is_nan()", {"loss": torch.tensor(math.inf)}, True),
    ("!loss.is_nan()", {"loss": torch.tensor(math.nan)}, False),
    ("clip_value > 0.0", {"clip_value": 1.0}, True),
    ("clip_value > 0.0", {"clip_value": -1.0}, False),
    ("clip_value > 0.0", {"clip_value": math.nan}, False),
    ("!gradients.is_empty()", {"gradients": [torch.ones(2)]}, True),
    ("!gradients.is_empty()", {"gradients": []}, False),
    ("gradients.iter().all(|g| g.is_finite())", {"gradients": [torch.ones(2), torch.tensor([3e38])]}, True),
    (
        "gradients.iter().all(|g| g.is_finite())",
        {"gradients": [torch.ones(2), torch.tensor([-math.inf])]},
        False,
    ),
    ("gradients.iter().all(|g| g.is_finite())", {"gradients": [torch.tensor([1.0, math.nan])]}, False),
    ("grad_norm <= clip_value", {"grad_norm": 1.0, "clip_value": 1.0}, True),
    ("grad_norm <= clip_value", {"grad_norm": math.nextafter(1.0, 2.0), "clip_value": 1.0}, False),
]


@pytest.mark.parametrize(("text", "values", "expected"), PREDICATE_CASES)
def test_predicate_means_the_clause(text: str, values: dict, expected: bool) -> None:
    assert bool(PREDICATES[text](**values)) is expected


def test_tensor_predicates_stay_on_the_device() -> None:
    flag = PREDICATES["loss.is_finite()"](loss=torch.tensor(1.0))
    assert isinstance(flag, torch.Tensor)
    assert flag.dtype == torch.bool
    assert flag.dim() == 0


def test_predicate_variables_are_the_clause_variables() -> None:
    assert PREDICATES["lr < lr_max"].variables == ("lr", "lr_max")
    assert PREDICATES["gradients.iter().all(|g| g.is_finite())"].variables == ("gradients",)


def test_unbound_clause_is_a_gap_not_true() -> None:
    text = (
        bundled_contract_path()
        .read_text(encoding="utf-8")
        .replace('      - "!params.is_empty()"', '      - "params.iter().all(|p| p.abs() < 1e9)"')
    )
    statuses = {s.clause.id: s for s in clause_statuses(parse_contract(text))}
    status = statuses["loss_decrease.preconditions[2]"]
    assert status.clause.text == "params.iter().all(|p| p.abs() < 1e9)"
    assert status.predicate is None
    assert not status.bound
    assert "no predicate for this clause text" in status.gaps


def test_binding_needs_enforcement_and_evidence() -> None:
    contract = load_contract()
    key = ("gradient_norm", "precondition", "clip_value > 0.0")
    enforced_only = {key: Binding(enforced_by=("provetrain.cli.main",))}
    status = next(s for s in clause_statuses(contract, enforced_only) if s.clause.key == key)
    assert status.gaps == ("no evidence",)
    full = {key: Binding(("provetrain.cli.main",), (Evidence("unit-test", "tests/x.py::test_y"),))}
    status = next(s for s in clause_statuses(contract, full) if s.clause.key == key)
    assert status.bound


def test_falsification_id_without_a_test_is_reported_as_such() -> None:
    statuses = clause_statuses(load_contract(), {})
    status = next(s for s in statuses if s.clause.id == "FALSIFY-TRAIN-003")
    assert status.gaps == ("no test",)
