"""Several contracts at once: one table per contract, bindings carried by clause text only where the same check
enforces them, "not applicable" distinct from a gap, and the `contract status|audit|lint FILE...` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.contract import (
    bundled_contract_path,
    clause_statuses,
    load_contract,
    load_contract_with_warnings,
    sibling_bindings,
)
from provetrain.contract.bindings import BINDINGS, CARRIED_TEXTS, Binding, Evidence
from provetrain.contract.registry import bindings_for
from provetrain.contract.sibling_bindings import NotApplicable

runner = CliRunner()


def _statuses(name: str) -> dict[str, object]:
    loaded = load_contract_with_warnings(name)
    return {s.clause.id: s for s in clause_statuses(loaded.contract, name=loaded.name)}


@pytest.fixture
def no_sibling_bindings(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty sibling table, so these tests see only the carrying rule (whatever the sibling bindings are)."""
    table: dict = {}
    monkeypatch.setattr(sibling_bindings, "SIBLING_BINDINGS", table)
    monkeypatch.setattr("provetrain.contract.registry.SIBLING_BINDINGS", table)
    return table


def test_run_wide_preconditions_carry_by_text_to_other_contracts(no_sibling_bindings: dict) -> None:
    statuses = _statuses("optimizer-v1")
    for clause_id in ("adamw_update.preconditions[0]", "convergence.preconditions[0]"):  # lr > 0.0
        status = statuses[clause_id]
        assert status.bound and status.carried_from == "training-loop-v1"
        assert status.binding == BINDINGS[("loss_decrease", "precondition", "lr > 0.0")]
    assert statuses["adamw_update.preconditions[5]"].carried_from == "training-loop-v1"  # !params.is_empty()


def test_per_step_clauses_do_not_carry(no_sibling_bindings: dict) -> None:
    """batch-v1's gradient_scaling quotes the seed's gradient clauses about per-example gradients."""
    statuses = _statuses("batch-v1")
    finite = statuses["gradient_scaling.preconditions[2]"]
    assert finite.clause.text == "gradients.iter().all(|g| g.is_finite())"
    assert (finite.bound, finite.carried_from) == (False, None)
    assert "no code enforces it" in finite.gaps
    assert all(kind == "precondition" for kind, _ in CARRIED_TEXTS)


def test_a_contracts_own_entry_wins_over_the_carried_one(no_sibling_bindings: dict) -> None:
    own = Binding(("provetrain.ops.adam.Adam.__init__",), (Evidence("unit-test", "tests/x.py::test_y"),))
    no_sibling_bindings["optimizer-v1"] = {
        ("adamw_update", "precondition", "lr > 0.0"): own,
        ("convergence", "precondition", "lr > 0.0"): NotApplicable("not about this run"),
    }
    statuses = _statuses("optimizer-v1")
    assert (
        statuses["adamw_update.preconditions[0]"].binding,
        statuses["adamw_update.preconditions[0]"].carried_from,
    ) == (
        own,
        None,
    )
    na = statuses["convergence.preconditions[0]"]
    assert (na.state, na.not_applicable, na.gaps, na.bound) == ("not applicable", "not about this run", (), False)
    assert statuses["sgd_momentum_update.preconditions[0]"].carried_from == "training-loop-v1"


def test_any_other_name_reads_with_the_seeds_table(no_sibling_bindings: dict) -> None:
    assert bindings_for("training-loop-v1") is BINDINGS
    assert bindings_for("my-copy") is BINDINGS
    # a shipped sibling without a table of its own: the seed's obligation of the same text does not bind it
    assert bindings_for("backward-pass-v1") == {}
    shared = _statuses("backward-pass-v1")["proof_obligations[2]"]
    assert shared.clause.text == "Gradient norm bounded after clipping" and not shared.bound
    copy = clause_statuses(load_contract(), name="my-copy")
    assert all(s.bound for s in copy)


