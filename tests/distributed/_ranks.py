"""Two gloo ranks on CPU for the FSDP2 tests, a tiny transformer, and a test-only optimizer on ops.sharded.

:func:`run_ranks` starts each rank as its own process (spawn), so that a test can kill one of them: it
returns each rank's result (or ``None`` for a rank that died) and its exit code; it never waits forever
(``join_s``), and kills what is left if a rank hangs.
"""

from __future__ import annotations

import math
import os
import pickle
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from provetrain.ops.adam import Adam, AdamW
from provetrain.train.distributed import World
from tests.train.test_distributed import free_port

WORLD = 2
VOCAB, WIDTH, FEEDFORWARD, LAYERS = 13, 8, 11, 2  # 13 and 11 rows: uneven shards; 8 and 24: even ones


def _rank_main(
    rank: int, world: int, worker: Callable[..., Any], port: int, directory: Path, timeout_s: float, args: tuple
) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # several processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        result = worker(rank, directory, *args)
    except Exception as error:  # the assertions run in the pytest process, on what each rank reports
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        (directory / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
        os._exit(0)  # the peer may be gone: no barrier, no teardown
    (directory / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    World.current().barrier()  # no collective in flight at exit (see provetrain.train.distributed._barrier)
    dist.destroy_process_group()


def run_ranks(
    worker: Callable[..., Any],
    directory: Path,
    *args: Any,
    world: int = WORLD,
    timeout_s: float = 60.0,
    join_s: float = 300.0,
) -> tuple[list[Any], list[int | None]]:
    """``worker(rank, directory, *args)`` on each rank of a gloo group; each rank's result and exit code."""
    directory.mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world, worker, port, directory, timeout_s, args))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(join_s)
    for process in processes:
        if process.is_alive():  # a hang is a failure of the test, never a hang of the suite
            process.kill()
            process.join()
    results = []
    for rank in range(world):
        path = directory / f"rank{rank}.pkl"
        results.append(pickle.loads(path.read_bytes()) if path.exists() else None)
    return results, [p.exitcode for p in processes]


class TinyLM(nn.Module):
    """Embedding, two post-norm transformer layers (no dropout), a head, a temperature: ~1,400 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, 2, FEEDFORWARD, dropout=0.0, batch_first=True) for _ in range(LAYERS)
        )
        self.head = nn.Linear(WIDTH, VOCAB)
        self.temperature = nn.Parameter(torch.ones(1))  # one row: rank 1's shard is empty

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x) * self.temperature


def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def shard(model: TinyLM) -> TinyLM:
    """FSDP2 as the Trainer applies it: each transformer layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def global_batch(step: int, rows: int = 4, length: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: the same on every rank and in the single-process run."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (rows, length + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_on(model: nn.Module, step: int, rows: slice) -> torch.Tensor:
    inputs, targets = global_batch(step)
    logits = model(inputs[rows])
    return F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten())


def rank_rows(rank: int, world: int = WORLD, rows: int = 4) -> slice:
    share = rows // world
    return slice(rank * share, (rank + 1) * share)


def sharded_adam(
    params: Iterable[torch.Tensor],
    *,
    lr: float,
    clip_value: float | None,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    on_nonfinite: str = "skip",
) -> Adam:
    """provetrain's Adam (AdamW when ``decoupled_weight_decay``) on FSDP2 parameters: its step routes DTensor
    parameters to :func:`provetrain.ops.sharded.sharded_adam_step_`."""
    cls = AdamW if decoupled_weight_decay else Adam
    return cls(params, lr=lr, clip_value=clip_value, weight_decay=weight_decay, on_nonfinite=on_nonfinite)


def full(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Every DTensor gathered whole (a collective), plain tensors as they are."""
    return [t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone() for t in tensors]


def finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


NAN = math.nan
