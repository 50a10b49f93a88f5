"""provetrain.ops.adam: parity with torch.optim, the clip, the finite guard, state dicts, bad arguments."""

from __future__ import annotations

import io
import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from provetrain.errors import ArgumentViolation, ContractViolation
from provetrain.ops import adam as adam_module
from provetrain.ops import fused
from provetrain.ops import multi_tensor as multi_tensor_module
from provetrain.ops.adam import Adam, AdamW, adam_step_
from provetrain.ops.clip import clip_coefficient, global_sum_of_squares, scale_gradient

REFERENCE = {"fused": False}
PATHS = [
    pytest.param(REFERENCE, id="reference"),
    pytest.param(
        {"fused": True},
        id="fused",
        marks=pytest.mark.skipif(
            not fused.fused_available(), reason=f"fused kernel unavailable: {fused.fused_unavailable_reason()}"
        ),
    ),
    pytest.param({"foreach": True}, id="multi_tensor"),
]
OPTIMIZERS = [
    pytest.param(Adam, torch.optim.Adam, id="Adam"),
    pytest.param(AdamW, torch.optim.AdamW, id="AdamW"),
]


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.fc2 = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(0)
    return MLP().to(dtype)


def make_batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=generator).to(dtype), torch.randn(16, 3, generator=generator).to(dtype))
        for _ in range(n)
    ]


def train(model: MLP, opt: torch.optim.Optimizer, batches: list[tuple[torch.Tensor, ...]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def snapshot(model: MLP, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Parameters, both moments and step counts by name, cloned."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.detach().clone()
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}/{key}"] = torch.as_tensor(value).detach().clone()
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].cpu(), b[key].cpu()
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), key


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- parity with torch.optim ----------------------------------------------------------------------

