"""provetrain.ops.multi_tensor: the bound in exact arithmetic, skip equivalence, torch parity, GradScaler, op counts."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from provetrain.ops import adam as adam_module
from provetrain.ops import multi_tensor as multi_tensor_module
from provetrain.ops.adam import Adam, AdamW
from provetrain.ops.clip import clip_coefficient, clip_coefficient_on_host, scaled_sum_of_squares
from provetrain.ops.multi_tensor import (
    adam_update_multi_tensor_,
    clip_divisor,
    clip_divisor_on_host,
    fused_kernel_supports,
    scaled_sum_of_squares_multi_tensor,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FINITE_MAX = {torch.float16: 6e4, torch.bfloat16: 3e38, torch.float32: 3e38, torch.float64: 1e300}


def exact_sum_of_squares(tensors: list[torch.Tensor]) -> Fraction:
    return sum((Fraction(x) ** 2 for t in tensors for x in t.double().reshape(-1).tolist()), Fraction(0))


def divisor_of(grads: list[torch.Tensor], max_norm: float, *, on_host: bool) -> torch.Tensor:
    """The float32 divisor from the device-side code (what CUDA runs) or the host-side code (CPU)."""
    s, e = scaled_sum_of_squares_multi_tensor(grads)
    metadata = {"numel": sum(g.numel() for g in grads), "dtypes": [g.dtype for g in grads]}
    if on_host:
        _, value = clip_divisor_on_host(float(s), int(e), max_norm, **metadata)
        return torch.tensor(value, dtype=torch.float32)
    return clip_divisor(s, e, max_norm, **metadata)[1]


def clip_through_kernel(
    grads: list[torch.Tensor], max_norm: float, *, on_host: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run pass 1, the divisor and torch's fused kernel; return the gradients the kernel wrote back."""
    grads = [g.clone() for g in grads]
    s, _ = scaled_sum_of_squares_multi_tensor(grads)
    divisor = divisor_of(grads, max_norm, on_host=on_host)
    found = (~torch.isfinite(s)).to(torch.float32)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        params = [torch.zeros_like(g) for g in group]
        adam_update_multi_tensor_(
            params,
            group,
            [torch.zeros_like(g) for g in group],
            [torch.zeros_like(g) for g in group],
            [torch.zeros((), dtype=torch.float32) for _ in group],
            divisor=divisor,
            found_inf=found,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            decoupled_weight_decay=False,
            maximize=False,
        )
    return grads, divisor


@st.composite
def gradient_lists(draw: st.DrawFn) -> list[torch.Tensor]:
    dtypes = draw(st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3))
    out = []
    for dtype in dtypes:
        exponent = draw(st.integers(-30, 30)) if dtype != torch.float64 else draw(st.integers(-300, 300))
        values = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=8))
        t = torch.tensor(values, dtype=torch.float64) * 2.0**exponent
        out.append(t.clamp(-FINITE_MAX[dtype], FINITE_MAX[dtype]).to(dtype))
    return out


@settings(max_examples=300, deadline=None)
@given(grads=gradient_lists(), ratio=st.floats(1e-6, 4.0), on_host=st.booleans(), c_pass1=st.booleans())
def test_kernel_clipped_gradient_obeys_the_bound_in_exact_arithmetic(
    grads: list[torch.Tensor], ratio: float, on_host: bool, c_pass1: bool
) -> None:
    norm = math.sqrt(float(exact_sum_of_squares(grads)))
    max_norm = max(ratio * norm, 1e-300) if norm > 0 else 1.0
    previous, multi_tensor_module._C_PASS1_ON_CPU = multi_tensor_module._C_PASS1_ON_CPU, c_pass1
    try:  # pass 1 by the C kernel (CPU float32/bfloat16) or by torch's norms (what CUDA runs)
        clipped, _ = clip_through_kernel(grads, max_norm, on_host=on_host)
    finally:
        multi_tensor_module._C_PASS1_ON_CPU = previous
    assert all(torch.isfinite(g).all() for g in clipped)
    assert exact_sum_of_squares(clipped) <= Fraction(max_norm) ** 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_clip_leaves_gradients_bit_for_bit(dtype: torch.dtype) -> None:
    grads = [torch.randn(50, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3)]
    clipped, divisor = clip_through_kernel(grads, 1e4)
    assert divisor.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(clipped, grads, strict=True))