# ------------------------------------------------------------------------------------------- the commands
def _seed_copy(tmp_path: Path, name: str, old: str = "", new: str = "") -> Path:
    path = tmp_path / name
    path.write_text(bundled_contract_path().read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    return path


def test_status_of_several_contracts_shows_each_with_its_warnings_located() -> None:
    result = runner.invoke(app, ["contract", "status", "training-loop-v1", "optimizer-v1", "batch-v1"])
    assert result.exit_code == 0, result.output
    assert "training-loop-v1: 19 of 19 clauses bound." in result.stdout
    assert "optimizer-v1 (bundled)" in result.stdout and "batch-v1 (bundled)" in result.stdout
    path = bundled_contract_path("optimizer-v1")
    assert f"{path}:97:17: warning [dangling-obligation]: key 'kani_harnesses[0].obligation'" in result.stderr
    assert "(did you mean 'Learning rate positive'?)" in result.stderr


def test_status_json_rows_name_their_contract(no_sibling_bindings: dict) -> None:
    result = runner.invoke(app, ["contract", "status", "--json", "training-loop-v1", "optimizer-v1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["contract"] for r in rows} == {"training-loop-v1", "optimizer-v1"}
    assert sum(r["contract"] == "training-loop-v1" for r in rows) == 19
    assert {r["state"] for r in rows} <= {"bound", "not applicable", "unbound"}
    carried = [r for r in rows if r["carried_from"] == "training-loop-v1"]
    assert carried and all(r["contract"] == "optimizer-v1" and r["bound"] for r in carried)


def test_a_not_applicable_clause_is_shown_with_its_reason_and_does_not_fail_audit(
    tmp_path: Path, no_sibling_bindings: dict
) -> None:
    table = dict(BINDINGS)
    table[("falsification_tests", "falsification", "FALSIFY-TRAIN-003")] = NotApplicable("no CUDA here, by design")
    no_sibling_bindings["na-demo"] = table
    path = _seed_copy(tmp_path, "na-demo.yaml")
    status = runner.invoke(app, ["contract", "status", str(path)])
    assert status.exit_code == 0, status.output
    assert "n/a: no CUDA here, by design" in status.stdout
    assert "na-demo: 18 of 19 clauses bound. 1 not applicable." in status.stdout
    audit = runner.invoke(app, ["contract", "audit", str(path), "--json"])
    assert audit.exit_code == 0, audit.output
    report = json.loads(audit.stdout)
    assert report["ok"] and report["contracts"] == [
        {"contract": "na-demo", "total": 19, "unbound": 0, "not_applicable": 1}
    ]


def test_audit_of_several_fails_on_any_gap_and_says_where(tmp_path: Path) -> None:
    mine = _seed_copy(tmp_path, "mine.yaml", '"lr < lr_max"', '"lr <= lr_ceiling"')
    result = runner.invoke(app, ["contract", "audit", "training-loop-v1", str(mine)])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["== training-loop-v1", "training-loop-v1: All 19 clauses bound and evidenced."]
    assert lines[2:] == [
        "== mine",
        "UNBOUND loss_decrease.preconditions[1] `lr <= lr_ceiling`: no predicate for this clause text; no code "
        "enforces it; no evidence",
        "mine: 1 of 19 clauses unbound.",
    ]


def test_audit_of_the_seed_alone_is_green() -> None:
    for argv in (["contract", "audit"], ["contract", "audit", "training-loop-v1"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
        assert result.stdout == "training-loop-v1: All 19 clauses bound and evidenced.\n"


def test_lint_passes_a_clean_contract_and_fails_on_any_warning(tmp_path: Path) -> None:
    clean = runner.invoke(app, ["contract", "lint", "training-loop-v1"])
    assert (clean.exit_code, clean.stdout) == (0, "training-loop-v1: clean\n")
    typo = _seed_copy(tmp_path, "typo.yaml", "    postconditions:", "    postcondition:")
    result = runner.invoke(app, ["contract", "lint", "training-loop-v1", str(typo), "optimizer-v1"])
    assert result.exit_code == 1, result.output
    assert f"{typo}:18:5: warning [unknown-key]: key 'equations.loss_decrease.postcondition'" in result.stdout
    assert "(did you mean 'postconditions'?)" in result.stdout
    assert "typo: 2 warnings" in result.stdout and "optimizer-v1: 1 warning" in result.stdout
    # the same file loads for status (warnings on stderr, exit 0)
    assert runner.invoke(app, ["contract", "status", str(typo)]).exit_code == 0


@pytest.mark.parametrize("command", ["status", "audit", "lint"])
def test_a_type_error_exits_2_located_and_the_other_contracts_are_still_read(tmp_path: Path, command: str) -> None:
    bad = _seed_copy(tmp_path, "bad.yaml", "bound: 4", "bound: four")
    result = runner.invoke(app, ["contract", command, str(bad), "training-loop-v1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {bad}:71:12: key 'kani_harnesses[0].bound': ")
    assert "training-loop-v1" in result.stdout
    assert "Traceback" not in result.output


def test_an_unknown_contract_name_lists_the_bundled_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["contract", "status", "optimiser-v1"])
    assert result.exit_code == 2
    assert "error: optimiser-v1: cannot read the contract file" in result.stderr
    assert "optimizer-v1" in result.stderr and "Traceback" not in result.output
