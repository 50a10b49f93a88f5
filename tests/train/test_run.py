"""Runs built from config files: the embedded default, resolution errors, reproducible initial weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from provetrain.errors import ConfigError
from provetrain.train.config import load_config
from provetrain.train.run import default_config_path, prepare_trainer


def test_embedded_default_is_digits_with_a_small_mlp() -> None:
    config = load_config(default_config_path())
    assert (config.data, config.model, config.optimizer, config.clip_value) == ("digits", "mlp", "adamw", 1.0)
    trainer = prepare_trainer(config)
    assert trainer.data.task == "classification" and trainer.data.num_classes == 10


def test_same_seed_same_initial_weights() -> None:
    config = load_config(default_config_path())
    torch.manual_seed(123)  # whatever the global state was, the config's seed decides
    first = prepare_trainer(config).model.state_dict()
    second = prepare_trainer(config).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = prepare_trainer(config.model_copy(update={"seed": 1})).model.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    ("text", "key", "pattern"),
    [
        ("data: nowhere:make\n", "data", r"cannot import module 'nowhere'"),
        ("data: arrays\ndata_args: {path: missing.npz}\n", "data_args.path", r"missing\.npz does not exist"),
        ("model: resnet\n", "model", r"'resnet' is neither a built-in nor of the form 'module:function'"),
        ("model: torch.nn:NoSuchLayer\n", "model", r"has no callable 'NoSuchLayer'"),
    ],
)
def test_unresolvable_data_or_model_names_the_key(tmp_path: Path, text: str, key: str, pattern: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text + f"output_dir: {tmp_path / 'out'}\n")
    with pytest.raises(ConfigError, match=pattern) as caught:
        prepare_trainer(load_config(path))
    assert caught.value.key == key
    assert not (tmp_path / "out").exists()


def test_config_file_errors_are_located(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("lr: 0.01\nclip_value: -2\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:2:13: key 'clip_value': Input should be greater than 0"):
        load_config(path)
    path.write_text("lr: 0.01\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match=r"key 'batchsize': unknown key \(expected one of the keys data, data_args"):
        load_config(path)


def test_tiny_language_model_trains_with_lr_max_auto(tmp_path: Path) -> None:
    """The loop is not MLP-only: a transformer on a text file, with lr_max estimated from curvature (double
    backward through attention) and reported, not enforced."""
    text = tmp_path / "corpus.txt"
    text.write_text("the contract holds at every step; " * 40)
    config = tmp_path / "lm.yaml"
    config.write_text(
        f"data: text\ndata_args: {{path: {text}, block_size: 16}}\nmodel: tiny-gpt\n"
        f"model_args: {{width: 16, layers: 1, heads: 2}}\nlr: 0.003\nlr_max: auto\nsteps: 8\nbatch_size: 8\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    trainer = prepare_trainer(load_config(config))
    result = trainer.fit()
    assert result.lr_max is None and result.lr_max_estimate is not None and result.lr_max_estimate.lr_max > 0
    assert result.applied_steps == 8 and result.evaluation is not None
    assert trainer.data.task == "language-model"
