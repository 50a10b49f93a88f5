"""Gradient accumulation under ``strategy: fsdp`` (issue 12 item 2 with issue 15): the inner micro-steps
run without FSDP2's gradient sync, so each optimizer step reduce-scatters once, as DDP's ``no_sync``; the
result equals one process's on the same global batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from provetrain.data.sources import DataSplits
from provetrain.train.trainer import Trainer
from tests.distributed._ranks import run_ranks


class Blocks(nn.Module):
    """Two blocks in a ModuleList (each its own FSDP2 unit, as a transformer's layers) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(8, 12), nn.Linear(12, 12)])
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def regression(n: int = 192) -> DataSplits:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * y[:, None].float()
    return DataSplits(TensorDataset(x, y), None, "classification", (8,), 2)


def _train(directory: Path, name: str, **settings: Any) -> Trainer:
    trainer = Trainer(Blocks(), regression(), steps=3, output_dir=str(directory / name), **settings)
    trainer.fit()
    return trainer


def _full_weights(trainer: Trainer) -> list[torch.Tensor]:
    return [getattr(p, "full_tensor", lambda p=p: p)().detach().clone() for p in trainer.model.parameters()]


def _accumulate_under_fsdp(rank: int, directory: Path) -> dict[str, Any]:
    calls: list[int] = []
    real = dist.reduce_scatter_single

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    dist.reduce_scatter_single = counting  # FSDP2's gradient reduction (torch 2.13: dist.reduce_scatter_single)
    try:
        whole = _train(directory, "whole", strategy="fsdp", batch_size=48)
        per_step = len(calls)
        accumulated = _train(directory, "accumulated", strategy="fsdp", batch_size=12, gradient_accumulation_steps=4)
    finally:
        dist.reduce_scatter_single = real
    return {
        "whole_reductions": per_step,
        "accumulated_reductions": len(calls) - per_step,
        "weights": _full_weights(accumulated),
        "whole_weights": _full_weights(whole),
    }


def test_fsdp_accumulation_reduce_scatters_once_per_step_and_equals_one_process(tmp_path: Path) -> None:
    results, codes = run_ranks(_accumulate_under_fsdp, tmp_path)
    assert codes == [0, 0] and all("error" not in r for r in results), results
    first, second = results
    # 3 optimizer steps of 4 micro-steps reduce as often as 3 steps of one micro-step: once per step.
    assert first["whole_reductions"] > 0
    assert first["accumulated_reductions"] == first["whole_reductions"] == second["accumulated_reductions"]
    single = _train(tmp_path, "one", batch_size=12, gradient_accumulation_steps=4)
    for x, y, z, w in zip(
        first["weights"], second["weights"], _full_weights(single), first["whole_weights"], strict=True
    ):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-6)


def test_gradient_sync_turns_fsdp2s_sync_off_for_the_backward_and_on_after() -> None:
    """The unit behind the 2-rank test: the flag is off inside, on again after, and a plain module (one
    process) is left alone (DDP's no_sync is counted in tests/train/test_accumulation.py)."""
    from torch.distributed.fsdp import FSDPModule

    from provetrain.train.distributed import gradient_sync

    calls: list[bool] = []

    def record(self: nn.Module, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        calls.append(requires_gradient_sync)

    module = nn.Linear(2, 2)
    # As fully_shard does: the module's class becomes a subclass of FSDPModule (here without a process group).
    module.__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {"set_requires_gradient_sync": record})
    with gradient_sync(module, enabled=True):
        assert calls == []
    with gradient_sync(module, enabled=False):
        assert calls == [False]
    assert calls == [False, True]
    with gradient_sync(nn.Linear(2, 2), enabled=False):
        pass
