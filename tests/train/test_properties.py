"""Hypothesis property tests of the loss_decrease equation (gradient_norm's are in tests/ops/test_clip.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from provetrain.ops.adam import Adam, AdamW, moment_limit

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
any32 = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(finite32, min_size=1, max_size=12), st.data())
def test_cross_entropy_is_never_negative(logits: list[float], data: st.DataObject) -> None:
    """The lean_theorem CrossEntropy.NonNegativity, as computed in float32 for any finite logits."""
    target = data.draw(st.integers(0, len(logits) - 1))
    loss = F.cross_entropy(torch.tensor([logits]), torch.tensor([target]))
    assert not math.isnan(float(loss)) and float(loss) >= 0.0


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(any32, min_size=4, max_size=4),
    st.one_of(finite32, st.sampled_from([math.nan, math.inf, -math.inf])),
    st.sampled_from([Adam, AdamW]),
    st.sampled_from([None, 1.0]),
)
def test_guarded_step_never_writes_a_non_finite_weight(grad: list[float], loss: float, optimizer, clip) -> None:
    """loss_decrease's postcondition, enforced: whatever the gradient and loss, the weights and moments stay
    finite; a non-finite loss or gradient, or (without a clip) a gradient whose square would overflow the
    second moment, leaves them bit-for-bit unchanged and is counted."""
    p = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    opt = optimizer([p], lr=1e-2, clip_value=clip)
    before = p.detach().clone()
    p.grad = torch.tensor(grad)
    opt.step(loss=torch.tensor(loss))
    finite = math.isfinite(loss) and all(math.isfinite(g) for g in grad)
    norm = math.sqrt(sum(g * g for g in grad)) if finite else math.inf
    ratio = norm / moment_limit(torch.float32)
    bad = not finite or (clip is None and ratio > 1)
    assert torch.isfinite(p).all() and all(torch.isfinite(t).all() for t in opt.state[p].values())
    if not (clip is None and abs(ratio - 1) < 1e-5):  # at the limit itself the rounding of the norm decides
        assert int(opt.skipped_steps) == int(bad)
    if bad:
        assert torch.equal(p.detach(), before)
    else:
        assert float(opt.last_clipped_grad_norm) <= (clip if clip is not None else math.inf)
