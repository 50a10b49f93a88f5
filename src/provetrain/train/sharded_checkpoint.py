r"""Sharded checkpoints of FSDP2 runs: each rank writes its own shards (``torch.distributed.checkpoint``).

On disk::

    <directory>/
      step-<N>/                 complete checkpoints only
        shard-0000<r>-model-00001-of-00001.safetensors   the shards rank r wrote (DCP, safetensors)
        state.json              plain data (JSON): step, data position, counters the caller keeps
        manifest.json           format, step, world size, each tensor's global shape and dtype, and each
                                file's size and SHA-256; written last
      step-<N>.tmp/             a save in progress, or one that was killed: never read
      latest                    "step-<N>": the last checkpoint completed

Saving, on every rank of the group:

1. the local shards are checked for NaN / Inf; one all-reduce makes every rank refuse together (a bad
   state never reaches a checkpoint, as in :mod:`provetrain.train.checkpoint`);
2. rank 0 removes any stale ``*.tmp`` directory and creates ``step-<N>.tmp``; the others wait for it;
3. ``torch.distributed.checkpoint.save`` with DCP's ``HuggingFaceStorageWriter(save_distributed=True)``:
   each rank writes its shards of every DTensor (a replicated tensor is written by one rank) as one
   safetensors file whose JSON header records each shard's offsets, fsynced; DCP's own collectives end
   when every rank has written;
4. rank 0 writes ``state.json`` and ``manifest.json`` (fsynced), fsyncs the directory, renames it to
   ``step-<N>`` (``os.replace``, atomic on POSIX), fsyncs the parent, then replaces ``latest`` the same
   way and prunes old ones (:mod:`provetrain.train.checkpoint`'s writers). Every rank waits for this and
   raises rank 0's error if it failed.

Guarantees:
    * Atomic: ``step-<N>`` appears only complete and durable. A rank killed at any point of a save (or a
      failed write) leaves ``step-<N>.tmp`` and no ``step-<N>``: ``latest`` and every earlier checkpoint
      are untouched, and the ranks still alive raise :class:`~provetrain.train.distributed.PeerFailureError`
      within the collective timeout.
    * No pickle in what is read back. DCP's default ``FileSystemWriter`` pickles its ``.metadata`` (read
      with ``pickle.load``) and non-tensor values (read with ``torch.load(weights_only=False)``), and stores
      tensors with ``torch.save``. Here tensors only are given to DCP (anything else is refused, and goes in
      ``state.json``), they are stored as safetensors, and DCP's ``HuggingFaceStorageReader`` rebuilds the
      metadata from the safetensors headers (JSON). Before anything is read, every file is checked against
      the manifest's size and SHA-256 (recorded by provetrain at save time), and a safetensors file the
      manifest does not list is refused (the reader would read it).
    * Exact resume: shards are stored bit for bit; loading writes them in place into the given tensors.
    * Resharding: a checkpoint saved by W ranks loads into tensors sharded over any number of ranks, or
      into plain tensors in one process: DCP plans the reads from the shards' offsets. What DCP cannot do,
      change a tensor's global shape or dtype, or supply a tensor the checkpoint does not hold, is refused
      with :class:`~provetrain.train.checkpoint.ResumeError` naming the tensors, before anything is read.
      JSON state is global (the same on every rank); state that differs per rank (RNG streams) is the
      caller's, and is exact only on the same number of ranks.
    * One writer per directory; all ranks must see the same file system (a shared one across machines).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from provetrain.errors import ContractViolation
from provetrain.train.checkpoint import (
    POINTER_FILE,
    CheckpointCorruptError,
    ResumeError,
    _fsync_directory,
    _move_into_place,
    _prune,
    _sha256,
    _write_durably,
    _write_pointer,
    list_checkpoints,
)
from provetrain.train.distributed import World, failing_peers_stop

__all__ = ["ShardedCheckpoint", "load_sharded_checkpoint", "save_sharded_checkpoint", "training_tensors"]

FORMAT = "provetrain.sharded-checkpoint/1"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_SHARD_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A loaded sharded checkpoint (its tensors were written into the ones given to the loader).

    Attributes:
        step: the step it was saved at.
        state: its ``state.json``.
        path: the ``step-<N>`` directory.
        saved_world_size: how many ranks saved it.
    """

    step: int
    state: dict[str, Any]
    path: Path
    saved_world_size: int


