"""Batch sources: what each draws, that the epoch permutation is drawn once, that a saved position resumes
exactly, and the errors for data that cannot be used."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from provetrain.data.batches import (
    BatchSource,
    DataError,
    IterableBatches,
    LoaderBatches,
    MapBatches,
    RandomWindows,
    TokenFile,
    evaluation_batches,
    first_batches,
    make_batch_source,
)
from provetrain.data.sources import ArgumentError, as_splits, load_data


def tensors(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


class Pairs(Dataset):
    """A map-style dataset that is not a TensorDataset: item i is (tensor([i.0]), i)."""

    def __init__(self, n: int = 10) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i)]), i


class Stream(IterableDataset):
    """Items 0..n-1 in an order that depends on the epoch only (seeded by set_epoch)."""

    def __init__(self, n: int = 10) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        for i in order.tolist():
            yield torch.tensor([float(i)]), torch.tensor(i)


def write_tokens(path: Path, tokens: np.ndarray) -> Path:
    tokens.astype(np.uint16).tofile(path)
    return path


def labels(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    return batch[1].tolist()


# ---------------------------------------------------------------------------------------------- map-style
def test_permutation_is_drawn_once_per_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    randperm = torch.randperm

    def counting(n: int, **kwargs: Any) -> torch.Tensor:
        draws.append(n)
        return randperm(n, **kwargs)

    monkeypatch.setattr(torch, "randperm", counting)
    source = MapBatches(tensors(10), 3, seed=5)  # 4 batches per epoch, the last of 1
    epochs = [[labels(source.next_batch()) for _ in range(4)] for _ in range(3)]
    assert draws == [10, 10, 10]  # one permutation per epoch, not one per batch
    for batches in epochs:
        assert [len(b) for b in batches] == [3, 3, 3, 1]
        assert sorted(x for b in batches for x in b) == list(range(10))  # each example once per epoch
    assert epochs[0] != epochs[1]


def test_map_batches_are_the_step_indexed_batches_of_before() -> None:
    """The order is the former per-step draw's (seed * 1_000_003 + epoch), so old checkpoints resume onto it."""
    source = MapBatches(tensors(10), 4, seed=7)
    for step in range(9):
        epoch, index = divmod(step, 3)
        order = torch.randperm(10, generator=torch.Generator().manual_seed(7 * 1_000_003 + epoch))
        assert labels(source.next_batch()) == order[index * 4 : (index + 1) * 4].tolist()


def test_a_dataset_of_any_kind_gives_the_batches_a_tensordataset_gives() -> None:
    fast, generic = MapBatches(tensors(10), 4, seed=1), MapBatches(Pairs(10), 4, seed=1)
    for _ in range(6):
        (x, y), (gx, gy) = fast.next_batch(), generic.next_batch()
        assert torch.equal(x, gx) and torch.equal(y, gy)


# ------------------------------------------------------------------------------------ resume, every source
def loader(n: int = 10, **kwargs: Any) -> DataLoader:
    return DataLoader(Pairs(n), batch_size=3, shuffle=True, **kwargs)


SOURCES: dict[str, Callable[[Path], BatchSource]] = {
    "TensorDataset": lambda tmp: MapBatches(tensors(10), 3, seed=2),
    "Dataset": lambda tmp: MapBatches(Pairs(10), 3, seed=2),
    "IterableDataset": lambda tmp: IterableBatches(Stream(10), 3),
    "DataLoader": lambda tmp: LoaderBatches(loader(), seed=2),
    "DataLoader with its own generator": lambda tmp: LoaderBatches(
        loader(generator=torch.Generator().manual_seed(3)), seed=2
    ),
    "token stream": lambda tmp: RandomWindows(
        TokenFile.open(write_tokens(tmp / "t.bin", np.arange(100) % 50), block_size=4), 3, seed=2
    ),
}


@pytest.mark.parametrize("kind", list(SOURCES))
@pytest.mark.parametrize("drawn", [0, 2, 4, 5, 8, 9])
def test_a_saved_position_resumes_the_same_batches(tmp_path: Path, kind: str, drawn: int) -> None:
    """Draw ``drawn`` batches, save, draw 6 more; a fresh source loading the (JSON round-tripped) state
    draws the same 6, across epoch ends (4 batches per epoch, the last of 1 example: ``drawn`` 4 and 8 save
    right after a short last batch, at the epoch's end)."""
    source = SOURCES[kind](tmp_path)
    for _ in range(drawn):
        source.next_batch()
    state = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_batch() for _ in range(6)]
    torch.manual_seed(123)  # the global RNG differs at resume: the data must not depend on it
    resumed = SOURCES[kind](tmp_path)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch() for _ in range(6)], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("kind", list(SOURCES))
