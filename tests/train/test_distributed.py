"""Data-parallel runs under torch.distributed: 2 processes, gloo, CPU (``torch.multiprocessing.spawn``).

Each test spawns two ranks that run a worker function and save what it returns; the assertions run here,
in the pytest process, on what both ranks saved.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from provetrain.data.sources import DataSplits
from provetrain.errors import ConfigError, ContractViolation
from provetrain.ops.adam import AdamW
from provetrain.ops.clip import clip_grad_norm_
from provetrain.train.distributed import World, clip_grad_norm_distributed_
from provetrain.train.trainer import Callback, Trainer

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)

WORLD = 2
U = Fraction(1, 2**53)


# ------------------------------------------------------------------------------------------------ harness
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, worker: Callable[..., Any], port: int, directory: Path, args: tuple) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # two processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    result = worker(rank, directory, *args)
    (directory / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    World.current().barrier()  # no collective in flight at exit (see provetrain.train.distributed._barrier)
    dist.destroy_process_group()


def on_two_ranks(worker: Callable[..., Any], directory: Path, *args: Any) -> list[Any]:
    """``worker(rank, directory, *args)`` on ranks 0 and 1 of a gloo group; returns what each returned."""
    mp.spawn(_rank_main, args=(worker, free_port(), directory, args), nprocs=WORLD, join=True)
    return [pickle.loads((directory / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD)]


def blobs(n: int = 256, seed: int = 0, *, train: int | None = 200) -> DataSplits:
    """Two well-separated Gaussian classes in 8 dimensions: the first ``train`` examples for training, the
    rest held out (``train=None``: all for training, no held-out set)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 3.0 * y[:, None].float()
    if train is None:
        return DataSplits(TensorDataset(x, y), None, "classification", (8,), 2)
    held_out = TensorDataset(x[train:], y[train:])
    return DataSplits(TensorDataset(x[:train], y[:train]), held_out, "classification", (8,), 2)


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)


class NanForward(nn.Module):
    """An MLP whose output is NaN at one training call (NaN loss and NaN gradients on that rank)."""

    def __init__(self, bad_call: int | None) -> None:
        super().__init__()
        self.net = mlp()
        self.bad_call, self.calls = bad_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls - 1 == self.bad_call:
                return out * math.nan
        return out


class NanLoss:
    """Cross-entropy plus a NaN constant at one training call: a NaN loss whose gradients stay finite."""

    def __init__(self, bad_call: int | None) -> None:
        self.bad_call, self.calls = bad_call, 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(outputs, targets)
        if outputs.requires_grad:  # training, not evaluation
            self.calls += 1
            if self.calls - 1 == self.bad_call:
                return loss + math.nan
        return loss


class Recorder(Callback):
    """After each step: its metrics row, the weights, and whether this rank's gradients were finite."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.rows: list[dict[str, Any]] = []
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.grads_finite: dict[int, bool] = {}

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.rows.append(row)
        params = list(self.model.parameters())
        self.weights[row["step"]] = [p.detach().clone() for p in params]
        self.grads_finite[row["step"]] = all(bool(torch.isfinite(p.grad).all()) for p in params)


def exact_sum_sq(tensors: Sequence[torch.Tensor]) -> Fraction:
    return sum((Fraction(v) ** 2 for t in tensors for v in t.double().reshape(-1).tolist()), Fraction(0))


def within_one_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` equals ``b`` or is an adjacent value of its dtype."""
    up, down = torch.nextafter(b, torch.full_like(b, math.inf)), torch.nextafter(b, torch.full_like(b, -math.inf))
    return bool(((a == b) | (a == up) | (a == down)).all())


# ------------------------------------------------------------------------ a NaN on one rank only
CASES = {  # name: (where rank 1 sees the NaN, policy)
    "nan-forward": ("forward", "skip"),
    "nan-loss": ("loss", "skip"),
    "nan-loss-rollback": ("loss", "rollback"),
}
BAD_CALL = 3


