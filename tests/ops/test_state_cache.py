"""provetrain.Adam re-uses last step's state lists (ops.state_cache) only while they are provably the state:
every way of changing the parameters with a gradient or the state must be seen."""

from __future__ import annotations

import copy

import pytest
import torch

import provetrain
from provetrain.ops import fused

SIZES = (7, 33, 1000)


def make(seed: int = 0, **kwargs) -> tuple[list[torch.nn.Parameter], provetrain.Adam]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]
    return params, provetrain.Adam(params, lr=1e-2, clip_value=1.0, **kwargs)


def set_grads(params: list[torch.nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def run(params, opt, steps: range) -> None:
    for step in steps:
        set_grads(params, step)
        opt.step()


def bits(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def assert_same_bits(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(fused=False)])
def test_steady_state_uses_the_cache_and_gives_the_uncached_result(path, monkeypatch):
    params, opt = make(**path)
    run(params, opt, range(3))
    set_grads(params, 3)
    batches = opt._gather()
    assert opt._state_cache is not None and opt._state_cache.describes(opt.state, batches)
    opt.step()
    cached = bits(params)
    # The same run with a cache that never describes the step: fetched afresh every step.
    params2, opt2 = make(**path)
    monkeypatch.setattr(provetrain.ops.state_cache.StateCache, "describes", lambda *a: False)
    run(params2, opt2, range(4))
    assert_same_bits(cached, params2)


@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(fused=False)])
def test_a_replaced_state_entry_is_used(path):
    """Lightning's optimizer_to_device replaces state entries in place of the dict: the new tensor is used."""
    params, opt = make(**path)
    run(params, opt, range(2))
    p = params[1]
    old = opt.state[p]["exp_avg"]
    new = old.clone() + 1.0
    opt.state[p]["exp_avg"] = new
    kept_old = old.clone()
    run(params, opt, range(2, 3))
    assert torch.equal(old, kept_old)  # the replaced tensor is left alone
    assert not torch.equal(new, kept_old + 1.0)  # the new one took the step
    assert opt.state[p]["exp_avg"] is new


def test_a_replaced_state_dict_and_a_load_are_seen():
    params, opt = make()
    run(params, opt, range(2))
    p = params[0]
    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
    replaced = opt.state[p]["exp_avg_sq"]
    before = replaced.clone()
    run(params, opt, range(2, 3))
    assert not torch.equal(replaced, before)
    # A loaded copy puts new state tensors in place: the next step must update those, not the old ones.
    saved = copy.deepcopy(opt.state_dict())
    old_moments = [opt.state[q]["exp_avg"] for q in params]
    opt.load_state_dict(saved)
    new_moments = [opt.state[q]["exp_avg"] for q in params]
    snapshot = bits(old_moments)
    run(params, opt, range(3, 4))
    assert_same_bits(snapshot, old_moments)
    assert all(not torch.equal(a, b) for a, b in zip(new_moments, snapshot, strict=True))


def test_a_parameter_without_gradient_then_with_one_again():
    params, opt = make()
    run(params, opt, range(2))
    params[1].grad = None
    for q in (params[0], params[2]):
        q.grad = torch.ones_like(q)
    count_before = opt.state[params[1]]["step"].item()
    opt.step()
    assert opt.state[params[1]]["step"].item() == count_before
    assert opt.state[params[0]]["step"].item() == count_before + 1
    run(params, opt, range(3, 4))
    assert [opt.state[q]["step"].item() for q in params] == [count_before + 2, count_before + 1, count_before + 2]


def replace_with_strided(opt, p) -> torch.Tensor:
    strided = torch.zeros(2 * p.numel())[::2]
    strided.copy_(opt.state[p]["exp_avg"])
    opt.state[p]["exp_avg"] = strided
    return strided


