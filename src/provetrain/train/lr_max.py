"""An estimate of the largest stable learning rate at a point, from the curvature.

``loss_decrease`` holds "for sufficiently small lr", with domain ``lr ∈ (0, lr_max)``, but the contract does
not define ``lr_max``: the bound its precondition ``lr < lr_max`` checks is the one the user declares. This
module estimates one from the local model: the top eigenvalue of the (preconditioned) Hessian by power
iteration on Hessian-vector products, and the stability threshold of the optimizer on the local quadratic.
The Trainer reports it (``lr_max: auto``) and does not enforce it: it is a one-point, frozen-preconditioner
model, and real Adam trains well above it (``bench/lr_max_divergence.py`` measures where training really
diverges on the built-in models; README has the table).

The math
--------
Near θ the loss is modelled by its quadratic ``L(θ + δ) ≈ L(θ) + gᵀδ + ½ δᵀHδ``.

*Gradient descent* ``δ ← δ − η(g + Hδ)`` multiplies the component along an eigenvector of H with eigenvalue
λ by ``1 − ηλ`` each step, so it is stable iff ``0 < ηλ < 2`` for every λ > 0:

.. math::  \\mathrm{lr\\_max}_{\\mathrm{SGD}} = 2 / \\lambda_{\\max}(H)

(the "edge of stability" of Cohen et al. 2021, *Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability*, arXiv:2103.00065).

*Adam with a frozen preconditioner* ``P = diag(sqrt(v̂)) + ε`` is EMA momentum in the metric P:
``m ← β₁m + (1 − β₁)∇L``, ``θ ← θ − ηP⁻¹m``. In the eigenbasis of the symmetric ``P^{-1/2} H P^{-1/2}``
(similar to P⁻¹H, so with the same eigenvalues) each mode obeys
``x_{t+1} = (1 + β₁ − a) x_t − β₁ x_{t−1}`` with ``a = ηλ(1 − β₁)``. Its characteristic polynomial
``z² − (1 + β₁ − a)z + β₁`` has both roots in the unit disc (Jury's criterion) iff ``0 < a < 2(1 + β₁)``:

.. math::  \\mathrm{lr\\_max}_{\\mathrm{Adam}} = \\frac{2 + 2\\beta_1}{(1 - \\beta_1)\\,\\lambda_{\\max}(P^{-1}H)}

which is the threshold ``λ₁(P⁻¹H) = (2 + 2β₁) / (η(1 − β₁))``, i.e. 38/η for β₁ = 0.9, of Cohen et al. 2022,
*Adaptive Gradient Methods at the Edge of Stability* (arXiv:2207.14484). β₂ does not enter: it only sets
how fast P follows the gradients, and the model freezes P.

Which preconditioner, when none is given (``preconditioner=None``, e.g. before training): P is estimated
from the gradient at the point, ``P = sqrt(mean_k g_k²) + ε`` over ``gradient_samples`` calls of
``loss_fn``. That is Adam's own bias-corrected ``sqrt(v̂) + ε`` if the gradient stayed at these values
(after one step ``v̂₁ = g₁²`` exactly), and ``E[g²]`` when each call draws a fresh minibatch. Coordinates
whose gradient is (near) zero get P ≈ ε and dominate λ(P⁻¹H): the frozen model then predicts a tiny
lr_max that real Adam escapes by adapting v; the explanation says so when it happens. Once training has
run, pass the optimizer's own P (:func:`preconditioner_from_torch_adam`).

Negative curvature: power iteration finds the eigenvalue of largest *magnitude*. For lr_max the largest
*positive* one matters; if the dominant one is negative (λ_m < 0), power iteration is rerun on the
positive semi-definite shift ``A − λ_m I`` and λ_m added back. Directions of negative curvature are not
unstable for the step size (moving along them lowers the quadratic); if there is no positive curvature at
all the local model sets no bound and ``lr_max = inf``.

Limits (say them when you report lr_max): the model is local, valid at the point measured; on a minibatch
closure it measures that minibatch's curvature, which is noisy; curvature changes during training (it
typically rises until it meets the threshold: progressive sharpening); Adam's bias correction
``1/(1 − β₁ᵗ)`` enlarges the first few steps beyond the asymptotic model; and stability of the quadratic is
not descent of a non-quadratic loss. Re-measure as training proceeds.

Guarantees
----------
For the symmetric operator A (H or ``P^{-1/2} H P^{-1/2}``) each result carries the Rayleigh quotient
``ρ = vᵀAv`` of a unit vector v and the residual ``r = ‖Av − ρv‖``. In exact arithmetic there is an
eigenvalue of A in ``[ρ − r, ρ + r]`` (Krylov–Bogoliubov), and ``converged`` means ``r ≤ tol·|ρ|``. From a
random start power iteration reaches the dominant eigenvalue with probability 1, at rate ``|λ₂/λ₁|^k``.
ρ never exceeds λ_max, so an estimate that has not converged can only *understate* λ_max and *overstate*
lr_max: treat ``converged=False`` as optimistic. The default start vector comes from a private generator
seeded with 0: measuring lr_max never consumes the global RNG (exact resume depends on it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from provetrain.errors import ContractViolation

__all__ = [
    "LrMaxEstimate",
    "PowerBudget",
    "check_lr_below_max",
    "estimate_lr_max",
    "preconditioned_top_eigenvalue",
    "preconditioner_from_batches",
    "preconditioner_from_torch_adam",
    "top_hessian_eigenvalue",
]

LossFn = Callable[[], Tensor]
Operator = Callable[[list[Tensor]], list[Tensor]]
Which = Literal["magnitude", "positive"]

# Below this multiple of ε a coordinate's P is "eps-dominated": its gradient is (near) zero.
_EPS_DOMINATED = 10.0


@dataclass(frozen=True)
class LrMaxEstimate:
    """A measured ``lr_max`` and how it was obtained.

    Attributes:
        lr_max: the stability threshold of the optimizer on the local quadratic (``inf`` without positive
            curvature).
        eigenvalue: the largest positive eigenvalue used: λ_max(H) for SGD, λ_max(P⁻¹H) for Adam
            (≤ 0 when there is none).
        method: ``"sgd"`` or ``"adam"``.
        preconditioner: ``"none"`` (SGD), ``"given"`` or ``"gradient"`` (estimated at the point).
        iterations: Hessian-vector products spent (both power iterations when a shift was needed).
        converged: the relative residual reached ``tol``; if not, ``lr_max`` is optimistic.
        residual: ``‖Av − ρv‖`` of the final vector: an eigenvalue lies within it of ``eigenvalue``.
        explanation: one paragraph for humans: formula, source, numbers, caveats.
        stopped: what ended the power iteration before convergence or its iteration limit: ``""`` (nothing),
            ``"products"`` or ``"seconds"`` (the :class:`PowerBudget` ran out).
    """

    lr_max: float
    eigenvalue: float
    method: str
    preconditioner: str
    iterations: int
    converged: bool
    residual: float
    explanation: str
    stopped: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (a non-finite number as its string, ``"inf"``: strict JSON has no infinity)."""
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> LrMaxEstimate:
        """The estimate :meth:`to_dict` recorded (a checkpoint keeps it for the resumed run's certificate)."""
        numbers = {k: float(record[k]) for k in ("lr_max", "eigenvalue", "residual")}
        return cls(**{**record, **numbers})