def training_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
    """The named tensors of a run, for :func:`save_sharded_checkpoint` and as the template to load into.

    ``model/<name>`` for every parameter and buffer (DTensors under FSDP2: the tensors themselves, so a
    load writes into them), ``optimizer/<parameter name>/<key>`` for every tensor of the optimizer's
    per-parameter state, and ``optimizer/counters/<name>`` for provetrain's Adam counters. A parameter
    without state yet gets Adam's zero state (``step`` 0, zero moments sharded like it): what a first step
    would create, so that a fresh optimizer can be loaded into. FSDP2 modules are resharded first (after
    an evaluation the root's parameters are left unsharded).
    """
    _reshard_(model)
    tensors: dict[str, Tensor] = {}
    names = {}
    for name, p in model.named_parameters():
        tensors[f"model/{name}"] = p
        names[p] = name
    for name, b in model.named_buffers():
        tensors[f"model/{name}"] = b
    if optimizer is None:
        return tensors
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in names:
                raise ValueError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not one of the model's; "
                    "pass the model whose parameters the optimizer was built on"
                )
            state = optimizer.state[p]
            if not state:
                local = p.to_local() if hasattr(p, "to_local") else p
                state.update(
                    step=torch.zeros((), dtype=torch.float32, device=local.device),
                    exp_avg=torch.zeros_like(p),
                    exp_avg_sq=torch.zeros_like(p),
                )
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer/{names[p]}/{key}"] = value
    for name, counter in getattr(optimizer, "_counters", {}).items():
        tensors[f"optimizer/counters/{name}"] = counter
    return tensors


def save_sharded_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Save ``tensors`` (DTensors: each rank its shards) and ``state`` as ``step-<step>``, atomically.

    Call it on every rank of the group, with the same names, step and state (module docstring).

    Args:
        directory: where checkpoints go (created if missing), on a file system every rank sees.
        step: the step, ``>= 0``.
        tensors: name -> tensor; DTensors are saved shard by shard, plain tensors once.
        state: JSON data (the same on every rank): the step counter, data position, hyper-parameters.
        keep_last: keep this many checkpoints (this one included), deleting older ones; None keeps all.

    Returns:
        The ``step-<step>`` directory.

    Raises:
        TypeError: a value of ``tensors`` that is not a tensor (DCP would pickle it).
        ContractViolation: a tensor holds NaN or Inf on some rank (``loss.is_finite()``); nothing written.
        PeerFailureError: another rank died or froze during the save: ``step-<step>.tmp`` is left, never read.
    """
    _check_arguments(step, tensors, keep_last)
    directory = Path(directory)
    world = World.current()
    final, tmp = directory / f"step-{step}", directory / f"step-{step}{_TMP_SUFFIX}"
    what = f"saving checkpoint {final} (left incomplete as {tmp.name}; earlier checkpoints are untouched)"
    with failing_peers_stop(what):
        _refuse_nonfinite(tensors, world, step)
        world.run_on_main(lambda: _prepare(directory, tmp))
        _dcp_save(dict(tensors), tmp, world)
        return world.run_on_main(lambda: _commit(directory, tmp, final, step, tensors, state, world, keep_last))


def load_sharded_checkpoint(
    directory: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    *,
    step: int | None = None,
    verify: bool = True,
) -> ShardedCheckpoint:
    """Load ``step-<step>`` (by default the one ``latest`` names) into ``tensors``, in place.

    Call it on every rank of the group the tensors are sharded over (or in one process, without a group).

    Args:
        directory: where :func:`save_sharded_checkpoint` wrote.
        tensors: name -> tensor to fill: the same names, global shapes and dtypes as saved, sharded any
            way DCP can read into (any number of ranks; plain tensors in one process).
        step: a specific step; None for the latest.
        verify: check every file's SHA-256 against the manifest (sizes are always checked).

    Raises:
        FileNotFoundError: no checkpoint there, or no such step.
        CheckpointCorruptError: a file missing, altered, or not listed in the manifest; nothing was loaded.
        ResumeError: names, global shapes or dtypes differ from the checkpoint's; nothing was loaded.
    """
    path = _locate(Path(directory), step)
    manifest = _read_manifest(path)
    _check_files(path, manifest, verify)
    _check_template(path, manifest, tensors)
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    world = World.current()
    with failing_peers_stop(f"loading checkpoint {path}"), _one_process_is_intended():
        load(
            dict(tensors),
            storage_reader=HuggingFaceStorageReader(str(path)),
            process_group=world.group,
            no_dist=_no_group(),
        )
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    return ShardedCheckpoint(manifest["step"], state, path, manifest["world_size"])


def _reshard_(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded (plain tensors) after a forward without backward (an
    evaluation): put every module back in its sharded state, so that its parameters are the DTensors."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# --- save --------------------------------------------------------------------------------------------


def _check_arguments(step: object, tensors: Mapping[str, Any], keep_last: object) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0, the training step the checkpoint is taken at")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last={keep_last!r} must be None (keep all) or an int >= 1")
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"tensors[{name!r}] is a {type(value).__name__}, not a tensor: DCP would pickle it, and a "
                "sharded checkpoint reads no pickle back; put plain data in state= instead"
            )
        if not name:
            raise ValueError("tensor names must be non-empty strings")


def _refuse_nonfinite(tensors: Mapping[str, Tensor], world: World, step: int) -> None:
    """Every rank refuses together when any rank's shard of a floating tensor holds NaN or Inf."""
    local = {name: (t.to_local() if hasattr(t, "to_local") else t) for name, t in tensors.items()}
    bad = [name for name, t in local.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    count = torch.tensor([len(bad)], dtype=torch.int64)
    if world.size > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=world.group)
    if int(count):
        raise ContractViolation(
            "loss_decrease",
            "loss.is_finite()",
            kind="postcondition",
            step=step,
            observed={"nonfinite_tensors_on_this_rank": bad[:5], "nonfinite_tensors_all_ranks": int(count)},
            hint="a checkpoint never holds NaN or Inf; nothing was written. Resume from the last checkpoint "
            "and lower the learning rate, or skip non-finite steps (on_nonfinite='skip')",
        )