@pytest.mark.parametrize(
    "path, takes_the_step",
    [
        pytest.param(dict(), "_use_fused", marks=pytest.mark.skipif(not fused.fused_available(), reason="no C kernel")),
        (dict(foreach=True), "_multi_tensor_fits"),
    ],
)
def test_a_moment_replaced_by_a_strided_tensor_is_checked_again(path, takes_the_step):
    """Both kernels read memory linearly: a strided moment that replaced a checked one must be refused."""
    params, opt = make(**path)
    params_ref, opt_ref = make(fused=False)
    for q, o in ((params, opt), (params_ref, opt_ref)):
        run(q, o, range(2))
    strided = replace_with_strided(opt, params[2])
    replace_with_strided(opt_ref, params_ref[2])
    set_grads(params, 2)
    assert not opt._state_cache.describes(opt.state, opt._gather())
    assert not getattr(opt, takes_the_step)(opt._gather())
    before = strided.clone()
    run(params, opt, range(2, 3))
    run(params_ref, opt_ref, range(2, 3))
    assert not torch.equal(strided, before)
    torch.testing.assert_close(params, params_ref)


@pytest.mark.skipif(not fused.fused_available(), reason=f"no C kernel: {fused.fused_unavailable_reason()}")
def test_fused_true_refuses_a_strided_moment_by_name():
    params, opt = make(fused=True)
    run(params, opt, range(2))
    replace_with_strided(opt, params[2])
    set_grads(params, 2)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensors only"):
        opt.step()


def test_amsgrad_switched_on_rebuilds_the_cache():
    params, opt = make()
    run(params, opt, range(2))
    opt.param_groups[0]["amsgrad"] = True
    run(params, opt, range(2, 4))
    assert all("max_exp_avg_sq" in opt.state[q] for q in params)
    assert opt._state_cache.batches[0].amsgrad


def test_a_parameter_whose_layout_changes_under_a_cached_state_is_refused():
    """model.to(memory_format=torch.channels_last) after the optimizer was made assigns p.data: the moments
    keep the old layout, so torch's fused kernel (which walks memory linearly) must not take the step."""
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5))
    opt = provetrain.Adam([p], lr=1e-2, clip_value=1.0, foreach=True)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    p.data = p.data.to(memory_format=torch.channels_last)
    p.grad = torch.randn_like(p)  # channels_last too, as autograd would make it
    batches = opt._gather()
    opt._step_cache = opt._state_cache if opt._state_cache.describes(opt.state, batches) else None
    assert opt._step_cache is not None and opt._step_cache.multi_tensor_ready
    assert not opt._multi_tensor_fits(batches)
    opt._step_cache = None
    reference = provetrain.Adam([q := torch.nn.Parameter(p.detach().clone())], lr=1e-2, fused=False, clip_value=1.0)
    reference.load_state_dict(copy.deepcopy(opt.state_dict()))
    q.grad = p.grad.clone()
    opt.step()
    reference.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(fused=False)])
def test_a_parameter_resized_after_steps_is_refused_by_name_not_read_past(path, dtype):
    """torch's CPU fused kernel checks no sizes: a moment smaller than its parameter must never reach it."""
    w = torch.nn.Parameter(torch.randn(8, dtype=dtype))
    opt = provetrain.Adam([w], lr=1e-2, clip_value=1.0, **path)
    for _ in range(2):
        w.grad = torch.ones_like(w)
        opt.step()
    moments = [opt.state[w][k].clone() for k in ("exp_avg", "exp_avg_sq", "step")]
    w.data = torch.randn(100_000, dtype=dtype)  # same strides (1,), 12,500x the elements
    w.grad = torch.ones_like(w)
    with pytest.raises(
        ValueError, match=r"of shape \(100000,\) but its exp_avg is a torch\.\w+ tensor of shape \(8,\)"
    ):
        opt.step()
    assert all(torch.equal(a, opt.state[w][k]) for a, k in zip(moments, ("exp_avg", "exp_avg_sq", "step"), strict=True))


