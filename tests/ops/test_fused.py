"""The two-pass C kernel (provetrain.ops.fused) against float64 sums, the contract's clipped value, a torch
reference of the same per-element math, and torch.optim.Adam / AdamW."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from provetrain.ops import fused

pytestmark = pytest.mark.skipif(
    not fused.fused_available(), reason=f"fused kernel unavailable: {fused.fused_unavailable_reason()}"
)

U = 2.0**-53
SIZES = (1, 15, 16, 17, 1000, 4099, 70_001)  # below, at and above the 16-lane block; odd tails


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of a float64 sum of n non-negative terms."""
    return n * U / (1 - n * U)


def exact_sum_sq(tensors: list[torch.Tensor]) -> float:
    return math.fsum(x * x for t in tensors for x in t.double().flatten().tolist())


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest number of float32 values between corresponding elements (0 when bit-identical)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def clipped(g: torch.Tensor, k: float) -> torch.Tensor:
    """The contract's clipped value: round_to_dtype(float64(g) * k)."""
    return (g.double() * k).float()


@contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=fused.ACCESS_PATTERNS)
def access_pattern(request):
    """Run the test under each of the kernel's memory access patterns, then restore this machine's default."""
    fused._select_access_pattern(request.param)
    try:
        yield request.param
    finally:
        fused._select_access_pattern(None)


def make_state(sizes, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) * scale for n in sizes]
    exp_avgs = [torch.randn(n, generator=gen) * 1e-2 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=gen) * 1e-3 for n in sizes]
    return params, grads, exp_avgs, exp_avg_sqs


def hyper(**overrides):
    h = dict(k=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
             maximize=False, bias_correction1=1 - 0.9**3, bias_correction2_sqrt=(1 - 0.999**3) ** 0.5)  # fmt: skip
    h.update(overrides)
    return h


# -- supports -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ([], True),
        ([torch.zeros(3), torch.zeros(2, 5)], True),
        ([torch.zeros(0)], True),
        ([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], False),
        ([torch.zeros(3, dtype=torch.bfloat16)], False),
        ([torch.zeros(4, 3).t()], False),
        ([torch.zeros(3).to_sparse()], False),
    ],
)
def test_supports(tensors, expected):
    assert fused.supports(tensors) is expected


# -- pass 1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e15, 1e30])
@pytest.mark.usefixtures("access_pattern")
def test_sum_sq_is_within_gamma_of_the_exact_sum(scale):
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale for n in SIZES]
    total, finite = fused.sum_sq_and_finite(grads)
    exact = exact_sum_sq(grads)
    n = sum(SIZES)
    assert finite
    assert abs(total - exact) <= gamma(n - 1) * exact


def test_sum_sq_of_the_largest_floats_is_finite():
    grads = [torch.tensor([3e38, 3e38]), torch.tensor([1.0, -1.0])]
    total, finite = fused.sum_sq_and_finite(grads)
    big = float(torch.tensor(3e38))
    assert finite
    assert total == pytest.approx(2 * big * big + 2, rel=4 * U)


def test_sum_sq_of_nothing_is_zero():
    assert fused.sum_sq_and_finite([]) == (0.0, True)
    assert fused.sum_sq_and_finite([torch.zeros(0), torch.zeros(0)]) == (0.0, True)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [(0, 0), (0, 36), (1, 16), (1, 4098), (2, 0)])
def test_one_nonfinite_element_anywhere_clears_the_finite_flag(bad, where):
    grads = [torch.randn(37), torch.randn(4099), torch.randn(1)]
    tensor, index = where
    grads[tensor][index] = bad
    total, finite = fused.sum_sq_and_finite(grads)
    assert not finite
    assert not math.isfinite(total)


def test_sum_sq_depends_on_thread_count_only_through_rounding():
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (150_001, 90_007, 33)]
    exact = exact_sum_sq(grads)
    n = sum(g.numel() for g in grads)
    for threads in (1, 2, 3, 4):
        with num_threads(threads):
            total, finite = fused.sum_sq_and_finite(grads)
        assert finite
        assert abs(total - exact) <= gamma(n - 1) * exact


# -- pass 2: the clipped value --------------------------------------------------------------------


