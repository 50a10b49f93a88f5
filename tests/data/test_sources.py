"""Data sources: built-ins, array files and user functions, with errors that name the problem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from provetrain.data.sources import DataSplits, load_data


def test_digits_is_bundled_and_split() -> None:
    data = load_data("digits", seed=0)
    assert (data.task, data.input_shape, data.num_classes) == ("classification", (64,), 10)
    assert len(data.train) + len(data.test) == 1797
    assert float(data.train.tensors[0].max()) <= 1.0


def test_npz_with_and_without_a_test_split(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).normal(size=(50, 3)), np.arange(50) % 3
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    data = load_data("arrays", {"path": str(tmp_path / "plain.npz")}, seed=0)
    assert len(data.train) == 40 and len(data.test) == 10 and data.num_classes == 3
    np.savez(tmp_path / "split.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    data = load_data("arrays", {"path": str(tmp_path / "split.npz")})
    assert len(data.train) == 50 and len(data.test) == 5
    assert data.train.tensors[0].dtype == torch.float32 and data.train.tensors[1].dtype == torch.int64


def test_csv_with_a_named_target(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,label,b\n" + "\n".join(f"{i},{i % 2},{-i}" for i in range(20)) + "\n")
    data = load_data("arrays", {"path": str(path), "target": "label"})
    assert data.input_shape == (2,) and data.num_classes == 2
    features = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    assert torch.equal(features[:, 0], -features[:, 1])  # the target column was removed, not a feature


@pytest.mark.parametrize(
    ("setup", "pattern"),
    [
        (lambda p: np.savez(p / "d.npz", x=np.zeros((3, 2))), r"missing arrays \['y'\]"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((3, 2)), y=np.zeros(4)), r"3 inputs but 4 labels"),
        (lambda p: np.savez(p / "d.npz", x=np.full((3, 2), np.nan), y=np.zeros(3)), r"NaN or Inf"),
        (lambda p: np.savez(p / "d.npz", x=np.zeros((3, 2)), y=np.array([0, 1.5, 2])), r"non-negative integers"),
    ],
)
def test_bad_array_files_are_named(tmp_path: Path, setup, pattern: str) -> None:
    setup(tmp_path)
    with pytest.raises(ValueError, match=pattern):
        load_data("arrays", {"path": str(tmp_path / "d.npz")})


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.npz does not exist"):
        load_data("arrays", {"path": str(tmp_path / "nope.npz")})
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported data file type '\.parquet'"):
        load_data("arrays", {"path": str(tmp_path / "d.parquet")})


def make_pairs(n: int = 12) -> tuple[TensorDataset, TensorDataset]:
    """A user data function returning (train, test)."""
    x = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2)
    y = torch.arange(n) % 4
    return TensorDataset(x[:8], y[:8]), TensorDataset(x[8:], y[8:])


def make_a_number(value: int = 3) -> int:
    """A user data function that returns the wrong thing."""
    return value


def test_user_function_returning_datasets() -> None:
    data = load_data(f"{__name__}:make_pairs", {"n": 12})
    assert isinstance(data, DataSplits)
    assert (data.input_shape, data.num_classes, len(data.test)) == ((2,), 4, 4)
    with pytest.raises(
        TypeError,
        match=r"returned int; expected DataSplits, a Dataset, IterableDataset or DataLoader, or a \(train, test\) pair",
    ):
        load_data(f"{__name__}:make_a_number", {"value": 1})
