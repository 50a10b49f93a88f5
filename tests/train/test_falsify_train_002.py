"""FALSIFY-TRAIN-002: no NaN/Inf in the loss for 100 steps of training on random data, checked each step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from provetrain.data.sources import DataSplits
from provetrain.models.builtin import mlp
from provetrain.train.trainer import Trainer


def random_data(scale: float, seed: int) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 32, generator=g) * scale
    y = torch.randint(0, 10, (512,), generator=g)
    return DataSplits(TensorDataset(x[:448], y[:448]), TensorDataset(x[448:], y[448:]), "classification", (32,), 10)


@pytest.mark.contract("FALSIFY-TRAIN-002")
@pytest.mark.parametrize(("scale", "lr"), [(1.0, 1e-3), (1e4, 3e-2)], ids=["unit-inputs", "huge-inputs-high-lr"])
def test_falsify_train_002_loss_finite_for_100_steps(tmp_path: Path, scale: float, lr: float) -> None:
    torch.manual_seed(0)
    data = random_data(scale, seed=0)
    result = Trainer(
        mlp((32,), 10),
        data,
        steps=100,
        lr=lr,
        lr_max=None,
        batch_size=64,
        on_nonfinite="raise",  # any non-finite loss would raise, naming its step
        output_dir=str(tmp_path / "run"),
    ).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 100
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses)
    assert result.skipped_steps == 0
    certificate = json.loads((tmp_path / "run" / "certificate.json").read_text())
    finite = next(c for c in certificate["clauses"] if c["text"] == "loss.is_finite()")
    assert (finite["checks"], finite["violations"]) == (100, 0)
