"""Bindings of the training siblings of the seed contract (optimizer-v1, backward-pass-v1, checkpoint-v1,
batch-v1), by contract stem.

``SIBLING_BINDINGS[stem]`` maps a clause's ``(owner, kind, text)``, exactly as
:func:`~provetrain.contract.clauses.enumerate_clauses` derives it, to its
:class:`~provetrain.contract.bindings.Binding` (the code that enforces or checks it, and the tests that show
it does), or to :class:`NotApplicable` with the reason the clause has no meaning for provetrain (it is about
entrenar's Rust internals: its own autograd ops, flat buffer lengths, its Kani harnesses over them). A clause
absent from a table is a gap, and ``provetrain contract audit`` says so; none is bound to a check that does
not test it. ``tests/contract/siblings/test_sibling_bindings.py`` checks every key against its contract,
every site imports, every test exists, and that the tests marked ``@pytest.mark.contract(ID)`` are exactly
the evidence listed for that falsification id.

Gaps left on purpose (what provetrain does not do, said rather than papered over):

- optimizer-v1: ``beta1 > 0.0 && beta1 < 1.0`` and ``beta2 > 0.0 && beta2 < 1.0`` (provetrain's Adam, like
  torch's, accepts beta = 0); ``lr < 2.0 / l_smooth`` and ``loss_final <= loss_initial`` (hypothesis and
  conclusion of a convergence theorem: nothing enforces them at run time; the loss-trend monitor is
  statistical); ``momentum >= 0.0 && momentum < 1.0`` (provetrain's SGD, like torch's, accepts momentum >= 1).
- checkpoint-v1: ``checkpoint_memory`` (the O(sqrt N) segment bound; provetrain checkpoints the modules the
  user names, and keeps each one's input, O(N)) and "Checkpoint memory bounded"; FALSIFY-CKPT-005 (no
  best-loss checkpoint callback).
- batch-v1: gradient_scaling's
  ``gradients.iter().all(|g| g.is_finite())`` over *per-example* gradients, which autograd never
  materialises (the batch gradient is what the guard checks: bound under ``ret.iter()...``).
"""

from __future__ import annotations

from dataclasses import dataclass

from provetrain.contract.bindings import BINDINGS, Binding, BindingKey, Evidence, EvidenceKind

__all__ = ["SIBLING_BINDINGS", "NotApplicable"]


@dataclass(frozen=True)
class NotApplicable:
    """A clause that has no meaning for provetrain, and why (e.g. it is about entrenar's Rust internals)."""

    reason: str


def _tests(kind: EvidenceKind, *refs: str) -> tuple[Evidence, ...]:
    return tuple(Evidence(kind, ref) for ref in refs)


ADAM = "provetrain.ops.adam.Adam"
ADAMW = "provetrain.ops.adam.AdamW"
SGD = "provetrain.ops.sgd.SGD"
TRAINER = "provetrain.train.trainer.Trainer"
CKPT = "provetrain.train.checkpoint"
ACT = "provetrain.train.activation_checkpointing"
GRADCHECK = "provetrain.verify.gradient_check.check_gradients"
S = "tests/contract/siblings/"
T_OPT, T_BWD, T_CKPT, T_BATCH = (
    f"{S}test_{name}.py::" for name in ("optimizer", "backward_pass", "checkpoint", "batch")
)
T_SGD = f"{S}test_optimizer_sgd.py::"
T_ADAM = "tests/ops/test_adam.py::"
T_TRAINER = "tests/train/test_trainer.py::"

# --------------------------------------------------------------------------------------------- optimizer-v1

