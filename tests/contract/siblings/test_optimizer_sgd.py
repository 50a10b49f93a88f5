"""optimizer-v1 on provetrain's SGD with momentum: the update equation, its preconditions, convergence on
strongly convex quadratics below 2 / L, and FALSIFY-OPT-003 as its prediction says."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from provetrain import SGD, ContractViolation
from tests.contract.siblings.test_optimizer import _loss, _quadratic


def _run(steps: int, *, lr: float, momentum: float, seed: int = 5) -> tuple[list[Tensor], list[Tensor], SGD]:
    """``steps`` SGD steps on parameter-independent gradients; returns the parameters after each step, the
    gradients used, and the optimizer."""
    g = torch.Generator().manual_seed(seed)
    theta = nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64))
    optimizer = SGD([theta], lr=lr, momentum=momentum)
    trajectory, grads = [theta.detach().clone()], []
    for _ in range(steps):
        theta.grad = torch.randn(3, 2, generator=g, dtype=torch.float64)
        grads.append(theta.grad.clone())
        optimizer.step()
        trajectory.append(theta.detach().clone())
    return trajectory, grads, optimizer


def test_sgd_without_momentum_is_theta_minus_lr_grad() -> None:
    """Without momentum (mu=0), reduces to theta -= lr * grad (one rounding apart: torch fuses the product)."""
    trajectory, grads, optimizer = _run(6, lr=0.1, momentum=0.0)
    for before, after, grad in zip(trajectory, trajectory[1:], grads, strict=False):
        torch.testing.assert_close(after, before - 0.1 * grad, rtol=1e-15, atol=1e-16)
    assert all(not state for state in optimizer.state.values())  # no velocity is kept


def test_sgd_velocity_accumulates_the_gradient_history() -> None:
    """v_t = mu v_{t-1} - lr grad_t, theta_t = theta_{t-1} + v_t (the contract's form; torch's buffer b with
    v = -lr b for a constant lr): every step, and one velocity per parameter, shaped like it."""
    lr, mu = 0.05, 0.9
    trajectory, grads, optimizer = _run(8, lr=lr, momentum=mu)
    v = torch.zeros_like(trajectory[0])
    theta = trajectory[0].clone()
    for t, grad in enumerate(grads, start=1):
        v = mu * v - lr * grad
        theta = theta + v
        torch.testing.assert_close(trajectory[t], theta, rtol=1e-12, atol=1e-14)
    (param,) = optimizer.param_groups[0]["params"]
    buffer = optimizer.state[param]["momentum_buffer"]
    assert buffer.shape == param.shape
    torch.testing.assert_close(-lr * buffer, v, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "lr > 0.0"), ({"lr": -0.1}, "lr > 0.0"), ({"momentum": -0.5}, "momentum value: -0.5")],
)
def test_sgd_refuses_each_violated_precondition(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises((ContractViolation, ValueError), match=re.escape(message)):
        SGD([nn.Parameter(torch.ones(2))], **{"lr": 0.1, **kwargs})
    with pytest.raises(ContractViolation, match=re.escape("!params.is_empty()")):
        SGD([], lr=0.1)


def test_a_non_finite_gradient_leaves_every_parameter_and_velocity_as_it_was() -> None:
    """params.iter().all(|p| p.is_finite()): a step whose gradient is not finite is skipped, bit for bit."""
    theta = nn.Parameter(torch.ones(4))
    optimizer = SGD([theta], lr=0.1, momentum=0.9)
    theta.grad = torch.ones(4)
    optimizer.step()
    before, buffer = theta.detach().clone(), optimizer.state[theta]["momentum_buffer"].clone()
    theta.grad = torch.tensor([1.0, math.nan, 1.0, math.inf])
    optimizer.step()
    assert torch.equal(theta.detach(), before) and bool(torch.isfinite(theta).all())
    assert torch.equal(optimizer.state[theta]["momentum_buffer"], buffer)
    assert int(optimizer.skipped_steps) == 1


def _descend(lr_times_l: float, momentum: float, steps: int) -> tuple[list[float], list[float]]:
    """SGD on three quadratics (eigenvalues 1..L) at lr = lr_times_l / L: final relative distances, losses."""
    problems = [_quadratic(seed=seed) for seed in range(3)]
    thetas = [torch.zeros_like(star, requires_grad=True) for _, star, _ in problems]
    optimizer = SGD(thetas, lr=lr_times_l / problems[0][2], momentum=momentum)
    losses = []
    for step in range(steps + 1):
        optimizer.zero_grad()
        total = sum(_loss(a, star)(t) for (a, star, _), t in zip(problems, thetas, strict=True))
        losses.append(float(total.detach()))
        if step < steps:
            total.backward()
            optimizer.step()
    distances = [
        float((t.detach() - star).norm() / star.norm()) for (_, star, _), t in zip(problems, thetas, strict=True)
    ]
    return distances, losses


def test_sgd_below_two_over_l_reaches_the_minimiser_and_above_it_diverges() -> None:
    """Convergence on strongly convex quadratics: lr < 2 / L (here 1 / L and 1.9 / L) reaches theta* within
    1e-6 from 0, with and without momentum; lr = 2.1 / L, past the clause's bound, diverges."""
    for lr_times_l, momentum in ((1.0, 0.0), (1.9, 0.0), (1.0, 0.5)):
        distances, losses = _descend(lr_times_l, momentum, 300)
        assert all(math.isfinite(x) for x in losses) and losses[-1] <= losses[0]
        assert max(distances) <= 1e-6, (lr_times_l, momentum, distances)
    _, losses = _descend(2.1, 0.0, 100)
    assert losses[-1] > losses[0]


@pytest.mark.contract("FALSIFY-OPT-003")
def test_falsify_opt_003_momentum_reaches_a_lower_loss_in_the_same_budget() -> None:
    """SGD with momentum reaches a lower loss than without in the same step budget (ill-conditioned
    quadratics, condition number 10, lr = 1 / L, 60 steps), on each quadratic."""
    problems = [_quadratic(seed=seed) for seed in range(3)]
    finals = {}
    for momentum in (0.0, 0.5):
        thetas = [torch.zeros_like(star, requires_grad=True) for _, star, _ in problems]
        optimizer = SGD(thetas, lr=1.0 / problems[0][2], momentum=momentum)
        for _ in range(60):
            optimizer.zero_grad()
            sum(_loss(a, star)(t) for (a, star, _), t in zip(problems, thetas, strict=True)).backward()
            optimizer.step()
        finals[momentum] = [float(_loss(a, star)(t).detach()) for (a, star, _), t in zip(problems, thetas, strict=True)]
    assert all(with_momentum < 0.1 * plain for with_momentum, plain in zip(finals[0.5], finals[0.0], strict=True))


def test_sgd_zero_grad_clears_every_gradient() -> None:
    model = nn.Linear(3, 2)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