def test_float32_overflowing_norm_keeps_the_direction() -> None:
    grads = [torch.tensor([3e38, 3e38, 1.0, 1.0])]
    s, _ = scaled_sum_of_squares_multi_tensor(grads)
    assert math.isfinite(s.item())
    # The kernel alone cannot divide by more than float32's largest value: the bound holds with zeros ...
    clipped, divisor = clip_through_kernel(grads, 1.0)
    assert math.isinf(divisor.item()) and not any(t.any() for t in clipped)
    # ... so on CPU the optimizer takes the reference path for that step and keeps the direction.
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = grads[0].clone()
    opt = Adam([p], lr=1e-3, clip_value=1.0, foreach=True)
    opt.step()
    assert opt.state[p]["exp_avg"][0].item() == pytest.approx(0.1 / math.sqrt(2), rel=1e-6)
    assert opt.last_clipped_grad_norm.item() <= 1.0


@pytest.mark.parametrize("grads", [[torch.tensor([1e300, -1e300])], [torch.tensor([1e-310, 3e-320])]])
def test_float64_extremes_are_scaled_not_overflowed(grads: list[torch.Tensor]) -> None:
    s, e = scaled_sum_of_squares_multi_tensor(grads)
    reference_s, reference_e = scaled_sum_of_squares(grads)
    assert int(e) == int(reference_e)
    assert s.item() == pytest.approx(reference_s.item(), rel=1e-14)


def test_divisor_is_at_least_sigma_over_k_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(500):
        s = torch.rand((), dtype=torch.float64, generator=generator) * 10.0 ** torch.randint(
            -20, 20, (), generator=generator
        )
        sigma = torch.tensor(2.0 ** torch.randint(-4, 17, (), generator=generator).item() * 1.5, dtype=torch.float32)
        for scale in (None, sigma):
            total, divisor = clip_divisor(
                s, torch.zeros((), dtype=torch.int64), 0.7, numel=10, dtypes=[torch.float32], grad_scale=scale
            )
            sigma_value = Fraction(1) if scale is None else Fraction(scale.item())
            # The clipped norm ||g|| / D (with ||g|| = sqrt(s)) never exceeds the clip value, up to sqrt's rounding.
            assert Fraction(total.item()) * sigma_value / Fraction(divisor.item()) <= Fraction(0.7)
            assert divisor.item() >= sigma_value


# -- the optimizer on this path -----------------------------------------------------------------------


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)


def batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=generator).to(dtype), torch.randn(16, 3, generator=generator).to(dtype))
        for _ in range(n)
    ]


