"""Checkpoints that are atomic, hold no pickle, never hold NaN, and resume exactly.

On disk, one directory per checkpoint plus a pointer::

    <directory>/
      step-<N>/
        tensors.safetensors   every tensor (safetensors: a JSON header and raw bytes, no code)
        state.json            plain data: counters, config, data position, RNG states, structures
        manifest.json         format, step, and each file's size and SHA-256; written last
      latest                  "step-<N>": the checkpoint saved most recently

How a save survives a crash: the files are written into ``.tmp-step-<N>-*`` in the same directory, each
fsynced, then the temporary directory is fsynced and renamed to ``step-<N>`` (``os.replace``: atomic on
POSIX within one file system), the parent is fsynced, and only then is ``latest`` replaced the same way
(temporary file, fsync, ``os.replace``). Older checkpoints are pruned (``keep_last``) last, each renamed
away atomically before it is deleted.

Loading reads ``latest`` (or, without it, the highest step), checks the manifest (sizes, and SHA-256 with
``verify=True``), parses both files and checks that every tensor (but those saved as ``finite_exempt``) and
every float in ``state`` is free of NaN: a file altered with a consistent manifest is refused as well.
``fallback=True`` walks back to the newest complete checkpoint older than a corrupt one, warns, and lists
what it skipped in ``Checkpoint.skipped``. Nothing is unpickled: tensors come from safetensors, everything
else from JSON.

Non-finite values: a tensor holding NaN or Inf, or a NaN float in ``state``, is refused with
:class:`~provetrain.errors.ContractViolation` on ``loss_decrease``'s postcondition ``loss.is_finite()``
(not a ``ValueError``: the arguments are well-formed, the *training state* is bad, and the Trainer handles
contract violations under one policy). Parameters holding NaN make the next loss NaN, and users who
resume from such a checkpoint are burnt (FINDINGS.md): a bad state never reaches a checkpoint. Tensors
that hold Inf by design (a ``-inf`` attention-mask buffer) are exempted by name with ``finite_exempt``;
``±inf`` floats in ``state`` are allowed, as sentinels like ``ReduceLROnPlateau``'s ``best = inf`` are.

``state.json`` keeps Python types exactly: tuples, non-string dict keys (``optimizer.state_dict()`` keys
its state by int) and ``±inf`` are written as one-key tagged objects (``{"__tuple__": [...]}``,
``{"__dict__": [[k, v], ...]}``, ``{"__float__": "inf"}``, ``{"__tensor__": name}``), and an ``OrderedDict``
(a ``state_dict``) keeps its type and its ``_metadata`` (module versions that ``load_state_dict`` reads).

Guarantees
----------
- Atomicity: a visible ``step-<N>`` was complete and fsynced before it became visible; a save that fails
  or is killed at any point leaves every earlier checkpoint and ``latest`` untouched (at worst a stale
  ``.tmp-*`` or ``.trash-*`` directory, ignored by ``load_checkpoint`` and removed by the next save). If
  the process dies between the rename and the pointer update, the new checkpoint is complete but
  ``latest`` still names the previous one, which is what loads.
- No previous checkpoint is removed before the new one and ``latest`` are in place.
- Exactness: tensors are stored bit for bit (dtype, shape, bytes) and JSON data round-trips to equal
  values of the same types; with :func:`capture_rng_state` / :func:`restore_rng_state` a resumed run draws
  the same random numbers.
- One writer per directory (rank 0 under DDP): concurrent saves into one directory are not supported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import shutil
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from provetrain.errors import ContractViolation

__all__ = [
    "Checkpoint",
    "CheckpointCorruptError",
    "ResumeError",
    "TensorRef",
    "capture_rng_state",
    "flatten_state",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "unflatten_state",
]

FORMAT = "provetrain.checkpoint/1"
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
POINTER_FILE = "latest"
_STEP_DIR = re.compile(r"^step-(0|[1-9][0-9]*)$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_TAGS = frozenset({"__tuple__", "__dict__", "__ordered__", "__float__", "__tensor__"})


class CheckpointCorruptError(ValueError):
    """A checkpoint that exists but cannot be trusted: incomplete, truncated, or altered.

    Attributes:
        path: the file or directory at fault.
        problem: what is wrong with it.
    """

    def __init__(self, path: Path, problem: str, *, hint: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}" + (f". {hint}" if hint else ""))


class ResumeError(ValueError):
    """A run cannot continue from this checkpoint: missing, corrupt, from other settings, or past the run's end.
    The message names the checkpoint and what to change."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        step: the training step it was saved at.
        tensors: every stored tensor by name, on CPU.
        state: the JSON state, decoded (tuples, int keys and ``±inf`` restored; :class:`TensorRef` where
            :func:`flatten_state` put one).
        path: the ``step-<N>`` directory it was read from.
        skipped: with ``fallback=True``, one line per newer checkpoint passed over and why.
    """

    step: int
    tensors: dict[str, Tensor]
    state: dict[str, Any]
    path: Path
    skipped: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class TensorRef:
    """Where :func:`flatten_state` took a tensor out of a structure: its name in ``tensors``."""

    key: str


# --- save --------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int | None = None,
    overwrite: bool = False,
    finite_exempt: Collection[str] = (),
) -> Path:
    """Write ``step-<step>/`` atomically, point ``latest`` at it, then prune; return its path.

    Args:
        directory: where checkpoints live (created if missing).
        step: the training step, an integer >= 0.
        tensors: every tensor to store, by name (flatten state_dicts with :func:`flatten_state`).
        state: plain data: dicts, lists, tuples, str, int, float, bool, None, :class:`TensorRef`.
        keep_last: after success, keep this many checkpoints with step <= ``step`` (None keeps all).
            Checkpoints with a higher step (from an abandoned branch of a run) are never pruned.
        overwrite: replace an existing ``step-<step>``; the old one is removed only after the new one is in
            place. Without it, an existing step is a ``FileExistsError``.
        finite_exempt: names of tensors allowed to hold NaN/Inf by design (a ``-inf`` mask buffer).

    Raises:
        ContractViolation: a tensor (not exempt) holds NaN/Inf or ``state`` holds a NaN float; nothing is
            written.
        TypeError, ValueError: malformed arguments, naming the offending key.
        FileExistsError: ``step-<step>`` exists and ``overwrite`` is False.
    """
    directory = Path(directory)
    _check_step(step)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be None or an integer >= 1, got {keep_last!r}")
    prepared = _prepare_tensors(tensors, step, finite_exempt)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of str to plain data, got {type(state).__name__}")
    encoded = _to_json(state, "state", step)
    final = directory / f"step-{step}"
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint {final} already exists; pass overwrite=True to replace it (the old one is removed only "
            "after the new one is in place), or save under another step"
        )
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory)
    tmp = directory / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"
    tmp.mkdir()  # not tempfile.mkdtemp: its mode 0o700 would ignore the umask once renamed into place
    try:
        _write_contents(tmp, step, prepared, encoded, sorted(finite_exempt))
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(directory, final.name)
    if keep_last is not None:
        _prune(directory, step, keep_last)
    return final


def _prepare_tensors(tensors: Mapping[str, Tensor], step: int, exempt: Collection[str]) -> dict[str, Tensor]:
    """Check names and finiteness; return CPU, contiguous tensors that share no storage (safetensors' rule)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str to torch.Tensor, got {type(tensors).__name__}")
    unknown = sorted(set(exempt) - set(tensors))
    if unknown:
        raise ValueError(f"finite_exempt names tensors that are not in tensors: {unknown}; check the spelling")
    bad: list[str] = []
    nan = inf = 0
    prepared: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, got {name!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().cpu()
        if (tensor.is_floating_point() or tensor.is_complex()) and name not in exempt:
            # Host read: a checkpoint is written rarely, and this is the check that keeps NaN out of it.
            n_nan, n_inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if n_nan or n_inf:
                bad.append(name)
                nan, inf = nan + n_nan, inf + n_inf
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    if bad:
        shown = bad if len(bad) <= 5 else [*bad[:5], f"... ({len(bad)} in all)"]
        raise ContractViolation(
            "loss_decrease",
            "loss.is_finite()",
            kind="postcondition",
            step=step,
            observed={"tensors": shown, "nan": nan, "inf": inf},
            hint="A bad state never reaches a checkpoint: nothing was written and earlier checkpoints are intact. "
            "Resume from the last checkpoint with a lower learning rate; pass finite_exempt=[name] only for "
            "tensors that hold inf by design",
        )
    return prepared


def _write_contents(tmp: Path, step: int, tensors: dict[str, Tensor], state: Any, exempt: list[str]) -> None:
    save_file(tensors, tmp / TENSORS_FILE, metadata={"format": FORMAT, "step": str(step)})
    _fsync_file(tmp / TENSORS_FILE)
    _write_durably(tmp / STATE_FILE, json.dumps(state, allow_nan=False, ensure_ascii=False).encode())
    files = {name: _describe(tmp / name) for name in (TENSORS_FILE, STATE_FILE)}
    manifest = {"format": FORMAT, "step": step, "files": files, "finite_exempt": exempt}
    _write_durably(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    _fsync_directory(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is set aside first and deleted after."""
    trash = None
    if final.exists():
        trash = final.parent / f"{_TRASH_PREFIX}{final.name}-{uuid.uuid4().hex}"
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_directory(final.parent)
    if trash is not None:
        shutil.rmtree(trash)


def _write_pointer(directory: Path, name: str) -> None:
    tmp = directory / f"{_TMP_PREFIX}{POINTER_FILE}-{uuid.uuid4().hex}"
    try:
        _write_durably(tmp, f"{name}\n".encode())
        os.replace(tmp, directory / POINTER_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _prune(directory: Path, step: int, keep_last: int) -> None:
    older = sorted((s for s in list_checkpoints(directory) if s < step), reverse=True)
    for old in older[keep_last - 1 :]:
        # Renamed away first so that a crash mid-delete never leaves a half-deleted step-<N> visible.
        trash = directory / f"{_TRASH_PREFIX}step-{old}-{uuid.uuid4().hex}"
        os.replace(directory / f"step-{old}", trash)
        shutil.rmtree(trash)
    _fsync_directory(directory)


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove ``.tmp-*`` and ``.trash-*`` left by a save that was killed or failed (one writer per directory,
    so none is live)."""
    for entry in directory.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# --- durable writes ----------------------------------------------------------------------------------


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: Path) -> None:
    # Makes the names (the rename itself) durable. Windows cannot open a directory; NTFS journals metadata.
    if os.name == "nt":  # pragma: no cover
        return
    _fsync_file(path)


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- load --------------------------------------------------------------------------------------------


def list_checkpoints(directory: str | os.PathLike[str]) -> list[int]:
    """Steps of the complete-by-construction ``step-<N>`` directories, ascending (temporaries ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for e in directory.iterdir() if e.is_dir() and (m := _STEP_DIR.match(e.name))]
    return sorted(steps)


def load_checkpoint(
    directory: str | os.PathLike[str],
    step: int | None = None,
    *,
    fallback: bool = False,
    verify: bool = True,
) -> Checkpoint:
    """Load ``step-<step>``, or by default the one ``latest`` names (the highest step without a pointer).

    Args:
        directory: where :func:`save_checkpoint` wrote.
        step: a specific step; None for the latest.
        fallback: if the latest is incomplete or corrupt, warn and load the newest complete one older than
            it (only when ``step`` is None); what was skipped is in ``Checkpoint.skipped``.
        verify: check each file's SHA-256 against the manifest (sizes are always checked).

    Raises:
        FileNotFoundError: no such directory, no checkpoint in it, or no such step (naming the path).
        CheckpointCorruptError: the checkpoint (or ``latest``) is incomplete or corrupt, naming the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint directory {directory} {what}; give a run's checkpoints directory or one step-<N> in it"
        )
    if step is not None:
        _check_step(step)
        path = directory / f"step-{step}"
        if not path.is_dir():
            raise FileNotFoundError(
                f"no checkpoint for step {step}: {path} does not exist; steps present: {list_checkpoints(directory)}"
            )
        return _read(path, step, verify)
    candidates, skipped = _candidates(directory)
    if not candidates and not skipped:
        raise FileNotFoundError(f"no checkpoint in {directory}: it holds no step-<N> directory")
    if skipped and not fallback:
        raise CheckpointCorruptError(directory / POINTER_FILE, skipped[0], hint=_fallback_hint(candidates))
    for index, (path, found) in enumerate(candidates):
        try:
            checkpoint = _read(path, found, verify)
        except CheckpointCorruptError as error:
            if not fallback:
                raise CheckpointCorruptError(
                    error.path, error.problem, hint=_fallback_hint(candidates[index + 1 :])
                ) from error
            skipped.append(str(error))
            continue
        if skipped:
            warnings.warn(
                f"loaded checkpoint {path} after skipping newer ones: {'; '.join(skipped)}", RuntimeWarning, 2
            )
        return replace(checkpoint, skipped=tuple(skipped))
    raise CheckpointCorruptError(directory, "no complete checkpoint: " + "; ".join(skipped))


def _candidates(directory: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Checkpoints to try, newest first: ``latest``'s target, then lower steps; and pointer problems."""
    steps = sorted(list_checkpoints(directory), reverse=True)
    pointer = directory / POINTER_FILE
    if not pointer.exists():
        return [(directory / f"step-{s}", s) for s in steps], []
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    match = _STEP_DIR.match(name)
    if match is None:
        return [(directory / f"step-{s}", s) for s in steps], [f"{pointer} holds {name[:40]!r}, not 'step-<N>'"]
    target = int(match.group(1))
    older = [(directory / f"step-{s}", s) for s in steps if s < target]
    if target not in steps:
        return older, [f"{pointer} names {name}, which does not exist (an interrupted overwrite or a deletion)"]
    return [(directory / name, target), *older], []


def _fallback_hint(remaining: list[tuple[Path, int]]) -> str:
    if not remaining:
        return "No older checkpoint is present"
    return f"Pass fallback=True to load the newest older checkpoint ({remaining[0][0].name})"


def _read(path: Path, step: int, verify: bool) -> Checkpoint:
    manifest = _read_json(path / MANIFEST_FILE, "the checkpoint was not completely written")
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("step") != step
        or not isinstance(manifest.get("files"), dict)
    ):
        raise CheckpointCorruptError(
            path / MANIFEST_FILE, f"expected format {FORMAT!r}, step {step} and files, found {str(manifest)[:120]}"
        )
    for name in (TENSORS_FILE, STATE_FILE):
        _check_file(path / name, manifest["files"].get(name), verify)
    state = _from_json(_read_json(path / STATE_FILE, "missing"))
    nan = _first_nan(state, "state")
    if nan is not None:
        raise CheckpointCorruptError(path / STATE_FILE, f"{nan} is NaN; a saved state never holds NaN")
    try:
        tensors = load_file(path / TENSORS_FILE, device="cpu")
    except (SafetensorError, OSError) as error:
        raise CheckpointCorruptError(path / TENSORS_FILE, f"not a readable safetensors file ({error})") from error
    exempt = manifest.get("finite_exempt") if isinstance(manifest.get("finite_exempt"), list) else []
    bad = [
        name
        for name, t in tensors.items()
        if (t.is_floating_point() or t.is_complex()) and name not in exempt and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointCorruptError(
            path / TENSORS_FILE,
            f"tensors {bad[:5]}{f' ({len(bad)} in all)' if len(bad) > 5 else ''} hold NaN or Inf; a saved state "
            "never does, so the file was altered after it was written",
            hint="Resume from an earlier checkpoint",
        )
    return Checkpoint(step=step, tensors=tensors, state=state, path=path)


def _first_nan(value: Any, path: str) -> str | None:
    """The path of the first NaN float in decoded ``state`` (Python's JSON reader accepts ``NaN``)."""
    if isinstance(value, float):
        return path if math.isnan(value) else None
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    return next((found for k, v in items if (found := _first_nan(v, f"{path}[{k!r}]")) is not None), None)


def _read_json(path: Path, when_missing: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError as error:
        raise CheckpointCorruptError(path, f"file missing: {when_missing}") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointCorruptError(path, f"not valid JSON ({error})") from error


def _check_file(path: Path, expected: Any, verify: bool) -> None:
    if not isinstance(expected, dict):
        raise CheckpointCorruptError(path.parent / MANIFEST_FILE, f"no entry for {path.name}")
    if not path.is_file():
        raise CheckpointCorruptError(path, "file missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise CheckpointCorruptError(path, f"{size} bytes, the manifest says {expected.get('bytes')} (truncated?)")
    if verify and _sha256(path) != expected.get("sha256"):
        raise CheckpointCorruptError(path, "SHA-256 differs from the manifest: the file was altered or damaged")


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


# --- JSON that keeps Python types ------------------------------------------------------------------


def _to_json(value: Any, path: str, step: int | None) -> Any:
    """Encode plain data as strict JSON; ``path`` names the value in errors (``state['optimizer'][0]``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):
            raise ContractViolation(
                "loss_decrease",
                "loss.is_finite()",
                kind="postcondition",
                step=step,
                observed={path: value},
                hint="A bad state never reaches a checkpoint: nothing was written. Find why this value is NaN",
            )
        return float(value) if math.isfinite(value) else {"__float__": "inf" if value > 0 else "-inf"}
    if isinstance(value, TensorRef):
        return {"__tensor__": value.key}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, f"{path}[{i}]", step) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{path}[{i}]", step) for i, v in enumerate(value)]
    if isinstance(value, OrderedDict):
        # A state_dict: keep its type and the module versions in ``_metadata`` that load_state_dict reads.
        pairs = [
            [_to_json(k, f"{path} key {k!r}", step), _to_json(v, f"{path}[{k!r}]", step)] for k, v in value.items()
        ]
        metadata = _to_json(getattr(value, "_metadata", None), f"{path}._metadata", step)
        return {"__ordered__": {"items": pairs, "metadata": metadata}}
    if isinstance(value, Mapping):
        items = [(k, _to_json(v, f"{path}[{k!r}]", step)) for k, v in value.items()]
        plain = all(isinstance(k, str) for k, _ in items) and not (len(items) == 1 and items[0][0] in _TAGS)
        if plain:
            return dict(items)
        return {"__dict__": [[_to_json(k, f"{path} key {k!r}", step), v] for k, v in items]}
    if isinstance(value, Tensor):
        raise TypeError(
            f"{path} is a torch.Tensor: put tensors in `tensors`, not `state` (flatten_state splits a state_dict)"
        )
    raise TypeError(
        f"{path} has type {type(value).__name__}, which JSON cannot hold; convert it to str, int, float, bool, "
        "None, list, tuple or dict"
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "__tuple__":
            return tuple(_from_json(v) for v in inner)
        if tag == "__dict__":
            return {_from_json(k): _from_json(v) for k, v in inner}
        if tag == "__ordered__":
            return _ordered(((_from_json(k), _from_json(v)) for k, v in inner["items"]), _from_json(inner["metadata"]))
        if tag == "__float__":
            return float(inner)
        if tag == "__tensor__":
            return TensorRef(inner)
    return {k: _from_json(v) for k, v in value.items()}


# --- state_dicts -------------------------------------------------------------------------------------


def flatten_state(obj: Any, *, prefix: str) -> tuple[dict[str, Tensor], Any]:
    """Split a nested state (``model.state_dict()``, ``optimizer.state_dict()``, a scheduler's) in two.

    Returns ``(tensors, structure)``: every tensor under the name ``prefix/<path>`` (``model/fc.weight``,
    ``optimizer/state/0/exp_avg``), and the same structure with :class:`TensorRef` in their place, for
    ``state``. 0-d tensors (Adam's ``step``) stay tensors, so their dtype survives.

    Example::

        tensors, structure = flatten_state(optimizer.state_dict(), prefix="optimizer")
        save_checkpoint(path, step=step, tensors=tensors, state={"optimizer": structure})
        checkpoint = load_checkpoint(path)
        optimizer.load_state_dict(unflatten_state(checkpoint.tensors, checkpoint.state["optimizer"]))
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty str naming this state (e.g. 'model'), got {prefix!r}")
    tensors: dict[str, Tensor] = {}
    return tensors, _extract(obj, prefix, tensors)


def _extract(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        if name in tensors:
            raise ValueError(f"two tensors map to the name {name!r} (a key containing '/'?); use another prefix")
        tensors[name] = value
        return TensorRef(name)
    if isinstance(value, Mapping):
        return _same_mapping(value, ((k, _extract(v, f"{name}/{k}", tensors)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return type(value)(_extract(v, f"{name}/{i}", tensors) for i, v in enumerate(value))
    return value


def unflatten_state(tensors: Mapping[str, Tensor], structure: Any) -> Any:
    """Inverse of :func:`flatten_state`: put each tensor back where its :class:`TensorRef` stands."""
    if isinstance(structure, TensorRef):
        if structure.key not in tensors:
            raise KeyError(f"tensor {structure.key!r} is referenced by the state but absent from the tensors")
        return tensors[structure.key]
    if isinstance(structure, Mapping):
        return _same_mapping(structure, ((k, unflatten_state(tensors, v)) for k, v in structure.items()))
    if isinstance(structure, (list, tuple)):
        return type(structure)(unflatten_state(tensors, v) for v in structure)
    return structure


def _same_mapping(original: Mapping[Any, Any], items: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    """A dict, or an OrderedDict with the original's ``_metadata`` (module versions) when it is one."""
    if isinstance(original, OrderedDict):
        return _ordered(items, getattr(original, "_metadata", None))
    return dict(items)


def _ordered(items: Iterable[tuple[Any, Any]], metadata: Any) -> OrderedDict[Any, Any]:
    result: OrderedDict[Any, Any] = OrderedDict(items)
    if metadata is not None:
        result._metadata = metadata  # type: ignore[attr-defined]
    return result


# --- random number generators ------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG as JSON-able data: torch CPU, each CUDA device, NumPy's legacy global, Python's."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": name,
            "keys": base64.b64encode(np.asarray(keys, dtype="<u4").tobytes()).decode(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set every global RNG from :func:`capture_rng_state`'s output (after a JSON round trip too).

    CUDA states are restored when CUDA is available (the device count must match); on a machine without
    CUDA they are ignored, since nothing there draws from them.
    """
    missing = sorted({"torch", "cuda", "numpy", "python"} - set(state))
    if missing:
        raise ValueError(f"RNG state lacks {missing}; pass the dict capture_rng_state() returned")
    torch.set_rng_state(_unb64(state["torch"]))
    if torch.cuda.is_available() and state["cuda"]:
        if len(state["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"RNG state holds {len(state['cuda'])} CUDA devices, this machine has {torch.cuda.device_count()}; "
                "resume with the same number of visible devices"
            )
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    numpy = state["numpy"]
    keys = np.frombuffer(base64.b64decode(numpy["keys"]), dtype="<u4").astype(np.uint32)
    np.random.set_state((numpy["bit_generator"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))


def _b64(tensor: Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
