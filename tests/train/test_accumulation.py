"""gradient_accumulation_steps (issue 12, item 2): k micro-batches per optimizer step, the loss guard over
every micro-step, the skip drops the whole step, DDP synchronises once per step."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from provetrain.data.sources import DataSplits
from provetrain.train.trainer import Trainer

from .test_distributed import on_two_ranks


def regression(n: int = 192) -> DataSplits:
    """Two classes in 8 dimensions; 192 examples: whole batches of 48 = 4 x 12."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * y[:, None].float()
    return DataSplits(TensorDataset(x, y), None, "classification", (8,), 2)


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 2)


def weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_four_micro_batches_of_b_equal_one_batch_of_4b(tmp_path: Path) -> None:
    common = {"steps": 8, "lr": 0.05, "weight_decay": 0.1, "output_dir": None}
    one = Trainer(linear(), regression(), batch_size=48, **common | {"output_dir": str(tmp_path / "a")})
    four = Trainer(
        linear(),
        regression(),
        batch_size=12,
        gradient_accumulation_steps=4,
        **common | {"output_dir": str(tmp_path / "b")},
    )
    a, b = one.fit(), four.fit()
    assert (a.steps, a.applied_steps) == (b.steps, b.applied_steps) == (8, 8)
    for x, y in zip(weights(one), weights(four), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert b.final_loss == pytest.approx(a.final_loss, rel=1e-5)


def test_epochs_count_optimizer_steps_of_k_micro_batches(tmp_path: Path) -> None:
    trainer = Trainer(linear(), regression(), epochs=2, batch_size=12, gradient_accumulation_steps=4)
    assert (trainer.steps_per_epoch, trainer.total_steps) == (16, 8)


class NanLossOnCall:
    """Cross-entropy, plus a NaN that does not reach the gradient, on one call (micro-step) of the run."""

    def __init__(self, call: int) -> None:
        self.call, self.calls = call, 0

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, targets)
        self.calls += 1
        if self.calls - 1 == self.call:
            return loss + torch.tensor(math.nan)  # a constant: every gradient stays finite
        return loss


class Weights:
    def __init__(self) -> None:
        self.after: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.after[row["step"]] = weights(trainer)

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer, result: Any) -> None: ...


def test_a_nan_loss_on_micro_step_1_of_4_skips_the_whole_step_once(tmp_path: Path) -> None:
    seen = Weights()
    model = linear()
    before = weights_of(model)
    # Optimizer step 2's micro-steps are calls 8..11: its micro-step 1 is call 9.
    trainer = Trainer(
        model,
        regression(),
        loss_fn=NanLossOnCall(9),
        steps=4,
        batch_size=12,
        gradient_accumulation_steps=4,
        callbacks=[seen],  # type: ignore[list-item]
        output_dir=str(tmp_path),
    )
    result = trainer.fit()
    assert (result.applied_steps, result.skipped_steps) == (3, 1)
    assert all(torch.equal(x, y) for x, y in zip(seen.after[1], seen.after[2], strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(before, seen.after[0], strict=True))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["skipped"] for r in rows] == [False, False, True, False]
    finite = next(c for c in result.certificate["clauses"] if c["text"] == "loss.is_finite()")
    assert (finite["checks"], finite["violations"], finite["first_violation_step"]) == (4, 1, 2)
    assert finite["actions"] == {"skip": 1} and result.certificate["outcome"] == "kept"


def weights_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_a_resumed_accumulating_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    settings = {"steps": 6, "batch_size": 12, "gradient_accumulation_steps": 3, "checkpoint_every": 3}
    whole = Trainer(linear(), regression(), output_dir=str(tmp_path / "whole"), **settings)
    whole.fit()
    resumed = Trainer(linear(), regression(), output_dir=str(tmp_path / "resumed"), **settings)
    resumed.fit(resume_from=tmp_path / "whole" / "checkpoints" / "step-3")
    assert all(torch.equal(x, y) for x, y in zip(weights(whole), weights(resumed), strict=True))


def _accumulate_on_two_ranks(rank: int, directory: Path) -> dict[str, Any]:
    calls = []
    real = DistributedDataParallel.no_sync

    def counting_no_sync(self: DistributedDataParallel) -> Any:
        calls.append(1)
        return real(self)

    DistributedDataParallel.no_sync = counting_no_sync  # type: ignore[method-assign]
    try:
        trainer = Trainer(
            linear(),
            regression(),
            steps=3,
            batch_size=12,
            gradient_accumulation_steps=4,
            output_dir=str(directory / "run"),
        )
        trainer.fit()
    finally:
        DistributedDataParallel.no_sync = real  # type: ignore[method-assign]
    return {"weights": weights(trainer), "no_sync": len(calls)}


def test_ddp_accumulation_synchronises_once_per_step_and_equals_one_process(tmp_path: Path) -> None:
    first, second = on_two_ranks(_accumulate_on_two_ranks, tmp_path)
    assert first["no_sync"] == second["no_sync"] == 3 * 3  # the 3 inner micro-steps of each of 3 steps
    single = Trainer(
        linear(), regression(), steps=3, batch_size=12, gradient_accumulation_steps=4, output_dir=str(tmp_path / "one")
    )
    single.fit()
    for x, y, z in zip(first["weights"], second["weights"], weights(single), strict=True):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