def _nan_on_rank_one(rank: int, directory: Path) -> dict[str, Any]:
    results = {}
    for name, (where, policy) in CASES.items():
        bad = BAD_CALL if rank == 1 else None
        model = NanForward(bad if where == "forward" else None)
        recorder = Recorder(model)
        result = Trainer(
            model,
            blobs(),
            loss_fn=NanLoss(bad if where == "loss" else None),
            callbacks=[recorder],
            steps=6,
            batch_size=32,
            lr=1e-2,
            lr_max=None,
            log_every=2,
            on_nonfinite=policy,
            output_dir=str(directory / name),
        ).fit()
        results[name] = {
            "counts": (result.applied_steps, result.skipped_steps, result.rollbacks),
            "rows": repr(recorder.rows),  # repr: NaN != NaN, and repr shows every bit of a float
            "weights": recorder.weights,
            "grads_finite": recorder.grads_finite,
        }
    return results


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_weights_stay_identical(tmp_path: Path) -> None:
    ranks = on_two_ranks(_nan_on_rank_one, tmp_path)
    for name, (_, policy) in CASES.items():
        first, second = ranks[0][name], ranks[1][name]
        # applied, skipped, rollbacks (the rollback returns to the snapshot after 2 applied steps)
        assert first["counts"] == second["counts"] == ((5, 1, 0) if policy == "skip" else (4, 1, 1)), name
        for step in range(6):  # the same bits on both ranks after every step
            assert all(torch.equal(a, b) for a, b in zip(first["weights"][step], second["weights"][step], strict=True))
        if policy == "skip":  # the bad step changed nothing, on either rank
            before, after = first["weights"][BAD_CALL - 1], first["weights"][BAD_CALL]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), name
        assert first["rows"] == second["rows"], name  # the same losses, norms and actions, bit for bit
        logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["loss"], r["skipped"]) for r in logged if r.get("skipped")] == [(BAD_CALL, "nan", True)]
    # A NaN loss with finite gradients is not spread by DDP's gradient all-reduce: only the reduced loss skips it.
    assert ranks[1]["nan-loss"]["grads_finite"][BAD_CALL] and ranks[0]["nan-loss"]["grads_finite"][BAD_CALL]
    assert not ranks[0]["nan-forward"]["grads_finite"][BAD_CALL]  # a NaN gradient is spread to every rank
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(CASES)


# ------------------------------------------------------------------------ the global-norm clip under DDP
CLIP = 0.05


def _full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = blobs().train.tensors
    return data[0][:64].double(), data[1][:64]


def _ddp_gradients(rank: int, directory: Path) -> dict[str, Any]:
    model = mlp(torch.float64)
    inputs, targets = _full_batch()
    share = torch.tensor_split(torch.arange(len(inputs)), WORLD)[rank]
    ddp = DistributedDataParallel(model)  # kept alive until after backward: its reducer averages the gradients
    F.cross_entropy(ddp(inputs[share]), targets[share]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer = AdamW(model.parameters(), lr=1e-3, clip_value=CLIP)
    optimizer.step()
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    norm = clip_grad_norm_(params, CLIP)
    return {
        "norm": norm,
        "clipped": [p.grad for p in params],
        "adam_norms": (optimizer.last_grad_norm, optimizer.last_clipped_grad_norm),
    }


def test_ddp_clip_uses_the_global_norm_of_the_full_batch_gradient(tmp_path: Path) -> None:
    ranks = on_two_ranks(_ddp_gradients, tmp_path)
    model = mlp(torch.float64)
    F.cross_entropy(model(_full_batch()[0]), _full_batch()[1]).backward()
    reference = clip_grad_norm_(model.parameters(), CLIP)
    assert reference > 10 * CLIP  # the clip is active
    for rank in ranks:  # float64 gradients: the DDP average differs from one process by summation order only
        assert torch.equal(rank["norm"], ranks[0]["norm"])
        assert abs(rank["norm"] - reference) <= 1e-14 * reference
        assert abs(rank["adam_norms"][0] - reference) <= 1e-14 * reference
        assert rank["adam_norms"][1] <= CLIP
        for got, want in zip(rank["clipped"], (p.grad for p in model.parameters()), strict=True):
            assert torch.allclose(got, want, rtol=0, atol=1e-14 * CLIP)
        assert exact_sum_sq(rank["clipped"]) <= Fraction(CLIP) ** 2
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["clipped"], ranks[1]["clipped"], strict=True))


