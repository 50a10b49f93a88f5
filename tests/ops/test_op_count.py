"""Ops one multi-tensor step dispatches on the device branch (what a CUDA step launches), pinned; and the lean
divisor of that branch equal, bit for bit, to the general form and to the host form.

On a GPU every dispatched aten op is a kernel launch. The device branch runs here on CPU with the free host
reads turned off (``_FREE_CPU_READS``, ``_C_PASS1_ON_CPU``), so these counts are CUDA's. They count ops, not
time. torch's baseline, ``clip_grad_norm_(foreach=True)`` + ``Adam(fused=True)``, is counted the same way in
the same run; the issue's target is at most twice it.
"""

from __future__ import annotations

import math
import random

import numpy
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from provetrain.ops import adam as adam_module
from provetrain.ops import multi_tensor as multi_tensor_module
from provetrain.ops.adam import Adam, AdamW
from provetrain.ops.multi_tensor import clip_divisor, clip_divisor_on_host

# aten ops per device-branch step (the profiler's two step markers not included), with a clip value: pass 1
# (3: norms, stack, dot), divisor (10), skip flag (2) and its float32 copy for the kernel (1), the fused
# kernel between the step counts' +1 and -found_inf (3), counters (3; the norm's sqrt writes its counter).
PINNED_WITH_CLIP = 22
# Without: the norm (1, into its counter) instead of the divisor, and the second-moment overflow check (3).
PINNED_WITHOUT_CLIP = 16
PINNED_WITH_TENSOR_LOSS = PINNED_WITH_CLIP + 3  # loss - loss, != 0, or
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class CountOps(TorchDispatchMode):
    """The names of the ops dispatched inside the mode, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def aten(self) -> list[str]:
        return [name for name in self.names if name.startswith("aten.")]


@pytest.fixture
def device_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", False)
    monkeypatch.setattr(multi_tensor_module, "_C_PASS1_ON_CPU", False)


def problem(tensors: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(tensors)
    params = [torch.nn.Parameter(torch.randn(64, generator=generator)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(64, generator=generator)
    return params


def count_third_step(step) -> CountOps:
    """Ops of a step after two warm ones (state made, counters in place)."""
    step()
    step()
    with CountOps() as counter:
        step()
    return counter


def provetrain_ops(tensors: int, clip_value: float | None, *, cls: type = Adam, loss=None, **kwargs) -> CountOps:
    opt = cls(problem(tensors), lr=1e-3, clip_value=clip_value, foreach=True, **kwargs)
    return count_third_step(lambda: opt.step(loss=loss))


def torch_ops(tensors: int) -> CountOps:
    params = problem(tensors)
    opt = torch.optim.Adam(params, lr=1e-3, fused=True)
    return count_third_step(lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), opt.step()))


@pytest.mark.usefixtures("device_branch")
@pytest.mark.parametrize("tensors", [10, 100])
def test_device_branch_ops_are_pinned_and_constant_in_the_tensor_count(tensors: int) -> None:
    with_clip = provetrain_ops(tensors, 1.0)
    assert len(with_clip.aten) == PINNED_WITH_CLIP, with_clip.aten
    assert len(provetrain_ops(tensors, None).aten) == PINNED_WITHOUT_CLIP
    assert len(provetrain_ops(tensors, 1.0, cls=AdamW, weight_decay=0.1).aten) == PINNED_WITH_CLIP
    assert len(provetrain_ops(tensors, 1.0, loss=1.5).aten) == PINNED_WITH_CLIP  # a finite float costs nothing
    assert len(provetrain_ops(tensors, 1.0, loss=torch.tensor(1.5)).aten) == PINNED_WITH_TENSOR_LOSS


@pytest.mark.usefixtures("device_branch")
def test_device_branch_dispatches_at_most_twice_torch_fused_with_clip() -> None:
    ours, theirs = provetrain_ops(10, 1.0), torch_ops(10)
    # Counted alike: every dispatched op, the optimizer's profiler markers included on both sides.
    assert len(ours.names) <= 2 * len(theirs.names), (ours.names, theirs.names)
    assert ours.aten.count("aten._fused_adam_.default") == 1
    assert "aten.item.default" not in ours.aten and "aten._local_scalar_dense.default" not in ours.aten


@pytest.mark.usefixtures("device_branch")
def test_the_lean_branch_still_skips_and_counts_without_host_reads() -> None:
    params = problem(10)
    opt = Adam(params, lr=1e-3, clip_value=1.0, foreach=True)
    opt.step()
    before = [p.detach().clone() for p in params]
    params[3].grad[5] = math.inf
    with CountOps() as counter:
        opt.step()
    assert "aten._local_scalar_dense.default" not in counter.aten  # no host read in skip mode
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert int(opt.skipped_steps) == 1 and math.isinf(float(opt.last_grad_norm))
    assert math.isnan(float(opt.last_clipped_grad_norm))
    opt.step(loss=torch.tensor([1.0, math.nan]))  # a non-finite loss tensor skips too
    assert int(opt.skipped_steps) == 2


# -- the lean divisor equals the general one ----------------------------------------------------------


def divisors(sum_sq: float, max_norm: float, numel: int, dtypes: list[torch.dtype]) -> tuple[float, float, float]:
    """``D`` from the lean device form (``e = 0`` as an int), the general device form (``e`` as a tensor),
    and the host form, for the same inputs."""
    s = torch.tensor(sum_sq, dtype=torch.float64)
    metadata = {"numel": numel, "dtypes": dtypes}
    lean = clip_divisor(s, 0, max_norm, **metadata)
    general = clip_divisor(s, torch.tensor(0), max_norm, **metadata)
    assert torch.equal(lean[0], general[0]) or (lean[0].isnan() and general[0].isnan())
    host = clip_divisor_on_host(sum_sq, 0, max_norm, **metadata)[1]
    return lean[1].item(), general[1].item(), host


def same(values: tuple[float, ...]) -> bool:
    return all(v == values[0] for v in values) or all(math.isnan(v) for v in values)


@pytest.mark.parametrize(
    ("sum_sq", "max_norm"),
    [
        (0.0, 1.0),
        (math.inf, 1.0),
        (math.nan, 1.0),
        (4.0, 2.0),  # at the threshold: N_up > c by the margin, clipped
        (4.0, 3.0),
        (1e-90, 1e-46),  # A_lo <= 0: clipped to 0 (D = inf)
        (2.0**296, 1e-30),  # the largest clip ratio for float32: D = inf
        (2.0**200, 2.0**-20),  # sigma / k beyond float32's range
        (1.0, 2.0**-127),  # D near float32's largest value
    ],
)
def test_lean_divisor_matches_the_general_and_host_forms_at_edges(sum_sq: float, max_norm: float) -> None:
    for dtypes in ([torch.float32], [torch.bfloat16, torch.float16]):
        assert same(divisors(sum_sq, max_norm, 3, dtypes)), (sum_sq, max_norm, dtypes)


def test_lean_divisor_matches_the_general_and_host_forms_on_random_inputs() -> None:
    rng = random.Random(0)
    for _ in range(2_000):
        numel = rng.choice([1, 7, 1000, 10**6])
        sum_sq = rng.uniform(0.5, 2.0) * 2.0 ** rng.randint(-290, 290)
        # Clip values around the norm (near the threshold and far from it).
        max_norm = math.sqrt(sum_sq) * rng.choice([rng.uniform(0.5, 2.0), 1 + rng.randint(-64, 64) * 2.0**-40,
                                                   2.0 ** rng.randint(-120, 10)])  # fmt: skip
        dtypes = rng.choice([[torch.float32], [torch.bfloat16], [torch.float16, torch.float32]])
        assert same(divisors(sum_sq, max_norm, numel, dtypes)), (sum_sq, max_norm, numel, dtypes)


def ceiling_of_next_up(q: float) -> float:
    """The float32 ceiling of ``nextup_64(q)``, in numpy: *Step 2* as its docstring states it."""
    wide = math.nextafter(q, math.inf)
    narrow = numpy.float32(wide) if wide <= FLOAT32_MAX else numpy.float32(math.inf)
    return float(numpy.nextafter(narrow, numpy.float32(math.inf)) if float(narrow) < wide else narrow)


def test_round_up_to_float32_is_the_ceiling_of_the_next_float64() -> None:
    rng = random.Random(1)
    exact = [float(numpy.float32(rng.uniform(1, 2) * 2.0 ** rng.randint(0, 127))) for _ in range(500)]
    near = [math.nextafter(x, rng.choice([0.0, math.inf])) for x in exact]
    wide = [rng.uniform(1, 2) * 2.0 ** rng.randint(0, 140) for _ in range(500)]
    edges = [1.0, FLOAT32_MAX, math.nextafter(FLOAT32_MAX, math.inf), 2.0**128, math.inf, 1e300]
    quotients = exact + near + wide + edges
    got = multi_tensor_module._round_up_to_float32(torch.tensor(quotients, dtype=torch.float64))
    assert got.dtype == torch.float32
    assert got.tolist() == [ceiling_of_next_up(q) for q in quotients]
    assert math.isnan(multi_tensor_module._round_up_to_float32(torch.tensor(math.nan, dtype=torch.float64)).item())


# -- the CPU branch: an unclipped step divides by nothing --------------------------------------------------


class KernelScales(TorchDispatchMode):
    """The ``grad_scale`` each fused Adam kernel call received."""

    def __init__(self) -> None:
        super().__init__()
        self.scales: list[torch.Tensor | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._fused_adam_.default:
            self.scales.append((kwargs or {}).get("grad_scale"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_branch_passes_no_divisor_when_nothing_is_clipped_and_matches_torch(dtype: torch.dtype) -> None:
    ours, theirs = problem(6), problem(6)
    for group in (ours, theirs):
        for p in group:
            p.data, p.grad = p.data.to(dtype), p.grad.to(dtype)
    opt = Adam(ours, lr=1e-2, clip_value=1e6, foreach=True)
    reference = torch.optim.Adam(theirs, lr=1e-2, fused=True)
    for _ in range(3):
        with KernelScales() as seen:
            opt.step()
        reference.step()
        assert seen.scales == [None]  # D = 1: the kernel's own unscaled path
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, theirs, strict=True))
    opt.clip_value = 1e-3  # now every step clips: the divisor goes to the kernel
    with KernelScales() as seen:
        opt.step()
    assert len(seen.scales) == 1 and seen.scales[0] is not None and float(seen.scales[0]) > 1
