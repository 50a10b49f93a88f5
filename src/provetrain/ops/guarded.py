r"""What every provetrain optimizer shares: one global-norm clip, one finite guard, one skip, counted.

A guarded optimizer's :meth:`GuardedOptimizer.step`, for the gradients :math:`g` of every parameter that has
one (all groups together):

.. math::
    S = \sum_i g_i^2 \quad\text{(float64, scaled)}, \qquad
    \text{skip} = \lnot\operatorname{isfinite}(S) \lor \lnot\operatorname{isfinite}(\text{loss})
        \lor \text{an observed micro-step loss was non-finite} \lor \text{GradScaler's found\_inf}

then clips with :math:`k = \operatorname{clip\_coefficient}(S, c)` (:mod:`provetrain.ops.clip`) and hands
:math:`y = g k` to the subclass's update, which leaves every parameter and state tensor bit for bit unchanged
where ``skip`` holds. The subclass supplies the update (Adam's moments, SGD's momentum) and its state; this
module supplies the gathering of gradients, the guard, the raise or skip policy (``on_nonfinite``), steps
without gradients (``on_empty``), :meth:`GuardedOptimizer.observe_loss`, the counters and their place in
state dicts.

Guarantees (for every subclass):
    * A skipped step changes no parameter and no optimizer state (the subclass computes out of place and
      keeps the old bits by ``torch.where``), and counts once in ``skipped_steps``.
    * With ``on_nonfinite="skip"`` the guard itself makes no host-device synchronisation: the flag, the
      clip coefficient and the counters stay on the device.
    * The clipped gradient's norm obeys ``grad_norm <= clip_value`` (contract clause ``gradient_norm``),
      reported as ``last_clipped_grad_norm``; without clipping :math:`y = g` bit for bit.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from provetrain.errors import ArgumentViolation, ContractViolation
from provetrain.ops.clip import _mul_pow2, clip_coefficient, first_nonfinite_gradient, scaled_sum_of_squares
from provetrain.ops.multi_tensor import device_constant

__all__ = ["GroupBatch", "GuardedOptimizer", "OnEmpty", "OnNonfinite"]

OnNonfinite = Literal["skip", "raise"]
OnEmpty = Literal["raise", "skip"]

GRADIENTS_FINITE = "gradients.iter().all(|g| g.is_finite())"
# Where state_dict() keeps the counters; torch.optim ignores keys it does not know.
COUNTERS_KEY = "provetrain"
# The attributes a guarded optimizer adds to torch's, pickled with it.
_GUARD_ATTRIBUTES = ("clip_value", "on_nonfinite", "on_empty", "_counters", "_empty_steps", "_observed_nonfinite")


@dataclass
class GroupBatch:
    """The parameters of one group that have a gradient this step, in group order."""

    group_index: int
    group: dict[str, Any]
    positions: list[int] = field(default_factory=list)
    # The parameters as the group holds them: the keys of Optimizer.state.
    keys: list[Tensor] = field(default_factory=list)
    # What the step works on: the parameters and their gradients, a complex one as its real view
    # (torch.view_as_real, as torch.optim does): a complex gradient's norm is the norm of its real view.
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)


class GuardedOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose :meth:`step` clips, guards and counts; subclasses update.

    Subclasses call :meth:`_init_guard` before ``Optimizer.__init__`` and :meth:`_init_counters` after it
    (or :meth:`_init_params`, which does both around it), and implement :meth:`_step_batches` (or, for a
    single reference path, :meth:`_update_reference`), :meth:`_attach_state` and :meth:`_current_step`.

    Counters, 0-d tensors on the device of the first parameter, saved by :meth:`state_dict`:

    * ``skipped_steps`` (int64): steps skipped for a non-finite loss or gradient.
    * ``last_grad_norm`` (float64): the global gradient norm of the last step, before clipping.
    * ``last_clipped_grad_norm`` (float64): the norm of the clipped gradient the last step used (NaN when
      it was skipped). A step without any gradient (``on_empty="skip"``) leaves both norms as they were.
    * ``empty_steps`` (int64, on the CPU): steps without any gradient under ``on_empty="skip"`` (one whose
      loss or observed micro-step loss is non-finite counts in ``skipped_steps`` too).
    """

    # torch.amp.GradScaler hands these optimizers its scale and inf flag (grad_scale, found_inf) instead of
    # unscaling the gradients itself and reading found_inf on the host.
    _step_supports_amp_scaling = True
    _batch_type: ClassVar[type[GroupBatch]] = GroupBatch
    # How messages name the optimizer ("Adam", "SGD") and what to use for sparse gradients.
    _algorithm: ClassVar[str] = "this optimizer"
    _sparse_alternative: ClassVar[str] = "a dense gradient"
    # What a refused step leaves alone, and the hint for a skip that no non-finite input explains (a
    # subclass's own overflow check; "{untouched}" is replaced by the first).
    _untouched: ClassVar[str] = "Nothing was updated: parameters and optimizer state are as before this step."
    _overflow_hint: ClassVar[str] = "The update would overflow the parameters' dtype. {untouched}"

    clip_value: float | None
    on_nonfinite: OnNonfinite
    on_empty: OnEmpty

    # -- construction -----------------------------------------------------------------------------

    def _init_guard(self, clip_value: float | None, on_nonfinite: object, on_empty: object) -> None:
        """Check and set the policies (before ``Optimizer.__init__``: torch's hyper-parameter order)."""
        self.clip_value = check_clip_value(clip_value)
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.on_empty = check_on_empty(on_empty)

    def _init_params(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        """``Optimizer.__init__`` with provetrain's checks on ``params``, then the counters."""
        if isinstance(params, Tensor):
            raise TypeError(
                "params must be an iterable of tensors, (name, tensor) pairs or parameter-group dicts, "
                "got a single tensor; pass [tensor] or model.parameters()."
            )
        params = list(params)
        if not params:
            raise_no_params()
        Optimizer.__init__(self, params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            raise_no_params()
        self._counters = fresh_counters(first.device)
        # Steps without any gradient (on_empty="skip"): a host fact, so a CPU count, read without a sync.
        self._empty_steps = torch.zeros((), dtype=torch.int64)
        # observe_loss(): a 0-d bool device tensor, "a micro-step loss since the last step was non-finite"
        self._observed_nonfinite: Tensor | None = None

    # -- counters ---------------------------------------------------------------------------------

    @property
    def skipped_steps(self) -> Tensor:
        """Steps skipped for a non-finite loss or gradient: 0-d int64 tensor (reading it may synchronise)."""
        return self._counters["skipped_steps"]

    @property
    def empty_steps(self) -> Tensor:
        """Steps taken with no gradient at all under ``on_empty="skip"``: 0-d int64 CPU tensor (no sync)."""
        return self._empty_steps

    @property
    def last_grad_norm(self) -> Tensor:
        """Global gradient norm of the last step, before clipping: 0-d float64 tensor."""
        return self._counters["last_grad_norm"]

    @property
    def last_clipped_grad_norm(self) -> Tensor:
        """Norm of the clipped gradient the last step used (NaN if it was skipped): 0-d float64 tensor."""
        return self._counters["last_clipped_grad_norm"]

    # -- the step ---------------------------------------------------------------------------------

    def observe_loss(self, loss: Tensor | float) -> None:
        """Hand the optimizer one gradient-accumulation micro-step's loss, for the next :meth:`step`'s guard.

        ``step(loss=...)`` sees one loss; under accumulation an earlier micro-step's loss can be NaN while
        every gradient stays finite (a NaN that the loss scaling or a masked term hid from backward). Call
        this after each micro-step's forward pass: it ORs "this loss is non-finite" into a 0-d bool flag on
        the device, **without a host read**, and the next :meth:`step` treats a set flag exactly as a
        non-finite ``step(loss=...)``: the step is skipped and counted once in ``skipped_steps`` (or, with
        ``on_nonfinite="raise"``, :class:`~provetrain.errors.ContractViolation` ``loss.is_finite()`` names
        an observed micro-step loss). Every :meth:`step` consumes the flag (it starts clear again).

        :meth:`zero_grad` does not clear it: the flag covers the accumulated step, whose micro-steps may
        call ``zero_grad`` only before the first of them, or (in some loops) around each; only the step
        that would apply the accumulated gradient decides on it.

        Args:
            loss: the micro-step's loss, a tensor (any shape; every element is checked) or a Python number.

        Example:
            >>> from provetrain import Adam
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = Adam(model.parameters(), clip_value=1.0)
            >>> for x in torch.ones(4, 2, 3):  # 4 micro-steps, one optimizer step
            ...     loss = model(x).sum() / 4
            ...     opt.observe_loss(loss)
            ...     loss.backward()
            >>> opt.step()
            >>> int(opt.skipped_steps)
            0
        """
        if not isinstance(loss, Tensor) and not is_real(loss):
            raise TypeError(f"observe_loss(loss={loss!r}): loss must be a tensor or a real number")
        flag = loss_nonfinite_flag(loss, self._counters["skipped_steps"].device)
        seen = self._observed_nonfinite
        self._observed_nonfinite = flag if seen is None else seen | flag

    def _take_observed(self) -> Tensor | None:
        """The flag of :meth:`observe_loss` since the last step, cleared: every step consumes it."""
        observed, self._observed_nonfinite = self._observed_nonfinite, None
        return observed

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None
    ) -> Any:
        """Clip, guard and take one step; return the closure's loss (or ``loss``), like torch.

        Args:
            closure: re-evaluates the model and returns the loss (optional, as in ``torch.optim``).
            loss: this step's loss, checked for finiteness with the gradients (not with ``closure``).

        Raises:
            ContractViolation: ``!gradients.is_empty()`` when no parameter has a gradient (unless
                ``on_empty="skip"``); with ``on_nonfinite="raise"``, ``loss.is_finite()`` or
                ``gradients.iter().all(|g| g.is_finite())`` when the loss, an observed micro-step loss or a
                gradient is non-finite (nothing is changed).
        """
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either closure or loss to step(), not both: the closure returns the loss")
            with torch.enable_grad():
                loss = closure()
        # Set by torch.amp.GradScaler.step() for optimizers with _step_supports_amp_scaling (and deleted after).
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        observed = self._take_observed()
        with torch.no_grad():
            batches = self._gather()
            if not batches:  # on_empty="skip": nothing to clip or update, as in torch.optim
                self._count_empty_step(loss, observed)
                return loss
            self._step_batches(batches, loss, grad_scale, found_inf, observed)
        return loss

    def _count_empty_step(self, loss: Tensor | float | None, observed: Tensor | None) -> None:
        """An empty step (``on_empty="skip"``) changes nothing and counts in ``empty_steps``. When its loss or an
        observed micro-step loss is non-finite it also counts in ``skipped_steps``, as any step skipped for a
        non-finite loss (on the device: no host read), or raises in ``on_nonfinite="raise"`` mode."""
        skipped = self._counters["skipped_steps"]
        flag = loss_nonfinite_flag(loss, skipped.device)
        if observed is not None:
            observed = observed.to(skipped.device, non_blocking=True)
            flag = observed if flag is None else flag | observed
        if flag is not None and self.on_nonfinite == "raise" and bool(flag):
            self._raise_nonfinite([], loss, None, observed)
        self._empty_steps.add_(1)
        if flag is not None:
            skipped.add_(flag)

    def _step_batches(
        self,
        batches: list[Any],
        loss: Tensor | float | None,
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
        observed: Tensor | None,
    ) -> None:
        """The step after gathering (under ``no_grad``): by default, unscale and take the reference path."""
        if grad_scale is not None:
            unscale_(batches, grad_scale)
        self._step_reference(batches, loss, None if found_inf is None else found_inf > 0, observed)

    def _gather(self) -> list[Any]:
        batches = []
        for group_index, group in enumerate(self.param_groups):
            batch = self._batch_type(group_index, group)
            for position, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(
                        f"{param_label(group, group_index, position)} has a sparse gradient, which "
                        f"{self._algorithm} does not support; use {self._sparse_alternative} for it."
                    )
                batch.positions.append(position)
                batch.keys.append(p)
                # real_view, inlined: this loop runs for every parameter at every step
                batch.params.append(torch.view_as_real(p) if p.is_complex() else p)
                batch.grads.append(torch.view_as_real(grad) if grad.is_complex() else grad)
            if batch.params:
                batches.append(batch)
        if not batches and self.on_empty == "raise":
            raise ContractViolation(
                "gradient_norm",
                "!gradients.is_empty()",
                observed={"parameters_with_grad": 0},
                hint="No parameter has a gradient: call loss.backward() before step(), or construct with "
                "on_empty='skip' to count such steps (empty_steps) and change nothing, as torch.optim does.",
            )
        return batches

    def _attach_state(self, batches: list[Any], step_dtype: torch.dtype) -> None:
        """Fetch (or create) each parameter's state into its batch; after the raise check."""
        raise NotImplementedError

    def _extra_skip_flag(self, batches: list[Any], total_norm: Tensor) -> Tensor | None:
        """A subclass's own reason to skip a finite step (Adam: an update that would overflow), or None."""
        return None

    def _guard(
        self,
        batches: list[Any],
        sum_sq: Tensor,
        total_norm: Tensor,
        loss: Tensor | float | None,
        found_inf: Tensor | None,
        observed: Tensor | None,
        *,
        step_dtype: torch.dtype,
    ) -> Tensor:
        """The device-side skip flag (non-finite loss, observed micro-step loss or gradient, GradScaler's
        overflow, or the subclass's own reason); raise mode reads it, then every parameter gets its state."""
        skip = skip_flag(sum_sq, loss, found_inf)
        if observed is not None:
            skip = skip | observed.to(skip.device, non_blocking=True)
        extra = self._extra_skip_flag(batches, total_norm)
        if extra is not None:
            skip = skip | extra
        # Host read of the device flag: the one synchronisation of raise mode; skip mode never reads it.
        if self.on_nonfinite == "raise" and bool(skip):
            self._raise_nonfinite(batches, loss, total_norm, observed)
        self._attach_state(batches, step_dtype)
        return skip

    def _reference_step_dtype(self) -> torch.dtype:
        """The dtype of a new step count on the reference path."""
        return torch.float32

    def _update_reference(self, batch: Any, skip: Tensor, k: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """One group's update on the reference path with clip coefficient ``k`` (``None``: no clip), kept
        where ``skip``; returns the scaled sum of squares ``(s, e)`` of the clipped gradient, or ``None``."""
        raise NotImplementedError

    def _step_reference(
        self,
        batches: list[Any],
        loss: Tensor | float | None,
        skip_scaled: Tensor | None = None,
        observed: Tensor | None = None,
    ) -> None:
        grads = [g for b in batches for g in b.grads]
        # Finite guard: S = s 4^e, and s is finite iff every gradient element is (any dtype).
        sum_sq, exponent = scaled_sum_of_squares(grads)
        # The exponent goes in as a device tensor: a Python int would be copied to the device, a sync.
        max_norm = math.inf if self.clip_value is None else self.clip_value  # inf: measure, never clip
        total_norm, k_clip = clip_coefficient(sum_sq, max_norm, exponent=exponent, **clip_metadata(grads))
        skip = self._guard(
            batches, sum_sq, total_norm, loss, skip_scaled, observed, step_dtype=self._reference_step_dtype()
        )
        k = None if self.clip_value is None else k_clip
        clipped_sums, clipped_exponents = [], []
        for b in batches:
            clipped = self._update_reference(b, skip, k)
            if clipped is not None:
                clipped_sums.append(clipped[0].to(sum_sq.device, non_blocking=True))
                clipped_exponents.append(clipped[1].to(sum_sq.device, non_blocking=True))
        clipped_norm = total_norm
        if k is not None:
            # In scaled form: a float64 clipped norm near 1e200 or 1e-200 is recorded, not inf or 0.
            from provetrain.ops.multi_tensor import combine_scaled_sums

            s, e = combine_scaled_sums(clipped_sums, clipped_exponents)
            clipped_norm = _mul_pow2(torch.sqrt(s), e)
        self._record(skip, total_norm, clipped_norm)

    def _record_on_host(self, skip: bool, total_norm: float, clipped_norm: float) -> None:
        """:meth:`_record` for values already on the host (CPU paths)."""
        counters = self._counters
        counters["skipped_steps"].add_(int(skip))
        counters["last_grad_norm"].fill_(total_norm)
        counters["last_clipped_grad_norm"].fill_(math.nan if skip else clipped_norm)

    def _counters_on(self, device: torch.device) -> dict[str, Tensor]:
        """The counters, moved to ``device`` first if they are elsewhere."""
        counters = self._counters
        if counters["skipped_steps"].device != device:
            # The model moved after the optimizer was built (as Hugging Face's Trainer does): the counters
            # follow it once, so later steps make no device-to-host copy.
            for counter in counters.values():
                counter.data = counter.data.to(device)
        return counters

    def _record(self, skip: Tensor, total_norm: Tensor, clipped_norm: Tensor) -> None:
        """Count a skip and store the norms (NaN clipped norm on a skip), on the device, no host read.

        ``total_norm`` may be the ``last_grad_norm`` counter itself, written in place by the step (the
        multi-tensor device branch does so in skip mode): then there is nothing to copy."""
        counters = self._counters_on(total_norm.device)
        # A bool adds to the int64 count in place (no conversion op); on the counters' device the clipped
        # norm's select writes into its counter directly (one op, no temporary, no copy).
        counters["skipped_steps"].add_(skip.to(counters["skipped_steps"].device, non_blocking=True))
        if total_norm is not counters["last_grad_norm"]:
            counters["last_grad_norm"].copy_(total_norm, non_blocking=True)
        target = counters["last_clipped_grad_norm"]
        if clipped_norm.device == target.device and clipped_norm.dtype == target.dtype and skip.device == target.device:
            nan = device_constant(math.nan, target.dtype, target.device)
            torch.where(skip, nan, clipped_norm, out=target)
        else:
            unused = torch.where(skip, torch.full_like(clipped_norm, math.nan), clipped_norm)
            target.copy_(unused, non_blocking=True)

    def _raise_nonfinite(
        self,
        batches: list[Any],
        loss: Tensor | float | None,
        total_norm: Tensor | float | None = None,
        observed: Tensor | None = None,
    ) -> NoReturn:
        """Name the non-finite loss (this step's or an observed micro-step's), the first non-finite gradient,
        or the subclass's own reason; the state is still untouched."""
        step = self._current_step()
        untouched = self._untouched
        remedy = "Check the batch and lower the learning rate, or construct with on_nonfinite='skip'."
        if is_set(observed):
            raise ContractViolation(
                "loss_decrease",
                "loss.is_finite()",
                kind="postcondition",
                step=step,
                observed={"observed_micro_step_loss": "non-finite"},
                hint="A micro-step loss handed to observe_loss() since the last step was non-finite, so the "
                f"accumulated gradient is not applied. {untouched} {remedy}",
            )
        if not loss_is_finite(loss):
            raise ContractViolation(
                "loss_decrease",
                "loss.is_finite()",
                kind="postcondition",
                step=step,
                observed={"loss": loss},
                hint=f"{untouched} {remedy}",
            )
        found = first_nonfinite_gradient(
            (param_label(b.group, b.group_index, position), g)
            for b in batches
            for position, g in zip(b.positions, b.grads, strict=True)
        )
        if found is None:  # every gradient is finite: the skip came from the subclass's own check
            raise ContractViolation(
                "gradient_norm",
                GRADIENTS_FINITE,
                step=step,
                observed={"grad_norm": float(total_norm) if total_norm is not None else None},
                hint=self._overflow_hint.format(untouched=untouched),
            )
        label, grad, nans, infs = found
        raise ContractViolation(
            "gradient_norm",
            GRADIENTS_FINITE,
            step=step,
            observed={"parameter": label, "nonfinite": nans + infs, "nan": nans, "inf": infs},
            hint=f"The gradient of {label!r} holds {nans + infs} non-finite values out of {grad.numel()}. "
            f"{untouched} {remedy}",
        )

    def _current_step(self) -> int:
        """1-based number of the step being taken, for messages."""
        raise NotImplementedError

    def _policy_repr(self) -> str:
        return f"clip_value={self.clip_value}, on_nonfinite={self.on_nonfinite!r}, on_empty={self.on_empty!r}"

    def __repr__(self) -> str:
        return super().__repr__().replace(" (", f" ({self._policy_repr()}", 1)

    # -- parameter groups and state dicts ---------------------------------------------------------

    def _check_group(self, merged: dict[str, Any], *, where: str) -> dict[str, Any]:
        """A subclass's check of one group's hyper-parameters (defaults merged in); returns them."""
        return merged

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, checking its hyper-parameters like the constructor's, and its parameters
        for repeats (torch warns that a repeat will become an error; each would be updated once per listing)."""
        check_no_repeats(param_group, where=f"param_groups[{len(self.param_groups)}]")
        merged = {**self.defaults, **param_group}
        checked = self._check_group(merged, where=f"param_groups[{len(self.param_groups)}]: ")
        for key in ("lr", "betas"):  # as the check keeps them (1-element tensors as 0-d ones)
            if key in param_group:
                param_group[key] = checked[key]
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the counters under ``"provetrain"`` (copies, so later steps leave them)."""
        state = super().state_dict()
        state[COUNTERS_KEY] = {name: value.clone() for name, value in self._counters.items()}
        state[COUNTERS_KEY]["empty_steps"] = self._empty_steps.clone()
        return state

    def _check_loadable(self, state_dict: Mapping[str, Any]) -> None:
        """A subclass's check that ``state_dict`` belongs to it, before torch loads it."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(
                "state_dict must be a mapping with 'state' and 'param_groups', as Optimizer.state_dict() "
                f"returns; got {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, Mapping) else "")
            )

    def _saved_parameter_states(
        self, state_dict: Mapping[str, Any]
    ) -> list[tuple[str, Tensor, Mapping[str, Any], Mapping[str, Any]]]:
        """``(label, parameter, its saved state, its saved group)`` for each saved state of a parameter, after
        refusing a state dict saved with ``differentiable=True``; empty when the groups do not line up (torch's
        ``load_state_dict`` then explains the mismatch). For the subclasses' :meth:`_check_loadable`."""
        saved_groups = state_dict["param_groups"]
        for i, group in enumerate(saved_groups):
            if group.get("differentiable"):
                raise ValueError(
                    f"state_dict param_groups[{i}] was saved with differentiable=True, which provetrain's "
                    f"{self._algorithm} does not implement (a guarded, clipped step is not differentiable); load "
                    f"it into torch.optim.{self._algorithm}(differentiable=True) instead."
                )
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=True)
        ):
            return []
        by_id = {
            param_id: (param_label(group, gi, pi), p, saved)
            for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True))
            for pi, (param_id, p) in enumerate(zip(saved["params"], group["params"], strict=True))
        }
        return [(*by_id[i][:2], p_state, by_id[i][2]) for i, p_state in state_dict["state"].items() if i in by_id]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict of this class or of its ``torch.optim`` counterpart.

        A torch state dict has no counters: they restart (0 skipped, NaN norms). Load pre-hooks run first,
        as in torch, so that one can adapt a checkpoint before it is checked.
        """
        hooks = self._optimizer_load_state_dict_pre_hooks
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # a shallow copy, as torch's
            for hook in hooks.values():
                adapted = hook(self, state_dict)
                state_dict = state_dict if adapted is None else adapted
        self._check_loadable(state_dict)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # they ran above: not twice
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        saved = state_dict.get(COUNTERS_KEY)
        fresh = fresh_counters(self._counters["skipped_steps"].device)
        for name, counter in self._counters.items():
            if saved is not None and name not in saved:
                raise ValueError(
                    f"state_dict[{COUNTERS_KEY!r}] has no {name!r} (it has {sorted(saved)}); pass a state "
                    f"dict saved by {type(self).__module__}.{type(self).__qualname__}.state_dict()."
                )
            counter.copy_(fresh[name] if saved is None else torch.as_tensor(saved[name]))
        # State dicts from before on_empty have no empty_steps: none were taken.
        self._empty_steps.fill_(0 if saved is None else int(saved.get("empty_steps", 0)))
        # A loss observed before the load belongs to an accumulated step of the state that was replaced.
        self._observed_nonfinite = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Pickles from before on_empty and observe_loss existed
        self.__dict__.setdefault("on_empty", "raise")
        self.__dict__.setdefault("_empty_steps", torch.zeros((), dtype=torch.int64))
        self.__dict__.setdefault("_observed_nonfinite", None)

    def _pickled_attributes(self) -> tuple[str, ...]:
        return _GUARD_ATTRIBUTES

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for name in self._pickled_attributes():
            state[name] = self.__dict__[name]
        return state


# -- helpers ------------------------------------------------------------------------------------------


def unscale_(batches: Sequence[GroupBatch], grad_scale: Tensor) -> None:
    """Divide the stored gradients by GradScaler's scale, as ``GradScaler.unscale_`` would: the clip and
    the guard then see the true gradients."""
    torch._foreach_div_([g for b in batches for g in b.grads], grad_scale)


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (``torch.view_as_real``: a trailing dimension of 2), else itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def fresh_counters(device: torch.device) -> dict[str, Tensor]:
    return {
        "skipped_steps": torch.zeros((), dtype=torch.int64, device=device),
        "last_grad_norm": torch.full((), math.nan, dtype=torch.float64, device=device),
        "last_clipped_grad_norm": torch.full((), math.nan, dtype=torch.float64, device=device),
    }


def clip_metadata(grads: Sequence[Tensor]) -> dict[str, Any]:
    return {"numel": sum(g.numel() for g in grads), "dtypes": tuple(dict.fromkeys(g.dtype for g in grads))}


def skip_flag(sum_sq: Tensor, loss: Tensor | float | None, found_inf: Tensor | None) -> Tensor:
    """0-d bool on ``sum_sq``'s device: a gradient, the loss, or GradScaler's ``found_inf`` is non-finite."""
    skip = (sum_sq - sum_sq) != 0  # NaN exactly where sum_sq is inf or NaN: isfinite in 2 ops instead of 5
    if loss is not None and not isinstance(loss, Tensor) and math.isfinite(loss):
        loss = None  # a finite number known on the host adds nothing to the flag: no fill, no op
    loss_nonfinite = loss_nonfinite_flag(loss, sum_sq.device)
    if loss_nonfinite is not None:
        skip = skip | loss_nonfinite
    if found_inf is not None:
        skip = skip | (found_inf.to(sum_sq.device, non_blocking=True) > 0)
    return skip


def loss_nonfinite_flag(loss: Tensor | float | None, device: torch.device) -> Tensor | None:
    """A 0-d bool device tensor, True when the loss is non-finite; made without a host read."""
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if not (loss.is_floating_point() or loss.is_complex()):
            return torch.zeros((), dtype=torch.bool, device=device)  # integers and bools are always finite
        with torch.no_grad():
            # x - x is 0 for a finite x and NaN for inf or NaN, and a sum of zeros is 0: isfinite().all()
            # in two or three ops instead of seven.
            spread = loss - loss
            return ((spread if spread.dim() == 0 else spread.sum()) != 0).to(device, non_blocking=True)
    # A Python number is already on the host: choosing the fill costs no synchronisation.
    return torch.full((), not math.isfinite(loss), dtype=torch.bool, device=device)


def is_set(flag: Tensor | None) -> bool:
    """Host read of an optional 0-d bool flag (free on CPU; a synchronisation on a device)."""
    return flag is not None and bool(flag)


def loss_is_finite(loss: Tensor | float | None) -> bool:
    """Host-side check (a synchronisation for a device tensor): raise mode and the CPU-only fused path."""
    if loss is None:
        return True
    if isinstance(loss, Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    return math.isfinite(loss)


def param_label(group: Mapping[str, Any], group_index: int, position: int) -> str:
    names = group.get("param_names")
    if names is not None:
        return str(names[position])
    shape = tuple(group["params"][position].shape)
    return f"param_groups[{group_index}]['params'][{position}] (shape {shape})"


def raise_no_params() -> NoReturn:
    raise ArgumentViolation(
        "loss_decrease",
        "!params.is_empty()",
        observed={"params": 0},
        hint="The optimizer got no parameters: pass model.parameters() of a model that has some.",
    )


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_learning_rate(lr: object, *, where: str) -> float:
    """``lr``'s value (a 1-element tensor read once): a real number with ``lr > 0.0`` (the contract's
    precondition, as an :class:`~provetrain.errors.ArgumentViolation`), finite."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where}Tensor lr must be 1-element, got shape {tuple(lr.shape)}; e.g. lr=1e-3")
        lr = float(lr)
    if not is_real(lr):
        raise TypeError(f"{where}lr={lr!r} must be a float or a 1-element tensor, e.g. lr=1e-3")
    if not lr > 0.0:
        raise ArgumentViolation(
            "loss_decrease",
            "lr > 0.0",
            observed={"lr": lr},
            hint=f"{where}Pass a positive, finite learning rate, e.g. lr=1e-3.",
        )
    if not math.isfinite(lr):
        raise ValueError(f"{where}lr={lr!r} must be finite; pass a positive learning rate, e.g. lr=1e-3")
    return float(lr)


