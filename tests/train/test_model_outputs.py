"""Models that return tuples, dicts or Hugging Face ModelOutput; ``output_key`` and ``loss_fn`` (issue 12,
item 2 and the tuple-returning model of its Done-when)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from provetrain.errors import ConfigError
from provetrain.train.config import load_config
from provetrain.train.model_output import ModelOutputError, select_output
from provetrain.train.run import prepare_trainer
from provetrain.train.trainer import Trainer
from tests.train.test_distributed import blobs


class NanoStyle(nn.Module):
    """Returns ``(logits, loss)`` as nanoGPT's GPT does (``loss`` None without targets)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        return self.head(x), None


class DictStyle(NanoStyle):
    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, Any]:  # type: ignore[override]
        return {"loss": None, "logits": self.head(x)}


def hf_style() -> nn.Module:
    from transformers.modeling_outputs import SequenceClassifierOutput

    class HfStyle(NanoStyle):
        def forward(self, x: torch.Tensor, targets: Any = None) -> Any:  # type: ignore[override]
            return SequenceClassifierOutput(logits=self.head(x))

    return HfStyle()


@pytest.mark.parametrize(
    ("make", "key"),
    [(NanoStyle, 0), (DictStyle, "logits"), (hf_style, "logits"), (hf_style, 0)],
    ids=["tuple-0", "dict-logits", "modeloutput-logits", "modeloutput-0"],
)
def test_a_model_with_structured_output_trains_with_output_key(tmp_path: Path, make: Any, key: Any) -> None:
    result = Trainer(make(), blobs(128, train=96), steps=6, lr=0.05, output_key=key, output_dir=str(tmp_path)).fit()
    assert result.applied_steps == 6 and result.certificate["outcome"] == "kept"
    assert result.evaluation is not None and result.evaluation["loss"] < 0.5  # ln 2 = 0.69 untrained


@pytest.mark.parametrize("target_shape", [(1,), ()], ids=["targets-B-1", "targets-B"])
def test_a_regression_evaluation_reports_no_accuracy(tmp_path: Path, target_shape: tuple[int, ...]) -> None:
    """Float targets and one output per example (loss_fn: MSE) are not class scores: the evaluation has its
    loss and no accuracy. (argmax(-1) of a (B, 1) output against (B, 1) targets broadcast to a (B, B)
    comparison, and of a (B,) output to one index over the whole batch: an 'accuracy' of nothing.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(1).reshape(64, *target_shape)
    torch.manual_seed(0)
    model = nn.Linear(8, 1) if target_shape else nn.Sequential(nn.Linear(8, 1), nn.Flatten(0))
    trainer = Trainer(
        model,
        TensorDataset(x[:48], y[:48]),
        eval_data=TensorDataset(x[48:], y[48:]),
        loss_fn=nn.functional.mse_loss,
        steps=4,
        lr=0.05,
        batch_size=16,
        output_dir=str(tmp_path),
    )
    result = trainer.fit()
    assert result.evaluation is not None and set(result.evaluation) == {"loss"}


def test_a_classifier_evaluation_still_reports_its_accuracy(tmp_path: Path) -> None:
    result = Trainer(NanoStyle(), blobs(128, train=96), steps=6, lr=0.05, output_key=0, output_dir=str(tmp_path)).fit()
    assert result.evaluation is not None and 0.5 < result.evaluation["accuracy"] <= 1.0  # logits at output_key 0


def test_a_tuple_without_output_key_is_refused_by_name(tmp_path: Path) -> None:
    message = (
        "the model returned a tuple of 2 (Tensor[2, 2], NoneType), and the default loss (cross-entropy) needs a "
        "tensor of logits: set output_key to the part holding them (output_key: 0), or set loss_fn: "
        "module:function to compute the loss from the whole output"
    )
    with pytest.raises(ModelOutputError, match=re.escape(message)):
        Trainer(NanoStyle(), blobs(128, train=96), steps=2, output_dir=str(tmp_path / "run")).fit()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("output", "key", "message"),
    [
        ((torch.ones(1), None), 2, "output_key 2 is out of range for the model's output, a tuple of 2"),
        (
            {"logits": torch.ones(1)},
            "scores",
            "output_key 'scores' is not in the model's output, a dict with keys 'logits'",
        ),
        (
            torch.ones(1),
            0,
            "output_key 0 indexes a tuple or list, but the model's output is a Tensor[1]; remove output_key",
        ),
        (torch.ones(1), "logits", "output_key 'logits' is not in the model's output, a Tensor[1]"),
    ],
)
def test_a_key_the_output_does_not_have_is_refused(output: Any, key: Any, message: str) -> None:
    with pytest.raises(ModelOutputError, match=re.escape(message)):
        select_output(output, key)


def test_a_config_error_about_outputs_is_located_at_its_key(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "nano.py").write_text(
        "import torch\n\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.f = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))\n\n"
        "    def forward(self, x):\n"
        "        return self.f(x), None\n\n"
        "def build():\n"
        "    return M()\n\n"
        "def loss(output, targets):\n"
        "    return torch.nn.functional.cross_entropy(output[0], targets)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "cfg.yaml"
    config.write_text("model: nano:build\noutput_key: 3\nsteps: 2\n")
    with pytest.raises(ConfigError, match=re.escape("cfg.yaml:2:1: key 'output_key': output_key 3 is out of range")):
        prepare_trainer(load_config(config))
    config.write_text("model: nano:build\nsteps: 2\nloss_fn: nano:missing\n")
    with pytest.raises(ConfigError, match=re.escape("cfg.yaml:3:1: key 'loss_fn': loss_fn 'nano:missing': module")):
        prepare_trainer(load_config(config))
    config.write_text("model: nano:build\nsteps: 2\nloss_fn: nano:loss\n")
    assert prepare_trainer(load_config(config), output_dir=str(tmp_path / "run")).fit().applied_steps == 2
    sys.modules.pop("nano", None)


def test_the_console_script_finds_loss_fn_in_the_current_directory(tmp_path: Path) -> None:
    (tmp_path / "mylosses.py").write_text(
        "import torch\n\ndef smooth(output, targets):\n"
        "    return torch.nn.functional.cross_entropy(output, targets, label_smoothing=0.1)\n"
    )
    (tmp_path / "cfg.yaml").write_text("loss_fn: mylosses:smooth\nsteps: 2\nbatch_size: 16\n")
    script = Path(sys.executable).parent / "provetrain"
    done = subprocess.run(
        [str(script), "train", "cfg.yaml", "--quiet", "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "certificate.json").exists()
