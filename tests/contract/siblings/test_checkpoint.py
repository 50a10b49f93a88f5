"""checkpoint-v1: save/restore identity of the Trainer's checkpoints, and activation checkpointing that
preserves computation; FALSIFY-CKPT-001..004 as their predictions say (005 has no counterpart here)."""

from __future__ import annotations

import contextlib
import copy
import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from provetrain import AdamW, ConfigError, Trainer
from provetrain.data.sources import DataSplits
from provetrain.train import activation_checkpointing as ac
from provetrain.train.checkpoint import flatten_state, load_checkpoint, save_checkpoint, unflatten_state

WIDTH, BATCH, BLOCKS = 32, 16, 4


class Blocks(nn.Module):
    """Residual blocks in an nn.ModuleList, with BatchNorm (buffers the forward writes) and dropout (RNG)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(8, WIDTH)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.BatchNorm1d(4 * WIDTH), nn.GELU(), nn.Dropout(0.2),
                          nn.Linear(4 * WIDTH, WIDTH))
            for _ in range(BLOCKS)
        )  # fmt: skip
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = Blocks()
    return plain, copy.deepcopy(plain)


def _step(model: nn.Module, x: Tensor, seed: int) -> tuple[Tensor, list[Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both models
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def _blobs(n: int = 120) -> DataSplits:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 2.0 * y[:, None].float()
    return DataSplits(TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:]), "classification", (8,), 3)


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


# ------------------------------------------------------------------------- activation checkpointing


@pytest.mark.contract("FALSIFY-CKPT-001")
def test_falsify_ckpt_001_checkpointed_forward_and_backward_equal_the_plain_ones_bitwise() -> None:
    """Checkpointed forward produces the same output as non-checkpointed: bitwise on CPU, with the gradients
    and the BatchNorm statistics, over several training steps with dropout."""
    plain, wrapped = _pair()
    assert ac.apply_activation_checkpointing(wrapped, "module_lists") == [f"blocks.{i}" for i in range(BLOCKS)]
    x = torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(1))
    for seed in range(3):
        out_plain, grads_plain = _step(plain, x, seed)
        out_wrapped, grads_wrapped = _step(wrapped, x, seed)
        assert _bitwise_equal(out_plain, out_wrapped)
        assert all(_bitwise_equal(a, b) for a, b in zip(grads_plain, grads_wrapped, strict=True))
        with torch.no_grad():
            for p in (*plain.parameters(), *wrapped.parameters()):
                p -= 0.1 * p.grad  # type: ignore[operator]
    states = zip(plain.state_dict().items(), wrapped.state_dict().items(), strict=True)
    assert all(ka == kb and _bitwise_equal(a, b) for (ka, a), (kb, b) in states)


def test_recomputation_writes_buffers_once_and_the_test_sees_it_when_it_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BatchNorm's running statistics get momentum once per forward; without the buffer restore around the
    recomputation they would get it twice, and the comparison above would fail."""
    plain, wrapped = _pair()
    ac.apply_activation_checkpointing(wrapped, ["blocks.*"])
    x = torch.randn(BATCH, 8)
    _step(plain, x, 0)
    _step(wrapped, x, 0)
    assert torch.equal(plain.blocks[0][1].running_mean, wrapped.blocks[0][1].running_mean)
    monkeypatch.setattr(ac, "_buffers_kept", lambda module: contextlib.nullcontext())
    again, twice = _pair()
    ac.apply_activation_checkpointing(twice, ["blocks.*"])
    _step(again, x, 0)
    _step(twice, x, 0)
    assert not torch.equal(again.blocks[0][1].running_mean, twice.blocks[0][1].running_mean)


