"""backward-pass-v1: the gradient check on users' models, and FALSIFY-BACKWARD-001..004 as their predictions say."""

from __future__ import annotations

import math
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from provetrain import clip_grad_norm_
from provetrain.cli import app
from provetrain.verify import suite
from provetrain.verify.gradient_check import DEFAULT_TOLERANCE, check_gradients
from provetrain.verify.suite import exact_norm_at_most


class _ScaledTanh(torch.autograd.Function):
    """tanh whose backward is off by ``factor``: the bug a gradient check exists to catch."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, factor: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.factor = factor  # type: ignore[attr-defined]
        return torch.tanh(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * (1 - torch.tanh(x) ** 2) * ctx.factor, None  # type: ignore[attr-defined]


class _TanhNet(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 4)
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return _ScaledTanh.apply(self.linear(x), self.factor)


def _mlp() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)), torch.randn(32, 6)


# ------------------------------------------------------------------------------------ the gradient check


def _conv() -> tuple[nn.Module, Tensor]:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.GELU(), nn.Flatten(), nn.Linear(12, 2))
    return model, torch.randn(4, 1, 4, 4)


def _embedding() -> tuple[nn.Module, Tensor]:
    return nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 5)), torch.randint(0, 20, (3, 7))


@pytest.mark.parametrize(
    "make", [_mlp, _conv, _embedding], ids=["mlp-relu", "conv-batchnorm-gelu", "embedding-layernorm"]
)
def test_correct_backward_passes_with_errors_far_below_the_tolerance(
    make: Callable[[], tuple[nn.Module, Tensor]],
) -> None:
    torch.manual_seed(0)
    model, inputs = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_gradients(model, inputs, samples=4)
    assert report.passed, report.failures()
    assert report.max_error < 1e-6
    assert len(report.tensors) == sum(1 for p in model.parameters() if p.requires_grad)
    assert report.forward_passes >= 2 * sum(t.coordinates for t in report.tensors)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is not touched


def test_a_backward_off_by_one_percent_fails_and_names_the_coordinate() -> None:
    torch.manual_seed(0)
    good = check_gradients(_TanhNet(1.0), torch.randn(8, 6))
    bad = check_gradients(_TanhNet(1.01), torch.randn(8, 6))
    assert good.passed and not bad.passed
    # |a - n| / |a| = 0.01 / 1.01 where the coordinate's gradient is above its tensor's floor; less below it
    assert all(DEFAULT_TOLERANCE < t.max_error <= 0.01 / 1.01 + 1e-6 for t in bad.tensors)
    failures = bad.failures()
    assert len(failures) == 2 and failures[0].startswith("linear.weight[")
    assert re.search(r"analytical .*, numerical .*, error \d\.\d\de-03 > 0\.001", failures[0])


def test_zero_gradients_are_compared_at_the_tensors_scale_not_relatively() -> None:
    """Dead ReLU units and an unused parameter: analytical exactly 0, numerical rounding noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].bias[:32] = -100.0  # half the hidden units never fire
    model.register_parameter("unused", nn.Parameter(torch.randn(3)))
    report = check_gradients(model, torch.randn(16, 4), samples=64)
    by_name = {t.name: t for t in report.tensors}
    assert by_name["unused"].analytical == 0.0 and by_name["unused"].max_error <= 1e-6
    assert report.passed, report.failures()


def test_nonfinite_gradients_are_found_in_the_models_own_dtype() -> None:
    """(w * 1e-44)^0.1 has a finite float32 forward and an inf float32 gradient (0.1 u^-0.9 with u a float32
    subnormal overflows); in float64 the gradient is finite, so only the model's own dtype shows it."""

    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 1.0]))
            self.b = nn.Parameter(torch.tensor([0.5]))

        def forward(self, x: Tensor) -> Tensor:
            return x * torch.cat([(self.w * 1e-44) ** 0.1, self.b])

    report = check_gradients(Overflow(), torch.ones(1, 3))
    assert report.nonfinite == ("w",)
    assert not report.gradients_finite and not report.passed


def test_a_gradient_nonfinite_in_float64_too_fails_at_its_coordinate() -> None:
    """sqrt(|w|) at w = 0: the analytical gradient is NaN (0 * inf) in every dtype, so the comparison's error
    is NaN. The report fails at that coordinate with an infinite error (it raised UnboundLocalError)."""

    class SqrtAtZero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0]))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.w.abs().sqrt()

    report = check_gradients(SqrtAtZero(), torch.ones(2, 1))
    assert report.nonfinite == ("w",) and not report.gradients_match and not report.passed
    (tensor,) = report.tensors
    assert tensor.max_error == math.inf and math.isnan(tensor.analytical) and tensor.numerical == 0.0
    assert report.failures() == ["w[0]: analytical nan, numerical 0.000000e+00, error inf > 0.001"]