# ------------------------------------------------------------------------ sharded gradients
SHARDED = {  # name: (dtype, lengths of rank 0's parts, of rank 1's parts, scale of rank 0, of rank 1, max_norm)
    "float32 clipped": (torch.float32, (300, 1), (257, 64), 1.0, 1.0, 0.5),
    "float32 untouched": (torch.float32, (300, 1), (257, 64), 1.0, 1.0, 1e6),
    "float32 zeros on one rank": (torch.float32, (100,), (50,), 1.0, 0.0, 0.5),
    "float64 far apart": (torch.float64, (200,), (3, 100), 1e250, 1e-250, 1e249),
    "float64 far apart, larger on rank 1": (torch.float64, (200,), (3, 100), 1e-250, 1e250, 1e249),
    "float64 tiny": (torch.float64, (200,), (3, 100), 1e-300, 1e-310, 1e-301),
}


def _sharded_vector(case: str) -> list[torch.Tensor]:
    """The parts of one gradient vector, rank 0's first, drawn the same way on every rank."""
    dtype, first, second, scale0, scale1, _ = SHARDED[case]
    g = torch.Generator().manual_seed(len(case))
    return [torch.randn(n, generator=g, dtype=torch.float64).mul(s).to(dtype) for n, s in
            [(n, scale0) for n in first] + [(n, scale1) for n in second]]  # fmt: skip


def _clip_sharded(rank: int, directory: Path) -> dict[str, Any]:
    results = {}
    for case, (_, first, _, _, _, max_norm) in SHARDED.items():
        parts = _sharded_vector(case)
        mine = parts[: len(first)] if rank == 0 else parts[len(first) :]
        norm = clip_grad_norm_distributed_(mine, max_norm)
        results[case] = (norm, mine)
    poisoned = [torch.tensor([1.0, math.nan if rank == 1 else 2.0])]
    with pytest.raises(ContractViolation) as caught:
        clip_grad_norm_distributed_(poisoned, 0.5)
    results["nonfinite"] = (str(caught.value), poisoned)
    return results


def test_distributed_clip_of_sharded_gradients_equals_the_single_process_clip(tmp_path: Path) -> None:
    ranks = on_two_ranks(_clip_sharded, tmp_path)
    (error, untouched), (same_error, _) = ranks[0]["nonfinite"], ranks[1]["nonfinite"]
    assert error == same_error and "`gradients.iter().all(|g| g.is_finite())` violated" in error
    assert "nonfinite_by_rank={1: 1}" in error and torch.equal(untouched[0], torch.tensor([1.0, 2.0]))
    for case, (_, _, _, _, _, max_norm) in SHARDED.items():
        full = torch.cat(_sharded_vector(case))
        param = nn.Parameter(torch.zeros_like(full))
        param.grad = full.clone()
        reference = clip_grad_norm_([param], max_norm)
        (norm0, mine0), (norm1, mine1) = ranks[0][case], ranks[1][case]
        clipped = torch.cat(mine0 + mine1)
        assert torch.equal(norm0, norm1), case
        n = full.numel()
        assert abs(Fraction(norm0.item()) - Fraction(reference.item())) <= 2 * (n + 4) * U * Fraction(reference.item())
        assert exact_sum_sq([clipped]) <= Fraction(max_norm) ** 2, case  # the bound, exactly
        assert within_one_rounding(clipped, param.grad), case  # the same clip up to summation order
        if reference <= max_norm / 2:
            assert torch.equal(clipped, full), case  # untouched below the threshold, bit for bit


def _clip_fsdp2(rank: int, directory: Path) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))  # 5 and 3 rows: uneven shards
    fully_shard(model)
    inputs = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank))
    model(inputs).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    full = [g.full_tensor() for g in grads]
    norm = clip_grad_norm_distributed_(grads, 0.5)
    with pytest.raises(TypeError, match=r"parameter '0.weight' is a DTensor"):  # the Trainer steps DDP only
        Trainer(model, blobs(), steps=1, lr_max=None, output_dir=str(directory / "never")).fit()
    return {"norm": norm, "before": full, "after": [g.full_tensor() for g in grads]}


