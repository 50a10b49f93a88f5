"""The Trainer: contract checks at fixed points, non-finite policies and budgets, run outputs."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from provetrain import ContractViolation
from provetrain.errors import ConfigError
from provetrain.train.checkpoint import ResumeError
from provetrain.train.config import TrainConfig
from provetrain.train.lr_max import LrMaxEstimate
from provetrain.train.trainer import Callback, Terminated, Trainer
from tests.train.test_distributed import blobs


class Poisoned(nn.Module):
    """An MLP whose output becomes NaN (or huge, for exploding gradients) on chosen training calls."""

    def __init__(self, bad_calls: set[int], *, value: float = math.nan) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.bad_calls = bad_calls
        self.value = value
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls - 1 in self.bad_calls:
                return out * self.value
        return out


class Recorder(Callback):
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: list[dict[str, Any]] = []
        self.weights: dict[int, list[torch.Tensor]] = {}

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.weights[row["step"]] = [p.detach().clone() for p in self.model.parameters()]


def train(tmp_path: Path, model: nn.Module, **overrides: Any) -> tuple[Any, Recorder]:
    recorder = Recorder(model)
    settings = {"steps": 12, "batch_size": 32, "lr": 1e-2, "lr_max": None, "output_dir": str(tmp_path / "run")}
    trainer = Trainer(model, blobs(), callbacks=[recorder], **(settings | overrides))
    return trainer.fit(), recorder


def certificate(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "run" / "certificate.json").read_text())


def clause(cert: dict[str, Any], clause_id: str) -> dict[str, Any]:
    return next(c for c in cert["clauses"] if c["id"] == clause_id)


def test_healthy_run_checks_every_clause_each_step(tmp_path: Path) -> None:
    result, recorder = train(tmp_path, Poisoned(set()))
    assert (result.applied_steps, result.skipped_steps) == (12, 0)
    assert result.evaluation is not None
    assert result.final_loss < recorder.rows[0]["loss"]
    cert = certificate(tmp_path)
    assert cert["outcome"] == "kept"
    for clause_id in (
        "loss_decrease.postconditions[0]",
        "gradient_norm.postconditions[0]",
        "loss_decrease.preconditions[0]",
    ):
        assert (clause(cert, clause_id)["checks"], clause(cert, clause_id)["violations"]) == (12, 0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(12))
    assert all(r["grad_norm_clipped"] <= 1.0 for r in steps)
    assert all(r["grad_norm_clipped"] == min(r["grad_norm"], r["grad_norm_clipped"]) for r in steps)
    assert (tmp_path / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skip_drops_the_batch_and_changes_nothing(tmp_path: Path) -> None:
    result, recorder = train(tmp_path, Poisoned({5}))
    assert (result.applied_steps, result.skipped_steps) == (11, 1)
    for before, after in zip(recorder.weights[4], recorder.weights[5], strict=True):
        assert torch.equal(before, after)
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[5], recorder.weights[6], strict=True))
    cert = certificate(tmp_path)
    finite = clause(cert, "loss_decrease.postconditions[0]")
    assert (finite["violations"], finite["first_violation_step"], finite["actions"]) == (1, 5, {"skip": 1})
    assert [r["skipped"] for r in recorder.rows].count(True) == 1


def test_skipped_step_does_not_advance_the_schedule(tmp_path: Path) -> None:
    _, recorder = train(tmp_path, Poisoned({3}), schedule="linear")
    lrs = [r["lr"] for r in recorder.rows]
    assert lrs[4] == lrs[3]  # step 3 was skipped: step 4 reuses its learning rate
    assert lrs[3] > lrs[5]


def test_raise_names_the_exact_first_bad_step_and_leaves_weights_untouched(tmp_path: Path) -> None:
    model = Poisoned({4, 7})
    with pytest.raises(ContractViolation, match=r"loss\.is_finite\(\)` violated at step 4") as caught:
        train(tmp_path, model, on_nonfinite="raise")
    assert caught.value.step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert certificate(tmp_path)["outcome"].startswith("violated: contract loss_decrease postcondition")


def test_raise_on_exploding_gradient_names_the_parameter(tmp_path: Path) -> None:
    model = Poisoned({2}, value=1e38)  # finite loss of ~1e38, gradients overflow to inf
    with pytest.raises(ContractViolation) as caught:
        train(tmp_path, model, on_nonfinite="raise", clip_value=None)
    error = caught.value
    assert error.step == 2
    assert error.clause in ("gradients.iter().all(|g| g.is_finite())", "loss.is_finite()")
    if error.clause.startswith("gradients"):
        assert error.observed["parameter"].startswith("net.")


def test_consecutive_skip_budget_escalates(tmp_path: Path) -> None:
    with pytest.raises(ContractViolation, match=r"Skip budget exhausted") as caught:
        train(tmp_path, Poisoned({2, 3, 4, 5}), max_consecutive_skips=3)
    assert caught.value.step == 5
    assert caught.value.observed["consecutive_skips"] == 4


def test_total_skip_budget_escalates(tmp_path: Path) -> None:
    with pytest.raises(ContractViolation, match=r"Skip budget exhausted"):
        train(tmp_path, Poisoned({1, 3, 5}), max_total_skips=2)


def test_rollback_restores_the_last_good_state_and_lowers_lr(tmp_path: Path) -> None:
    result, recorder = train(tmp_path, Poisoned({6}), on_nonfinite="rollback", log_every=4)
    assert result.rollbacks == 1
    cert = certificate(tmp_path)
    assert clause(cert, "loss_decrease.postconditions[0]")["actions"] == {"rollback": 1}
    # the snapshot was taken after 4 applied steps: after rolling back at step 6 the weights are those after step 3
    assert recorder.rows[6]["action"] == "rollback"
    for a, b in zip(recorder.weights[3], recorder.weights[6], strict=True):
        assert torch.equal(a, b)
    later = [r["lr"] for r in recorder.rows if r["step"] > 6]
    assert later and later[0] < recorder.rows[3]["lr"]


def test_a_run_resumed_between_snapshots_rolls_back_as_the_uninterrupted_one(tmp_path: Path) -> None:
    """Rollback snapshots every 4 applied steps, checkpoints every 5 steps, a NaN at step 7. The run resumed
    from step 5 starts from the checkpoint, so the uninterrupted run must roll back to that state too; it
    rolled back to its snapshot of applied step 4, and the two runs went different ways from step 7."""
    settings = {"steps": 12, "batch_size": 32, "lr": 1e-2, "lr_max": None, "checkpoint_every": 5, "log_every": 4}
    settings |= {"on_nonfinite": "rollback", "keep_checkpoints": 5}
    Trainer(Poisoned({7}), blobs(), output_dir=str(tmp_path / "full"), **settings).fit()
    resumed = Trainer(Poisoned({2}), blobs(), output_dir=str(tmp_path / "resumed"), **settings)  # its 3rd call
    resumed.fit(resume_from=tmp_path / "full" / "checkpoints" / "step-5")
    full, tail = losses_of(tmp_path / "full"), losses_of(tmp_path / "resumed")
    assert sorted(tail) == list(range(5, 12)) and full[7] == tail[7] == "nan"  # metrics.jsonl: NaN as "nan"
    assert all(tail[s] == full[s] for s in tail)


def test_rollback_gives_up_after_max_rollbacks(tmp_path: Path) -> None:
    with pytest.raises(ContractViolation, match=r"Gave up after 2 rollbacks"):
        train(tmp_path, Poisoned({2, 4, 6}), on_nonfinite="rollback", max_rollbacks=2, log_every=1)


def test_lr_above_lr_max_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ContractViolation, match=r"`lr < lr_max` violated: observed lr=0.01, lr_max=0.005"):
        train(tmp_path, Poisoned(set()), lr_max=0.005)
    assert not (tmp_path / "run").exists()


def test_model_without_trainable_parameters_is_refused(tmp_path: Path) -> None:
    model = Poisoned(set())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ContractViolation, match=r"`!params\.is_empty\(\)` violated"):
        train(tmp_path, model)


@pytest.mark.parametrize(
    ("overrides", "key", "pattern"),
    [
        ({"lr": 0.0}, "lr", "greater than 0"),
        ({"clip_value": -1.0}, "clip_value", "greater than 0"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite", "'skip', 'raise' or 'rollback'"),
        ({"betas": (0.9, 1.0)}, "betas", r"betas must each be in \[0, 1\)"),
        ({"steps": 10, "epochs": 2}, "epochs", "only one of steps or epochs"),
        ({"lr_max": -1.0}, "lr_max", "lr_max must be a finite number > 0"),
        ({"unknown_setting": 1}, "unknown_setting", "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_name_the_key_and_write_nothing(
    tmp_path: Path, overrides: dict, key: str | None, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern) as caught:
        Trainer(Poisoned(set()), blobs(), output_dir=str(tmp_path / "run"), **({"steps": 3} | overrides))
    assert caught.value.key == key
    assert not (tmp_path / "run").exists()


def test_existing_outputs_are_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("precious\n")
    with pytest.raises(FileExistsError, match="already holds files"):
        train(tmp_path, Poisoned(set()))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "precious\n"


def dropout_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def losses_of(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    settings = {"steps": 20, "batch_size": 32, "lr": 1e-2, "lr_max": None, "checkpoint_every": 10}
    Trainer(dropout_mlp(), blobs(), output_dir=str(tmp_path / "full"), **settings).fit()
    resumed = Trainer(dropout_mlp(), blobs(), output_dir=str(tmp_path / "resumed"), **settings)
    resumed.fit(resume_from=tmp_path / "full" / "checkpoints" / "step-10")
    full, tail = losses_of(tmp_path / "full"), losses_of(tmp_path / "resumed")
    assert sorted(tail) == list(range(10, 20))
    assert all(tail[s] == full[s] for s in tail)  # bit-for-bit, dropout and data order included


def test_resume_refuses_a_different_setup(tmp_path: Path) -> None:
    settings = {"steps": 10, "lr": 1e-2, "lr_max": None, "checkpoint_every": 5}
    Trainer(dropout_mlp(), blobs(), output_dir=str(tmp_path / "a"), batch_size=32, **settings).fit()
    other = Trainer(dropout_mlp(), blobs(), output_dir=str(tmp_path / "b"), batch_size=16, **settings)
    with pytest.raises(ResumeError, match=r"used different batch_size \(batch_size=32; this run has batch_size=16\)"):
        other.fit(resume_from=tmp_path / "a" / "checkpoints")


def rising_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus a constant that grows with every training call: a loss that diverges."""
    rising_loss.calls += 1  # type: ignore[attr-defined]
    return torch.nn.functional.cross_entropy(outputs, targets) + 0.05 * rising_loss.calls  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", ["raise", "warn", "reduce_lr"])
