"""torch.optim.Adam's keywords on provetrain's Adam: amsgrad, Tensor lr and betas, capturable, complex parameters.

Each is compared with torch bit for bit: the reference path (``fused=False``) against torch's loop
(``foreach=False``), the multi-tensor path (``foreach=True``) against torch's fused kernel (``fused=True``),
which it runs. The clip and the finite guard apply to each as to plain Adam.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from provetrain.ops import adam as adam_module
from provetrain.ops.adam import Adam, AdamW
from tests.ops.test_adam import (
    OPTIMIZERS,
    assert_bitwise_equal,
    make_batches,
    make_model,
    roundtrip,
    snapshot,
    train,
)

# (provetrain's path, torch's implementation that performs the same arithmetic)
PAIRED_PATHS = [
    pytest.param({"fused": False}, {"foreach": False}, id="reference"),
    pytest.param({"foreach": True}, {"fused": True}, id="multi_tensor"),
]


@pytest.fixture
def torch_capturable_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch refuses capturable=True for CPU tensors at step(); its arithmetic is device-independent, so
    the tests let it run on CPU to compare with."""
    module = sys.modules["torch.optim.adam"]  # torch.optim.adam is also the name of a function
    original = module._get_capturable_supported_devices
    monkeypatch.setattr(module, "_get_capturable_supported_devices", lambda *a, **k: [*original(*a, **k), "cpu"])


def run_pair(ours: type[Adam], theirs: type, ours_path: dict, torch_path: dict, steps: int = 20, **kwargs: Any):
    a, b = make_model(), make_model()
    opt_a = ours(a.parameters(), **kwargs, **ours_path)
    opt_b = theirs(b.parameters(), **kwargs, **torch_path)
    batches = make_batches(steps)
    train(a, opt_a, batches)
    train(b, opt_b, batches)
    return (a, opt_a), (b, opt_b)


@pytest.mark.parametrize(("ours_path", "torch_path"), PAIRED_PATHS)
@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
def test_amsgrad_matches_torch_bit_for_bit(ours, theirs, ours_path, torch_path) -> None:
    (a, opt_a), (b, opt_b) = run_pair(ours, theirs, ours_path, torch_path, lr=1e-2, weight_decay=0.1, amsgrad=True)
    assert set(opt_a.state[a.fc1.weight]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


def test_amsgrad_on_float32_cpu_by_default_runs_torchs_fused_kernel() -> None:
    # provetrain's C kernel has no amsgrad: the default choice falls back to the multi-tensor path.
    (a, opt_a), (b, opt_b) = run_pair(Adam, torch.optim.Adam, {}, {"fused": True}, lr=1e-2, amsgrad=True)
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


@pytest.mark.parametrize(
    "path", [{"fused": False}, {"foreach": True}, {}], ids=["reference", "multi_tensor", "default"]
)
def test_a_skipped_amsgrad_step_keeps_the_maximum(path: dict) -> None:
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2, amsgrad=True, clip_value=0.5, **path)
    train(model, opt, make_batches(3))
    before = snapshot(model, opt)
    x, y = make_batches(1, seed=9)[0]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    model.fc1.weight.grad[0, 0] = math.inf
    opt.step()
    assert_bitwise_equal(snapshot(model, opt), before)  # max_exp_avg_sq included
    assert int(opt.skipped_steps) == 1


def test_amsgrad_state_dicts_load_both_ways() -> None:
    batches = make_batches(8)
    a, b = make_model(), make_model()
    torch_opt = torch.optim.Adam(a.parameters(), lr=1e-2, amsgrad=True, foreach=False)
    train(a, torch_opt, batches[:4])
    b.load_state_dict(a.state_dict())
    ours = Adam(b.parameters(), fused=False)
    ours.load_state_dict(roundtrip(torch_opt.state_dict()))  # torch's state dict shares its step tensors
    assert ours.param_groups[0]["amsgrad"] is True
    train(a, torch_opt, batches[4:])
    train(b, ours, batches[4:])
    assert_bitwise_equal(snapshot(b, ours), snapshot(a, torch_opt))
    back = torch.optim.Adam(make_model().parameters(), foreach=False)
    back.load_state_dict(ours.state_dict())
    assert back.param_groups[0]["amsgrad"] is True


TENSOR_HYPERPARAMETERS = {
    "lr": lambda: {"lr": torch.tensor(0.01)},
    "lr_and_betas": lambda: {"lr": torch.tensor([0.01]), "betas": (torch.tensor([[0.8]]), torch.tensor(0.99))},
}


@pytest.mark.parametrize("case", TENSOR_HYPERPARAMETERS)
@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
def test_tensor_lr_and_betas_enter_the_arithmetic_as_torchs_do(ours, theirs, case) -> None:
    # The reference path against torch's loop (torch's foreach refuses a Tensor lr without capturable).
    (a, opt_a), (b, opt_b) = run_pair(
        ours, theirs, {"fused": False}, {"foreach": False}, weight_decay=0.1, **TENSOR_HYPERPARAMETERS[case]()
    )
    assert isinstance(opt_a.param_groups[0]["lr"], torch.Tensor)
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


@pytest.mark.parametrize("case", TENSOR_HYPERPARAMETERS)
def test_tensor_lr_and_betas_on_torchs_fused_kernel(case) -> None:
    (a, opt_a), (b, opt_b) = run_pair(
        AdamW,
        torch.optim.AdamW,
        {"foreach": True, "capturable": True},
        {"fused": True},
        **TENSOR_HYPERPARAMETERS[case](),
    )
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


