"""The proof obligation "CUDA forward matches CPU": ``|forward_cuda(x) - forward_cpu(x)| < 1e-4`` per element.

:func:`forward_parity` runs one input through copies of the model and compares every output element:

- with a CUDA device: CUDA float32 with TF32 **off** against CPU float32 (the obligation), and CUDA with TF32
  **on** reported separately, since TF32's 10-bit mantissa (relative error ~5e-4 per product) commonly
  breaks 1e-4 and is a setting, not a bug;
- without one: CPU float32 against a CPU float64 reference of the same weights, which bounds the float32
  rounding error the CUDA comparison would also see. The result says which comparison was made.

The caller's model is never modified: each comparison runs on a deep copy, and the TF32 flags are restored.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ParityResult", "forward_parity"]

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ParityResult:
    """One output compared between two executions.

    Attributes:
        output: which output (``output``, ``output[1]``, ``output['logits']``).
        reference, candidate: what ran (``cpu-float32``, ``cuda-float32``, ``cuda-tf32``, ``cpu-float64``).
        max_abs_error: largest ``|candidate - reference|`` over elements.
        max_rel_error: largest ``|candidate - reference| / max(|reference|, tiny)``.
        tolerance: the obligation's per-element absolute tolerance.
        obligation: whether this comparison is the contract's obligation (TF32 runs are informational).
    """

    output: str
    reference: str
    candidate: str
    elements: int
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    obligation: bool

    @property
    def passed(self) -> bool:
        return self.max_abs_error < self.tolerance


@contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _flatten(outputs: object, name: str = "output") -> dict[str, Tensor]:
    if isinstance(outputs, Tensor):
        return {name: outputs}
    if isinstance(outputs, Mapping):
        return {k: v for key, value in outputs.items() for k, v in _flatten(value, f"{name}[{key!r}]").items()}
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        return {k: v for i, value in enumerate(outputs) for k, v in _flatten(value, f"{name}[{i}]").items()}
    return {}


@torch.no_grad()
def _run(model: nn.Module, inputs: Sequence[Tensor], device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    replica = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    moved = [x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in inputs]
    outputs = _flatten(replica(*moved))
    if not outputs:
        raise TypeError("the model returned no tensors to compare (expected a tensor, or a tuple/dict of tensors)")
    return {k: v.detach().to("cpu", torch.float64) for k, v in outputs.items()}


def _compare(
    reference: dict[str, Tensor],
    candidate: dict[str, Tensor],
    names: tuple[str, str],
    tolerance: float,
    obligation: bool,
) -> list[ParityResult]:
    results = []
    for key, ref in reference.items():
        got = candidate[key]
        if got.shape != ref.shape:
            raise ValueError(
                f"{key}: shapes differ between {names[0]} {tuple(ref.shape)} and {names[1]} {tuple(got.shape)}"
            )
        error = (got - ref).abs()
        relative = error / ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
        results.append(
            ParityResult(
                key,
                *names,
                ref.numel(),
                float(error.max()) if error.numel() else 0.0,
                float(relative.max()) if error.numel() else 0.0,
                tolerance,
                obligation,
            )
        )
    return results


def forward_parity(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    cuda: bool | None = None,
) -> list[ParityResult]:
    """Compare the model's forward pass across executions (see the module docstring).

    Args:
        model: the model; it is copied, never changed.
        inputs: the positional input(s).
        tolerance: per-element absolute tolerance (the contract's 1e-4).
        cuda: compare against CUDA (default: when a CUDA device exists). ``True`` without CUDA is an error.
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    has_cuda = torch.cuda.is_available()
    if cuda and not has_cuda:
        raise ValueError("cuda=True but torch.cuda.is_available() is False")
    cpu32 = _run(model, inputs, "cpu", torch.float32)
    if cuda is False or not has_cuda:
        cpu64 = _run(model, inputs, "cpu", torch.float64)
        return _compare(cpu64, cpu32, ("cpu-float64", "cpu-float32"), tolerance, True)
    with _tf32(False):
        exact = _run(model, inputs, "cuda", torch.float32)
    with _tf32(True):
        fast = _run(model, inputs, "cuda", torch.float32)
    return _compare(cpu32, exact, ("cpu-float32", "cuda-float32"), tolerance, True) + _compare(
        cpu32, fast, ("cpu-float32", "cuda-tf32"), tolerance, False
    )
