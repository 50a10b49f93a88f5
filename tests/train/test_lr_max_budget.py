"""lr_max that a real model can afford (issue 12, item 3): opt-in, a budget of products and seconds, progress,
the uncompiled module, one micro-batch of curvature; `lr < lr_max` unset is reported as not checked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from provetrain.errors import ConfigError
from provetrain.train.config import TrainConfig
from provetrain.train.lr_max import PowerBudget, estimate_lr_max
from provetrain.train.trainer import Trainer
from tests.train.test_distributed import blobs


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))


def quadratic(n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """A quadratic with close top eigenvalues: power iteration needs many products."""
    a = torch.diag(torch.linspace(1.0, 2.0, n, dtype=torch.float64))
    return a, torch.ones(n, dtype=torch.float64, requires_grad=True)


def test_a_product_budget_stops_the_estimate_unconverged_and_says_so() -> None:
    a, x = quadratic()
    seen: list[int] = []
    budget = PowerBudget(products=5, progress=seen.append)
    estimate = estimate_lr_max(lambda: 0.5 * x @ a @ x, [x], optimizer="sgd", iterations=500, budget=budget)
    assert (estimate.iterations, estimate.converged, estimate.stopped) == (5, False, "products")
    assert seen == [1, 2, 3, 4, 5]
    assert estimate.explanation.endswith("Stopped by the budget (5 Hessian-vector products) before converging.")


def test_a_time_budget_stops_the_estimate() -> None:
    a, x = quadratic()
    budget = PowerBudget(seconds=0.0)  # spent as soon as it starts: one product, then stop
    estimate = estimate_lr_max(lambda: 0.5 * x @ a @ x, [x], optimizer="sgd", iterations=500, budget=budget)
    assert (estimate.iterations, estimate.stopped) == (1, "seconds")


def test_without_a_budget_the_estimate_is_unchanged() -> None:
    a, x = quadratic(4)
    estimate = estimate_lr_max(lambda: 0.5 * x @ a @ x, [x], optimizer="sgd", iterations=500)
    assert estimate.converged and estimate.stopped == "" and estimate.lr_max == pytest.approx(1.0, rel=1e-3)


def test_the_trainer_spends_its_lr_max_budget_and_reports_progress(tmp_path: Path) -> None:
    seen: list[int] = []
    trainer = Trainer(mlp(), blobs(), steps=2, lr_max_budget={"hvp": 3, "batches": 2})
    estimate = trainer.estimate_lr_max(progress=seen.append)
    assert estimate.iterations <= 3 and seen == list(range(1, estimate.iterations + 1))


def test_lr_max_auto_estimates_on_the_uncompiled_module_of_a_compiled_run(tmp_path: Path) -> None:
    trainer = Trainer(
        mlp(), blobs(), steps=3, lr_max="auto", compile=True, compile_backend="eager", output_dir=str(tmp_path)
    )
    result = trainer.fit()
    assert result.lr_max_estimate is not None and result.lr_max_estimate.lr_max > 0
    assert result.certificate["outcome"] == "kept"


def test_an_estimate_that_fails_is_a_config_error_at_lr_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As torch's error for double backward through a compiled graph (the issue's crash after 18.8 minutes)."""
    from provetrain.train import trainer as module

    def compiled_backward(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("This backward function was compiled with non-empty donated buffers")

    monkeypatch.setattr(module, "estimate_lr_max", compiled_backward)
    trainer = Trainer(mlp(), blobs(), steps=2, lr_max="auto", output_dir=str(tmp_path / "r"))
    message = (
        "key 'lr_max': the lr_max estimate failed: RuntimeError: This backward function was compiled with non-empty "
        "donated buffers"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        trainer.fit()
    assert not (tmp_path / "r").exists()


def test_lr_max_is_opt_in_and_unset_is_reported_as_not_checked(tmp_path: Path) -> None:
    assert TrainConfig().lr_max is None
    result = Trainer(mlp(), blobs(), steps=2, output_dir=str(tmp_path)).fit()
    below = next(c for c in result.certificate["clauses"] if c["text"] == "lr < lr_max")
    assert (below["checks"], below["violations"], below["status"]) == (0, 0, "not checked")
    assert result.certificate["outcome"] == "kept" and result.lr_max_estimate is None
    positive = next(c for c in result.certificate["clauses"] if c["text"] == "lr > 0.0")
    assert positive["status"] == "held"


def test_the_lr_max_command_prints_progress_and_respects_the_budget(tmp_path: Path) -> None:
    from provetrain.cli import app

    result = CliRunner().invoke(app, ["lr-max", "--batches", "2", "--iterations", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 1 <= report["iterations"] <= 4
    assert "lr_max: 1/4 Hessian-vector products, " in result.stderr
    assert "Traceback" not in result.output