_GUARDED_STEP = Binding(  # the update is skipped (or raised) when it would make a parameter non-finite
    enforced_by=(f"{ADAM}.step", f"{TRAINER}._on_nonfinite"),
    evidence=_tests(
        "unit-test",
        f"{T_ADAM}test_skipped_step_leaves_no_trace",
        f"{T_ADAM}test_an_update_that_would_overflow_is_skipped_and_raised_by_name",
        f"{T_ADAM}test_float16_moments_stay_finite_under_the_largest_allowed_clip",
        f"{T_OPT}test_update_follows_the_equation_and_keeps_every_parameter",
    ),
)
_LR_POSITIVE = Binding(
    enforced_by=(f"{ADAM}.__init__", f"{TRAINER}._preflight_lr", f"{TRAINER}._check_lr"),
    evidence=_tests(
        "unit-test",
        f"{T_OPT}test_adamw_refuses_each_violated_precondition",
        f"{T_ADAM}test_bad_arguments_are_refused_with_a_fix",
        f"{T_TRAINER}test_bad_settings_name_the_key_and_write_nothing",
    ),
)
_DECOUPLED = Binding(
    enforced_by=(ADAMW, f"{ADAM}.step"),
    evidence=_tests(
        "unit-test",
        f"{T_OPT}test_weight_decay_reaches_the_parameters_not_the_moments",
        f"{T_OPT}test_update_follows_the_equation_and_keeps_every_parameter",
        f"{T_ADAM}test_adamw_keeps_decoupled_decay_when_loading_an_adam_state_dict",
    )
    + _tests("parity", f"{T_ADAM}test_trajectory_matches_torch"),
)
_CONVERGES = Binding(
    enforced_by=(f"{ADAM}.step", f"{SGD}.step"),
    evidence=_tests(
        "property-test",
        f"{T_OPT}test_adamw_reaches_the_minimiser_of_strongly_convex_quadratics",
        f"{T_OPT}test_falsify_opt_001_adamw_loss_decreases_over_100_steps_on_a_convex_quadratic",
        f"{T_SGD}test_sgd_below_two_over_l_reaches_the_minimiser_and_above_it_diverges",
        f"{T_SGD}test_falsify_opt_003_momentum_reaches_a_lower_loss_in_the_same_budget",
    ),
)
_SGD_STEP = Binding(
    enforced_by=(f"{SGD}.step",),
    evidence=_tests(
        "unit-test",
        f"{T_SGD}test_sgd_velocity_accumulates_the_gradient_history",
        f"{T_SGD}test_sgd_without_momentum_is_theta_minus_lr_grad",
    )
    + _tests("parity", "tests/ops/test_sgd.py::test_trajectory_matches_torch_bit_for_bit"),
)

