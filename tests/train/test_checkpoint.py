"""Checkpoints: exact round trips, crash safety, no NaN, no pickle, exact RNG resume."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from provetrain import ContractViolation
from provetrain.train import checkpoint as ckpt
from provetrain.train.checkpoint import (
    CheckpointCorruptError,
    TensorRef,
    capture_rng_state,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2)
    )


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    """A few steps whose data and dropout draw from torch, NumPy and Python's RNGs."""
    for _ in range(steps):
        x = torch.randn(6, 4) + float(np.random.standard_normal()) + random.random()
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _save_training(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    model_t, model_s = flatten_state(model.state_dict(), prefix="model")
    opt_t, opt_s = flatten_state(optimizer.state_dict(), prefix="optimizer")
    state = {"model": model_s, "optimizer": opt_s, "rng": capture_rng_state(), "data": {"epoch": 0, "index": 7}}
    return save_checkpoint(directory, step=step, tensors={**model_t, **opt_t}, state=state)


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal values of identical types; tensors bit for bit with the same dtype and shape."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# --- exact round trips -------------------------------------------------------------------------------


def test_model_adam_and_schedulers_round_trip_bit_for_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    step_lr = torch.optim.lr_scheduler.StepLR(adam, step_size=2)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(adam)
    _train(model, adam, 3)
    step_lr.step()
    states = {
        "model": model.state_dict(),
        "optimizer": adam.state_dict(),
        "step_lr": step_lr.state_dict(),
        "plateau": plateau.state_dict(),
    }
    tensors, state = {}, {}
    for name, value in states.items():
        t, s = flatten_state(value, prefix=name)
        tensors.update(t)
        state[name] = s
    save_checkpoint(tmp_path, step=3, tensors=tensors, state=state)
    loaded = load_checkpoint(tmp_path)
    for name, value in states.items():
        _assert_identical(unflatten_state(loaded.tensors, loaded.state[name]), value, name)
    assert loaded.state["plateau"]["best"] == float("inf")
    assert isinstance(loaded.state["optimizer"]["param_groups"][0]["betas"], tuple)
    assert loaded.tensors["optimizer/state/0/step"].dim() == 0


def test_resume_reproduces_the_run_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, adam, 4)
    _save_training(tmp_path, 4, model, adam)
    _train(model, adam, 4)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(99)  # a different process: different init, different RNG positions
    np.random.seed(99)
    random.seed(99)
    resumed = _model()
    resumed_adam = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    checkpoint = load_checkpoint(tmp_path)
    resumed.load_state_dict(unflatten_state(checkpoint.tensors, checkpoint.state["model"]))
    resumed_adam.load_state_dict(unflatten_state(checkpoint.tensors, checkpoint.state["optimizer"]))
    restore_rng_state(checkpoint.state["rng"])
    _train(resumed, resumed_adam, 4)
    _assert_identical(dict(resumed.state_dict()), expected)


PLAIN_DATA = {
    "scalars": {"a": 1, "b": 2.5, "c": True, "d": None, "e": "text ü"},
    "tuple": (1, (2, 3), [4, (5,)]),
    "int keys": {0: "zero", 1: {2: 3}},
    "mixed keys": {"x": 1, 7: 2},
    "infinities": [float("inf"), float("-inf"), -0.0, 1e308],
    "tag lookalike": {"__tuple__": [1, 2]},
    "tensor ref": TensorRef("model/w"),
    "empty": {},
    "big int": 2**80,
}


@pytest.mark.parametrize("name", PLAIN_DATA)
def test_state_keeps_python_types(tmp_path: Path, name: str) -> None:
    save_checkpoint(tmp_path, step=0, tensors={}, state={"value": PLAIN_DATA[name]})
    _assert_identical(load_checkpoint(tmp_path).state["value"], PLAIN_DATA[name])


def test_tied_and_non_contiguous_tensors(tmp_path: Path) -> None:
    weight = torch.arange(6.0).view(2, 3)
    tensors = {"embed": weight, "head": weight, "transposed": weight.T, "slice": weight[1]}
    save_checkpoint(tmp_path, step=0, tensors=tensors, state={})
    loaded = load_checkpoint(tmp_path).tensors
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name


# --- crash safety ------------------------------------------------------------------------------------


def _fail_replace_into(name_prefix: str, error: BaseException):
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name.startswith(name_prefix):
            raise error
        real(src, dst)

    return replace


def _partial_save_file(tensors: Any, path: Any, metadata: Any = None) -> None:
    Path(path).write_bytes(b"\x10\x00\x00\x00half a header")
    raise OSError(28, "No space left on device")