def test_distributed_clip_of_fsdp2_dtensor_gradients_equals_the_single_process_clip(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch build")
    ranks = on_two_ranks(_clip_fsdp2, tmp_path)
    first, second = ranks
    assert torch.equal(first["norm"], second["norm"])
    assert not (tmp_path / "never").exists()
    params = [nn.Parameter(torch.zeros_like(g)) for g in first["before"]]
    for p, g in zip(params, first["before"], strict=True):
        p.grad = g.clone()
    reference = clip_grad_norm_(params, 0.5)
    assert reference > 1.0
    n = sum(p.numel() for p in params)
    assert abs(Fraction(first["norm"].item()) - Fraction(reference.item())) <= 2 * (n + 4) * U * Fraction(
        reference.item()
    )
    assert exact_sum_sq(first["after"]) <= Fraction(0.5) ** 2
    for got, want in zip(first["after"], params, strict=True):
        assert within_one_rounding(got, want.grad)


# ------------------------------------------------------------------------ outputs from rank 0 only
# 33 examples a batch: shares of 17 and 16, and a last batch of the epoch (step 6) of 2, one per rank.
RUN = {"steps": 8, "batch_size": 33, "lr": 1e-2, "lr_max": "auto", "checkpoint_every": 4, "eval_every": 4}


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _raise_a_violation() -> None:
    raise ContractViolation("loss_decrease", "loss.is_finite()", kind="postcondition", step=7, hint="on rank 0")


def _two_rank_run(rank: int, directory: Path) -> dict[str, Any]:
    errors = []
    for attempt in (
        lambda: Trainer(mlp(), blobs(), batch_size=1, steps=2, output_dir=str(directory / "never")),
        lambda: Trainer(mlp(), blobs(), steps=2, lr_max=None, output_dir=str(directory / "taken")).fit(),
        lambda: World.current().run_on_main(_raise_a_violation),
        lambda: Trainer(
            DistributedDataParallel(mlp()), blobs(), steps=2, lr_max=None, output_dir=str(directory / "x")
        ).fit(),
    ):
        with pytest.raises((ConfigError, FileExistsError, ContractViolation, TypeError)) as caught:
            attempt()
        errors.append(f"{type(caught.value).__name__}: {caught.value}")
    result = Trainer(mlp(), blobs(), output_dir=str(directory / "run"), **RUN).fit()
    resumed = Trainer(mlp(), blobs(), output_dir=str(directory / "resumed"), **RUN)
    resumed.fit(resume_from=directory / "run" / "checkpoints" / "step-4")
    return {"errors": errors, "result": result, "weights": [p.detach() for p in resumed.model.parameters()]}


def test_two_rank_run_writes_one_run_directory_and_counts_steps_once(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("precious\n")
    first, second = on_two_ranks(_two_rank_run, tmp_path)
    # Rank 0's failures (an output directory in use, a violation) are raised on every rank, the same.
    assert first["errors"] == second["errors"]
    refused, taken, violation, wrapped = first["errors"]
    assert refused.startswith("ConfigError: <config>: key 'batch_size': batch_size=1 with 200 training examples")
    assert taken.startswith("FileExistsError: output directory") and "already holds files" in taken
    assert violation.startswith("ContractViolation: contract loss_decrease postcondition `loss.is_finite()` violated")
    assert wrapped.startswith("TypeError: model is already a DistributedDataParallel; pass the plain module")
    assert (tmp_path / "taken" / "metrics.jsonl").read_text() == "precious\n"
    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["resumed", "run", "taken"]
    assert sorted(p.name for p in run.iterdir()) == ["certificate.json", "checkpoints", "metrics.jsonl", "report.png"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-4", "step-8"]
    certificate = json.loads((run / "certificate.json").read_text())
    assert (certificate["run"]["steps"], certificate["run"]["world_size"]) == (8, 2)
    finite = next(c for c in certificate["clauses"] if c["id"] == "loss_decrease.postconditions[0]")
    assert finite["checks"] == 8  # once per step, not once per rank
    assert sorted(losses(run)) == list(range(8))
    a, b = first["result"], second["result"]
    assert (a.output_dir, a.applied_steps, a.lr_max_estimate, a.final_loss) == (
        b.output_dir,
        b.applied_steps,
        b.lr_max_estimate,
        b.final_loss,
    )
    assert a.evaluation == b.evaluation
    # The same run in one process: equal up to float summation order.
    single = Trainer(mlp(), blobs(), output_dir=str(tmp_path / "single"), **RUN).fit()
    assert single.lr_max_estimate.lr_max == pytest.approx(a.lr_max_estimate.lr_max, rel=1e-6)
    assert list(losses(run).values()) == pytest.approx(list(losses(tmp_path / "single").values()), rel=1e-5)
    # Resuming at step 4 on both ranks continues the run exactly.
    assert all(losses(tmp_path / "resumed")[s] == losses(run)[s] for s in range(4, 8))
    assert all(torch.equal(x, y) for x, y in zip(first["weights"], second["weights"], strict=True))


# ------------------------------------------------------------------------ torchrun
def test_torchrun_cli_trains_on_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["-m", "provetrain", "train", "--steps", "10", "--quiet", "--output-dir", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert {"certificate.json", "metrics.jsonl", "report.png", "checkpoints"} <= {p.name for p in out.iterdir()}
    run = json.loads((out / "certificate.json").read_text())["run"]
    assert (run["steps"], run["world_size"]) == (10, 2)
    assert done.stdout.count("outputs:") == 1  # rank 0 prints the summary


# ------------------------------------------------------------------------ a frozen or dead rank
class _FreezeRankOne(Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.rank == 1 and row["step"] == 2:
            time.sleep(8)  # frozen, for longer than the collective timeout


def _frozen_peer(rank: int, port: int, directory: Path) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    settings = {"steps": 8, "lr_max": None, "batch_size": 32, "collective_timeout_minutes": 0.03}
    try:
        Trainer(mlp(), blobs(), callbacks=[_FreezeRankOne(rank)], output_dir=str(directory / "run"), **settings).fit()
        outcome = "finished"
    except RuntimeError as error:
        outcome = f"{type(error).__name__}: {error}"
    (directory / f"rank{rank}.txt").write_text(outcome)
    os._exit(0)  # the peer is gone: no barrier, no teardown


def test_a_frozen_rank_ends_the_run_on_every_survivor_and_the_certificate_says_failed(tmp_path: Path) -> None:
    mp.spawn(_frozen_peer, args=(free_port(), tmp_path), nprocs=WORLD, join=True)
    survivor, frozen = ((tmp_path / f"rank{rank}.txt").read_text() for rank in range(WORLD))
    assert survivor.startswith("RuntimeError:") and "Timed out waiting 1800ms" in survivor
    assert frozen.startswith("RuntimeError:")  # it woke up to a peer that had ended the run
    outcome = json.loads((tmp_path / "run" / "certificate.json").read_text())["outcome"]
    assert outcome.startswith("failed: RuntimeError:") and "Timed out" in outcome


def test_fsdp_on_a_torch_without_fsdp2_or_dcp_safetensors_is_refused_at_the_strategy_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from provetrain.train import distributed
    from provetrain.train.config import make_config

    config = make_config({"strategy": "fsdp"})
    distributed.World(0, 2).check_strategy(config)  # this torch has both: accepted
    monkeypatch.setattr(distributed, "_FSDP_MODULES", ("torch.distributed.fsdp", "torch.no_such_module"))
    with pytest.raises(ConfigError, match=r"strategy: fsdp needs torch\.no_such_module, which this torch \(") as error:
        distributed.World(0, 2).check_strategy(config)
    assert error.value.key == "strategy"
    distributed.World(0, 1).check_strategy(config)  # one process: nothing is sharded, nothing refused