@pytest.mark.parametrize("k", [1.0, 0.5, 0.3, 1 / 3, 2.0**-20 * 0.7, 1e-40, 0.0, 0.999999999])
def test_kernel_clipped_value_is_the_contract_value_bit_for_bit(k):
    g = torch.cat([torch.randn(4099), torch.tensor([3e38, -3e38, 1e-45, -0.0, 0.0, 1e-38])])
    out = torch.empty_like(g)
    fused._load().lib.pt_scale(out.data_ptr(), g.data_ptr(), g.numel(), k)
    assert torch.equal(out.view(torch.int32), clipped(g, k).view(torch.int32))
    if k == 1.0:
        assert torch.equal(out.view(torch.int32), g.view(torch.int32))


def test_clipped_value_matches_clip_scale_gradient():
    clip = pytest.importorskip("provetrain.ops.clip")
    g = torch.randn(10_007)
    for k in (1.0, 0.3, 1 / 7):
        out = torch.empty_like(g)
        fused._load().lib.pt_scale(out.data_ptr(), g.data_ptr(), g.numel(), k)
        expected = clip.scale_gradient(g, torch.tensor(k, dtype=torch.float64))
        assert torch.equal(out.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("k", [1.0, 0.37, 1e-3])
def test_update_uses_the_clipped_value_bit_for_bit(k):
    # With beta1 = 0 torch's lerp takes its large-weight branch, fma(0, y - m, y) = y: the new exp_avg
    # is y itself. With beta2 = 0, exp_avg_sq = fma(y, y, 0) = round(y * y).
    params, grads, exp_avgs, exp_avg_sqs = make_state(SIZES)
    returned = fused.adam_update_(params, grads, exp_avgs, exp_avg_sqs, **hyper(k=k, beta1=0.0, beta2=0.0))
    for g, m, v in zip(grads, exp_avgs, exp_avg_sqs, strict=True):
        y = clipped(g, k)
        assert torch.equal(m.view(torch.int32), y.view(torch.int32))
        assert torch.equal(v, y * y)
    exact = exact_sum_sq([clipped(g, k) for g in grads])
    assert abs(returned - exact) <= gamma(sum(SIZES) - 1) * exact


def test_update_returns_the_clipped_norm_squared_before_maximize_and_weight_decay():
    params, grads, exp_avgs, exp_avg_sqs = make_state((5000, 17))
    k = 0.25
    returned = fused.adam_update_(params, grads, exp_avgs, exp_avg_sqs, **hyper(k=k, maximize=True, weight_decay=0.5))
    exact = exact_sum_sq([clipped(g, k) for g in grads])
    assert abs(returned - exact) <= gamma(5016) * exact


# -- pass 2: the Adam math ------------------------------------------------------------------------


def reference_update_(p, g, m, v, *, k, lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                      bias_correction1, bias_correction2_sqrt):  # fmt: skip
    """The same per-element math in torch ops, in torch's single-tensor Adam order."""
    y = clipped(g, k)
    if maximize:
        y = -y
    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            y = y.add(p, alpha=weight_decay)
    m.lerp_(y, 1 - beta1)
    v.mul_(beta2).addcmul_(y, y, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bias_correction1))


