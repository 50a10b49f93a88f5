"""The Trainer on every kind of data: map-style datasets, an IterableDataset, a DataLoader with workers, a
token stream; exact resume for each; bad data refused before the run directory exists; random-batch eval."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from provetrain.data.batches import TokenFile, evaluation_batches
from provetrain.data.sources import DataSplits
from provetrain.errors import ConfigError
from provetrain.train.config import load_config
from provetrain.train.run import prepare_trainer
from provetrain.train.trainer import Trainer

VOCAB, BLOCK = 16, 8
SETTINGS = {"steps": 8, "batch_size": 8, "lr": 1e-2, "lr_max": None, "checkpoint_every": 4}


def examples(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 4, generator=g) + y[:, None].float(), y


class Pairs(Dataset):
    """Map-style, not a TensorDataset: items are (tensor, int)."""

    def __init__(self, n: int = 40, *, broken_at: int | None = None) -> None:
        self.x, self.y = examples(n)
        self.broken_at = broken_at

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.broken_at:
            raise ValueError(f"bad record {i}")
        return self.x[i], int(self.y[i])


class Stream(IterableDataset):
    """No __len__; an order seeded by the epoch, so it can be iterated again for a resume."""

    def __init__(self, n: int = 40) -> None:
        self.x, self.y = examples(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch)).tolist():
            yield self.x[i], self.y[i]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 3))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(VOCAB, 12), nn.Linear(12, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(tokens)))


def make_lm() -> nn.Module:
    """A ``module:function`` model for the token-stream config."""
    return TinyLM()


def tokens(directory: Path) -> DataSplits:
    corpus = (np.arange(3000) * 5 + np.arange(3000) // 7) % VOCAB
    corpus.astype(np.uint16).tofile(directory / "train.bin")
    corpus[:500].astype(np.uint16).tofile(directory / "val.bin")
    train, val = (TokenFile.open(directory / f"{n}.bin", block_size=BLOCK) for n in ("train", "val"))
    return DataSplits(train, val, "language-model", (BLOCK,), VOCAB)


x, y = examples()
held_out = TensorDataset(*examples(16))
# (training data, held-out data, model) for each kind, built afresh for every run
KINDS: dict[str, Callable[[Path], tuple[Any, Any, nn.Module]]] = {
    "TensorDataset": lambda d: (TensorDataset(x, y), held_out, mlp()),
    "map-style Dataset": lambda d: (Pairs(), Pairs(16), mlp()),
    "IterableDataset": lambda d: (Stream(), held_out, mlp()),
    "DataLoader, 2 workers": lambda d: (
        DataLoader(Pairs(), batch_size=8, shuffle=True, num_workers=2),
        DataLoader(Pairs(16), batch_size=8),
        mlp(),
    ),
    "token stream": lambda d: (tokens(d), None, TinyLM()),
}


def run(directory: Path, kind: str, name: str) -> tuple[Trainer, Any]:
    train, test, model = KINDS[kind](directory)
    trainer = Trainer(model, train, eval_data=test, output_dir=str(directory / name), **SETTINGS)
    return trainer, trainer.fit()


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_data_trains_and_resumes_bit_for_bit(tmp_path: Path, kind: str) -> None:
    """8 steps (5 batches per epoch: the resume at step 4 is mid-epoch, the run crosses an epoch end)
    equal 4 steps, a checkpoint, and 4 resumed steps: the weights bit for bit, the losses exactly."""
    full, result = run(tmp_path, kind, "full")
    assert result.applied_steps == 8 and result.evaluation is not None
    train, test, model = KINDS[kind](tmp_path)
    resumed = Trainer(model, train, eval_data=test, output_dir=str(tmp_path / "resumed"), **SETTINGS)
    resumed.fit(resume_from=tmp_path / "full" / "checkpoints" / "step-4")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    losses = [_losses(tmp_path / run_name) for run_name in ("full", "resumed")]
    assert losses[1] == {s: v for s, v in losses[0].items() if s >= 4} and len(losses[1]) == 4


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


class ShortLastBatch(IterableDataset):
    """17 examples, no __len__: batches of 8 are 8, 8 and 1, known only when the last one comes."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(*examples(17), strict=True)


def _short_last_batch_on_two_ranks(rank: int, directory: Path) -> dict[str, Any]:
    from provetrain.data.batches import DataError

    trainer = Trainer(mlp(), ShortLastBatch(), output_dir=str(directory / "run"), **(SETTINGS | {"steps": 4}))
    try:
        trainer.fit()
    except DataError as error:
        return {"error": str(error), "applied": trainer.applied_steps}
    return {"skipped": trainer.skips.total}


def test_a_batch_too_small_to_share_between_ranks_is_refused_on_every_rank(tmp_path: Path) -> None:
    """The epoch's last batch of 1 example would leave rank 1 no example: a NaN loss, a step silently skipped
    at every epoch's end (and a misleading 'loss is not finite' under on_nonfinite: raise). Both ranks stop at
    it with the reason, after the 2 steps before it."""
    from .test_distributed import on_two_ranks

    for result in on_two_ranks(_short_last_batch_on_two_ranks, tmp_path):
        assert "a training batch of 1 example is shared by 2 processes" in result.get("error", str(result))
        assert result["applied"] == 2


def test_the_checkpoint_holds_the_data_position(tmp_path: Path) -> None:
    run(tmp_path, "IterableDataset", "run")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["data"] == {"kind": "iterable", "epoch": 0, "batch": 4}