def test_a_scheduler_fills_a_tensor_lr_in_place_as_in_torch() -> None:
    a, b = make_model(), make_model()
    opt_a = Adam(a.parameters(), lr=torch.tensor(0.01), fused=False)
    opt_b = torch.optim.Adam(b.parameters(), lr=torch.tensor(0.01), foreach=False)
    lr_tensor = opt_a.param_groups[0]["lr"]
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    for batch in make_batches(6):
        train(a, opt_a, [batch])
        train(b, opt_b, [batch])
        sched_a.step()
        sched_b.step()
    assert opt_a.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == float(opt_b.param_groups[0]["lr"])
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"lr": torch.tensor(0.01), "foreach": True},
            "lr as a Tensor is not supported for capturable=False and foreach",
        ),
        (
            {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True},
            r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
        ),
    ],
)
def test_torchs_rules_for_tensor_hyperparameters(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Adam(make_model().parameters(), **kwargs)
    Adam(make_model().parameters(), capturable=True, **kwargs)  # accepted with capturable, as in torch


CAPTURABLE_CASES = {
    "plain": {"lr": 1e-2},
    "amsgrad_wd": {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
    "tensor_lr_betas": {"lr": torch.tensor(0.01), "betas": (torch.tensor(0.9), torch.tensor(0.99)), "amsgrad": True},
}


@pytest.mark.usefixtures("torch_capturable_on_cpu")
@pytest.mark.parametrize("case", CAPTURABLE_CASES)
@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
def test_capturable_arithmetic_matches_torchs_bit_for_bit(ours, theirs, case) -> None:
    kwargs = CAPTURABLE_CASES[case] | {"capturable": True}
    (a, opt_a), (b, opt_b) = run_pair(ours, theirs, {"fused": False}, {"foreach": False}, **kwargs)
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
    # And it is torch's capturable arithmetic, not its host-float one: the two differ in some bit here.
    (c, _), _ = run_pair(ours, theirs, {"fused": False}, {"foreach": False}, **CAPTURABLE_CASES[case])
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


@pytest.mark.parametrize("path", [{"fused": False}, {"foreach": True}], ids=["reference", "multi_tensor"])
def test_capturable_step_reads_nothing_back_and_skips_on_the_device(path, monkeypatch) -> None:
    from tests.ops.test_adam import RecordHostReads

    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", False)
    model = make_model()
    opt = Adam(model.parameters(), lr=torch.tensor(0.01), capturable=True, clip_value=0.5, **path)
    for i, (x, y) in enumerate(make_batches(3)):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        if i == 1:
            model.fc2.bias.grad[0] = math.nan
        with RecordHostReads() as reads:
            opt.step(loss=loss)
        assert reads.seen == []
    assert int(opt.skipped_steps) == 1
    assert all(s["step"].device == p.device and int(s["step"]) == 2 for p, s in opt.state.items())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("path", [{"fused": False}, {"foreach": True}], ids=["reference", "multi_tensor"])
def test_capturable_step_replays_in_a_cuda_graph(path) -> None:
    # torch's whole-network capture recipe: warm up on a side stream, capture forward, backward and step.
    x, y = (t.cuda() for t in make_batches(1)[0])
    model, reference = make_model().cuda(), make_model().cuda()
    opt, ref_opt = (
        Adam(m.parameters(), lr=torch.tensor(0.01, device="cuda"), capturable=True, clip_value=0.5, **path)
        for m in (model, reference)
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # state and kernels exist before capture
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # capturing runs nothing
        F.mse_loss(model(x), y).backward()
        opt.step()
    for _ in range(4):
        graph.replay()
    for _ in range(3 + 4):  # the warm-up and the replays, eagerly
        ref_opt.zero_grad(set_to_none=True)
        F.mse_loss(reference(x), y).backward()
        ref_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert int(opt.skipped_steps) == 0
    assert all(int(s["step"]) == 7 for s in opt.state.values())


def complex_problem(seed: int = 0) -> tuple[torch.nn.Parameter, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.complex64, generator=g))
    x = torch.randn(4, 5, dtype=torch.complex64, generator=g)
    return w, x


def complex_train(opt_cls, steps: int = 10, **kwargs: Any) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    w, x = complex_problem()
    opt = opt_cls([w], **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (w @ x).abs().pow(2).sum().backward()
        opt.step()
    return w, opt


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
def test_complex_parameters_step_as_their_real_views_as_torch(ours, theirs, amsgrad) -> None:
    w_a, opt_a = complex_train(ours, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, fused=False)
    w_b, opt_b = complex_train(theirs, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, foreach=False)
    assert torch.equal(w_a, w_b)
    for key, value in opt_b.state[w_b].items():
        assert torch.equal(opt_a.state[w_a][key], value), key
        assert opt_a.state[w_a][key].dtype == value.dtype
    for fast in ({"foreach": True}, {"fused": None}):  # the multi-tensor path and the C kernel, on real views
        w_c, _ = complex_train(ours, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, **fast)
        torch.testing.assert_close(w_c, w_b)


@pytest.mark.parametrize(
    "path", [{"fused": False}, {"foreach": True}, {}], ids=["reference", "multi_tensor", "default"]
)
def test_the_clip_bound_holds_for_complex_gradients_by_their_real_norm(path) -> None:
    w, x = complex_problem()
    opt = Adam([w], lr=1e-2, clip_value=0.25, **path)
    (w @ x).abs().pow(2).sum().backward()
    real_norm = torch.linalg.vector_norm(torch.view_as_real(w.grad).double())
    opt.step()
    assert float(opt.last_grad_norm) == pytest.approx(float(real_norm), rel=1e-12)
    assert float(opt.last_clipped_grad_norm) <= 0.25
    assert float(opt.last_clipped_grad_norm) >= 0.25 * (1 - 1e-6)
