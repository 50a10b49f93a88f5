"""``provetrain verify``: every falsification test and proof obligation of the contract, run on a model.

Each check returns a :class:`CheckResult` naming the clause, the method (falsification, property test,
SMT proof, parity), the result and the evidence it produced. The falsification tests follow the contract's
``test`` text and run on the caller's model, so a user can evidence the contract for their own network:

- FALSIFY-TRAIN-001 "Inject large gradients, verify clipped": gradients of the model's own shapes at
  magnitudes up to float32's largest, clipped by ``provetrain.clip_grad_norm_``; the exact real norm of the
  stored values is compared with the clip value (exact rational arithmetic, no rounding in the check).
- FALSIFY-TRAIN-002 "Train on random data, check each step": 100 guarded AdamW steps on random inputs and
  labels, the loss checked finite at every step.
- FALSIFY-TRAIN-003 "Same input, compare CUDA and CPU outputs": :func:`provetrain.verify.parity.forward_parity`.

From the sibling contract backward-pass-v1, its obligations "Analytical gradient matches numerical gradient"
(tolerance 1e-3) and "Gradient finite": :func:`provetrain.verify.gradient_check.check_gradients` on the model
(float64 central differences on a few seeded coordinates per parameter tensor), one row each, the first with
each tensor's largest error in ``details``.

The ``lean_theorem`` loss_decrease cites is reported as what is really shown for it
(``provetrain.contract.bindings.THEOREMS``): a z3 proof of non-negativity under stated axioms, not a Lean
proof and not decrease; and, as its own row, the float32 fact training relies on, checked on the model's
logits (:mod:`provetrain.verify.cross_entropy`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from provetrain.data.sources import call_user_function, load_digits
from provetrain.errors import ContractViolation
from provetrain.models.builtin import build_model
from provetrain.ops.adam import AdamW
from provetrain.ops.clip import clip_grad_norm_

__all__ = ["CheckResult", "exact_norm_at_most", "gradient_check_results", "model_and_inputs", "run_verification"]

Method = Literal[
    "falsification", "property test", "smt proof", "smt proof under axioms", "parity", "finite differences", "backward"
]
Result = Literal["pass", "fail", "unknown"]


@dataclass(frozen=True)
class CheckResult:
    """One verified clause: what was checked, how, with what outcome and evidence."""

    clause: str
    text: str
    method: Method
    result: Result
    evidence: str
    seconds: float
    details: tuple[dict[str, Any], ...] = ()


def exact_norm_at_most(tensors: Sequence[Tensor], bound: float) -> bool:
    """Whether the exact real L2 norm of the stored values is ``<= bound``, decided without rounding error.

    Squares of float16/bfloat16/float32 values are exact in float64 and ``math.fsum`` rounds their sum
    correctly, so the exact sum lies within half an ulp of it; when ``bound²`` falls inside that interval
    (or the values are float64, whose squares are not exact), the sum is redone in exact rationals.
    """
    values = [v for t in tensors for v in t.detach().to("cpu", torch.float64).flatten().tolist()]
    if not all(math.isfinite(v) for v in values):
        return False
    limit = Fraction(bound) ** 2
    exact_squares = all(t.dtype != torch.float64 for t in tensors)
    total = math.fsum(v * v for v in values) if exact_squares else math.inf
    if math.isfinite(total):
        half_ulp = Fraction(math.ulp(total)) / 2
        if Fraction(total) + half_ulp <= limit:
            return True
        if Fraction(total) - half_ulp > limit:
            return False
    return sum(Fraction(v) ** 2 for v in values) <= limit


def _model_grads(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def falsify_train_001(model: nn.Module, *, trials: int, seed: int = 0) -> tuple[Result, str]:
    """Inject large gradients into the model's parameters, clip, and verify the exact bound."""
    generator = torch.Generator().manual_seed(seed)
    params = _model_grads(copy.deepcopy(model).float())
    failures = 0
    for trial in range(trials):
        magnitude = 10.0 ** float(torch.empty(()).uniform_(0, 37, generator=generator))
        clip = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=generator))
        for p in params:
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * magnitude
            p.grad = noise.clamp(-3.0e38, 3.0e38).to(torch.float32)
        if trial == 0:  # the overflow case torch gets wrong: every entry at float32's largest finite magnitude
            for p in params:
                p.grad = torch.full_like(p, 3.0e38)
        clip_grad_norm_(params, clip)
        grads = [p.grad for p in params]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        nonzero = any(bool(g.ne(0).any()) for g in grads)
        if not (finite and nonzero and exact_norm_at_most(grads, clip)):
            failures += 1
    evidence = f"{trials} injections up to 3e38 on {sum(p.numel() for p in params):,} parameters; exact norm <= clip"
    return ("pass" if failures == 0 else "fail"), evidence + (f"; {failures} FAILED" if failures else "")


