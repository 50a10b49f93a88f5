r"""Training on several processes with ``torch.distributed``: data-parallel (DDP) runs of the Trainer.

torch.distributed is the engine: gradients are averaged by ``DistributedDataParallel``, everything else
by its collectives; nothing here reduces by hand. What this module adds is the rule that keeps a
contract-governed run consistent across ranks: **every decision is taken on values that are identical on
every rank.**

A step under DDP, on each of the ``W`` ranks (rank ``r`` holds ``n_r`` of the global batch's ``B`` examples,
a contiguous share: :meth:`World.shard`):

1. forward on the share, ``loss_r`` its mean loss; ``backward`` of ``loss_r * W n_r / B`` (exactly
   ``loss_r`` when the shares are equal). DDP's all-reduce averages the gradients, so every rank then holds
   :math:`\sum_r (n_r / B)\, \nabla loss_r`, the gradient of the global batch's mean loss (for a loss that
   is a mean over examples), the same bits on every rank;
2. :meth:`World.mean_loss`: the global mean loss :math:`\sum_r (n_r / B)\, loss_r` in float64, gathered from
   every rank and summed in rank order, so it is the same bits on every rank. A sum is non-finite exactly
   when one of its terms is (NaN absorbs everything, ``inf + finite = inf``, ``inf - inf = NaN``; float32
   losses cannot overflow a float64 sum), so this one collective carries both the logged loss and the
   non-finite-loss decision: a NaN loss on one rank makes the loss NaN on all of them;
3. ``optimizer.step(loss=...)`` with that loss: the global-norm clip runs on the full averaged gradient
   (each rank already holds all of it: the norm is **not** reduced again, which would count it ``W``
   times), and the finite guard decides on the device, with no host read, from the same gradient and the
   same loss on every rank.

Guarantees (W processes, DDP):
    * The skip decision, the clip coefficient and the update are identical on every rank, so parameters
      and optimizer state stay bit-for-bit equal across ranks, also when only one rank sees a NaN (in its
      forward, its loss or its gradient). The policies (skip budget, rollback, raise, loss-trend monitor)
      read the same values on every rank and take the same action on every rank.
    * The run equals the single-process run of the same config up to the order of float summation: same
      global batches, same mean gradient, same global-norm clip.
    * Outputs and checkpoints are written by rank 0 only (the writers are atomic); the other ranks write
      nothing. :meth:`World.run_on_main` makes the other ranks wait for each write and raise rank 0's error
      if it failed, so no rank runs ahead of a checkpoint or an output directory that does not exist.

:func:`clip_grad_norm_distributed_` clips a gradient that is *sharded* (each rank holds a disjoint part,
as FSDP2 holds it): the float64 sums of squares of the parts are gathered and combined, then
:func:`~provetrain.ops.clip.clip_coefficient` and :func:`~provetrain.ops.clip.scale_gradient` apply, with
the proven bound of :mod:`provetrain.ops.clip`.

With ``strategy: fsdp`` (:func:`shard_fully_`) the model is sharded by FSDP2 instead of wrapped in DDP:
parameters, gradients and Adam state are DTensor shards, the guarded Adam step is
:mod:`provetrain.ops.sharded` (one collective for the global norm and the skip decision), and checkpoints
are :mod:`provetrain.train.sharded_checkpoint`'s, written by every rank. A collective that fails because a
peer died or froze past the timeout raises :class:`PeerFailureError` saying what was being done.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from provetrain.errors import ConfigError, ContractViolation
from provetrain.ops.clip import (
    CLAUSE_FINITE,
    EQUATION,
    _mul_pow2,
    clip_coefficient,
    clip_grads_,
    scaled_sum_of_squares,
)

__all__ = [
    "PeerFailureError",
    "World",
    "clip_grad_norm_distributed_",
    "failing_peers_stop",
    "gradient_sync",
    "scaled_sum_of_squares_across_ranks",
    "shard_fully_",
    "sums_and_maxima_across_ranks",
    "torchrun_process_group",
]

T = TypeVar("T")

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
"""Environment variables torchrun sets in every process it starts."""

# Barrier work objects kept until the interpreter exits (see _barrier).
_KEPT_UNTIL_EXIT: list[Any] = []

# The lowest exponent scaled_sum_of_squares returns: a rank whose gradients are all zero reports it, so
# that its exponent never sets the common scale.
_NO_EXPONENT = -1073


@dataclass(frozen=True)
class World:
    """The processes of a run: this process's ``rank`` among ``size`` (``size == 1``: no distribution).

    Attributes:
        rank: this process's rank in ``group``.
        size: the number of processes; every method is a plain local operation when it is 1.
        group: the process group, ``None`` for the default (world) group.
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @classmethod
    def current(cls) -> World:
        """The default process group when torch.distributed is initialised with more than one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs and checkpoints and prints."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """``cuda`` becomes this process's current CUDA device (torchrun: ``cuda:LOCAL_RANK``)."""
        if self.size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def check_batches(self, examples: int, batch_size: int) -> None:
        """Every global batch, the last of each epoch included, must give each rank at least one example."""
        if self.size == 1:
            return
        last = examples % batch_size
        if batch_size < self.size or 0 < last < self.size:
            smallest = batch_size if batch_size < self.size else last
            raise ConfigError(
                f"batch_size={batch_size} with {examples} training examples makes a global batch of "
                f"{smallest} examples, fewer than the {self.size} processes that share it; use a batch_size "
                f">= {self.size} for which {examples} % batch_size is 0 or >= {self.size}",
                key="batch_size",
            )

    def shard(self, indices: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch (shares differ in size by at most one)."""
        return torch.tensor_split(indices, self.size)[self.rank]

    def wrap(
        self, model: nn.Module, device: torch.device, *, strategy: str = "ddp", precision: str = "fp32"
    ) -> nn.Module:
        """The module the training forward runs through: ``model`` itself, DDP around it, or ``model``
        sharded in place by FSDP2 (``strategy="fsdp"``, :func:`shard_fully_`).

        DDP copies rank 0's parameters and buffers to every rank and averages the gradients in every
        backward. FSDP2 replaces the parameters with DTensor shards: build the optimizer after wrapping.
        """
        if strategy == "fsdp" and self.size > 1:
            return shard_fully_(model, device, precision=precision, group=self.group)
        _refuse_sharded_parameters(model)
        if isinstance(model, DistributedDataParallel):
            raise TypeError(
                "model is already a DistributedDataParallel; pass the plain module (model.module): the Trainer "
                "wraps it itself when torch.distributed is initialised"
            )
        if self.size == 1:
            return model
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, process_group=self.group
        )

    def mean_loss(self, loss: Tensor, *, share: float) -> Tensor:
        """The global batch's mean loss from this rank's mean ``loss`` over its ``share`` of the examples.

        Returns ``loss`` itself in one process. Otherwise a 0-d float64 tensor, the same bits on every rank,
        non-finite on every rank when the loss of any rank is (module docstring, step 2). No host read.
        """
        if self.size == 1:
            return loss
        return _gather_rows(loss.detach().reshape(1).to(torch.float64) * share, self.group).sum()

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0; every rank returns its result, or raises its error, once it has finished.

        The broadcast of the outcome is also the barrier that keeps the other ranks from running ahead of
        what rank 0 writes. ``fn``'s result must be picklable.
        """
        if self.size == 1:
            return fn()
        outcome: list[Any] = [None, None]
        failure: Exception | None = None
        if self.is_main:
            try:
                outcome[0] = fn()
            except Exception as error:
                failure = error
                outcome[1] = _portable(error)
        dist.broadcast_object_list(outcome, src=self._main_global_rank(), group=self.group)
        if failure is not None:
            raise failure  # rank 0 raises the original, with its traceback
        if outcome[1] is not None:
            raise _rebuilt(outcome[1])
        return outcome[0]

    def set_collective_timeout(self, minutes: float) -> None:
        """Let every collective of this group wait at most ``minutes`` for a peer; past that it raises, so a
        frozen or dead rank ends the run on every process still alive (gloo's default is 30 minutes, NCCL's
        10). Sets the group's default timeout, a group the user started included."""
        if self.size > 1:
            # torch has no public setter for a started group; this one is what init_process_group's timeout sets.
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(timedelta(minutes=minutes), self.group)

    def check_strategy(self, config: Any) -> None:
        """Refuse, before anything runs, what the Trainer does not do under ``strategy: fsdp`` (located at the
        key in the config's file, when it came from one)."""
        from provetrain.train.config import config_error  # config imports nothing of this module's

        if config.strategy != "fsdp" or self.size == 1:
            return
        refused = {
            "lr_max": (config.lr_max == "auto", "lr_max: auto runs forwards on rank 0 alone, which FSDP2 cannot"),
            "precision": (config.precision == "fp16-amp", "fp16-amp's GradScaler does not take FSDP2's shards"),
            "optimizer": (
                config.optimizer == "sgd",
                "provetrain.SGD has no sharded step: its clip norm would be one rank's shard's",
            ),
        }
        for key, (bad, why) in refused.items():
            if bad:
                raise config_error(
                    config,
                    f"{key}={getattr(config, key)!r} is not supported with strategy: fsdp ({why})",
                    key=key,
                    expected="strategy: ddp, or another value of it",
                )
        missing = [name for name in _FSDP_MODULES if importlib.util.find_spec(name) is None]
        if missing:  # FSDP2 and DCP's safetensors storage are recent parts of torch
            raise config_error(
                config,
                f"strategy: fsdp needs {' and '.join(missing)}, which this torch ({torch.__version__}) lacks",
                key="strategy",
                expected="strategy: ddp, or a torch release that has FSDP2 and DCP's hf_storage",
            )

    def barrier(self) -> None:
        """Wait until every rank is here (nothing in one process)."""
        if self.size > 1:
            _barrier(self.group)

    def _main_global_rank(self) -> int:
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)