PARITY_CASES = {
    "plain": {"lr": 1e-2},
    "weight_decay": {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
    "maximize": {"lr": 1e-3, "maximize": True, "weight_decay": 0.05},
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
@pytest.mark.parametrize("case", [*PARITY_CASES, "param_groups"])
def test_trajectory_matches_torch(ours: type[Adam], theirs: type, case: str, path: dict[str, bool]) -> None:
    a, b = make_model(), make_model()
    if case == "param_groups":

        def groups(m: MLP) -> list[dict[str, Any]]:
            return [
                {"params": m.fc1.parameters(), "lr": 3e-3, "betas": (0.5, 0.9), "weight_decay": 0.2},
                {"params": m.fc2.parameters(), "maximize": True},
            ]

        opt_a, opt_b = ours(groups(a), lr=1e-2, **path), theirs(groups(b), lr=1e-2, foreach=False)
    else:
        kwargs = PARITY_CASES[case]
        opt_a, opt_b = ours(a.parameters(), **kwargs, **path), theirs(b.parameters(), **kwargs, foreach=False)
    batches = make_batches(300)
    train(a, opt_a, batches)
    train(b, opt_b, batches)
    ours_state, torch_state = snapshot(a, opt_a), snapshot(b, opt_b)
    names = [name for name, _ in a.named_parameters()]
    assert max_difference({n: ours_state[n] for n in names}, {n: torch_state[n] for n in names}) <= 1e-5
    for key in ours_state:  # the moments grow large here: compare them relative to their largest value
        scale = max(1.0, torch_state[key].abs().max().item())
        assert (ours_state[key] - torch_state[key]).abs().max().item() <= 1e-5 * scale, key
    if path == REFERENCE:
        # The reference path runs torch's own kernels in torch's order: the same bits, not just close.
        assert_bitwise_equal(ours_state, torch_state)


@pytest.mark.parametrize(
    ("dtype", "eps", "tolerance"),
    [
        pytest.param(torch.bfloat16, 1e-8, 2e-2, id="bfloat16"),
        # eps=1e-8 underflows to 0 in float16 and torch's own step divides by zero: use a float16 eps.
        pytest.param(torch.float16, 1e-3, 2e-3, id="float16"),
        pytest.param(torch.float64, 1e-8, 1e-12, id="float64"),
    ],
)
@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
def test_low_and_high_precision_params_follow_torch(ours: type[Adam], theirs: type, dtype, eps, tolerance) -> None:
    a, b = make_model(dtype), make_model(dtype)
    opt_a = ours(a.parameters(), lr=1e-2, eps=eps, weight_decay=0.01, **REFERENCE)
    opt_b = theirs(b.parameters(), lr=1e-2, eps=eps, weight_decay=0.01, foreach=False)
    batches = make_batches(60, dtype)
    train(a, opt_a, batches)
    train(b, opt_b, batches)
    assert all(s["exp_avg"].dtype == dtype for s in opt_a.state.values())
    assert opt_a.skipped_steps.item() == 0
    ours_state, torch_state = snapshot(a, opt_a), snapshot(b, opt_b)
    assert max_difference(ours_state, torch_state) <= tolerance
    assert_bitwise_equal(ours_state, torch_state)  # same kernels, same order, same float32 opmath


def test_mixed_dtypes_share_one_global_norm() -> None:
    model = make_model()
    model.fc2.to(torch.bfloat16)
    opt = Adam(model.parameters(), lr=1e-2, clip_value=0.05)
    for x, y in make_batches(5):
        opt.zero_grad()
        F.mse_loss(model.fc2(torch.tanh(model.fc1(x)).bfloat16()).float(), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        expected = torch.sqrt(sum(g.double().pow(2).sum() for g in grads))
        assert opt.last_grad_norm.item() == pytest.approx(expected.item(), rel=1e-12)
        assert opt.last_clipped_grad_norm.item() <= 0.05
    assert model.fc2.weight.dtype == torch.bfloat16


# -- the clip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ours", [Adam, AdamW])
def test_clipped_step_is_clip_then_unclipped_step_bitwise(ours: type[Adam]) -> None:
    clip_value = 0.3
    a, b = make_model(), make_model()
    opt_a = ours(a.parameters(), lr=1e-2, clip_value=clip_value, fused=False)
    opt_b = ours(b.parameters(), lr=1e-2, fused=False)
    assert_clipped_step_is_clip_then_step(a, opt_a, b, opt_b, clip_value)


def assert_clipped_step_is_clip_then_step(
    a: torch.nn.Module,
    opt_a: torch.optim.Optimizer,
    b: torch.nn.Module,
    opt_b: torch.optim.Optimizer,
    clip_value: float,
) -> None:
    """20 steps: ``opt_a`` clips to ``clip_value`` itself; ``b``'s gradients are clipped by hand with the same
    coefficient before ``opt_b`` (no clip) steps. Both end bit-identical, the recorded norms are those used,
    the clip bound holds, and more than 10 steps really clipped."""
    clipped_steps = 0
    for x, y in make_batches(20):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
        grads = [p.grad for p in b.parameters()]
        total_norm, k = clip_coefficient(
            global_sum_of_squares(grads), clip_value, numel=sum(g.numel() for g in grads), dtypes={torch.float32}
        )
        clipped_steps += int(k < 1)
        for p in b.parameters():
            p.grad = scale_gradient(p.grad, k)
        used = torch.sqrt(global_sum_of_squares([p.grad for p in b.parameters()]))
        opt_a.step()
        opt_b.step()
        assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
        assert torch.equal(opt_a.last_grad_norm, total_norm)
        assert torch.equal(opt_a.last_clipped_grad_norm, used)
        assert opt_a.last_clipped_grad_norm.item() <= clip_value
    assert clipped_steps > 10


@pytest.mark.parametrize("path", PATHS)
def test_clipped_norm_is_bounded_and_unclipped_norm_is_reported(path: dict[str, bool]) -> None:
    model = make_model()
    opt = AdamW(model.parameters(), lr=1e-2, clip_value=1e-3, **path)
    for x, y in make_batches(10):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        reference = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        assert opt.last_grad_norm.dtype == torch.float64
        assert opt.last_grad_norm.item() == pytest.approx(reference.item(), rel=1e-6)
        assert 1e-3 * (1 - 1e-6) <= opt.last_clipped_grad_norm.item() <= 1e-3


# -- the finite guard: skip ------------------------------------------------------------------------


def poisoned_step(model: MLP, opt: Adam, batch: tuple[torch.Tensor, ...], poison: str) -> None:
    x, y = batch
    opt.zero_grad()
    if poison == "nan_batch":
        x = x.clone()
        x[3, 2] = math.nan
    loss = F.mse_loss(model(x), y)
    loss.backward()
    if poison == "nan_grad":
        model.fc2.weight.grad[1, 4] = math.nan
    if poison == "inf_loss":
        opt.step(lambda: loss.detach() + math.inf)
    else:
        opt.step(loss=loss)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("clip_value", [None, 0.2])
@pytest.mark.parametrize("ours", [Adam, AdamW])
@pytest.mark.parametrize("poison", ["nan_batch", "nan_grad", "inf_loss"])
def test_skipped_step_leaves_no_trace(ours: type[Adam], clip_value, path: dict[str, bool], poison: str) -> None:
    a, b = make_model(), make_model()
    opt_a = ours(a.parameters(), lr=1e-2, clip_value=clip_value, **path)
    opt_b = ours(b.parameters(), lr=1e-2, clip_value=clip_value, **path)
    batches = make_batches(10)
    train(a, opt_a, batches[:5])
    poisoned_step(a, opt_a, batches[5], poison)
    assert torch.isnan(opt_a.last_clipped_grad_norm)
    train(a, opt_a, batches[5:])
    train(b, opt_b, batches)
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
    assert (opt_a.skipped_steps.item(), opt_b.skipped_steps.item()) == (1, 0)
    assert all(s["step"].item() == 10 for s in opt_a.state.values())


def test_skip_at_the_first_step_leaves_zero_state() -> None:
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Adam(model.parameters(), fused=False)
    poisoned_step(model, opt, make_batches(1)[0], "nan_batch")
    after = snapshot(model, opt)
    assert_bitwise_equal({n: after[n] for n in before}, before)
    assert all(not s["exp_avg"].any() and not s["exp_avg_sq"].any() and s["step"] == 0 for s in opt.state.values())


def test_pure_step_with_skip_keeps_every_bit_of_nonfinite_inputs() -> None:
    params = [torch.tensor([1.0, -0.0, 2.0]), torch.tensor([[3.0]])]
    state = [
        [torch.tensor([0.5, -0.0, 1.0]), torch.tensor([[0.25]])],
        [torch.tensor([1.0, 0.0, 2.0]), torch.ones(1, 1)],
    ]
    steps = [torch.tensor(3.0), torch.tensor(0.0)]
    before = [t.clone() for t in [*params, *state[0], *state[1], *steps]]
    grads = [torch.tensor([math.nan, math.inf, -math.inf]), torch.tensor([[math.nan]])]
    adam_step_(
        params, grads, *state, steps, skip=torch.tensor(True), k=torch.tensor(math.nan, dtype=torch.float64),
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=False, maximize=False,
    )  # fmt: skip
    after = [*params, *state[0], *state[1], *steps]
    assert_bitwise_equal(dict(enumerate(before)), dict(enumerate(after)))


@pytest.mark.parametrize("k", [None, 0.5])
def test_pure_step_with_false_skip_equals_no_skip(k: float | None) -> None:
    def run(skip: torch.Tensor | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params, grads = [torch.randn(5), torch.randn(2, 3)], [torch.randn(5), torch.randn(2, 3)]
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)] + [[torch.tensor(0.0), torch.tensor(0.0)]]
        coefficient = None if k is None else torch.tensor(k, dtype=torch.float64)
        for _ in range(3):
            adam_step_(
                params, grads, *state, skip=skip, k=coefficient, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                weight_decay=0.1, decoupled_weight_decay=True, maximize=True,
            )  # fmt: skip
        return [*params, *state[0], *state[1], *state[2]]

    assert_bitwise_equal(dict(enumerate(run(None))), dict(enumerate(run(torch.tensor(False)))))


# -- the finite guard: raise -----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("named", [True, False])
def test_raise_names_the_parameter_and_changes_nothing(path: dict[str, bool], named: bool) -> None:
    model = make_model()
    params = model.named_parameters() if named else model.parameters()
    opt = Adam(params, lr=1e-2, clip_value=1.0, on_nonfinite="raise", **path)
    batches = make_batches(3)
    train(model, opt, batches[:2])
    x, y = batches[2]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    model.fc2.weight.grad[0, :3] = torch.tensor([math.nan, math.inf, math.nan])
    before, counters = snapshot(model, opt), [t.clone() for t in opt.state_dict()["provetrain"].values()]
    label = "fc2.weight" if named else "param_groups[0]['params'][2] (shape (3, 12))"
    message = (
        "contract gradient_norm precondition `gradients.iter().all(|g| g.is_finite())` violated at step 3: "
        f"observed parameter={label!r}, nonfinite=3, nan=2, inf=1. The gradient of {label!r} holds 3 non-finite "
        "values out of 36. Nothing was updated"
    )
    with pytest.raises(ContractViolation, match=re.escape(message)) as error:
        opt.step()
    assert error.value.observed["parameter"] == label
    assert_bitwise_equal(snapshot(model, opt), before)
    assert_bitwise_equal(dict(enumerate(counters)), dict(enumerate(opt.state_dict()["provetrain"].values())))


@pytest.mark.parametrize("path", PATHS)
def test_raise_on_nonfinite_loss_quotes_the_loss_clause(path: dict[str, bool]) -> None:
    model = make_model()
    opt = AdamW(model.parameters(), on_nonfinite="raise", **path)
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    before = snapshot(model, opt)
    with pytest.raises(ContractViolation, match=re.escape("postcondition `loss.is_finite()` violated at step 1")) as e:
        opt.step(loss=torch.tensor(math.inf))
    assert (e.value.equation, e.value.clause) == ("loss_decrease", "loss.is_finite()")
    assert_bitwise_equal(snapshot(model, opt), before)


# -- state dicts ----------------------------------------------------------------------------------


def roundtrip(state_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ours", [Adam, AdamW])
def test_state_dict_round_trip_continues_identically(ours: type[Adam], path: dict[str, bool]) -> None:
    a = make_model()
    opt_a = ours(a.named_parameters(), lr=1e-2, clip_value=0.5, **path)
    batches = make_batches(10)
    train(a, opt_a, batches[:3])
    poisoned_step(a, opt_a, batches[3], "nan_grad")
    saved = roundtrip(opt_a.state_dict())
    b = make_model()
    b.load_state_dict(a.state_dict())
    opt_b = ours(b.named_parameters(), lr=1.0, clip_value=0.5, **path)
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == 1e-2
    names = ("skipped_steps", "last_grad_norm", "last_clipped_grad_norm")
    assert_bitwise_equal({n: getattr(opt_a, n) for n in names}, {n: getattr(opt_b, n) for n in names})
    train(a, opt_a, batches[4:])
    train(b, opt_b, batches[4:])
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))
    assert opt_b.skipped_steps.item() == 1
    assert torch.equal(opt_a.last_clipped_grad_norm, opt_b.last_clipped_grad_norm)


@pytest.mark.parametrize(("ours", "theirs"), OPTIMIZERS)
def test_torch_state_dicts_load_both_ways(ours: type[Adam], theirs: type) -> None:
    batches = make_batches(10)
    torch_model, our_model = make_model(), make_model()
    torch_opt = theirs(torch_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    train(torch_model, torch_opt, batches[:5])
    our_model.load_state_dict(torch_model.state_dict())
    our_opt = ours(our_model.parameters(), lr=1.0, fused=False)
    our_opt.load_state_dict(roundtrip(torch_opt.state_dict()))
    assert our_opt.skipped_steps.item() == 0 and torch.isnan(our_opt.last_grad_norm)
    assert our_opt.param_groups[0]["amsgrad"] is False and "foreach" not in our_opt.param_groups[0]
    train(torch_model, torch_opt, batches[5:])
    train(our_model, our_opt, batches[5:])
    assert_bitwise_equal(snapshot(our_model, our_opt), snapshot(torch_model, torch_opt))

    back = theirs(make_model().parameters(), foreach=False)
    back.load_state_dict(our_opt.state_dict())
    assert back.param_groups[0]["weight_decay"] == 0.1


def test_adamw_keeps_decoupled_decay_when_loading_an_adam_state_dict() -> None:
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), weight_decay=0.1)
    opt = AdamW(model.parameters())
    opt.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


