"""batch-v1 on the Trainer's batching: ceil(N / B) batches per epoch, every example once per epoch, inputs
kept with their targets, and the batch gradient the mean of the per-example gradients; FALSIFY-BATCH-001..004."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from provetrain import ConfigError, Trainer, load_config
from provetrain.data.batches import MapBatches
from provetrain.train.config import TrainConfig

CLASSES = 3


class Seen(nn.Module):
    """A linear classifier that records, in training, the example ids (feature 0) of every batch it gets."""

    def __init__(self, features: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(features, CLASSES)
        self.batches: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.batches.append(x[:, 0].round().long().clone())
        return self.linear(x)


def _indexed(n: int) -> TensorDataset:
    """Example i has feature 0 = i and label i % CLASSES: a batch's pairing can be checked from both ends."""
    ids = torch.arange(n, dtype=torch.float32)
    x = torch.stack([ids, torch.randn(n, generator=torch.Generator().manual_seed(n))], dim=1)
    return TensorDataset(x, torch.arange(n) % CLASSES)


def _run(n: int, batch_size: int | None, epochs: int, tmp_path: Path, **extra: Any) -> tuple[Trainer, Seen, list]:
    model, targets = Seen(), []

    def loss(outputs: Tensor, y: Tensor) -> Tensor:
        targets.append(y.clone())
        return F.cross_entropy(outputs, y)

    sizes = {} if batch_size is None else {"batch_size": batch_size}
    trainer = Trainer(
        model, _indexed(n), loss_fn=loss, epochs=epochs, lr=1e-3, lr_max=None, console=None,
        output_dir=str(tmp_path / f"run-{n}-{batch_size}"), **sizes, **extra,
    )  # fmt: skip
    trainer.fit()
    return trainer, model, targets


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (12, 4), (7, 7), (5, 8), (1, 1)])
def test_each_epoch_is_ceil_n_over_b_batches_covering_every_example_once(
    n: int, batch_size: int, tmp_path: Path
) -> None:
    trainer, model, _ = _run(n, batch_size, 2, tmp_path)
    per_epoch = math.ceil(n / batch_size)
    assert trainer.steps_per_epoch == per_epoch == (n + batch_size - 1) // batch_size >= 1
    assert trainer.total_steps == 2 * per_epoch and len(model.batches) == 2 * per_epoch
    for epoch in range(2):
        batches = model.batches[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sorted(torch.cat(batches).tolist()) == list(range(n))  # all samples exactly once
        sizes = [len(b) for b in batches]
        assert sizes[:-1] == [batch_size] * (per_epoch - 1)  # the last batch may be smaller, never empty
        assert 0 < sizes[-1] <= batch_size and sum(sizes) == n


def test_inputs_stay_paired_with_their_targets(tmp_path: Path) -> None:
    """Input-target alignment preserved, and batch size matches input-target pairing."""
    _, model, targets = _run(11, 4, 2, tmp_path)
    assert len(model.batches) == len(targets) == 6
    for ids, y in zip(model.batches, targets, strict=True):
        assert len(ids) == len(y) > 0
        assert torch.equal(y, ids % CLASSES)


def _per_example_gradients(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # type: ignore[union-attr]
    return grads


def test_the_batch_gradient_is_the_mean_of_per_example_gradients(tmp_path: Path) -> None:
    """grad_batch = (1/batch_size) sum_i grad_i for the Trainer's loss, the short last batch included (divided
    by its own size), and the mean gradient over the same data is the same whatever the batch size."""
    data = _indexed(12)
    x, y = data.tensors[0].double(), data.tensors[1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, CLASSES)).double()
    trainer = Trainer(model, data, batch_size=5, epochs=1, console=None, output_dir=str(tmp_path / "r"))
    per_example = torch.stack(_per_example_gradients(model, x, y))
    for batch in (slice(0, 5), slice(5, 10), slice(10, 12)):  # 5, 5 and the last batch of 2
        model.zero_grad()
        trainer.loss_fn(model(x[batch]), y[batch]).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
        assert grad.shape == per_example[0].shape and bool(torch.isfinite(grad).all())
        torch.testing.assert_close(grad, per_example[batch].mean(0), rtol=1e-12, atol=1e-15)
    full = per_example.mean(0)
    for size in (1, 2, 3, 4, 6, 12):  # equal batches: the mean of batch means is the full mean
        means = []
        for start in range(0, 12, size):
            model.zero_grad()
            trainer.loss_fn(model(x[start : start + size]), y[start : start + size]).backward()
            means.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # type: ignore[union-attr]
        torch.testing.assert_close(torch.stack(means).mean(0), full, rtol=1e-12, atol=1e-15)
    # a sum-reduced loss would give batch_size times the mean: the check above tells them apart
    model.zero_grad()
    F.cross_entropy(model(x[:5]), y[:5], reduction="sum").backward()
    summed = torch.cat([p.grad.flatten() for p in model.parameters()])  # type: ignore[union-attr]
    assert not torch.allclose(summed, per_example[:5].mean(0))


@pytest.mark.contract("batch-kani-001")
def test_batch_counts_for_every_size_up_to_the_bound() -> None:
    """batch-kani-001 ("Batch size positive", bound 4), checked exhaustively at its bound: for every batch size
    1..4 and 1..16 examples, the Trainer's batches of an epoch are non-empty, ceil(N/B) of them, and partition
    the examples. (An exhaustive run of the shipped code over the bounded domain, not a proof.)"""
    for n in range(1, 17):
        for batch_size in range(1, 5):
            trainer = Trainer(Seen(), _indexed(n), batch_size=batch_size, epochs=1, console=None)
            source = MapBatches(_indexed(n), batch_size)
            assert trainer.steps_per_epoch == source.batches_per_epoch
            batches = [source.next_batch()[0][:, 0].long() for _ in range(source.batches_per_epoch)]
            assert len(batches) == (n + batch_size - 1) // batch_size >= 1
            assert all(0 < len(b) <= batch_size for b in batches)
            assert sorted(torch.cat(batches).tolist()) == list(range(n))


@pytest.mark.contract("FALSIFY-BATCH-001")
def test_falsify_batch_001_a_batch_of_3_inputs_has_size_3(tmp_path: Path) -> None:
    """Batch of 3 inputs reports size() == 3: with batch_size 3 every batch the model gets holds 3 examples."""
    trainer, model, targets = _run(9, 3, 1, tmp_path)
    assert trainer.steps_per_epoch == 3
    assert [len(b) for b in model.batches] == [3, 3, 3] and [len(t) for t in targets] == [3, 3, 3]


@pytest.mark.contract("FALSIFY-BATCH-002")
def test_falsify_batch_002_batches_have_the_right_tensor_shapes(tmp_path: Path) -> None:
    """Dataset batching produces correct tensor shapes: (batch, *example shape) for inputs of any rank, targets
    (batch, *target shape), for images and for token sequences."""
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def loss(outputs: Tensor, y: Tensor) -> Tensor:
        shapes.append((tuple(outputs.shape), tuple(y.shape)))
        return F.cross_entropy(outputs.flatten(0, -2), y.flatten())

    images = TensorDataset(torch.randn(10, 1, 4, 4), torch.randint(0, 2, (10,)))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    Trainer(model, images, loss_fn=loss, batch_size=4, epochs=1, console=None, output_dir=str(tmp_path / "i")).fit()
    assert shapes == [((4, 2), (4,)), ((4, 2), (4,)), ((2, 2), (2,))]
    shapes.clear()
    tokens = TensorDataset(torch.randint(0, 7, (5, 6)), torch.randint(0, 7, (5, 6)))
    lm = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7))
    Trainer(lm, tokens, loss_fn=loss, batch_size=2, epochs=1, console=None, output_dir=str(tmp_path / "t")).fit()
    assert shapes == [((2, 6, 7), (2, 6)), ((2, 6, 7), (2, 6)), ((1, 6, 7), (1, 6))]