@dataclass
class PowerBudget:
    """What an estimate may spend (the Trainer's ``lr_max_budget``): at most ``products`` Hessian-vector
    products over all its power iterations, until ``seconds`` of wall time have passed since it was made
    (``None``: no limit), calling ``progress(products_done)`` after each product. Spent state lives here:
    one budget, one estimate."""

    products: int | None = None
    seconds: float | None = None
    progress: Callable[[int], None] | None = None
    done: int = 0
    stopped: str = ""
    _deadline: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.seconds is not None:
            self._deadline = time.monotonic() + self.seconds

    def spend(self) -> bool:
        """Count one product; ``False`` once the budget is spent (``stopped`` says which limit)."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done)
        if self.products is not None and self.done >= self.products:
            self.stopped = "products"
        elif self._deadline is not None and time.monotonic() >= self._deadline:
            self.stopped = "seconds"
        return not self.stopped


class _Eigen(NamedTuple):
    value: float
    iterations: int
    converged: bool
    residual: float
    vector: list[Tensor] | None = None  # the last iterate, to continue from


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    *,
    iterations: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    which: Which = "magnitude",
) -> float:
    """Top eigenvalue of the Hessian of ``loss_fn()`` with respect to ``params``, by power iteration.

    ``which="magnitude"`` returns the eigenvalue of largest magnitude, with its sign; ``"positive"`` the
    largest positive one (``≤ 0`` if there is none), via a shift when the dominant one is negative.
    ``loss_fn`` is called once; its graph is differentiated twice (``torch.autograd.grad`` of the gradient).
    ``generator`` (a CPU generator) draws the start vector; by default a private one seeded with 0.
    """
    params = _check_params(params)
    _check_iteration_args(iterations, tol, which)
    hvp, _ = _hessian_vector_product(loss_fn, params)
    return _top_eigen(hvp, params, iterations, tol, generator, which).value


def preconditioned_top_eigenvalue(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    preconditioner: Sequence[Tensor],
    *,
    iterations: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    which: Which = "magnitude",
) -> float:
    """Top eigenvalue of ``P⁻¹H`` for a diagonal preconditioner P (one positive tensor per parameter).

    Power iteration runs on the symmetric ``P^{-1/2} H P^{-1/2}``, which has the same eigenvalues as P⁻¹H.
    For Adam, ``P = sqrt(v̂) + ε`` (:func:`preconditioner_from_torch_adam`). Other arguments as in
    :func:`top_hessian_eigenvalue`.
    """
    params = _check_params(params)
    _check_iteration_args(iterations, tol, which)
    inv_sqrt = _check_preconditioner(preconditioner, params)
    hvp, _ = _hessian_vector_product(loss_fn, params)
    return _top_eigen(_precondition(hvp, inv_sqrt), params, iterations, tol, generator, which).value


def estimate_lr_max(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    *,
    optimizer: Literal["sgd", "adam"] = "adam",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    preconditioner: Sequence[Tensor] | None = None,
    gradient_samples: int = 1,
    iterations: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    budget: PowerBudget | None = None,
) -> LrMaxEstimate:
    """The largest stable learning rate at the current point (see the module docstring for the math).

    SGD: ``2 / λ_max(H)``. Adam: ``(2 + 2β₁) / ((1 − β₁) λ_max(P⁻¹H))`` (Cohen et al. 2022). Adam's P is
    ``preconditioner`` when given, else ``sqrt(mean g²) + eps`` over ``gradient_samples`` calls of
    ``loss_fn`` (the first call also serves the Hessian). Only positive curvature bounds the step; with
    none, ``lr_max = inf``. ``budget`` caps the products and the wall time of all power iterations
    together and reports progress; a spent budget ends the iteration unconverged (``stopped`` says why).
    """
    params = _check_params(params)
    _check_iteration_args(iterations, tol, "positive")
    _check_optimizer_args(optimizer, betas, eps, gradient_samples)
    budget = budget or PowerBudget()
    with _double_backward_capable():
        estimate = _estimate(
            loss_fn, params, optimizer, betas, eps, preconditioner, gradient_samples, iterations, tol, generator, budget
        )
    if not budget.stopped or estimate.converged:
        return estimate
    limit = f"{budget.products} Hessian-vector products" if budget.stopped == "products" else f"{budget.seconds:g} s"
    note = f" Stopped by the budget ({limit}) before converging."
    return LrMaxEstimate(**{**asdict(estimate), "stopped": budget.stopped, "explanation": estimate.explanation + note})


@contextmanager
def _double_backward_capable() -> Iterator[None]:
    """Hessian-vector products need double backward: the math SDPA backend has it (CPU flash attention does
    not), and an operator without it gets an error that says what to do instead of an autograd traceback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except RuntimeError as error:
        if "derivative for" not in str(error) and "double backward" not in str(error):
            raise
        raise ValueError(
            f"estimate_lr_max needs second derivatives (Hessian-vector products), which this model does not "
            f"support: {error}. Give lr_max as a number (or null) instead of 'auto'"
        ) from None


