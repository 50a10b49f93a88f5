r"""Activation (gradient) checkpointing of chosen submodules, through ``torch.utils.checkpoint`` (checkpoint-v1).

A checkpointed submodule keeps only its inputs for the backward; the activations inside it are dropped after
the forward and recomputed, from those inputs, when the backward reaches it (Chen et al., 2016). Memory for
activations falls from every intermediate of every wrapped block to the blocks' inputs plus one block's
intermediates at a time, for one extra forward of each wrapped block.

Which submodules: ``"module_lists"`` wraps every child of every ``nn.ModuleList`` (the repeated blocks of a
transformer, a ResNet stage written as a list); a list of ``fnmatch`` patterns wraps every submodule whose
qualified name (``model.named_modules()``: ``blocks.0``, ``encoder.layer.3.attention``) matches one. A module
inside one already wrapped is not wrapped again.

How: the module's ``forward`` is replaced, on the instance only, by one that calls
``torch.utils.checkpoint.checkpoint(type(module).forward, module, *args, use_reentrant=False, **kwargs)``
whenever autograd records (outside ``torch.no_grad``, the plain forward runs). Parameter names and the
``state_dict`` are unchanged, so checkpoints, resume and ``load_state_dict`` are unaffected, and
``copy.deepcopy`` and pickling carry the wrapping to the copy.

Guarantees (checkpoint-v1, "Checkpoint preserves computation": ``checkpoint(f)(x) == f(x)``)
---------------------------------------------------------------------------------------------
- The forward output is the plain forward's, bit for bit: it *is* the plain forward, run under a hook that
  drops saved tensors.
- The gradients are the plain backward's, bit for bit, when the recomputed forward repeats the first one bit
  for bit: ``torch.utils.checkpoint`` restores the CPU and CUDA RNG states before recomputing (dropout draws
  the same mask) and, with ``use_reentrant=False``, checks that the recomputed tensors have the saved ones'
  shapes and dtypes. Deterministic kernels repeat themselves (every CPU kernel, and CUDA ones under
  ``torch.use_deterministic_algorithms``); a nondeterministic CUDA kernel (atomics) may differ in the last
  bits between the two forwards, as between any two runs.
- Buffers the forward writes (BatchNorm's running statistics) are written once per forward, as without
  checkpointing: the recomputation runs with the module's buffers put back afterwards, so momentum is not
  applied twice.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ActivationCheckpointing",
    "apply_activation_checkpointing",
    "is_checkpointed",
    "saved_activation_bytes",
]

ActivationCheckpointing = Literal["module_lists"] | Sequence[str]
"""``"module_lists"``, or ``fnmatch`` patterns over qualified submodule names."""


def apply_activation_checkpointing(model: nn.Module, targets: ActivationCheckpointing) -> list[str]:
    """Checkpoint the submodules ``targets`` selects (see the module docstring); returns their names.

    Raises:
        ValueError: ``targets`` is neither ``"module_lists"`` nor a non-empty list of patterns, or selects no
            submodule (the message lists some names it could match).
    """
    chosen = _select(model, targets)
    for module in chosen.values():
        if not is_checkpointed(module):
            module.forward = functools.partial(_checkpointed_forward, module)  # type: ignore[method-assign]
    return list(chosen)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module``'s forward runs under activation checkpointing."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _checkpointed_forward


def _select(model: nn.Module, targets: ActivationCheckpointing) -> dict[str, nn.Module]:
    if targets == "module_lists":
        chosen = {
            f"{name}.{child}" if name else child: module
            for name, parent in model.named_modules()
            if isinstance(parent, nn.ModuleList)
            for child, module in parent.named_children()
        }
        what = "every child of an nn.ModuleList"
    elif (
        not isinstance(targets, str)
        and isinstance(targets, Sequence)
        and targets
        and all(isinstance(t, str) and t for t in targets)
    ):
        chosen = {
            name: module
            for name, module in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)
        }
        what = f"patterns {list(targets)}"
    else:
        raise ValueError(
            f"activation_checkpointing must be 'module_lists' or a non-empty list of submodule name patterns "
            f"(fnmatch, e.g. ['blocks.*']), got {targets!r}"
        )
    # A module inside a chosen one is recomputed with it: wrapping it again would recompute it twice.
    outer = {n: m for n, m in chosen.items() if not any(n.startswith(f"{o}.") for o in chosen if o != n)}
    if not outer:
        names = [n for n, _ in model.named_modules() if n][:8]
        raise ValueError(
            f"activation_checkpointing: {what} selects no submodule of {type(model).__name__}; its submodules "
            f"include {names}"
        )
    return outer


def _checkpointed_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(module).forward
    if not torch.is_grad_enabled():  # nothing is saved for a backward, so there is nothing to drop
        return forward(module, *args, **kwargs)
    return checkpoint(
        forward,
        module,
        *args,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _buffers_kept(module)),
        **kwargs,
    )


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Run the recomputation, then put the buffers back as the first forward left them."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def saved_activation_bytes(model: nn.Module, *args: Any, **kwargs: Any) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward of ``model`` (parameters excluded).

    The memory checkpointing saves: the tensors operations save (``torch.autograd.graph.saved_tensors_hooks``)
    and, for each checkpointed submodule, the inputs its recomputation keeps (which the checkpoint holds itself,
    not through the hooks), each distinct storage counted once.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def count(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def count_inputs(_: nn.Module, inputs: tuple[Any, ...], kw: dict[str, Any]) -> None:
        for value in (*inputs, *kw.values()):
            if isinstance(value, Tensor):
                count(value)

    handles = [
        m.register_forward_pre_hook(count_inputs, with_kwargs=True) for m in model.modules() if is_checkpointed(m)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values())
