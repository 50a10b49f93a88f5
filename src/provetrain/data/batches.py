"""Batch sources: where the Trainer's training batches come from, one call at a time, resumable exactly.

A :class:`BatchSource` hands out the next global batch ``(inputs, targets)`` on each
:meth:`~BatchSource.next_batch` call and describes its position with a JSON-able
:meth:`~BatchSource.state_dict` (no pickle), so that a run resumed from a checkpoint draws exactly the
batches the uninterrupted run would have drawn. :func:`make_batch_source` picks the implementation:

- :class:`MapBatches`: any map-style ``Dataset``. The permutation of epoch ``e`` is drawn **once**, when the
  epoch starts, from a generator seeded with ``seed * 1_000_003 + e``; batch ``b`` of the epoch is its slice
  ``[b * batch_size, (b + 1) * batch_size)`` (the last one smaller). State: ``(epoch, batch)``; the
  permutation is a function of the epoch, so it is redrawn, not stored. A ``TensorDataset`` is indexed with
  the whole index tensor at once (fast path); any other dataset is read item by item and collated.
- :class:`IterableBatches`: an ``IterableDataset``, ``batch_size`` consecutive items per batch; when it is
  exhausted the next epoch starts (``set_epoch(e)`` is called first when the dataset has it). Resume
  re-iterates the epoch and skips the items already consumed, so the dataset must yield the same items in
  the same order when iterated again for the same epoch (seed its own randomness, e.g. from ``set_epoch``).
- :class:`LoaderBatches`: a ``DataLoader`` the user built (workers, pinned memory, their own sampler and
  batch size). Each epoch's iterator is created under a forked global RNG seeded from ``(seed, epoch)``, so
  the sampler's shuffle and the workers' seeds depend only on the seed and the epoch; a generator of the
  loader or its sampler is saved at the start of each epoch and restored on resume. Resume re-creates the
  epoch's iterator and *loads and discards* the batches already consumed in that epoch: the cost is that
  of reading those batches once more (at most one epoch's worth).
- :class:`RandomWindows`: a token stream (:class:`TokenFile`, a memory-mapped ``.bin``/``.npy`` of token
  ids): each batch is ``batch_size`` windows of ``block_size + 1`` tokens at uniform random offsets, as
  nanoGPT's ``get_batch`` draws them; ``inputs`` the first ``block_size`` tokens, ``targets`` the last. Only
  the windows are read, so the corpus may be larger than memory. State: its ``torch.Generator``'s state.

:func:`evaluation_batches` gives the held-out batches: the whole held-out set by default, or
``eval_batches`` random batches drawn by a generator seeded from the run's seed (the same batches at every
evaluation, so evaluations are comparable and a resumed run evaluates on the same ones).
"""

from __future__ import annotations

import base64
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

__all__ = [
    "BatchSource",
    "DataError",
    "IterableBatches",
    "LoaderBatches",
    "MapBatches",
    "RandomWindows",
    "TokenFile",
    "evaluation_batches",
    "first_batches",
    "make_batch_source",
]

Batch = tuple[Tensor, Tensor]
# The Trainer's historical per-epoch seeds (seed * 1_000_003 + epoch): kept, so a map-style dataset gives the
# same batches as before and a checkpoint from before batch sources resumes onto the same data.
EPOCH_SEED_STRIDE = 1_000_003
# The evaluation generator's seed is seed + this: a stream of its own, never one a training epoch uses for
# any seed the config accepts (at most 2**32 - 1).
EVAL_SEED_OFFSET = 2**62
# Whole-set evaluation of a TensorDataset runs in chunks of this many examples (other sources: batch_size).
EVAL_CHUNK = 1024


class DataError(ValueError):
    """Data that cannot be trained on (empty, items that are not ``(input, target)`` pairs, a token file
    too short for ``block_size``); the message names the data and what is wrong."""


@runtime_checkable
class BatchSource(Protocol):
    """Hands out global training batches in order; its state says exactly where it is.

    Attributes:
        batches_per_epoch: batches in one pass over the data, or None when that is unknown (an
            IterableDataset without ``__len__``) or meaningless (random windows): the run then needs ``steps``.
    """

    batches_per_epoch: int | None

    def next_batch(self) -> Batch:
        """The next global batch ``(inputs, targets)``, on the CPU (pinned where the loader pins)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The position, as JSON-able data: loading it into a fresh source continues the same sequence."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        ...


# ------------------------------------------------------------------------------------------------- helpers
def encode_generator(generator: torch.Generator) -> str:
    """A generator's state as base64 text (JSON-able, no pickle)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def decode_generator(text: str, generator: torch.Generator) -> None:
    """Set ``generator`` to a state from :func:`encode_generator`."""
    state = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8).copy()
    generator.set_state(torch.from_numpy(state))


