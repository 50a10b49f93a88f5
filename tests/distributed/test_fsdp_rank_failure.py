"""A rank killed with SIGKILL in the middle of an FSDP2 training step: the other stops with a clear error.

Rank 1 dies after its backward, before the optimizer step; rank 0 enters the sharded step's all-gather,
which fails (gloo sees the closed connection, or the 20 s collective timeout passes): it must raise
PeerFailureError saying what it was doing, and the checkpoint directory must hold only complete
checkpoints. (tests/distributed/test_fsdp_checkpoint.py kills a rank in the middle of a save.)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from provetrain.errors import ContractViolation
from provetrain.train.distributed import PeerFailureError, failing_peers_stop
from provetrain.train.sharded_checkpoint import save_sharded_checkpoint, training_tensors
from tests.distributed._ranks import loss_on, rank_rows, run_ranks, shard, sharded_adam, tiny_lm

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="no torch.distributed with gloo"
)

KILLED_AT = 3


def _train_until_killed(rank: int, directory: Path) -> dict[str, Any]:
    model = shard(tiny_lm())
    optimizer = sharded_adam(list(model.parameters()), lr=1e-2, clip_value=1.0)
    for step in range(5):
        loss = loss_on(model, step, rank_rows(rank))
        loss.backward()
        if rank == 1 and step == KILLED_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.step(loss=loss.detach())
        optimizer.zero_grad()
        if step + 1 == 2:
            tensors = training_tensors(model, optimizer)
            save_sharded_checkpoint(directory / "checkpoints", step=2, tensors=tensors, state={"step": 2})
    return {"finished": True}


def test_a_rank_killed_mid_step_makes_the_other_stop_with_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch build")
    results, codes = run_ranks(_train_until_killed, tmp_path, timeout_s=20)
    assert codes[1] == -signal.SIGKILL and results[1] is None
    error = results[0]["error"]
    assert error.startswith("PeerFailureError: the global gradient norm's all-gather failed on rank 0: "), error
    assert "another process of the run stopped answering" in error and "collective_timeout_minutes" in error
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-2"]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (RuntimeError("[gloo] Connection closed by peer"), PeerFailureError),
        (dist.DistBackendError("NCCL watchdog timeout"), PeerFailureError),
        (ContractViolation("loss_decrease", "loss.is_finite()"), ContractViolation),  # a decision, not a peer
        (ValueError("bad argument"), ValueError),
    ],
)
def test_only_backend_errors_become_peer_failures(raised: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected) as caught, failing_peers_stop("the test's collective"):
        raise raised
    if expected is PeerFailureError:
        assert str(caught.value).startswith("the test's collective failed on rank 0: another process")
        assert caught.value.__cause__ is raised
    else:
        assert caught.value is raised
