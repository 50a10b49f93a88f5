"""Which code enforces each clause of training-loop-v1, and which evidence shows it does.

Plain data, keyed by ``(owner, kind, text)`` exactly as the contract writes the clause. Enforcement sites are
dotted paths; evidence names pytest node ids (``tests/...::test_...``) or ``provetrain`` commands.
``tests/contract/test_bindings.py`` checks every site imports, every test exists, and that the tests marked
``@pytest.mark.contract(ID)`` are exactly the evidence listed for that falsification id. A clause absent
from this table is unbound, and ``provetrain contract audit`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BINDINGS", "Binding", "BindingKey", "Evidence", "EvidenceKind"]

EvidenceKind = Literal["unit-test", "property-test", "smt-proof", "parity", "falsification-test"]
BindingKey = tuple[str, str, str]


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence: ``ref`` is a pytest node id or a ``provetrain`` command."""

    kind: EvidenceKind
    ref: str


@dataclass(frozen=True)
class Binding:
    """How one clause is kept: the code that enforces it and the evidence that it does."""

    enforced_by: tuple[str, ...] = ()
    evidence: tuple[Evidence, ...] = ()


def _tests(kind: EvidenceKind, *refs: str) -> tuple[Evidence, ...]:
    return tuple(Evidence(kind, ref) for ref in refs)


TRAINER = "provetrain.train.trainer.Trainer"
ADAM = "provetrain.ops.adam.Adam"
CLIP = "provetrain.ops.clip"
T_TRAINER = "tests/train/test_trainer.py::"
T_CLIP = "tests/ops/test_clip.py::"
T_ADAM = "tests/ops/test_adam.py::"

_LOSS_FINITE = Binding(
    enforced_by=(f"{ADAM}.step", f"{TRAINER}._certify_step", f"{TRAINER}._on_nonfinite"),
    evidence=_tests(
        "unit-test",
        f"{T_TRAINER}test_skip_drops_the_batch_and_changes_nothing",
        f"{T_TRAINER}test_raise_names_the_exact_first_bad_step_and_leaves_weights_untouched",
        f"{T_TRAINER}test_rollback_restores_the_last_good_state_and_lowers_lr",
        f"{T_TRAINER}test_consecutive_skip_budget_escalates",
        f"{T_ADAM}test_skipped_step_leaves_no_trace",
        f"{T_ADAM}test_raise_on_nonfinite_loss_quotes_the_loss_clause",
        "tests/train/test_checkpoint.py::test_non_finite_state_is_refused_and_nothing_is_written",
    )
    + _tests(
        "falsification-test", "tests/train/test_falsify_train_002.py::test_falsify_train_002_loss_finite_for_100_steps"
    ),
)

_NORM_BOUND = Binding(
    enforced_by=(f"{CLIP}.clip_coefficient", f"{CLIP}.scale_gradient", f"{ADAM}.step", f"{TRAINER}._certify_step"),
    evidence=_tests(
        "smt-proof",
        "tests/verify/test_prove.py::test_harness_proves_the_bound_for_every_length_up_to_the_contract_bound",
    )
    + _tests(
        "property-test",
        f"{T_CLIP}test_bound_holds_for_every_finite_input",
        f"{T_CLIP}test_not_over_clipped",
        f"{T_CLIP}test_direction_is_kept",
    )
    + _tests(
        "unit-test",
        f"{T_CLIP}test_bound_holds_at_the_extremes",
        f"{T_CLIP}test_exact_boundary",
        f"{T_CLIP}test_sweep_of_thresholds_on_long_gradients",
        f"{T_CLIP}test_torch_violates_the_bound_where_provetrain_does_not",
        f"{T_ADAM}test_clipped_norm_is_bounded_and_unclipped_norm_is_reported",
        f"{T_ADAM}test_clipped_step_is_clip_then_unclipped_step_bitwise",
    )
    + _tests("falsification-test", f"{T_CLIP}test_inject_large_gradients_verify_clipped"),
)

_GRADS_FINITE_BEFORE = Binding(
    enforced_by=(f"{CLIP}.clip_grad_norm_", f"{ADAM}.step", f"{TRAINER}._on_nonfinite"),
    evidence=_tests(
        "unit-test",
        f"{T_CLIP}test_precondition_violations",
        f"{T_CLIP}test_names_keyword_names_the_offender",
        f"{T_ADAM}test_skipped_step_leaves_no_trace",
        f"{T_ADAM}test_raise_names_the_parameter_and_changes_nothing",
        f"{T_TRAINER}test_raise_on_exploding_gradient_names_the_parameter",
    ),
)

_GRADS_FINITE_AFTER = Binding(
    enforced_by=(f"{CLIP}.clip_coefficient", f"{CLIP}.scale_gradient", f"{TRAINER}._certify_step"),
    evidence=_tests(
        "property-test", f"{T_CLIP}test_bound_holds_for_every_finite_input", f"{T_CLIP}test_direction_is_kept"
    )
    + _tests(
        "unit-test",
        f"{T_CLIP}test_overflowing_float32_norm_keeps_direction",
        f"{T_CLIP}test_float64_norm_beyond_float64_range_is_inf_but_clips_correctly",
        f"{T_CLIP}test_bound_holds_at_the_extremes",
    ),
)

_LOSS_TREND = Binding(
    enforced_by=("provetrain.train.monitor.LossTrendMonitor.update", f"{TRAINER}._on_trend"),
    evidence=_tests(
        "property-test",
        "tests/train/test_monitor.py::test_false_alarm_rate_on_a_plateau_is_alpha",
        "tests/train/test_monitor.py::test_fires_within_a_few_windows_of_divergence",
    )
    + _tests(
        "unit-test",
        f"{T_TRAINER}test_loss_trend_monitor_acts_by_policy",
        f"{T_TRAINER}test_loss_trend_monitor_is_silent_on_a_healthy_run",
    ),
)

