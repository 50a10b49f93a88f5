"""lr_max from the curvature: exact on quadratics, a real stability boundary, clear errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from provetrain import ContractViolation
from provetrain.train.lr_max import (
    LrMaxEstimate,
    check_lr_below_max,
    estimate_lr_max,
    preconditioned_top_eigenvalue,
    preconditioner_from_torch_adam,
    top_hessian_eigenvalue,
)

DTYPE = torch.float64


def _matrix(eigenvalues: list[float], *, rotated: bool, seed: int = 0) -> torch.Tensor:
    """``Q diag(λ) Qᵀ`` with a random orthogonal Q (or Q = I)."""
    lam = torch.tensor(eigenvalues, dtype=DTYPE)
    if not rotated:
        return torch.diag(lam)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=DTYPE))
    return q @ torch.diag(lam) @ q.T


def _quadratic(a: torch.Tensor, *, seed: int = 1) -> tuple[list[torch.Tensor], object]:
    """``½ xᵀAx`` with x split over two tensors of different shapes (the HVP must reassemble them)."""
    n = a.shape[0]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, generator=g, dtype=DTYPE)
    first = x0[: n // 2].clone().requires_grad_(True)
    second = x0[n // 2 :].clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        x = torch.cat([first, second])
        return 0.5 * x @ a @ x

    return [first, second], loss_fn


SPECTRA = {
    "diagonal": ([10.0, 5.0, 1.0, 0.1], False),
    "rotated": ([10.0, 5.0, 1.0, 0.1], True),
    "rotated-50": ([float(k) for k in torch.linspace(0.01, 40.0, 50)], True),
    "tiny-curvature": ([3e-6, 1e-6, 5e-7], True),
}


@pytest.mark.parametrize("name", SPECTRA)
def test_top_eigenvalue_is_exact_on_quadratics(name: str) -> None:
    eigenvalues, rotated = SPECTRA[name]
    params, loss_fn = _quadratic(_matrix(eigenvalues, rotated=rotated))
    value = top_hessian_eigenvalue(loss_fn, params, iterations=500)
    assert value == pytest.approx(max(eigenvalues), rel=1e-4)


def test_magnitude_keeps_the_sign_and_positive_skips_negative_curvature() -> None:
    params, loss_fn = _quadratic(_matrix([-20.0, 5.0, 1.0], rotated=True))
    assert top_hessian_eigenvalue(loss_fn, params, iterations=500) == pytest.approx(-20.0, rel=1e-4)
    assert top_hessian_eigenvalue(loss_fn, params, iterations=500, which="positive") == pytest.approx(5.0, rel=1e-4)
    estimate = estimate_lr_max(loss_fn, params, optimizer="sgd", iterations=500)
    assert estimate.lr_max == pytest.approx(2.0 / 5.0, rel=1e-4)
    assert estimate.converged


@pytest.mark.parametrize("eigenvalues", [[-3.0, -1.0], [0.0, 0.0]])
def test_no_positive_curvature_sets_no_bound(eigenvalues: list[float]) -> None:
    params, loss_fn = _quadratic(_matrix(eigenvalues, rotated=True))
    estimate = estimate_lr_max(loss_fn, params, optimizer="sgd", iterations=500)
    assert estimate.lr_max == math.inf
    assert "no positive curvature" in estimate.explanation
    check_lr_below_max(1e6, estimate)


def test_linear_loss_has_zero_hessian() -> None:
    w = torch.ones(3, dtype=DTYPE, requires_grad=True)
    assert top_hessian_eigenvalue(lambda: (2 * w).sum(), [w]) == 0.0


def test_matches_the_full_hessian_of_a_small_network() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DTYPE)
    x, y = torch.randn(16, 3, dtype=DTYPE), torch.randn(16, 1, dtype=DTYPE)
    params = list(net.parameters())
    shapes = [p.shape for p in params]

    def flat_loss(flat: torch.Tensor) -> torch.Tensor:
        tensors, start = [], 0
        for shape in shapes:
            n = math.prod(shape)
            tensors.append(flat[start : start + n].view(shape))
            start += n
        names = [name for name, _ in net.named_parameters()]
        out = torch.func.functional_call(net, dict(zip(names, tensors, strict=True)), (x,))
        return torch.nn.functional.mse_loss(out, y)

    flat = torch.cat([p.detach().flatten() for p in params])
    hessian = torch.autograd.functional.hessian(flat_loss, flat)
    expected = torch.linalg.eigvalsh(hessian)
    dominant = expected[expected.abs().argmax()].item()
    value = top_hessian_eigenvalue(lambda: torch.nn.functional.mse_loss(net(x), y), params, iterations=2000, tol=1e-7)
    assert value == pytest.approx(dominant, rel=1e-4)


def test_measuring_does_not_consume_the_global_rng() -> None:
    params, loss_fn = _quadratic(_matrix([4.0, 1.0], rotated=True))
    before = torch.get_rng_state()
    estimate_lr_max(loss_fn, params, optimizer="adam")
    assert torch.equal(before, torch.get_rng_state())


# --- the boundary is real: 0.95·lr_max converges, 1.05·lr_max diverges ------------------------------


@pytest.mark.parametrize(("factor", "converges"), [(0.95, True), (1.05, False)])
def test_sgd_at_the_measured_lr_max(factor: float, converges: bool) -> None:
    params, loss_fn = _quadratic(_matrix([10.0, 4.0, 2.0, 1.0], rotated=True))
    estimate = estimate_lr_max(loss_fn, params, optimizer="sgd", iterations=500)
    assert estimate.lr_max == pytest.approx(0.2, rel=1e-4)
    sgd = torch.optim.SGD(params, lr=factor * estimate.lr_max)
    initial = loss_fn().item()
    for _ in range(400):
        sgd.zero_grad()
        loss_fn().backward()
        sgd.step()
    final = loss_fn().item()
    assert (final < 1e-6 * initial) if converges else (final > 1e6 * initial)


def _frozen_adam(a: torch.Tensor, p: torch.Tensor, lr: float, beta1: float, steps: int) -> float:
    """EMA momentum in the metric P on ``½ xᵀAx``: ``m ← β₁m + (1 − β₁)Ax``, ``x ← x − lr P⁻¹m``."""
    x = torch.ones(a.shape[0], dtype=DTYPE)
    m = torch.zeros_like(x)
    for _ in range(steps):
        m = beta1 * m + (1 - beta1) * (a @ x)
        x = x - lr * m / p
    return float(x.norm())


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
@pytest.mark.parametrize(("factor", "converges"), [(0.95, True), (1.05, False)])
def test_frozen_preconditioner_adam_at_the_measured_lr_max(beta1: float, factor: float, converges: bool) -> None:
    a = _matrix([10.0, 4.0, 2.0, 1.0], rotated=True)
    p = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=DTYPE)
    params, loss_fn = _quadratic(a)
    preconditioner = [p[:2], p[2:]]
    estimate = estimate_lr_max(
        loss_fn, params, optimizer="adam", betas=(beta1, 0.999), preconditioner=preconditioner, iterations=500
    )
    exact = torch.linalg.eigvalsh(a / torch.outer(p.sqrt(), p.sqrt())).max().item()
    assert estimate.eigenvalue == pytest.approx(exact, rel=1e-4)
    assert estimate.lr_max == pytest.approx((2 + 2 * beta1) / ((1 - beta1) * exact), rel=1e-4)
    assert estimate.preconditioner == "given"
    norm = _frozen_adam(a, p, factor * estimate.lr_max, beta1, steps=3000)
    # A diverging run overflows to inf and then nan (inf − inf) within 3000 steps.
    assert (norm < 1e-6) if converges else not (norm < 1e6)


def test_preconditioned_eigenvalue_is_that_of_p_inverse_h() -> None:
    a = _matrix([6.0, 3.0, 0.5, 0.2], rotated=True, seed=3)
    p = torch.tensor([0.1, 3.0, 1.0, 0.7], dtype=DTYPE)
    params, loss_fn = _quadratic(a)
    value = preconditioned_top_eigenvalue(loss_fn, params, [p[:2], p[2:]], iterations=1000)
    expected = torch.linalg.eigvals(torch.diag(1 / p) @ a).real.max().item()
    assert value == pytest.approx(expected, rel=1e-4)


def test_adam_estimates_its_preconditioner_from_the_gradient() -> None:
    a = _matrix([10.0, 4.0, 2.0, 1.0], rotated=True)
    params, loss_fn = _quadratic(a)
    x0 = torch.cat([p.detach() for p in params])
    p = (a @ x0).abs() + 1e-8
    estimate = estimate_lr_max(loss_fn, params, iterations=1000)
    expected = torch.linalg.eigvalsh(a / torch.outer(p.sqrt(), p.sqrt())).max().item()
    assert estimate.preconditioner == "gradient"
    assert estimate.eigenvalue == pytest.approx(expected, rel=1e-4)
    assert estimate.lr_max == pytest.approx(38.0 / expected, rel=1e-4)
    assert "38" in estimate.explanation and "arXiv:2207.14484" in estimate.explanation


def test_zero_gradient_coordinates_are_called_out() -> None:
    a = _matrix([2.0, 1.0], rotated=False)
    x = torch.tensor([1.0, 0.0], dtype=DTYPE, requires_grad=True)
    estimate = estimate_lr_max(lambda: 0.5 * x @ a @ x, [x])
    assert "near-zero gradient" in estimate.explanation
    assert estimate.lr_max == pytest.approx(38.0 * (1e-8 + 1e-12) / 1.0, rel=1e-3)


def test_preconditioner_from_torch_adam_is_the_denominator_of_its_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, dtype=DTYPE, requires_grad=True)
    adam = torch.optim.Adam([w], lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    for _ in range(3):
        adam.zero_grad()
        (w**4).sum().backward()
        adam.step()
    adam.zero_grad()
    (w**4).sum().backward()
    state = adam.state[w]
    step = float(state["step"]) + 1
    m_hat = (0.8 * state["exp_avg"] + 0.2 * w.grad) / (1 - 0.8**step)
    before = w.detach().clone()
    adam.step()
    (p,) = preconditioner_from_torch_adam(adam, [w])
    torch.testing.assert_close(w.detach(), before - 1e-2 * m_hat / p, rtol=0, atol=1e-14)


# --- the precondition and bad input -----------------------------------------------------------------


def test_check_lr_below_max_raises_the_contract_clause() -> None:
    params, loss_fn = _quadratic(_matrix([10.0, 1.0], rotated=True))
    estimate = estimate_lr_max(loss_fn, params, optimizer="sgd", iterations=500)
    check_lr_below_max(0.19, estimate)
    with pytest.raises(ContractViolation, match=re.escape("`lr < lr_max` violated at step 7")) as info:
        check_lr_below_max(0.21, estimate, step=7)
    assert info.value.equation == "loss_decrease"
    assert info.value.observed["lr"] == 0.21


def test_estimate_is_a_frozen_record() -> None:
    params, loss_fn = _quadratic(_matrix([1.0, 0.5], rotated=False))
    estimate = estimate_lr_max(loss_fn, params, optimizer="sgd")
    assert isinstance(estimate, LrMaxEstimate)
    with pytest.raises(AttributeError):
        estimate.lr_max = 1.0  # type: ignore[misc]


W = torch.ones(3, requires_grad=True)
FROZEN = torch.ones(3)


BAD_INPUTS = [
    ("no params", lambda: top_hessian_eigenvalue(lambda: W.sum(), []), ContractViolation, r"!params\.is_empty\(\)"),
    ("param without grad", lambda: top_hessian_eigenvalue(lambda: W.sum(), [FROZEN]), ValueError, r"params\[0\]"),
    ("param twice", lambda: top_hessian_eigenvalue(lambda: W.sum(), [W, W]), ValueError, "appears twice"),
    ("loss not scalar", lambda: top_hessian_eigenvalue(lambda: W**2, [W]), ValueError, r"shape \(3,\).*\.mean\(\)"),
    (
        "loss detached",
        lambda: top_hessian_eigenvalue(lambda: (W**2).sum().detach(), [W]),
        ValueError,
        "without an autograd",
    ),
    ("loss not a tensor", lambda: top_hessian_eigenvalue(lambda: 1.0, [W]), TypeError, "got float"),
    (
        "loss not finite",
        lambda: top_hessian_eigenvalue(lambda: (W**2).sum() * float("nan"), [W]),
        ValueError,
        "non-finite",
    ),
    ("iterations < 1", lambda: top_hessian_eigenvalue(lambda: (W**2).sum(), [W], iterations=0), ValueError, ">= 1"),
    ("tol <= 0", lambda: top_hessian_eigenvalue(lambda: (W**2).sum(), [W], tol=0.0), ValueError, "tol must"),
    ("which", lambda: top_hessian_eigenvalue(lambda: (W**2).sum(), [W], which="min"), ValueError, "which must"),
    ("optimizer", lambda: estimate_lr_max(lambda: (W**2).sum(), [W], optimizer="rmsprop"), ValueError, "'sgd' or"),
    ("betas", lambda: estimate_lr_max(lambda: (W**2).sum(), [W], betas=(1.0, 0.9)), ValueError, r"\[0, 1\)"),
    ("eps", lambda: estimate_lr_max(lambda: (W**2).sum(), [W], eps=0.0), ValueError, "eps must"),
    ("samples", lambda: estimate_lr_max(lambda: (W**2).sum(), [W], gradient_samples=0), ValueError, "gradient_samp"),
    (
        "preconditioner with sgd",
        lambda: estimate_lr_max(lambda: (W**2).sum(), [W], optimizer="sgd", preconditioner=[FROZEN]),
        ValueError,
        "only used with optimizer='adam'",
    ),
    (
        "preconditioner count",
        lambda: preconditioned_top_eigenvalue(lambda: (W**2).sum(), [W], []),
        ValueError,
        "one tensor per parameter",
    ),
    (
        "preconditioner shape",
        lambda: preconditioned_top_eigenvalue(lambda: (W**2).sum(), [W], [torch.ones(2)]),
        ValueError,
        r"shape \(2,\)",
    ),
    (
        "preconditioner not positive",
        lambda: preconditioned_top_eigenvalue(lambda: (W**2).sum(), [W], [torch.zeros(3)]),
        ValueError,
        "> 0 everywhere",
    ),
    (
        "optimizer without state",
        lambda: preconditioner_from_torch_adam(torch.optim.Adam([W]), [W]),
        ValueError,
        "no Adam state",
    ),
]


@pytest.mark.parametrize(("name", "call", "error", "message"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_refused_clearly(name: str, call: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]
