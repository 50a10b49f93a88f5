"""ProvetrainTrainerCallback: a NaN step in a transformers.Trainer run is skipped, holds the schedule, and is
certified, even though the Trainer's NaN filter hides it from the logged loss."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the model is built from a config
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install 'provetrain[hf]'")

from provetrain.integrations.hf import ProvetrainTrainerCallback, skip_aware_scheduler  # noqa: E402
from provetrain.ops.adam import AdamW  # noqa: E402

STEPS = 5
NAN_STEP = 2


class Tokens(torch.utils.data.Dataset):
    """Random token sequences, each its own language-modelling target."""

    def __init__(self, n: int = 64) -> None:
        self.ids = torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(transformers.TrainerCallback):
    """Weights and the inner scheduler's step count at the start of each optimizer step."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        self.schedule_steps: list[int] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.weights.append(torch.cat([p.detach().flatten().clone() for p in kwargs["model"].parameters()]))
        self.schedule_steps.append(kwargs["lr_scheduler"].scheduler.last_epoch)


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8)
    return transformers.GPT2LMHeadModel(config)


def poison_loss(model: nn.Module, call: int, make_bad: Any) -> None:
    """Make the loss the model returns non-finite on its ``call``-th training forward (0-based)."""
    calls = iter(range(10**6))

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training and next(calls) == call:
            output["loss"] = make_bad(output["loss"])

    model.register_forward_hook(hook)


def train(tmp_path: Path, model: nn.Module, callbacks: list[Any], *, optimizer: Any = None, **overrides: Any) -> Any:
    opt = optimizer or AdamW(model.parameters(), lr=1e-2, clip_value=1.0)
    schedule = LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=STEPS)
    scheduler = skip_aware_scheduler(schedule, opt) if isinstance(opt, AdamW) else schedule
    arguments = {
        "output_dir": str(tmp_path),
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "max_grad_norm": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    args = transformers.TrainingArguments(**(arguments | overrides))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), optimizers=(opt, scheduler), callbacks=callbacks
    )
    trainer.train()
    return trainer


def clause(certificate: dict[str, Any], text: str, kind: str) -> dict[str, Any]:
    return next(c for c in certificate["clauses"] if c["text"] == text and c["kind"] == kind)


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda loss: loss * math.nan, id="nan-gradients"),
        # Finite gradients: only the loss is NaN, and the Trainer calls optimizer.step() without it.
        pytest.param(lambda loss: loss + math.nan, id="nan-loss-only"),
    ],
)
def test_nan_step_is_skipped_holds_the_schedule_and_is_certified(tmp_path: Path, make_bad: Any) -> None:
    model = tiny_gpt2()
    poison_loss(model, NAN_STEP, make_bad)
    recorder = Recorder()
    trainer = train(tmp_path, model, [ProvetrainTrainerCallback(), recorder])

    w, s = recorder.weights, recorder.schedule_steps
    assert torch.equal(w[NAN_STEP], w[NAN_STEP + 1]), "the NaN step changed the weights"
    assert not any(torch.equal(w[i], w[i + 1]) for i in (0, 1, 3))
    assert s == [0, 1, 2, 2, 3], "the schedule advanced on the skipped step"

    cert = json.loads((tmp_path / "certificate.json").read_text())
    assert cert["outcome"] == "kept"
    assert cert["run"] | {"steps": STEPS, "applied_steps": STEPS - 1, "skipped_steps": 1} == cert["run"]
    finite = clause(cert, "loss.is_finite()", "postcondition")
    assert (finite["checks"], finite["violations"], finite["first_violation_step"]) == (STEPS, 1, NAN_STEP)
    bound = clause(cert, "grad_norm <= clip_value", "postcondition")
    assert (bound["checks"], bound["violations"]) == (STEPS - 1, 0)
    # The Trainer's NaN filter logs a finite loss for the skipped step; the added keys say what happened.
    logged = {row["step"]: row for row in trainer.state.log_history if "loss" in row}
    assert math.isfinite(logged[NAN_STEP + 1]["loss"])
    assert logged[NAN_STEP + 1]["skipped_steps"] == 1 and math.isnan(logged[NAN_STEP + 1]["grad_norm_clipped"])
    assert logged[STEPS]["grad_norm_clipped"] <= 1.0


@pytest.mark.parametrize(
    ("overrides", "foreign_optimizer", "error", "message"),
    [
        pytest.param(
            {"max_grad_norm": 1.0},
            False,
            ValueError,
            "TrainingArguments(max_grad_norm=1.0) makes the Trainer clip",
            id="max_grad_norm",
        ),
        pytest.param(
            {},
            True,
            TypeError,
            "the optimizer is torch.optim.adamw.AdamW, not provetrain.ops.adam.Adam or AdamW",
            id="foreign-optimizer",
        ),
    ],
)
def test_refuses_configurations_that_would_make_the_certificate_false(
    tmp_path: Path, overrides: dict[str, Any], foreign_optimizer: bool, error: type[Exception], message: str
) -> None:
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2) if foreign_optimizer else None
    with pytest.raises(error, match=re.escape(message)):
        train(tmp_path, model, [ProvetrainTrainerCallback()], optimizer=optimizer, **overrides)
    assert not (tmp_path / "certificate.json").exists()


def test_refuses_a_scheduler_that_steps_after_skipped_steps(tmp_path: Path) -> None:
    model = tiny_gpt2()
    opt = AdamW(model.parameters(), lr=1e-2, clip_value=1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, max_grad_norm=0.0, report_to="none", use_cpu=True
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        optimizers=(opt, LinearLR(opt, total_iters=STEPS)),
        callbacks=[ProvetrainTrainerCallback()],
    )
    with pytest.raises(TypeError, match=re.escape("skip_aware_scheduler(scheduler, opt)")):
        trainer.train()