def foreign_state_dict(kind: str) -> dict[str, Any]:
    model = make_model()
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters())
    train(model, opt, make_batches(1))
    state = opt.state_dict()
    if kind == "differentiable":
        state["param_groups"][0]["differentiable"] = True
    if kind == "shape":
        state["state"][0]["exp_avg"] = torch.zeros(2, 2)
    if kind == "counters":
        state["provetrain"] = {"skipped_steps": torch.tensor(1)}
    return state


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("differentiable", r"param_groups\[0\] was saved with differentiable=True, which provetrain's Adam does"),
        ("sgd", r"holds keys \['momentum_buffer'\] for param_groups\[0\]\['params'\]\[0\] \(shape \(12, 6\)\)"),
        ("shape", r"exp_avg for .* has shape \(2, 2\) but the parameter has shape \(12, 6\)"),
        ("counters", r"state_dict\['provetrain'\] has no 'last_grad_norm'"),
    ],
)
def test_foreign_state_dicts_are_refused_clearly(kind: str, pattern: str) -> None:
    opt = Adam(make_model().parameters())
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(foreign_state_dict(kind))


# -- arguments ------------------------------------------------------------------------------------


def params_only(m: MLP) -> list[torch.nn.Parameter]:
    return list(m.parameters())


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"lr": 0.0}, ContractViolation, r"loss_decrease precondition `lr > 0\.0` violated: observed lr=0\.0\. Pass"),
    ({"lr": -1e-3}, ContractViolation, r"`lr > 0\.0` violated: observed lr=-0\.001"),
    ({"lr": math.nan}, ContractViolation, r"`lr > 0\.0` violated: observed lr=nan"),
    ({"lr": math.inf}, ValueError, r"lr=inf must be finite"),
    ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, r"Tensor lr must be 1-element, got shape \(2,\)"),
    ({"lr": "0.1"}, TypeError, r"lr='0\.1' must be a float or a 1-element tensor"),
    ({"betas": (0.9, torch.tensor(0.99))}, ValueError, r"betas must be either both floats or both Tensors"),
    ({"differentiable": True}, ValueError, r"differentiable=True is not supported: a guarded, clipped step is not"),
    ({"fused": True, "amsgrad": True}, ValueError, r"fused=True with amsgrad=True: provetrain's C kernel keeps no"),
    ({"capturable": 1}, TypeError, r"capturable=1 must be True or False"),
    ({"amsgrad": 0}, TypeError, r"amsgrad=0 must be True or False"),
    ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]=1\.0 is outside \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]=-0\.1 is outside \[0, 1\)"),
    ({"betas": (0.9,)}, TypeError, r"betas=\(0\.9,\) must be a pair of floats"),
    ({"eps": -1e-8}, ValueError, r"eps=-1e-08 must be finite and >= 0, e\.g\. eps=1e-8"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay=-0\.1 must be finite and >= 0"),
    ({"weight_decay": math.nan}, ValueError, r"weight_decay=nan must be finite and >= 0"),
    ({"maximize": 1}, TypeError, r"maximize=1 must be True or False"),
    ({"clip_value": 0.0}, ContractViolation, r"gradient_norm precondition `clip_value > 0\.0` violated: observed"),
    ({"clip_value": -1.0}, ContractViolation, r"`clip_value > 0\.0` violated: observed clip_value=-1\.0"),
    ({"clip_value": math.inf}, ValueError, r"clip_value=inf must be finite; pass clip_value=None"),
    ({"clip_value": "1"}, TypeError, r"clip_value='1' must be a float or None"),
    ({"on_nonfinite": "ignore"}, ValueError, r"on_nonfinite='ignore' is not one of 'skip' .* or 'raise'"),
    ({"fused": "yes"}, TypeError, r"fused='yes' must be True, False or None"),
    ({"eps": 0.0}, ValueError, r"eps=0\.0 must be > 0"),
    ({"params": []}, ContractViolation, r"loss_decrease precondition `!params\.is_empty\(\)` violated"),
    ({"params": [{"params": []}]}, ContractViolation, r"`!params\.is_empty\(\)` violated"),
    ({"params": torch.zeros(2)}, TypeError, r"got a single tensor; pass \[tensor\]"),
    (
        {"params": lambda m: [{"params": m.fc1.parameters()}, {"params": m.fc2.parameters(), "lr": -1.0}]},
        ContractViolation,
        r"`lr > 0\.0` violated: observed lr=-1\.0\. param_groups\[1\]: Pass a positive",
    ),
    (
        {"params": lambda m: [{"params": m.fc1.parameters(), "betas": (0.9, 1.5)}]},
        ValueError,
        r"param_groups\[0\]: betas\[1\]=1\.5 is outside \[0, 1\)",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), BAD_ARGUMENTS)
