"""torch's own optimizer test material (``optim_db``) for Adam and AdamW, run against provetrain.

Every ``OptimizerInput`` torch's ``test_optim.py`` runs on CUDA (a superset of its CPU ones: 10 inputs per
class, with capturable, amsgrad, Tensor lr and Tensor betas, each in the "global cliquey" variants loop,
``foreach``, ``fused`` and ``differentiable``: 80 in all), in float32, float64, bfloat16 and float16, runs
here on CPU and is either accepted and compared with ``torch.optim`` bit for bit, or refused for a reason
listed in ``REFUSED`` (``differentiable=True``: 20 of the 80). torch's ``fused`` keyword names torch's fused
kernel: on provetrain that is the multi-tensor path (``foreach=True``), which runs the same kernel; torch's
loop and its ``foreach`` implementation are compared with provetrain's reference path (``fused=False``),
which is torch's loop bit for bit (torch's foreach differs from its own loop in float16 and under
capturable; see the test), except in float16 with an eps that rounds to 0 there (torch's default
1e-8): there the loop writes 0/0 = NaN into the weights wherever a second moment is 0, and provetrain's
reference path refuses the step instead (``FLOAT16_EPS_REFUSAL``). torch runs its capturable arithmetic
only on CUDA-like devices: the fixture lets it run on CPU, where provetrain accepts capturable too.
provetrain's own C kernel (``fused=True``; no amsgrad) is compared in float32 within
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
from provetrain.ops.sgd import SGD  # noqa: E402

CLASSES = {torch.optim.Adam: Adam, torch.optim.AdamW: AdamW, torch.optim.SGD: SGD}
# The state each class keeps per parameter, compared after the run
STATE_KEYS = {
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "step"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "step"),
    torch.optim.SGD: ("momentum_buffer",),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
STEPS = 4

# torch keyword (value True) -> why provetrain refuses it (the README's table says the same)
REFUSED = {
    "differentiable": "a guarded, clipped step is not differentiable",
}
# torch error input description -> (provetrain's error type, why it differs)
ERRORS_THAT_DIFFER = {
    "a param group cannot have duplicate parameters": (
        ValueError,
        "torch warns that this will become an error; provetrain refuses it now (each listing would step)",
    ),
}


def optim_infos() -> list[Any]:
    return [info for info in common_optimizers.optim_db if info.optim_cls in CLASSES]


def all_inputs() -> list[Any]:
    """Every configuration torch's test_optim.py runs on CUDA, the superset of its CPU ones: 10 inputs per class
    (5 more carry capturable, Tensor lr and Tensor betas), each plain, foreach, fused and differentiable."""
    cases = []
    for info in optim_infos():
        inputs = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs("cuda", torch.float32, info)
        for optim_input in inputs:
            impl = next(
                (flag for flag in ("foreach", "fused", "differentiable") if optim_input.kwargs.get(flag)), "loop"
            )
            cases.append(
                pytest.param(
                    info.optim_cls, optim_input.kwargs, id=f"{info.optim_cls.__name__}-{optim_input.desc}-{impl}"
                )
            )
    return cases


@pytest.fixture(autouse=True)
def torch_capturable_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch refuses capturable=True for CPU tensors when it steps (its capturable configurations are CUDA
    ones); its capturable arithmetic does not depend on the device, so torch runs it on CPU here to be
    compared with. provetrain accepts capturable=True on every device."""
    module = sys.modules["torch.optim.adam"]  # torch.optim.adam is also the name of a function
    original = module._get_capturable_supported_devices
    monkeypatch.setattr(module, "_get_capturable_supported_devices", lambda *a, **k: [*original(*a, **k), "cpu"])


FLOAT16_EPS_REFUSAL = "rounds to 0 in float16"


def refuses_float16_eps(mapped: dict[str, Any], dtype: torch.dtype) -> bool:
    """provetrain's reference path in float16 with an eps at or below 2^-25, which rounds to 0 there."""
    return dtype is torch.float16 and mapped.get("fused") is False and mapped.get("eps", 1e-8) <= 2.0**-25


def refusal(kwargs: dict[str, Any]) -> str | None:
    return next((flag for flag in REFUSED if kwargs.get(flag)), None)


def provetrain_kwargs(kwargs: dict[str, Any], torch_cls: type | None = None) -> dict[str, Any]:
    """torch's keywords with its implementation choice mapped onto provetrain's path with the same arithmetic:
    torch's fused kernel is provetrain's multi-tensor path (``foreach=True``), which calls it; torch's loop
    and its foreach implementation are provetrain's reference path (``fused=False``). provetrain's SGD has
    one path and takes torch's ``foreach`` and ``fused`` as they are."""
    mapped = dict(kwargs)
    if torch_cls is torch.optim.SGD:
        mapped.pop("differentiable", None)
        return mapped
    mapped.pop("differentiable", None)
    torch_fused = mapped.pop("fused", False)
    mapped.pop("foreach", None)
    return mapped | ({"foreach": True} if torch_fused else {"fused": False})