def test_first_batches_leave_the_source_where_it_was(tmp_path: Path, kind: str) -> None:
    source, twin = SOURCES[kind](tmp_path), SOURCES[kind](tmp_path)
    source.next_batch(), twin.next_batch()
    peeked = first_batches(source, 2)
    drawn = [source.next_batch() for _ in range(2)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(peeked, drawn, strict=True))
    assert all(torch.equal(a[1], twin.next_batch()[1]) for a in drawn)


def test_a_loader_epoch_is_seeded_by_the_run_not_by_the_global_rng() -> None:
    torch.manual_seed(0)
    first = labels(LoaderBatches(loader(), seed=4).next_batch())
    torch.manual_seed(1)
    again = labels(LoaderBatches(loader(), seed=4).next_batch())
    other = labels(LoaderBatches(loader(), seed=5).next_batch())
    assert first == again and first != other


@pytest.mark.parametrize("n", [1, 2])
def test_an_iterable_dataset_shorter_than_one_batch_resumes_after_each_batch(n: int) -> None:
    """Every batch is the whole (short) pass: a position saved after any of them resumes onto the next."""
    source = IterableBatches(Stream(n), 3)
    for _ in range(3):
        state = json.loads(json.dumps(source.state_dict()))
        expected = labels(source.next_batch())
        resumed = IterableBatches(Stream(n), 3)
        resumed.load_state_dict(state)
        assert labels(resumed.next_batch()) == expected and len(expected) == n
    assert source.state_dict() == {"kind": "iterable", "epoch": 2, "batch": 1}


def test_an_iterable_dataset_that_yields_fewer_items_on_resume_is_still_refused() -> None:
    """A pass that ends before the checkpoint's last batch began is a different dataset, not a short batch."""
    source = IterableBatches(Stream(7), 3)
    source.load_state_dict({"kind": "iterable", "epoch": 0, "batch": 4})  # 7 items make 3 batches, not 4
    with pytest.raises(DataError, match="yielded 7 items in epoch 0 on resume, fewer than the 12"):
        source.next_batch()


def test_an_iterable_dataset_starts_a_new_epoch_when_exhausted() -> None:
    source = IterableBatches(Stream(7), 3)
    assert source.batches_per_epoch is None  # no __len__: the run must give steps
    sizes = [len(source.next_batch()[1]) for _ in range(6)]
    assert sizes == [3, 3, 1, 3, 3, 1] and source.state_dict() == {"kind": "iterable", "epoch": 1, "batch": 3}


# ----------------------------------------------------------------------------------------- token streams
def test_random_windows_are_contiguous_and_shifted_by_one(tmp_path: Path) -> None:
    tokens = (np.arange(1000) * 7) % 501
    source = RandomWindows(TokenFile.open(write_tokens(tmp_path / "t.bin", tokens), block_size=16), 8, seed=0)
    for _ in range(20):
        x, y = source.next_batch()
        assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            start = int(np.flatnonzero(tokens == row[0])[0])  # the first token fixes the offset
            assert np.array_equal(row, tokens[start : start + 17])


def test_random_windows_reach_the_last_token(tmp_path: Path) -> None:
    source = RandomWindows(TokenFile.open(write_tokens(tmp_path / "t.bin", np.arange(12)), block_size=10), 64, seed=0)
    x, y = source.next_batch()
    assert set(x[:, 0].tolist()) == {0, 1} and y.max() == 11  # both offsets drawn, none past the end


def test_a_npy_token_file_of_any_integer_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", np.arange(50, dtype=np.int32))
    x, y = RandomWindows(TokenFile.open(tmp_path / "t.npy", block_size=5), 2, seed=0).next_batch()
    assert torch.equal(y - x, torch.ones_like(x))


