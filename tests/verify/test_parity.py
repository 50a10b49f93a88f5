"""The obligation "CUDA forward matches CPU" (1e-4 per element) and FALSIFY-TRAIN-003."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from provetrain.data.sources import load_digits
from provetrain.models.builtin import build_model, tiny_gpt
from provetrain.verify.parity import forward_parity

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def digits_mlp() -> tuple[nn.Module, torch.Tensor]:
    data = load_digits(seed=0)
    torch.manual_seed(0)
    return build_model("mlp", data), data.test.tensors[0][:128]


def test_float32_cpu_matches_float64_reference_without_cuda() -> None:
    model, inputs = digits_mlp()
    (result,) = forward_parity(model, inputs, cuda=False)
    assert (result.reference, result.candidate, result.obligation) == ("cpu-float64", "cpu-float32", True)
    assert result.elements == 128 * 10
    assert 0 < result.max_abs_error < 1e-5
    assert result.passed


class DriftsInFloat32(nn.Module):
    """Adds 1e-3 only when run in float32: a planted mismatch parity must catch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (1e-3 if x.dtype == torch.float32 else 0.0)


def test_mismatch_above_tolerance_fails() -> None:
    (result,) = forward_parity(DriftsInFloat32(), torch.zeros(4, 3), cuda=False)
    assert result.max_abs_error == pytest.approx(1e-3, rel=1e-3)
    assert not result.passed


def test_every_output_of_a_structured_model_is_compared() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> dict[str, object]:
            return {"a": self.a(x), "rest": (self.b(x), x.sum())}

    results = forward_parity(TwoHeads(), torch.randn(5, 3), cuda=False)
    assert [r.output for r in results] == ["output['a']", "output['rest'][0]", "output['rest'][1]"]


def test_callers_model_is_left_untouched() -> None:
    model, inputs = digits_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward_parity(model, inputs, cuda=False)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_asking_for_cuda_without_a_device_is_an_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=r"cuda=True but torch.cuda.is_available\(\) is False"):
        forward_parity(nn.Linear(2, 2), torch.zeros(1, 2), cuda=True)


@needs_cuda
@pytest.mark.contract("FALSIFY-TRAIN-003")
def test_falsify_train_003_cuda_forward_matches_cpu() -> None:
    """Same input, compare CUDA and CPU outputs (TF32 off): within 1e-4 per element, MLP and transformer."""
    model, inputs = digits_mlp()
    torch.manual_seed(0)
    gpt = tiny_gpt((32,), 50)
    ids = torch.randint(0, 50, (4, 32))
    for net, x in ((model, inputs), (gpt, ids)):
        results = forward_parity(net, x, cuda=True)
        obligation = [r for r in results if r.obligation]
        assert obligation and all(r.passed for r in obligation), obligation
        assert {r.candidate for r in results} == {"cuda-float32", "cuda-tf32"}