def test_a_crash_in_a_dataloader_worker_surfaces_with_its_message(tmp_path: Path) -> None:
    loader = DataLoader(Pairs(broken_at=13), batch_size=8, shuffle=False, num_workers=2)
    trainer = Trainer(mlp(), loader, output_dir=str(tmp_path / "run"), **SETTINGS)
    with pytest.raises(ValueError, match=r"(?s)DataLoader worker process.*bad record 13"):
        trainer.fit()


BAD_DATA: list[tuple[str, Callable[[], Any], str, str]] = [
    ("empty", lambda: TensorDataset(torch.zeros(0, 4), torch.zeros(0)), "data", "the training set is empty"),
    ("not pairs", lambda: [(torch.zeros(4), 0, 1)] * 3, "data", r"item 0 gives a tuple of 3 elements"),
    ("no length, no steps", Stream, "steps", "epochs cannot be counted: the training data \\(Stream\\) has no length"),
    ("empty held-out set", lambda: (TensorDataset(x, y), Pairs(0)), "data", "the held-out set is empty"),
]


@pytest.mark.parametrize(("case", "make", "key", "message"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_refused_before_the_run_directory_exists(
    tmp_path: Path, case: str, make: Callable[[], Any], key: str, message: str
) -> None:
    data = make()
    train, test = data if isinstance(data, tuple) else (data, None)
    settings = {k: v for k, v in SETTINGS.items() if k != "steps" or case != "no length, no steps"}
    with pytest.raises(ConfigError, match=message) as caught:
        Trainer(mlp(), train, eval_data=test, output_dir=str(tmp_path / "run"), **settings).fit()
    assert caught.value.key == key and not (tmp_path / "run").exists()


def test_a_loader_of_non_pairs_fails_at_the_first_batch_before_the_run_directory(tmp_path: Path) -> None:
    loader = DataLoader([{"x": torch.zeros(4), "y": 0}] * 8, batch_size=4)
    with pytest.raises(ValueError, match=r"DataLoader\)'s batch gives a dict with keys \['x', 'y'\]"):
        Trainer(mlp(), loader, output_dir=str(tmp_path / "run"), **SETTINGS).fit()
    assert not (tmp_path / "run").exists()


class CountingEval(nn.Module):
    """The MLP, counting its eval-mode forwards and the examples they saw."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.forwards = mlp(), 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.forwards += 0 if self.training else 1
        return self.net(inputs)


@pytest.mark.parametrize("eval_batches", [None, 3])
def test_evaluation_is_the_mean_loss_over_the_held_out_batches(tmp_path: Path, eval_batches: int | None) -> None:
    model = CountingEval()
    held = TensorDataset(*examples(100))
    trainer = Trainer(model, TensorDataset(x, y), eval_data=held, output_dir=str(tmp_path / "run"), eval_every=4,
                      eval_batches=eval_batches, **SETTINGS)  # fmt: skip
    result = trainer.fit()
    batches = list(evaluation_batches(held, batch_size=8, count=eval_batches, seed=0))
    assert model.forwards == 1 + 2 * len(batches)  # preflight, then two evaluations (step 3, the end)
    assert len(batches) == (1 if eval_batches is None else 3)  # the whole set is one chunk of <= 1024
    model.eval()
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(model(a), b)) * len(a) for a, b in batches) / sum(
            len(a) for a, _ in batches
        )
    assert result.evaluation is not None and result.evaluation["loss"] == pytest.approx(expected, rel=1e-12)


def test_eval_batches_is_a_config_key() -> None:
    with pytest.raises(ConfigError, match="eval_batches"):
        Trainer(mlp(), TensorDataset(x, y), eval_batches=0)


def test_a_token_stream_config_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        f"data: tokens\ndata_args:\n  train: {tmp_path}/train.bin\n  val: {tmp_path}/val.bin\n  block_size: {BLOCK}\n"
        f"  vocab_size: {VOCAB}\nmodel: {__name__}:make_lm\nsteps: 3\nbatch_size: 4\neval_batches: 2\nlr_max: null\n"
        f"output_dir: {tmp_path}/run\n"
    )
    result = prepare_trainer(load_config(tmp_path / "cfg.yaml")).fit()
    assert result.applied_steps == 3 and result.evaluation is not None


@pytest.mark.parametrize(
    ("data_args", "key", "line", "message"),
    [
        ("  train: {d}/none.bin\n  block_size: 8\n  vocab_size: 16\n", "data_args.train", 3, "none.bin does not exist"),
        (
            "  train: {d}/train.bin\n  block_size: 5000\n  vocab_size: 16\n",
            "data_args.train",
            3,
            "too few for block_size",
        ),
        ("  train: {d}/train.bin\n  vocab_size: 16\n", "data_args.block_size", 2, "needs the argument 'block_size'"),
        (
            "  train: {d}/train.bin\n  block_size: 8\n  vocab_size: 4\n",
            "data_args.vocab_size",
            5,
            "not below vocab_size 4",
        ),
    ],
)
def test_a_bad_token_stream_config_is_located_before_the_run_directory(
    tmp_path: Path, data_args: str, key: str, line: int, message: str
) -> None:
    tokens(tmp_path)
    (tmp_path / "cfg.yaml").write_text(
        f"data: tokens\ndata_args:\n{data_args.format(d=tmp_path)}model: {__name__}:make_lm\nsteps: 3\n"
        f"output_dir: {tmp_path}/run\n"
    )
    with pytest.raises(ConfigError, match=message) as caught:
        prepare_trainer(load_config(tmp_path / "cfg.yaml"))
    assert (caught.value.key, caught.value.line) == (key, line)
    assert not (tmp_path / "run").exists()