@pytest.mark.contract("FALSIFY-BATCH-003")
def test_falsify_batch_003_batch_size_is_read_from_the_yaml_config(tmp_path: Path) -> None:
    """Batch size correctly read from the YAML config and used by the Trainer built from it."""
    path = tmp_path / "train.yaml"
    path.write_text("batch_size: 4\nepochs: 1\nlr_max: null\n")
    config = load_config(path)
    assert config.batch_size == 4
    model = Seen()
    trainer = Trainer(model, _indexed(10), config=config, console=None, output_dir=str(tmp_path / "run"))
    trainer.fit()
    assert trainer.steps_per_epoch == 3 and [len(b) for b in model.batches] == [4, 4, 2]
    path.write_text("batch_size: 0\n")
    with pytest.raises(Exception, match=r"batch_size"):
        load_config(path)


@pytest.mark.contract("FALSIFY-BATCH-004")
def test_falsify_batch_004_default_batch_size_without_a_setting(tmp_path: Path) -> None:
    """A reasonable default batch size (64) is used when none is given: positive, and what the Trainer uses."""
    assert TrainConfig().batch_size == 64
    trainer, model, _ = _run(150, None, 1, tmp_path)
    assert trainer.config.batch_size == 64
    assert [len(b) for b in model.batches] == [64, 64, 22]


def test_an_empty_training_set_is_refused() -> None:
    """n > 0: a training set of no examples is a located error naming the data, before anything runs."""
    with pytest.raises(ConfigError, match="empty"):
        Trainer(Seen(), _indexed(0), batch_size=4, epochs=1, console=None)
