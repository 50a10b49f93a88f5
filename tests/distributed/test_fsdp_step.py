"""The clipped, guarded Adam step on FSDP2 parameters (provetrain.ops.sharded): 2 gloo ranks on CPU.

One spawn runs a tiny transformer (even and uneven shards) under ``fully_shard`` for a few steps with Adam
(L2 decay) and with AdamW; this process then runs the same global batches in one process with
``provetrain.Adam`` / ``AdamW`` and compares. On step 2 one element of rank 1's gradient shard is NaN, on
step 3 rank 1 alone passes a NaN loss: both ranks must skip both steps.

The optimizer on the ranks is ``provetrain.Adam``/``AdamW``, whose step routes DTensor parameters to
``sharded_adam_step_``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from provetrain.errors import ContractViolation
from provetrain.ops.adam import Adam, AdamW
from provetrain.ops.sharded import ShardedGroup, sharded_adam_step_
from tests.distributed._ranks import (
    NAN,
    finite,
    full,
    loss_on,
    rank_rows,
    run_ranks,
    shard,
    sharded_adam,
    tiny_lm,
)
from tests.train.test_distributed import exact_sum_sq

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="no torch.distributed with gloo"
)

STEPS, NAN_GRAD_STEP, NAN_LOSS_STEP = 6, 2, 3
CLIP, LR = 0.75, 1e-2
CONFIGS = {
    "adam-l2": {"weight_decay": 0.01, "decoupled_weight_decay": False},
    "adamw": {"weight_decay": 0.1, "decoupled_weight_decay": True},
}


def _optimizer(params: list[torch.Tensor], config: dict[str, Any]) -> Any:
    return sharded_adam(params, lr=LR, clip_value=CLIP, **config)


def _sharded_run(rank: int, config: dict[str, Any]) -> dict[str, Any]:
    model = shard(tiny_lm())
    params = list(model.parameters())
    optimizer = _optimizer(params, config)
    record: dict[str, Any] = {
        "weights": [full(params)],
        "before": [],
        "after": [],
        "skip": [],
        "finite": [],
        "loss": [],
    }
    for step in range(STEPS):
        loss = loss_on(model, step, rank_rows(rank))
        loss.backward()
        if rank == 1 and step == NAN_GRAD_STEP:
            params[-1].grad.to_local()[0] = NAN  # head.bias: 13 rows, rank 1 holds the last 6
        record["loss"].append(float(loss.detach()))
        passed = torch.tensor(NAN) if rank == 1 and step == NAN_LOSS_STEP else loss.detach()
        record["before"].append(full(p.grad for p in params))
        record["skip"].append(_step_skipped(optimizer, passed))
        record["after"].append(full(p.grad for p in params))
        record["weights"].append(full(params))
        moments = [optimizer.state[p][key].to_local() for p in params for key in ("exp_avg", "exp_avg_sq")]
        record["finite"].append(finite([p.to_local() for p in params] + moments))
        optimizer.zero_grad()
    record["shard_rows"] = [p.to_local().shape[0] for p in params]
    return record


def _step_skipped(optimizer: Any, loss: torch.Tensor) -> bool:
    """Take the step; whether it was skipped."""
    before = int(optimizer.skipped_steps)
    optimizer.step(loss=loss)
    return int(optimizer.skipped_steps) > before


def _raise_mode(rank: int) -> dict[str, Any]:
    """on_nonfinite="raise" with a NaN in rank 1's shard: every rank raises, naming rank 1; nothing moves."""
    model = shard(tiny_lm())
    params = list(model.parameters())
    optimizer = sharded_adam(params, lr=LR, clip_value=CLIP, on_nonfinite="raise")
    loss_on(model, 0, rank_rows(rank)).backward()
    if rank == 1:
        params[1].grad.to_local()[0, 0] = NAN  # embed.weight (params[0] is the temperature)
    before = full(params)
    try:
        optimizer.step()
        outcome: Any = "stepped"
    except ContractViolation as error:
        outcome = {"clause": error.clause, "observed": error.observed}
    unchanged = all(torch.equal(a, b) for a, b in zip(full(params), before, strict=True))
    return {"outcome": outcome, "unchanged": unchanged, "state": len(optimizer.state)}


def _fsdp_steps(rank: int, directory: Path) -> dict[str, Any]:
    runs: dict[str, Any] = {name: _sharded_run(rank, config) for name, config in CONFIGS.items()}
    runs["raise"] = _raise_mode(rank)
    return runs


def _single_process(config: dict[str, Any], params: list[torch.Tensor]) -> Any:
    """provetrain.Adam / AdamW on its multi-tensor path: torch's fused kernel, as the sharded step uses."""
    cls = AdamW if config["decoupled_weight_decay"] else Adam
    return cls(params, lr=LR, clip_value=CLIP, weight_decay=config["weight_decay"], fused=False, foreach=True)


def _single_process_run(config: dict[str, Any]) -> tuple[list[list[torch.Tensor]], list[float]]:
    """The same global batches in one process, skipping the steps the ranks skip: weights and losses."""
    model = tiny_lm()
    params = list(model.parameters())
    optimizer = _single_process(config, params)
    weights, losses = [[p.detach().clone() for p in params]], []
    for step in range(STEPS):
        loss = loss_on(model, step, slice(None))
        losses.append(float(loss.detach()))
        if step not in (NAN_GRAD_STEP, NAN_LOSS_STEP):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        weights.append([p.detach().clone() for p in params])
    return weights, losses