def test_bad_arguments_are_refused_with_a_fix(kwargs: dict[str, Any], error: type[Exception], pattern: str) -> None:
    kwargs = dict(kwargs)
    params = kwargs.pop("params", params_only)
    model = make_model()
    with pytest.raises(error, match=pattern):
        Adam(params(model) if callable(params) else params, **kwargs)


@pytest.mark.skipif(not fused.fused_available(), reason=f"fused kernel unavailable: {fused.fused_unavailable_reason()}")
def test_fused_true_is_refused_for_unsupported_tensors() -> None:
    model = make_model(torch.float64)
    opt = Adam(model.parameters(), fused=True)
    train_step = make_batches(1, torch.float64)
    with pytest.raises(ValueError, match=r"fused=True, but a torch\.float64 tensor on cpu"):
        train(model, opt, train_step)


def test_step_without_gradients_is_a_contract_violation() -> None:
    opt = Adam(make_model().parameters())
    with pytest.raises(ContractViolation, match=re.escape("`!gradients.is_empty()` violated")):
        opt.step()


@pytest.mark.parametrize(
    "kwargs", [{"lr": 0.0}, {"lr": -1e-3}, {"lr": math.nan}, {"clip_value": 0.0}, {"params": []}], ids=str
)
def test_argument_violations_are_also_the_value_errors_torch_raises(kwargs: dict[str, Any]) -> None:
    kwargs = dict(kwargs)
    params = kwargs.pop("params", params_only(make_model()))
    with pytest.raises(ValueError) as caught:
        Adam(params, **kwargs)
    assert isinstance(caught.value, ContractViolation) and isinstance(caught.value, ArgumentViolation)