def _random_batch(model_inputs: Tensor, outputs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if model_inputs.is_floating_point():
        x = torch.randn(model_inputs.shape, generator=generator, dtype=model_inputs.dtype)
    else:
        x = torch.randint(0, int(model_inputs.max()) + 1, model_inputs.shape, generator=generator)
    y = torch.randint(0, outputs.shape[-1], outputs.shape[:-1], generator=generator)
    return x, y


def falsify_train_002(model: nn.Module, inputs: Tensor, *, steps: int = 100, seed: int = 0) -> tuple[Result, str]:
    """Train on random data with the guarded optimizer; every step's loss must be finite."""
    generator = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(model).float().train()
    optimizer = AdamW(net.named_parameters(), lr=1e-3, clip_value=1.0, on_nonfinite="raise")
    with torch.no_grad():
        sample = net(inputs)
    losses = []
    for step in range(steps):
        x, y = _random_batch(inputs, sample, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x).flatten(0, -2), y.flatten())
        losses.append(float(loss.detach()))  # host read: this check exists to look at every step's loss
        if not math.isfinite(losses[-1]):
            return "fail", f"loss {losses[-1]} at step {step}"
        loss.backward()
        try:
            optimizer.step(loss=loss.detach())
        except ContractViolation as violation:
            return "fail", f"step {step}: {violation}"
    return "pass", f"{steps} steps on random data, every loss finite (last {losses[-1]:.4g})"


def _timed(function: Callable[[], tuple[Result, str]]) -> tuple[Result, str, float]:
    started = time.perf_counter()
    result, evidence = function()
    return result, evidence, time.perf_counter() - started


def _parity(model: nn.Module, inputs: Tensor) -> tuple[Result, str]:
    from provetrain.verify.parity import forward_parity

    results = [r for r in forward_parity(model, inputs) if r.obligation]
    worst = max(results, key=lambda r: r.max_abs_error)
    what = f"{worst.candidate} vs {worst.reference}"
    if worst.reference == "cpu-float64":
        what = "no CUDA device: float32 CPU vs float64 CPU reference"
    return ("pass" if all(r.passed for r in results) else "fail"), f"{what}, max abs error {worst.max_abs_error:.2e}"


def _clip_sweep(trials: int) -> tuple[Result, str]:
    """Random gradient lists in every supported dtype and mixed, clipped, the exact bound checked."""
    generator = torch.Generator().manual_seed(1)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    failures = 0
    for trial in range(trials):
        chosen = [dtypes[trial % 4]] if trial % 5 else dtypes
        grads = []
        for dtype in chosen:
            limit = {torch.float16: 4, torch.bfloat16: 37, torch.float32: 37, torch.float64: 300}[dtype]
            scale = 10.0 ** float(torch.empty(()).uniform_(-limit, limit, generator=generator))
            size = int(torch.randint(1, 300, (), generator=generator))
            values = torch.randn(size, generator=generator, dtype=torch.float64) * scale
            finite_max = torch.finfo(dtype).max / 2
            grads.append(values.clamp(-finite_max, finite_max).to(dtype))
        clip = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=generator))
        holders = [torch.zeros_like(g) for g in grads]
        for holder, grad in zip(holders, grads, strict=True):
            holder.grad = grad
        clip_grad_norm_(holders, clip)
        grads = [h.grad for h in holders]
        if not exact_norm_at_most(grads, clip) or not all(bool(torch.isfinite(g).all()) for g in grads):
            failures += 1
    evidence = f"{trials} random gradient lists (fp32, bf16, fp16, fp64, mixed; 1e-300..1e300), exact norm <= clip"
    return ("pass" if failures == 0 else "fail"), evidence + (f"; {failures} FAILED" if failures else "")