def test_loss_trend_monitor_acts_by_policy(tmp_path: Path, policy: str) -> None:
    rising_loss.calls = 0  # type: ignore[attr-defined]
    trainer = Trainer(
        Poisoned(set()),
        blobs(),
        loss_fn=rising_loss,
        steps=30,
        lr=1e-3,
        lr_max=None,
        batch_size=32,
        monitor_window=5,
        on_loss_increase=policy,
        output_dir=str(tmp_path / "run"),
    )
    if policy == "raise":
        with pytest.raises(
            ContractViolation, match=r"invariant `Loss monotonically non-increasing \(in expectation\)`"
        ):
            trainer.fit()
        return
    trainer.fit()
    trend = clause(certificate(tmp_path), "loss_decrease.invariants[0]")
    assert trend["violations"] >= 1 and trend["actions"] == {policy: trend["violations"]}
    if policy == "reduce_lr":
        assert trainer.lr_scale < 1.0


def test_loss_trend_monitor_is_silent_on_a_healthy_run(tmp_path: Path) -> None:
    train(tmp_path, Poisoned(set()), steps=60, lr=3e-3, schedule="constant", monitor_window=5, on_loss_increase="raise")
    trend = clause(certificate(tmp_path), "loss_decrease.invariants[0]")
    assert trend["checks"] >= 5 and trend["violations"] == 0


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 2)


