"""ProvetrainCallback: a NaN step in a Lightning fit is skipped, holds the schedule, and is certified."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="needs the lightning extra: pip install 'provetrain[lightning]'")

from provetrain.integrations.lightning import ProvetrainCallback, SkipAwareScheduler  # noqa: E402
from provetrain.ops.adam import AdamW  # noqa: E402

pytestmark = [
    # Lightning's advice to use more DataLoader workers (given on machines with 3 or more CPUs): irrelevant
    # for 8 in-memory batches, where worker processes would only slow the test down.
    pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers:UserWarning"),
    # Lightning 2.6 builds torch.utils._pytree.LeafSpec, which torch 2.13 deprecates: Lightning's to update,
    # and harmless here (the data loaders are flattened correctly).
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]

STEPS = 6


class Regression(pl.LightningModule):
    """A linear model whose loss is NaN on the training steps listed in ``nan_steps``."""

    def __init__(self, nan_steps: set[int] = frozenset(), *, optimizer: str = "provetrain") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.nan_steps = nan_steps
        self.optimizer_kind = optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * math.nan if self.global_step in self.nan_steps else loss

    def configure_optimizers(self) -> Any:
        if self.optimizer_kind == "torch":
            return torch.optim.AdamW(self.parameters(), lr=1e-2)
        opt = AdamW(self.parameters(), lr=1e-2, clip_value=1.0)
        schedule = LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Recorder(pl.Callback):
    """Weights and the inner scheduler's step count at the start of each batch."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.schedule_steps: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))
        self.schedule_steps.append(trainer.lr_scheduler_configs[0].scheduler.scheduler.last_epoch)


def fit(tmp_path: Path, module: Regression, callbacks: list[pl.Callback], **trainer_kwargs: Any) -> pl.Trainer:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module, data)
    return trainer


def clause(certificate: dict[str, Any], text: str, kind: str) -> dict[str, Any]:
    return next(c for c in certificate["clauses"] if c["text"] == text and c["kind"] == kind)


def test_nan_step_is_skipped_holds_the_schedule_and_is_certified(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer = fit(tmp_path, Regression({2}), [ProvetrainCallback(), recorder])

    w, s = recorder.weights, recorder.schedule_steps
    assert torch.equal(w[2], w[3]), "the NaN step changed the weights"
    assert all(not torch.equal(w[i], w[i + 1]) for i in (0, 1, 3, 4))
    assert s == [0, 1, 2, 2, 3, 4], "the schedule advanced on the skipped step"
    assert isinstance(trainer.lr_scheduler_configs[0].scheduler, SkipAwareScheduler)

    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["outcome"] == "kept"
    assert cert["run"] | {"steps": STEPS, "applied_steps": STEPS - 1, "skipped_steps": 1} == cert["run"]
    finite = clause(cert, "loss.is_finite()", "postcondition")
    assert (finite["checks"], finite["violations"], finite["first_violation_step"]) == (STEPS, 1, 2)
    assert finite["actions"] == {"skip": 1}
    bound = clause(cert, "grad_norm <= clip_value", "postcondition")
    assert (bound["checks"], bound["violations"]) == (STEPS - 1, 0)
    assert trainer.callback_metrics["skipped_steps"] == 1


def test_nan_in_an_earlier_accumulated_micro_batch_skips_the_step(tmp_path: Path) -> None:
    # With 2 micro-batches per step the optimizer only sees the last one's loss; the callback guards the first.
    class FirstMicroBatchNan(Regression):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
            first_of_step_1 = self.global_step == 1 and batch_idx % 2 == 0
            return loss + math.nan if first_of_step_1 else loss  # finite gradients, NaN loss

    recorder = Recorder()
    fit(tmp_path, FirstMicroBatchNan(), [ProvetrainCallback(), recorder], accumulate_grad_batches=2)
    w = recorder.weights  # one entry per micro-batch: step k starts at batch 2k
    assert torch.equal(w[2], w[4]) and not torch.equal(w[0], w[2]) and not torch.equal(w[4], w[6])
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert (cert["run"]["steps"], cert["run"]["skipped_steps"]) == (STEPS, 1)
    assert clause(cert, "loss.is_finite()", "postcondition")["first_violation_step"] == 1


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`:UserWarning")  # on purpose here
def test_a_training_step_that_returns_none_changes_nothing_as_in_torch(tmp_path: Path) -> None:
    # Lightning still calls optimizer.step(closure); with no gradient at all torch.optim does nothing, and so
    # does provetrain's optimizer under the callback (on_empty="skip"), which counts it.
    class NoneAtStep2(Regression):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
            return None if self.global_step == 2 else super().training_step(batch, batch_idx)

    recorder = Recorder()
    trainer = fit(tmp_path, NoneAtStep2(), [ProvetrainCallback(), recorder])
    w = recorder.weights
    assert torch.equal(w[2], w[3]) and all(not torch.equal(w[i], w[i + 1]) for i in (0, 1, 3, 4))
    assert trainer.optimizers[0].empty_steps.item() == 1
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["outcome"] == "kept"
    assert (cert["run"]["steps"], cert["run"]["skipped_steps"]) == (STEPS - 1, 0)


def test_skip_budget_stops_the_fit_and_certifies_the_violation(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=re.escape("Skip budget exhausted (max 1 in a row")):
        fit(tmp_path, Regression({1, 2}), [ProvetrainCallback(max_consecutive_skips=1)])
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["outcome"].startswith("violated: ")
    assert (cert["run"]["steps"], cert["run"]["skipped_steps"]) == (3, 2)


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "error", "message"),
    [
        pytest.param(
            Regression(),
            {"gradient_clip_val": 0.5},
            ValueError,
            "Trainer(gradient_clip_val=0.5) clips the gradients",
            id="gradient_clip_val",
        ),
        pytest.param(
            Regression(optimizer="torch"),
            {},
            TypeError,
            "the optimizer is torch.optim.adamw.AdamW, not provetrain",
            id="foreign-optimizer",
        ),
    ],
)
def test_refuses_configurations_that_would_make_the_certificate_false(
    tmp_path: Path, module: Regression, trainer_kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        fit(tmp_path, module, [ProvetrainCallback()], **trainer_kwargs)
    assert not (tmp_path / "certificate.json").exists()


def test_16_mixed_grad_scaler_skips_through_the_optimizer_and_holds_the_schedule(tmp_path: Path) -> None:
    # Lightning's GradScaler hands its scale and inf flag to provetrain's optimizer: the NaN step is the
    # contract's skip (counted once, schedule held), every other step is applied with the unscaled, clipped
    # gradient.
    # On CPU Lightning turns precision="16-mixed" into bf16; build its fp16 plugin with a CPU GradScaler.
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**4))
    recorder = Recorder()
    trainer = fit(tmp_path, Regression({2}), [ProvetrainCallback(), recorder], plugins=[plugin])
    assert trainer.precision_plugin.scaler is not None
    w, s = recorder.weights, recorder.schedule_steps
    assert torch.equal(w[2], w[3]), "the NaN step changed the weights"
    assert all(not torch.equal(w[i], w[i + 1]) for i in (0, 1, 3, 4))
    assert s == [0, 1, 2, 2, 3, 4]
    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["outcome"] == "kept"
    assert cert["run"]["skipped_steps"] == 1
    bound = clause(cert, "grad_norm <= clip_value", "postcondition")
    assert (bound["checks"], bound["violations"]) == (STEPS - 1, 0)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**3  # backed off once: the same step as the skip
    opt = trainer.optimizers[0]
    assert opt.skipped_steps.item() == 1
    assert opt.last_clipped_grad_norm.item() <= 1.0