def _kani(bound: int, *, every_path: bool) -> tuple[Result, str]:
    from provetrain.verify.prove import prove_clip_bound
    from provetrain.verify.smt_clip import ARITHMETICS

    report = prove_clip_bound(bound, arithmetics=ARITHMETICS if every_path else ARITHMETICS[:1])
    scope = "every path and dtype" if every_path else "reference path, float32"
    used = f"{report.rlimit_used} z3 resource units, {report.seconds:.1f}s"
    return ("pass" if report.proved else "unknown"), f"z3, {scope}, sqrt stubbed (stub_float); {used}"


def _cross_entropy_proof() -> tuple[Result, str]:
    from provetrain.verify.cross_entropy import AXIOMS, prove_cross_entropy_nonnegative

    proofs = prove_cross_entropy_nonnegative(8)
    proved = all(p.result == "proved" for p in proofs)
    evidence = (
        f"z3 over the reals, 1..{len(proofs)} classes, from the axioms only: {'; '.join(AXIOMS)}. "
        "Not the cited Lean proof; non-negativity, not decrease"
    )
    return ("pass" if proved else "fail"), evidence


def _training_loss(model: nn.Module, inputs: Tensor) -> tuple[Result, str]:
    from provetrain.verify.cross_entropy import loss_is_finite_and_nonnegative

    with torch.no_grad():
        logits = copy.deepcopy(model).float().eval()(inputs)
    flat = logits.flatten(0, -2)
    targets = torch.arange(flat.shape[0]) % flat.shape[-1]
    # The model's logits, and the same stretched to |z| = 1e30 both ways: far beyond anything training sees,
    # and inside the range where the float32 loss is finite (batch * (spread + log classes) < 3.4e38).
    largest = float(flat.abs().max()) or 1.0
    cases = {
        "as they are": flat,
        "scaled to max |z| = 1e30": flat * (1e30 / largest),
        "negated": flat * (-1e30 / largest),
    }
    failed = [name for name, z in cases.items() if not loss_is_finite_and_nonnegative(z, targets)]
    evidence = (
        f"float32 cross-entropy, per example and batch mean, on the model's logits ({', '.join(cases)}): "
        "finite and >= 0"
    )
    return ("pass" if not failed else "fail"), evidence + (f"; FAILED {', '.join(failed)}" if failed else "")


def model_and_inputs(spec: str | None, input_shape: str | None = None) -> tuple[nn.Module, Tensor]:
    """The built-in digits MLP on digits test images, or a user's ``module:factory``.

    A factory returns a model, or ``(model, example_inputs)``; with a model alone, ``--input-shape`` gives
    the shape of a random standard-normal input batch. The model's forward is run once on the inputs, so a
    model and inputs that do not fit raise a ``ValueError`` here, naming the factory.
    """
    if spec is None:
        data = load_digits(seed=0)
        torch.manual_seed(0)
        return build_model("mlp", data), data.test.tensors[0][:256]
    made = call_user_function(spec, "model", {})
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module) or not (inputs is None or isinstance(inputs, Tensor)):
        raise TypeError(
            f"model {spec!r} returned {_kind(made)}; expected a torch.nn.Module or a (module, input tensor) pair"
        )
    if inputs is None:
        if input_shape is None:
            raise ValueError(
                f"model {spec!r} returned only a model: give --input-shape (e.g. 8,64) or return (model, inputs)"
            )
        inputs = torch.randn(*_parse_shape(input_shape), generator=torch.Generator().manual_seed(0))
    _check_forward(model, inputs, spec)
    return model, inputs


