"""Data sources for ``provetrain train``: built-ins, array files, text, or the user's own function.

Every source returns a :class:`DataSplits`: a training set, an optional evaluation set, and what the model
needs to know about them (the task, the input shape, the number of classes or the vocabulary size).
Nothing is downloaded: the default, scikit-learn's 8x8 digits, ships inside scikit-learn.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DataSplits", "load_arrays", "load_data", "load_digits", "load_text"]

Task = Literal["classification", "language-model"]


@dataclass(frozen=True)
class DataSplits:
    """Training and evaluation data, with the facts a built-in model is sized from.

    Attributes:
        train: the training set, ``(x, y)`` pairs.
        test: the held-out set, or None.
        task: ``classification`` (``y`` is a class index) or ``language-model`` (``y`` is ``x`` shifted by one).
        input_shape: shape of one ``x``.
        num_classes: number of classes, or the vocabulary size for a language model.
    """

    train: TensorDataset
    test: TensorDataset | None
    task: Task
    input_shape: tuple[int, ...]
    num_classes: int


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = len(x) - max(1, round(len(x) * test_fraction))
    train, test = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train, test = _split(x, y, test_fraction, seed)
    return DataSplits(train, test, "classification", (64,), 10)


def load_arrays(path: str | Path, *, target: str = "y", seed: int = 0, test_fraction: float = 0.2) -> DataSplits:
    """Features and integer labels from ``.npz`` (arrays ``x`` and ``y``, optionally ``x_test``/``y_test``) or
    ``.csv`` (a header row; the ``target`` column holds the labels, every other column is a feature)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"x", "y"} - set(arrays.files)
            if missing:
                raise ValueError(f"{path}: missing arrays {sorted(missing)}; it has {sorted(arrays.files)}")
            x, y = arrays["x"], arrays["y"]
            test_arrays = (arrays["x_test"], arrays["y_test"]) if {"x_test", "y_test"} <= set(arrays.files) else None
    elif path.suffix == ".csv":
        header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
        if target not in header:
            raise ValueError(f"{path}: no column named {target!r}; columns are {header}")
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        column = header.index(target)
        x, y = np.delete(table, column, axis=1), table[:, column]
        test_arrays = None
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .npz or .csv")
    x_t, y_t = _as_features(x, y, path)
    if test_arrays is None:
        train, test = _split(x_t, y_t, test_fraction, seed)
    else:
        train, test = TensorDataset(x_t, y_t), TensorDataset(*_as_features(*test_arrays, path))
    num_classes = int(max(train.tensors[1].max(), test.tensors[1].max())) + 1
    return DataSplits(train, test, "classification", tuple(x_t.shape[1:]), num_classes)


def _as_features(x: np.ndarray, y: np.ndarray, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} inputs but {len(y)} labels")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: inputs hold NaN or Inf values")
    if np.any(y < 0) or np.any(y != np.round(y)):
        raise ValueError(f"{path}: labels must be non-negative integers (class indices)")
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def load_text(path: str | Path, *, block_size: int = 64, seed: int = 0, test_fraction: float = 0.1) -> DataSplits:
    """Character-level language-model data from a UTF-8 text file: windows of ``block_size`` characters,
    each target the window shifted by one character."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if len(text) < 2 * (block_size + 1):
        raise ValueError(f"{path}: {len(text)} characters is too short for block_size {block_size}")
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    starts = torch.arange(0, len(ids) - block_size - 1, max(1, block_size // 2))
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + block_size + 1] for s in starts.tolist()])
    train, test = _split(x, y, test_fraction, seed)
    return DataSplits(train, test, "language-model", (block_size,), len(vocabulary))


BUILTIN_DATA: Mapping[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "arrays": load_arrays,
    "text": load_text,
}


def load_data(spec: str, arguments: Mapping[str, Any] | None = None, *, seed: int = 0) -> DataSplits:
    """Resolve a data spec: a built-in name (``digits``, ``arrays``, ``text``) or ``module:function``.

    A user function is called with ``arguments`` as keywords and must return a :class:`DataSplits`, or a
    ``(train, test)`` pair of ``TensorDataset`` for classification.
    """
    arguments = dict(arguments or {})
    if spec in BUILTIN_DATA:
        return BUILTIN_DATA[spec](seed=seed, **arguments)
    result = resolve_function(spec, "data")(**arguments)
    if isinstance(result, DataSplits):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], TensorDataset):
        train, test = result
        labels = train.tensors[1] if test is None else torch.cat([train.tensors[1], test.tensors[1]])
        return DataSplits(train, test, "classification", tuple(train.tensors[0].shape[1:]), int(labels.max()) + 1)
    raise TypeError(f"data function {spec!r} returned {type(result).__name__}; expected DataSplits or (train, test)")


def resolve_function(spec: str, what: str) -> Callable[..., Any]:
    """Import ``module:function``; errors say which part is missing."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {spec!r} is neither a built-in nor of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return function
