"""Weight-decay groups, optimizer choice and the schedule's decay_steps / min_lr (issue 12, item 2)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from provetrain.data.sources import DataSplits
from provetrain.errors import ConfigError, ContractViolation
from provetrain.train.schedule import Schedule
from provetrain.train.trainer import Trainer, no_decay_names


class TinyLm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(10, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.wte(x)))


def tokens() -> DataSplits:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (64, 6), generator=g)
    return DataSplits(TensorDataset(x, x.roll(-1, 1)), None, "language-model", (6,), 10)


@pytest.mark.parametrize(
    ("patterns", "exempt"),
    [
        (None, {"wte.weight", "ln.weight", "ln.bias", "head.bias"}),  # nanoGPT: dim < 2 and embeddings
        (["*.bias"], {"ln.bias", "head.bias"}),
        (["wte.*", "ln.*"], {"wte.weight", "ln.weight", "ln.bias"}),
        ([], set()),
    ],
)
def test_no_weight_decay_names(patterns: list[str] | None, exempt: set[str]) -> None:
    assert no_decay_names(TinyLm(), patterns) == exempt


def test_the_optimizer_decays_only_its_decay_group(tmp_path: Path) -> None:
    trainer = Trainer(TinyLm(), tokens(), steps=2, weight_decay=0.1, output_dir=str(tmp_path))
    trainer.fit()
    groups = {g["weight_decay"]: set(g["param_names"]) for g in trainer.optimizer.param_groups}
    assert groups == {0.1: {"head.weight"}, 0.0: {"wte.weight", "ln.weight", "ln.bias", "head.bias"}}


def test_a_resumed_run_uses_its_own_optimizer_settings(tmp_path: Path) -> None:
    """The checkpoint's param_groups carry the first run's weight_decay and betas, and torch's load_state_dict
    puts them back: a resumed run with other settings silently trained with the old ones while its
    certificate recorded the new ones. Now the resumed run's config is what its optimizer uses."""
    from provetrain.train.checkpoint import ResumeError

    settings = {"steps": 4, "batch_size": 16, "lr": 1e-2, "lr_max": None, "checkpoint_every": 2}
    Trainer(TinyLm(), tokens(), output_dir=str(tmp_path / "a"), weight_decay=0.0, **settings).fit()
    resumed = Trainer(
        TinyLm(), tokens(), output_dir=str(tmp_path / "b"), weight_decay=0.5, betas=(0.8, 0.99), **settings
    )
    resumed.fit(resume_from=tmp_path / "a" / "checkpoints" / "step-2")
    groups = [(g["weight_decay"], g["betas"]) for g in resumed.optimizer.param_groups]
    assert groups == [(0.5, (0.8, 0.99)), (0.0, (0.8, 0.99))]
    assert resumed.optimizer.state[resumed.model.head.weight]["step"] == 4  # the state itself was loaded
    # Which parameters are decayed decides which saved state goes to which parameter: it must not change.
    other = Trainer(TinyLm(), tokens(), output_dir=str(tmp_path / "c"), no_weight_decay=["*.bias"], **settings)
    with pytest.raises(ResumeError, match=r"used different no_weight_decay \(no_weight_decay=None; this run has"):
        other.fit(resume_from=tmp_path / "a" / "checkpoints" / "step-2")


def test_a_step_with_zero_gradients_shrinks_only_decayed_weights() -> None:
    """AdamW with lr * wd = 0.05 and zero gradients: decayed weights shrink by 5%, the others stay."""
    model = TinyLm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = Trainer(model, tokens(), steps=1, lr=0.5, weight_decay=0.1)._build_optimizer()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * 0.95 if name == "head.weight" else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


# --- schedule: decay_steps and min_lr -------------------------------------------------------------------


def test_cosine_reaches_min_lr_at_the_end_of_decay_steps_then_stays() -> None:
    schedule = Schedule(1e-3, 100, "cosine", warmup_steps=10, decay_steps=40, min_lr=1e-4)
    assert schedule.lr(0) == pytest.approx(1e-4)  # warmup: base / warmup * (t + 1)
    assert schedule.lr(9) == pytest.approx(1e-3)
    assert schedule.lr(10) == 1e-3  # the decay starts at the peak
    assert schedule.lr(30) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 2)) / 2)  # halfway
    assert schedule.lr(49) > 1e-4
    assert schedule.lr(50) == schedule.lr(99) == schedule.lr(10_000) == 1e-4
    assert schedule.extremes() == (1e-4, 1e-3)


def test_linear_decay_steps_and_the_min_lr_ratio_floor() -> None:
    schedule = Schedule(1.0, 20, "linear", decay_steps=10, min_lr_ratio=0.1)
    assert [schedule.lr(t) for t in (0, 5, 10, 19)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


def test_without_decay_steps_the_schedule_is_unchanged() -> None:
    assert Schedule(1.0, 10, "cosine").lr(9) == pytest.approx((1 + math.cos(math.pi * 0.9)) / 2)


def test_a_decay_to_zero_is_refused_by_lr_above_zero_before_training(tmp_path: Path) -> None:
    trainer = Trainer(TinyLm(), tokens(), steps=20, decay_steps=5, min_lr=0.0, output_dir=str(tmp_path / "run"))
    with pytest.raises(ContractViolation, match=re.escape("`lr > 0.0` violated: observed lr=0")):
        trainer.fit()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_lr": 1e-4, "min_lr_ratio": 0.1}, "give only one of min_lr (0.0001) or min_lr_ratio (0.1)"),
        ({"min_lr": 1e-2, "lr": 1e-3}, "min_lr (0.01) must be below lr (0.001)"),
        ({"decay_steps": 0}, "key 'decay_steps': Input should be greater than or equal to 1"),
    ],
)
def test_bad_schedule_settings(settings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Trainer(TinyLm(), tokens(), steps=2, **settings)