def test_hyperparameters_are_checked_before_params_as_in_torch() -> None:
    with pytest.raises(ArgumentViolation, match=re.escape("`lr > 0.0` violated: observed lr=-1.0")):
        Adam(None, lr=-1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'NoneType' object is not iterable"):
        Adam(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", PATHS)
def test_on_empty_skip_counts_a_step_without_gradients_and_changes_nothing(path: dict[str, bool]) -> None:
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2, on_empty="skip", **path)
    train(model, opt, make_batches(1))
    opt.zero_grad()
    before, counters = snapshot(model, opt), dict(opt.state_dict()["provetrain"])
    assert opt.step(loss=1.5) == 1.5
    assert opt.empty_steps.item() == 1 and opt.empty_steps.device.type == "cpu"
    assert_bitwise_equal(before, snapshot(model, opt))
    after = opt.state_dict()["provetrain"]
    assert after.pop("empty_steps").item() == 1
    assert_bitwise_equal(dict(enumerate(list(counters.values())[:3])), dict(enumerate(after.values())))
    fresh = Adam(make_model().parameters())
    fresh.load_state_dict(opt.state_dict())
    assert fresh.empty_steps.item() == 1


def test_a_state_dict_saved_before_on_empty_loads_with_no_empty_steps() -> None:
    model = make_model()
    opt = Adam(model.parameters(), on_empty="skip")
    opt.step()
    state = opt.state_dict()
    del state["provetrain"]["empty_steps"]
    opt.load_state_dict(state)
    assert opt.empty_steps.item() == 0


def test_on_empty_is_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("on_empty='ignore' is not one of 'raise' (a step without")):
        Adam(params_only(make_model()), on_empty="ignore")  # type: ignore[arg-type]