def state_bits(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        out.append(p.detach().clone())
        out += [torch.as_tensor(v).clone() for _, v in sorted(opt.state[p].items())]
    return out


def assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("free_cpu_reads", [True, False], ids=["host_math", "device_math"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("ours", "theirs"), [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)])
def test_matches_torch_fused_given_the_same_clipped_gradient(
    ours: type[Adam], theirs: type, dtype: torch.dtype, free_cpu_reads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # device_math runs, on CPU, the tensor code CUDA runs (torch's norms included); host_math the code CPU
    # steps use (Python-float scalars, the C kernel's pass 1).
    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", free_cpu_reads)
    monkeypatch.setattr(multi_tensor_module, "_C_PASS1_ON_CPU", free_cpu_reads)
    clip_value, eps = 0.3, (1e-3 if dtype == torch.float16 else 1e-8)
    a, b = make_model(dtype), make_model(dtype)
    opt_a = ours(a.parameters(), lr=1e-2, weight_decay=0.01, eps=eps, clip_value=clip_value, foreach=True)
    opt_b = theirs(b.parameters(), lr=1e-2, weight_decay=0.01, eps=eps, fused=True)
    clipped = 0
    for x, y in batches(300, dtype):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.mse_loss(model(x).float(), y.float()).backward()
        divisor = divisor_of([p.grad for p in b.parameters()], clip_value, on_host=free_cpu_reads)
        clipped += int(divisor.item() != 1.0)
        opt_b.grad_scale, opt_b.found_inf = divisor, torch.zeros(())  # torch's kernel divides by the same D
        opt_a.step()
        opt_b.step()
    assert clipped > 50
    assert_same_bits(state_bits(a, opt_a), state_bits(b, opt_b))
    assert opt_a.skipped_steps.item() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [None, 0.05])
def test_skipped_step_keeps_every_bit(dtype: torch.dtype, clip_value: float | None) -> None:
    model = make_model(dtype)
    opt = AdamW(model.parameters(), lr=1e-2, clip_value=clip_value, foreach=True, eps=1e-3)
    for x, y in batches(3, dtype):
        opt.zero_grad()
        F.mse_loss(model(x).float(), y.float()).backward()
        opt.step()
    before = state_bits(model, opt)
    x, y = batches(1, dtype)[0]
    opt.zero_grad()
    F.mse_loss(model(x).float(), y.float()).backward()
    model[2].weight.grad[0, 1] = math.nan
    grads_before = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert_same_bits(state_bits(model, opt), before)
    assert all(
        torch.equal(
            p.grad,
            g,
        )
        or torch.isnan(g).any()
        for p, g in zip(model.parameters(), grads_before, strict=True)
    )
    assert opt.skipped_steps.item() == 1 and torch.isnan(opt.last_clipped_grad_norm)


def test_raise_mode_names_the_parameter() -> None:
    from provetrain.errors import ContractViolation

    model = make_model()
    opt = Adam(model.named_parameters(), foreach=True, on_nonfinite="raise")
    F.mse_loss(model(torch.ones(2, 6)), torch.zeros(2, 3)).backward()
    model[0].bias.grad[3] = math.inf
    with pytest.raises(ContractViolation, match=r"0\.bias"):
        opt.step()


def test_unsupported_layouts_fall_back_to_the_reference_path() -> None:
    p = torch.nn.Parameter(torch.randn(8, 6).t())  # a transpose: permuted strides, still dense
    q = torch.nn.Parameter(torch.randn(12)[::2])  # strided: not dense
    assert fused_kernel_supports([p], [torch.zeros_like(p)])
    assert not fused_kernel_supports([q], [torch.zeros_like(q)])
    opt = Adam([q], lr=0.1, foreach=True, clip_value=0.5)
    q.grad = torch.ones(6)
    opt.step()
    assert opt.last_clipped_grad_norm.item() <= 0.5
    assert torch.isfinite(q).all()


# -- GradScaler -----------------------------------------------------------------------------------


def run_with_scaler(opt_factory, steps: list[tuple[torch.Tensor, torch.Tensor]], poison_at: int) -> tuple:
    model = make_model()
    opt = opt_factory(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scales = []
    for i, (x, y) in enumerate(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y) * (math.inf if i == poison_at else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


def test_grad_scaler_equals_torch_fused_adam_with_the_same_scaler() -> None:
    data = batches(40)
    ours = run_with_scaler(lambda p: Adam(p, lr=1e-2, foreach=True), data, poison_at=7)
    theirs = run_with_scaler(lambda p: torch.optim.Adam(p, lr=1e-2, fused=True), data, poison_at=7)
    assert_same_bits(state_bits(ours[0], ours[1]), state_bits(theirs[0], theirs[1]))
    assert ours[2] == theirs[2]  # the scaler backed off once, at the same step, in both
    assert ours[1].skipped_steps.item() == 1  # GradScaler's inf check and the contract's skip: one decision


@pytest.mark.parametrize("foreach", [True, False])
def test_grad_scaler_clips_the_unscaled_gradient(foreach: bool) -> None:
    model, opt, _ = run_with_scaler(
        lambda p: Adam(p, lr=1e-2, clip_value=0.05, foreach=foreach, fused=None if foreach else False),
        batches(20),
        poison_at=5,
    )
    grads = [p.grad for p in model.parameters()]
    if foreach:  # torch's kernel writes the gradient it used back: unscaled and clipped
        assert exact_sum_of_squares(grads) <= Fraction(0.05) ** 2
    else:  # the reference path clips out of place: .grad holds the unscaled gradient
        assert math.sqrt(exact_sum_of_squares(grads)) == pytest.approx(opt.last_grad_norm.item(), rel=1e-12)
    assert opt.last_grad_norm.item() > 0.05  # so the clip was active
    assert opt.last_clipped_grad_norm.item() <= 0.05
    assert opt.skipped_steps.item() == 1


# -- op counts ------------------------------------------------------------------------------------


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(tensors: int, clip_value: float | None) -> int:
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(tensors)]
    opt = Adam(params, lr=1e-3, clip_value=clip_value, foreach=True)
    for p in params:
        p.grad = torch.randn(64)
    opt.step()
    with CountOps() as counter:
        opt.step(loss=torch.tensor(1.0))
    return counter.count


@pytest.mark.parametrize("clip_value", [None, 1e-3])
def test_ops_per_step_do_not_grow_with_the_tensor_count(clip_value: float | None) -> None:
    assert ops_per_step(10, clip_value) == ops_per_step(100, clip_value)


# -- host and device code agree -------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    mantissa=st.floats(0.0, 1.0),
    scale=st.integers(-300, 300),
    max_norm=st.floats(1e-30, 1e30),
    numel=st.integers(1, 2**30),
    exponent=st.integers(-1073, 1024) | st.just(0),
    dtypes=st.sampled_from([{torch.float32}, {torch.bfloat16, torch.float32}, {torch.float64}, {torch.float16}]),
    sigma=st.none() | st.floats(2.0**-20, 2.0**24).map(lambda x: float(torch.tensor(x, dtype=torch.float32))),
)
def test_host_math_equals_device_math_where_sqrt_rounds_alike(
    mantissa: float, scale: int, max_norm: float, numel: int, exponent: int, dtypes, sigma: float | None
) -> None:
    s = mantissa * 10.0**scale
    s_t, e_t = torch.tensor(s, dtype=torch.float64), torch.tensor(exponent)
    on_device = clip_coefficient(s_t, max_norm, numel=numel, dtypes=dtypes, exponent=e_t)
    on_host = clip_coefficient_on_host(s, max_norm, numel=numel, dtypes=dtypes, exponent=exponent)
    scale_t = None if sigma is None else torch.tensor(sigma, dtype=torch.float32)
    divisor_device = clip_divisor(s_t, e_t, max_norm, numel=numel, dtypes=list(dtypes), grad_scale=scale_t)[1]
    divisor_host = clip_divisor_on_host(s, exponent, max_norm, numel=numel, dtypes=list(dtypes), grad_scale=sigma)[1]
    if torch.sqrt(s_t).item() == math.sqrt(s):
        assert (on_device[0].item(), on_device[1].item()) == on_host
        if sigma is None:  # with a scale, S / m^2 is formed first and sqrt sees another value
            assert divisor_device.item() == divisor_host
    else:  # torch's float64 sqrt is faithful, math.sqrt correctly rounded: one ulp apart at most
        assert on_device[1].item() == pytest.approx(on_host[1], rel=2**-50)


@pytest.mark.parametrize("c_pass1", [True, False], ids=["c_kernel_pass1", "torch_norms"])
def test_the_multi_tensor_sum_is_the_same_bits_for_every_thread_count(
    c_pass1: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multi_tensor_module, "_C_PASS1_ON_CPU", c_pass1)
    grads = [torch.randn(700_001, generator=torch.Generator().manual_seed(0)), torch.randn(33).bfloat16()]
    before = torch.get_num_threads()
    sums = []
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            sums.append(scaled_sum_of_squares_multi_tensor(grads)[0].item().hex())
    finally:
        torch.set_num_threads(before)
    assert sums[0] == sums[1] == sums[2]


# -- CUDA (skipped with a reason where no CUDA device exists) ---------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the multi-tensor path on CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_torch_fused_given_the_same_divisor(dtype: torch.dtype) -> None:
    a, b = make_model(dtype).cuda(), make_model(dtype).cuda()
    opt_a = AdamW(a.parameters(), lr=1e-2, clip_value=0.3)  # the default path on CUDA: multi-tensor
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    for x, y in batches(50, dtype):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.mse_loss(model(x.cuda()).float(), y.cuda().float()).backward()
        divisor = divisor_of([p.grad for p in b.parameters()], 0.3, on_host=False)
        opt_b.grad_scale, opt_b.found_inf = divisor, torch.zeros((), device="cuda")
        opt_a.step()
        opt_b.step()
    assert_same_bits([t.cpu() for t in state_bits(a, opt_a)], [t.cpu() for t in state_bits(b, opt_b)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: GradScaler without host syncs")
def test_cuda_grad_scaler_step_makes_no_host_sync() -> None:
    model = make_model().cuda()
    opt = Adam(model.parameters(), lr=1e-2, clip_value=1.0)
    scaler = torch.amp.GradScaler("cuda")
    previous = torch.cuda.get_sync_debug_mode()
    for i, (x, y) in enumerate(batches(6)):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.mse_loss(model(x.cuda()), y.cuda()) * (math.inf if i == 3 else 1.0)
        scaler.scale(loss).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt, loss=loss.detach())
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    assert opt.skipped_steps.item() >= 1  # the inf step, plus any while the scale calibrates
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_non_power_of_two_loss_scale_keeps_the_bound_near_the_threshold() -> None:
    # Unscaling by sigma = 3 rounds even when nothing is clipped: the clip decides against the margin then.
    generator = torch.Generator().manual_seed(5)
    sigma = torch.tensor(3.0)
    for trial in range(300):
        g = torch.randn(int(torch.randint(1, 40, (), generator=generator)), generator=generator) * 2.0 ** (trial % 7)
        scaled = (g * sigma).float()
        true_norm = math.sqrt(exact_sum_of_squares([scaled]) / 9)
        max_norm = true_norm * (1 + (trial % 5) * 2**-29 + 2**-40)  # just above: no clip, and the unscale rounds
        s, e = scaled_sum_of_squares_multi_tensor([scaled])
        for on_host in (False, True):
            if on_host:
                _, value = clip_divisor_on_host(
                    float(s), int(e), max_norm, numel=g.numel(), dtypes=[torch.float32], grad_scale=3.0
                )
                divisor = torch.tensor(value, dtype=torch.float32)
            else:
                _, divisor = clip_divisor(s, e, max_norm, numel=g.numel(), dtypes=[torch.float32], grad_scale=sigma)
            y = scaled / divisor  # the CPU kernel's float32 division
            assert exact_sum_of_squares([y]) <= Fraction(max_norm) ** 2, (trial, on_host)


def test_fused_kernel_supports_reads_layout_dtype_and_device_per_tensor() -> None:
    supports = multi_tensor_module.fused_kernel_supports
    p = torch.zeros(4, 3)
    assert supports([p, p.bfloat16().float()], [torch.ones(4, 3), torch.ones(4, 3)])
    t = torch.zeros(3, 4).t()  # dense, not contiguous: accepted when every partner has the same strides
    assert supports([t], [torch.zeros(3, 4).t()])
    assert not supports([t], [torch.zeros(4, 3)])  # same shape, other layout: the kernel walks memory linearly
    assert not supports([p], [torch.zeros(4, 6)[:, ::2]])  # not dense
    assert supports([p, p.double(), p.half()], [p, p.double(), p.half()])  # one kernel call per dtype group
    assert not supports([p], [p.bfloat16()])  # a moment of another dtype than its parameter's
    assert not supports([p.half(), p], [p.half(), p.half()])
    assert not supports([p, torch.zeros(4, 3, device="meta")])  # CPU and meta both have device index -1
    assert not supports([torch.zeros(4, 3, device="meta")])  # no fused kernel on meta


@pytest.mark.parametrize("free_cpu_reads", [True, False], ids=["host_math", "device_math"])
def test_a_group_of_mixed_dtypes_takes_the_multi_tensor_path_and_matches_torch_fused(
    free_cpu_reads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 norms beside bfloat16/float16 weights (and a float64 one) in one group: one kernel call per dtype,
    as torch's fused Adam does, not the reference path."""
    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", free_cpu_reads)
    monkeypatch.setattr(multi_tensor_module, "_C_PASS1_ON_CPU", free_cpu_reads)
    paths: list[str] = []
    choose = Adam._choose_path
    monkeypatch.setattr(Adam, "_choose_path", lambda self, b: paths.append(choose(self, b)) or paths[-1])
    gen = torch.Generator().manual_seed(0)
    layout = [((30,), torch.float32), ((7, 5), torch.bfloat16), ((11,), torch.float16), ((4,), torch.float64)]
    ours = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape, dtype in layout]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_a = Adam(ours, lr=1e-2, eps=1e-3, clip_value=0.3)  # the default path
    opt_b = torch.optim.Adam(theirs, lr=1e-2, eps=1e-3, fused=True)
    for _ in range(40):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            q.grad = p.grad.clone()
        divisor = divisor_of([q.grad for q in theirs], 0.3, on_host=free_cpu_reads)
        assert divisor.item() > 1.0  # clipping every step
        opt_b.grad_scale, opt_b.found_inf = divisor, torch.zeros(())
        opt_a.step()
        opt_b.step()
    assert set(paths) == {"multi_tensor"}
    for p, q in zip(ours, theirs, strict=True):
        assert_same_bits([p.detach(), *opt_a.state[p].values()], [q.detach(), *opt_b.state[q].values()])
