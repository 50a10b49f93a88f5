"""optimizer-v1 on provetrain's AdamW: the update equation, its preconditions, convergence on strongly convex
quadratics, and FALSIFY-OPT-001, 002, 004, 005 as their predictions say."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from provetrain import Adam, AdamW, ContractViolation
from provetrain.train.schedule import Schedule


def _quadratic(d: int = 10, condition: float = 10.0, seed: int = 0) -> tuple[Tensor, Tensor, float]:
    """f(theta) = 1/2 (theta - theta*)^T A (theta - theta*), A symmetric with eigenvalues 1 .. condition:
    strongly convex, L-smooth with L = condition. Returns (A, theta*, L)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, condition, d, dtype=torch.float64)) @ q.T
    return a, torch.randn(d, generator=g, dtype=torch.float64), condition


def _loss(a: Tensor, star: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda theta: 0.5 * (theta - star) @ a @ (theta - star)


def _minimise(make: Callable[[list[Tensor]], torch.optim.Optimizer], steps: int) -> tuple[list[Tensor], Tensor]:
    """Minimise three quadratics (seeds 0..2) at once, one parameter tensor each: Adam's update is per
    coordinate and nothing here couples the tensors (no clip), so this is three independent runs in one.
    Returns each quadratic's distance to its minimiser after the run, and the losses, shape (steps + 1, 3)."""
    problems = [_quadratic(seed=seed) for seed in range(3)]
    thetas = [torch.zeros_like(star, requires_grad=True) for _, star, _ in problems]
    optimizer = make(thetas)
    losses = []
    for step in range(steps + 1):
        optimizer.zero_grad()
        values = torch.stack([_loss(a, star)(t) for (a, star, _), t in zip(problems, thetas, strict=True)])
        losses.append(values.detach())
        if step < steps:
            values.sum().backward()
            optimizer.step()
    distances = [(t.detach() - star).norm() / star.norm() for (_, star, _), t in zip(problems, thetas, strict=True)]
    return distances, torch.stack(losses)


def _fixed_gradient_run(optimizer_type: type[Adam], steps: int, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """``steps`` steps on gradients that do not depend on the parameters (the same sequence for every run)."""
    g = torch.Generator().manual_seed(7)
    theta = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
    optimizer = optimizer_type([theta], lr=1e-2, **kwargs)
    for _ in range(steps):
        theta.grad = torch.randn(6, generator=g, dtype=torch.float64)
        optimizer.step()
    return theta.detach(), optimizer.state[theta]


# --------------------------------------------------------------------------------------- adamw_update


@pytest.mark.parametrize(
    ("kwargs", "clause"),
    [
        ({"lr": 0.0}, "lr > 0.0"),
        ({"lr": -1e-3}, "lr > 0.0"),
        ({"eps": 0.0}, "eps=0.0 must be > 0"),
        ({"eps": -1e-8}, "eps=-1e-08 must be finite and >= 0"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 must be finite and >= 0"),
    ],
)
def test_adamw_refuses_each_violated_precondition(kwargs: dict[str, float], clause: str) -> None:
    """lr > 0.0, epsilon > 0.0 and weight_decay >= 0.0 are refused at construction, naming the value."""
    with pytest.raises((ContractViolation, ValueError), match=re_escape(clause)):
        AdamW([nn.Parameter(torch.ones(2))], **kwargs)


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_adamw_refuses_empty_params() -> None:
    """!params.is_empty(): no parameter at all is the contract's precondition, named."""
    with pytest.raises(ContractViolation, match=re_escape("!params.is_empty()")):
        AdamW([], lr=1e-3)


def test_update_follows_the_equation_and_keeps_every_parameter() -> None:
    """theta_t = (1 - lr lambda) theta_{t-1} - lr m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^t),
    v_hat = v / (1 - beta2^t); the same parameter tensors, as many, same shapes, all finite after each step."""
    lr, (b1, b2), eps, lam = 1e-2, (0.9, 0.999), 1e-8, 0.1
    g = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in [(3, 2), (4,), ()]]
    before = [id(p) for p in params]
    optimizer = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam)
    expected = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, 6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        optimizer.step()
        for i, grad in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * grad
            v[i] = b2 * v[i] + (1 - b2) * grad * grad
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            expected[i] = (1 - lr * lam) * expected[i] - lr * m_hat / (v_hat.sqrt() + eps)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-15)
        assert [id(p) for p in optimizer.param_groups[0]["params"]] == before
        assert all(bool(torch.isfinite(p).all()) for p in params)
    state = optimizer.state[params[0]]
    assert float(state["step"]) == 5.0  # the t of the bias correction
    torch.testing.assert_close(state["exp_avg"], m[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(state["exp_avg_sq"], v[0], rtol=1e-12, atol=1e-15)


def test_weight_decay_reaches_the_parameters_not_the_moments() -> None:
    """Decoupled decay: with the same gradients, the moments are bit for bit those of a run without decay,
    and only the parameters differ; Adam's L2 decay instead goes through the gradient into the moments."""
    _, plain = _fixed_gradient_run(AdamW, 5, weight_decay=0.0)
    _, decayed = _fixed_gradient_run(AdamW, 5, weight_decay=0.1)
    _, l2 = _fixed_gradient_run(Adam, 5, weight_decay=0.1)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(plain[key], decayed[key])
        assert not torch.equal(plain[key], l2[key])


def test_zero_weight_decay_adamw_equals_adam_bitwise() -> None:
    """Obligation "Zero weight decay AdamW equals Adam": the same trajectory and state, bit for bit."""
    theta_w, state_w = _fixed_gradient_run(AdamW, 20, weight_decay=0.0)
    theta_a, state_a = _fixed_gradient_run(Adam, 20, weight_decay=0.0)
    assert torch.equal(theta_w, theta_a)
    assert all(torch.equal(state_w[k], state_a[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


# ---------------------------------------------------------------------------------------- convergence


def test_adamw_reaches_the_minimiser_of_strongly_convex_quadratics() -> None:
    """Convergence: on f = 1/2 (theta - theta*)^T A (theta - theta*), eigenvalues of A in [1, 10], AdamW without
    decay (which would move the minimiser) ends within 1e-6 (relative) of theta* from 0 on three quadratics,
    every loss finite and the final one below the initial one."""
    distances, losses = _minimise(lambda params: AdamW(params, lr=0.05, weight_decay=0.0), steps=400)
    assert bool(torch.isfinite(losses).all()) and bool((losses[-1] <= losses[0]).all())
    assert all(float(d) <= 1e-6 for d in distances), distances


@pytest.mark.contract("FALSIFY-OPT-001")
def test_falsify_opt_001_adamw_loss_decreases_over_100_steps_on_a_convex_quadratic() -> None:
    """Loss decreases over 100 steps on a convex quadratic, with the default weight decay, for several
    quadratics: the final loss is far below the first and the trend is downward throughout."""
    _, losses = _minimise(lambda params: AdamW(params, lr=0.05), steps=100)
    assert bool(torch.isfinite(losses).all())
    assert bool((losses[-1] < 1e-2 * losses[0]).all())
    assert all(bool((losses[i + 10] < losses[i]).all()) for i in range(0, 90, 10))


@pytest.mark.contract("FALSIFY-OPT-002")
def test_falsify_opt_002_parameters_are_smaller_with_weight_decay() -> None:
    """Parameters smaller with weight decay than without: same gradients, norm strictly smaller, growing
    with the decay."""
    norms = [float(_fixed_gradient_run(AdamW, 50, weight_decay=wd)[0].norm()) for wd in (0.0, 0.1, 1.0)]
    assert norms[0] > norms[1] > norms[2]


@pytest.mark.contract("FALSIFY-OPT-004")
def test_falsify_opt_004_adamw_and_adam_trajectories_differ_with_weight_decay() -> None:
    """AdamW and Adam produce different trajectories with weight decay (decoupled vs L2), and the same one
    without it."""
    assert not torch.equal(
        _fixed_gradient_run(AdamW, 10, weight_decay=0.1)[0], _fixed_gradient_run(Adam, 10, weight_decay=0.1)[0]
    )
    assert torch.equal(
        _fixed_gradient_run(AdamW, 10, weight_decay=0.0)[0], _fixed_gradient_run(Adam, 10, weight_decay=0.0)[0]
    )


@pytest.mark.contract("FALSIFY-OPT-005")
def test_falsify_opt_005_zero_grad_clears_every_gradient() -> None:
    """All parameter gradients are None after zero_grad, in every parameter group, frozen ones untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-4}], lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    optimizer.step()
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.contract("opt-kani-001")
def test_learning_rate_stays_positive_for_every_schedule_up_to_the_bound() -> None:
    """opt-kani-001 ("Learning rate stays positive", bound 4), exhaustively at its bound: every schedule of
    1..4 steps with 0..4 warm-up steps and min_lr_ratio in {0, 0.5} gives lr > 0 at every step (an exhaustive
    run of the shipped schedule over the bounded domain, not a proof); and a non-positive lr is refused."""
    for name in ("constant", "cosine", "linear"):
        for total in range(1, 5):
            for warmup in range(5):
                for ratio in (0.0, 0.5):
                    schedule = Schedule(1e-3, total, name, warmup, ratio)  # type: ignore[arg-type]
                    assert all(schedule.lr(t) > 0.0 for t in range(total + 2))
    with pytest.raises(ContractViolation, match=re_escape("lr > 0.0")):
        AdamW([nn.Parameter(torch.ones(1))], lr=0.0)


@pytest.mark.parametrize("length", [{"steps": 0}, {"epochs": 0}, {"steps": -1}])
def test_a_run_has_at_least_one_step(length: dict[str, int]) -> None:
    """The convergence clause's num_steps > 0: a run of no steps is refused, naming the setting."""
    from provetrain import ConfigError
    from provetrain.train.config import make_config

    (key,) = length
    with pytest.raises(ConfigError, match=key):
        make_config(dict(length))
