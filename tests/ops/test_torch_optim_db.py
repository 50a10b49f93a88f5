"""torch's own optimizer test material (``optim_db``) for Adam and AdamW, run against provetrain.

Every CPU ``OptimizerInput`` torch's ``test_optim.py`` runs (its inputs with the "global cliquey" variants
``fused`` and ``differentiable``), in float32, float64, bfloat16 and float16, is either accepted and
compared with ``torch.optim`` bit for bit, or refused for a reason listed in ``REFUSED``. torch's ``fused``
keyword names torch's fused kernel: on provetrain that is the multi-tensor path (``foreach=True``), which
runs the same kernel; torch's ``fused=False`` (its single-tensor loop on CPU) is provetrain's reference path
(``fused=False``). provetrain's own C kernel (``fused=True``) is compared in float32 within
``torch.testing.assert_close``'s default tolerances, as torch's ``test_fused_matches_forloop`` does.

torch's error inputs are constructed too; ``ERRORS_THAT_DIFFER`` lists where provetrain deliberately raises
something else. The module does not need the ``expecttest`` package that ``torch.testing._internal``
imports: a stand-in is installed when it is missing (only its ``TestCase`` base class is used at import).
"""

from __future__ import annotations

import sys
import types
import unittest
from typing import Any

import hypothesis
import pytest
import torch

if "expecttest" not in sys.modules:
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stand_in

# torch.testing._internal.common_utils, on import, freezes torch.backends' global flags and loads its own
# Hypothesis profile (max_examples=10, no database): both are for torch's suite, not for the rest of ours.
_flags_were_frozen = torch.backends.flags_frozen()
hypothesis.settings.register_profile("provetrain-before-torch-testing", parent=hypothesis.settings.default)
from torch.testing._internal import common_optimizers  # noqa: E402

hypothesis.settings.load_profile("provetrain-before-torch-testing")
if not _flags_were_frozen:
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

from provetrain.ops.adam import Adam, AdamW  # noqa: E402

CLASSES = {torch.optim.Adam: Adam, torch.optim.AdamW: AdamW}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STEPS = 4

# torch keyword (value True) -> why provetrain refuses it
REFUSED = {
    "amsgrad": "no running maximum of exp_avg_sq yet",
    "differentiable": "a guarded step runs under no_grad and chooses old or new state by torch.where",
}
# torch error input description -> (provetrain's error type, why it differs)
ERRORS_THAT_DIFFER = {
    "a param group cannot have duplicate parameters": (
        ValueError,
        "torch warns that this will become an error; provetrain refuses it now (each listing would step)",
    ),
    "lr as Tensor doesn't work with foreach & not capturable": (
        None,
        "foreach=True names provetrain's multi-tensor path, which reads a 1-element lr once as a float",
    ),
    "betas\\[0\\] as a Tensor is not supported for capturable=False and foreach=True": (
        None,
        "as for lr: tensor betas are read once as floats on every path",
    ),
}


def optim_infos() -> list[Any]:
    return [info for info in common_optimizers.optim_db if info.optim_cls in CLASSES]


def all_inputs() -> list[Any]:
    cases = []
    for info in optim_infos():
        inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
        for optim_input in inputs:
            cases.append(
                pytest.param(info.optim_cls, optim_input.kwargs, id=f"{info.optim_cls.__name__}-{optim_input.desc}")
            )
    return cases


def refusal(kwargs: dict[str, Any]) -> str | None:
    return next((flag for flag in REFUSED if kwargs.get(flag)), None)


def provetrain_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """torch's keywords with torch's ``fused`` mapped onto the provetrain path that runs torch's kernel."""
    mapped = dict(kwargs)
    mapped.pop("differentiable", None)
    mapped.pop("amsgrad", None)
    torch_fused = mapped.pop("fused", False)
    return mapped | ({"foreach": True} if torch_fused else {"fused": False})


def make_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(10, 5, generator=g).to(dtype)),
        torch.nn.Parameter(torch.randn(10, generator=g).to(dtype)),
    ]


def run(opt_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[Any, ...]:
    weight, bias = make_params(dtype)
    opt = opt_cls([weight, bias], **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(5, generator=g).to(dtype)
        opt.zero_grad()
        (weight.mv(x) + bias).float().pow(2).sum().backward()
        opt.step()
    states = [opt.state[p] for p in (weight, bias)]
    return weight, bias, *(s[key] for s in states for key in ("exp_avg", "exp_avg_sq")), *(s["step"] for s in states)


def assert_bitwise(expected: tuple[Any, ...], got: tuple[Any, ...]) -> None:
    for e, g in zip(expected, got, strict=True):
        assert e.dtype == g.dtype and e.device == g.device
        assert torch.equal(e.detach().reshape(-1).view(torch.uint8), g.detach().reshape(-1).view(torch.uint8)), (e, g)


def test_the_inputs_are_the_ones_torch_runs() -> None:
    # 2 classes x 15 CPU inputs (5 configs, each plain, fused and differentiable); a new torch may add some.
    cases = all_inputs()
    assert len(cases) >= 30
    refused = [c for c in cases if refusal(c.values[1])]
    assert len(refused) >= 14 and len(cases) - len(refused) >= 16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("torch_cls", "kwargs"), all_inputs())
def test_optim_db_input_matches_torch_or_is_refused_for_a_stated_reason(
    torch_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    ours = CLASSES[torch_cls]
    flag = refusal(kwargs)
    if flag is not None:
        with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
            ours(make_params(dtype), **provetrain_kwargs(kwargs) | {flag: True})
        return
    expected = run(torch_cls, kwargs, dtype)
    got = run(ours, provetrain_kwargs(kwargs), dtype)
    assert_bitwise(expected, got)


@pytest.mark.parametrize(
    ("torch_cls", "kwargs"), [c for c in all_inputs() if not refusal(c.values[1]) and not c.values[1].get("fused")]
)
def test_optim_db_input_on_the_c_kernel_is_within_torch_tolerances(
    torch_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    from provetrain.ops import fused

    if not fused.fused_available():
        pytest.skip(f"fused kernel unavailable: {fused.fused_unavailable_reason()}")
    expected = run(torch_cls, kwargs, torch.float32)
    got = run(CLASSES[torch_cls], provetrain_kwargs(kwargs) | {"fused": True}, torch.float32)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g.detach(), e.detach())


def error_inputs() -> list[Any]:
    cases = []
    for info in optim_infos():
        for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            given = error_input.optimizer_error_input
            cases.append(pytest.param(info.optim_cls, error_input, id=f"{info.optim_cls.__name__}-{given.desc}"))
    return cases


@pytest.mark.parametrize(("torch_cls", "error_input"), error_inputs())
def test_torch_error_inputs_raise_torchs_error_type_or_differ_for_a_stated_reason(
    torch_cls: type[torch.optim.Optimizer], error_input: Any
) -> None:
    given = error_input.optimizer_error_input
    assert error_input.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR
    expected_type = error_input.error_type
    if given.desc in ERRORS_THAT_DIFFER:
        expected_type = ERRORS_THAT_DIFFER[given.desc][0]
    ours = CLASSES[torch_cls]
    params = make_params(torch.float32) if given.params is None else given.params  # as torch's test does
    if expected_type is None:
        ours(params, **given.kwargs)  # accepted
        return
    with pytest.raises(expected_type):
        ours(params, **given.kwargs)
