"""StepCertifier without a framework: what both callbacks rely on."""

from __future__ import annotations

import torch

from provetrain.integrations._certify import StepCertifier
from provetrain.ops.adam import AdamW
from provetrain.train.certificate import GRAD


def test_a_step_without_gradients_is_counted_not_certified() -> None:
    # Frameworks step the optimizer in frozen phases too, where torch.optim does nothing.
    model = torch.nn.Linear(3, 1)
    opt = AdamW(model.parameters(), lr=1e-2, clip_value=1.0)
    certifier = StepCertifier(opt)
    assert opt.on_empty == "skip"
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step()
    certifier.record_step(0)
    assert certifier.read_back() == [] and certifier.empty_steps == 1 and certifier.steps == 0
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters(), strict=True))
    record = certifier.ledger.records[(GRAD, "precondition", "!gradients.is_empty()")]
    assert record.actions["skip"] == 1
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    certifier.record_step(1)
    rows = certifier.read_back()
    assert [r["step"] for r in rows] == [1] and not rows[0]["skipped"] and certifier.empty_steps == 1
