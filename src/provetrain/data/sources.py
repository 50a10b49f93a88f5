"""Data sources for ``provetrain train``: built-ins, array files, text, or the user's own function.

Every source returns a :class:`DataSplits`: a training set, an optional evaluation set, and what the model
needs to know about them (the task, the input shape, the number of classes or the vocabulary size).
Nothing is downloaded: the default, scikit-learn's 8x8 digits, ships inside scikit-learn.

Every problem with a data file or an argument raises ``ValueError`` (:class:`ArgumentError` when one
argument is to blame, naming it) with a message that names the file and what is wrong; a user function that
raises is reported as such, with its name.
"""

from __future__ import annotations

import importlib
import inspect
import json
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from provetrain.data.batches import (
    BatchSource,
    DataError,
    TokenFile,
    evaluation_batches,
    first_batches,
    make_batch_source,
)

__all__ = [
    "ArgumentError",
    "DataFileError",
    "DataSplits",
    "as_splits",
    "call_user_function",
    "check_arguments",
    "load_arrays",
    "load_data",
    "load_digits",
    "load_text",
    "load_tokens",
    "resolve_function",
]

Task = Literal["classification", "language-model"]
# Labels are class indices, so the largest sizes the model's output layer; beyond this many classes that
# layer alone outgrows memory at any useful width, and a label that large is a mistake in the data.
MAX_CLASSES = 2**24


class ArgumentError(ValueError):
    """A bad value of one named argument of a data source or a model (``path``, ``hidden``)."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        super().__init__(problem)


class DataFileError(ArgumentError):
    """A data file that cannot be used: blames the ``path`` argument, and the message starts with the file."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__("path", f"{path}: {problem}")


def check_arguments(
    function: Callable[..., Any], arguments: Mapping[str, Any], what: str, *, supplied: tuple[str, ...]
) -> None:
    """``arguments`` name only parameters of the built-in ``function`` (besides the ``supplied`` ones, which
    provetrain passes itself) and give every required one; else an :class:`ArgumentError` naming it."""
    parameters = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in supplied
    ]
    known = [p.name for p in parameters]
    for name in arguments:
        if name not in known:
            raise ArgumentError(name, f"{what} has no argument {name!r}; its arguments are {', '.join(known)}")
    for parameter in parameters:
        if parameter.default is parameter.empty and parameter.name not in arguments:
            raise ArgumentError(parameter.name, f"{what} needs the argument {parameter.name!r}")


