"""Which code enforces each clause of training-loop-v1, and which evidence shows it does.

Plain data, keyed by ``(owner, kind, text)`` exactly as the contract writes the clause. Enforcement sites are
dotted paths; evidence names pytest node ids (``tests/...::test_...``) or ``provetrain`` commands.
``tests/contract/test_bindings.py`` checks every site imports, every test exists, and that the tests marked
``@pytest.mark.contract(ID)`` are exactly the evidence listed for that falsification id. A clause absent
from this table is unbound, and ``provetrain contract audit`` says so.

A theorem the contract cites (an equation's ``lean_theorem``) is not a clause: :data:`THEOREMS` binds the
citation to what provetrain really shows for it, by which method and under which assumptions, and what the
citation might suggest but is not shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from provetrain.verify.cross_entropy import AXIOMS as CROSS_ENTROPY_AXIOMS

__all__ = [
    "BINDINGS",
    "CARRIED_TEXTS",
    "SEED",
    "THEOREMS",
    "Binding",
    "BindingKey",
    "Evidence",
    "EvidenceKind",
    "TheoremBinding",
    "TheoremKey",
]

SEED = "training-loop-v1"

EvidenceKind = Literal["unit-test", "property-test", "smt-proof", "parity", "falsification-test"]
BindingKey = tuple[str, str, str]
TheoremKey = tuple[str, str]  # (equation, the cited theorem exactly as the contract writes it)


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


@dataclass(frozen=True)
class TheoremBinding:
    """What is really shown for a theorem the contract cites.

    Attributes:
        shows: the statement provetrain proves or checks, in plain words.
        method: how: the prover and what it is not (a z3 proof is not the cited Lean proof).
        axioms: everything the proof assumes that it does not prove.
        not_shown: what the citation, or the clause it is attached to, might suggest but is not shown.
        evidence: the proofs and tests that show it.
    """

    shows: str
    method: str
    axioms: tuple[str, ...]
    not_shown: str
    evidence: tuple[Evidence, ...]


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
        "tests/verify/test_prove.py::test_harness_proves_the_bound_for_every_path_and_dtype_up_to_the_contract_bound",
    )
    + _tests("unit-test", "tests/verify/test_mutations.py::test_each_mutant_is_caught")
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
    # The contract does not define lr_max: the bound checked is the user's declared number (none declared:
    # unchecked). lr_max: auto's estimate is reported, not enforced; its tests are evidence for the estimate.
    ("loss_decrease", "precondition", "lr < lr_max"): Binding(
        enforced_by=(f"{TRAINER}._check_lr", f"{TRAINER}._preflight_lr"),
        evidence=_tests(
            "unit-test",
            f"{T_TRAINER}test_lr_above_lr_max_is_refused_before_training",
            f"{T_TRAINER}test_a_declared_lr_max_is_checked_before_training_and_at_every_step",
            f"{T_TRAINER}test_an_lr_above_the_estimate_that_trains_is_not_refused",
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
            "tests/verify/test_prove.py::test_harness_proves_the_bound_for_every_path_and_dtype_up_to_the_contract_bound",
            "provetrain prove",
        ),
    ),
}

# Clause texts whose binding in BINDINGS carries to the same (kind, text) in any other contract: their
# variables name the run's own settings or parameters (the optimizer's lr, the declared lr_max, the model's
# trainable parameters, the clip threshold), which one code path checks before training and at every step,
# whichever equation quotes them. Clauses over per-step values (`gradients`, `loss`, `grad_norm`) are not
# here: which gradients an equation means differs (batch-v1's gradient_scaling means per-example gradients,
# which autograd never materialises), so they bind in another contract only by that contract's own entry.
CARRIED_TEXTS: frozenset[tuple[str, str]] = frozenset(
    {
        ("precondition", "lr > 0.0"),
        ("precondition", "lr < lr_max"),
        ("precondition", "!params.is_empty()"),
        ("precondition", "clip_value > 0.0"),
    }
)

T_CE = "tests/verify/test_cross_entropy.py::"

THEOREMS: dict[TheoremKey, TheoremBinding] = {
    ("loss_decrease", "ProvableContracts.Theorems.CrossEntropy.NonNegativity"): TheoremBinding(
        shows=(
            "cross-entropy log(sum_j exp z_j) - z_y >= 0 over the reals for 1..8 classes; and at run time, the "
            "loss training reads (float32 cross-entropy, per example and batch mean) is never NaN and never "
            "negative for finite logits, and finite when batch * (logit spread + log classes) < 3.4e38"
        ),
        method="z3 proof under stated axioms of exp and log (not the cited Lean proof, which is not checked)",
        axioms=CROSS_ENTROPY_AXIOMS,
        not_shown=(
            "that the loss decreases (loss_decrease's formula): non-negativity only bounds it below; the decrease "
            "invariant is evidenced statistically by the loss-trend monitor"
        ),
        evidence=_tests(
            "smt-proof",
            f"{T_CE}test_nonnegativity_is_proved_under_the_stated_axioms",
            f"{T_CE}test_the_axioms_do_not_prove_a_false_claim",
            "provetrain verify",
        )
        + _tests(
            "property-test",
            f"{T_CE}test_float32_loss_is_never_nan_or_negative_for_finite_logits",
            f"{T_CE}test_float32_loss_is_finite_for_logits_within_range",
            "tests/train/test_properties.py::test_cross_entropy_is_never_negative",
        )
        + _tests(
            "unit-test",
            f"{T_CE}test_the_loss_overflows_to_inf_beyond_range_and_is_caught",
            f"{T_CE}test_autocast_computes_the_loss_in_float32",
        ),
    ),
}