CONFIGS = [
    pytest.param({}, id="adam"),
    pytest.param({"k": 0.37}, id="clipped"),
    pytest.param({"maximize": True}, id="maximize"),
    pytest.param({"weight_decay": 0.1}, id="l2"),
    pytest.param({"weight_decay": 0.1, "decoupled": True}, id="adamw"),
    pytest.param({"beta1": 0.3, "beta2": 0.9}, id="small-beta1"),
    pytest.param({"lr": 0.1, "eps": 1e-3, "maximize": True, "weight_decay": 1e-2, "k": 0.5}, id="mixed"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_update_matches_the_torch_reference_of_the_same_math(config):
    state = make_state(SIZES, seed=1)
    before = [t.clone() for t in state[0]]
    expected = [[t.clone() for t in group] for group in state]
    fused.adam_update_(*state, **hyper(**config))
    for i in range(len(SIZES)):
        reference_update_(*(group[i] for group in expected), **hyper(**config))
    # m and v: torch's scalar tail loop may round its fused multiply-adds separately (1 ulp).
    for ours, theirs in zip(state[2] + state[3], expected[2] + expected[3], strict=True):
        assert ulp_distance(ours, theirs) <= 1
    assert all(torch.equal(a, b) for a, b in zip(state[1], expected[1], strict=True))  # grads untouched
    # p: torch's MKL sqrt is one ulp low in ~0.7% of elements, which moves the update by a few ulps.
    for ours, theirs, p0 in zip(state[0], expected[0], before, strict=True):
        slack = 4 * 2.0**-23 * (theirs.abs() + (theirs - p0).abs())
        assert bool(((ours - theirs).abs() <= slack).all())


def torch_optimizer(params, config):
    cls = torch.optim.AdamW if config.get("decoupled") else torch.optim.Adam
    return cls(
        params,
        lr=config.get("lr", 1e-3),
        betas=(config.get("beta1", 0.9), config.get("beta2", 0.999)),
        eps=config.get("eps", 1e-8),
        weight_decay=config.get("weight_decay", 0.0),
        maximize=config.get("maximize", False),
        foreach=False,
    )


@pytest.mark.parametrize("steps", [1, 50])
@pytest.mark.parametrize("config", CONFIGS)
def test_steps_match_torch_adam(config, steps):
    sizes = (1000, 37, 4099)
    gen = torch.Generator().manual_seed(2)
    ours = [torch.randn(n, generator=gen) for n in sizes]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = torch_optimizer(theirs, config)
    exp_avgs = [torch.zeros(n) for n in sizes]
    exp_avg_sqs = [torch.zeros(n) for n in sizes]
    k = config.get("k", 1.0)
    beta1, beta2 = config.get("beta1", 0.9), config.get("beta2", 0.999)
    for t in range(1, steps + 1):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        for p, g in zip(theirs, grads, strict=True):
            p.grad = clipped(g, k)  # torch steps with the clipped gradient we form in registers
        opt.step()
        h = hyper(**config)
        h.update(bias_correction1=1 - beta1**t, bias_correction2_sqrt=(1 - beta2**t) ** 0.5)
        fused.adam_update_(ours, grads, exp_avgs, exp_avg_sqs, **h)
    for p, q, m, v in zip(ours, theirs, exp_avgs, exp_avg_sqs, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m, opt.state[q]["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(v, opt.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-10)


@pytest.fixture(scope="module")
def python_threads_kernel(tmp_path_factory):
    """The kernel built without OpenMP: fused.py then runs its ranges on Python threads."""
    compiler = fused._find_compiler()
    flags = next(f for f in fused._FLAG_SETS if "-fopenmp" not in f)
    kernel = fused._Kernel(fused._build(compiler, flags, _source(), tmp_path_factory.mktemp("cache")))
    assert not kernel.openmp
    return kernel


@pytest.mark.parametrize("runtime", ["loaded", "python-threads"])
@pytest.mark.usefixtures("access_pattern")
def test_update_is_independent_of_the_thread_count(runtime, python_threads_kernel, monkeypatch):
    if runtime == "python-threads":
        monkeypatch.setattr(fused, "_kernel", python_threads_kernel)
    sizes = (450_001, 90_007, 33, 64)  # 9 blocks of 65,536: up to 8 threads take part
    results = []
    for threads in (1, 2, 3, 4, 7):
        state = make_state(sizes, seed=3)
        with num_threads(threads):
            returned = fused.adam_update_(*state, **hyper(k=0.3, weight_decay=0.01, decoupled=True))
            total, finite = fused.sum_sq_and_finite(state[1])
        assert finite
        results.append((returned, total, state))
    grads = make_state(sizes, seed=3)[1]
    exact, exact_clipped = exact_sum_sq(grads), exact_sum_sq([clipped(g, 0.3) for g in grads])
    bound = gamma(sum(sizes) - 1)
    for returned, total, state in results:
        assert abs(returned - exact_clipped) <= bound * exact_clipped
        assert abs(total - exact) <= bound * exact
        assert (returned.hex(), total.hex()) == (results[0][0].hex(), results[0][1].hex())  # fixed blocking
        for group, first in zip(state, results[0][2], strict=True):
            for a, b in zip(group, first, strict=True):
                assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_update_bumps_the_version_counters_it_writes():
    params, grads, exp_avgs, exp_avg_sqs = make_state((10,))
    before = [t._version for t in (params[0], grads[0], exp_avgs[0], exp_avg_sqs[0])]
    fused.adam_update_(params, grads, exp_avgs, exp_avg_sqs, **hyper())
    after = [t._version for t in (params[0], grads[0], exp_avgs[0], exp_avg_sqs[0])]
    assert [a > b for a, b in zip(after, before, strict=True)] == [True, False, True, True]


def test_update_of_nothing_changes_nothing():
    assert fused.adam_update_([], [], [], [], **hyper()) == 0.0
    empty = [torch.zeros(0)]
    assert fused.adam_update_(empty, [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], **hyper()) == 0.0


# -- bad arguments --------------------------------------------------------------------------------


def _bad(name):
    p, g, m, v = make_state((8, 3))
    args = {"params": p, "grads": g, "exp_avgs": m, "exp_avg_sqs": v}
    kwargs = hyper()
    if name == "float64":
        args["grads"] = [g[0].double(), g[1]]
    elif name == "non-contiguous":
        args["exp_avgs"] = [torch.zeros(16)[::2], m[1]]
    elif name == "length":
        args["exp_avg_sqs"] = [v[0]]
    elif name == "numel":
        args["grads"] = [g[0], torch.zeros(4)]
    elif name == "alias":
        args["exp_avgs"] = [m[0], p[1]]
    else:
        kwargs[name.split("=")[0]] = float(name.split("=")[1])
    return args, kwargs


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("float64", "grads[0] is a torch.float64 torch.strided tensor on cpu; the fused kernel takes"),
        ("non-contiguous", "exp_avgs[0] is a torch.float32 torch.strided tensor on cpu (not contiguous)"),
        ("length", "exp_avg_sqs has 1 tensors but params has 2; pass one per parameter."),
        ("numel", "grads[1] has 4 elements but params[1] has 3; each state tensor must match its parameter."),
        ("alias", "a tensor appears twice among params, grads, exp_avgs and exp_avg_sqs"),
        ("k=nan", "k=nan must be finite and >= 0"),
        ("k=-0.5", "k=-0.5 must be finite and >= 0"),
        ("bias_correction1=0", "bias_correction1=0.0 must be > 0"),
        ("bias_correction2_sqrt=nan", "bias_correction2_sqrt=nan must be > 0"),
    ],
)
def test_bad_arguments_are_named(case, message):
    args, kwargs = _bad(case)
    before = [t.clone() for t in args["params"]]
    with pytest.raises(ValueError, match=re.escape(message)):
        fused.adam_update_(**args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(args["params"], before, strict=True))


def test_pass_one_names_an_unsupported_gradient():
    with pytest.raises(ValueError, match=re.escape("grads[1] is a torch.float64 torch.strided tensor on cpu")):
        fused.sum_sq_and_finite([torch.zeros(3), torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match=re.escape("grads[0] is a torch.float16 torch.strided tensor on cpu (not")):
        fused.sum_sq_and_finite([torch.zeros(6, dtype=torch.float16)[::2]])


# -- build, cache and switches --------------------------------------------------------------------


def _source() -> Path:
    return Path(fused.__file__).parent / "kernels" / "adam_step.c"


def test_cache_hit_then_rebuild_after_deletion(tmp_path):
    compiler, flags = fused._find_compiler(), fused._FLAG_SETS[0]
    path = fused._build(compiler, flags, _source(), tmp_path)
    assert path.is_file() and path.is_relative_to(tmp_path / "kernels")
    stamp = path.stat().st_mtime_ns
    assert fused._build(compiler, flags, _source(), tmp_path) == path
    assert path.stat().st_mtime_ns == stamp  # served from the cache
    path.unlink()
    assert fused._build(compiler, flags, _source(), tmp_path) == path
    assert path.is_file()


def test_a_damaged_cached_library_is_rebuilt(tmp_path):
    compiler, flags = fused._find_compiler(), fused._FLAG_SETS[0]
    path = fused._build(compiler, flags, _source(), tmp_path)
    path.write_bytes(b"not a shared library")
    kernel = fused._build_and_load(tmp_path)
    assert kernel.path == path
    assert kernel.lib.pt_abi_version() == fused._ABI_VERSION


def test_concurrent_builds_into_one_cache_are_safe(tmp_path):
    compiler, flags = fused._find_compiler(), fused._FLAG_SETS[0]
    results, errors = [], []

    def build():
        try:
            results.append(fused._build(compiler, flags, _source(), tmp_path, force=True))
        except Exception as error:  # collected, asserted below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in results[0].parent.iterdir()] == ["adam_step.so"]  # no temporary left behind


def test_a_failed_build_is_a_reason_not_an_exception(tmp_path, monkeypatch):
    monkeypatch.delenv("PROVETRAIN_DISABLE_KERNEL", raising=False)
    monkeypatch.setattr(fused, "_FLAG_SETS", (("-fno-such-flag-for-provetrain", "-shared"),))
    with pytest.raises(fused._Unavailable, match="no-such-flag-for-provetrain"):
        fused._build_and_load(tmp_path)


def test_a_failed_build_is_remembered_and_the_next_flags_are_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("PROVETRAIN_DISABLE_KERNEL", raising=False)
    broken = (*fused._BASE_FLAGS, "-Wl,--no-such-linker-option")  # preprocesses, fails to link
    monkeypatch.setattr(fused, "_FLAG_SETS", (broken, fused._BASE_FLAGS))
    kernel = fused._build_and_load(tmp_path)
    assert not kernel.openmp
    [marker] = (tmp_path / "kernels").glob(f"*/{fused._FAILED}")
    assert "no-such-linker-option" in marker.read_text()
    with pytest.raises(fused._Unavailable, match="no-such-linker-option"):
        fused._build(fused._find_compiler(), broken, _source(), tmp_path)  # from the cache, not rebuilt
    assert list(marker.parent.iterdir()) == [marker]


def test_no_compiler_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("PROVETRAIN_DISABLE_KERNEL", raising=False)
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    with pytest.raises(fused._Unavailable, match=re.escape("no C compiler found (tried")):
        fused._build_and_load(tmp_path)


def _run_fresh(code: str, **env: str) -> str:
    environment = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
    return done.stdout.strip()


def test_cache_dir_and_disable_switch_in_fresh_processes(tmp_path):
    probe = (
        "from provetrain.ops import fused; import torch\n"
        "print(fused.fused_available(), fused.fused_unavailable_reason())\n"
        "try:\n    fused.sum_sq_and_finite([torch.ones(2)])\nexcept RuntimeError as e:\n    print(e)\n"
    )
    out = _run_fresh(probe, PROVETRAIN_CACHE_DIR=str(tmp_path), PROVETRAIN_DISABLE_KERNEL="0")
    assert out == "True None"
    assert len(list((tmp_path / "kernels").glob("*/adam_step.so"))) == 1

    out = _run_fresh(probe, PROVETRAIN_CACHE_DIR=str(tmp_path / "unused"), PROVETRAIN_DISABLE_KERNEL="1")
    assert out.splitlines() == [
        "False disabled by PROVETRAIN_DISABLE_KERNEL",
        "the fused Adam kernel is unavailable (disabled by PROVETRAIN_DISABLE_KERNEL); check "
        "`fused_available()` before calling and use the reference path otherwise.",
    ]
    assert not (tmp_path / "unused").exists()


def test_tensor_subclasses_are_not_supported() -> None:
    """DTensor shards and other subclasses must take the reference path (the kernel segfaulted on them)."""

    class Wrapped(torch.Tensor):
        pass

    plain = torch.zeros(4)
    assert fused.supports([plain, torch.nn.Parameter(torch.zeros(4))])
    assert not fused.supports([plain.as_subclass(Wrapped)])


def test_advance_step_counts_adds_one_in_place_and_tells_autograd() -> None:
    counts = [torch.tensor(float(i)) for i in (0, 7, 2**24 - 2)]
    versions = [c._version for c in counts]
    fused.advance_step_counts_(counts)
    assert [c.item() for c in counts] == [1.0, 8.0, 2.0**24 - 1]
    assert all(c._version > v for c, v in zip(counts, versions, strict=True))
    with pytest.raises(ValueError, match=r"counts\[0\] is a torch\.float64 tensor"):
        fused.advance_step_counts_([torch.tensor(1.0, dtype=torch.float64)])


HALF_EXTREMES = {
    # the largest finite value, the smallest normal and subnormal magnitudes, a negative subnormal
    torch.bfloat16: [3.3895e38, 1.1755e-38, 9.2e-41, -9.2e-41],
    torch.float16: [65504.0, 6.1035e-05, 5.96e-08, -5.96e-08],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("access_pattern")
def test_pass_one_takes_16_bit_floats_exactly_and_thread_independently(dtype) -> None:
    sizes = (300_001, 4097, 1)
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in sizes]
    extremes = torch.tensor(HALF_EXTREMES[dtype]).to(dtype)
    assert extremes[2] != 0 and extremes.isfinite().all()  # the subnormals are representable, not flushed
    grads[0][7 : 7 + len(extremes)] = extremes  # squares far beyond the format's own range: float64 holds them
    sums = []
    for threads in (1, 2, 7):
        with num_threads(threads):
            total, finite = fused.sum_sq_and_finite(grads)
        assert finite
        sums.append(total.hex())
    assert sums[0] == sums[1] == sums[2]
    exact = exact_sum_sq([g.float() for g in grads])
    assert abs(float.fromhex(sums[0]) - exact) <= gamma(sum(sizes) - 1) * exact
    only_subnormals = [torch.tensor(HALF_EXTREMES[dtype][2:] * 40).to(dtype)]
    assert fused.sum_sq_and_finite(only_subnormals)[0] == exact_sum_sq([only_subnormals[0].float()]) > 0
    for bad in (math.nan, math.inf, -math.inf):
        broken = [g.clone() for g in grads]
        broken[1][3] = bad
        total, finite = fused.sum_sq_and_finite(broken)
        assert not finite and (math.isnan(total) if math.isnan(bad) else total == math.inf)
    with pytest.raises(ValueError, match=f"mixes {str(dtype)[6:]} and float32"):
        fused.sum_sq_and_finite([grads[0], grads[1].float()])


def test_access_patterns_give_the_same_bits_sums_included() -> None:
    """The streamed and the interleaved walks add the same terms into the same accumulators in the same order:
    updates and float64 sums alike are the same bits, so processes on different CPUs agree on k."""
    sizes = (70_001, 4099, 17, 1)
    grads = make_state(sizes, seed=5)[1]
    exact, exact_clipped = exact_sum_sq(grads), exact_sum_sq([clipped(g, 0.3) for g in grads])
    bound = gamma(sum(sizes) - 1)
    results = []
    try:
        for pattern in fused.ACCESS_PATTERNS:
            assert fused._select_access_pattern(pattern) == pattern
            state = make_state(sizes, seed=5)
            sums = []
            for flags in (dict(), dict(weight_decay=0.01, decoupled=True), dict(weight_decay=0.01), dict(beta1=0.2)):
                sums.append(fused.adam_update_(*state, **hyper(k=0.3, **flags)))
                assert abs(sums[-1] - exact_clipped) <= bound * exact_clipped
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                total, finite = fused.sum_sq_and_finite([g.to(dtype) for g in grads])
                assert finite
                sums.append(total)
            assert abs(sums[4] - exact) <= bound * exact
            fused._bandwidth_probe_(*state)  # p, m, v += g under this pattern
            results.append(([x.hex() for x in sums], state))
    finally:
        fused._select_access_pattern(None)
    (sums_a, state_a), (sums_b, state_b) = results
    assert sums_a == sums_b
    for group_a, group_b in zip(state_a, state_b, strict=True):
        for a, b in zip(group_a, group_b, strict=True):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert fused.access_pattern() in fused.ACCESS_PATTERNS


@pytest.mark.usefixtures("access_pattern")
def test_float16_pass_one_is_exact_for_every_finite_half_even_with_flush_denormal() -> None:
    """Every finite float16 bit pattern's square, alone, is the exact square; subnormal halves stay exact
    when the CPU treats float32 subnormals as zero (torch.set_flush_denormal(True)): the kernel never forms one."""
    halves = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    halves = halves[torch.isfinite(halves)]
    exact = [x * x for x in halves.double().tolist()]
    for flush in (False, True):
        if flush and not torch.set_flush_denormal(True):
            continue  # no denormals-are-zero mode on this CPU
        try:
            got = [fused.sum_sq_and_finite([halves[i : i + 1]])[0] for i in range(halves.numel())]
        finally:
            torch.set_flush_denormal(False)
        assert got == exact
