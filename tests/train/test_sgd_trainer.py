"""``optimizer: sgd`` in the Trainer (issue 12 item 2, issue 14 item 3): provetrain.SGD with momentum and
Nesterov, the same clip, guard and skip as Adam, exact resume of the momentum buffers, settings of one
optimizer refused with the other, and lr_max: auto with SGD's threshold."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.data.sources import DataSplits
from provetrain.errors import ConfigError
from provetrain.ops.sgd import SGD
from provetrain.train.lr_max import LrMaxEstimate
from provetrain.train.trainer import Trainer, _with_momentum


def blobs(n: int = 192) -> DataSplits:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * y[:, None].float()
    return DataSplits(TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:]), "classification", (8,), 2)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 2))


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


SGD_SETTINGS: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "batch_size": 16}


def test_the_trainer_builds_provetrain_sgd_with_momentum_and_nesterov(tmp_path: Path) -> None:
    trainer = Trainer(mlp(), blobs(), steps=6, output_dir=str(tmp_path), **SGD_SETTINGS)
    result = trainer.fit()
    assert isinstance(trainer.optimizer, SGD)
    assert {(g["momentum"], g["nesterov"], g["dampening"]) for g in trainer.optimizer.param_groups} == {(0.9, True, 0)}
    # Weight-decay groups as for Adam: biases decay-free, the weights at the configured rate (L2, torch's SGD).
    assert sorted(g["weight_decay"] for g in trainer.optimizer.param_groups) == [0.0, 0.01]
    assert all("momentum_buffer" in s for s in trainer.optimizer.state.values())
    assert (result.applied_steps, result.certificate["outcome"]) == (6, "kept")


def test_the_sgd_trajectory_is_torchs_when_nothing_is_clipped(tmp_path: Path) -> None:
    """The Trainer adds nothing to SGD's arithmetic: the same batches through torch.optim.SGD give the
    same weights, bit for bit (constant lr, no clip, no weight decay, no dropout)."""
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    reference = nn.Linear(8, 2)
    reference.load_state_dict(model.state_dict())
    trainer = Trainer(
        model,
        blobs(),
        steps=5,
        schedule="constant",
        clip_value=None,
        weight_decay=0.0,
        output_dir=str(tmp_path),
        **SGD_SETTINGS,
    )
    batches = trainer._first_batches(5)
    trainer.fit()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(reference), strict=True))


def test_a_resumed_sgd_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    """The momentum buffers are in the checkpoint: a resumed run continues bit for bit (dropout included)."""
    settings = SGD_SETTINGS | {"steps": 10, "checkpoint_every": 5}
    whole = Trainer(mlp(), blobs(), output_dir=str(tmp_path / "whole"), **settings)
    whole.fit()
    saved = json.loads((tmp_path / "whole" / "checkpoints" / "step-5" / "state.json").read_text())
    assert "momentum_buffer" in json.dumps(saved["optimizer"])
    resumed = Trainer(mlp(), blobs(), output_dir=str(tmp_path / "resumed"), **settings)
    resumed.fit(resume_from=tmp_path / "whole" / "checkpoints" / "step-5")
    assert all(torch.equal(a, b) for a, b in zip(weights(whole.model), weights(resumed.model), strict=True))
    # Without its buffers the same resume would differ: momentum matters over 5 steps at 0.9.
    for state in resumed.optimizer.state.values():
        assert torch.count_nonzero(state["momentum_buffer"]) > 0


class NanOnCall(nn.Module):
    """mlp() whose output is NaN on one training forward (so are the loss and every gradient)."""

    def __init__(self, call: int) -> None:
        super().__init__()
        self.net, self.call, self.calls = mlp(), call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.call:
                return out * math.nan
        return out


class Weights:
    def __init__(self) -> None:
        self.after: dict[int, list[torch.Tensor]] = {}
        self.buffers: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.after[row["step"]] = weights(trainer.model)
        self.buffers[row["step"]] = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()]

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer, result: Any) -> None: ...


def test_a_nan_step_is_skipped_weights_and_momentum_untouched(tmp_path: Path) -> None:
    seen = Weights()
    trainer = Trainer(
        NanOnCall(3),  # a NaN loss and NaN gradients on step 3
        blobs(),
        steps=6,
        callbacks=[seen],  # type: ignore[list-item]
        output_dir=str(tmp_path),
        **SGD_SETTINGS,
    )
    result = trainer.fit()
    assert (result.applied_steps, result.skipped_steps) == (5, 1)
    assert all(torch.equal(a, b) for a, b in zip(seen.after[2], seen.after[3], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(seen.buffers[2], seen.buffers[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen.after[3], seen.after[4], strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert result.certificate["outcome"] == "kept"


def test_a_nan_step_rolls_sgd_back_with_its_momentum(tmp_path: Path) -> None:
    """The rollback snapshot holds SGD's state: back at the start, the buffers are gone with the steps."""
    seen = Weights()
    model = NanOnCall(3)
    initial = weights(model)
    trainer = Trainer(
        model,
        blobs(),
        steps=6,
        on_nonfinite="rollback",
        callbacks=[seen],  # type: ignore[list-item]
        output_dir=str(tmp_path),
        **SGD_SETTINGS,
    )
    result = trainer.fit()
    assert (result.applied_steps, result.skipped_steps, result.rollbacks) == (2, 1, 1)
    assert all(torch.equal(a, b) for a, b in zip(initial, seen.after[3], strict=True))
    assert seen.buffers[3] == [] and len(seen.buffers[5]) == len(initial)