def check_no_repeats(param_group: dict[str, Any], *, where: str) -> None:
    """Refuse a parameter listed twice in one group; ``param_group["params"]`` becomes a list."""
    if not isinstance(param_group, dict) or isinstance(param_group.get("params"), set):
        return  # torch's add_param_group names what is wrong
    params = param_group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    param_group["params"] = params
    seen: set[int] = set()
    for position, item in enumerate(params):
        p = item[1] if isinstance(item, tuple) and len(item) == 2 else item
        if id(p) in seen:
            shape = f" (shape {tuple(p.shape)})" if isinstance(p, Tensor) else ""
            raise ValueError(
                f"{where}['params'][{position}]{shape} appears twice in the group: each "
                "listing would take its own step, so list every parameter once (e.g. pass model.parameters() "
                "of a model that shares weights: it yields a shared parameter once)"
            )
        seen.add(id(p))


def check_clip_value(clip_value: float | None) -> float | None:
    if clip_value is None:
        return None
    if not is_real(clip_value):
        raise TypeError(f"clip_value={clip_value!r} must be a float or None (no clipping), e.g. clip_value=1.0")
    if not clip_value > 0.0:
        raise ArgumentViolation(
            "gradient_norm",
            "clip_value > 0.0",
            observed={"clip_value": clip_value},
            hint="Pass a positive bound on the gradient norm, e.g. clip_value=1.0, or None for no clipping.",
        )
    if not math.isfinite(clip_value):
        raise ValueError(f"clip_value={clip_value!r} must be finite; pass clip_value=None for no clipping")
    return float(clip_value)


