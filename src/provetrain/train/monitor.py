"""A statistical monitor for the invariant "Loss monotonically non-increasing (in expectation)".

Per-step losses are noisy, so the invariant is about their expectation and cannot be checked step by
step. The stream is cut into consecutive, non-overlapping windows of ``window`` losses, and each window is
compared with the one before it by a one-sided Welch t-test (Welch 1947, *The generalization of
"Student's" problem when several different population variances are involved*):

.. math::  H_0: \\mu_{\\mathrm{cur}} \\le \\mu_{\\mathrm{prev}} \\quad\\text{vs}\\quad
           H_1: \\mu_{\\mathrm{cur}} > \\mu_{\\mathrm{prev}}, \\qquad
           t = \\frac{\\bar L_{\\mathrm{cur}} - \\bar L_{\\mathrm{prev}}}{\\sqrt{s^2_{\\mathrm{cur}}/n_{\\mathrm{cur}}
               + s^2_{\\mathrm{prev}}/n_{\\mathrm{prev}}}}

with the Welch–Satterthwaite degrees of freedom
``ν = (a + b)² / (a²/(n_prev − 1) + b²/(n_cur − 1))``, ``a = s²_prev/n_prev``, ``b = s²_cur/n_cur``. The
p-value ``P(T_ν ≥ t)`` uses the Student t survival function, computed exactly from the regularised
incomplete beta function ``P(T_ν ≥ t) = ½ I_{ν/(ν+t²)}(ν/2, ½)`` for t ≥ 0 (continued fraction, modified
Lentz; relative accuracy ~1e-12, no scipy). The monitor fires when ``p < alpha``. Welch rather than
Student: the loss's variance changes during training. Means come from Welford's running update, so a
window costs O(1) memory and the state is a few numbers.

False alarms
------------
Under H0 at the boundary (a flat plateau of independent losses, the hardest case the invariant allows)
each test rejects with probability ≈ alpha: exactly alpha for Gaussian losses with equal variances (then
ν = 2n − 2), close to it otherwise (the difference of two i.i.d. window means is symmetric, so skewness
largely cancels; measured in the tests for Gaussian and exponential noise). A decreasing loss makes t
negative and rejection rarer still. Tests run once every ``window`` accepted losses, so over T steps
there are about ``T/window − 1`` of them; adjacent tests share a window and are dependent, but by the
union bound the probability of *any* false alarm in the run is at most ``alpha · (T/window − 1)``. To
hold a run-wide rate, set ``alpha = bonferroni_alpha(family_alpha, T, window)``.

Power: for a linear upward drift of s per step with noise σ, ``E[t] ≈ s·window^{3/2} / (σ√2)``; it fires
with good probability once that exceeds the critical value (≈ 3.2 for alpha = 1e-3, ν ≈ 100). Larger
windows see slower drifts; an exponential blow-up is caught within two windows of it dominating the
noise.

Assumptions and limits: losses within a window are treated as independent draws around a common mean;
serially correlated losses (the parameters move slowly) make the windows' variance estimates too small and
false alarms more frequent than alpha. A statistically significant increase can be practically tiny with
very large windows. Finite losses only: non-finite ones are the ``loss.is_finite()`` postcondition's
business and are refused here.

The monitor is pure: it returns a :class:`TrendVerdict` and keeps counting; what to do (warn, raise via
:meth:`TrendVerdict.to_violation`, lower the learning rate) is the Trainer's policy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from provetrain.errors import ContractViolation

__all__ = [
    "INVARIANT",
    "LossTrendMonitor",
    "TrendVerdict",
    "bonferroni_alpha",
    "student_t_sf",
    "welch_t_test",
]

INVARIANT = "Loss monotonically non-increasing (in expectation)"


@dataclass(frozen=True)
class TrendVerdict:
    """A rejection of the invariant: the latest window's mean loss is significantly above the previous one's.

    Attributes:
        step: the step whose loss completed the window.
        statistic: Welch's t (``inf`` when both windows are constant and the mean rose).
        df: Welch–Satterthwaite degrees of freedom.
        p_value: one-sided ``P(T_df >= statistic)``.
        alpha: the per-test false-alarm rate it was compared with.
        previous_mean, current_mean: the two windows' mean losses.
        previous_steps, current_steps: (first, last) step of each window.
        message: one line quoting the invariant and the numbers.
    """

    step: int
    statistic: float
    df: float
    p_value: float
    alpha: float
    previous_mean: float
    current_mean: float
    previous_steps: tuple[int, int]
    current_steps: tuple[int, int]
    message: str

    def to_violation(self) -> ContractViolation:
        """The same finding as a :class:`ContractViolation` of ``loss_decrease``'s invariant, to raise."""
        return ContractViolation(
            "loss_decrease",
            INVARIANT,
            kind="invariant",
            step=self.step,
            observed={
                "previous_mean": self.previous_mean,
                "current_mean": self.current_mean,
                "t": self.statistic,
                "p_value": self.p_value,
            },
            hint="The loss rose significantly between two windows; lower the learning rate (compare it with "
            "estimate_lr_max) or resume from the last checkpoint",
        )