def test_a_nan_gradient_beside_zero_gradients_fails_only_at_itself() -> None:
    """w[0] has a NaN gradient, w[1:] none at all (analytical and numerical exactly 0): the tensor's floor is
    taken over its finite gradients, so the zeros compare at 0 error (a NaN floor gave 0 / 0)."""

    class NanBesideZeros(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))

        def forward(self, x: Tensor) -> Tensor:
            return x * torch.cat([self.w[:1].abs().sqrt(), self.w[1:] * 0.0])

    report = check_gradients(NanBesideZeros(), torch.ones(2, 4), samples=4)
    (tensor,) = report.tensors
    assert tensor.coordinates == 4 and tensor.max_error == math.inf and tensor.worst_index == (0,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 0}, "samples must be an integer >= 1"),
        ({"samples": True}, "samples must be an integer >= 1"),
        ({"tolerance": 0.0}, "tolerance must be a finite number > 0"),
        ({"tolerance": math.nan}, "tolerance must be a finite number > 0"),
        ({"loss_fn": lambda out: out}, "loss_fn must return a floating scalar tensor, got (32, 4)"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    model, inputs = _mlp()
    with pytest.raises(ValueError, match=re.escape(message)):
        check_gradients(model, inputs, **kwargs)  # type: ignore[arg-type]


def test_a_model_that_cannot_run_in_float64_is_reported_not_crashed() -> None:
    class Float32Only(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.linear(x) @ torch.eye(2, dtype=torch.float32)  # matmul does not promote dtypes

    with pytest.raises(ValueError, match="runs the model in float64, and its forward raised"):
        check_gradients(Float32Only(), torch.randn(4, 3))
    rows = suite.gradient_check_results(Float32Only(), torch.randn(4, 3))
    assert [r.result for r in rows] == ["unknown", "unknown"] and "not checked" in rows[0].evidence


def test_verify_rows_report_each_tensor() -> None:
    model, inputs = _mlp()
    match, finite = suite.gradient_check_results(model, inputs, samples=2)
    assert (match.clause, match.result, finite.result) == ("backward-pass-v1: proof_obligations[0]", "pass", "pass")
    assert [d["tensor"] for d in match.details] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(d["coordinates"] == 2 and d["max_error"] <= DEFAULT_TOLERANCE for d in match.details)
    bad = suite.gradient_check_results(_TanhNet(1.01), torch.randn(8, 6))
    assert bad[0].result == "fail" and "FAILED linear.weight[" in bad[0].evidence


def test_verify_cli_runs_the_gradient_check_on_a_factory_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def build():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(4, 5)

            def not_a_model():
                return "a string"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_models", raising=False)
    # Only the gradient rows: the other checks (and their z3 proof) have their own tests.
    monkeypatch.setattr(
        suite,
        "run_verification",
        lambda model, inputs, *, thorough, gradient_samples: suite.gradient_check_results(
            model, inputs, samples=gradient_samples
        ),
    )
    runner = CliRunner()
    result = runner.invoke(app, ["verify", "--model", "user_models:build", "--gradient-samples", "5"])
    assert result.exit_code == 0, result.output
    assert "gradient check per tensor" in result.output
    assert re.search(r"0\.weight\s*│\s*\(7, 5\)\s*│\s*5\s*│", result.output)
    for spec, message in [
        ("user_models:not_a_model", "returned str; expected a torch.nn.Module"),
        ("no_such_module:build", "cannot import module 'no_such_module'"),
        ("user_models:missing", "has no callable 'missing'"),
    ]:
        failed = runner.invoke(app, ["verify", "--model", spec])
        assert failed.exit_code == 2 and message in failed.output and "Traceback" not in failed.output


# ------------------------------------------------------------------------------ falsification tests


def _softmax_backward_formula(y: Tensor, g: Tensor) -> Tensor:
    """The contract's softmax_backward: dL/dx_i = y_i * (dL/dy_i - sum_k y_k dL/dy_k)."""
    return y * (g - (y * g).sum(-1, keepdim=True))


class _SoftmaxOf(nn.Module):
    def __init__(self, logits: Tensor, softmax: object = torch.softmax) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)
        self.softmax = softmax

    def forward(self, _: Tensor) -> Tensor:
        return self.softmax(self.logits, -1)  # type: ignore[operator]


class _WrongSoftmax(torch.autograd.Function):
    """Softmax whose backward forgets the sum term (y_i * g_i): a Jacobian-vector product gone wrong."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, dim: int) -> Tensor:
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> tuple[Tensor, None]:
        (y,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return y * g, None


@pytest.mark.contract("FALSIFY-BACKWARD-001")
def test_falsify_backward_001_softmax_gradient_matches_finite_differences() -> None:
    """Analytical softmax gradient matches finite-difference within 1e-3 (and the contract's formula)."""
    generator = torch.Generator().manual_seed(1)
    for scale in (0.1, 1.0, 10.0):
        logits = torch.randn(3, 9, generator=generator) * scale
        report = check_gradients(_SoftmaxOf(logits.clone()), torch.zeros(1), samples=27, tolerance=1e-3)
        assert report.passed, report.failures()
        x = logits.double().requires_grad_()
        y = torch.softmax(x, -1)
        g = torch.randn(3, 9, generator=generator, dtype=torch.float64)
        (grad,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(grad, _softmax_backward_formula(y.detach(), g), rtol=1e-12, atol=1e-15)
    wrong = check_gradients(_SoftmaxOf(logits.clone(), _WrongSoftmax.apply), torch.zeros(1), samples=27)
    assert not wrong.passed  # the check tells a wrong Jacobian-vector product apart


@pytest.mark.contract("FALSIFY-BACKWARD-002")
def test_falsify_backward_002_matmul_gradients_are_the_transposed_products() -> None:
    """dL/dA = dL/dC @ B^T and dL/dB = A^T @ dL/dC, and both match finite differences."""
    generator = torch.Generator().manual_seed(2)
    for m, k, n in [(1, 1, 1), (3, 5, 2), (7, 4, 6)]:  # non-square: swapped transposes would not even fit
        a = torch.randn(m, k, generator=generator, dtype=torch.float64, requires_grad=True)
        b = torch.randn(k, n, generator=generator, dtype=torch.float64, requires_grad=True)
        g = torch.randn(m, n, generator=generator, dtype=torch.float64)
        (a @ b).backward(g)
        assert a.grad is not None and b.grad is not None
        assert a.grad.shape == a.shape and b.grad.shape == b.shape
        torch.testing.assert_close(a.grad, g @ b.detach().T, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.grad, a.detach().T @ g, rtol=1e-12, atol=1e-14)

    class MatMul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 3, generator=generator))
            self.b = nn.Parameter(torch.randn(3, 5, generator=generator))

        def forward(self, _: Tensor) -> Tensor:
            return self.a @ self.b

    report = check_gradients(MatMul(), torch.zeros(1), samples=15)
    assert report.passed, report.failures()


@pytest.mark.contract("FALSIFY-BACKWARD-003")
def test_falsify_backward_003_gradient_norm_at_most_clip_value_after_clipping() -> None:
    """Gradient norm <= clip_value after clipping: the exact real norm of the stored values, no rounding."""
    generator = torch.Generator().manual_seed(3)
    for trial in range(200):
        params = [torch.zeros(int(torch.randint(1, 200, (), generator=generator))) for _ in range(3)]
        magnitude = 10.0 ** float(torch.empty(()).uniform_(-10, 37, generator=generator))
        for p in params:
            values = torch.randn(p.shape, generator=generator, dtype=torch.float64) * magnitude
            p.grad = values.clamp(-3e38, 3e38).float()
        clip = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=generator))
        norm_before = clip_grad_norm_(params, clip)
        grads = [p.grad for p in params]
        assert exact_norm_at_most(grads, clip), (trial, float(norm_before), clip)
        assert all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.contract("FALSIFY-BACKWARD-004")
