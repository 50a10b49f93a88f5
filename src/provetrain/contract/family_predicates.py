"""Predicates for the pre- and postconditions of the seed's training siblings (optimizer-v1, batch-v1,
checkpoint-v1, backward-pass-v1), registered by exact text like the seed's (:mod:`provetrain.contract.predicates`).

A predicate gives a clause its executable meaning; it does not bind it: a clause is bound only when its
contract's table names the code that evaluates it and the evidence that it holds (a clause with a predicate and
no such entry is still a gap).

The clauses are Rust over flat vectors: ``x.len()`` is a vector's length, here the element count of a tensor
or the total of a sequence of tensors (``params``), ``x.iter().all(|v| v.is_finite())`` holds for every
element. Integer ``/`` is Rust's (truncating) division. Comparisons with NaN are false, as in Rust.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from provetrain.contract.predicates import _binds

__all__: list[str] = []

Vector = torch.Tensor | Iterable[torch.Tensor]


def _tensors(value: Vector | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return list(value.values())
    return list(value)


def _len(value: Vector | Mapping[str, torch.Tensor]) -> int:
    """Rust's ``len()`` of the flat vector: the number of elements."""
    return sum(t.numel() for t in _tensors(value))


def _all_finite(value: Vector | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every element finite, as a 0-d bool tensor (no host read); true for an empty vector, as Rust's ``all``."""
    flags = [torch.isfinite(t).all() for t in _tensors(value)]
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def _equal(left: Any, right: Any) -> bool:
    """Exact equality of nested state (tensors element for element, with dtype and shape)."""
    if isinstance(left, torch.Tensor) or isinstance(right, torch.Tensor):
        return (
            isinstance(left, torch.Tensor)
            and isinstance(right, torch.Tensor)
            and left.dtype == right.dtype
            and torch.equal(left, right)
        )
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_equal(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(_equal(a, b) for a, b in zip(left, right, strict=True))
    return bool(left == right)


# ---------------------------------------------------------------------------------------------- optimizer-v1
@_binds("beta1 > 0.0 && beta1 < 1.0")
def beta1_in_open_unit_interval(beta1: float) -> bool:
    return 0.0 < beta1 < 1.0


@_binds("beta2 > 0.0 && beta2 < 1.0")
def beta2_in_open_unit_interval(beta2: float) -> bool:
    return 0.0 < beta2 < 1.0


@_binds("epsilon > 0.0")
def epsilon_is_positive(epsilon: float) -> bool:
    return epsilon > 0.0


@_binds("weight_decay >= 0.0")
def weight_decay_is_not_negative(weight_decay: float) -> bool:
    return weight_decay >= 0.0


@_binds("momentum >= 0.0 && momentum < 1.0")
def momentum_in_unit_interval(momentum: float) -> bool:
    return 0.0 <= momentum < 1.0


@_binds("params.iter().all(|p| p.is_finite())")
def params_are_finite(params: Vector) -> torch.Tensor:
    return _all_finite(params)


@_binds("params.len() == params_before.len()")
def params_keep_their_length(params: Vector, params_before: Vector) -> bool:
    return _len(params) == _len(params_before)


@_binds("grad.len() == params.len()")
def grad_has_the_length_of_params(grad: Vector, params: Vector) -> bool:
    return _len(grad) == _len(params)


@_binds("velocity.len() == params.len()")
def velocity_has_the_length_of_params(velocity: Vector, params: Vector) -> bool:
    return _len(velocity) == _len(params)


@_binds("lr < 2.0 / l_smooth")
def lr_is_below_two_over_smoothness(lr: float, l_smooth: float) -> bool:
    """``lr < 2.0 / l_smooth`` for a smoothness constant ``l_smooth > 0`` (false otherwise)."""
    return l_smooth > 0.0 and lr < 2.0 / l_smooth


@_binds("num_steps > 0")
def num_steps_is_positive(num_steps: int) -> bool:
    return num_steps > 0


@_binds("loss_final.is_finite()")
def final_loss_is_finite(loss_final: float | torch.Tensor) -> bool | torch.Tensor:
    return torch.isfinite(loss_final).all() if isinstance(loss_final, torch.Tensor) else math.isfinite(loss_final)


@_binds("loss_final <= loss_initial")
def final_loss_is_at_most_initial(loss_final: float, loss_initial: float) -> bool:
    return loss_final <= loss_initial


# -------------------------------------------------------------------------------------------------- batch-v1
@_binds("n > 0")
def sample_count_is_positive(n: int) -> bool:
    return n > 0


@_binds("batch_size > 0")
def batch_size_is_positive(batch_size: int) -> bool:
    return batch_size > 0


@_binds("ret >= 1")
def at_least_one_batch(ret: int) -> bool:
    return ret >= 1


@_binds("ret == (n + batch_size - 1) / batch_size")
def batch_count_is_the_ceiling(ret: int, n: int, batch_size: int) -> bool:
    """``num_batches == ceil(n / batch_size)``, in Rust's integer arithmetic."""
    return batch_size > 0 and ret == (n + batch_size - 1) // batch_size


@_binds("ret.len() == gradients[0].len()")
def mean_gradient_has_the_length_of_one(ret: Vector, gradients: list[Vector]) -> bool:
    return bool(gradients) and _len(ret) == _len(gradients[0])


@_binds("ret.iter().all(|g| g.is_finite())")
def result_is_finite(ret: Vector) -> torch.Tensor:
    return _all_finite(ret)


# --------------------------------------------------------------------------------------------- checkpoint-v1
@_binds("num_layers > 0")
def layer_count_is_positive(num_layers: int) -> bool:
    return num_layers > 0


@_binds("activation_size > 0")
def activation_size_is_positive(activation_size: int) -> bool:
    return activation_size > 0


@_binds("checkpoint_memory <= (num_layers as f64).sqrt().ceil() as usize * activation_size")
def checkpoint_memory_is_within_sqrt_layers(checkpoint_memory: int, num_layers: int, activation_size: int) -> bool:
    return checkpoint_memory <= math.ceil(math.sqrt(num_layers)) * activation_size


@_binds("!model_state.weights.is_empty()")
def weights_are_not_empty(model_state: Mapping[str, Any]) -> bool:
    return _len(model_state["weights"]) > 0


@_binds("model_state.weights.iter().all(|w| w.is_finite())")
def weights_are_finite(model_state: Mapping[str, Any]) -> torch.Tensor:
    return _all_finite(model_state["weights"])


@_binds("restored.weights == model_state.weights")
def weights_are_restored_exactly(restored: Mapping[str, Any], model_state: Mapping[str, Any]) -> bool:
    return _equal(restored["weights"], model_state["weights"])


@_binds("restored.epoch == model_state.epoch")
def epoch_is_restored(restored: Mapping[str, Any], model_state: Mapping[str, Any]) -> bool:
    return _equal(restored["epoch"], model_state["epoch"])


@_binds("restored.optimizer_state == model_state.optimizer_state")
def optimizer_state_is_restored_exactly(restored: Mapping[str, Any], model_state: Mapping[str, Any]) -> bool:
    return _equal(restored["optimizer_state"], model_state["optimizer_state"])


# ------------------------------------------------------------------------------------------ backward-pass-v1
@_binds("!grad_output.is_empty()")
def grad_output_is_not_empty(grad_output: Vector) -> bool:
    return _len(grad_output) > 0


@_binds("grad_output.len() == output.len()")
def grad_output_has_the_length_of_output(grad_output: Vector, output: Vector) -> bool:
    return _len(grad_output) == _len(output)


@_binds("grad_output.iter().all(|g| g.is_finite())")
def grad_output_is_finite(grad_output: Vector) -> torch.Tensor:
    return _all_finite(grad_output)


@_binds("ret.len() == input.len()")
def gradient_has_the_length_of_input(ret: Vector, input: Vector) -> bool:
    return _len(ret) == _len(input)


@_binds("!y.is_empty()")
def y_is_not_empty(y: Vector) -> bool:
    return _len(y) > 0


@_binds("y.iter().all(|v| *v >= 0.0 && v.is_finite())")
def y_is_finite_and_not_negative(y: Vector) -> torch.Tensor:
    flags = [(torch.isfinite(t) & (t >= 0)).all() for t in _tensors(y)]
    return torch.stack(flags).all() if flags else torch.tensor(True)


@_binds("(y.iter().sum::<f32>() - 1.0).abs() < 1e-5")
def y_sums_to_one(y: Vector) -> bool:
    total = sum(float(t.to(torch.float32).sum()) for t in _tensors(y))
    return abs(total - 1.0) < 1e-5


@_binds("grad_output.len() == y.len()")
def grad_output_has_the_length_of_y(grad_output: Vector, y: Vector) -> bool:
    return _len(grad_output) == _len(y)


@_binds("ret.len() == y.len()")
def gradient_has_the_length_of_y(ret: Vector, y: Vector) -> bool:
    return _len(ret) == _len(y)


@_binds("a.len() == m * k")
def a_is_m_by_k(a: Vector, m: int, k: int) -> bool:
    return _len(a) == m * k


@_binds("b.len() == k * n")
def b_is_k_by_n(b: Vector, k: int, n: int) -> bool:
    return _len(b) == k * n


@_binds("grad_output.len() == m * n")
def grad_output_is_m_by_n(grad_output: Vector, m: int, n: int) -> bool:
    return _len(grad_output) == m * n


@_binds("k > 0")
def inner_dimension_is_positive(k: int) -> bool:
    return k > 0


@_binds("grad_a.len() == a.len()")
def grad_a_has_the_length_of_a(grad_a: Vector, a: Vector) -> bool:
    return _len(grad_a) == _len(a)


@_binds("grad_b.len() == b.len()")
def grad_b_has_the_length_of_b(grad_b: Vector, b: Vector) -> bool:
    return _len(grad_b) == _len(b)


@_binds("grad_a.iter().all(|g| g.is_finite())")
def grad_a_is_finite(grad_a: Vector) -> torch.Tensor:
    return _all_finite(grad_a)


@_binds("grad_b.iter().all(|g| g.is_finite())")
def grad_b_is_finite(grad_b: Vector) -> torch.Tensor:
    return _all_finite(grad_b)