def _replayed(config: dict[str, Any], gradients: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """provetrain.Adam in one process, fed the gathered global gradients of the sharded run."""
    params = [p.detach().clone().requires_grad_() for p in tiny_lm().parameters()]
    optimizer = _single_process(config, params)
    weights = [[p.detach().clone() for p in params]]
    for step, grads in enumerate(gradients):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        optimizer.step(loss=NAN if step == NAN_LOSS_STEP else None)
        weights.append([p.detach().clone() for p in params])
    return weights


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch build")
    results, codes = run_ranks(_fsdp_steps, tmp_path_factory.mktemp("fsdp-steps"))
    assert codes == [0, 0], results
    assert all("error" not in r for r in results), results
    return results


def test_shards_are_even_and_uneven(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["adamw"]["shard_rows"] for r in ranks)
    rows = [p.shape[0] for p in ranks[0]["adamw"]["weights"][0]]
    assert [a + b for a, b in zip(first, second, strict=True)] == rows
    assert any(a == b for a, b in zip(first, second, strict=True))
    assert any(a != b for a, b in zip(first, second, strict=True))
    assert first[0] == 1 and second[0] == 0  # the temperature: an empty shard on rank 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_gradient_equals_the_single_process_gradient_of_the_global_batch(
    ranks: list[dict[str, Any]], name: str
) -> None:
    model = tiny_lm()
    loss_on(model, 0, slice(None)).backward()
    for got, p in zip(ranks[0][name]["before"][0], model.parameters(), strict=True):
        # The mean of two half-batch means against one mean: summation order, a few float32 ulps of 0.2.
        torch.testing.assert_close(got, p.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_steps_equal_provetrain_adam_on_the_same_global_gradients(ranks: list[dict[str, Any]], name: str) -> None:
    first, second = (r[name] for r in ranks)
    replayed = _replayed(CONFIGS[name], first["before"])
    for step, (got, want) in enumerate(zip(first["weights"], replayed, strict=True)):
        assert all(torch.equal(a, b) for a, b in zip(got, second["weights"][step], strict=True))
        for a, b in zip(got, want, strict=True):
            # Only the global norm's summation order differs: k in its last bits, y by a rounding.
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-9, msg=f"{name} step {step}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_run_follows_the_single_process_run_of_the_same_global_batches(
    ranks: list[dict[str, Any]], name: str
) -> None:
    first, second = (r[name] for r in ranks)
    weights, losses = _single_process_run(CONFIGS[name])
    moved = max(float((a - b).abs().max()) for a, b in zip(weights[-1], weights[0], strict=True))
    assert moved > 2 * LR  # the run moved: several steps of about lr each
    sharded = [(a + b) / 2 for a, b in zip(first["loss"], second["loss"], strict=True)]
    # Weights differ by more than a rounding where a gradient is 0 in exact arithmetic (the attention key
    # bias: softmax ignores a shift) and its rounding noise, different in each summation order, goes
    # through Adam's m / sqrt(v) at full size; the loss does not depend on those directions.
    assert sharded == pytest.approx(losses, rel=0, abs=2e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fsdp2_clip_bound_holds_exactly_on_the_gathered_gradient(ranks: list[dict[str, Any]], name: str) -> None:
    record = ranks[0][name]
    clipped = 0
    for step in range(STEPS):
        if record["skip"][step]:
            continue
        before, after = record["before"][step], record["after"][step]
        assert exact_sum_sq(after) <= CLIP**2  # the gradient Adam used, written back by the fused kernel
        if exact_sum_sq(before) > CLIP**2:
            clipped += 1
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert clipped >= 2  # the bound was exercised, not vacuous


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_nan_on_one_rank_skips_the_step_on_every_rank_and_every_shard_stays_finite(
    ranks: list[dict[str, Any]], name: str
) -> None:
    first, second = (r[name] for r in ranks)
    expected = [step in (NAN_GRAD_STEP, NAN_LOSS_STEP) for step in range(STEPS)]
    assert first["skip"] == second["skip"] == expected
    assert all(first["finite"]) and all(second["finite"])
    for step in (NAN_GRAD_STEP, NAN_LOSS_STEP):  # skipped: every weight keeps its bits
        assert all(torch.equal(a, b) for a, b in zip(first["weights"][step + 1], first["weights"][step], strict=True))
    assert not finite(first["before"][NAN_GRAD_STEP])  # the NaN was there, on rank 1's shard only


def test_raise_mode_raises_on_every_rank_naming_the_rank_and_changes_nothing(ranks: list[dict[str, Any]]) -> None:
    for rank in ranks:
        record = rank["raise"]
        assert record["outcome"]["clause"] == "gradients.iter().all(|g| g.is_finite())"
        assert record["outcome"]["observed"]["nonfinite_by_rank"] == {1: 1}
        assert record["unchanged"] and record["state"] == 0  # no state was even created


def test_plain_tensors_are_refused_before_anything_changes() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    hyper = {"lr": LR, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    hyper |= {"decoupled_weight_decay": False, "maximize": False}
    state: dict[Any, Any] = {}
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(3,\)\) is a plain tensor among DTensor"):
        sharded_adam_step_([ShardedGroup([p], [p.grad], hyper)], state, clip_value=1.0)
    assert not state and torch.equal(p.detach(), torch.ones(3))