def test_provetrain_train_with_optimizer_sgd_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        "optimizer: sgd\nlr: 0.05\nmomentum: 0.9\nnesterov: true\nsteps: 4\nbatch_size: 32\nclip_value: 1.0\n"
    )
    result = CliRunner().invoke(app, ["train", "cfg.yaml", "--quiet", "--output-dir", "out"])
    assert result.exit_code == 0, result.output
    certificate = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert certificate["outcome"] == "kept"
    assert certificate["run"]["config"]["optimizer"] == "sgd" and certificate["run"]["config"]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        (
            {"optimizer": "adamw", "momentum": 0.9},
            r"key 'momentum': momentum is a setting of optimizer: sgd, not of adamw",
        ),
        ({"optimizer": "adam", "nesterov": True}, r"key 'nesterov': nesterov is a setting of optimizer: sgd"),
        ({"optimizer": "sgd", "betas": (0.8, 0.9)}, r"key 'betas': betas is a setting of Adam and AdamW"),
        ({"optimizer": "sgd", "eps": 1e-6}, r"key 'eps': eps is a setting of Adam and AdamW"),
        ({"optimizer": "sgd", "nesterov": True}, r"key 'nesterov': nesterov: true needs momentum > 0"),
        ({"optimizer": "sgd", "momentum": 1.0}, r"key 'momentum': Input should be less than 1"),
        ({"optimizer": "sgd", "momentum": -0.1}, r"key 'momentum': Input should be greater than or equal to 0"),
        ({"optimizer": "sgd", "momentum": math.nan}, r"key 'momentum': Input should be a finite number"),
        ({"optimizer": "sgd", "momentum": True}, r"key 'momentum': Input should be a number, not a boolean"),
    ],
)
def test_settings_of_another_optimizer_are_refused(settings: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        Trainer(mlp(), blobs(), steps=1, **settings)


def test_default_values_of_another_optimizers_settings_pass() -> None:
    """A dumped config (every key, at its default) validates again: only a value that would act is refused."""
    trainer = Trainer(mlp(), blobs(), steps=1, optimizer="sgd", betas=(0.9, 0.999), eps=1e-8)
    assert Trainer(mlp(), blobs(), config=trainer.config, lr=0.1).config.optimizer == "sgd"


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.5, True)])
def test_the_sgd_threshold_counts_momentum_on_a_quadratic(momentum: float, nesterov: bool) -> None:
    """On f(x) = lam/2 x^2, torch's SGD with lr just below the threshold converges and just above diverges."""
    lam = 4.0
    plain = LrMaxEstimate(2 / lam, lam, "sgd", "none", 1, True, 0.0, "")
    bound = _with_momentum(plain, momentum, nesterov=nesterov).lr_max

    def final(lr: float) -> float:
        x = torch.ones(1, requires_grad=True)
        opt = torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov)
        for _ in range(2000):
            opt.zero_grad()
            (lam / 2 * x * x).sum().backward()
            opt.step()
        return abs(x.item())

    diverged = final(bound * 1.02)
    assert final(bound * 0.98) < 1e-3 and not diverged < 1e3  # NaN or huge


def test_lr_max_auto_with_sgd_reports_sgds_threshold(tmp_path: Path) -> None:
    trainer = Trainer(mlp(), blobs(), steps=2, lr_max="auto", output_dir=str(tmp_path), **SGD_SETTINGS)
    result = trainer.fit()
    estimate = result.lr_max_estimate
    assert estimate is not None and estimate.method == "sgd" and estimate.preconditioner == "none"
    assert re.search(r"Nesterov momentum mu = 0\.9 .* so lr_max = ", estimate.explanation)
    assert estimate.lr_max == pytest.approx(2 * 1.9 / 2.8 / estimate.eigenvalue)


def test_sgd_under_fsdp_is_refused_at_its_key(tmp_path: Path) -> None:
    """provetrain.SGD has no sharded step (its norm would be one rank's): refused before anything runs."""
    from provetrain.train.config import load_config
    from provetrain.train.distributed import World

    (tmp_path / "cfg.yaml").write_text("steps: 2\noptimizer: sgd\nstrategy: fsdp\n")
    config = load_config(tmp_path / "cfg.yaml")
    World(rank=0, size=1).check_strategy(config)  # one process: strategy has no effect
    with pytest.raises(ConfigError, match=r"cfg\.yaml:2:1: key 'optimizer': optimizer='sgd' is not supported with"):
        World(rank=0, size=2).check_strategy(config)
