"""Sharded checkpoints (provetrain.train.sharded_checkpoint) of an FSDP2 run, and a rank killed mid-save.

Three 2-rank runs of the tiny transformer, checkpointing every 2 steps up to step 6:

* ``straight``: uninterrupted;
* ``killed``: rank 1 is killed (SIGKILL) while the ranks write checkpoint 4: rank 0 must stop with a
  PeerFailureError that says so, leaving ``step-4.tmp``, no ``step-4``, and ``latest`` on step 2;
* ``resumed``: a new pair of ranks resumes from that directory (step 2) and finishes; its weights and
  moments must equal the straight run's bit for bit.

This process then loads the straight run's last checkpoint into an unsharded model (2 ranks -> 1) with
every pickle reader disabled, and checks the refusals.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from provetrain.errors import ContractViolation
from provetrain.ops.adam import Adam
from provetrain.train.checkpoint import CheckpointCorruptError, ResumeError
from provetrain.train.sharded_checkpoint import (
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    training_tensors,
)
from tests.distributed._ranks import full, loss_on, rank_rows, run_ranks, shard, sharded_adam, tiny_lm

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="no torch.distributed with gloo"
)

STEPS, EVERY, KILLED_AT = 6, 2, 4
LR, CLIP = 1e-2, 0.75


def _optimizer(params: list[torch.Tensor]) -> Adam:
    return sharded_adam(params, lr=LR, clip_value=CLIP, weight_decay=0.1, decoupled_weight_decay=True)


def _kill_this_rank_while_writing() -> None:
    """From now on, this rank dies (SIGKILL) when DCP asks it to write its shards."""
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    def die(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)

    HuggingFaceStorageWriter.write_data = die  # type: ignore[method-assign]


def _train(rank: int, directory: Path, mode: str) -> dict[str, Any]:
    checkpoints = directory / "checkpoints"
    model = shard(tiny_lm())
    params = list(model.parameters())
    optimizer = _optimizer(params)
    start = 0
    if mode == "resumed":
        start = load_sharded_checkpoint(checkpoints, training_tensors(model, optimizer)).state["step"]
    for step in range(start, STEPS):
        loss = loss_on(model, step, rank_rows(rank))
        loss.backward()
        optimizer.step(loss=loss.detach())
        optimizer.zero_grad()
        if (step + 1) % EVERY:
            continue
        if mode == "killed" and rank == 1 and step + 1 == KILLED_AT:
            _kill_this_rank_while_writing()
        tensors = training_tensors(model, optimizer)
        save_sharded_checkpoint(checkpoints, step=step + 1, tensors=tensors, state={"step": step + 1})
    moments = [optimizer.state[p][key] for p in params for key in ("exp_avg", "exp_avg_sq")]
    return {"start": start, "weights": full(params), "moments": full(moments)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch build")
    pytest.importorskip("safetensors")
    straight_dir, killed_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("killed")
    straight, codes = run_ranks(_train, straight_dir, "straight")
    assert codes == [0, 0] and all("error" not in r for r in straight), straight
    # A short collective timeout: the survivor must not wait the default 10 minutes for a dead peer.
    killed, killed_codes = run_ranks(_train, killed_dir, "killed", timeout_s=20)
    killed_listing = sorted(p.name for p in (killed_dir / "checkpoints").iterdir())
    latest_after_kill = (killed_dir / "checkpoints" / "latest").read_text().strip()
    resumed, resumed_codes = run_ranks(_train, killed_dir, "resumed")
    assert resumed_codes == [0, 0] and all("error" not in r for r in resumed), resumed
    return {
        "straight": straight,
        "straight_dir": straight_dir / "checkpoints",
        "killed": killed,
        "killed_codes": killed_codes,
        "killed_listing": killed_listing,
        "latest_after_kill": latest_after_kill,
        "resumed": resumed,
    }


def test_a_rank_killed_mid_save_stops_the_other_with_a_clear_error_and_no_half_checkpoint(
    runs: dict[str, Any],
) -> None:
    assert runs["killed_codes"][1] == -signal.SIGKILL and runs["killed"][1] is None
    error = runs["killed"][0]["error"]
    assert error.startswith("PeerFailureError: saving checkpoint "), error
    assert "step-4" in error and "left incomplete as step-4.tmp" in error and "another process" in error
    assert runs["killed_listing"] == ["latest", "step-2", "step-4.tmp"]
    assert runs["latest_after_kill"] == "step-2"


def test_a_run_resumed_from_the_previous_checkpoint_finishes_equal_to_the_uninterrupted_run(
    runs: dict[str, Any],
) -> None:
    for straight, resumed in zip(runs["straight"], runs["resumed"], strict=True):
        assert resumed["start"] == 2
        for key in ("weights", "moments"):
            assert all(torch.equal(a, b) for a, b in zip(resumed[key], straight[key], strict=True)), key


def _unsharded() -> tuple[nn.Module, Adam]:
    model = tiny_lm()
    return model, _optimizer(list(model.parameters()))


def test_two_rank_checkpoint_loads_into_one_unsharded_process_without_reading_any_pickle(
    runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    step_dir = runs["straight_dir"] / "step-6"
    assert {p.suffix for p in step_dir.iterdir()} == {".safetensors", ".json"}
    assert len(list(step_dir.glob("*.safetensors"))) == 2  # one file of shards per rank

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pickle was read")

    import torch.distributed.checkpoint.hf_storage  # imported before the readers are disabled

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, optimizer = _unsharded()
    loaded = load_sharded_checkpoint(runs["straight_dir"], training_tensors(model, optimizer))
    monkeypatch.undo()
    assert (loaded.step, loaded.state, loaded.saved_world_size) == (6, {"step": 6}, 2)
    straight = runs["straight"][0]
    params = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(params, straight["weights"], strict=True))
    moments = [optimizer.state[p][key] for p in params for key in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(a, b) for a, b in zip(moments, straight["moments"], strict=True))


def test_a_model_of_another_shape_is_refused_before_anything_is_read(runs: dict[str, Any]) -> None:
    model, optimizer = _unsharded()
    model.head = nn.Linear(8, 14)  # type: ignore[assignment]
    optimizer = _optimizer(list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ResumeError, match=r"model/head.weight: saved \[13, 8\] torch.float32, here \[14, 8\]"):
        load_sharded_checkpoint(runs["straight_dir"], training_tensors(model, optimizer))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_an_altered_or_unlisted_shard_file_is_refused(runs: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "checkpoints"
    shutil.copytree(runs["straight_dir"], copy)
    shard_file = sorted((copy / "step-6").glob("*.safetensors"))[1]
    data = bytearray(shard_file.read_bytes())
    data[-1] ^= 1
    shard_file.write_bytes(bytes(data))
    model, optimizer = _unsharded()
    with pytest.raises(CheckpointCorruptError, match="SHA-256 differs from the manifest"):
        load_sharded_checkpoint(copy, training_tensors(model, optimizer))
    data[-1] ^= 1
    shard_file.write_bytes(bytes(data))
    (copy / "step-6" / "extra.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointCorruptError, match=r"extra\.safetensors: is not listed in the manifest"):
        load_sharded_checkpoint(copy, training_tensors(model, optimizer))


def test_non_tensors_and_nonfinite_tensors_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"tensors\['lr'\] is a float, not a tensor: DCP would pickle it"):
        save_sharded_checkpoint(tmp_path, step=1, tensors={"lr": 0.1}, state={})  # type: ignore[dict-item]
    with pytest.raises(ContractViolation, match=r"loss.is_finite\(\)"):
        save_sharded_checkpoint(tmp_path, step=1, tensors={"w": torch.tensor([1.0, float("nan")])}, state={})
    assert not (tmp_path / "step-1").exists()