BAD_TOKEN_FILES: list[tuple[str, Callable[[Path], Path], int, str]] = [
    ("missing", lambda d: d / "none.bin", 4, r"token file .*none\.bin does not exist"),
    ("empty", lambda d: _write(d / "t.bin", b""), 4, r"t\.bin: the file is empty"),
    ("odd bytes", lambda d: _write(d / "t.bin", b"abc"), 1, r"3 bytes is not a whole number of uint16 token ids"),
    ("floats", lambda d: _save(d / "t.npy", np.ones(20)), 4, r"holds float64 of shape \(20,\); expected a 1-d"),
    ("2-d", lambda d: _save(d / "t.npy", np.ones((4, 5), np.int64)), 2, r"shape \(4, 5\); expected a 1-d array"),
    ("too short", lambda d: write_tokens(d / "t.bin", np.arange(8)), 8, r"8 tokens, too few for block_size 8"),
    ("suffix", lambda d: _write(d / "t.txt", b"ab"), 1, r"unsupported token file type '\.txt'"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


@pytest.mark.parametrize(
    ("case", "make", "block_size", "message"), BAD_TOKEN_FILES, ids=[c[0] for c in BAD_TOKEN_FILES]
)
def test_bad_token_files_are_refused_by_name(
    tmp_path: Path, case: str, make: Callable[[Path], Path], block_size: int, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        TokenFile.open(make(tmp_path), block_size=block_size)


def test_load_tokens_holds_out_a_tail_and_reads_meta_json(tmp_path: Path) -> None:
    write_tokens(tmp_path / "train.bin", np.arange(200) % 60)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 60}))
    data = load_data("tokens", {"train": str(tmp_path / "train.bin"), "block_size": 8, "val_fraction": 0.25})
    assert (data.task, data.input_shape, data.num_classes) == ("language-model", (8,), 60)
    assert (data.train.length, data.test.length) == (150, 50)
    assert data.test.read()[0] == 150 % 60  # the tail, not a copy of the start


@pytest.mark.parametrize(
    ("arguments", "argument", "message"),
    [
        ({"train": "nope.bin", "vocab_size": 9}, "train", r"token file nope\.bin does not exist"),
        ({"train": "{d}/train.bin", "val": "{d}/v.bin", "vocab_size": 60}, "val", r"v\.bin does not exist"),
        ({"train": "{d}/train.bin", "block_size": 500, "vocab_size": 60}, "train", r"too few for block_size 500"),
        ({"train": "{d}/train.bin", "block_size": 0}, "block_size", r"block_size must be an integer >= 1, got 0"),
        ({"train": "{d}/train.bin"}, "vocab_size", r"give vocab_size \(no meta\.json"),
        ({"train": "{d}/train.bin", "vocab_size": 50}, "vocab_size", r"holds token id 59, not below vocab_size 50"),
        (
            {"train": "{d}/train.bin", "vocab_size": 60, "val_fraction": 0.01, "block_size": 100},
            "train",
            r"99 tokens.*holding out",
        ),
    ],
)
def test_load_tokens_errors_name_the_argument(
    tmp_path: Path, arguments: dict[str, Any], argument: str, message: str
) -> None:
    write_tokens(tmp_path / "train.bin", np.arange(200) % 60)
    arguments = {"block_size": 8} | {k: v.format(d=tmp_path) if isinstance(v, str) else v for k, v in arguments.items()}
    with pytest.raises(ArgumentError, match=message) as caught:
        load_data("tokens", arguments)
    assert caught.value.argument == argument


# ------------------------------------------------------------------------------------------- evaluation
def test_whole_set_evaluation_covers_every_example_once() -> None:
    for data in (tensors(2500), Pairs(25), Stream(25), DataLoader(Pairs(25), batch_size=4)):
        seen = sorted(x for b in evaluation_batches(data, batch_size=4) for x in labels(b))
        assert seen == list(range(len(seen))) and len(seen) in (2500, 25)


def test_whole_set_evaluation_of_a_token_file_tiles_it(tmp_path: Path) -> None:
    tokens = TokenFile.open(write_tokens(tmp_path / "v.bin", np.arange(103)), block_size=10)
    batches = list(evaluation_batches(tokens, batch_size=4))
    inputs = torch.cat([x for x, _ in batches])
    assert inputs[:, 0].tolist() == list(range(0, 93, 10))  # non-overlapping windows up to the end