def test_load_pre_hooks_run_before_the_loadability_check_and_once() -> None:
    # A pre-hook can adapt a checkpoint the check would refuse: here one marked differentiable.
    model = make_model()
    torch_opt = torch.optim.Adam(model.parameters())
    train(model, torch_opt, make_batches(1))
    saved = torch_opt.state_dict()
    saved["param_groups"][0]["differentiable"] = True
    calls = []

    def drop_differentiable(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
        calls.append(1)
        for group in state_dict["param_groups"]:
            group["differentiable"] = False

    opt = Adam(model.parameters())
    opt.register_load_state_dict_pre_hook(drop_differentiable)
    opt.load_state_dict(saved)
    assert len(calls) == 1
    assert opt.state[model.fc1.weight]["step"].item() == 1


@pytest.mark.parametrize("path", PATHS)
def test_step_count_dtype_follows_torch_under_a_float64_default_dtype(path: dict[str, bool]) -> None:
    # torch.optim.Adam counts in float64 under set_default_dtype(float64), except its fused path (float32);
    # provetrain's fast paths are fused kernels too.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = make_model(torch.float32)
        opt = Adam(model.parameters(), **path)
        train(model, opt, make_batches(2, torch.float32))
        expected = torch.float64 if path == REFERENCE else torch.float32
        assert {s["step"].dtype for s in opt.state.values()} == {expected}
        again = Adam(model.parameters())  # a float64 count keeps its dtype and leads to the reference path
        again.load_state_dict(opt.state_dict())
        train(model, again, make_batches(1, torch.float32))
        assert {s["step"].dtype for s in again.state.values()} == {expected}
        assert all(s["step"].item() == 3 for s in again.state.values())
    finally:
        torch.set_default_dtype(previous)


def test_closure_and_loss_together_are_refused() -> None:
    opt = Adam(make_model().parameters())
    with pytest.raises(ValueError, match="either closure or loss"):
        opt.step(lambda: 0.0, loss=torch.tensor(0.0))


# -- torch.optim behaviour kept -------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_params_without_grad_are_left_alone_and_zero_grad_works(path: dict[str, bool]) -> None:
    model = make_model()
    model.fc1.weight.requires_grad_(False)
    frozen = model.fc1.weight.detach().clone()
    opt = Adam(model.parameters(), lr=1e-2, **path)
    train(model, opt, make_batches(3))
    assert torch.equal(model.fc1.weight, frozen) and model.fc1.weight not in opt.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_closure_loss_is_returned_and_lr_scheduler_works() -> None:
    model = make_model()
    opt = AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    scheduler.step()
    assert isinstance(loss, torch.Tensor) and opt.param_groups[0]["lr"] == 5e-3


@pytest.mark.skipif(not fused.fused_available(), reason=f"fused kernel unavailable: {fused.fused_unavailable_reason()}")
def test_fused_matches_reference() -> None:
    states = []
    for path in (True, False):
        model = make_model()
        groups = [{"params": model.fc1.parameters()}, {"params": model.fc2.parameters(), "lr": 3e-3}]
        opt = AdamW(groups, lr=1e-2, weight_decay=0.1, clip_value=0.5, fused=path)
        train(model, opt, make_batches(20))
        states.append((snapshot(model, opt), opt.last_grad_norm.item(), opt.last_clipped_grad_norm.item()))
    (fused_state, fused_norm, fused_clipped), (ref_state, ref_norm, ref_clipped) = states
    for key in ref_state:
        assert torch.allclose(fused_state[key], ref_state[key], rtol=1e-6, atol=1e-7), key
    assert fused_norm == pytest.approx(ref_norm, rel=1e-6)
    assert fused_clipped == pytest.approx(ref_clipped, rel=1e-6)


# -- no host-device synchronisation ---

# The aten ops behind .item(), bool(t), float(t), `if t:`, torch.equal and data-dependent shapes: each
# copies a device value to the host. Seen on CPU, they would be synchronisations on CUDA.
HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2", "allclose"}


class RecordHostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.removeprefix("aten::") in HOST_READS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "path", [pytest.param(REFERENCE, id="reference"), pytest.param({"foreach": True}, id="multi_tensor")]
)
@pytest.mark.parametrize("clip_value", [None, 0.2])
@pytest.mark.parametrize("ours", [Adam, AdamW])
def test_skip_mode_step_reads_nothing_back_from_tensors(
    ours: type[Adam], clip_value: float | None, path: dict[str, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CPU the step scalars come from a free read of the CPU count and pass 1 from the C kernel; run the
    # device branch CUDA takes.
    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", False)
    monkeypatch.setattr(multi_tensor_module, "_C_PASS1_ON_CPU", False)
    model = make_model()
    opt = ours(model.named_parameters(), lr=1e-2, clip_value=clip_value, **path)
    for poison in ("none", "nan_grad", "nan_batch", "none"):
        x, y = make_batches(1)[0]
        opt.zero_grad()
        loss = F.mse_loss(model(x if poison != "nan_batch" else x * math.nan), y)
        loss.backward()
        if poison == "nan_grad":
            model.fc2.weight.grad[0, 0] = math.nan
        with RecordHostReads() as reads:
            opt.step(loss=loss)
        assert reads.seen == []
    assert opt.skipped_steps.item() == 2


def test_raise_mode_reads_one_flag_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", False)
    model = make_model()
    opt = Adam(model.parameters(), clip_value=0.2, on_nonfinite="raise", fused=False)
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    with RecordHostReads() as reads:
        opt.step()
    assert reads.seen == ["aten::_local_scalar_dense"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to detect host-device syncs")
@pytest.mark.parametrize("clip_value", [None, 0.2])
@pytest.mark.parametrize("ours", [Adam, AdamW])
def test_skip_mode_step_never_synchronises_on_cuda(ours: type[Adam], clip_value: float | None) -> None:
    model = make_model().cuda()
    opt = ours(model.named_parameters(), lr=1e-2, clip_value=clip_value)
    previous = torch.cuda.get_sync_debug_mode()
    for i, (x, y) in enumerate(make_batches(6)):
        opt.zero_grad()
        loss = F.mse_loss(model(x.cuda()), y.cuda())
        loss.backward()
        if i == 3:
            model.fc2.weight.grad[0, 0] = math.nan
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    assert opt.skipped_steps.item() == 1
    assert all(s["step"].item() == 5 for s in opt.state.values())


def test_moments_strided_unlike_their_parameter_never_reach_a_kernel() -> None:
    # A channels_last model's state loaded into a contiguous copy: the moments keep channels_last strides.
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = Adam(conv.parameters(), lr=1e-2)
    conv(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).sum().backward()
    opt.step()
    plain = torch.nn.Conv2d(3, 4, 3)
    plain.load_state_dict(conv.state_dict())
    reloaded = Adam(plain.parameters(), lr=1e-2)
    reloaded.load_state_dict(opt.state_dict())
    assert not reloaded.state[plain.weight]["exp_avg"].is_contiguous()
    plain(torch.randn(2, 3, 8, 8)).sum().backward()
    reloaded.step()  # neither the C kernel nor torch's fused kernel may walk these moments linearly
    assert reloaded.state[plain.weight]["step"].item() == 2
    assert torch.isfinite(plain.weight).all()


@pytest.mark.parametrize("path", PATHS)
def test_raise_mode_names_the_gradient_when_state_holds_a_non_parameter_key(path: dict[str, bool]) -> None:
    # torch.optim's own hook tests store arbitrary values under non-parameter keys of optimizer.state.
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Adam([p], on_nonfinite="raise", **path)
    opt.state["x"] = True
    p.grad = torch.tensor([math.nan, 0.0, 0.0])
    with pytest.raises(ContractViolation, match=re.escape("holds 1 non-finite values out of 3")):
        opt.step()
    assert torch.equal(p, torch.zeros(3))


@pytest.mark.parametrize("params", ["plain", "named", "added group"])
def test_a_parameter_listed_twice_in_a_group_is_refused_at_construction(params: str) -> None:
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    group = 1 if params == "added group" else 0
    pattern = re.escape(f"param_groups[{group}]['params'][2] (shape (3,)) appears twice in the group: each listing")
    with pytest.raises(ValueError, match=pattern):
        if params == "plain":
            Adam([p, q, p])
        elif params == "named":
            Adam([("p", p), ("q", q), ("p again", p)])
        else:
            Adam([torch.nn.Parameter(torch.ones(1))]).add_param_group({"params": [p, q, p]})


@pytest.mark.parametrize("path", [p for p in PATHS if not p.values[0].get("fused")])  # float64: no C kernel
@pytest.mark.parametrize(("value", "clip_value"), [(1e160, 1e153), (1e-200, 1e-201), (1e-300, 1e-301)])
def test_recorded_clipped_norm_of_extreme_float64_gradients_is_neither_inf_nor_zero(
    path: dict[str, bool], value: float, clip_value: float
) -> None:
    # Squares of these overflow (1e160) or underflow (1e-200) float64: the records are formed in scaled form.
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    p.grad = torch.tensor([value, -value, value / 2], dtype=torch.float64)
    opt = Adam([p], lr=1e-3, clip_value=clip_value, **path)
    opt.step()
    clipped = opt.last_clipped_grad_norm.item()
    assert clip_value * (1 - 2**-20) <= clipped <= clip_value
    assert opt.last_grad_norm.item() == pytest.approx(value * 1.5, rel=1e-12)
    assert torch.isfinite(opt.state[p]["exp_avg_sq"]).all()


def test_adamw_decay_that_would_grow_the_weights_is_refused() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = AdamW([p], lr=1e-3, weight_decay=1e30)
    with pytest.raises(ValueError, match=r"lr \* weight_decay = 1e\+27 > 1"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state[p]


@pytest.mark.parametrize("path", [p for p in PATHS if not p.values[0].get("fused")])  # float16: no C kernel
def test_float16_moments_stay_finite_under_the_largest_allowed_clip(path: dict[str, bool]) -> None:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = Adam([p], lr=1e-3, eps=1e-3, clip_value=255.0, **path)
    for _ in range(200):  # huge finite gradients, clipped to 255: exp_avg_sq settles near 255**2 / 4
        p.grad = torch.full((4,), 6e4, dtype=torch.float16)
        opt.step()
    state = opt.state[p]
    assert all(torch.isfinite(t).all() for t in (p, state["exp_avg"], state["exp_avg_sq"]))
    with pytest.raises(ValueError, match=r"clip_value=256\.0 is too large for torch\.float16"):
        Adam([p], lr=1e-3, clip_value=256.0, **path).step()


NO_C_KERNEL_PATHS = [p for p in PATHS if not p.values[0].get("fused")]


@pytest.mark.parametrize("path", NO_C_KERNEL_PATHS)
@pytest.mark.parametrize(
    ("dtype", "kwargs", "grad"),
    [
        pytest.param(torch.float16, {}, 6e4, id="float16-unclipped"),  # 6e4 squared overflows float16
        pytest.param(torch.float32, {"weight_decay": 1e30, "clip_value": 1.0}, 1.0, id="float32-l2-decay"),
    ],
)
def test_an_update_that_would_overflow_is_skipped_and_raised_by_name(path, dtype, kwargs, grad) -> None:
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    opt = Adam([p], lr=1e-3, eps=1e-3, **kwargs, **path)
    p.grad = torch.full((4,), grad, dtype=dtype)
    opt.step()
    assert opt.skipped_steps.item() == 1
    assert torch.equal(p, torch.ones(4, dtype=dtype)) and not opt.state[p]["exp_avg_sq"].any()
    strict = Adam([p], lr=1e-3, eps=1e-3, on_nonfinite="raise", **kwargs, **path)
    with pytest.raises(ContractViolation, match="second moment \\(its square\\) would overflow"):
        strict.step()


def test_the_default_float32_cpu_path_skips_an_l2_update_that_would_overflow() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = Adam([p], lr=1e-3, weight_decay=1e30, fused=None)
    opt.step()
    assert opt.skipped_steps.item() == 1 and torch.equal(p, torch.ones(4))


def test_repr_names_every_policy() -> None:
    opt = Adam(make_model().parameters(), clip_value=1.0, on_empty="skip")
    assert "clip_value=1.0, on_nonfinite='skip', on_empty='skip', fused=None, foreach=None" in repr(opt)


def test_argument_violation_is_exported() -> None:
    import provetrain

    assert provetrain.ArgumentViolation is ArgumentViolation
    with pytest.raises(provetrain.ArgumentViolation):
        provetrain.Adam(make_model().parameters(), lr=-1.0)


@pytest.mark.parametrize("opt_cls", [Adam, AdamW])
def test_float16_on_the_reference_path_refuses_an_eps_that_rounds_to_zero(opt_cls) -> None:
    """torch's loop in float16 with eps=1e-8 (0 in float16) writes 0/0 = NaN where a gradient element is 0;
    provetrain's reference path refuses before anything changes, and steps finitely with an eps float16 holds
    or on the multi-tensor path (float32 math)."""

    def setup(**kwargs):
        w = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)).half())
        return w, opt_cls([w], lr=1e-2, clip_value=1.0, **kwargs)

    w_torch = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)).half())
    torch_opt = torch.optim.Adam([w_torch], lr=1e-2, foreach=False)
    w_torch.grad = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).half()
    torch_opt.step()
    assert torch.isnan(w_torch[0]) and torch.isfinite(w_torch[1])  # the hazard, in torch itself
    w, opt = setup(fused=False)
    before = w.detach().clone()
    w.grad = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).half()
    with pytest.raises(ValueError, match=r"eps=1e-08 rounds to 0 in float16.*Use eps >= 6e-8"):
        opt.step()
    assert torch.equal(w, before) and not opt.state  # nothing changed, no state made
    for kwargs in (dict(fused=False, eps=6e-8), dict(fused=False, eps=1e-4), dict()):
        w, opt = setup(**kwargs)
        for _ in range(3):
            w.grad = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]).half()
            opt.step()
        assert torch.isfinite(w).all(), kwargs