def _estimate(
    loss_fn: LossFn,
    params: list[Tensor],
    optimizer: str,
    betas: tuple[float, float],
    eps: float,
    preconditioner: Sequence[Tensor] | None,
    gradient_samples: int,
    iterations: int,
    tol: float,
    generator: torch.Generator | None,
    budget: PowerBudget,
) -> LrMaxEstimate:
    hvp, grad = _hessian_vector_product(loss_fn, params)
    if optimizer == "sgd":
        if preconditioner is not None:
            raise ValueError(
                "estimate_lr_max: preconditioner is only used with optimizer='adam', got optimizer='sgd'; "
                "drop preconditioner or set optimizer='adam'"
            )
        top = _top_eigen(hvp, params, iterations, tol, generator, "positive", budget)
        return _sgd_estimate(top)
    source = "given" if preconditioner is not None else "gradient"
    if preconditioner is None:
        preconditioner = _preconditioner_from_gradients(loss_fn, params, grad, gradient_samples, eps)
    inv_sqrt = _check_preconditioner(preconditioner, params)
    top = _top_eigen(_precondition(hvp, inv_sqrt), params, iterations, tol, generator, "positive", budget)
    return _adam_estimate(top, betas[0], source, _eps_dominated_fraction(preconditioner, eps))


def preconditioner_from_torch_adam(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[Tensor]:
    """Adam's current diagonal preconditioner ``P = sqrt(v / (1 − β₂ᵗ)) + ε``, one tensor per parameter.

    Reads ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad), ``step`` and the group's ``betas``/``eps`` from a
    ``torch.optim.Adam`` or ``AdamW``: exactly the denominator of its update ``θ ← θ − η m̂ / P``.
    """
    params = _check_params(params)
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    result = []
    for index, p in enumerate(params):
        state = optimizer.state.get(p, {})
        if id(p) not in groups or "exp_avg_sq" not in state:
            raise ValueError(
                f"preconditioner_from_torch_adam: params[{index}] (shape {tuple(p.shape)}) has no Adam state; "
                "it must belong to this optimizer, which must have taken at least one step"
            )
        group = groups[id(p)]
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = float(state["step"])
        bias_correction2 = 1.0 - group["betas"][1] ** step
        result.append((v / bias_correction2).sqrt() + group["eps"])
    return result


def preconditioner_from_batches(
    loss_fns: Sequence[LossFn], params: Iterable[Tensor], *, eps: float = 1e-8
) -> list[Tensor]:
    """``P = sqrt(mean_b g_b²) + ε``: the preconditioner Adam's bias-corrected ``v̂`` would hold after seeing
    these batches with β₂ → 1, measured before training starts.

    One gradient alone makes ``P ≈ ε`` wherever that batch's gradient happens to be near zero, so
    ``λ_max(P⁻¹H)`` explodes and ``lr_max`` comes out orders of magnitude too small (measured on the digits MLP:
    6e-5 from one batch, 0.12 from 23); averaging over batches is what Adam's ``v`` does.
    """
    params = _check_params(params)
    if not loss_fns:
        raise ValueError("preconditioner_from_batches needs at least one loss function (one per batch)")
    squares = [torch.zeros_like(p) for p in params]
    for loss_fn in loss_fns:
        grads = torch.autograd.grad(_evaluate_loss(loss_fn), params, allow_unused=True)
        for total, grad in zip(squares, grads, strict=True):
            if grad is not None:
                total.addcmul_(grad, grad)
    return [(total / len(loss_fns)).sqrt_().add_(eps) for total in squares]


def check_lr_below_max(lr: float, estimate: LrMaxEstimate, *, step: int | None = None) -> None:
    """Enforce the precondition ``lr < lr_max`` of ``loss_decrease`` with an estimate as the declared bound.

    An explicit choice of the caller: the estimate is a local model (see the module's limits), and rates
    above it often train. The Trainer never calls this; it enforces only a declared number.

    Raises:
        ContractViolation: when ``lr >= estimate.lr_max``, quoting the clause and the measurement.
    """
    if lr < estimate.lr_max:
        return
    raise ContractViolation(
        "loss_decrease",
        "lr < lr_max",
        step=step,
        observed={"lr": lr, "lr_max": estimate.lr_max, "eigenvalue": estimate.eigenvalue},
        hint=f"Lower the learning rate below {estimate.lr_max:.6g}. {estimate.explanation}",
    )


# --- the two thresholds ------------------------------------------------------------------------------


def _sgd_estimate(top: _Eigen) -> LrMaxEstimate:
    lr_max = 2.0 / top.value if top.value > 0 else math.inf
    text = (
        f"Gradient descent is stable on the local quadratic while lr·λ_max(H) < 2 (Cohen et al. 2021); "
        f"λ_max(H) = {top.value:.6g}"
    )
    return _finish(lr_max, top, "sgd", "none", text)


def _adam_estimate(top: _Eigen, beta1: float, source: str, eps_dominated: float) -> LrMaxEstimate:
    threshold = (2.0 + 2.0 * beta1) / (1.0 - beta1)
    lr_max = threshold / top.value if top.value > 0 else math.inf
    where = "P given" if source == "given" else "P = sqrt(mean g²) + eps estimated from the gradient here"
    text = (
        f"Adam with a frozen preconditioner is stable on the local quadratic while lr·λ_max(P⁻¹H) < "
        f"(2 + 2β₁)/(1 − β₁) = {threshold:.6g} for β₁ = {beta1:g} (Cohen et al. 2022, arXiv:2207.14484); "
        f"λ_max(P⁻¹H) = {top.value:.6g} with {where}"
    )
    if eps_dominated > 0:
        text += (
            f". {eps_dominated:.1%} of coordinates have P < {_EPS_DOMINATED:g}·eps (near-zero gradient) and may "
            "dominate λ_max(P⁻¹H): real Adam adapts v there, so this lr_max is pessimistic; pass the optimizer's "
            "P after a few steps (preconditioner_from_torch_adam)"
        )
    return _finish(lr_max, top, "adam", source, text)


def _finish(lr_max: float, top: _Eigen, method: str, source: str, text: str) -> LrMaxEstimate:
    if top.value <= 0:
        text += ": no positive curvature, so the local model sets no bound (lr_max = inf)"
    else:
        text += f", so lr_max = {lr_max:.6g}"
    text += f"; {top.iterations} Hessian-vector products, "
    text += "converged" if top.converged else f"NOT converged (residual {top.residual:.3g}): lr_max is optimistic"
    text += ". Valid at the point measured, for this batch; curvature changes during training, so re-measure."
    return LrMaxEstimate(lr_max, top.value, method, source, top.iterations, top.converged, top.residual, text)


# --- Hessian-vector products and power iteration ---------------------------------------------------


def _evaluate_loss(loss_fn: LossFn) -> Tensor:
    loss = loss_fn()
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a torch.Tensor, got {type(loss).__name__}; return the loss tensor")
    if loss.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar (0-d) loss, got shape {tuple(loss.shape)}; reduce it with .mean() or .sum()"
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn returned a loss without an autograd graph (requires_grad=False); compute it from params with "
            "gradients enabled: not under torch.no_grad(), not via .detach() or .item()"
        )
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"loss_fn returned a non-finite loss ({loss.item()}); curvature is undefined there")
    return loss