CRASHES = {
    "tensor write fails": ("save_file", _partial_save_file, OSError),
    "fsync fails": ("os.fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")), OSError),
    "rename into place fails": ("os.replace", _fail_replace_into("step-", OSError(5, "I/O error")), OSError),
    "killed at rename": ("os.replace", _fail_replace_into("step-", KeyboardInterrupt()), KeyboardInterrupt),
}


@pytest.mark.parametrize("name", CRASHES)
def test_a_failed_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    target, replacement, error = CRASHES[name]
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(3)}, state={"n": 1})
    before = sorted(p.name for p in tmp_path.iterdir())
    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", replacement)
    else:
        monkeypatch.setattr(os, target.split(".")[1], replacement)
    with pytest.raises(error):
        save_checkpoint(tmp_path, step=2, tensors={"w": torch.zeros(3)}, state={"n": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no step-2, no temporary left
    loaded = load_checkpoint(tmp_path)
    assert (loaded.step, loaded.state, loaded.tensors["w"].tolist()) == (1, {"n": 1}, [1.0, 1.0, 1.0])


def test_a_crash_before_the_pointer_update_loads_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(3)}, state={})
    monkeypatch.setattr(os, "replace", _fail_replace_into("latest", OSError(5, "I/O error")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, step=2, tensors={"w": torch.zeros(3)}, state={}, keep_last=1)
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [1, 2]  # step-2 is complete, and nothing was pruned
    assert (tmp_path / "latest").read_text() == "step-1\n"
    assert load_checkpoint(tmp_path).step == 1
    assert load_checkpoint(tmp_path, 2).tensors["w"].tolist() == [0.0, 0.0, 0.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_stale_temporary_from_a_killed_save_is_ignored_then_removed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(1)}, state={})
    stale = tmp_path / ".tmp-step-2-abc"
    stale.mkdir()
    (stale / "tensors.safetensors").write_bytes(b"partial")
    assert load_checkpoint(tmp_path).step == 1
    assert list_checkpoints(tmp_path) == [1]
    save_checkpoint(tmp_path, step=2, tensors={"w": torch.ones(1)}, state={})
    assert not stale.exists()