def check_on_nonfinite(on_nonfinite: object) -> OnNonfinite:
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(
            f"on_nonfinite={on_nonfinite!r} is not one of 'skip' (skip the step, count it in skipped_steps) "
            "or 'raise' (raise ContractViolation)"
        )
    return on_nonfinite  # type: ignore[return-value]


def check_on_empty(on_empty: object) -> OnEmpty:
    if on_empty not in ("raise", "skip"):
        raise ValueError(
            f"on_empty={on_empty!r} is not one of 'raise' (a step without gradients violates the contract's "
            "!gradients.is_empty()) or 'skip' (count it in empty_steps and change nothing)"
        )
    return on_empty  # type: ignore[return-value]


NOT_DIFFERENTIABLE = (
    "a guarded, clipped step is not differentiable: whether it is applied is a data-dependent decision "
    "(the finite guard keeps the old values by torch.where on isfinite), and the clip coefficient is "
    "rounded upward by float64 steps (nextafter) to keep the proven bound, a piecewise-constant function "
    "with no useful derivative; the step also runs in place under torch.no_grad()"
)


def check_differentiable(differentiable: object, *, alternative: str) -> None:
    if not isinstance(differentiable, bool):
        raise TypeError(f"differentiable={differentiable!r} must be True or False")
    if differentiable:
        raise ValueError(f"differentiable=True is not supported: {NOT_DIFFERENTIABLE}. {alternative}")