def _hessian_vector_product(loss_fn: LossFn, params: list[Tensor]) -> tuple[Operator, list[Tensor]]:
    """``v ↦ Hv`` by double backward on one evaluation of ``loss_fn``, and the gradient there."""
    loss = _evaluate_loss(loss_fn)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    # A gradient that does not require grad is constant in params: its rows of H are zero.
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        if not live:
            return [torch.zeros_like(p) for p in params]
        out = torch.autograd.grad(
            [grads[i] for i in live], params, [v[i] for i in live], retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(out, params, strict=True)]

    return hvp, [g.detach() for g in grads]


def _precondition(hvp: Operator, inv_sqrt: list[Tensor]) -> Operator:
    """``v ↦ P^{-1/2} H P^{-1/2} v``: symmetric, with the eigenvalues of P⁻¹H."""

    def operator(v: list[Tensor]) -> list[Tensor]:
        scaled = hvp([s * x for s, x in zip(inv_sqrt, v, strict=True)])
        return [s * h for s, h in zip(inv_sqrt, scaled, strict=True)]

    return operator


def _top_eigen(
    operator: Operator,
    like: list[Tensor],
    iterations: int,
    tol: float,
    generator: torch.Generator | None,
    which: Which,
    budget: PowerBudget | None = None,
) -> _Eigen:
    budget = budget or PowerBudget()
    # Under a product budget, "positive" keeps half of it for the shifted iteration a negative dominant
    # eigenvalue needs; a positive one continues where it stopped, with the rest.
    share = iterations
    if which == "positive" and budget.products is not None:
        share = min(iterations, max(1, (budget.products - budget.done) // 2))
    dominant = _power_iteration(operator, like, share, tol, generator, 0.0, budget)
    if dominant.value >= 0 and not dominant.converged and not budget.stopped and share < iterations:
        more = _power_iteration(operator, like, iterations - share, tol, generator, 0.0, budget, dominant.vector)
        return more._replace(iterations=dominant.iterations + more.iterations)
    if which == "magnitude" or dominant.value >= 0:
        return dominant
    if budget.stopped:  # no product left for the shifted iteration: the positive eigenvalue is unknown
        return dominant._replace(converged=False)
    # A − λ_m I is positive semi-definite; its dominant eigenvalue is λ_max − λ_m.
    shifted = _power_iteration(operator, like, iterations, tol, generator, dominant.value, budget)
    total = dominant.iterations + shifted.iterations
    return _Eigen(shifted.value + dominant.value, total, shifted.converged, shifted.residual)


def _power_iteration(
    operator: Operator,
    like: list[Tensor],
    iterations: int,
    tol: float,
    generator: torch.Generator | None,
    shift: float,
    budget: PowerBudget,
    start: list[Tensor] | None = None,
) -> _Eigen:
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = start or _normalise([torch.randn(p.shape, generator=generator).to(p) for p in like])
    value, residual = 0.0, math.inf
    for k in range(1, iterations + 1):
        w = [h - shift * x for h, x in zip(operator(v), v, strict=True)] if shift else operator(v)
        value = _dot(v, w)
        residual = _norm([a - value * x for a, x in zip(w, v, strict=True)])
        if residual <= tol * abs(value):
            budget.spend()
            return _Eigen(value, k, True, residual)
        v = _normalise(w)
        if not budget.spend():
            return _Eigen(value, k, False, residual, v)
    return _Eigen(value, iterations, False, residual, v)


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    # Host read: power iteration decides convergence on the host, once per Hessian-vector product.
    return float(sum(torch.sum(x * y, dtype=torch.float64) for x, y in zip(a, b, strict=True)))


def _norm(a: list[Tensor]) -> float:
    return math.sqrt(max(_dot(a, a), 0.0))


def _normalise(a: list[Tensor]) -> list[Tensor]:
    norm = _norm(a)
    return a if norm == 0.0 else [x / norm for x in a]


# --- preconditioners ---------------------------------------------------------------------------------


def _preconditioner_from_gradients(
    loss_fn: LossFn, params: list[Tensor], first: list[Tensor], samples: int, eps: float
) -> list[Tensor]:
    """``sqrt(mean_k g_k²) + eps``: Adam's bias-corrected P if the gradient stayed at these samples."""
    second_moment = [g.square() for g in first]
    for _ in range(samples - 1):
        grads = torch.autograd.grad(_evaluate_loss(loss_fn), params, allow_unused=True)
        second_moment = [
            m + (0 if g is None else g.detach().square()) for m, g in zip(second_moment, grads, strict=True)
        ]
    return [(m / samples).sqrt() + eps for m in second_moment]


def _eps_dominated_fraction(preconditioner: Sequence[Tensor], eps: float) -> float:
    small = sum(int((p < _EPS_DOMINATED * eps).sum()) for p in preconditioner)
    return small / max(sum(p.numel() for p in preconditioner), 1)


# --- argument checks ---------------------------------------------------------------------------------


def _check_params(params: Iterable[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ContractViolation(
            "loss_decrease",
            "!params.is_empty()",
            observed={"params": 0},
            hint="Pass the tensors to differentiate, e.g. list(model.parameters())",
        )
    seen: set[int] = set()
    for index, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{index}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(
                f"params[{index}] (shape {tuple(p.shape)}) has requires_grad=False; pass only trainable tensors"
            )
        if id(p) in seen:
            raise ValueError(f"params[{index}] appears twice in params; pass each tensor once")
        seen.add(id(p))
    return params


def _check_iteration_args(iterations: int, tol: float, which: str) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}; 50 is a usual choice")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite float > 0, got {tol!r}; 1e-4 is the default")
    if which not in ("magnitude", "positive"):
        raise ValueError(f"which must be 'magnitude' or 'positive', got {which!r}")


def _check_optimizer_args(optimizer: str, betas: tuple[float, float], eps: float, samples: int) -> None:
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}; Adam's default is (0.9, 0.999)")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}; Adam's default is 1e-8")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"gradient_samples must be an integer >= 1, got {samples!r}")


def _check_preconditioner(preconditioner: Sequence[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Validate P (positive, finite, shaped like params) and return ``P^{-1/2}``."""
    if len(preconditioner) != len(params):
        raise ValueError(
            f"preconditioner must have one tensor per parameter: got {len(preconditioner)} for {len(params)} params"
        )
    for index, (p, param) in enumerate(zip(preconditioner, params, strict=True)):
        if p.shape != param.shape:
            raise ValueError(
                f"preconditioner[{index}] has shape {tuple(p.shape)}, params[{index}] has {tuple(param.shape)}; "
                "they must match"
            )
        if p.numel() and not bool(torch.all(torch.isfinite(p) & (p > 0))):
            raise ValueError(
                f"preconditioner[{index}] must be finite and > 0 everywhere, min is {p.min().item()!r}; "
                "Adam's P is sqrt(v_hat) + eps with eps > 0"
            )
    return [p.detach().to(param).rsqrt() for p, param in zip(preconditioner, params, strict=True)]
