"""The loss-trend monitor: exact statistics, calibrated false alarms, prompt detection, clean refusals."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from provetrain import ContractViolation
from provetrain.train.monitor import (
    INVARIANT,
    LossTrendMonitor,
    TrendVerdict,
    bonferroni_alpha,
    student_t_sf,
    welch_t_test,
)


def _run(monitor: LossTrendMonitor, losses: np.ndarray, start: int = 0) -> list[TrendVerdict]:
    verdicts = []
    for step, loss in enumerate(losses.tolist(), start=start):
        verdict = monitor.update(step, loss)
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


# --- the statistics ----------------------------------------------------------------------------------

# Closed forms, written without cancellation so that they are accurate far into the tail.
CLOSED_FORMS = {
    1: lambda t: math.atan2(1.0, t) / math.pi,
    2: lambda t: 1.0 / (math.sqrt(2 + t * t) * (math.sqrt(2 + t * t) + t)),
}


@pytest.mark.parametrize("df", sorted(CLOSED_FORMS))
@pytest.mark.parametrize("t", [0.0, 0.1, 1.0, 2.5, 10.0, 1e3])
def test_t_survival_matches_closed_forms(df: int, t: float) -> None:
    assert student_t_sf(t, df) == pytest.approx(CLOSED_FORMS[df](t), rel=1e-11)
    assert student_t_sf(-t, df) == pytest.approx(1.0 - CLOSED_FORMS[df](t), rel=1e-11)


def test_t_survival_known_values_and_limits() -> None:
    assert student_t_sf(2.0, 10) == pytest.approx(0.036694017385370, rel=1e-10)  # tables
    assert student_t_sf(3.0, 1e6) == pytest.approx(0.5 * math.erfc(3 / math.sqrt(2)), rel=1e-4)  # → normal
    assert student_t_sf(math.inf, 5) == 0.0 and student_t_sf(-math.inf, 5) == 1.0
    assert student_t_sf(0.0, 7.5) == 0.5


def test_welch_matches_its_definition() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 30), rng.normal(0.5, 2, 40)
    t, df, p = welch_t_test(x.mean(), x.var(ddof=1), 30, y.mean(), y.var(ddof=1), 40)
    a, b = x.var(ddof=1) / 30, y.var(ddof=1) / 40
    assert t == pytest.approx((y.mean() - x.mean()) / math.sqrt(a + b), rel=1e-12)
    assert df == pytest.approx((a + b) ** 2 / (a * a / 29 + b * b / 39), rel=1e-12)
    assert p == pytest.approx(student_t_sf(t, df), rel=1e-12)


@pytest.mark.parametrize(("mean2", "expected"), [(2.0, (math.inf, 0.0)), (1.0, (0.0, 1.0)), (0.5, (-math.inf, 1.0))])
def test_welch_with_constant_windows(mean2: float, expected: tuple[float, float]) -> None:
    t, df, p = welch_t_test(1.0, 0.0, 5, mean2, 0.0, 5)
    assert (t, p) == expected and df == 8.0


# --- silent on healthy runs, with the false-alarm rate alpha -------------------------------------------

NOISES = {
    "gaussian": lambda rng, n: rng.normal(2.0, 0.3, n),
    "exponential": lambda rng, n: 1.0 + rng.exponential(0.5, n),
}


@pytest.mark.parametrize("noise", NOISES)
def test_false_alarm_rate_on_a_plateau_is_alpha(noise: str) -> None:
    alpha, window, runs, steps = 1e-2, 50, 200, 1000
    tests = alarms = 0
    for seed in range(runs):
        monitor = LossTrendMonitor(window=window, alpha=alpha)
        alarms += len(_run(monitor, NOISES[noise](np.random.default_rng(seed), steps)))
        tests += monitor.tests
    assert tests == runs * (steps // window - 1)
    expected = alpha * tests  # 38 of 3800; binomial sd ≈ 6.1
    assert expected - 4 * math.sqrt(expected) <= alarms <= expected + 4 * math.sqrt(expected)


def test_a_plateau_rarely_alarms_at_the_default_alpha() -> None:
    runs_with_alarm = 0
    for seed in range(200):
        losses = np.random.default_rng(1000 + seed).normal(1.0, 0.2, 1000)
        runs_with_alarm += bool(_run(LossTrendMonitor(), losses))
    # Union bound: at most 19 tests x 1e-3 = 1.9% of runs; 200 runs should see ~4 at most.
    assert runs_with_alarm <= 4 * 200 * 19 * 1e-3


def test_decreasing_runs_alarm_no_more_than_a_plateau() -> None:
    # The decay flattens into a plateau, where alarms at rate alpha per test are the promised behaviour;
    # while the loss still falls, t is negative and alarms are rarer still.
    steps = np.arange(3000)
    tests = alarms = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        losses = 0.5 + 2.0 * np.exp(-steps / 800) + rng.normal(0, 0.2, steps.size) * (0.5 + np.exp(-steps / 800))
        monitor = LossTrendMonitor()
        verdicts = _run(monitor, losses)
        assert all(v.step > 1500 for v in verdicts)  # never while the loss visibly falls
        tests, alarms = tests + monitor.tests, alarms + len(verdicts)
    assert tests == 30 * 59
    assert alarms <= 1e-3 * tests


# --- fires on diverging runs -------------------------------------------------------------------------

ONSET = 1000


def _diverging(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = np.arange(ONSET + 500)
    losses = 1.0 + rng.normal(0, 0.1, steps.size)
    after = np.clip(steps - ONSET, 0, None)
    if kind == "exponential":
        return losses + (np.exp(after / 50.0) - 1.0)
    return losses + 0.002 * after  # E[t] ≈ 0.002·50^1.5 / (0.1·√2) ≈ 5 per window pair


@pytest.mark.parametrize(("kind", "bound"), [("exponential", 2), ("linear drift", 4)])
def test_fires_within_a_few_windows_of_divergence(kind: str, bound: int) -> None:
    for seed in range(20):
        monitor = LossTrendMonitor(window=50, alpha=1e-3)
        verdicts = _run(monitor, _diverging(kind, seed))
        assert verdicts, f"seed {seed}: never fired"
        first = verdicts[0]
        assert ONSET < first.step <= ONSET + bound * 50, f"seed {seed}: fired at {first.step}"
        assert first.current_mean > first.previous_mean and first.p_value < 1e-3


def test_verdict_quotes_the_invariant_and_becomes_a_violation() -> None:
    monitor = LossTrendMonitor(window=10, alpha=1e-3)
    assert _run(monitor, np.array([1.0, 1.1] * 5)) == []
    (verdict,) = _run(monitor, np.array([2.0, 2.1] * 5), start=10)
    assert verdict.step == 19 and verdict.previous_steps == (0, 9) and verdict.current_steps == (10, 19)
    assert verdict.message.startswith(f"invariant `{INVARIANT}` rejected at step 19: mean loss 2.05 over steps 10-19")
    assert re.search(r"one-sided Welch t = [\d.]+, df = 18\.0, p = [\de.-]+ < alpha = 0\.001\)$", verdict.message)
    violation = verdict.to_violation()
    assert isinstance(violation, ContractViolation)
    assert (violation.equation, violation.clause, violation.kind, violation.step) == (
        "loss_decrease",
        "Loss monotonically non-increasing (in expectation)",
        "invariant",
        19,
    )


def test_min_steps_ignores_the_warm_up() -> None:
    rising_warm_up = np.linspace(1.0, 5.0, 100)
    monitor = LossTrendMonitor(window=10, min_steps=100)
    assert _run(monitor, np.concatenate([rising_warm_up, np.full(40, 5.0)])) == []
    assert monitor.tests == 3
    assert _run(LossTrendMonitor(window=10), rising_warm_up)


# --- state for checkpoints ---------------------------------------------------------------------------


def test_state_dict_resumes_to_the_same_verdicts() -> None:
    losses = _diverging("linear drift", seed=3)
    whole = _run(LossTrendMonitor(window=30), losses)
    first = LossTrendMonitor(window=30)
    head = _run(first, losses[:1017])
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    second = LossTrendMonitor(window=30)
    second.load_state_dict(state)
    tail = _run(second, losses[1017:], start=1017)
    assert head + tail == whole
    assert (second.tests, second.alarms) == (len(losses) // 30 - 1, len(whole))


def test_load_state_dict_refuses_a_different_window_or_a_partial_state() -> None:
    state = LossTrendMonitor(window=30).state_dict()
    with pytest.raises(ValueError, match=re.escape("recorded with window=30, this monitor has window=50")):
        LossTrendMonitor(window=50).load_state_dict(state)
    with pytest.raises(ValueError, match=re.escape("monitor state lacks ['current']")):
        LossTrendMonitor(window=30).load_state_dict({k: v for k, v in state.items() if k != "current"})


# --- bad input ---------------------------------------------------------------------------------------

BAD_UPDATES = [
    ("nan", 1, float("nan"), ValueError, r"loss at step 1 is nan: the trend monitor tests finite losses only"),
    ("inf", 1, float("inf"), ValueError, r"loss at step 1 is inf"),
    ("tensor-like", 1, "0.5", TypeError, r"loss must be a real number, got str; pass loss\.item\(\)"),
    ("bool", 1, True, TypeError, r"got bool"),
    ("repeated step", 0, 1.0, ValueError, r"step must increase: got 0 after 0"),
    ("negative step", -1, 1.0, ValueError, r"step must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize(("name", "step", "loss", "error", "message"), BAD_UPDATES, ids=[r[0] for r in BAD_UPDATES])
def test_bad_updates_are_refused(name: str, step: int, loss: object, error: type[Exception], message: str) -> None:
    monitor = LossTrendMonitor()
    monitor.update(0, 1.0)
    before = monitor.state_dict()
    with pytest.raises(error, match=message):
        monitor.update(step, loss)  # type: ignore[arg-type]
    assert monitor.state_dict() == before


BAD_CONFIGS = [
    ({"window": 1}, r"window must be an integer >= 2, got 1"),
    ({"window": 10.0}, r"window must be an integer >= 2, got 10\.0"),
    ({"alpha": 0.0}, r"alpha must be a float in \(0, 1\), got 0\.0"),
    ({"alpha": 1.5}, r"got 1\.5"),
    ({"min_steps": -5}, r"min_steps must be an integer >= 0, got -5"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS)
def test_bad_configuration_is_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LossTrendMonitor(**kwargs)


def test_bonferroni_alpha() -> None:
    assert bonferroni_alpha(0.01, 100_000, 50) == pytest.approx(0.01 / 1999)
    assert bonferroni_alpha(0.05, 10, 50) == 0.05
    with pytest.raises(ValueError, match="family_alpha must be in"):
        bonferroni_alpha(0.0, 100, 50)
