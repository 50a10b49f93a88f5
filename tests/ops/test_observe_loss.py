"""Adam.observe_loss: a non-finite loss of any accumulation micro-step skips the accumulated step."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from provetrain.errors import ContractViolation
from provetrain.ops import adam as adam_module
from provetrain.ops.adam import Adam, AdamW
from tests.ops.test_adam import PATHS, RecordHostReads, assert_bitwise_equal, make_batches, make_model, snapshot

MICRO_STEPS = 4


def accumulate(model, opt, *, nan_at: int | None, seed: int = 1, float_loss: bool = False) -> None:
    """MICRO_STEPS micro-steps; micro-step ``nan_at``'s observed loss is NaN, every gradient stays finite."""
    for i, (x, y) in enumerate(make_batches(MICRO_STEPS, seed=seed)):
        loss = F.mse_loss(model(x), y) / MICRO_STEPS
        observed = loss.detach() * math.nan if i == nan_at else loss.detach()  # a NaN the backward pass never sees
        opt.observe_loss(observed.item() if float_loss else observed)
        loss.backward()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("ours", [Adam, AdamW])
@pytest.mark.parametrize("float_loss", [False, True], ids=["tensor_loss", "float_loss"])
def test_nan_loss_on_micro_step_1_of_4_skips_the_step_once(ours, path, float_loss) -> None:
    model = make_model()
    opt = ours(model.named_parameters(), lr=1e-2, clip_value=0.5, **path)
    accumulate(model, opt, nan_at=None, seed=3)  # one applied step first: the moments are non-zero
    opt.step()
    opt.zero_grad()
    before = snapshot(model, opt)
    accumulate(model, opt, nan_at=1, float_loss=float_loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert_bitwise_equal(snapshot(model, opt), before)  # weights, both moments and step counts
    assert int(opt.skipped_steps) == 1
    assert math.isnan(float(opt.last_clipped_grad_norm))
    # The flag was consumed: the next accumulated step with finite losses is applied.
    opt.zero_grad()
    accumulate(model, opt, nan_at=None)
    opt.step()
    assert int(opt.skipped_steps) == 1
    assert not torch.equal(model.fc1.weight, before["fc1.weight"])


@pytest.mark.parametrize("path", PATHS)
def test_finite_observed_losses_change_nothing(path) -> None:
    a, b = make_model(), make_model()
    opt_a = Adam(a.parameters(), lr=1e-2, clip_value=0.5, **path)
    opt_b = Adam(b.parameters(), lr=1e-2, clip_value=0.5, **path)
    for _ in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        accumulate(a, opt_a, nan_at=None)
        for x, y in make_batches(MICRO_STEPS, seed=1):
            (F.mse_loss(b(x), y) / MICRO_STEPS).backward()
        opt_a.step()
        opt_b.step()
    assert_bitwise_equal(snapshot(a, opt_a), snapshot(b, opt_b))


@pytest.mark.parametrize("path", PATHS)
def test_raise_mode_names_the_observed_micro_step_loss(path) -> None:
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2, on_nonfinite="raise", **path)
    accumulate(model, opt, nan_at=0)
    before = snapshot(model, opt)
    with pytest.raises(ContractViolation, match=re.escape("micro-step loss handed to observe_loss()")) as info:
        opt.step()
    assert info.value.clause == "loss.is_finite()"
    assert_bitwise_equal(snapshot(model, opt), before)
    opt.step()  # the raising step consumed the flag: the same (finite) gradients now apply
    assert int(next(iter(opt.state.values()))["step"]) == 1


def test_zero_grad_does_not_clear_the_flag() -> None:
    # A loop that zeroes gradients around micro-steps still skips the step the NaN micro-step belongs to.
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2, fused=False)
    x, y = make_batches(1)[0]
    opt.observe_loss(torch.tensor(math.inf))
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    assert int(opt.skipped_steps) == 1


def test_observed_flag_and_step_loss_count_one_skip_together() -> None:
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2, fused=False)
    x, y = make_batches(1)[0]
    loss = F.mse_loss(model(x), y)
    loss.backward()
    opt.observe_loss(loss * math.nan)
    opt.step(loss=loss * math.nan)
    assert int(opt.skipped_steps) == 1


def test_observe_loss_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # The branch CUDA takes: observing and the skip-mode step read no flag on the host.
    monkeypatch.setattr(adam_module, "_FREE_CPU_READS", False)
    model = make_model()
    opt = Adam(model.parameters(), lr=1e-2, clip_value=0.5, fused=False)
    x, y = make_batches(1)[0]
    loss = F.mse_loss(model(x), y)
    with RecordHostReads() as reads:
        opt.observe_loss(loss * math.nan)
        opt.observe_loss(loss)
    loss.backward()
    with RecordHostReads() as step_reads:
        opt.step()
    assert reads.seen == [] and step_reads.seen == []
    assert int(opt.skipped_steps) == 1


def test_observe_loss_refuses_what_is_not_a_loss() -> None:
    opt = Adam(make_model().parameters())
    with pytest.raises(TypeError, match="loss must be a tensor or a real number"):
        opt.observe_loss("nan")  # type: ignore[arg-type]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_an_empty_step_with_a_nonfinite_loss_counts_as_skipped_too(optimizer) -> None:
    """on_empty="skip": nothing changes, the step counts in empty_steps, and a NaN loss (observed or given)
    counts in skipped_steps as on any step, so the skip budget sees it; raise mode names it."""
    from provetrain import SGD

    model = make_model()
    make = (
        (lambda **kw: Adam(model.parameters(), clip_value=1.0, on_empty="skip", **kw))
        if optimizer == "adam"
        else (lambda **kw: SGD(model.parameters(), lr=0.1, clip_value=1.0, on_empty="skip", **kw))
    )
    opt = make()
    opt.observe_loss(torch.tensor(math.nan))
    opt.step()  # no gradients anywhere
    opt.step(loss=torch.tensor(math.inf))
    opt.step(loss=1.0)
    opt.observe_loss(torch.tensor(2.0))
    opt.step()
    assert (int(opt.empty_steps), int(opt.skipped_steps)) == (4, 2)
    strict = make(on_nonfinite="raise")
    strict.observe_loss(math.nan)
    with pytest.raises(ContractViolation, match=r"loss\.is_finite") as raised:
        strict.step()
    assert raised.value.step == 1  # the 1-based number of the step that raised, for Adam and SGD alike
    assert (int(strict.empty_steps), int(strict.skipped_steps)) == (0, 0)
    strict.step()  # the flag was consumed by the step that raised
    assert int(strict.empty_steps) == 1


def test_load_state_dict_clears_an_observed_loss() -> None:
    model = make_model()
    opt = Adam(model.parameters(), clip_value=1.0)
    saved = opt.state_dict()
    opt.observe_loss(math.nan)
    opt.load_state_dict(saved)  # e.g. a rollback: the accumulated step in progress belonged to the old state
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert int(opt.skipped_steps) == 0