class _Window:
    """Welford's running count, mean and sum of squared deviations of one window, with its step range."""

    __slots__ = ("first_step", "last_step", "m2", "mean", "n")

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.first_step, self.last_step = -1, -1

    def add(self, step: int, value: float) -> None:
        if self.n == 0:
            self.first_step = step
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)
        self.last_step = step

    @property
    def variance(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Window:
        window = cls()
        for name in cls.__slots__:
            setattr(window, name, data[name])
        return window


class LossTrendMonitor:
    """Tests ``Loss monotonically non-increasing (in expectation)`` on the per-step loss stream.

    Args:
        window: losses per window (>= 2; 50 is a good default, larger windows see slower drifts).
        alpha: per-test false-alarm rate, in (0, 1). See the module docstring for the run-wide rate.
        min_steps: losses at steps below this are ignored (a warm-up during which the loss may rise).

    State (``state_dict``): the completed previous window and the current one (count, mean, sum of squared
    deviations, first and last step), the last step seen, ``tests`` run and ``alarms`` raised.
    """

    def __init__(self, window: int = 50, alpha: float = 1e-3, *, min_steps: int = 0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}; 50 is a good default")
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
            raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}; 1e-3 is the default")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0, got {min_steps!r}")
        self.window = window
        self.alpha = float(alpha)
        self.min_steps = min_steps
        self._previous: _Window | None = None
        self._current = _Window()
        self._last_step = -1
        self.tests = 0
        self.alarms = 0

    def update(self, step: int, loss: float) -> TrendVerdict | None:
        """Record the loss of ``step``; return a verdict when a completed window rejects the invariant.

        Raises:
            ValueError: ``loss`` is NaN or infinite, or ``step`` does not increase.
            TypeError: ``loss`` is not a real number (pass ``loss.item()`` for a tensor).
        """
        value = self._check(step, loss)
        self._last_step = step
        if step < self.min_steps:
            return None
        self._current.add(step, value)
        if self._current.n < self.window:
            return None
        previous, current = self._previous, self._current
        self._previous, self._current = current, _Window()
        if previous is None:
            return None
        self.tests += 1
        t, df, p = welch_t_test(previous.mean, previous.variance, previous.n, current.mean, current.variance, current.n)
        if not p < self.alpha:
            return None
        self.alarms += 1
        return self._verdict(step, t, df, p, previous, current)

    def state_dict(self) -> dict[str, Any]:
        """Progress as JSON-able data (finite floats and ints), for a checkpoint's ``state``."""
        return {
            "window": self.window,
            "last_step": self._last_step,
            "previous": None if self._previous is None else self._previous.to_dict(),
            "current": self._current.to_dict(),
            "tests": self.tests,
            "alarms": self.alarms,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the window length must be the one this monitor was built with."""
        missing = sorted({"window", "last_step", "previous", "current", "tests", "alarms"} - set(state))
        if missing:
            raise ValueError(f"monitor state lacks {missing}; pass the dict state_dict() returned")
        if state["window"] != self.window:
            raise ValueError(
                f"monitor state was recorded with window={state['window']}, this monitor has window={self.window}; "
                "construct it with the same window to resume"
            )
        self._previous = None if state["previous"] is None else _Window.from_dict(state["previous"])
        self._current = _Window.from_dict(state["current"])
        self._last_step = state["last_step"]
        self.tests, self.alarms = state["tests"], state["alarms"]

    def _check(self, step: int, loss: float) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if step <= self._last_step:
            raise ValueError(
                f"step must increase: got {step} after {self._last_step}; call update once per step, in order"
            )
        if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise TypeError(f"loss must be a real number, got {type(loss).__name__}; pass loss.item() for a tensor")
        value = float(loss)
        if not math.isfinite(value):
            raise ValueError(
                f"loss at step {step} is {value}: the trend monitor tests finite losses only; non-finite losses are "
                "the `loss.is_finite()` postcondition, to be checked (and handled by policy) before the monitor"
            )
        return value

    def _verdict(self, step: int, t: float, df: float, p: float, previous: _Window, current: _Window) -> TrendVerdict:
        message = (
            f"invariant `{INVARIANT}` rejected at step {step}: mean loss {current.mean:.6g} over steps "
            f"{current.first_step}-{current.last_step} > {previous.mean:.6g} over steps "
            f"{previous.first_step}-{previous.last_step} (one-sided Welch t = {t:.3g}, df = {df:.1f}, "
            f"p = {p:.2g} < alpha = {self.alpha:g})"
        )
        return TrendVerdict(
            step=step,
            statistic=t,
            df=df,
            p_value=p,
            alpha=self.alpha,
            previous_mean=previous.mean,
            current_mean=current.mean,
            previous_steps=(previous.first_step, previous.last_step),
            current_steps=(current.first_step, current.last_step),
            message=message,
        )


def bonferroni_alpha(family_alpha: float, total_steps: int, window: int) -> float:
    """Per-test alpha so that a run of ``total_steps`` raises a false alarm with probability <= ``family_alpha``.

    ``family_alpha / max(1, total_steps // window - 1)``: one test per completed window after the first.
    """
    if not 0.0 < family_alpha < 1.0:
        raise ValueError(f"family_alpha must be in (0, 1), got {family_alpha!r}")
    if total_steps < 0 or window < 2:
        raise ValueError(f"need total_steps >= 0 and window >= 2, got {total_steps!r} and {window!r}")
    return family_alpha / max(1, total_steps // window - 1)


# --- the statistics ----------------------------------------------------------------------------------


def welch_t_test(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int) -> tuple[float, float, float]:
    """One-sided Welch test of ``mean2 > mean1``: ``(t, df, p)`` from sample means and variances (ddof=1).

    With both variances zero the test degenerates: ``(inf, n1 + n2 − 2, 0.0)`` if ``mean2 > mean1``,
    else ``(0.0 or -inf, n1 + n2 − 2, 1.0)``.
    """
    if n1 < 2 or n2 < 2:
        raise ValueError(f"each sample needs at least 2 values, got n1={n1}, n2={n2}")
    a, b = var1 / n1, var2 / n2
    diff = mean2 - mean1
    if a + b == 0.0:
        df = float(n1 + n2 - 2)
        return (math.inf, df, 0.0) if diff > 0 else (-math.inf if diff < 0 else 0.0, df, 1.0)
    t = diff / math.sqrt(a + b)
    df = (a + b) ** 2 / (a * a / (n1 - 1) + b * b / (n2 - 1))
    return t, df, student_t_sf(t, df)


def student_t_sf(t: float, df: float) -> float:
    """``P(T_df >= t)`` for Student's t with ``df > 0`` degrees of freedom (real df allowed).

    ``½ I_{df/(df+t²)}(df/2, ½)`` for t >= 0 and ``1 − P(T >= −t)`` below; relative accuracy ~1e-12.
    """
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if math.isnan(t):
        raise ValueError("t must not be NaN")
    if t < 0:
        return 1.0 - student_t_sf(-t, df)
    if math.isinf(t):
        return 0.0
    return 0.5 * _regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def _regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)`` by its continued fraction (Numerical Recipes §6.4), on the side where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Modified Lentz evaluation of the continued fraction for ``I_x(a, b)``."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < epsilon:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")
