"""The training siblings' pre- and postconditions each have a predicate that means the clause."""

from __future__ import annotations

import math

import pytest
import torch

from provetrain.contract import enumerate_clauses, load_contract
from provetrain.contract.predicates import PREDICATES, predicate_for

SIBLINGS = ["optimizer-v1", "batch-v1", "checkpoint-v1", "backward-pass-v1"]


@pytest.mark.parametrize("name", SIBLINGS)
def test_every_rust_clause_of_the_training_siblings_has_a_predicate(name: str) -> None:
    for clause in enumerate_clauses(load_contract(name)):
        if clause.kind in ("precondition", "postcondition"):
            assert predicate_for(clause.text) is not None, (name, clause.text)


T = torch.tensor
NAN, INF = math.nan, math.inf
STATE = {"weights": {"w": T([1.0, 2.0])}, "epoch": 3, "optimizer_state": {"step": T(5.0), "m": [T([0.5])]}}
# (clause text, values, expected truth)
CASES = [
    ("beta1 > 0.0 && beta1 < 1.0", {"beta1": 0.9}, True),
    ("beta1 > 0.0 && beta1 < 1.0", {"beta1": 0.0}, False),
    ("beta1 > 0.0 && beta1 < 1.0", {"beta1": NAN}, False),
    ("beta2 > 0.0 && beta2 < 1.0", {"beta2": 1.0}, False),
    ("epsilon > 0.0", {"epsilon": 0.0}, False),
    ("weight_decay >= 0.0", {"weight_decay": 0.0}, True),
    ("weight_decay >= 0.0", {"weight_decay": -1e-9}, False),
    ("momentum >= 0.0 && momentum < 1.0", {"momentum": 0.0}, True),
    ("momentum >= 0.0 && momentum < 1.0", {"momentum": 1.0}, False),
    ("params.iter().all(|p| p.is_finite())", {"params": [T([1.0]), T([2.0, 3.0])]}, True),
    ("params.iter().all(|p| p.is_finite())", {"params": [T([1.0]), T([INF])]}, False),
    ("params.len() == params_before.len()", {"params": [T([1.0, 2.0])], "params_before": [T([3.0]), T([4.0])]}, True),
    ("params.len() == params_before.len()", {"params": [T([1.0])], "params_before": [T([3.0, 4.0])]}, False),
    ("grad.len() == params.len()", {"grad": [T([1.0])], "params": [T([1.0]), T([2.0])]}, False),
    ("velocity.len() == params.len()", {"velocity": T([0.0, 0.0]), "params": [T([1.0, 2.0])]}, True),
    ("lr < 2.0 / l_smooth", {"lr": 0.1, "l_smooth": 10.0}, True),
    ("lr < 2.0 / l_smooth", {"lr": 0.2, "l_smooth": 10.0}, False),
    ("lr < 2.0 / l_smooth", {"lr": 0.1, "l_smooth": 0.0}, False),
    ("num_steps > 0", {"num_steps": 0}, False),
    ("loss_final.is_finite()", {"loss_final": T(NAN)}, False),
    ("loss_final.is_finite()", {"loss_final": 1.5}, True),
    ("loss_final <= loss_initial", {"loss_final": 1.0, "loss_initial": 1.0}, True),
    ("loss_final <= loss_initial", {"loss_final": NAN, "loss_initial": 1.0}, False),
    ("n > 0", {"n": 1}, True),
    ("batch_size > 0", {"batch_size": 0}, False),
    ("ret >= 1", {"ret": 0}, False),
    ("ret == (n + batch_size - 1) / batch_size", {"ret": 4, "n": 10, "batch_size": 3}, True),
    ("ret == (n + batch_size - 1) / batch_size", {"ret": 3, "n": 10, "batch_size": 3}, False),
    ("ret == (n + batch_size - 1) / batch_size", {"ret": 2, "n": 10, "batch_size": 5}, True),
    ("ret.len() == gradients[0].len()", {"ret": T([1.0, 2.0]), "gradients": [T([1.0, 2.0]), T([3.0, 4.0])]}, True),
    ("ret.len() == gradients[0].len()", {"ret": T([1.0]), "gradients": []}, False),
    ("ret.iter().all(|g| g.is_finite())", {"ret": T([1.0, NAN])}, False),
    ("num_layers > 0", {"num_layers": 0}, False),
    ("activation_size > 0", {"activation_size": 4}, True),
    (
        "checkpoint_memory <= (num_layers as f64).sqrt().ceil() as usize * activation_size",
        {"checkpoint_memory": 12, "num_layers": 10, "activation_size": 3},  # ceil(sqrt 10) = 4
        True,
    ),
    (
        "checkpoint_memory <= (num_layers as f64).sqrt().ceil() as usize * activation_size",
        {"checkpoint_memory": 13, "num_layers": 10, "activation_size": 3},
        False,
    ),
    ("!model_state.weights.is_empty()", {"model_state": STATE}, True),
    ("!model_state.weights.is_empty()", {"model_state": {"weights": {"w": T([])}}}, False),
    ("model_state.weights.iter().all(|w| w.is_finite())", {"model_state": {"weights": {"w": T([NAN])}}}, False),
    ("restored.weights == model_state.weights", {"restored": STATE, "model_state": STATE}, True),
    (
        "restored.weights == model_state.weights",
        {"restored": {"weights": {"w": T([1.0, 2.0], dtype=torch.float64)}}, "model_state": STATE},
        False,
    ),
    ("restored.epoch == model_state.epoch", {"restored": {"epoch": 2}, "model_state": STATE}, False),
    ("restored.optimizer_state == model_state.optimizer_state", {"restored": STATE, "model_state": STATE}, True),
    (
        "restored.optimizer_state == model_state.optimizer_state",
        {"restored": {"optimizer_state": {"step": T(5.0), "m": [T([0.25])]}}, "model_state": STATE},
        False,
    ),
    ("!grad_output.is_empty()", {"grad_output": T([])}, False),
    ("grad_output.len() == output.len()", {"grad_output": T([[1.0, 2.0]]), "output": T([3.0, 4.0])}, True),
    ("grad_output.iter().all(|g| g.is_finite())", {"grad_output": T([-INF])}, False),
    ("ret.len() == input.len()", {"ret": T([1.0]), "input": T([1.0, 2.0])}, False),
    ("!y.is_empty()", {"y": T([0.5])}, True),
    ("y.iter().all(|v| *v >= 0.0 && v.is_finite())", {"y": T([0.0, 1.0])}, True),
    ("y.iter().all(|v| *v >= 0.0 && v.is_finite())", {"y": T([-0.1, 1.1])}, False),
    ("y.iter().all(|v| *v >= 0.0 && v.is_finite())", {"y": T([NAN])}, False),
    ("(y.iter().sum::<f32>() - 1.0).abs() < 1e-5", {"y": T([0.25, 0.75])}, True),
    ("(y.iter().sum::<f32>() - 1.0).abs() < 1e-5", {"y": T([0.25, 0.7])}, False),
    ("grad_output.len() == y.len()", {"grad_output": T([1.0, 2.0]), "y": T([0.5, 0.5])}, True),
    ("ret.len() == y.len()", {"ret": T([1.0]), "y": T([0.5, 0.5])}, False),
    ("a.len() == m * k", {"a": torch.zeros(2, 3), "m": 2, "k": 3}, True),
    ("b.len() == k * n", {"b": torch.zeros(3, 4), "k": 3, "n": 5}, False),
    ("grad_output.len() == m * n", {"grad_output": torch.zeros(2, 4), "m": 2, "n": 4}, True),
    ("k > 0", {"k": 0}, False),
    ("grad_a.len() == a.len()", {"grad_a": torch.zeros(2, 3), "a": torch.ones(3, 2)}, True),
    ("grad_b.len() == b.len()", {"grad_b": torch.zeros(2), "b": torch.ones(3)}, False),
    ("grad_a.iter().all(|g| g.is_finite())", {"grad_a": T([1.0])}, True),
    ("grad_b.iter().all(|g| g.is_finite())", {"grad_b": T([NAN])}, False),
]


@pytest.mark.parametrize(("text", "values", "expected"), CASES)
def test_sibling_predicate_means_the_clause(text: str, values: dict, expected: bool) -> None:
    assert bool(PREDICATES[text](**values)) is expected


def test_every_sibling_predicate_is_exercised() -> None:
    """Each registered sibling predicate is exercised (not only registered)."""
    texts = {
        c.text
        for name in SIBLINGS
        for c in enumerate_clauses(load_contract(name))
        if c.kind in ("precondition", "postcondition")
    }
    seed = {c.text for c in enumerate_clauses(load_contract()) if c.kind in ("precondition", "postcondition")}
    covered = {text for text, _, _ in CASES}
    assert texts - seed <= covered, sorted(texts - seed - covered)