class Pair(nn.Module):
    """A module with a keyword argument and a tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: Tensor, *, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        y = self.linear(x) * scale
        return y, y.tanh()


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Pair()])


@pytest.mark.contract("FALSIFY-CKPT-002")
def test_falsify_ckpt_002_the_wrapper_returns_the_correct_tensor() -> None:
    """checkpoint() wraps the computation and returns the right tensor: value, dtype, shape, autograd link;
    keyword arguments and tuple outputs pass through; under no_grad the plain forward runs."""

    torch.manual_seed(0)
    model = Outer()
    reference = copy.deepcopy(model.layers[0])
    ac.apply_activation_checkpointing(model, "module_lists")
    assert ac.is_checkpointed(model.layers[0]) and not ac.is_checkpointed(reference)
    x = torch.randn(3, 4)
    got, expected = model.layers[0](x, scale=2.0), reference(x, scale=2.0)
    for a, b in zip(got, expected, strict=True):
        assert _bitwise_equal(a, b) and a.requires_grad and a.grad_fn is not None
    with torch.no_grad():
        assert all(_bitwise_equal(a, b) for a, b in zip(model.layers[0](x), reference(x), strict=True))
    # copies and pickles keep the wrapping, bound to the copy (never to the original)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert ac.is_checkpointed(clone.layers[0]) and clone.layers[0].forward.args[0] is clone.layers[0]


@pytest.mark.contract("FALSIFY-CKPT-003")
def test_falsify_ckpt_003_saved_activation_memory_is_tracked_and_reduced() -> None:
    """Saved vs recomputed activation memory: with the blocks checkpointed, only each block's input, the
    head's input ((BLOCKS + 1) float32 activations of BATCH x WIDTH) and the stem's input (BATCH x 8) are kept;
    the rest is recomputed, one extra forward of each block per backward."""
    plain, wrapped = _pair()
    ac.apply_activation_checkpointing(wrapped, "module_lists")
    x = torch.randn(BATCH, 8)
    kept_plain = ac.saved_activation_bytes(plain, x)
    kept_wrapped = ac.saved_activation_bytes(wrapped, x)
    assert kept_wrapped == ((BLOCKS + 1) * BATCH * WIDTH + BATCH * 8) * 4
    assert kept_plain > 10 * kept_wrapped  # every block's 4*WIDTH intermediates, several times each
    calls = {"plain": 0, "wrapped": 0}
    for name, model in (("plain", plain), ("wrapped", wrapped)):
        model.blocks[0][0].register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        model(x).sum().backward()
    assert calls == {"plain": 1, "wrapped": 2}  # the backward recomputed the block's forward


def test_bad_selections_are_refused_with_what_the_model_has() -> None:
    model = Blocks()
    with pytest.raises(ValueError, match=r"patterns \['decoder\.\*'\] selects no submodule of Blocks; its "):
        ac.apply_activation_checkpointing(model, ["decoder.*"])
    with pytest.raises(ValueError, match="must be 'module_lists' or a non-empty list"):
        ac.apply_activation_checkpointing(model, [])
    with pytest.raises(ValueError, match="selects no submodule"):
        ac.apply_activation_checkpointing(nn.Linear(2, 2), "module_lists")
    # nested selections wrap the outer module only: the inner one is recomputed with it
    assert ac.apply_activation_checkpointing(model, ["blocks.1", "blocks.1.*"]) == ["blocks.1"]
    assert not ac.is_checkpointed(model.blocks[1][0])


def test_the_trainer_option_trains_bit_for_bit_like_without_it(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"steps": 4, "batch_size": 32, "lr": 1e-2, "lr_max": None, "console": None}
    torch.manual_seed(0)
    model = Blocks()
    same = copy.deepcopy(model)
    Trainer(model, _blobs(), output_dir=str(tmp_path / "plain"), **settings).fit()
    trainer = Trainer(
        same, _blobs(), output_dir=str(tmp_path / "ckpt"), activation_checkpointing=["blocks.*"], **settings
    )
    assert all(ac.is_checkpointed(b) for b in same.blocks)
    trainer.fit()
    states = zip(model.state_dict().items(), same.state_dict().items(), strict=True)
    assert all(ka == kb and _bitwise_equal(a, b) for (ka, a), (kb, b) in states)
    with pytest.raises(ConfigError, match=r"activation_checkpointing.*selects no submodule"):
        Trainer(Blocks(), _blobs(), activation_checkpointing=["nope"], **settings)
    for bad in ([], "everything", [3]):
        with pytest.raises(ConfigError, match="activation_checkpointing"):
            Trainer(Blocks(), _blobs(), activation_checkpointing=bad, **settings)


# ------------------------------------------------------------------------------ save/restore identity


def _fit(tmp_path: Path, steps: int, **extra: Any) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(
        Blocks(), _blobs(), output_dir=str(tmp_path / f"run-{steps}"), steps=steps, batch_size=32, lr=1e-2,
        lr_max=None, console=None, **extra,
    )  # fmt: skip
    trainer.fit()
    return trainer


def test_the_trainers_checkpoint_restores_weights_optimizer_state_and_counters_bitwise(tmp_path: Path) -> None:
    """load(save(state)) == state, through the Trainer's own save and resume: every weight and buffer, every
    optimizer moment and step count, the optimizer's counters and the run's counters, bit for bit."""
    saved = _fit(tmp_path, 5)
    # A fresh Trainer (other initial weights) restores the checkpoint through the path fit(resume_from=) takes.
    torch.manual_seed(123)
    restored = Trainer(Blocks(), _blobs(), output_dir=str(tmp_path / "next"), steps=9, batch_size=32, lr=1e-2,
                       lr_max=None, console=None)  # fmt: skip
    restored.optimizer = restored._build_optimizer()
    assert not _bitwise_equal(restored.model.stem.weight, saved.model.stem.weight)
    next_step = restored._resume(saved.output_dir / "checkpoints")
    assert next_step == 5
    model_states = zip(saved.model.state_dict().items(), restored.model.state_dict().items(), strict=True)
    assert all(ka == kb and _bitwise_equal(a, b) for (ka, a), (kb, b) in model_states)
    before, after = saved.optimizer.state_dict(), restored.optimizer.state_dict()
    assert before["state"].keys() == after["state"].keys() and before["state"]
    for index, moments in before["state"].items():
        assert moments.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(_bitwise_equal(moments[k], after["state"][index][k]) for k in moments)
    assert float(before["state"][0]["step"]) == 5.0
    assert _bitwise_equal(before["provetrain"]["skipped_steps"], after["provetrain"]["skipped_steps"])
    for counter in ("applied_steps", "rollbacks", "lr_scale"):
        assert getattr(restored, counter) == getattr(saved, counter)
    assert (restored.skips.total, restored.skips.consecutive) == (saved.skips.total, saved.skips.consecutive)
    assert restored.monitor.state_dict() == saved.monitor.state_dict()


@pytest.mark.contract("FALSIFY-CKPT-004")
def test_falsify_ckpt_004_adamw_step_count_and_moments_round_trip(tmp_path: Path) -> None:
    """Step count, first and second moments round-trip through state_dict / load_state_dict and a checkpoint
    file, bitwise, and the restored optimizer's next step is the original's, bitwise."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = AdamW(model.named_parameters(), lr=1e-2, clip_value=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        optimizer.step()
    tensors, structure = flatten_state(optimizer.state_dict(), prefix="optimizer")
    save_checkpoint(tmp_path, step=3, tensors=tensors, state={"optimizer": structure})
    loaded = load_checkpoint(tmp_path)
    twin_model = copy.deepcopy(model)
    twin = AdamW(twin_model.named_parameters(), lr=1e-2, clip_value=1.0)
    twin.load_state_dict(unflatten_state(loaded.tensors, loaded.state["optimizer"]))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        a, b = optimizer.state[p], twin.state[q]
        assert float(a["step"]) == 3.0
        assert all(_bitwise_equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert _bitwise_equal(optimizer.skipped_steps, twin.skipped_steps)
    x = torch.randn(4, 5)
    for opt, net in ((optimizer, model), (twin, twin_model)):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
    assert all(_bitwise_equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters(), strict=True))


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]