# What strategy: fsdp imports: FSDP2's fully_shard and DCP's safetensors storage (no pickle in checkpoints).
_FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed.checkpoint.hf_storage")


def _barrier(group: dist.ProcessGroup | None) -> None:
    """``dist.barrier``, with its work object kept alive until the interpreter exits.

    With torch 2.13 and gloo, DDP keeps the process group, and so gloo's worker threads, alive until
    interpreter shutdown; a worker thread that then frees the last reference to a finished collective whose
    tensors Python created needs the GIL and aborts the process ("terminate called without an active
    exception"; 4 of 30 two-process ``provetrain train`` runs under torchrun, the rank that finished first).
    A barrier holds on to the collectives still in flight when it starts; kept here, all of them are freed
    by the main thread (0 of 80 runs).
    """
    work = dist.barrier(group=group, async_op=True)
    work.wait()
    _KEPT_UNTIL_EXIT.append(work)


def _gather_rows(row: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's ``row`` (a 1-d tensor of the same size everywhere), stacked in rank order.

    The result is the same on every rank, so a reduction over it (``.sum()``) is the same bits on every
    rank and from run to run, whichever algorithm the backend uses. No host read.
    """
    world = dist.get_world_size(group)
    rows = torch.empty(world * row.numel(), dtype=row.dtype, device=row.device)
    dist.all_gather_single(rows, row.contiguous(), group=group)
    return rows.view(world, row.numel())


# ------------------------------------------------------------------------------------ sharded gradients
def scaled_sum_of_squares_across_ranks(
    grads: Sequence[Tensor], *, group: dist.ProcessGroup | None = None, poison: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""``(s, e)`` with :math:`s\,4^e = \sum g_i^2` over the gradient parts held by all ranks of ``group``.

    Each rank passes its own parts (plain tensors, or DTensors sharded over ``group``, of which the local
    shard is used). Each rank's :func:`~provetrain.ops.clip.scaled_sum_of_squares` ``(s_r, e_r)`` is
    gathered and combined as :math:`s = \sum_r s_r 4^{e_r - e}`, :math:`e = \max_r e_r` over the ranks whose
    parts are not all zero, summed in rank order.

    Args:
        grads: this rank's parts, at least one (a part may have no elements).
        group: the process group; ``None`` for the default group.
        poison: an optional 0-d bool tensor; where it holds on any rank, ``s`` is NaN on every rank. This
            carries a rank-local fact (a non-finite loss, a GradScaler overflow) in the same collective, so
            that the decision taken on ``s`` is the same on every rank.

    Returns:
        0-d float64 ``s`` and int64 ``e``, the same bits on every rank. One collective, no host read.

    Guarantees:
        Without float64 gradients every ``e_r`` is 0 and ``s`` is a float64 sum of the exact squares in some
        order: the bound of :mod:`provetrain.ops.clip`'s *Proof*, step 1, holds as for one process. With
        float64 gradients, the scaling by :math:`4^{e_r - e}` is exact down to ``2^-1022`` and adds at most
        one absolute ``2^-1074`` per rank below it; as the rank attaining ``e`` has ``s_r >= 1/4``, that is a
        relative ``W 2^-1072``, inside the ``n 2^-1070`` slack that step already allows (if that rank holds
        no float64 part, ``s_r >= 2^-298`` and the relative ``W 2^-776`` is still far inside the margin of
        step 2). ``s`` is non-finite on every rank iff some part on some rank is, or ``poison`` holds.
    """
    s, e, _ = sums_and_maxima_across_ranks(grads, group=group, poison=poison)
    return s, e


def sums_and_maxima_across_ranks(
    grads: Sequence[Tensor],
    *,
    group: dist.ProcessGroup | None = None,
    poison: Tensor | None = None,
    maxima: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`scaled_sum_of_squares_across_ranks`, plus the across-ranks maximum of each entry of ``maxima``
    (a 1-d float64 tensor, the same length on every rank), in the same single collective."""
    if not grads:
        raise ValueError("grads is empty; each rank passes at least one tensor (possibly with no elements)")
    s, e = scaled_sum_of_squares([_local_part(g) for g in grads])
    if poison is not None:
        s = torch.where(poison.to(s.device), math.nan, s)
    e = torch.where(s == 0, _NO_EXPONENT, e)
    columns = [s, e.to(torch.float64)]
    extra = 0 if maxima is None else maxima.numel()
    row = torch.stack(columns) if not extra else torch.cat([torch.stack(columns), maxima.to(s.device, torch.float64)])
    rows = _gather_rows(row, group)
    sums, exponents = rows[:, 0], rows[:, 1].to(torch.int64)
    exponent = exponents.amax()
    # Below 4^-1022 a partial sum (< 2^40) is 0 in float64 either way; the clamp keeps _mul_pow2 in its range.
    shifts = (2 * (exponents - exponent)).clamp(min=-2044)
    total = _mul_pow2(sums, shifts).sum()
    global_maxima = rows[:, 2:].amax(dim=0) if extra else None
    return total, torch.where(total == 0, 0, exponent), global_maxima


def clip_grad_norm_distributed_(
    grads: Sequence[Tensor], max_norm: float, *, group: dist.ProcessGroup | None = None
) -> Tensor:
    r"""Clip a gradient sharded across the ranks of ``group`` to the global 2-norm ``max_norm``, in place.

    Each rank passes the parts it holds: plain tensors (disjoint slices of one gradient) or DTensors sharded
    over ``group``, such as FSDP2's (``fully_shard``) parameter gradients. Every rank computes the same
    coefficient ``k`` from the global sum of squares (:func:`scaled_sum_of_squares_across_ranks`, the
    global element count and the dtypes of all ranks) and scales its parts with
    :func:`~provetrain.ops.clip.scale_gradient`: the clip of :func:`provetrain.ops.clip.clip_grad_norm_`
    applied to the concatenation of all parts.

    Args:
        grads: this rank's gradient parts (float16 / bfloat16 / float32 / float64, dense), one or more.
        max_norm: the clip value, in ``(0, inf]`` (contract clause ``clip_value > 0.0``).
        group: the process group the gradient is sharded over; ``None`` for the default group.

    Returns:
        The global norm before clipping, a 0-d float64 tensor, the same on every rank.

    Raises:
        ContractViolation: ``gradients.iter().all(|g| g.is_finite())``, on every rank, naming the ranks
            whose parts are non-finite; ``clip_value > 0.0`` for a bad ``max_norm``. No part is changed.
        ValueError: a DTensor that is not sharded over ``group`` (replicated parts would be counted twice).

    Guarantees:
        Those of :func:`~provetrain.ops.clip.clip_grad_norm_` for the concatenated gradient: the clipped
        parts' global norm is ``<= max_norm`` exactly, and they are bit-for-bit unchanged when no clip is
        needed. Compared with ``clip_grad_norm_`` on the concatenation in one process, only the summation
        order of the float64 sum of squares differs, so ``k`` may differ in its last bits and a clipped value
        by one rounding of its dtype. Besides its two collectives (the sums, and the element counts and
        dtypes) it reads two flags on the host in one transfer, as ``clip_grad_norm_`` does.
    """
    local = [_local_part(g) for g in grads]
    sum_sq, exponent = scaled_sum_of_squares_across_ranks(grads, group=group)
    counts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, (sum(g.numel() for g in local), sorted({str(g.dtype) for g in local})), group)
    dtypes = {getattr(torch, name.removeprefix("torch.")) for _, names in counts for name in names}
    total_norm, k = clip_coefficient(
        sum_sq, max_norm, numel=sum(n for n, _ in counts), dtypes=dtypes, exponent=exponent
    )
    # The one host read: sum_sq is finite iff every part on every rank is, and it is the same on every rank.
    finite, clip = torch.stack([torch.isfinite(sum_sq), k != 1.0]).tolist()
    if not finite:
        _raise_nonfinite_parts(local, group)
    if clip:
        clip_grads_(local, k)
    return total_norm


def _local_part(grad: Tensor) -> Tensor:
    """A plain tensor as it is; a DTensor's local shard (a view: clipping it clips the DTensor)."""
    if not _is_dtensor(grad):
        return grad
    if not all(placement.is_shard() for placement in grad.placements):  # type: ignore[attr-defined]
        raise ValueError(
            f"a DTensor gradient with placements {grad.placements} is not sharded on every mesh dimension: "  # type: ignore[attr-defined]
            "its replicated or partial values would be counted more than once; pass gradients that are "
            "Shard-placed over the group (FSDP2's are), or reduce them first"
        )
    return grad.to_local()  # type: ignore[attr-defined]


def _raise_nonfinite_parts(local: Sequence[Tensor], group: dist.ProcessGroup | None) -> None:
    """Every rank raises the same error, naming the ranks whose parts hold NaN or Inf (error path only)."""
    mine = sum(int((~torch.isfinite(g)).sum()) for g in local)
    counts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(counts, mine, group)
    bad = {rank: count for rank, count in enumerate(counts) if count}
    raise ContractViolation(
        EQUATION,
        CLAUSE_FINITE,
        kind="precondition",
        observed={"nonfinite_by_rank": bad},
        hint="no gradient part was changed on any rank; look for an overflowing loss or activation on "
        "those ranks, lower the learning rate, or skip the step",
    )


def _is_dtensor(value: object) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def shard_fully_(
    model: nn.Module, device: torch.device, *, precision: str = "fp32", group: dist.ProcessGroup | None = None
) -> nn.Module:
    """FSDP2 on ``model``, in place: ``fully_shard`` on every block (each child of a ``ModuleList``, as a
    transformer's layers), then on the root; each parameter becomes a DTensor ``Shard(0)`` over ``group``.

    With ``precision="bf16-autocast"`` the policy is ``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)``: the unsharded parameters of the forward and backward are bfloat16, the
    gradients are reduced in float32 and the shards, the Adam state and the update stay float32. Every
    rank starts from rank 0's parameters and buffers (broadcast first, as DDP does). A model that already
    holds DTensor parameters (sharded by the caller) is returned as it is.
    """
    if any(_is_dtensor(p) for p in model.parameters()):
        return model
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16-amp":
        raise ConfigError("precision='fp16-amp' is not supported with strategy: fsdp", key="precision")
    mesh = (
        init_device_mesh(device.type, (dist.get_world_size(),))
        if group is None
        else DeviceMesh.from_group(group, device.type)
    )
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == "bf16-autocast"
        else MixedPrecisionPolicy()
    )
    # As DDP does: every rank starts from rank 0's parameters and buffers (fully_shard keeps each rank's).
    source = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=source, group=group)
    blocks = [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextmanager
def gradient_sync(module: nn.Module, *, enabled: bool) -> Iterator[None]:
    """Whether a backward run inside reduces the gradients across ranks (``enabled``), or only accumulates
    them locally, as the inner micro-steps of gradient accumulation should (one reduction per optimizer
    step instead of one per micro-step; the sum of the local gradients is reduced once, so the result is
    the same up to summation order).

    DDP: its ``no_sync()`` when not ``enabled``. FSDP2 (``fully_shard``): ``set_requires_gradient_sync(False)``
    on the module and its sharded blocks for the backward, ``True`` again after (the unsharded gradients
    are kept, and reduce-scattered by the first synchronising backward). Anything else: nothing to do.
    """
    if enabled or not dist.is_available():
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def _refuse_sharded_parameters(model: nn.Module) -> None:
    sharded = next((name for name, p in model.named_parameters() if _is_dtensor(p)), None)
    if sharded is not None:
        raise TypeError(
            f"parameter {sharded!r} is a DTensor (the model was sharded with fully_shard / FSDP2 or tensor "
            "parallelism) but the strategy is ddp: pass the unsharded model, or set strategy: fsdp (the "
            "Trainer then applies fully_shard itself)"
        )


# ------------------------------------------------------------------------------------ failures, launch
class PeerFailureError(RuntimeError):
    """A collective failed: another process of the run died, or froze past the collective timeout."""


@contextmanager
def failing_peers_stop(what: str) -> Iterator[None]:
    """Turn the backend's error from a collective inside the block into a :class:`PeerFailureError` that
    says what was being done, what it means and what to do (gloo reports a killed peer as a closed
    connection at once, a frozen one after the collective timeout)."""
    try:
        yield
    except RuntimeError as error:
        # gloo and NCCL raise plain RuntimeErrors (or torch's DistError); subclasses such as
        # ContractViolation are the library's own decisions and pass through.
        if not (type(error) is RuntimeError or isinstance(error, dist.DistError)):
            raise
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise PeerFailureError(
            f"{what} failed on rank {rank}: another process of the run stopped answering (it exited, was "
            "killed, or froze for longer than the collective timeout, config key collective_timeout_minutes); "
            f"this process stops too. Backend error: {error}. Restart the run from its last complete checkpoint."
        ) from error


def _portable(error: Exception) -> tuple[str, Any]:
    """``error`` in a form that survives pickling to the other ranks."""
    if isinstance(error, ContractViolation):  # its constructor takes keywords, which unpickling does not pass
        fields = ("equation", "clause", "kind", "step", "observed", "hint")
        return "contract", {name: getattr(error, name) for name in fields}
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return "error", RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
    return "error", error


def _rebuilt(portable: tuple[str, Any]) -> Exception:
    kind, value = portable
    if kind == "contract":
        equation, clause = value.pop("equation"), value.pop("clause")
        return ContractViolation(equation, clause, **value)
    return value


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets its variables)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


@contextmanager
def torchrun_process_group(device: str, *, timeout_minutes: float = 10.0) -> Iterator[int]:
    """Under torchrun with more than one process, the default process group for the run; yields the rank.

    The backend is NCCL when the run uses CUDA (``device`` ``"cuda"``, or ``"auto"`` with CUDA present),
    with ``cuda:LOCAL_RANK`` as this process's device, and gloo otherwise. The group is destroyed on exit,
    after a barrier when the body succeeded; after an error it is destroyed only with gloo, since a NCCL
    teardown can block while other ranks are still inside a collective. A collective waits at most
    ``timeout_minutes`` for a peer, then raises on every process still alive. Outside torchrun, with one process,
    or when a group is already initialised (it is then left alone), nothing is set up and the current rank
    (0 without a group) is yielded.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if initialised or not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield dist.get_rank() if initialised else 0
        return
    if not dist.is_available():
        raise RuntimeError("started by torchrun, but this torch build has no torch.distributed")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    try:
        yield dist.get_rank()
    except BaseException:
        if not cuda:
            dist.destroy_process_group()
        raise
    _barrier(None)  # every rank is done: no collective is in flight when the group goes
    dist.destroy_process_group()