def _kind(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(type(v).__name__ for v in value) + ")"
    return type(value).__name__


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--input-shape {text!r}: expected positive integers separated by commas, e.g. 8,64")
    return tuple(int(part) for part in parts)


@torch.no_grad()
def _check_forward(model: nn.Module, inputs: Tensor, spec: str) -> None:
    """One forward in eval mode (no buffer changes) on a copy, named in the error when it fails."""
    try:
        copy.deepcopy(model).eval()(inputs)
    except Exception as error:
        raise ValueError(
            f"model {spec!r} does not run on inputs of shape {tuple(inputs.shape)}: {type(error).__name__}: {error}"
        ) from None


def gradient_check_results(model: nn.Module, inputs: Tensor, *, samples: int = 3) -> list[CheckResult]:
    """backward-pass-v1's gradient obligations on ``model``: two rows, the first with per-tensor details.

    A model that cannot be checked (its forward fails in float64) gives ``unknown`` rows saying why."""
    from provetrain.verify.gradient_check import check_gradients

    started = time.perf_counter()
    try:
        report = check_gradients(model, inputs, samples=samples)
    except ValueError as error:
        seconds = time.perf_counter() - started
        return [
            CheckResult(clause, text, method, "unknown", f"not checked: {error}", seconds)
            for clause, text, method in _GRADIENT_ROWS
        ]
    seconds = time.perf_counter() - started
    worst = max(report.tensors, key=lambda t: t.max_error)
    match = (
        f"{sum(t.coordinates for t in report.tensors)} coordinates of {len(report.tensors)} tensors, float64 "
        f"central differences ({report.forward_passes} forwards); max error {report.max_error:.2e} "
        f"({worst.name}), tolerance {report.tolerance:g}"
    )
    failures = report.failures()
    match += f"; FAILED {'; '.join(failures)}" if failures else ""
    details = tuple(
        {
            "tensor": t.name,
            "shape": list(t.shape),
            "coordinates": t.coordinates,
            "max_error": t.max_error,
            "analytical": t.analytical,
            "numerical": t.numerical,
            "index": list(t.worst_index),
            "result": "pass" if t.max_error <= report.tolerance else "fail",
        }
        for t in report.tensors
    )
    finite = f"one backward in the model's own dtype: every gradient of {len(report.tensors)} tensors finite"
    if report.nonfinite:
        finite = f"one backward in the model's own dtype: NaN/Inf in the gradient of {', '.join(report.nonfinite)}"
    match_row, finite_row = _GRADIENT_ROWS
    return [
        CheckResult(*match_row, "pass" if report.gradients_match else "fail", match, seconds, details),
        CheckResult(*finite_row, "pass" if report.gradients_finite else "fail", finite, 0.0),
    ]


_GRADIENT_ROWS: tuple[tuple[str, str, Method], tuple[str, str, Method]] = (
    ("backward-pass-v1: proof_obligations[0]", "Analytical gradient matches numerical gradient", "finite differences"),
    ("backward-pass-v1: proof_obligations[1]", "Gradient finite", "backward"),
)


def run_verification(
    model: nn.Module,
    inputs: Tensor,
    *,
    thorough: bool = False,
    proof_bound: int | None = None,
    gradient_samples: int = 3,
) -> list[CheckResult]:
    """Run every falsification test and obligation check on ``model`` (one example batch ``inputs``), then
    backward-pass-v1's gradient check (``gradient_samples`` coordinates per parameter tensor)."""
    with torch.no_grad():
        outputs = copy.deepcopy(model).float().eval()(inputs)
    if not isinstance(outputs, Tensor) or outputs.ndim < 2 or not outputs.is_floating_point():
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"verify trains the model as a classifier: its forward must return logits, a float tensor of shape "
            f"(batch..., classes); it returned {shape}"
        )
    trials = 200 if thorough else 20
    bound = proof_bound if proof_bound is not None else (4 if thorough else 2)
    plan: list[tuple[str, str, Method, Callable[[], tuple[Result, str]]]] = [
        ("FALSIFY-TRAIN-001", "Gradient norm ≤ clip_value after clipping", "falsification",
         lambda: falsify_train_001(model, trials=trials)),
        ("FALSIFY-TRAIN-002", "No NaN/Inf in loss for 100 steps", "falsification",
         lambda: falsify_train_002(model, inputs)),
        ("FALSIFY-TRAIN-003", "Forward pass produces same output within tolerance", "parity",
         lambda: _parity(model, inputs)),
        ("proof_obligations[0]", "Gradient norm bounded after clipping", "property test",
         lambda: _clip_sweep(10 * trials)),
        ("train-kani-001", f"Gradient norm bounded after clipping (bound {bound})", "smt proof",
         lambda: _kani(bound, every_path=thorough)),
        ("loss_decrease.lean_theorem", "CrossEntropy.NonNegativity, shown as: CE >= 0 over the reals",
         "smt proof under axioms", _cross_entropy_proof),
        ("loss_decrease.lean_theorem", "the loss training reads is finite and >= 0 in float32", "property test",
         lambda: _training_loss(model, inputs)),
    ]  # fmt: skip
    results = []
    for clause, text, method, check in plan:
        result, evidence, seconds = _timed(check)
        results.append(CheckResult(clause, text, method, result, evidence, seconds))
    results.extend(gradient_check_results(model, inputs, samples=gradient_samples))
    return results