OPTIMIZER: dict[BindingKey, Binding | NotApplicable] = {
    ("adamw_update", "precondition", "lr > 0.0"): _LR_POSITIVE,
    ("adamw_update", "precondition", "epsilon > 0.0"): Binding(
        enforced_by=(f"{ADAM}.__init__", "provetrain.train.config.TrainConfig"),
        evidence=_tests("unit-test", f"{T_OPT}test_adamw_refuses_each_violated_precondition"),
    ),
    ("adamw_update", "precondition", "weight_decay >= 0.0"): Binding(
        enforced_by=(f"{ADAM}.__init__", "provetrain.train.config.TrainConfig"),
        evidence=_tests("unit-test", f"{T_OPT}test_adamw_refuses_each_violated_precondition"),
    ),
    ("adamw_update", "precondition", "!params.is_empty()"): Binding(
        enforced_by=(f"{ADAM}.__init__", f"{TRAINER}._build_optimizer"),
        evidence=_tests(
            "unit-test",
            f"{T_OPT}test_adamw_refuses_empty_params",
            f"{T_TRAINER}test_model_without_trainable_parameters_is_refused",
        ),
    ),
    ("adamw_update", "postcondition", "params.iter().all(|p| p.is_finite())"): _GUARDED_STEP,
    ("adamw_update", "postcondition", "params.len() == params_before.len()"): Binding(
        enforced_by=(f"{ADAM}.step",),  # in place: the same tensors, as many, the same shapes
        evidence=_tests("unit-test", f"{T_OPT}test_update_follows_the_equation_and_keeps_every_parameter"),
    ),
    ("adamw_update", "invariant", "Weight decay applied to parameters directly, not through gradient"): _DECOUPLED,
    ("adamw_update", "invariant", "Bias-corrected moments: m_hat = m/(1-beta1^t), v_hat = v/(1-beta2^t)"): Binding(
        enforced_by=(f"{ADAM}.step",),
        evidence=_tests("unit-test", f"{T_OPT}test_update_follows_the_equation_and_keeps_every_parameter")
        + _tests("parity", f"{T_ADAM}test_trajectory_matches_torch"),
    ),
    ("sgd_momentum_update", "precondition", "lr > 0.0"): Binding(
        enforced_by=(f"{SGD}.__init__",),
        evidence=_tests("unit-test", f"{T_SGD}test_sgd_refuses_each_violated_precondition"),
    ),
    ("sgd_momentum_update", "precondition", "!params.is_empty()"): Binding(
        enforced_by=(f"{SGD}.__init__",),
        evidence=_tests("unit-test", f"{T_SGD}test_sgd_refuses_each_violated_precondition"),
    ),
    ("sgd_momentum_update", "precondition", "grad.len() == params.len()"): NotApplicable(
        "the lengths of entrenar's flat gradient and parameter buffers; here each gradient is its parameter's "
        ".grad, which torch's autograd shapes like the parameter"
    ),
    ("sgd_momentum_update", "postcondition", "params.iter().all(|p| p.is_finite())"): Binding(
        enforced_by=(f"{SGD}.step",),  # a non-finite loss or gradient skips the step: nothing changes
        evidence=_tests(
            "unit-test",
            f"{T_SGD}test_a_non_finite_gradient_leaves_every_parameter_and_velocity_as_it_was",
            "tests/ops/test_sgd.py::test_skipped_step_leaves_parameters_and_momentum_buffers_unchanged",
        ),
    ),
    ("sgd_momentum_update", "postcondition", "velocity.len() == params.len()"): Binding(
        enforced_by=(f"{SGD}.step",),  # one momentum buffer per parameter, shaped like it
        evidence=_tests("unit-test", f"{T_SGD}test_sgd_velocity_accumulates_the_gradient_history"),
    ),
    ("sgd_momentum_update", "invariant", "Velocity accumulates gradient history"): _SGD_STEP,
    ("sgd_momentum_update", "invariant", "Without momentum (mu=0), reduces to theta -= lr * grad"): _SGD_STEP,
    ("convergence", "precondition", "lr > 0.0"): _LR_POSITIVE,
    ("convergence", "precondition", "num_steps > 0"): Binding(
        enforced_by=("provetrain.train.config.TrainConfig",),
        evidence=_tests("unit-test", f"{T_OPT}test_a_run_has_at_least_one_step"),
    ),
    ("convergence", "postcondition", "loss_final.is_finite()"): Binding(
        enforced_by=(f"{ADAM}.step", f"{TRAINER}._certify_step", f"{TRAINER}._on_nonfinite"),
        evidence=_tests("property-test", f"{T_OPT}test_adamw_reaches_the_minimiser_of_strongly_convex_quadratics")
        + _tests(
            "falsification-test",
            "tests/train/test_falsify_train_002.py::test_falsify_train_002_loss_finite_for_100_steps",
        ),
    ),
    ("convergence", "invariant", "Optimizer makes progress on convex objectives"): _CONVERGES,
    ("proof_obligations", "obligation", "AdamW weight decay decoupled from gradient"): _DECOUPLED,
    ("proof_obligations", "obligation", "Learning rate positive"): Binding(
        enforced_by=_LR_POSITIVE.enforced_by,
        evidence=_LR_POSITIVE.evidence
        + _tests("property-test", f"{T_OPT}test_learning_rate_stays_positive_for_every_schedule_up_to_the_bound"),
    ),
    ("proof_obligations", "obligation", "Zero weight decay AdamW equals Adam"): Binding(
        enforced_by=(ADAMW, ADAM),
        evidence=_tests(
            "unit-test",
            f"{T_OPT}test_zero_weight_decay_adamw_equals_adam_bitwise",
            f"{T_OPT}test_falsify_opt_004_adamw_and_adam_trajectories_differ_with_weight_decay",
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-OPT-001"): Binding(
        evidence=_tests(
            "falsification-test",
            f"{T_OPT}test_falsify_opt_001_adamw_loss_decreases_over_100_steps_on_a_convex_quadratic",
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-OPT-002"): Binding(
        evidence=_tests("falsification-test", f"{T_OPT}test_falsify_opt_002_parameters_are_smaller_with_weight_decay"),
    ),
    ("falsification_tests", "falsification", "FALSIFY-OPT-003"): Binding(
        evidence=_tests(
            "falsification-test", f"{T_SGD}test_falsify_opt_003_momentum_reaches_a_lower_loss_in_the_same_budget"
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-OPT-004"): Binding(
        evidence=_tests(
            "falsification-test", f"{T_OPT}test_falsify_opt_004_adamw_and_adam_trajectories_differ_with_weight_decay"
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-OPT-005"): Binding(
        evidence=_tests("falsification-test", f"{T_OPT}test_falsify_opt_005_zero_grad_clears_every_gradient"),
    ),
    # A Kani harness (bounded model checking of entrenar's Rust); here its obligation is run exhaustively over
    # the same bound on the shipped schedule: a bounded exhaustive test, not a proof.
    ("kani_harnesses", "harness", "opt-kani-001"): Binding(
        evidence=_tests(
            "property-test", f"{T_OPT}test_learning_rate_stays_positive_for_every_schedule_up_to_the_bound"
        ),
    ),
}

# ----------------------------------------------------------------------------------------- backward-pass-v1

_TORCH_AUTOGRAD = (
    "about entrenar's own autograd engine (the buffers one Rust backward op receives and returns); provetrain "
    "has no backward ops of its own: torch's autograd computes every gradient and checks its shapes. What "
    "provetrain checks is the result: analytical vs numerical gradient and finiteness on the whole model"
)
_NA_AUTOGRAD = NotApplicable(_TORCH_AUTOGRAD)
_NUMERICAL = Binding(
    enforced_by=(GRADCHECK, "provetrain.verify.suite.gradient_check_results"),
    evidence=_tests(
        "property-test",
        f"{T_BWD}test_correct_backward_passes_with_errors_far_below_the_tolerance",
        f"{T_BWD}test_zero_gradients_are_compared_at_the_tensors_scale_not_relatively",
    )
    + _tests(
        "unit-test",
        f"{T_BWD}test_a_backward_off_by_one_percent_fails_and_names_the_coordinate",
        f"{T_BWD}test_verify_rows_report_each_tensor",
        f"{T_BWD}test_verify_cli_runs_the_gradient_check_on_a_factory_model",
        "provetrain verify",
    ),
)
_GRADIENTS_FINITE = Binding(
    enforced_by=(f"{ADAM}.step", f"{TRAINER}._on_nonfinite", GRADCHECK),
    evidence=_tests(
        "unit-test",
        f"{T_BWD}test_nonfinite_gradients_are_found_in_the_models_own_dtype",
        f"{T_ADAM}test_skipped_step_leaves_no_trace",
        f"{T_ADAM}test_raise_names_the_parameter_and_changes_nothing",
        f"{T_TRAINER}test_raise_on_exploding_gradient_names_the_parameter",
    ),
)
_SEED_CLIP = BINDINGS[("proof_obligations", "obligation", "Gradient norm bounded after clipping")]

BACKWARD_PASS: dict[BindingKey, Binding | NotApplicable] = {
    ("chain_rule", "precondition", "!grad_output.is_empty()"): _NA_AUTOGRAD,
    ("chain_rule", "precondition", "grad_output.len() == output.len()"): _NA_AUTOGRAD,
    ("chain_rule", "precondition", "grad_output.iter().all(|g| g.is_finite())"): _NA_AUTOGRAD,
    ("chain_rule", "postcondition", "ret.len() == input.len()"): _NA_AUTOGRAD,
    ("chain_rule", "postcondition", "ret.iter().all(|g| g.is_finite())"): _GRADIENTS_FINITE,
    ("chain_rule", "invariant", "Gradient flows backward through computation graph via chain rule"): _NUMERICAL,
    ("chain_rule", "invariant", "Gradient shape matches parameter shape"): _NA_AUTOGRAD,
    ("softmax_backward", "precondition", "!y.is_empty()"): _NA_AUTOGRAD,
    ("softmax_backward", "precondition", "y.iter().all(|v| *v >= 0.0 && v.is_finite())"): _NA_AUTOGRAD,
    ("softmax_backward", "precondition", "(y.iter().sum::<f32>() - 1.0).abs() < 1e-5"): _NA_AUTOGRAD,
    ("softmax_backward", "precondition", "grad_output.len() == y.len()"): _NA_AUTOGRAD,
    ("softmax_backward", "postcondition", "ret.len() == y.len()"): _NA_AUTOGRAD,
    ("softmax_backward", "postcondition", "ret.iter().all(|g| g.is_finite())"): _NA_AUTOGRAD,
    ("softmax_backward", "invariant", "Jacobian-vector product computed without materializing full Jacobian"): (
        _NA_AUTOGRAD
    ),
    ("matmul_backward", "precondition", "a.len() == m * k"): _NA_AUTOGRAD,
    ("matmul_backward", "precondition", "b.len() == k * n"): _NA_AUTOGRAD,
    ("matmul_backward", "precondition", "grad_output.len() == m * n"): _NA_AUTOGRAD,
    ("matmul_backward", "precondition", "k > 0"): _NA_AUTOGRAD,
    ("matmul_backward", "postcondition", "grad_a.len() == a.len()"): _NA_AUTOGRAD,
    ("matmul_backward", "postcondition", "grad_b.len() == b.len()"): _NA_AUTOGRAD,
    ("matmul_backward", "postcondition", "grad_a.iter().all(|g| g.is_finite())"): _NA_AUTOGRAD,
    ("matmul_backward", "postcondition", "grad_b.iter().all(|g| g.is_finite())"): _NA_AUTOGRAD,
    ("matmul_backward", "invariant", "Gradient dimensions consistent with forward operands"): _NA_AUTOGRAD,
    ("matmul_backward", "invariant", "Gradient accumulation is additive for shared parameters"): Binding(
        enforced_by=(GRADCHECK,),  # torch accumulates; the check on a user's model shows it for tied weights
        evidence=_tests("unit-test", f"{T_BWD}test_gradients_of_a_shared_parameter_add_up_and_pass_the_check"),
    ),
    ("proof_obligations", "obligation", "Analytical gradient matches numerical gradient"): _NUMERICAL,
    ("proof_obligations", "obligation", "Gradient finite"): _GRADIENTS_FINITE,
    ("proof_obligations", "obligation", "Gradient norm bounded after clipping"): Binding(
        enforced_by=_SEED_CLIP.enforced_by,
        evidence=_SEED_CLIP.evidence
        + _tests("property-test", f"{T_BWD}test_falsify_backward_003_gradient_norm_at_most_clip_value_after_clipping"),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BACKWARD-001"): Binding(
        evidence=_tests(
            "falsification-test", f"{T_BWD}test_falsify_backward_001_softmax_gradient_matches_finite_differences"
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BACKWARD-002"): Binding(
        evidence=_tests(
            "falsification-test", f"{T_BWD}test_falsify_backward_002_matmul_gradients_are_the_transposed_products"
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BACKWARD-003"): Binding(
        evidence=_tests(
            "falsification-test",
            f"{T_BWD}test_falsify_backward_003_gradient_norm_at_most_clip_value_after_clipping",
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BACKWARD-004"): Binding(
        evidence=_tests(
            "falsification-test",
            f"{T_BWD}test_falsify_backward_004_gradient_flows_to_a_only_when_only_a_requires_grad",
        ),
    ),
    ("kani_harnesses", "harness", "backward-kani-001"): NotApplicable(
        "a Kani harness over entrenar's Rust backward ops (gradient dimensions match parameter dimensions); "
        "provetrain has no backward ops of its own, and torch's autograd checks each gradient's shape"
    ),
}

# ------------------------------------------------------------------------------------------- checkpoint-v1

_ROUND_TRIP = Binding(
    enforced_by=(
        f"{CKPT}.save_checkpoint",
        f"{CKPT}.load_checkpoint",
        f"{TRAINER}._write_checkpoint",
        f"{TRAINER}._resume",
    ),
    evidence=_tests(
        "unit-test",
        f"{T_CKPT}test_the_trainers_checkpoint_restores_weights_optimizer_state_and_counters_bitwise",
        "tests/train/test_checkpoint.py::test_model_adam_and_schedulers_round_trip_bit_for_bit",
        f"{T_TRAINER}test_resume_reproduces_the_uninterrupted_run_exactly",
    )
    + _tests("property-test", f"{T_CKPT}test_round_trip_is_bitwise_for_every_small_state"),
)
_MOMENTS = Binding(
    enforced_by=(*_ROUND_TRIP.enforced_by, f"{ADAM}.state_dict", f"{ADAM}.load_state_dict"),
    evidence=_tests(
        "unit-test",
        f"{T_CKPT}test_the_trainers_checkpoint_restores_weights_optimizer_state_and_counters_bitwise",
        f"{T_CKPT}test_falsify_ckpt_004_adamw_step_count_and_moments_round_trip",
        f"{T_ADAM}test_state_dict_round_trip_continues_identically",
    ),
)
_PRESERVES = Binding(
    enforced_by=(f"{ACT}.apply_activation_checkpointing", f"{TRAINER}.__init__"),
    evidence=_tests(
        "unit-test",
        f"{T_CKPT}test_falsify_ckpt_001_checkpointed_forward_and_backward_equal_the_plain_ones_bitwise",
        f"{T_CKPT}test_recomputation_writes_buffers_once_and_the_test_sees_it_when_it_does_not",
        f"{T_CKPT}test_the_trainer_option_trains_bit_for_bit_like_without_it",
    ),
)
_RECOMPUTES = Binding(
    enforced_by=(f"{ACT}.apply_activation_checkpointing",),
    evidence=_tests(
        "unit-test",
        f"{T_CKPT}test_falsify_ckpt_003_saved_activation_memory_is_tracked_and_reduced",
        f"{T_CKPT}test_falsify_ckpt_001_checkpointed_forward_and_backward_equal_the_plain_ones_bitwise",
    ),
)

CHECKPOINT: dict[BindingKey, Binding | NotApplicable] = {
    # A "segment" here is a module the user names: its input is the boundary kept, its inside recomputed.
    ("checkpoint_memory", "invariant", "Only segment boundary activations stored during forward"): _RECOMPUTES,
    ("checkpoint_memory", "invariant", "Intermediate activations recomputed during backward"): _RECOMPUTES,
    ("save_restore_identity", "precondition", "!model_state.weights.is_empty()"): Binding(
        enforced_by=(f"{TRAINER}._build_optimizer",),  # no trainable weights, no run, no checkpoint
        evidence=_tests("unit-test", f"{T_TRAINER}test_model_without_trainable_parameters_is_refused"),
    ),
    ("save_restore_identity", "precondition", "model_state.weights.iter().all(|w| w.is_finite())"): Binding(
        enforced_by=(f"{CKPT}.save_checkpoint", f"{CKPT}.load_checkpoint"),
        evidence=_tests(
            "unit-test",
            "tests/train/test_checkpoint.py::test_non_finite_state_is_refused_and_nothing_is_written",
            "tests/train/test_checkpoint.py::test_non_finite_values_with_a_consistent_manifest_are_refused_on_load",
        ),
    ),
    ("save_restore_identity", "postcondition", "restored.weights == model_state.weights"): _ROUND_TRIP,
    ("save_restore_identity", "postcondition", "restored.epoch == model_state.epoch"): Binding(
        enforced_by=(f"{TRAINER}._write_checkpoint", f"{TRAINER}._resume", f"{TRAINER}._check_resume_state"),
        evidence=_tests(
            "unit-test",
            f"{T_CKPT}test_the_trainers_checkpoint_restores_weights_optimizer_state_and_counters_bitwise",
            f"{T_TRAINER}test_resume_reproduces_the_uninterrupted_run_exactly",
            f"{T_TRAINER}test_resume_after_a_skip_restores_the_counters_and_fresh_diagnostics",
        ),
    ),
    ("save_restore_identity", "postcondition", "restored.optimizer_state == model_state.optimizer_state"): _MOMENTS,
    ("save_restore_identity", "invariant", "Serialization is lossless for all state components"): _ROUND_TRIP,
    ("save_restore_identity", "invariant", "Optimizer moments (m, v) and step counter preserved"): _MOMENTS,
    ("proof_obligations", "obligation", "Checkpoint round-trip identity"): _ROUND_TRIP,
    ("proof_obligations", "obligation", "Checkpoint preserves computation"): _PRESERVES,
    ("falsification_tests", "falsification", "FALSIFY-CKPT-001"): Binding(
        evidence=_tests(
            "falsification-test",
            f"{T_CKPT}test_falsify_ckpt_001_checkpointed_forward_and_backward_equal_the_plain_ones_bitwise",
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-CKPT-002"): Binding(
        evidence=_tests("falsification-test", f"{T_CKPT}test_falsify_ckpt_002_the_wrapper_returns_the_correct_tensor"),
    ),
    ("falsification_tests", "falsification", "FALSIFY-CKPT-003"): Binding(
        evidence=_tests(
            "falsification-test", f"{T_CKPT}test_falsify_ckpt_003_saved_activation_memory_is_tracked_and_reduced"
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-CKPT-004"): Binding(
        evidence=_tests("falsification-test", f"{T_CKPT}test_falsify_ckpt_004_adamw_step_count_and_moments_round_trip"),
    ),
    # Kani harness over entrenar's Rust; here its obligation as a Hypothesis test at the same bound (sampled).
    ("kani_harnesses", "harness", "ckpt-kani-001"): Binding(
        evidence=_tests("property-test", f"{T_CKPT}test_round_trip_is_bitwise_for_every_small_state"),
    ),
}

# ------------------------------------------------------------------------------------------------ batch-v1

MAP_BATCHES = "provetrain.data.batches.MapBatches"
_PARTITION = Binding(
    enforced_by=(f"{MAP_BATCHES}.__init__", f"{MAP_BATCHES}.next_batch", f"{TRAINER}.__init__"),
    evidence=_tests(
        "unit-test",
        f"{T_BATCH}test_each_epoch_is_ceil_n_over_b_batches_covering_every_example_once",
        f"{T_BATCH}test_falsify_batch_001_a_batch_of_3_inputs_has_size_3",
    )
    + _tests("property-test", f"{T_BATCH}test_batch_counts_for_every_size_up_to_the_bound"),
)
_BATCH_SIZE_POSITIVE = Binding(
    enforced_by=("provetrain.train.config.TrainConfig",),
    evidence=_tests("unit-test", f"{T_BATCH}test_falsify_batch_003_batch_size_is_read_from_the_yaml_config"),
)
_PAIRED = Binding(
    enforced_by=(f"{MAP_BATCHES}.examples_at",),  # the same indices into inputs and targets
    evidence=_tests(
        "unit-test",
        f"{T_BATCH}test_inputs_stay_paired_with_their_targets",
        f"{T_BATCH}test_falsify_batch_002_batches_have_the_right_tensor_shapes",
    ),
)

BATCH: dict[BindingKey, Binding | NotApplicable] = {
    ("batch_partition", "precondition", "n > 0"): Binding(
        enforced_by=(f"{MAP_BATCHES}.__init__", f"{TRAINER}._batch_source"),
        evidence=_tests("unit-test", f"{T_BATCH}test_an_empty_training_set_is_refused"),
    ),
    ("batch_partition", "precondition", "batch_size > 0"): _BATCH_SIZE_POSITIVE,
    ("batch_partition", "postcondition", "ret >= 1"): _PARTITION,
    ("batch_partition", "postcondition", "ret == (n + batch_size - 1) / batch_size"): _PARTITION,
    ("batch_partition", "invariant", "All samples appear exactly once per epoch"): _PARTITION,
    ("batch_partition", "invariant", "Last batch may be smaller than batch_size"): _PARTITION,
    ("gradient_scaling", "precondition", "batch_size > 0"): _BATCH_SIZE_POSITIVE,
    # per-example gradients: non-empty exactly when the batch holds an example, which every batch does; and
    # the Trainer checks each step's backward produced a gradient at all (the seed's same-text clause)
    ("gradient_scaling", "precondition", "!gradients.is_empty()"): Binding(
        enforced_by=(*_PARTITION.enforced_by, f"{TRAINER}._check_gradients_present"),
        evidence=_PARTITION.evidence + BINDINGS[("gradient_norm", "precondition", "!gradients.is_empty()")].evidence,
    ),
    ("gradient_scaling", "postcondition", "ret.len() == gradients[0].len()"): NotApplicable(
        "the length of entrenar's flat gradient buffer; here the batch gradient is each parameter's .grad, "
        "which torch's autograd shapes like the parameter"
    ),
    ("gradient_scaling", "postcondition", "ret.iter().all(|g| g.is_finite())"): _GRADIENTS_FINITE,
    ("gradient_scaling", "invariant", "Mean gradient independent of batch size for same data"): Binding(
        enforced_by=("provetrain.train.model_output.default_loss", f"{TRAINER}._train_step"),
        evidence=_tests("unit-test", f"{T_BATCH}test_the_batch_gradient_is_the_mean_of_per_example_gradients"),
    ),
    ("proof_obligations", "obligation", "Batch size matches input-target pairing"): _PAIRED,
    ("proof_obligations", "obligation", "Batch size positive"): _PARTITION,
    ("proof_obligations", "obligation", "Input-target alignment preserved"): _PAIRED,
    ("falsification_tests", "falsification", "FALSIFY-BATCH-001"): Binding(
        evidence=_tests("falsification-test", f"{T_BATCH}test_falsify_batch_001_a_batch_of_3_inputs_has_size_3"),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BATCH-002"): Binding(
        evidence=_tests("falsification-test", f"{T_BATCH}test_falsify_batch_002_batches_have_the_right_tensor_shapes"),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BATCH-003"): Binding(
        evidence=_tests(
            "falsification-test", f"{T_BATCH}test_falsify_batch_003_batch_size_is_read_from_the_yaml_config"
        ),
    ),
    ("falsification_tests", "falsification", "FALSIFY-BATCH-004"): Binding(
        evidence=_tests("falsification-test", f"{T_BATCH}test_falsify_batch_004_default_batch_size_without_a_setting"),
    ),
    # Kani harness over entrenar's Rust; here run exhaustively over the same bound on the Trainer's batching.
    ("kani_harnesses", "harness", "batch-kani-001"): Binding(
        evidence=_tests("property-test", f"{T_BATCH}test_batch_counts_for_every_size_up_to_the_bound"),
    ),
}

SIBLING_BINDINGS: dict[str, dict[BindingKey, Binding | NotApplicable]] = {
    "optimizer-v1": OPTIMIZER,
    "backward-pass-v1": BACKWARD_PASS,
    "checkpoint-v1": CHECKPOINT,
    "batch-v1": BATCH,
}