def test_stale_trash_and_pointer_temporaries_are_removed_by_the_next_save(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(1)}, state={})
    stale = [tmp_path / ".trash-step-0-abc", tmp_path / ".tmp-latest-abc"]
    stale[0].mkdir()
    (stale[0] / "tensors.safetensors").write_bytes(b"old")
    stale[1].write_text("step-0\n")
    save_checkpoint(tmp_path, step=2, tensors={"w": torch.ones(1)}, state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2"]


def _rewrite_consistently(path: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and update the manifest to match: only the content checks can tell."""
    (path / name).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = ckpt._describe(path / name)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _nan_weights(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.0, float("nan")])}, path / "tensors.safetensors")
    _rewrite_consistently(path, "tensors.safetensors", (path / "tensors.safetensors").read_bytes())


def _nan_in_state(path: Path) -> None:
    _rewrite_consistently(path, "state.json", b'{"lr_scale": NaN}')


@pytest.mark.parametrize(
    ("alter", "file", "problem"),
    [
        (_nan_weights, "tensors.safetensors", r"tensors \['w'\] hold NaN or Inf"),
        (_nan_in_state, "state.json", r"state\['lr_scale'\] is NaN"),
    ],
)
def test_non_finite_values_with_a_consistent_manifest_are_refused_on_load(
    tmp_path: Path, alter: Any, file: str, problem: str
) -> None:
    path = save_checkpoint(tmp_path, step=3, tensors={"w": torch.ones(2)}, state={"lr_scale": 1.0})
    alter(path)
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(path / file)) + ": " + problem):
        load_checkpoint(tmp_path)


def _truncate_tensors(path: Path) -> None:
    target = path / "tensors.safetensors"
    target.write_bytes(target.read_bytes()[:-3])


def _flip_a_byte_of_state(path: Path) -> None:
    target = path / "state.json"
    data = bytearray(target.read_bytes())
    data[-2] = ord("9") if data[-2] != ord("9") else ord("8")
    target.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated tensors": (_truncate_tensors, r"tensors\.safetensors: \d+ bytes, the manifest says \d+"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), r"manifest\.json: file missing"),
    "altered state": (_flip_a_byte_of_state, r"state\.json: SHA-256 differs"),
    "no state": (lambda p: (p / "state.json").unlink(), r"state\.json: file missing"),
    "garbage manifest": (lambda p: (p / "manifest.json").write_text("{"), r"manifest\.json: not valid JSON"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corrupt_latest_is_named_and_fallback_loads_the_previous(tmp_path: Path, name: str) -> None:
    corrupt, message = CORRUPTIONS[name]
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(2)}, state={"n": 1234})
    newest = save_checkpoint(tmp_path, step=2, tensors={"w": torch.zeros(2)}, state={"n": 5678})
    corrupt(newest)
    with pytest.raises(CheckpointCorruptError, match=message) as info:
        load_checkpoint(tmp_path)
    assert str(newest) in str(info.value) and "fallback=True" in str(info.value) and "step-1" in str(info.value)
    with pytest.warns(RuntimeWarning, match="after skipping newer ones"):
        loaded = load_checkpoint(tmp_path, fallback=True)
    assert loaded.step == 1 and loaded.state == {"n": 1234}
    assert len(loaded.skipped) == 1 and str(newest) in loaded.skipped[0]


def test_a_pointer_to_a_missing_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, step=1, tensors={}, state={})
    (tmp_path / "latest").write_text("step-9\n")
    with pytest.raises(CheckpointCorruptError, match=r"latest: .* names step-9, which does not exist"):
        load_checkpoint(tmp_path)
    with pytest.warns(RuntimeWarning):
        assert load_checkpoint(tmp_path, fallback=True).step == 1


def test_without_a_pointer_the_highest_step_loads(tmp_path: Path) -> None:
    for step in (3, 10, 7):
        save_checkpoint(tmp_path, step=step, tensors={}, state={"step": step})
    (tmp_path / "latest").unlink()
    assert load_checkpoint(tmp_path).state == {"step": 10}


# --- pruning, overwrite, rewind ----------------------------------------------------------------------


def test_keep_last_prunes_only_older_checkpoints_after_success(tmp_path: Path) -> None:
    for step in range(1, 6):
        save_checkpoint(tmp_path, step=step, tensors={}, state={}, keep_last=2)
    assert list_checkpoints(tmp_path) == [4, 5]
    # A rewind: resume from step 4 and save step 3'... the abandoned step 5 is never pruned by a lower step.
    save_checkpoint(tmp_path, step=3, tensors={}, state={"rewound": True}, keep_last=1)
    assert list_checkpoints(tmp_path) == [3, 4, 5]
    assert load_checkpoint(tmp_path).state == {"rewound": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_is_explicit(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(1)}, state={"v": 1})
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'step-1'} already exists; pass overwrite=True")):
        save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(1)}, state={"v": 2})
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(1)}, state={"v": 2}, overwrite=True)
    assert load_checkpoint(tmp_path).state == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]


# --- a bad state never reaches a checkpoint ------------------------------------------------------------

NON_FINITE = {
    "nan parameter": ({"w": torch.tensor([1.0, float("nan")])}, {}, r"observed tensors=\['w'\], nan=1, inf=0"),
    "inf moment": ({"exp_avg_sq": torch.tensor([float("inf")], dtype=torch.float64)}, {}, r"nan=0, inf=1"),
    "nan half": ({"w": torch.tensor([float("nan")] * 3, dtype=torch.bfloat16)}, {}, r"nan=3"),
    "nan in state": ({}, {"loss": float("nan")}, r"observed state\['loss'\]=nan"),
    "nan deep in state": ({}, {"ema": {"loss": [1.0, float("nan")]}}, r"state\['ema'\]\['loss'\]\[1\]=nan"),
}


@pytest.mark.parametrize("name", NON_FINITE)
def test_non_finite_state_is_refused_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    tensors, state, message = NON_FINITE[name]
    save_checkpoint(tmp_path, step=1, tensors={"w": torch.ones(1)}, state={})
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ContractViolation, match=message) as info:
        save_checkpoint(tmp_path, step=2, tensors=tensors, state=state)
    assert (info.value.equation, info.value.clause, info.value.kind) == (
        "loss_decrease",
        "loss.is_finite()",
        "postcondition",
    )
    assert info.value.step == 2 and "never reaches a checkpoint" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_integer_tensors_and_exempt_masks_are_saved(tmp_path: Path) -> None:
    mask = torch.triu(torch.full((3, 3), float("-inf")), diagonal=1)
    save_checkpoint(
        tmp_path, step=0, tensors={"mask": mask, "count": torch.tensor(3)}, state={}, finite_exempt=["mask"]
    )
    assert torch.equal(load_checkpoint(tmp_path).tensors["mask"], mask)  # exempt on load too


# --- RNG ---------------------------------------------------------------------------------------------


def _draw() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(4).tolist(), np.random.standard_normal(3).tolist(), [random.gauss(0, 1) for _ in range(3)]


def test_rng_restore_reproduces_the_same_numbers_after_json(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.standard_normal(1)  # and in NumPy's legacy state
    save_checkpoint(tmp_path, step=0, tensors={}, state={"rng": capture_rng_state()})
    expected = _draw()
    _draw()
    restore_rng_state(load_checkpoint(tmp_path).state["rng"])
    assert _draw() == expected


def test_rng_restore_refuses_an_incomplete_state() -> None:
    with pytest.raises(ValueError, match=re.escape("RNG state lacks ['numpy', 'python']")):
        restore_rng_state({"torch": "", "cuda": []})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_round_trip() -> None:  # pragma: no cover - no CUDA in CI
    state = capture_rng_state()
    expected = torch.rand(3, device="cuda").tolist()
    restore_rng_state(json.loads(json.dumps(state)))
    assert torch.rand(3, device="cuda").tolist() == expected


# --- no pickle ---------------------------------------------------------------------------------------


def test_files_are_safetensors_and_json_and_loading_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    path = _save_training(tmp_path, 5, model, torch.optim.Adam(model.parameters()))
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "state.json", "tensors.safetensors"]
    for name in ("manifest.json", "state.json"):
        json.loads((path / name).read_text(encoding="utf-8"))
    data = (path / "tensors.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "provetrain.checkpoint/1", "step": "5"}
    assert "model/0.weight" in header

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("unpickling during load_checkpoint")

    for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    assert load_checkpoint(tmp_path).step == 5


# --- bad input ---------------------------------------------------------------------------------------

BAD_SAVES = [
    ("negative step", {"step": -1}, ValueError, r"step must be an integer >= 0, got -1"),
    ("bool step", {"step": True}, ValueError, r"got True"),
    ("float step", {"step": 1.0}, ValueError, r"got 1\.0"),
    ("keep_last 0", {"keep_last": 0}, ValueError, r"keep_last must be None or an integer >= 1, got 0"),
    ("tensors list", {"tensors": [torch.ones(1)]}, TypeError, r"tensors must be a mapping"),
    ("tensor name", {"tensors": {1: torch.ones(1)}}, TypeError, r"tensor names must be non-empty str, got 1"),
    ("tensor value", {"tensors": {"w": [1.0]}}, TypeError, r"tensors\['w'\] must be a torch\.Tensor, got list"),
    ("state list", {"state": [1]}, TypeError, r"state must be a mapping"),
    ("state set", {"state": {"s": {1}}}, TypeError, r"state\['s'\] has type set"),
    ("state tensor", {"state": {"t": torch.ones(1)}}, TypeError, r"state\['t'\] is a torch\.Tensor: put tensors in"),
    ("exempt typo", {"finite_exempt": ["mask"]}, ValueError, r"finite_exempt names tensors that are not in tensors"),
]


@pytest.mark.parametrize(("name", "change", "error", "message"), BAD_SAVES, ids=[row[0] for row in BAD_SAVES])
def test_bad_save_arguments(tmp_path: Path, name: str, change: dict, error: type[Exception], message: str) -> None:
    arguments = {"step": 1, "tensors": {}, "state": {}, **change}
    with pytest.raises(error, match=message):
        save_checkpoint(tmp_path / "ckpt", **arguments)
    assert not (tmp_path / "ckpt").exists()


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint directory {tmp_path / 'nope'} does not")):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint in {tmp_path}")):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, step=2, tensors={}, state={})
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'step-3'} does not exist; steps present: [2]")):
        load_checkpoint(tmp_path, 3)


def test_flatten_and_unflatten_errors() -> None:
    with pytest.raises(ValueError, match="prefix must be a non-empty str"):
        flatten_state({}, prefix="")
    with pytest.raises(ValueError, match="two tensors map to the name 'm/a/b'"):
        flatten_state({"a/b": torch.ones(1), "a": {"b": torch.ones(1)}}, prefix="m")
    with pytest.raises(KeyError, match="'m/w' is referenced by the state but absent"):
        unflatten_state({}, {"w": TensorRef("m/w")})


def test_list_checkpoints_ignores_other_names(tmp_path: Path) -> None:
    for name in ("step-4", "step-04", "step-x", ".tmp-step-5-a", ".trash-step-1-b", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step-6").write_text("a file, not a checkpoint")
    assert list_checkpoints(tmp_path) == [4]
