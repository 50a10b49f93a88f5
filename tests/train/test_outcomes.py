"""Honest outcomes (issue 12, item 4): ``kept`` only for a run that finished with every clause held or every
violation undone by its policy; any exception ends ``failed: ...`` with the last checkpoint intact."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from provetrain.contract.load import load_contract
from provetrain.train.certificate import GRAD, GRADS_FINITE, LOSS, LOSS_FINITE, LOSS_NOT_NAN, LOSS_TREND, ClauseLedger
from provetrain.train.checkpoint import load_checkpoint
from provetrain.train.trainer import Trainer
from tests.train.test_distributed import blobs


class RaisesAtCall(nn.Module):
    """A small MLP whose training forward raises on call ``call`` (one call per step without accumulation)."""

    def __init__(self, call: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.call, self.calls = call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.call:
                raise ValueError("boom at step 5")
        return self.net(x)


def certificate_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "certificate.json").read_text())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_model_that_raises_at_step_5_fails_the_run_and_keeps_the_previous_checkpoint(
    tmp_path: Path, compiled: bool
) -> None:
    extra = {"compile": True, "compile_backend": "eager"} if compiled else {}
    trainer = Trainer(RaisesAtCall(5), blobs(), steps=10, checkpoint_every=2, output_dir=str(tmp_path), **extra)
    with pytest.raises(ValueError, match="boom at step 5"):
        trainer.fit()
    assert certificate_of(tmp_path)["outcome"] == "failed: ValueError: boom at step 5"
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.step == 4 and checkpoint.state["applied_steps"] == 4
    resumed = Trainer(RaisesAtCall(-1), blobs(), steps=10, output_dir=str(tmp_path / "again"), **extra)
    assert resumed.fit(resume_from=tmp_path / "checkpoints").certificate["outcome"] == "kept"


def ledger() -> ClauseLedger:
    return ClauseLedger(load_contract())


def test_a_counted_precondition_violation_is_not_kept() -> None:
    """A warmup starting at lr = 0 (what the framework callbacks count) ends ``violated``, with the counts."""
    book = ledger()
    book.check(LOSS, "precondition", "lr > 0.0", passed=0, failed=1, first_failed_step=0)
    book.check(LOSS, "precondition", "lr > 0.0", passed=9)
    outcome = book.certificate(run={}, outcome="kept")["outcome"]
    assert outcome == (
        "violated: loss_decrease precondition `lr > 0.0`: 1 of 10 checks violated and not undone, first at step 0 "
        "(policy actions: none)"
    )


def test_violations_a_skip_or_rollback_undid_are_kept_and_a_warning_is_not() -> None:
    book = ledger()
    for clause in (LOSS_FINITE, LOSS_NOT_NAN):  # a NaN loss: both postconditions, one skip
        book.check(LOSS, "postcondition", clause, passed=3, failed=1, first_failed_step=2)
    book.act(LOSS, "postcondition", LOSS_FINITE, "skip")
    book.check(GRAD, "precondition", GRADS_FINITE, passed=3, failed=1, first_failed_step=3)
    book.act(GRAD, "precondition", GRADS_FINITE, "rollback")
    assert book.certificate(run={}, outcome="kept")["outcome"] == "kept"
    book.check(LOSS, "invariant", LOSS_TREND, passed=0, failed=1, first_failed_step=99)
    book.act(LOSS, "invariant", LOSS_TREND, "warn")
    outcome = book.certificate(run={}, outcome="kept")["outcome"]
    assert outcome.startswith("violated: loss_decrease invariant `Loss monotonically non-increasing (in expectation)`")
    assert "(policy actions: warn x1)" in outcome
    assert book.certificate(run={}, outcome="failed: OSError: x")["outcome"] == "failed: OSError: x"


def test_a_finished_run_with_an_unremedied_violation_is_certified_violated(tmp_path: Path) -> None:
    """A loss-trend alarm under on_loss_increase=warn: the run finishes, the certificate says violated."""

    class Rising(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += self.training
            return (self.w + 0.2 * self.calls * torch.tensor([1.0, -1.0])).expand(len(x), 2)  # ever more wrong on 1

    result = Trainer(
        Rising(), blobs(), steps=20, monitor_window=5, monitor_alpha=0.2, output_dir=str(tmp_path), lr=1e-6
    ).fit()
    assert result.certificate["outcome"].startswith("violated: loss_decrease invariant")
    assert certificate_of(tmp_path)["outcome"] == result.certificate["outcome"]


def test_the_cli_reports_a_models_error_in_one_paragraph_and_exits_1(tmp_path: Path, monkeypatch: Any) -> None:
    from provetrain.cli import app

    (tmp_path / "badmodel.py").write_text(
        "import torch\n\n"
        "class Bad(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n"
        "        self.calls = 0\n\n"
        "    def forward(self, x):\n"
        "        self.calls += self.training\n"
        "        if self.calls == 4:\n"
        "            raise RuntimeError('bad shape in my layer')\n"
        "        return self.net(x)\n\n"
        "def build():\n"
        "    return Bad()\n"
    )
    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(
        f"model: badmodel:build\nsteps: 6\nbatch_size: 16\ncheckpoint_every: 2\noutput_dir: {out}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(app, ["train", "cfg.yaml", "--quiet"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: the run failed: RuntimeError: bad shape in my layer (raised at ")
    assert "badmodel.py:12 in forward" in result.stderr and f"--resume {out / 'checkpoints'}" in result.stderr
    assert certificate_of(out)["outcome"] == "failed: RuntimeError: bad shape in my layer"
    sys.modules.pop("badmodel", None)


def test_the_cli_exits_1_when_a_finished_run_is_not_kept(tmp_path: Path, monkeypatch: Any) -> None:
    from provetrain.cli import app

    (tmp_path / "rising.py").write_text(
        "import torch\n\n"
        "class Rising(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.zeros(10))\n"
        "        self.calls = 0\n\n"
        "    def forward(self, x):\n"
        "        self.calls += self.training\n"
        "        wrong = torch.arange(10.0) * 0.2 * self.calls\n"
        "        return (self.w + wrong).expand(len(x), 10)\n\n"
        "def build():\n"
        "    return Rising()\n"
    )
    out = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text(
        f"model: rising:build\nsteps: 20\nlr: 1.0e-6\nmonitor_window: 5\nmonitor_alpha: 0.2\noutput_dir: {out}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("contract not kept: violated: loss_decrease invariant `Loss monotonically")
    assert certificate_of(out)["outcome"].startswith("violated: loss_decrease invariant")
    sys.modules.pop("rising", None)