def check_item(item: Any, where: str) -> None:
    """``item`` is an ``(input, target)`` pair (of anything ``default_collate`` stacks); else a DataError
    naming ``where`` and describing what it is."""
    if isinstance(item, tuple | list) and len(item) == 2:
        return
    if isinstance(item, dict):
        described = f"a dict with keys {sorted(map(str, item))}"
    elif isinstance(item, tuple | list):
        described = f"a {type(item).__name__} of {len(item)} elements"
    else:
        described = type(item).__name__
    raise DataError(f"{where} gives {described}; expected (input, target) pairs")


def as_pair(batch: Any, where: str) -> Batch:
    """A batch as ``(inputs, targets)`` tensors; a DataError naming ``where`` when it is not such a pair."""
    check_item(batch, where)
    inputs, targets = batch
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)):
        kinds = f"({type(inputs).__name__}, {type(targets).__name__})"
        raise DataError(f"{where} gives {kinds}; expected a pair of tensors (inputs, targets)")
    return inputs, targets


def collate(items: list[Any], where: str) -> Batch:
    """Items ``(input, target)`` stacked into one batch by torch's ``default_collate``."""
    check_item(items[0], where)
    try:
        return as_pair(default_collate(items), where)
    except (TypeError, RuntimeError) as error:
        raise DataError(f"{where}: its items cannot be stacked into a batch ({error})") from error


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")