def _prepare(directory: Path, tmp: Path) -> None:
    """Rank 0: remove the leftovers of killed saves, then create this save's temporary directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.name.endswith(_TMP_SUFFIX) and entry.is_dir():
            shutil.rmtree(entry)
    tmp.mkdir()


def _dcp_save(tensors: dict[str, Tensor], tmp: Path, world: World) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    # save_distributed: every rank writes its own file of shards; DCP writes and fsyncs each file.
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
    with _one_process_is_intended():
        save(tensors, storage_writer=writer, process_group=world.group, no_dist=_no_group())


@contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no group; here that is what was asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _no_group() -> bool:
    """One process without torch.distributed: DCP reads and writes without collectives."""
    return not (dist.is_available() and dist.is_initialized())


def _commit(
    directory: Path,
    tmp: Path,
    final: Path,
    step: int,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    world: World,
    keep_last: int | None,
) -> Path:
    """Rank 0, once every rank has written: state, manifest, then the atomic renames."""
    _write_durably(tmp / STATE_FILE, json.dumps(state, allow_nan=False, ensure_ascii=False).encode())
    files = {
        entry.name: {"bytes": entry.stat().st_size, "sha256": _sha256(entry)}
        for entry in sorted(tmp.iterdir())
        if entry.is_file()
    }
    manifest = {
        "format": FORMAT,
        "step": step,
        "world_size": world.size,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in tensors.items()},
        "files": files,
    }
    _write_durably(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    _fsync_directory(tmp)
    _move_into_place(tmp, final)
    _write_pointer(directory, final.name)
    if keep_last is not None:
        _prune(directory, step, keep_last)
    return final


# --- load --------------------------------------------------------------------------------------------


def _locate(directory: Path, step: int | None) -> Path:
    if step is not None:
        path = directory / f"step-{step}"
        if not path.is_dir():
            raise FileNotFoundError(
                f"no checkpoint for step {step}: {path} does not exist; steps present: {list_checkpoints(directory)}"
            )
        return path
    pointer = directory / POINTER_FILE
    if pointer.exists():
        path = directory / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not path.is_dir() or path.name.endswith(_TMP_SUFFIX) or path.parent != directory:
            raise CheckpointCorruptError(pointer, f"names {path.name!r}, which is not a complete checkpoint")
        return path
    steps = list_checkpoints(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {directory}: it holds no step-<N> directory")
    return directory / f"step-{steps[-1]}"


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointCorruptError(path / MANIFEST_FILE, f"unreadable ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointCorruptError(
            path / MANIFEST_FILE,
            f"not a sharded checkpoint manifest (format {FORMAT!r})",
            hint="single-process checkpoints load with provetrain.train.checkpoint.load_checkpoint",
        )
    return manifest


def _check_files(path: Path, manifest: dict[str, Any], verify: bool) -> None:
    listed = manifest["files"]
    present = {e.name for e in path.iterdir() if e.is_file() and e.name != MANIFEST_FILE}
    for name in sorted(present - listed.keys()):
        raise CheckpointCorruptError(
            path / name, "is not listed in the manifest (DCP's reader would read every safetensors file there)"
        )
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointCorruptError(file, "is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointCorruptError(file, f"has {file.stat().st_size} bytes, the manifest {expected['bytes']}")
        if verify and _sha256(file) != expected["sha256"]:
            raise CheckpointCorruptError(file, "its SHA-256 differs from the manifest's: it was altered")


def _check_template(path: Path, manifest: dict[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Refuse, before anything is read, what DCP cannot reshard: other names, global shapes or dtypes."""
    saved = manifest["tensors"]
    missing = sorted(tensors.keys() - saved.keys())
    unused = sorted(saved.keys() - tensors.keys())
    changed = [
        f"{name}: saved {saved[name]['shape']} {saved[name]['dtype']}, here {list(t.shape)} {t.dtype}"
        for name, t in tensors.items()
        if name in saved and (saved[name]["shape"] != list(t.shape) or saved[name]["dtype"] != str(t.dtype))
    ]
    if missing or unused or changed:
        problems = changed[:5]
        if unused:
            problems.insert(0, f"in the checkpoint only: {unused[:5]}")
        if missing:
            problems.insert(0, f"not in the checkpoint: {missing[:5]}")
        raise ResumeError(
            f"checkpoint {path} (saved by {manifest['world_size']} processes) does not fit this model and "
            f"optimizer: {'; '.join(problems)}. Resharding changes how tensors are split over processes, not "
            "their global shapes or dtypes: build the same model (and optimizer) as the saved run"
        )
