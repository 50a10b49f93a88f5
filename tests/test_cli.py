"""The command line: contract status and audit, human and JSON, and exit codes."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.contract import bundled_contract_path

runner = CliRunner()


def test_status_lists_all_19_clauses_as_json() -> None:
    result = runner.invoke(app, ["contract", "status", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 19
    assert {r["kind"] for r in rows} == {
        "precondition",
        "postcondition",
        "invariant",
        "obligation",
        "falsification",
        "harness",
    }
    first = rows[0]
    assert first["text"] == "lr > 0.0"
    assert first["predicate"] == "provetrain.contract.predicates.lr_is_positive"


def test_status_table_names_every_clause() -> None:
    result = runner.invoke(app, ["contract", "status"])
    assert result.exit_code == 0, result.output
    for text in (
        "gradient_norm.postconditions[0]",
        "FALSIFY-TRAIN-003",
        "train-kani-001",
        "proof_obligations[2]",
    ):
        assert text in result.stdout
    assert "clauses bound." in result.stdout


def test_audit_exit_code_follows_the_gaps() -> None:
    status = json.loads(runner.invoke(app, ["contract", "status", "--json"]).stdout)
    result = runner.invoke(app, ["contract", "audit", "--json"])
    report = json.loads(result.stdout)
    unbound = [r["id"] for r in status if not r["bound"]]
    assert [r["id"] for r in report["unbound"]] == unbound
    assert report["ok"] is (not unbound)
    assert result.exit_code == (1 if unbound else 0)


def test_audit_lists_unbound_clause_of_a_users_contract(tmp_path: Path) -> None:
    contract = tmp_path / "mine.yaml"
    contract.write_text(
        bundled_contract_path().read_text(encoding="utf-8").replace('"lr < lr_max"', '"lr <= lr_ceiling"'),
        encoding="utf-8",
    )
    result = runner.invoke(app, ["contract", "audit", str(contract)])
    assert result.exit_code == 1
    assert (
        "UNBOUND loss_decrease.preconditions[1] `lr <= lr_ceiling`: no predicate for this clause text" in result.stdout
    )


def test_bad_contract_prints_one_located_message_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(bundled_contract_path().read_text(encoding="utf-8").replace("bound: 4", "bound: four"))
    for command in ("status", "audit"):
        result = runner.invoke(app, ["contract", command, str(bad)])
        assert result.exit_code == 2
        assert "bad.yaml:71:12: key 'kani_harnesses[0].bound'" in result.stderr
        assert "Traceback" not in result.output


def test_module_entry_point_runs_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "provetrain", "contract", "status", str(missing)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "cannot read the contract file" in done.stderr
    assert "Traceback" not in done.stderr


def test_parity_without_cuda_compares_against_float64() -> None:
    result = runner.invoke(app, ["parity", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    (row,) = [r for r in report["results"] if r["obligation"]] if not report["cuda"] else report["results"][:1]
    assert row["max_abs_error"] < 1e-4


def test_parity_of_a_users_factory_needs_an_input_shape() -> None:
    result = runner.invoke(app, ["parity", "--model", "torch.nn:Identity"])
    assert result.exit_code == 2
    assert "give --input-shape" in result.stderr
    result = runner.invoke(app, ["parity", "--model", "torch.nn:Identity", "--input-shape", "2,3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["max_abs_error"] == 0.0


def test_train_writes_outputs_and_reports_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--steps", "15", "--quiet", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "test accuracy:" in result.stdout
    assert f"outputs: {out}/" in result.stdout
    assert {p.name for p in out.iterdir()} >= {"metrics.jsonl", "certificate.json", "report.png", "checkpoints"}


def test_train_bad_config_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"epochs: 0\noutput_dir: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "bad.yaml:1:9: key 'epochs': Input should be greater than or equal to 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_train_contract_violation_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "hot.yaml"
    config.write_text(f"lr: 0.01\nlr_max: 0.001\nsteps: 5\noutput_dir: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 1
    assert "contract violation: contract loss_decrease precondition `lr < lr_max` violated" in result.stderr


def test_lr_max_of_the_default_job(tmp_path: Path) -> None:
    result = runner.invoke(app, ["lr-max", "--batches", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "adam" and report["lr"] == 0.01
    assert report["lr_below_lr_max"] is True and report["lr_max"] > 0.01
    assert isinstance(report["converged"], bool) and 1 <= report["iterations"] <= 100  # two power iterations at most
    assert report["declared_lr_max"] is None and report["refused"] is False


def test_lr_max_above_the_estimate_is_advice_and_a_declared_bound_is_not(tmp_path: Path) -> None:
    """An lr above the estimate exits 0 (the estimate is not enforced); one at or above a declared lr_max
    exits 1, as training would refuse it."""
    config = tmp_path / "hot.yaml"
    config.write_text("lr: 5.0\n")
    result = runner.invoke(app, ["lr-max", str(config), "--batches", "2", "--iterations", "3"])
    assert result.exit_code == 0, result.output
    assert "peak lr = 5 is at or above the estimate; the estimate is not enforced" in result.stdout
    assert re.search(r"\b[36] Hessian-vector products, NOT converged", result.stdout), result.stdout
    assert "no lr_max declared: training reports `lr < lr_max` as unchecked" in result.stdout
    config.write_text("lr: 5.0\nlr_max: 1.0\n")
    result = runner.invoke(app, ["lr-max", str(config), "--batches", "2", "--iterations", "3", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["refused"] is True


def test_train_summary_reports_the_estimate_and_the_unchecked_clause(tmp_path: Path) -> None:
    config = tmp_path / "auto.yaml"
    config.write_text(f"lr_max: auto\nsteps: 3\noutput_dir: {tmp_path / 'run'}\n")
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert re.search(
        r"lr < lr_max: unchecked \(no lr_max declared\); estimated edge of stability [0-9.e+-]+ \(\d+ Hessian-vector "
        r"products, (converged|NOT converged: optimistic)\), reported, not enforced",
        result.stdout,
    ), result.stdout
    run = json.loads((tmp_path / "run" / "certificate.json").read_text())["run"]
    assert run["lr_max"] is None and set(run["lr_max_estimate"]) >= {"lr_max", "converged", "iterations", "residual"}


def test_every_resume_failure_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    first = runner.invoke(app, ["train", "--steps", "6", "--quiet", "--output-dir", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    checkpoints = tmp_path / "a" / "checkpoints"
    for resume, steps, message in (
        (tmp_path / "missing", "8", "does not exist"),
        (checkpoints / "step-abc", "8", "a checkpoint is named step-<N> with N a number"),
        (checkpoints / "step-6", "5", "it is at step 6, and this run ends at step 5 (steps is the total"),
    ):
        out = tmp_path / "b"
        result = runner.invoke(
            app, ["train", "--steps", steps, "--quiet", "--output-dir", str(out), "--resume", str(resume)]
        )
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: cannot resume from ") and message in result.stderr
        assert "Traceback" not in result.output and not out.exists()


def test_a_full_disk_exits_1_with_one_line_and_a_failed_certificate(tmp_path: Path, monkeypatch: Any) -> None:
    from provetrain.train import checkpoint

    def full_disk(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_contents", full_disk)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--steps", "3", "--quiet", "--output-dir", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr == "error: [Errno 28] No space left on device\n"
    assert json.loads((out / "certificate.json").read_text())["outcome"].startswith("failed: OSError: [Errno 28]")


def test_console_script_imports_module_functions_from_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
    )
    (tmp_path / "cfg.yaml").write_text("model: mymodel:build\nsteps: 2\nbatch_size: 16\n")
    script = Path(sys.executable).parent / "provetrain"
    done = subprocess.run(
        [str(script), "train", "cfg.yaml", "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "run" / "certificate.json").exists()