# ---------------------------------------------------------------------------------------------- map-style
class MapBatches:
    """Shuffled batches of a map-style ``Dataset``: one permutation per epoch, drawn when the epoch starts."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, name: str = "the training set") -> None:
        _check_batch_size(batch_size)
        self.dataset, self.batch_size, self.seed, self.name = dataset, batch_size, seed, name
        self.examples = len(dataset)  # type: ignore[arg-type]
        if self.examples == 0:
            raise DataError(f"{name} is empty: a {type(dataset).__name__} of 0 examples")
        self.batches_per_epoch: int | None = math.ceil(self.examples / batch_size)
        self._tensors = _tensor_pair(dataset)
        if self._tensors is None:
            check_item(dataset[0], f"{name} (a {type(dataset).__name__}): item 0")
        self.epoch, self.batch = 0, 0
        self._order: tuple[int, Tensor] | None = None  # (epoch, its permutation)

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch ``epoch``: drawn on the first call for that epoch, then reused."""
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
            self._order = (epoch, torch.randperm(self.examples, generator=generator))
        return self._order[1]

    def next_batch(self) -> Batch:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        start = self.batch * self.batch_size
        indices = self.permutation(self.epoch)[start : start + self.batch_size]
        self.batch += 1
        return self.examples_at(indices)

    def examples_at(self, indices: Tensor) -> Batch:
        if self._tensors is not None:  # TensorDataset: one gather per tensor instead of one item at a time
            inputs, targets = self._tensors
            return inputs[indices], targets[indices]
        return collate([self.dataset[i] for i in indices.tolist()], self.name)

    def seek(self, step: int) -> None:
        """The position after ``step`` batches from the start (what a step-indexed checkpoint implies)."""
        assert self.batches_per_epoch is not None
        self.epoch, self.batch = divmod(step, self.batches_per_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "map", "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "map")
        self.epoch, self.batch = _count(state, "epoch"), _count(state, "batch")


def _tensor_pair(dataset: Any) -> tuple[Tensor, Tensor] | None:
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    return None


def _expect_kind(state: dict[str, Any], kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        found = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise DataError(f"the saved data position is for a {found!r} source, this run's data is a {kind!r} source")


def _count(state: dict[str, Any], key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"the saved data position has {key}={value!r}, not a count >= 0")
    return value


# ------------------------------------------------------------------------------------------------ iterable
class IterableBatches:
    """Batches of ``batch_size`` consecutive items of an ``IterableDataset``; a new pass when it ends."""

    def __init__(
        self, dataset: IterableDataset, batch_size: int, *, seed: int = 0, name: str = "the training set"
    ) -> None:
        _check_batch_size(batch_size)
        self.dataset, self.batch_size, self.seed, self.name = dataset, batch_size, seed, name
        try:
            self.batches_per_epoch: int | None = math.ceil(len(dataset) / batch_size)  # type: ignore[arg-type]
        except TypeError:  # no __len__: only steps can bound the run
            self.batches_per_epoch = None
        self.epoch, self.batch = 0, 0
        self._items: Iterator[Any] | None = None

    def _open(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        items = iter(self.dataset)
        consumed = self.batch * self.batch_size
        skipped = sum(1 for _ in itertools.islice(items, consumed))  # resume: re-read the consumed items
        # The last batch of a pass may be short: a position saved right after it counts a whole batch for
        # fewer items, and the pass is then exhausted (the next batch starts the next epoch).
        if skipped < consumed and skipped <= (self.batch - 1) * self.batch_size:
            raise DataError(
                f"{self.name} (an IterableDataset) yielded {skipped} items in epoch {self.epoch} on resume, "
                f"fewer than the {consumed} the checkpoint had consumed: it must yield the same items again"
            )
        return items

    def next_batch(self) -> Batch:
        if self._items is None:
            self._items = self._open()
        items = list(itertools.islice(self._items, self.batch_size))
        if not items:  # end of this pass: the next epoch starts
            if self.epoch == 0 and self.batch == 0:
                raise DataError(f"{self.name} (an IterableDataset) yielded no items")
            self.epoch, self.batch = self.epoch + 1, 0
            self._items = self._open()
            items = list(itertools.islice(self._items, self.batch_size))
            if not items:
                raise DataError(f"{self.name} (an IterableDataset) yielded no items in epoch {self.epoch}")
        self.batch += 1
        return collate(items, f"{self.name} (an IterableDataset)")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "iterable", "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "iterable")
        self.epoch, self.batch = _count(state, "epoch"), _count(state, "batch")
        self._items = None  # re-iterated on the next batch


# ------------------------------------------------------------------------------------------------- loader
def _loader_generators(loader: DataLoader) -> list[torch.Generator]:
    """The generators a DataLoader draws from instead of the global RNG: its own and its sampler's (once each)."""
    found = (loader.generator, getattr(loader.sampler, "generator", None))
    return list(dict.fromkeys(g for g in found if g is not None))


class LoaderBatches:
    """The batches of a user-built ``DataLoader``, as it makes them; a new epoch when it is exhausted."""

    def __init__(self, loader: DataLoader, *, seed: int = 0, name: str = "the training DataLoader") -> None:
        self.loader, self.seed, self.name = loader, seed, name
        try:
            self.batches_per_epoch: int | None = len(loader)
        except TypeError:  # an IterableDataset without __len__ inside
            self.batches_per_epoch = None
        if self.batches_per_epoch == 0:
            raise DataError(f"{name} makes no batches (len(loader) == 0)")
        self.epoch, self.batch = 0, 0
        self._generators = [g for g in (loader.generator, getattr(loader.sampler, "generator", None)) if g is not None]
        self._generator_states = [encode_generator(g) for g in self._generators]  # as the epoch starts
        self._batches: Iterator[Any] | None = None

    def _open(self) -> Iterator[Any]:
        """The iterator of the current epoch, positioned after its consumed batches."""
        self._batches = None  # the previous iterator's workers shut down when it is collected
        for generator, state in zip(self._generators, self._generator_states, strict=True):
            decode_generator(state, generator)
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        # Whatever the loader draws from the global RNG (RandomSampler's seed, the workers' base seed) comes
        # from (seed, epoch), not from where the training happens to have left the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
            batches = iter(self.loader)
            first = next(batches, None)  # a single-process sampler draws its seed on the first batch
        chained = batches if first is None else itertools.chain([first], batches)
        for index in range(self.batch):  # resume: load and drop this epoch's consumed batches
            if next(chained, None) is None:
                raise DataError(
                    f"{self.name} made {index} batches in epoch {self.epoch} on resume, fewer than the "
                    f"{self.batch} the checkpoint had consumed: it must make the same batches again"
                )
        return chained

    def next_batch(self) -> Batch:
        if self._batches is None:
            self._batches = self._open()
        batch = next(self._batches, None)
        if batch is None:  # end of the epoch: the next one starts, its generators saved as it starts
            if self.epoch == 0 and self.batch == 0:
                raise DataError(f"{self.name} made no batches")
            self.epoch, self.batch = self.epoch + 1, 0
            self._generator_states = [encode_generator(g) for g in self._generators]
            self._batches = self._open()
            batch = next(self._batches, None)
            if batch is None:
                raise DataError(f"{self.name} made no batches in epoch {self.epoch}")
        self.batch += 1
        return as_pair(batch, f"{self.name}'s batch")

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "loader", "epoch": self.epoch, "batch": self.batch, "generators": list(self._generator_states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "loader")
        generators = state.get("generators", [])
        if not isinstance(generators, list) or len(generators) != len(self._generators):
            raise DataError(
                f"the saved data position has {len(generators)} loader generator(s), this DataLoader has "
                f"{len(self._generators)}: resume with a DataLoader built the same way"
            )
        self.epoch, self.batch = _count(state, "epoch"), _count(state, "batch")
        self._generator_states = [str(s) for s in generators]
        self._batches = None  # re-created on the next batch


# ------------------------------------------------------------------------------------------ token streams
_BIN_DTYPE = np.dtype(np.uint16)  # nanoGPT's train.bin / val.bin: token ids as little-endian uint16


@dataclass(frozen=True)
class TokenFile:
    """Token ids in a file, read through a memory map: ``.bin`` (raw uint16, nanoGPT's format) or ``.npy``
    (any integer dtype). ``start``/``stop`` select a range of tokens (a held-out tail, for instance).

    Use :meth:`open` to validate it: every problem is a :class:`DataError` naming the file.
    """

    path: Path
    block_size: int
    start: int = 0
    stop: int | None = None

    @classmethod
    def open(cls, path: str | Path, *, block_size: int, start: int = 0, stop: int | None = None) -> TokenFile:
        """A validated token file: it exists, holds integer token ids, and more than ``block_size`` of them."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"token file {path} does not exist")
        tokens = cls(path, block_size, start, stop)
        array = tokens.read()
        if tokens.length < block_size + 1:
            raise DataError(
                f"{path}: {tokens.length} tokens, too few for block_size {block_size} (a window is "
                f"block_size + 1 = {block_size + 1} tokens); use a smaller block_size or a longer file"
            )
        del array
        return tokens

    def read(self) -> np.ndarray:
        """The tokens as a read-only memory map (nothing is read until indexed)."""
        if self.path.suffix == ".npy":
            try:
                array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as error:
                raise DataError(f"{self.path}: cannot read it as a .npy array ({error})") from None
            if array.dtype.kind not in "iu" or array.ndim != 1:
                raise DataError(
                    f"{self.path}: holds {array.dtype} of shape {array.shape}; expected a 1-d array of integer "
                    "token ids"
                )
        elif self.path.suffix == ".bin":
            size = self.path.stat().st_size
            if size % _BIN_DTYPE.itemsize:
                raise DataError(
                    f"{self.path}: {size} bytes is not a whole number of uint16 token ids (a .bin holds 2 bytes "
                    "per token, as nanoGPT writes it); for another dtype save a .npy"
                )
            if size == 0:
                raise DataError(f"{self.path}: the file is empty")
            array = np.memmap(self.path, dtype=_BIN_DTYPE, mode="r")
        else:
            raise DataError(f"{self.path}: unsupported token file type {self.path.suffix!r}; use .bin (uint16) or .npy")
        return array[self.start : self.stop]

    @property
    def length(self) -> int:
        return len(self.read())

    def windows(self, starts: Tensor) -> Batch:
        """``inputs[i] = tokens[s : s + block_size]``, ``targets[i] = tokens[s + 1 : s + block_size + 1]``."""
        # A fresh memmap per batch, as nanoGPT does: a long-lived one keeps every page it touched resident.
        tokens = self.read()
        span = self.block_size + 1
        windows = torch.from_numpy(np.stack([tokens[s : s + span].astype(np.int64) for s in starts.tolist()]))
        return windows[:, :-1], windows[:, 1:]


class RandomWindows:
    """``batch_size`` windows at uniform random offsets per batch (nanoGPT's ``get_batch``), from a seeded
    generator whose state is the source's state."""

    batches_per_epoch: int | None = None

    def __init__(self, tokens: TokenFile, batch_size: int, *, seed: int = 0) -> None:
        _check_batch_size(batch_size)
        self.tokens, self.batch_size = tokens, batch_size
        self.starts = tokens.length - tokens.block_size  # offsets 0 .. starts-1 leave room for the target
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> Batch:
        starts = torch.randint(self.starts, (self.batch_size,), generator=self.generator)
        return self.tokens.windows(starts)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "windows", "generator": encode_generator(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "windows")
        decode_generator(str(state.get("generator")), self.generator)


# ---------------------------------------------------------------------------------------------- factories
def make_batch_source(data: Any, batch_size: int, *, seed: int = 0, name: str = "the training set") -> BatchSource:
    """The batch source for ``data``: a BatchSource as is, or one built for a TokenFile, DataLoader,
    IterableDataset or map-style Dataset (checked in that order: an IterableDataset is also a Dataset)."""
    if isinstance(data, BatchSource):
        return data
    if isinstance(data, TokenFile):
        return RandomWindows(data, batch_size, seed=seed)
    if isinstance(data, DataLoader):
        return LoaderBatches(data, seed=seed, name=f"{name} (a DataLoader)")
    if isinstance(data, IterableDataset):
        return IterableBatches(data, batch_size, seed=seed, name=name)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return MapBatches(data, batch_size, seed=seed, name=name)
    raise DataError(
        f"{name} is of type {type(data).__name__}; expected a torch Dataset, IterableDataset, DataLoader, a token "
        "file (data: tokens) or a BatchSource"
    )


def first_batches(source: BatchSource, count: int) -> list[Batch]:
    """The next ``count`` batches of ``source``, which is left where it was (its state is put back)."""
    saved = source.state_dict()
    try:
        return [source.next_batch() for _ in range(count)]
    finally:
        source.load_state_dict(saved)


def evaluation_batches(data: Any, *, batch_size: int, count: int | None = None, seed: int = 0) -> Iterator[Batch]:
    """The held-out batches: the whole set (``count`` None), or ``count`` random batches of ``batch_size``.

    Random batches come from a generator seeded with ``seed + EVAL_SEED_OFFSET`` at every call: the same
    batches every evaluation. A map-style set draws ``batch_size`` indices per batch (with replacement across
    batches, as nanoGPT's ``estimate_loss`` does), a token file random windows; an IterableDataset or a
    DataLoader, which cannot be indexed, gives its first ``count`` batches (a DataLoader's shuffle seeded as
    above).
    """
    generator = torch.Generator().manual_seed(seed + EVAL_SEED_OFFSET)
    name = "the held-out set"
    if isinstance(data, TokenFile):
        if count is None:  # consecutive non-overlapping windows cover the file
            starts = torch.arange(0, data.length - data.block_size, data.block_size)
            for chunk in starts.split(batch_size):
                yield data.windows(chunk)
        else:
            windows = RandomWindows(data, batch_size)
            windows.generator = generator
            for _ in range(count):
                yield windows.next_batch()
        return
    if isinstance(data, DataLoader | IterableDataset):
        limit = math.inf if count is None else count
        # A loader's own generators (its sampler's shuffle, its workers' base seed) are beyond the global
        # RNG's reach: seeded from the run's seed as well for the evaluation, and put back after it.
        own = _loader_generators(data) if isinstance(data, DataLoader) else []
        saved = [g.get_state() for g in own]
        try:
            for g in own:
                g.manual_seed(seed + EVAL_SEED_OFFSET)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + EVAL_SEED_OFFSET)
                batches: Iterator[Any] = iter(data)
                first = next(batches, None)
            if isinstance(data, DataLoader):
                batches = batches if first is None else itertools.chain([first], batches)
                for index, batch in enumerate(batches):
                    if index >= limit:
                        return
                    yield as_pair(batch, f"{name}'s batch")
                return
            items = batches if first is None else itertools.chain([first], batches)
            produced = 0
            while produced < limit and (chunk := list(itertools.islice(items, batch_size))):
                produced += 1
                yield collate(chunk, f"{name} (an IterableDataset)")
            return
        finally:
            for g, state in zip(own, saved, strict=True):
                g.set_state(state)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise DataError(f"{name} is of type {type(data).__name__}; expected a torch Dataset, DataLoader or token file")
    examples = len(data)
    if examples == 0:
        raise DataError(f"{name} is empty: a {type(data).__name__} of 0 examples; pass None for no evaluation")
    reader = MapBatches(data, batch_size, seed=seed, name=name)
    if count is not None:
        for _ in range(count):
            yield reader.examples_at(torch.randint(examples, (batch_size,), generator=generator))
        return
    chunk_size = EVAL_CHUNK if reader._tensors is not None else batch_size
    for start in range(0, examples, chunk_size):
        yield reader.examples_at(torch.arange(start, min(start + chunk_size, examples)))
