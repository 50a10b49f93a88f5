"""provetrain.ops.sgd: parity with torch.optim.SGD, the clip, the finite guard, state dicts, bad arguments."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import provetrain
from provetrain.errors import ArgumentViolation, ContractViolation
from provetrain.ops.sgd import SGD
from tests.ops.test_adam import (
    assert_bitwise_equal,
    assert_clipped_step_is_clip_then_step,
    make_batches,
    make_model,
    poisoned_step,
    roundtrip,
    snapshot,
    train,
)

PARITY_CASES: dict[str, dict[str, Any]] = {
    "plain": {"lr": 0.1},
    "momentum": {"lr": 0.05, "momentum": 0.9},
    "dampening": {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "weight_decay": {"lr": 0.05, "weight_decay": 0.1},
    "maximize": {"lr": 0.01, "momentum": 0.8, "weight_decay": 0.05, "maximize": True},
    "tensor_lr": {"lr": torch.tensor(0.02), "momentum": 0.5},
}


def run_pair(kwargs: dict[str, Any], steps: int = 30, **ours: Any):
    a, b = make_model(), make_model()
    opt_a = SGD(a.parameters(), **kwargs, **ours)
    opt_b = torch.optim.SGD(b.parameters(), **kwargs, foreach=False)
    batches = make_batches(steps)
    train(a, opt_a, batches)
    train(b, opt_b, batches)
    return (a, opt_a), (b, opt_b)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_trajectory_matches_torch_bit_for_bit(case: str) -> None:
    (a, opt_a), (b, opt_b) = run_pair(PARITY_CASES[case])
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
    assert int(opt_a.skipped_steps) == 0


@pytest.mark.parametrize("case", ["momentum", "nesterov", "maximize"])
def test_a_clip_that_clips_nothing_leaves_torchs_trajectory(case: str) -> None:
    (a, opt_a), (b, opt_b) = run_pair(PARITY_CASES[case], clip_value=1e6)
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
    assert float(opt_a.last_clipped_grad_norm) == float(opt_a.last_grad_norm)


def test_param_groups_match_torch() -> None:
    a, b = make_model(), make_model()

    def groups(m: torch.nn.Module) -> list[dict[str, Any]]:
        return [
            {"params": m.fc1.parameters(), "momentum": 0.9, "nesterov": True},
            {"params": m.fc2.parameters(), "lr": 0.01, "weight_decay": 0.2},
        ]

    opt_a, opt_b = SGD(groups(a), lr=0.05), torch.optim.SGD(groups(b), lr=0.05, foreach=False)
    train(a, opt_a, make_batches(10))
    train(b, opt_b, make_batches(10))
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


@pytest.mark.parametrize("case", ["plain", "momentum", "nesterov"])
def test_clipped_step_is_clip_then_unclipped_step_bitwise(case: str) -> None:
    clip_value = 0.3
    a, b = make_model(), make_model()
    opt_a = SGD(a.parameters(), clip_value=clip_value, **PARITY_CASES[case])
    opt_b = torch.optim.SGD(b.parameters(), foreach=False, **PARITY_CASES[case])
    assert_clipped_step_is_clip_then_step(a, opt_a, b, opt_b, clip_value)


@pytest.mark.parametrize("clip_value", [None, 0.2])
@pytest.mark.parametrize("poison", ["nan_batch", "nan_grad", "inf_loss"])
@pytest.mark.parametrize("case", ["plain", "momentum", "nesterov"])
def test_skipped_step_leaves_parameters_and_momentum_buffers_unchanged(case, poison, clip_value) -> None:
    kwargs = PARITY_CASES[case] | {"clip_value": clip_value}
    a, b = make_model(), make_model()
    opt_a, opt_b = SGD(a.parameters(), **kwargs), SGD(b.parameters(), **kwargs)
    batches = make_batches(10)
    train(a, opt_a, batches[:5])
    before = snapshot(a, opt_a)
    poisoned_step(a, opt_a, batches[5], poison)
    assert_bitwise_equal(snapshot(a, opt_a), before)  # momentum buffers included
    assert torch.isnan(opt_a.last_clipped_grad_norm)
    train(a, opt_a, batches[5:])
    train(b, opt_b, batches)
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
    assert (int(opt_a.skipped_steps), int(opt_b.skipped_steps)) == (1, 0)


def test_a_skipped_first_step_creates_no_momentum_buffer() -> None:
    a, b = make_model(), make_model()
    opt_a, opt_b = SGD(a.parameters(), lr=0.05, momentum=0.9), SGD(b.parameters(), lr=0.05, momentum=0.9)
    batches = make_batches(4)
    poisoned_step(a, opt_a, batches[0], "nan_grad")
    assert all("momentum_buffer" not in s for s in opt_a.state.values())
    train(a, opt_a, batches[1:])
    train(b, opt_b, batches[1:])
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


def test_observed_nan_micro_step_loss_skips_the_accumulated_step_once() -> None:
    model = make_model()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, clip_value=1.0)
    train(model, opt, make_batches(2))
    before = snapshot(model, opt)
    for i, (x, y) in enumerate(make_batches(4, seed=5)):
        loss = F.mse_loss(model(x), y) / 4
        opt.observe_loss(loss.detach() * math.nan if i == 1 else loss)
        loss.backward()
    opt.step()
    assert_bitwise_equal(snapshot(model, opt), before)
    assert int(opt.skipped_steps) == 1


def test_raise_names_the_parameter_and_changes_nothing() -> None:
    model = make_model()
    opt = SGD(model.named_parameters(), lr=0.05, momentum=0.9, on_nonfinite="raise")
    train(model, opt, make_batches(2))
    before = snapshot(model, opt)
    x, y = make_batches(1, seed=3)[0]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    model.fc2.bias.grad[1] = math.inf
    with pytest.raises(ContractViolation, match=r"parameter='fc2\.bias'.*momentum buffers are as before") as info:
        opt.step()
    assert info.value.step == 3
    assert_bitwise_equal(snapshot(model, opt), before)


def test_on_empty_skip_counts_a_step_without_gradients() -> None:
    model = make_model()
    with pytest.raises(ContractViolation, match=re.escape("`!gradients.is_empty()` violated")):
        SGD(model.parameters()).step()
    opt = SGD(model.parameters(), on_empty="skip")
    opt.step()
    assert int(opt.empty_steps) == 1 and int(opt.skipped_steps) == 0


def test_state_dicts_round_trip_and_move_both_ways_with_torch() -> None:
    batches = make_batches(10)
    a, b, c = make_model(), make_model(), make_model()
    kwargs = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    torch_opt = torch.optim.SGD(a.parameters(), foreach=False, **kwargs)
    ours = SGD(b.parameters(), **kwargs)
    train(a, torch_opt, batches[:5])
    train(b, ours, batches[:5])
    resumed = SGD(c.parameters(), lr=1.0)
    c.load_state_dict(b.state_dict())
    resumed.load_state_dict(roundtrip(torch_opt.state_dict()))
    train(a, torch_opt, batches[5:])
    train(c, resumed, batches[5:])
    assert_bitwise_equal(snapshot(c, resumed), snapshot(a, torch_opt))
    back = torch.optim.SGD(make_model().parameters())
    back.load_state_dict(roundtrip(ours.state_dict()))
    assert back.param_groups[0]["momentum"] == 0.9
    saved = ours.state_dict()
    assert set(saved["provetrain"]) == {"skipped_steps", "last_grad_norm", "last_clipped_grad_norm", "empty_steps"}


def test_adam_state_dicts_are_refused_clearly() -> None:
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    train(model, adam, make_batches(1))
    with pytest.raises(ValueError, match=r"holds keys \['exp_avg', 'exp_avg_sq', 'step'\] for .* not saved by SGD"):
        SGD(model.parameters()).load_state_dict(adam.state_dict())


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"lr": 0.0}, ArgumentViolation, r"`lr > 0\.0` violated: observed lr=0\.0"),
    ({"lr": -0.1}, ValueError, r"`lr > 0\.0` violated"),
    ({"momentum": -0.5}, ValueError, r"Invalid momentum value: -0\.5; it must be finite and >= 0"),
    ({"weight_decay": -1.0}, ValueError, r"Invalid weight_decay value: -1\.0"),
    ({"nesterov": True}, ValueError, r"Nesterov momentum requires a momentum and zero dampening"),
    ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, r"requires a momentum and zero dampening"),
    ({"momentum": "0.9"}, TypeError, r"momentum='0\.9' must be a float"),
    ({"maximize": 1}, TypeError, r"maximize=1 must be True or False"),
    ({"differentiable": True}, ValueError, r"differentiable=True is not supported: a guarded, clipped step is not"),
    ({"clip_value": 0.0}, ArgumentViolation, r"`clip_value > 0\.0` violated"),
    ({"on_nonfinite": "ignore"}, ValueError, r"on_nonfinite='ignore' is not one of"),
    ({"on_empty": "ignore"}, ValueError, r"on_empty='ignore' is not one of"),
    ({"foreach": True, "fused": True}, RuntimeError, r"`fused` and `foreach` cannot be `True` together"),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_with_a_fix(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        SGD(make_model().parameters(), **kwargs)


def test_a_parameter_group_is_checked_like_the_constructor() -> None:
    model = make_model()
    opt = SGD(model.fc1.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: Invalid momentum value: -1\.0"):
        opt.add_param_group({"params": model.fc2.parameters(), "momentum": -1.0})
    with pytest.raises(ValueError, match=r"appears twice in the group"):
        opt.add_param_group({"params": [model.fc2.weight, model.fc2.weight]})


def test_foreach_and_fused_are_accepted_and_take_the_reference_path() -> None:
    for flags in ({"foreach": True}, {"fused": True}, {"foreach": False, "fused": False}):
        (a, opt_a), (b, opt_b) = run_pair(PARITY_CASES["nesterov"], steps=5, **flags)
        assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


def test_sgd_is_exported_and_its_repr_names_the_policies() -> None:
    assert provetrain.SGD is SGD
    opt = SGD(make_model().parameters(), lr=0.1, clip_value=1.0, on_empty="skip")
    assert "SGD (clip_value=1.0, on_nonfinite='skip', on_empty='skip'" in repr(opt)


def test_grad_scaler_hands_its_scale_to_sgd() -> None:
    a, b = make_model(), make_model()
    opt_a = SGD(a.parameters(), lr=0.05, momentum=0.9, clip_value=0.5)
    opt_b = SGD(b.parameters(), lr=0.05, momentum=0.9, clip_value=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in make_batches(5):
        opt_a.zero_grad()
        scaler.scale(F.mse_loss(a(x), y)).backward()
        scaler.step(opt_a)
        scaler.update()
        train(b, opt_b, [(x, y)])
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert float(opt_a.last_clipped_grad_norm) <= 0.5


def test_complex_parameters_step_as_their_real_views() -> None:
    # The same math as torch's complex arithmetic; torch rounds complex products differently (no bit parity).
    def run(opt_cls: type, **kwargs: Any) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        g = torch.Generator().manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.complex64, generator=g))
        x = torch.randn(4, 5, dtype=torch.complex64, generator=g)
        opt = opt_cls([w], lr=0.01, momentum=0.9, weight_decay=0.1, nesterov=True, **kwargs)
        for _ in range(10):
            opt.zero_grad()
            (w @ x).abs().pow(2).sum().backward()
            opt.step()
        return w, opt

    (w_a, opt_a), (w_b, opt_b) = run(SGD), run(torch.optim.SGD, foreach=False)
    torch.testing.assert_close(w_a, w_b)
    assert opt_a.state[w_a]["momentum_buffer"].dtype == torch.complex64
    torch.testing.assert_close(opt_a.state[w_a]["momentum_buffer"], opt_b.state[w_b]["momentum_buffer"])


def test_a_pickled_sgd_keeps_its_policies_counters_and_buffers() -> None:
    import pickle

    model = make_model()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, clip_value=0.5, on_empty="skip")
    train(model, opt, make_batches(2))
    copy = pickle.loads(pickle.dumps(opt))
    assert (copy.clip_value, copy.on_nonfinite, copy.on_empty) == (0.5, "skip", "skip")
    assert torch.equal(copy.last_grad_norm, opt.last_grad_norm)
    assert all("momentum_buffer" in s for s in copy.state.values())