@pytest.mark.contract("ckpt-kani-001")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from(_DTYPES), st.integers(0, 4), st.binary(min_size=32, max_size=32)), max_size=4),
    st.integers(0, 2**31),
)
def test_round_trip_is_bitwise_for_every_small_state(tensors: list[tuple[torch.dtype, int, bytes]], step: int) -> None:
    """ckpt-kani-001's obligation at its bound (4): any state of up to 4 tensors of up to 4 elements, any bit
    pattern of any dtype (non-finite floats excluded: the writer refuses them), round-trips bit for bit."""
    state = {}
    for index, (dtype, length, raw) in enumerate(tensors):
        size = length * torch.empty((), dtype=dtype).element_size()
        state[f"t{index}"] = torch.tensor(list(raw[:size]), dtype=torch.uint8).view(dtype)
        assume(not state[f"t{index}"].is_floating_point() or bool(torch.isfinite(state[f"t{index}"]).all()))
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, step=step, tensors=state, state={"epoch": step // 7, "loss": 0.1 * step})
        loaded = load_checkpoint(directory)
    assert loaded.step == step and loaded.state == {"epoch": step // 7, "loss": 0.1 * step}
    assert loaded.tensors.keys() == state.keys()
    assert all(_bitwise_equal(loaded.tensors[k], v) for k, v in state.items())