BINDINGS: dict[BindingKey, Binding] = {
    # ---------------------------------------------------------------- loss_decrease
    ("loss_decrease", "precondition", "lr > 0.0"): Binding(
        enforced_by=(f"{TRAINER}._check_lr", f"{TRAINER}._preflight_lr", f"{ADAM}.__init__"),
        evidence=_tests(
            "unit-test",
            f"{T_TRAINER}test_bad_settings_name_the_key_and_write_nothing",
            f"{T_TRAINER}test_healthy_run_checks_every_clause_each_step",
            f"{T_ADAM}test_bad_arguments_are_refused_with_a_fix",
        ),
    ),
    ("loss_decrease", "precondition", "lr < lr_max"): Binding(
        enforced_by=(f"{TRAINER}._check_lr", f"{TRAINER}._preflight_lr", "provetrain.train.lr_max.estimate_lr_max"),
        evidence=_tests(
            "unit-test",
            f"{T_TRAINER}test_lr_above_lr_max_is_refused_before_training",
            f"{T_TRAINER}test_lr_max_auto_is_estimated_and_enforced",
            "tests/train/test_lr_max.py::test_top_eigenvalue_is_exact_on_quadratics",
            "tests/train/test_lr_max.py::test_sgd_at_the_measured_lr_max",
            "tests/train/test_lr_max.py::test_frozen_preconditioner_adam_at_the_measured_lr_max",
        ),
    ),
    ("loss_decrease", "precondition", "!params.is_empty()"): Binding(
        enforced_by=(f"{TRAINER}._build_optimizer", f"{ADAM}.__init__"),
        evidence=_tests(
            "unit-test",
            f"{T_TRAINER}test_model_without_trainable_parameters_is_refused",
            f"{T_ADAM}test_bad_arguments_are_refused_with_a_fix",
        ),
    ),
    ("loss_decrease", "postcondition", "loss.is_finite()"): _LOSS_FINITE,
    ("loss_decrease", "postcondition", "!loss.is_nan()"): _LOSS_FINITE,
    ("loss_decrease", "invariant", "Loss monotonically non-increasing (in expectation)"): _LOSS_TREND,
    # ---------------------------------------------------------------- gradient_norm
    ("gradient_norm", "precondition", "clip_value > 0.0"): Binding(
        enforced_by=(f"{CLIP}.clip_grad_norm_", f"{ADAM}.__init__", "provetrain.train.config.TrainConfig"),
        evidence=_tests(
            "unit-test",
            f"{T_CLIP}test_precondition_violations",
            f"{T_CLIP}test_bad_arguments",
            f"{T_ADAM}test_bad_arguments_are_refused_with_a_fix",
        ),
    ),
    ("gradient_norm", "precondition", "!gradients.is_empty()"): Binding(
        enforced_by=(f"{CLIP}.clip_grad_norm_", f"{ADAM}.step", f"{TRAINER}._check_gradients_present"),
        evidence=_tests(
            "unit-test",
            f"{T_CLIP}test_precondition_violations",
            f"{T_ADAM}test_step_without_gradients_is_a_contract_violation",
        ),
    ),
    ("gradient_norm", "precondition", "gradients.iter().all(|g| g.is_finite())"): _GRADS_FINITE_BEFORE,
    ("gradient_norm", "postcondition", "grad_norm <= clip_value"): _NORM_BOUND,
    ("gradient_norm", "postcondition", "gradients.iter().all(|g| g.is_finite())"): _GRADS_FINITE_AFTER,
    ("gradient_norm", "invariant", "Gradient norm bounded by clip_value"): _NORM_BOUND,
    # ---------------------------------------------------------------- proof obligations
    ("proof_obligations", "obligation", "Gradient norm bounded after clipping"): _NORM_BOUND,
    ("proof_obligations", "obligation", "Loss finite"): _LOSS_FINITE,
    ("proof_obligations", "obligation", "CUDA forward matches CPU"): Binding(
        enforced_by=("provetrain.verify.parity.forward_parity",),
        evidence=_tests(
            "parity",
            "tests/verify/test_parity.py::test_falsify_train_003_cuda_forward_matches_cpu",
            "tests/verify/test_parity.py::test_float32_cpu_matches_float64_reference_without_cuda",
            "tests/verify/test_parity.py::test_mismatch_above_tolerance_fails",
            "provetrain parity",
        ),
    ),
    # ---------------------------------------------------------------- falsification tests
    ("falsification_tests", "falsification", "FALSIFY-TRAIN-001"): Binding(
        evidence=_tests("falsification-test", f"{T_CLIP}test_inject_large_gradients_verify_clipped"),
    ),
    ("falsification_tests", "falsification", "FALSIFY-TRAIN-002"): Binding(
        evidence=_tests(
            "falsification-test",
            "tests/train/test_falsify_train_002.py::test_falsify_train_002_loss_finite_for_100_steps",
        ),
    ),
    # Runs only where CUDA exists (skipped with that reason elsewhere); `provetrain parity` reports which ran.
    ("falsification_tests", "falsification", "FALSIFY-TRAIN-003"): Binding(
        evidence=_tests(
            "falsification-test", "tests/verify/test_parity.py::test_falsify_train_003_cuda_forward_matches_cpu"
        ),
    ),
    ("kani_harnesses", "harness", "train-kani-001"): Binding(
        evidence=_tests(
            "smt-proof",
            "tests/verify/test_prove.py::test_harness_proves_the_bound_for_every_length_up_to_the_contract_bound",
            "provetrain prove",
        ),
    ),
}