def make_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(10, 5, generator=g).to(dtype)),
        torch.nn.Parameter(torch.randn(10, generator=g).to(dtype)),
    ]


def fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy whose tensor hyper-parameters are new tensors: a scheduler or an optimizer may own them."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()} | (
        {"betas": tuple(b.clone() for b in kwargs["betas"])}
        if isinstance(kwargs.get("betas", (0.0,))[0], torch.Tensor)
        else {}
    )


def run(opt_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[Any, ...]:
    weight, bias = make_params(dtype)
    opt = opt_cls([weight, bias], **fresh(kwargs))
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(5, generator=g).to(dtype)
        opt.zero_grad()
        (weight.mv(x) + bias).float().pow(2).sum().backward()
        opt.step()
    states = [opt.state[p] for p in (weight, bias)]
    torch_cls = next(t for t, ours in CLASSES.items() if opt_cls in (t, ours))
    keys = [*STATE_KEYS[torch_cls]] + (["max_exp_avg_sq"] if kwargs.get("amsgrad") else [])
    return weight, bias, *(s[key] for s in states for key in keys if key in s)


def assert_bitwise(expected: tuple[Any, ...], got: tuple[Any, ...]) -> None:
    for e, g in zip(expected, got, strict=True):
        assert e.dtype == g.dtype and e.device == g.device
        assert torch.equal(e.detach().reshape(-1).view(torch.uint8), g.detach().reshape(-1).view(torch.uint8)), (e, g)


def test_the_inputs_are_the_ones_torch_runs() -> None:
    # Adam, AdamW: 10 inputs x (loop, foreach, fused, differentiable) each; SGD 9 x 4. A new torch may add some.
    cases = all_inputs()
    adam = [c for c in cases if c.values[0] is not torch.optim.SGD]
    assert len(adam) >= 80 and len(cases) - len(adam) >= 36
    refused = [c for c in cases if refusal(c.values[1])]
    assert len(refused) == len(cases) // 4  # the differentiable variants, and nothing else
    assert sum(bool(c.values[1].get("capturable")) for c in adam) >= 40
    assert sum(bool(c.values[1].get("amsgrad")) for c in adam) >= 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("torch_cls", "kwargs"), all_inputs())
def test_optim_db_input_matches_torch_or_is_refused_for_a_stated_reason(
    torch_cls: type[torch.optim.Optimizer], kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    ours = CLASSES[torch_cls]
    flag = refusal(kwargs)
    if flag is not None:
        with pytest.raises(ValueError, match=f"{flag}=True is not supported: {REFUSED[flag]}"):
            ours(make_params(dtype), **provetrain_kwargs(kwargs, torch_cls) | {flag: True})
        return
    mapped = provetrain_kwargs(kwargs, torch_cls)
    if torch_cls is not torch.optim.SGD and refuses_float16_eps(mapped, dtype):
        with pytest.raises(ValueError, match=FLOAT16_EPS_REFUSAL):
            run(ours, mapped, dtype)
        return
    got = run(ours, mapped, dtype)
    if torch_cls is torch.optim.SGD:
        # provetrain's SGD is torch's loop, whichever implementation torch's keywords choose
        assert_bitwise(run(torch_cls, kwargs | {"foreach": False, "fused": False}, dtype), got)
        return
    if kwargs.get("foreach"):
        # torch's foreach implementation and its loop differ from each other: in float16 (eps=1e-8 rounds to
        # 0, so 0/0 entries differ), and with capturable (lr / (1 - beta1^t) as a reciprocal of
        # (1 - beta1^t) / lr). provetrain's reference path is torch's loop, bit for bit, in every case.
        assert_bitwise(run(torch_cls, kwargs | {"foreach": False}, dtype), got)
        if dtype in (torch.float32, torch.float64):  # and within torch's tolerances of torch's foreach
            for e, g in zip(run(torch_cls, kwargs, dtype), got, strict=True):
                torch.testing.assert_close(g.detach(), e.detach())
        return
    assert_bitwise(run(torch_cls, kwargs, dtype), got)


@pytest.mark.parametrize(
    ("torch_cls", "kwargs"),
    [
        c
        for c in all_inputs()
        if c.values[0] is not torch.optim.SGD and not refusal(c.values[1])
        if not c.values[1].get("fused") and not c.values[1].get("amsgrad")
    ],
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
