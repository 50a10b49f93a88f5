"""examples/nanogpt: the corpus script, the GPT, and its config training a few steps on a small corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from examples.nanogpt.model import make_model
from examples.nanogpt.prepare import stdlib_corpus, write_dataset
from provetrain.train.config import load_config
from provetrain.train.run import prepare_trainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nanogpt"


def test_prepare_writes_byte_tokens_and_meta(tmp_path: Path) -> None:
    corpus = stdlib_corpus(20_000)
    assert corpus == stdlib_corpus(20_000) and corpus.startswith(b"# file: ")  # deterministic
    meta = write_dataset(corpus, tmp_path)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (18_000, 2_000) == (meta["train_tokens"], meta["val_tokens"])
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == corpus
    assert json.loads((tmp_path / "meta.json").read_text())["vocab_size"] == 256


def test_the_gpt_is_causal_tied_and_returns_nanogpts_tuple() -> None:
    torch.manual_seed(0)
    model = make_model(block_size=16, n_layer=2, n_embd=32).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 256
    logits, after = model(idx), model(changed)
    assert logits.shape == (2, 16, 256)
    assert torch.equal(logits[:, :9], after[:, :9]) and not torch.equal(logits[:, 9:], after[:, 9:])
    model.return_loss = True
    targets = torch.randint(0, 256, (2, 16))
    tupled, loss = model(idx, targets)
    assert torch.equal(tupled, logits) and model(idx)[1] is None
    assert torch.equal(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_the_default_gpt_is_the_size_the_config_states() -> None:
    assert round(make_model(block_size=64).num_params() / 1e6, 2) == 0.82


def test_the_example_config_trains(tmp_path: Path) -> None:
    """The example's own settings on a small corpus, with a smaller GPT and batch, for speed."""
    write_dataset(stdlib_corpus(50_000), tmp_path)
    config = load_config(EXAMPLE / "config.yaml")
    small = {"block_size": 16}
    trainer = prepare_trainer(
        config,
        data_args=config.data_args | small | {"train": str(tmp_path / "train.bin"), "val": str(tmp_path / "val.bin")},
        model_args=config.model_args | small | {"n_layer": 1, "n_embd": 32},
        batch_size=4,
        steps=4,
        eval_batches=2,
        checkpoint_every=2,
        output_dir=str(tmp_path / "run"),
    )
    result = trainer.fit()
    assert result.applied_steps == 4 and result.evaluation is not None
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