def test_falsify_backward_004_gradient_flows_to_a_only_when_only_a_requires_grad() -> None:
    """Grad computed for A, None for B when only A requires grad."""
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(4, 2)
    out = a @ b
    assert out.requires_grad
    out.sum().backward()
    assert a.grad is not None and a.grad.shape == a.shape
    assert b.grad is None
    torch.testing.assert_close(a.grad, torch.ones(3, 2) @ b.T)
    # and the other way round, in a model: a frozen parameter gets no gradient, the trainable one does
    model = nn.Linear(4, 2)
    model.weight.requires_grad_(False)
    model(torch.randn(5, 4)).sum().backward()
    assert model.weight.grad is None and model.bias.grad is not None


def test_gradients_of_a_shared_parameter_add_up_and_pass_the_check() -> None:
    """Gradient accumulation is additive for shared parameters: a layer used twice gets the sum of both uses'
    gradients, and the finite-difference check agrees with that sum."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.shared(torch.tanh(self.shared(x)))

    torch.manual_seed(0)
    model, x = Tied(), torch.randn(5, 4)
    report = check_gradients(model, x, samples=20)
    assert report.passed, report.failures()
    # the sum of the two uses, taken apart with a detached copy of the weight in each
    w, b = model.shared.weight, model.shared.bias
    first = torch.tanh(x @ w.T + b)
    (whole,) = torch.autograd.grad((first @ w.T + b).sum(), w)
    (outer,) = torch.autograd.grad((first.detach() @ w.T + b).sum(), w)
    (inner,) = torch.autograd.grad((torch.tanh(x @ w.T + b) @ w.detach().T + b).sum(), w)
    torch.testing.assert_close(whole, outer + inner, rtol=1e-6, atol=1e-7)


def test_a_loss_that_does_not_reach_the_parameters_is_reported_not_crashed() -> None:
    model, inputs = _mlp()
    with pytest.raises(ValueError, match="its backward raised RuntimeError"):
        check_gradients(model, inputs, loss_fn=lambda out: out.detach().sum())