@pytest.mark.parametrize("kind", ["TensorDataset", "Dataset", "token stream"])
def test_eval_batches_are_random_and_the_same_at_every_evaluation(tmp_path: Path, kind: str) -> None:
    data = {"TensorDataset": tensors(1000), "Dataset": Pairs(1000)}.get(kind) or TokenFile.open(
        write_tokens(tmp_path / "v.bin", np.arange(1000)), block_size=4
    )
    draws = [[labels(b) for b in evaluation_batches(data, batch_size=8, count=3, seed=1)] for _ in range(2)]
    assert len(draws[0]) == 3 and all(len(b) == 8 for b in draws[0])
    assert draws[0] == draws[1]
    assert draws[0] != [labels(b) for b in evaluation_batches(data, batch_size=8, count=3, seed=2)]


@pytest.mark.parametrize("count", [None, 2])
def test_a_held_out_loader_with_a_generator_evaluates_the_same_batches(count: int | None) -> None:
    """A shuffling held-out DataLoader with its own generator drew a new order at every evaluation (the
    seeded global RNG does not reach it), so evaluations were on different batches, a resumed run's too.
    Its generator is seeded from the run's seed for the evaluation and left as it was after."""
    generator = torch.Generator().manual_seed(1)
    held_out = DataLoader(Pairs(20), batch_size=4, shuffle=True, generator=generator)
    before = generator.get_state()
    first = [labels(b) for b in evaluation_batches(held_out, batch_size=4, count=count)]
    again = [labels(b) for b in evaluation_batches(held_out, batch_size=4, count=count)]
    other_seed = [labels(b) for b in evaluation_batches(held_out, batch_size=4, count=count, seed=1)]
    assert first == again != other_seed and torch.equal(generator.get_state(), before)


# ------------------------------------------------------------------------------------------ bad datasets
class Triples(Pairs):
    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:  # type: ignore[override]
        return torch.tensor([float(i)]), i, i


class Dicts(Pairs):
    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        return {"x": torch.tensor([float(i)]), "y": i}


BAD_DATA: list[tuple[str, Any, str]] = [
    ("empty", TensorDataset(torch.zeros(0, 2), torch.zeros(0)), r"the training set is empty: a TensorDataset of 0"),
    ("triples", Triples(), r"item 0 gives a tuple of 3 elements; expected \(input, target\) pairs"),
    ("dicts", Dicts(), r"item 0 gives a dict with keys \['x', 'y'\]; expected \(input, target\) pairs"),
    (
        "a list of numbers",
        [1, 2, 3],
        r"the training set \(a list\): item 0 gives int; expected \(input, target\) pairs",
    ),
    ("an object", object(), r"the training set is of type object; expected a torch Dataset, IterableDataset"),
    ("empty loader", DataLoader(Pairs(0), batch_size=2), r"makes no batches \(len\(loader\) == 0\)"),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_training_data_is_refused_by_name(case: str, data: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make_batch_source(data, 4)


def test_a_loader_of_non_pairs_is_refused_at_its_first_batch() -> None:
    source = make_batch_source(DataLoader(Dicts(), batch_size=2), 2)
    with pytest.raises(DataError, match=re.escape("(a DataLoader)'s batch gives a dict with keys ['x', 'y']")):
        source.next_batch()


def test_as_splits_reads_the_task_from_the_first_example() -> None:
    lm = TensorDataset(torch.zeros(6, 5, dtype=torch.int64), torch.zeros(6, 5, dtype=torch.int64))
    assert as_splits(lm).task == "language-model"
    splits = as_splits(tensors(10), tensors(4))
    assert (splits.task, splits.input_shape, splits.num_classes) == ("classification", (1,), 10)
    assert (as_splits(Pairs(), Stream()).input_shape, as_splits(Pairs()).num_classes) == ((1,), 0)
    with pytest.raises(DataError, match="the held-out set is empty"):
        as_splits(tensors(10), Pairs(0))


def make_stream_and_loader(n: int = 10) -> tuple[IterableDataset, DataLoader]:
    """A user data function returning (IterableDataset, DataLoader)."""
    return Stream(n), DataLoader(Pairs(4), batch_size=2)


def make_triples() -> Dataset:
    return Triples()


def test_a_data_function_may_return_any_kind_of_dataset() -> None:
    data = load_data(f"{__name__}:make_stream_and_loader", {"n": 6})
    assert isinstance(data.train, Stream) and isinstance(data.test, DataLoader)
    assert (data.task, data.input_shape) == ("classification", (1,))
    with pytest.raises(DataError, match=r"data function '.*:make_triples': the training set \(a Triples\): item 0"):
        load_data(f"{__name__}:make_triples")