def test_an_lr_above_the_estimate_that_trains_is_not_refused(tmp_path: Path) -> None:
    """The contract does not define lr_max: by default none is declared and `lr < lr_max` is unchecked, and
    lr_max: auto reports Adam's edge-of-stability estimate with its convergence without enforcing it. A linear
    model on separable blobs trains at 3x its (converged) estimate; neither setting refuses that rate."""
    estimate = Trainer(linear(), blobs(), steps=24, batch_size=32, output_dir=str(tmp_path / "never")).estimate_lr_max()
    assert estimate.converged and estimate.lr_max < math.inf
    for lr_max in (None, "auto"):
        run = tmp_path / str(lr_max)
        result, recorder = train(run, linear(), steps=24, lr=3 * estimate.lr_max, lr_max=lr_max)
        first = recorder.rows[0]["loss"]
        assert result.final_loss < first / 10 and result.evaluation["loss"] < first / 10  # it trained
        cert = certificate(run)
        assert clause(cert, "loss_decrease.preconditions[1]")["checks"] == 0  # `lr < lr_max`: unchecked
        assert result.lr_max is None and cert["run"]["lr_max"] is None
        if lr_max is None:
            assert result.lr_max_estimate is None and cert["run"]["lr_max_estimate"] is None
        else:
            assert result.lr_max_estimate == estimate  # the same measurement, made once before training
            assert cert["run"]["lr_max_estimate"] == estimate.to_dict()
            assert cert["run"]["lr_max_estimate"]["converged"] is True
            assert cert["run"]["lr_max_estimate"]["iterations"] == estimate.iterations
    assert TrainConfig().lr_max is None


