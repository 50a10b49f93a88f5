"""compile: true (issue 12, item 2): torch.compile for the training forward; the uncompiled module is what is
checkpointed and measured; a compile failure is a located ConfigError, not a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from provetrain.errors import ConfigError
from provetrain.train.checkpoint import load_checkpoint
from provetrain.train.trainer import Trainer
from tests.train.test_distributed import blobs


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


@torch._dynamo.register_backend
def provetrain_test_broken(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> None:
    raise RuntimeError("this backend cannot compile")


def test_a_compiled_run_equals_the_eager_run_and_checkpoints_the_plain_module(tmp_path: Path) -> None:
    settings = {"steps": 4, "checkpoint_every": 2, "batch_size": 32}
    eager = Trainer(mlp(), blobs(128, train=None), output_dir=str(tmp_path / "eager"), **settings)
    compiled = Trainer(
        mlp(),
        blobs(128, train=None),
        compile=True,
        compile_backend="eager",
        output_dir=str(tmp_path / "compiled"),
        **settings,
    )
    eager.fit(), compiled.fit()
    assert type(compiled._train_module).__name__ == "OptimizedModule"
    assert all(torch.equal(a, b) for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True))
    names = set(load_checkpoint(tmp_path / "compiled" / "checkpoints").state["model"])
    assert names == set(load_checkpoint(tmp_path / "eager" / "checkpoints").state["model"])


def test_a_model_compiled_by_the_user_is_unwrapped_and_trained_compiled(tmp_path: Path) -> None:
    model = mlp()
    trainer = Trainer(torch.compile(model, backend="eager"), blobs(128, train=None), steps=2, output_dir=str(tmp_path))
    assert trainer.model is model
    trainer.fit()
    assert type(trainer._train_module).__name__ == "OptimizedModule"


def test_a_backend_that_fails_is_a_config_error_and_writes_nothing(tmp_path: Path) -> None:
    trainer = Trainer(
        mlp(),
        blobs(128, train=None),
        steps=2,
        compile=True,
        compile_backend="provetrain_test_broken",
        output_dir=str(tmp_path / "r"),
    )
    message = (
        "key 'compile': torch.compile (backend 'provetrain_test_broken') failed on the model's training forward "
        "at step 0: BackendCompilerFailed: backend='provetrain_test_broken' raised: RuntimeError: this backend "
        "cannot compile"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        trainer.fit()
    assert not (tmp_path / "r").exists()


def test_an_unknown_backend_is_refused_before_training() -> None:
    with pytest.raises(ConfigError, match=re.escape("key 'compile_backend': compile_backend 'nope' is not a torch")):
        Trainer(mlp(), blobs(128, train=None), steps=2, compile=True, compile_backend="nope")