@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(fused=False)])
def test_model_half_after_steps_is_refused_by_name_before_anything_changes(path):
    """model.half() after steps: float16 parameters, float32 moments. Refused with the parameter's name before
    any count or moment moves (torch's kernels would raise halfway, after the counts advanced)."""
    w = torch.nn.Parameter(torch.randn(8))
    opt = provetrain.Adam([w], lr=1e-2, eps=1e-4, clip_value=1.0, **path)  # an eps float16 can hold
    for _ in range(3):
        w.grad = torch.ones_like(w)
        opt.step()
    w.data = w.data.half()
    w.grad = torch.ones_like(w)
    state = {k: t.clone() for k, t in opt.state[w].items()}
    with pytest.raises(
        ValueError, match=r"is a torch\.float16 tensor of shape \(8,\) but its exp_avg is a torch\.float32"
    ):
        opt.step()
    assert all(torch.equal(state[k], opt.state[w][k]) for k in state)
    # The remedy the message gives: a state dict round trip casts the moments to the parameter's dtype.
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.float16 and opt.state[w]["step"].item() == 4


@pytest.mark.skipif(not fused.fused_available(), reason=f"no C kernel: {fused.fused_unavailable_reason()}")
def test_a_count_recast_under_the_cache_leaves_the_c_kernel():
    """A count's .data recast to float64 after steps: the C kernel writes float32 counts through raw memory,
    so it must refuse (the reference path then counts in float64, exactly)."""
    w = torch.nn.Parameter(torch.zeros(16))
    opt = provetrain.Adam([w], lr=1e-3, clip_value=1.0)
    for _ in range(3):
        w.grad = torch.ones(16)
        opt.step()
    count = opt.state[w]["step"]
    count.data = count.data.double()
    w.grad = torch.ones(16)
    opt.step()
    assert count.item() == 4.0 and count.dtype == torch.float64
    strict = provetrain.Adam([v := torch.nn.Parameter(torch.zeros(16))], lr=1e-3, fused=True)
    for _ in range(2):
        v.grad = torch.ones(16)
        strict.step()
    strict.state[v]["step"].data = strict.state[v]["step"].data.double()
    v.grad = torch.ones(16)
    with pytest.raises(ValueError, match=r"fused=True, but a step count is a torch\.float64 tensor"):
        strict.step()


@pytest.mark.skipif(not fused.fused_available(), reason=f"no C kernel: {fused.fused_unavailable_reason()}")
def test_a_moment_recast_under_the_cache_leaves_the_c_kernel():
    """A moment's .data recast to a 2-byte dtype keeps its element count: the C kernel would write past it."""
    w = torch.nn.Parameter(torch.zeros(16))
    opt = provetrain.Adam([w], lr=1e-3, clip_value=1.0)
    for _ in range(3):
        w.grad = torch.ones(16)
        opt.step()
    opt.state[w]["exp_avg_sq"].data = opt.state[w]["exp_avg_sq"].data.bfloat16()
    w.grad = torch.ones(16)
    batches = opt._gather()
    opt._step_cache = opt._state_cache if opt._state_cache.describes(opt.state, batches) else None
    assert opt._step_cache is not None and not opt._use_fused(batches)
    opt._step_cache = None


@pytest.mark.parametrize("path", [dict(), dict(foreach=True), dict(fused=False)])
def test_another_parameter_of_the_same_shape_taking_the_gradient_gets_its_own_state(path, monkeypatch):
    """Steps alternate between two same-shaped parameters (one gradient each time): same count of parameters
    with a gradient, same shapes, other identities. Each must step on its own state."""

    def run_alternating(opt_kwargs):
        a, b = (torch.nn.Parameter(torch.full((5,), float(i))) for i in (1, 2))
        opt = provetrain.Adam([a, b], lr=0.1, clip_value=1.0, **opt_kwargs)
        for step in range(6):
            a.grad, b.grad = (torch.full((5,), 0.5), None) if step % 2 == 0 else (None, torch.full((5,), -2.0))
            opt.step()
        return a, b, opt

    a, b, opt = run_alternating(path)
    assert opt.state[a]["step"].item() == 3 and opt.state[b]["step"].item() == 3
    assert (opt.state[a]["exp_avg"] > 0).all() and (opt.state[b]["exp_avg"] < 0).all()
    monkeypatch.setattr(provetrain.ops.state_cache.StateCache, "describes", lambda *args: False)
    a2, b2, _ = run_alternating(path)
    assert torch.equal(a, a2) and torch.equal(b, b2)