def test_a_declared_lr_max_is_checked_before_training_and_at_every_step(tmp_path: Path) -> None:
    result, _ = train(tmp_path, Poisoned(set()), lr=1e-2, lr_max=0.5, warmup_steps=3)
    cert = certificate(tmp_path)
    assert clause(cert, "loss_decrease.preconditions[1]")["checks"] == 12
    assert clause(cert, "loss_decrease.preconditions[1]")["violations"] == 0
    assert result.lr_max == cert["run"]["lr_max"] == 0.5
    with pytest.raises(ContractViolation, match=r"`lr < lr_max` violated: observed lr=0.01, lr_max=0.01"):
        train(tmp_path / "peak", Poisoned(set()), lr=1e-2, lr_max=1e-2, warmup_steps=3)  # the schedule's peak
    assert not (tmp_path / "peak").exists()


def test_an_estimate_that_did_not_converge_says_so(tmp_path: Path) -> None:
    trainer = Trainer(Poisoned(set()), blobs(), steps=3, output_dir=str(tmp_path / "never"))
    estimate = trainer.estimate_lr_max(batches=2, iterations=2)
    assert (estimate.converged, estimate.iterations) == (False, 2)
    assert "NOT converged" in estimate.explanation and "optimistic" in estimate.explanation
    assert LrMaxEstimate.from_dict(json.loads(json.dumps(estimate.to_dict()))) == estimate


def test_a_resumed_run_reports_the_estimate_made_at_its_start(tmp_path: Path) -> None:
    settings = {"steps": 12, "batch_size": 32, "lr": 1e-2, "lr_max": "auto", "checkpoint_every": 6}
    first = Trainer(Poisoned(set()), blobs(), output_dir=str(tmp_path / "a"), **settings).fit()
    resumed = Trainer(Poisoned(set()), blobs(), output_dir=str(tmp_path / "b"), **settings)
    result = resumed.fit(resume_from=tmp_path / "a" / "checkpoints" / "step-6")
    assert first.lr_max_estimate is not None and result.lr_max_estimate == first.lr_max_estimate
    assert certificate_of(tmp_path / "b")["run"]["lr_max_estimate"] == first.lr_max_estimate.to_dict()


