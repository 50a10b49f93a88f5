r"""The clipped, finite-guarded Adam step on FSDP2 parameters: DTensors sharded over the ranks.

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns each parameter into a DTensor placed ``Shard(0)`` on a
1-d device mesh: rank ``r`` holds rows ``[a_r, b_r)`` (``torch.chunk`` sizes, so shards may be uneven or
empty), and after ``backward`` each gradient is a DTensor sharded the same way, holding the gradient of the
global batch's mean loss. This module takes the step of :mod:`provetrain.ops.adam` on them. On each rank:

1. **One collective.** ``(s_r, e_r)`` = the scaled float64 sum of squares of the *local* gradient shards
   (:func:`~provetrain.ops.clip.scaled_sum_of_squares`), made NaN when this rank's loss is non-finite (or
   a GradScaler found an overflow), and, for the overflow bound below, :math:`\max|\theta|` of the local
   shards, are gathered from every rank in one ``all_gather``
   (:func:`~provetrain.train.distributed.sums_and_maxima_across_ranks`) and combined in rank order:
   :math:`S = s\,4^e = \sum_r s_r 4^{e_r}`. A plain SUM all-reduce of unscaled sums would be wrong: the
   ranks' exponents differ for float64 gradients, and the order of its additions is the backend's.
2. **The decision**, from values that are the same bits on every rank, on the device (no host read):
   ``skip = not isfinite(S) or the update could overflow`` (as in :class:`provetrain.Adam`), and the clip
   of the global vector: ``(N, D) = clip_divisor(S, c, numel=n, dtypes)`` with ``n`` the *global* element
   count (``DTensor.numel()``) and ``k = clip_coefficient(S, c, ...)``. Nothing has been touched yet.
3. **The update on the local shards**, plain tensors (``p.to_local()``, ``p.grad.to_local()`` and the
   moments' local shards): torch's fused Adam kernel with ``grad_scale = D`` and ``found_inf = skip``
   (:func:`~provetrain.ops.multi_tensor.adam_update_multi_tensor_`, the multi-tensor fast path) where it
   takes the tensors, else the reference :func:`~provetrain.ops.adam.adam_step_` with ``k``. Adam is
   element-wise, so updating each shard with the global ``D`` (or ``k``) is the update of the whole vector.

Guarantees (W ranks, the parameters sharded over one process group):
    * The skip decision, ``N``, ``D`` and ``k`` are the same bits on every rank: they are computed from
      the gathered rows only, in rank order. A NaN or Inf in one rank's loss or in one element of one
      rank's gradient shard makes every rank skip; a skipped step leaves every shard, moment and step count
      bit-for-bit unchanged on every rank.
    * The clip bound holds for the global vector exactly as for one process: every term of ``S`` is an
      exact square (below float64) summed with at most ``n - 1`` roundings (``n_r - 1`` on rank ``r``, then
      ``W - 1``), inside the ``n - 1 + EXTRA_ROUNDINGS`` that :func:`~provetrain.ops.multi_tensor.clip_divisor`
      assumes; so ``||y|| <= c`` for the clipped gradient ``y`` of all ranks together (the proofs of
      :mod:`provetrain.ops.clip` and :mod:`provetrain.ops.multi_tensor`, *Step 2-3*, apply unchanged: they
      are element-wise once ``D`` or ``k`` is fixed).
    * Compared with one process holding the whole vector, only the summation order of ``S`` differs, so
      ``D`` and ``k`` may differ in their last bits and an updated value by a rounding.
    * No host-device synchronisation in skip mode: the one collective and device kernels only. Raise mode
      reads the skip flag once, as :class:`provetrain.Adam` does, and on the error path gathers each rank's
      non-finite counts to name them.

Not covered: parameters mixing DTensors with plain (replicated) tensors (a replicated gradient would be
counted W times) and DTensors on meshes of more than one dimension (HSDP, tensor parallelism): both are
refused with a ``ValueError``. A clipped gradient whose norm exceeds float32's range times the clip value
gives ``D = inf`` and a zero gradient for that step (as the multi-tensor path on CUDA;
:mod:`provetrain.ops.multi_tensor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from provetrain.errors import ContractViolation
from provetrain.ops import multi_tensor
from provetrain.ops.adam import adam_step_, moment_limit
from provetrain.ops.clip import clip_coefficient
from provetrain.train.distributed import failing_peers_stop, sums_and_maxima_across_ranks

__all__ = ["ShardedGroup", "ShardedStep", "holds_dtensors", "sharded_adam_step_"]


class ShardedGroup(NamedTuple):
    """One parameter group's parameters that have a gradient this step.

    Attributes:
        params: DTensor parameters, ``Shard``-placed on a 1-d mesh (FSDP2's).
        grads: their gradients, DTensors placed like the parameters.
        hyperparameters: ``lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize`` as
            :func:`~provetrain.ops.adam.adam_step_` takes them.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    hyperparameters: Mapping[str, Any]


class ShardedStep(NamedTuple):
    """What a sharded step decided, for the optimizer's counters: 0-d tensors, the same on every rank.

    Attributes:
        skip: bool, the step changed nothing.
        total_norm: float64, the global gradient norm before clipping.
        clipped_norm: float64, ``total_norm * k``: the norm the clipped gradient is bounded by (at most the
            clip value), ``total_norm`` itself when nothing was clipped.
    """

    skip: Tensor
    total_norm: Tensor
    clipped_norm: Tensor


def holds_dtensors(params: Sequence[Tensor]) -> bool:
    """Whether any of ``params`` is a DTensor (then the step must be :func:`sharded_adam_step_`)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    # FSDP2's nn.Parameter(DTensor) is of type DTensor; one issubclass per distinct type, not per parameter.
    return any(issubclass(kind, DTensor) for kind in set(map(type, params)))


def sharded_adam_step_(
    groups: Sequence[ShardedGroup],
    state: MutableMapping[Tensor, dict[str, Any]],
    *,
    clip_value: float | None,
    loss: Tensor | float | None = None,
    on_nonfinite: str = "skip",
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> ShardedStep:
    r"""One clipped, guarded Adam (AdamW) step of FSDP2 parameters, in place (module docstring).

    Args:
        groups: the parameter groups' parameters with a gradient, every one a sharded DTensor; the same
            parameters, in the same order, on every rank (FSDP2's are).
        state: the optimizer's per-parameter state (``Optimizer.state``); a parameter without one gets
            ``step`` (0-d float32 on its local device), ``exp_avg`` and ``exp_avg_sq`` (zero DTensors
            sharded like it), the layout ``torch.optim.Adam`` keeps for FSDP2 parameters.
        clip_value: the bound ``c`` on the global gradient norm, or ``None`` for no clipping.
        loss: this rank's loss, or the global one; non-finite on any rank makes every rank skip.
        on_nonfinite: ``"skip"``, or ``"raise"`` a :class:`~provetrain.errors.ContractViolation` on every
            rank, naming the ranks, before anything changes.
        grad_scale, found_inf: GradScaler's scale and overflow flag, as :class:`provetrain.Adam` takes them.

    Returns:
        :class:`ShardedStep`, the same bits on every rank.

    Raises:
        ValueError: a parameter that is not a DTensor sharded on a 1-d mesh, or groups on different meshes.
        ContractViolation: in raise mode, when the step would be skipped.
        PeerFailureError: the collective failed (another rank died or froze past the timeout).

    Call it under ``torch.no_grad()``.
    """
    params = [p for g in groups for p in g.params]
    grads = [g for group in groups for g in group.grads]
    process_group = _process_group(params, grads)
    local_params = [p.to_local() for p in params]
    local_grads = [g.to_local() for g in grads]
    device = local_grads[0].device
    if grad_scale is not None:  # clip what Adam will see, as the reference path of provetrain.Adam does
        torch._foreach_div_(local_grads, grad_scale.to(device))

    # 1. One collective: the global sum of squares (NaN when this rank's loss or found_inf says so) and
    #    the global max |theta| of the groups whose overflow bound needs it.
    poison = _poison(loss, found_inf, device)
    bounded = [i for i, g in enumerate(groups) if _needs_theta(g.hyperparameters, clip_value)]
    maxima = None
    if bounded:
        maxima = torch.stack([_max_abs([local_params[j] for j in _indices(groups, i)], device) for i in bounded])
    with failing_peers_stop("the global gradient norm's all-gather"):
        sum_sq, exponent, theta = sums_and_maxima_across_ranks(
            local_grads, group=process_group, poison=poison, maxima=maxima
        )

    # 2. The decision, on the device, from values that are the same bits on every rank.
    numel, dtypes = sum(g.numel() for g in grads), sorted({g.dtype for g in grads}, key=str)
    max_norm = math.inf if clip_value is None else clip_value
    extra = multi_tensor.EXTRA_ROUNDINGS
    total_norm, k = clip_coefficient(
        sum_sq, max_norm, numel=numel, dtypes=set(dtypes), exponent=exponent, extra_roundings=extra
    )
    _, divisor = multi_tensor.clip_divisor(sum_sq, exponent, clip_value, numel=numel, dtypes=dtypes)
    skip = ~torch.isfinite(sum_sq)
    for position, i in enumerate(bounded):
        skip = skip | _overflows(groups[i], total_norm, clip_value, theta[position])
    if on_nonfinite == "raise" and bool(skip):  # host read: raise mode's one synchronisation
        _raise_on_every_rank(local_grads, loss, total_norm, process_group)

    # 3. The update of the local shards, with the global D (or k).
    for group_index, group in enumerate(groups):
        indices = _indices(groups, group_index)
        _update_local_shards_(
            [params[j] for j in indices],
            [local_params[j] for j in indices],
            [local_grads[j] for j in indices],
            state,
            skip=skip,
            k=None if clip_value is None else k,
            divisor=divisor,
            hyperparameters=group.hyperparameters,
        )
    clipped = total_norm if clip_value is None else torch.where(k == 1.0, total_norm, total_norm * k)
    return ShardedStep(skip, total_norm, torch.where(skip, math.nan, clipped))


def _update_local_shards_(
    params: list[Tensor],
    local_params: list[Tensor],
    local_grads: list[Tensor],
    state: MutableMapping[Tensor, dict[str, Any]],
    *,
    skip: Tensor,
    k: Tensor | None,
    divisor: Tensor,
    hyperparameters: Mapping[str, Any],
) -> None:
    """Adam on plain local shards: torch's fused kernel where it takes them (clipped by ``divisor``), else
    the reference :func:`adam_step_` (clipped by ``k``), per (device, dtype)."""
    for p in params:
        if not state.get(p):
            state[p] = _fresh_state(p)
    exp_avgs = [state[p]["exp_avg"].to_local() for p in params]
    exp_avg_sqs = [state[p]["exp_avg_sq"].to_local() for p in params]
    steps = [state[p]["step"] for p in params]
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(local_params):
        by_kind.setdefault((t.device, t.dtype), []).append(i)
    for indices in by_kind.values():
        chosen = [[ts[i] for i in indices] for ts in (local_params, local_grads, exp_avgs, exp_avg_sqs, steps)]
        fast = all(s.dtype == torch.float32 for s in chosen[4]) and multi_tensor.fused_kernel_supports(*chosen[:4])
        if fast:
            multi_tensor.adam_update_multi_tensor_(
                *chosen, divisor=divisor, found_inf=skip.to(torch.float32), **hyperparameters
            )
        else:
            adam_step_(*chosen, skip=skip, k=k, **hyperparameters)


def _fresh_state(p: Tensor) -> dict[str, Tensor]:
    return {
        "step": torch.zeros((), dtype=torch.float32, device=p.to_local().device),
        "exp_avg": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
    }


def _process_group(params: list[Tensor], grads: list[Tensor]) -> dist.ProcessGroup:
    """The one process group every parameter is sharded over; refuse anything else, naming it."""
    from torch.distributed.tensor import DTensor

    mesh = None
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        for what, t in (("parameter", p), ("gradient", g)):
            if not isinstance(t, DTensor):
                raise ValueError(
                    f"{what} {i} (shape {tuple(t.shape)}) is a plain tensor among DTensor parameters: its "
                    "gradient would be counted once per rank in the global norm; shard every parameter of the "
                    "optimizer with fully_shard (apply it to the root module too), or use separate optimizers"
                )
            if t.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in t.placements):
                raise ValueError(
                    f"{what} {i} is a DTensor on a {t.device_mesh.ndim}-d mesh with placements {t.placements}: "
                    "the sharded step takes FSDP2's layout (Shard on a 1-d mesh); HSDP and tensor parallelism "
                    "are not supported"
                )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"parameter {i} is sharded over another device mesh than parameter 0; use one mesh")
    assert mesh is not None  # groups are never empty: the optimizer gathers only parameters with a gradient
    return mesh.get_group()


def _indices(groups: Sequence[ShardedGroup], group_index: int) -> range:
    start = sum(len(g.params) for g in groups[:group_index])
    return range(start, start + len(groups[group_index].params))


def _poison(loss: Tensor | float | None, found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    """This rank's reason to skip besides its gradients: a non-finite loss or GradScaler's overflow."""
    flags = []
    if isinstance(loss, Tensor):
        flags.append(~torch.isfinite(loss.detach()).all().to(device))
    elif loss is not None:  # a Python number is on the host already: no synchronisation
        flags.append(torch.full((), not math.isfinite(loss), dtype=torch.bool, device=device))
    if found_inf is not None:
        flags.append(found_inf.to(device) > 0)
    if not flags:
        return None
    return torch.stack(flags).any()


def _needs_theta(hyperparameters: Mapping[str, Any], clip_value: float | None) -> bool:
    """The overflow bound of provetrain.Adam reads max |theta| for L2 decay, and needs a bound without a clip."""
    l2 = 0.0 if hyperparameters["decoupled_weight_decay"] else hyperparameters["weight_decay"]
    return clip_value is None or l2 != 0


def _max_abs(local: list[Tensor], device: torch.device) -> Tensor:
    """max |theta| over local shards (0 when they are all empty), float64."""
    nonempty = [t for t in local if t.numel()]
    if not nonempty:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(torch._foreach_norm(nonempty, math.inf)).amax().to(device, torch.float64)


def _overflows(group: ShardedGroup, total_norm: Tensor, clip_value: float | None, theta: Tensor) -> Tensor:
    r"""provetrain.Adam's overflow bound with the global :math:`\max|\theta|`: the gradient Adam uses is at
    most :math:`\min(N, c)(1 + 2^{-20}) + \lambda\max|\theta|`; at or above :func:`moment_limit` its square
    could overflow the second moment, and the step is skipped."""
    h = group.hyperparameters
    l2 = 0.0 if h["decoupled_weight_decay"] else h["weight_decay"]
    bound = total_norm if clip_value is None else torch.clamp(total_norm, max=clip_value)
    bound = bound * (1 + 2**-20) + l2 * theta
    return bound > min(moment_limit(p.dtype) for p in group.params)


def _raise_on_every_rank(
    local_grads: list[Tensor], loss: Tensor | float | None, total_norm: Tensor, group: dist.ProcessGroup
) -> None:
    """Every rank raises the same ContractViolation, naming the ranks with a non-finite loss or shard."""
    mine = {
        "nonfinite_gradient_values": sum(int((~torch.isfinite(g)).sum()) for g in local_grads),
        "loss_nonfinite": loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()),
    }
    everyone: list[Any] = [None] * dist.get_world_size(group)
    with failing_peers_stop("gathering which ranks hold non-finite values"):
        dist.all_gather_object(everyone, mine, group=group)
    observed = {
        "nonfinite_by_rank": {
            r: v["nonfinite_gradient_values"] for r, v in enumerate(everyone) if v["nonfinite_gradient_values"]
        },
        "loss_nonfinite_ranks": [r for r, v in enumerate(everyone) if v["loss_nonfinite"]],
        "grad_norm": float(total_norm),
    }
    untouched = "Nothing was updated on any rank: shards, moments and step counts are as before this step."
    if observed["loss_nonfinite_ranks"]:
        equation, clause, kind = "loss_decrease", "loss.is_finite()", "postcondition"
    else:
        equation, clause, kind = "gradient_norm", "gradients.iter().all(|g| g.is_finite())", "precondition"
    raise ContractViolation(
        equation,
        clause,
        kind=kind,
        observed=observed,
        hint=f"{untouched} Check those ranks' batches and lower the learning rate, or construct with "
        "on_nonfinite='skip'. (With every value finite, the update would overflow Adam's second moment: set "
        "a clip_value.)",
    )