def _check_count(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(name, f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < 1.0:
        raise ArgumentError(name, f"{name} must be a number in (0, 1), got {value!r}")


def _check_path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ArgumentError("path", f"path must be a file name, got {value!r}")
    return Path(value)


@dataclass(frozen=True)
class DataSplits:
    """Training and evaluation data, with the facts a built-in model is sized from.

    Attributes:
        train: the training data, ``(x, y)`` pairs: a ``TensorDataset`` or any map-style ``Dataset``, an
            ``IterableDataset``, a ``DataLoader``, a :class:`~provetrain.data.batches.TokenFile` (random
            windows of a token stream) or a :class:`~provetrain.data.batches.BatchSource`.
        test: the held-out data, of the same kinds (a BatchSource excepted), or None.
        task: ``classification`` (``y`` is a class index) or ``language-model`` (``y`` is ``x`` shifted by one).
        input_shape: shape of one ``x``.
        num_classes: number of classes, or the vocabulary size for a language model.
    """

    train: Any
    test: Any | None
    task: Task
    input_shape: tuple[int, ...]
    num_classes: int


def _split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    _check_fraction("test_fraction", test_fraction)
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
    path = _check_path(path)
    _check_fraction("test_fraction", test_fraction)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".npz":
        x, y, test_arrays = _read_npz(path)
    elif path.suffix == ".csv":
        if not isinstance(target, str):
            raise ArgumentError("target", f"target must be a column name, got {target!r}")
        x, y = _read_csv(path, target)
        test_arrays = None
    else:
        raise DataFileError(path, f"unsupported data file type {path.suffix!r}; use .npz or .csv")
    x_t, y_t = _as_features(x, y, path, "")
    if test_arrays is None:
        if len(x_t) < 2:
            raise DataFileError(path, f"{len(x_t)} example(s); at least 2 are needed (one to train, one to test)")
        train, test = _split(x_t, y_t, test_fraction, seed)
    else:
        test_x, test_y = _as_features(*test_arrays, path, "_test")
        if test_x.shape[1:] != x_t.shape[1:]:
            raise DataFileError(
                path, f"x_test has examples of shape {tuple(test_x.shape[1:])}, x of {tuple(x_t.shape[1:])}"
            )
        train, test = TensorDataset(x_t, y_t), TensorDataset(test_x, test_y)
    num_classes = int(max(train.tensors[1].max(), test.tensors[1].max())) + 1
    return DataSplits(train, test, "classification", tuple(x_t.shape[1:]), num_classes)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    try:  # np.load leaves a file it opened unclosed when it cannot read it: open it here
        with path.open("rb") as handle:
            arrays = np.load(handle, allow_pickle=False)
            if not isinstance(arrays, np.lib.npyio.NpzFile):
                raise DataFileError(path, "holds a single array (.npy), not named arrays x and y (.npz)")
            with arrays:
                missing = {"x", "y"} - set(arrays.files)
                if missing:
                    raise DataFileError(path, f"missing arrays {sorted(missing)}; it has {sorted(arrays.files)}")
                x, y = arrays["x"], arrays["y"]
                has_test = {"x_test", "y_test"} <= set(arrays.files)
                return x, y, (arrays["x_test"], arrays["y_test"]) if has_test else None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # empty, truncated, not an npz
        raise DataFileError(path, f"cannot read it as an .npz archive ({error})") from None
    except DataFileError:
        raise
    except ValueError as error:  # e.g. an object array, which would need pickle
        raise DataFileError(path, f"cannot read it as an .npz archive ({error})") from None


def _read_csv(path: Path, target: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"not UTF-8 text ({error.reason})") from None
    if not lines or not lines[0].strip():
        raise DataFileError(path, "no header row (the first line names the columns)")
    header = [name.strip() for name in lines[0].split(",")]
    if target not in header:
        raise ArgumentError("target", f"{path}: no column named {target!r}; columns are {header}")
    if len(header) < 2:
        raise DataFileError(path, f"only the target column {target!r}; at least one feature column is needed")
    rows = [line for line in lines[1:] if line.strip()]
    if not rows:
        raise DataFileError(path, "a header but no data rows")
    try:
        table = np.loadtxt(rows, delimiter=",", ndmin=2)
    except ValueError:
        raise _csv_row_error(path, lines, len(header)) from None
    column = header.index(target)
    return np.delete(table, column, axis=1), table[:, column]


def _csv_row_error(path: Path, lines: list[str], columns: int) -> DataFileError:
    """The first line numpy could not read, by its line number in the file."""
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split(",") if line.strip() else []
        if cells and len(cells) != columns:
            return DataFileError(path, f"line {number}: {len(cells)} values, but the header names {columns} columns")
        for cell in cells:
            try:
                float(cell)
            except ValueError:
                return DataFileError(path, f"line {number}: {cell.strip()!r} is not a number")
    return DataFileError(path, "numpy cannot read the rows as numbers")


def _as_features(x: np.ndarray, y: np.ndarray, path: Path, suffix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 features and int64 class labels, or a ValueError naming the array (``x``, ``y_test``)."""
    x_name, y_name = f"x{suffix}", f"y{suffix}"
    if x.dtype.kind == "c":
        raise DataFileError(path, f"{x_name} is complex; features must be real (the imaginary part would be lost)")
    for name, array in ((x_name, x), (y_name, y)):
        if array.dtype.kind not in "biuf":
            raise DataFileError(path, f"{name} has dtype {array.dtype}; it must hold numbers")
    if x.ndim < 2:
        raise DataFileError(path, f"{x_name} has shape {x.shape}; expected (examples, features...)")
    if y.ndim != 1:
        raise DataFileError(path, f"{y_name} has shape {y.shape}; expected (examples,), one class index each")
    if len(x) != len(y):
        raise DataFileError(path, f"{len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise DataFileError(path, f"{x_name} holds no examples")
    features = torch.tensor(x, dtype=torch.float32)
    if not torch.isfinite(features).all():
        raise DataFileError(path, "inputs hold NaN or Inf values (or values beyond float32's range)")
    labels = y.astype(np.float64)
    if not np.isfinite(labels).all() or np.any(labels < 0) or np.any(labels != np.round(labels)):
        raise DataFileError(path, "labels must be non-negative integers (class indices)")
    if labels.max() >= MAX_CLASSES:
        raise DataFileError(path, f"label {labels.max():g} is not a class index (at most {MAX_CLASSES - 1})")
    return features, torch.tensor(labels, dtype=torch.int64)


def load_text(path: str | Path, *, block_size: int = 64, seed: int = 0, test_fraction: float = 0.1) -> DataSplits:
    """Character-level language-model data from a UTF-8 text file: windows of ``block_size`` characters,
    each target the window shifted by one character."""
    path = _check_path(path)
    _check_count("block_size", block_size)
    _check_fraction("test_fraction", test_fraction)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataFileError(path, f"not UTF-8 text ({error.reason})") from None
    if len(text) < 2 * (block_size + 1):
        raise DataFileError(path, f"{len(text)} characters is too short for block_size {block_size}")
    vocabulary = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.int64)
    starts = torch.arange(0, len(ids) - block_size - 1, max(1, block_size // 2))
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + block_size + 1] for s in starts.tolist()])
    train, test = _split(x, y, test_fraction, seed)
    return DataSplits(train, test, "language-model", (block_size,), len(vocabulary))


# Tokens checked against vocab_size when a token file is opened: a bounded prefix, so that opening a corpus
# larger than memory stays cheap (an id beyond the vocabulary later fails in the embedding, by name).
VOCAB_CHECK_TOKENS = 2**24


def load_tokens(
    train: str | Path,
    *,
    val: str | Path | None = None,
    block_size: int,
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DataSplits:
    """A token stream for a language model: random windows of ``block_size + 1`` token ids, memory-mapped.

    ``train`` (and ``val``) are ``.bin`` files of uint16 token ids, as nanoGPT's ``prepare.py`` writes them, or
    ``.npy`` arrays of integer ids. Without ``val`` the last ``val_fraction`` of ``train`` is held out.
    ``vocab_size`` defaults to the ``vocab_size`` of a ``meta.json`` beside ``train``. Training batches are
    drawn at random offsets (:class:`~provetrain.data.batches.RandomWindows`); the run needs ``steps``.
    """
    del seed  # the windows are drawn from the run's seed by the Trainer's batch source
    _check_count("block_size", block_size)
    train_path = _token_path("train", train)
    vocab_size = _vocab_size(vocab_size, train_path)
    if val is None:
        _check_fraction("val_fraction", val_fraction)
        length = _token_file("train", train_path, block_size).length
        cut = length - max(block_size + 1, round(length * val_fraction))
        train_tokens = _token_file("train", train_path, block_size, stop=max(cut, 0))
        val_tokens = _token_file("train", train_path, block_size, start=max(cut, 0))
    else:
        train_tokens = _token_file("train", train_path, block_size)
        val_tokens = _token_file("val", _token_path("val", val), block_size)
    for tokens in (train_tokens, val_tokens):
        largest = int(tokens.read()[:VOCAB_CHECK_TOKENS].max())
        if largest >= vocab_size:
            raise ArgumentError(
                "vocab_size",
                f"{tokens.path} holds token id {largest}, not below vocab_size {vocab_size}; give the tokenizer's "
                "vocabulary size",
            )
    return DataSplits(train_tokens, val_tokens, "language-model", (block_size,), vocab_size)


def _token_path(argument: str, value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ArgumentError(argument, f"{argument} must be a token file name (.bin or .npy), got {value!r}")
    return Path(value)


def _token_file(argument: str, path: Path, block_size: int, *, start: int = 0, stop: int | None = None) -> TokenFile:
    try:
        return TokenFile.open(path, block_size=block_size, start=start, stop=stop)
    except DataError as error:
        held_out = start > 0 or stop is not None
        what = " (what is left of train after holding out its tail for validation; give val)" if held_out else ""
        raise ArgumentError(argument, f"{error}{what}") from None


def _vocab_size(value: Any, train: Path) -> int:
    if value is not None:
        _check_count("vocab_size", value)
        return int(value)
    meta = train.parent / "meta.json"
    try:
        found = json.loads(meta.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        found = None
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ArgumentError("vocab_size", f"give vocab_size (no meta.json with a vocab_size beside {train})")
    return found


BUILTIN_DATA: Mapping[str, Callable[..., DataSplits]] = {
    "digits": load_digits,
    "arrays": load_arrays,
    "text": load_text,
    "tokens": load_tokens,
}


def load_data(spec: str, arguments: Mapping[str, Any] | None = None, *, seed: int = 0) -> DataSplits:
    """Resolve a data spec: a built-in name (``digits``, ``arrays``, ``text``, ``tokens``) or ``module:function``.

    A user function is called with ``arguments`` as keywords and returns a :class:`DataSplits`; a
    ``(train, test)`` pair of ``TensorDataset`` of ``(inputs, integer labels)`` for classification; or a
    training set (a ``Dataset``, ``IterableDataset`` or ``DataLoader`` of ``(input, target)`` pairs), alone or
    as a ``(train, test)`` pair (:func:`as_splits`: ``num_classes`` unknown, so the model must be the user's).
    """
    arguments = dict(arguments or {})
    if spec in BUILTIN_DATA:
        check_arguments(BUILTIN_DATA[spec], arguments, f"data {spec!r}", supplied=("seed",))
        return BUILTIN_DATA[spec](seed=seed, **arguments)
    result = call_user_function(spec, "data", arguments)
    if isinstance(result, DataSplits):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], TensorDataset):
        train, test = result
        for name, dataset in (("train", train), ("test", test)):
            _check_pair_part(spec, name, dataset)
        labels = train.tensors[1] if test is None else torch.cat([train.tensors[1], test.tensors[1]])
        return DataSplits(train, test, "classification", tuple(train.tensors[0].shape[1:]), int(labels.max()) + 1)
    if _is_data(result):
        result = (result, None)
    pair = isinstance(result, tuple) and len(result) == 2
    if pair and _is_data(result[0]) and (result[1] is None or _is_data(result[1])):
        try:
            return as_splits(result[0], result[1])
        except DataError as error:
            raise DataError(f"data function {spec!r}: {error}") from None
    raise TypeError(
        f"data function {spec!r} returned {type(result).__name__}; expected DataSplits, a Dataset, "
        "IterableDataset or DataLoader, or a (train, test) pair of them"
    )


def _is_data(value: Any) -> bool:
    if isinstance(value, DataLoader | IterableDataset | BatchSource):
        return True
    sequence = isinstance(value, str | bytes | tuple | list | dict)
    return hasattr(value, "__getitem__") and hasattr(value, "__len__") and not sequence


def as_splits(train: Any, test: Any | None = None) -> DataSplits:
    """:class:`DataSplits` for a training set and an optional held-out set of any kind, facts read from the
    first training example: ``language-model`` when inputs and targets are integer tensors of one shape,
    else ``classification``; ``num_classes`` is 0 (unknown) unless both are ``TensorDataset``.

    Raises:
        DataError: either set is empty or its items are not ``(input, target)`` pairs.
    """
    inputs, targets = first_batches(make_batch_source(train, 2), 1)[0]
    if test is not None and next(evaluation_batches(test, batch_size=2), None) is None:
        raise DataError("the held-out set is empty; pass None for no evaluation")
    integer = not (targets.dtype.is_floating_point or targets.dtype.is_complex)
    language = integer and not inputs.dtype.is_floating_point and inputs.ndim >= 2 and inputs.shape == targets.shape
    num_classes = 0
    if not language and integer and isinstance(train, TensorDataset) and isinstance(test, TensorDataset | None):
        labels = [d.tensors[1] for d in (train, test) if d is not None and len(d.tensors) == 2]
        num_classes = int(max(int(t.max()) for t in labels)) + 1
    task: Task = "language-model" if language else "classification"
    return DataSplits(train, test, task, tuple(inputs.shape[1:]), num_classes)


def _check_pair_part(spec: str, name: str, dataset: Any) -> None:
    where = f"data function {spec!r}: its {name} set"
    if dataset is None and name == "test":
        return
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
        raise TypeError(f"{where} is {type(dataset).__name__}; expected a TensorDataset of (inputs, labels)")
    inputs, labels = dataset.tensors
    if len(dataset) == 0 or inputs.ndim < 2:
        raise ValueError(f"{where} has inputs of shape {tuple(inputs.shape)}; expected (examples >= 1, features...)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool or labels.ndim != 1:
        raise ValueError(
            f"{where} has labels of dtype {labels.dtype} and shape {tuple(labels.shape)}; expected one "
            "integer class index per example"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= MAX_CLASSES:
        raise ValueError(f"{where} has labels outside [0, {MAX_CLASSES}); labels are class indices")


def resolve_function(spec: str, what: str) -> Callable[..., Any]:
    """Import ``module:function``; errors say which part is missing.

    Importing runs the module's code, as any Python entry point does: a config names only code you trust.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {spec!r} is neither a built-in nor of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({error})") from None
    except Exception as error:  # the module's own code failed while importing (a SyntaxError, a raise)
        raise ValueError(
            f"{what} {spec!r}: importing module {module_name!r} raised {type(error).__name__}: {error}"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"{what} {spec!r}: module {module_name!r} has no callable {attribute!r}")
    return function


def call_user_function(spec: str, what: str, arguments: Mapping[str, Any]) -> Any:
    """Call the user's ``module:function`` with ``arguments`` as keywords; whatever it raises becomes a
    ``ValueError`` naming the function (the original stays chained, for a debugger)."""
    function = resolve_function(spec, what)
    try:
        return function(**arguments)
    except Exception as error:
        raise ValueError(f"{what} function {spec!r} raised {type(error).__name__}: {error}") from error