def test_final_checkpoint_holds_finite_state_and_loads(tmp_path: Path) -> None:
    from provetrain.train.checkpoint import load_checkpoint

    train(tmp_path, Poisoned({3}))
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.step == 12
    assert checkpoint.state["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint.tensors.values() if t.is_floating_point())


@pytest.mark.parametrize(
    ("policies", "snapshot"),
    [({}, False), ({"on_nonfinite": "rollback"}, True), ({"on_loss_increase": "rollback"}, True)],
)
def test_state_is_snapshotted_only_when_a_policy_can_roll_back(tmp_path: Path, policies: dict, snapshot: bool) -> None:
    trainer = Trainer(Poisoned(set()), blobs(), steps=8, lr_max=None, output_dir=str(tmp_path / "run"), **policies)
    trainer.fit()
    assert (trainer._snapshot is not None) is snapshot


# --- a skipped step never kills the run (issue 10, items 1 and 2) ---------------------------------------------


class PoisonedBatchNorm(Poisoned):
    """Poisoned, with a BatchNorm whose running statistics the forward writes before the skip is known."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__(bad_calls)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.calls in self.bad_calls:
            x = x * math.nan  # the NaN goes through the BatchNorm, so its running statistics see it
        return super().forward(self.norm(x))


@pytest.mark.parametrize(
    ("bad_step", "overrides"),
    [
        (4, {"checkpoint_every": 5}),  # the step right before a checkpoint
        (11, {}),  # the last step, before the final checkpoint
        (3, {"checkpoint_every": 1}),  # a checkpoint after every step
        (0, {"checkpoint_every": 1}),  # the first step: the norms were never set
    ],
)
def test_a_skip_before_a_checkpoint_is_counted_and_every_checkpoint_written(
    tmp_path: Path, bad_step: int, overrides: dict[str, Any]
) -> None:
    from provetrain.train.checkpoint import list_checkpoints, load_checkpoint

    result, _ = train(tmp_path, Poisoned({bad_step}), keep_checkpoints=100, **overrides)
    assert (result.applied_steps, result.skipped_steps) == (11, 1)
    every = overrides.get("checkpoint_every", 12)
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == sorted({*range(every, 13, every), 12})
    saved = load_checkpoint(tmp_path / "run" / "checkpoints", bad_step + 1 if every == 1 else None).tensors
    assert not any(name.endswith(("last_grad_norm", "last_clipped_grad_norm")) for name in saved)
    assert certificate(tmp_path)["outcome"] == "kept"


def test_resume_after_a_skip_restores_the_counters_and_fresh_diagnostics(tmp_path: Path) -> None:
    settings = {
        "steps": 12,
        "batch_size": 32,
        "lr": 1e-2,
        "lr_max": None,
        "checkpoint_every": 1,
        "keep_checkpoints": 20,
    }
    Trainer(Poisoned({5}), blobs(), output_dir=str(tmp_path / "a"), **settings).fit()
    resumed = Trainer(Poisoned(set()), blobs(), output_dir=str(tmp_path / "b"), **settings | {"steps": 14})
    result = resumed.fit(resume_from=tmp_path / "a" / "checkpoints" / "step-6")
    assert (result.applied_steps, result.skipped_steps) == (13, 1)
    assert int(resumed.optimizer.skipped_steps) == 1
    assert math.isfinite(float(resumed.optimizer.last_grad_norm))  # set again by the steps after the resume


def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(tmp_path: Path) -> None:
    class BufferRecorder(Callback):
        def __init__(self) -> None:
            self.buffers: dict[int, dict[str, torch.Tensor]] = {}

        def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
            self.buffers[row["step"]] = {k: v.clone() for k, v in trainer.model.named_buffers()}

    recorder = BufferRecorder()
    settings = {"steps": 12, "batch_size": 32, "lr": 1e-2, "lr_max": None, "checkpoint_every": 1}
    trainer = Trainer(
        PoisonedBatchNorm({3}), blobs(), callbacks=[recorder], output_dir=str(tmp_path / "run"), **settings
    )
    result = trainer.fit()
    assert (result.applied_steps, result.skipped_steps) == (11, 1)
    for name, before in recorder.buffers[2].items():
        assert torch.equal(recorder.buffers[3][name], before), name  # num_batches_tracked included
    assert not torch.equal(recorder.buffers[4]["norm.running_mean"], recorder.buffers[3]["norm.running_mean"])
    assert all(torch.isfinite(b).all() for b in trainer.model.buffers() if b.is_floating_point())
    assert result.evaluation is not None and result.evaluation["accuracy"] > 0.9
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints=2, all written


def test_lr_max_estimate_leaves_the_buffers_as_they_were(tmp_path: Path) -> None:
    model = PoisonedBatchNorm(set())
    before = {k: v.clone() for k, v in model.named_buffers()}
    Trainer(model, blobs(), steps=2, output_dir=str(tmp_path / "run")).estimate_lr_max(batches=2)
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())


# --- the certificate tells the truth; outputs only once training starts (issue 10, items 6 and 7) ------------


class FailsOnCall(Poisoned):
    """Raises ``error`` on one training forward call (or, with ``call=None``, on every evaluation forward)."""

    def __init__(self, error: BaseException, call: int | None) -> None:
        super().__init__(set())
        self.error, self.call = error, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and self.calls == self.call) or (not self.training and self.call is None):
            raise self.error
        return super().forward(x)


class SendsSigterm(Callback):
    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if row["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(
    ("model", "callbacks", "error", "outcome"),
    [
        (FailsOnCall(ValueError("boom in the model"), 4), [], ValueError, "failed: ValueError: boom in the model"),
        (FailsOnCall(KeyboardInterrupt(), 4), [], KeyboardInterrupt, "failed: KeyboardInterrupt"),
        (Poisoned(set()), [SendsSigterm()], Terminated, "failed: Terminated: received SIGTERM"),
        (Poisoned({2, 3}), [], ContractViolation, "violated: contract loss_decrease postcondition `loss.is_finite()`"),
    ],
)
def test_a_run_that_does_not_finish_is_never_certified_kept(
    tmp_path: Path, model: nn.Module, callbacks: list[Callback], error: type[BaseException], outcome: str
) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(
        model, blobs(), steps=12, lr_max=None, max_consecutive_skips=1, callbacks=callbacks, output_dir=str(tmp_path)
    )
    with pytest.raises(error):
        trainer.fit()
    assert certificate_of(tmp_path)["outcome"].startswith(outcome)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored after the run


def certificate_of(run: Path) -> dict[str, Any]:
    return json.loads((run / "certificate.json").read_text())


def test_a_full_disk_fails_the_run_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provetrain.train import checkpoint
    from provetrain.train.checkpoint import load_checkpoint

    real, saves = checkpoint._write_contents, []

    def write_contents(*args: Any) -> None:
        saves.append(args[1])
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(checkpoint, "_write_contents", write_contents)
    with pytest.raises(OSError, match="No space left on device"):
        train(tmp_path, Poisoned(set()), checkpoint_every=4)
    assert certificate(tmp_path)["outcome"] == "failed: OSError: [Errno 28] No space left on device"
    assert load_checkpoint(tmp_path / "run" / "checkpoints").step == 4
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "model",
    [FailsOnCall(ValueError("the first forward"), 0), FailsOnCall(RuntimeError("eval forward"), None)],
    ids=["first-forward", "evaluation"],
)
def test_an_error_before_training_starts_writes_nothing(tmp_path: Path, model: nn.Module) -> None:
    with pytest.raises((ValueError, RuntimeError)):
        train(tmp_path, model)
    assert not (tmp_path / "run").exists()


def test_a_started_run_has_a_certificate_that_says_it_has_not_finished(tmp_path: Path) -> None:
    class ReadsCertificate(Callback):
        outcome = ""

        def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
            self.outcome = self.outcome or certificate_of(trainer.output_dir)["outcome"]

    reader = ReadsCertificate()
    result = Trainer(Poisoned(set()), blobs(), steps=3, lr_max=None, callbacks=[reader], output_dir=str(tmp_path)).fit()
    assert reader.outcome.startswith("failed: did not finish")  # what a run killed with -9 leaves behind
    assert certificate_of(tmp_path)["outcome"] == result.certificate["outcome"] == "kept"


def test_a_resumed_runs_certificate_covers_the_whole_run(tmp_path: Path) -> None:
    settings = {"steps": 12, "batch_size": 32, "lr": 1e-2, "lr_max": None, "checkpoint_every": 6}
    Trainer(Poisoned({2}), blobs(), output_dir=str(tmp_path / "a"), **settings).fit()
    resumed = Trainer(Poisoned(set()), blobs(), output_dir=str(tmp_path / "b"), **settings)
    resumed.fit(resume_from=tmp_path / "a" / "checkpoints" / "step-6")
    whole, tail = certificate_of(tmp_path / "a"), certificate_of(tmp_path / "b")
    assert tail["run"]["resumed_from"].endswith("step-6")
    for clause_id in ("loss_decrease.postconditions[0]", "gradient_norm.postconditions[0]"):
        assert clause(tail, clause_id) == clause(whole, clause_id)
    assert (clause(tail, "loss_decrease.postconditions[0]")["checks"], tail["run"]["skipped_steps"]) == (12, 1)


def _edit_state(step_dir: Path, **changes: Any) -> None:
    from provetrain.train import checkpoint

    state = json.loads((step_dir / "state.json").read_text()) | changes
    (step_dir / "state.json").write_text(json.dumps(state))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["state.json"] = checkpoint._describe(step_dir / "state.json")
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def _nan_weight(step_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    from provetrain.train import checkpoint

    tensors = load_file(step_dir / "tensors.safetensors")
    tensors["model/net.0.weight"][0, 0] = math.nan
    save_file(tensors, step_dir / "tensors.safetensors")
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = checkpoint._describe(step_dir / "tensors.safetensors")
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("target", "damage", "steps", "message"),
    [
        ("missing", None, 12, r"checkpoint directory .*missing does not exist"),
        ("checkpoints/step-abc", None, 12, r"step-abc: a checkpoint is named step-<N> with N a number"),
        ("checkpoints/step-6", None, 5, r"it is at step 6, and this run ends at step 5 \(steps is the total"),
        ("checkpoints/step-6", None, 6, r"it is at step 6, and this run ends at step 6"),
        ("checkpoints/step-6", _nan_weight, 12, r"tensors \['model/net.0.weight'\] hold NaN or Inf"),
        ("checkpoints/step-6", lambda d: _edit_state(d, next_step=1e30), 12, r"next_step is 1e\+30, not a count"),
        ("checkpoints/step-6", lambda d: _edit_state(d, applied_steps=9), 12, r"do not fit a checkpoint of step 6"),
        ("checkpoints/step-6", lambda d: _edit_state(d, lr_scale=0.0), 12, r"lr_scale is 0.0, not in \(0, 1\]"),
        ("checkpoints", lambda d: (d / "tensors.safetensors").write_bytes(b"x"), 12, r"1 bytes, the manifest says"),
    ],
)
def test_every_resume_failure_is_a_resume_error_and_writes_nothing(
    tmp_path: Path, target: str, damage: Any, steps: int, message: str
) -> None:
    settings = {"batch_size": 32, "lr": 1e-2, "lr_max": None, "checkpoint_every": 6, "keep_checkpoints": 5}
    Trainer(Poisoned(set()), blobs(), steps=12, output_dir=str(tmp_path / "a"), **settings).fit()
    if damage is not None:
        damage(tmp_path / "a" / "checkpoints" / "step-6")
        (tmp_path / "a" / "checkpoints" / "latest").write_text("step-6\n")
    resumed = Trainer(Poisoned(set()), blobs(), steps=steps, output_dir=str(tmp_path / "b"), **settings)
    with pytest.raises(ResumeError, match=r"cannot resume from .*" + message):
        resumed.fit(resume_from=tmp_path / "a" / target)
    assert not (tmp_path / "b").exists()


# -- precision ------------------------------------------------------------------------------------


def test_bf16_autocast_trains_and_keeps_the_contract(tmp_path: Path) -> None:
    result, recorder = train(tmp_path, Poisoned(set()), precision="bf16-autocast")
    assert (result.applied_steps, result.skipped_steps) == (12, 0)
    assert result.final_loss < recorder.rows[0]["loss"]
    assert certificate(tmp_path)["outcome"] == "kept"


def test_fp16_amp_overflow_is_one_skip_and_the_scale_backs_off(tmp_path: Path) -> None:
    model = Poisoned({4}, value=math.inf)  # an inf forward at step 4: GradScaler's overflow and the guard's skip
    settings = {"steps": 12, "batch_size": 32, "lr": 1e-2, "lr_max": None, "output_dir": str(tmp_path / "run")}
    trainer = Trainer(model, blobs(), precision="fp16-amp", **settings)
    result = trainer.fit()
    assert (result.applied_steps, result.skipped_steps) == (11, 1)
    assert trainer.optimizer.skipped_steps.item() == 1
    assert trainer._scaler.get_scale() == 2.0**15  # backed off once, from GradScaler's 2^16
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["skipped"] for r in steps].count(True) == 1 and steps[4]["skipped"]
    assert all(r["grad_norm_clipped"] <= 1.0 for r in steps if not r["skipped"])
    assert certificate(tmp_path)["outcome"] == "kept"


def test_fp16_amp_resume_restores_the_grad_scaler_exactly(tmp_path: Path) -> None:
    settings = {"steps": 20, "batch_size": 32, "lr": 1e-2, "lr_max": None, "checkpoint_every": 10}
    Trainer(
        Poisoned({3}, value=math.inf), blobs(), precision="fp16-amp", output_dir=str(tmp_path / "full"), **settings
    ).fit()
    resumed = Trainer(Poisoned(set()), blobs(), precision="fp16-amp", output_dir=str(tmp_path / "resumed"), **settings)
    resumed.fit(resume_from=tmp_path / "full" / "checkpoints" / "step-10")
    assert resumed._scaler.get_scale() == 2.0**15  # the backed-off scale came back with the checkpoint
    full, tail = losses_of(tmp_path / "full"), losses_of(tmp_path / "resumed")
    assert sorted(tail) == list(range(10, 20))
    assert all(tail[s] == full[s] for s in tail)
