"""Hugging Face: certify a ``transformers.Trainer`` run that uses provetrain's Adam/AdamW.

The change to a ``transformers`` script::

    from provetrain.ops.adam import AdamW
    from provetrain.integrations.hf import ProvetrainTrainerCallback, skip_aware_scheduler

    opt = AdamW(model.parameters(), lr=5e-4, clip_value=1.0)          # the clip moves into the optimizer
    sched = skip_aware_scheduler(get_linear_schedule_with_warmup(opt, 10, 100), opt)
    trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0), optimizers=(opt, sched),
                      callbacks=[ProvetrainTrainerCallback()])

Import this module explicitly; it needs ``pip install 'provetrain[hf]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from provetrain.contract.schema import Contract
from provetrain.errors import ContractViolation
from provetrain.integrations._certify import (
    SkipAwareScheduler,
    StepCertifier,
    outcome_of,
    require_provetrain_optimizer,
    skip_aware_scheduler,
)
from provetrain.train.certificate import load_contracts

try:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("provetrain.integrations.hf needs transformers: pip install 'provetrain[hf]'") from error

__all__ = ["ProvetrainTrainerCallback", "SkipAwareScheduler", "skip_aware_scheduler"]

_FIX_OPTIMIZER = (
    "Pass optimizers=(opt, skip_aware_scheduler(scheduler, opt)) to Trainer, with "
    "opt = provetrain.ops.adam.AdamW(model.parameters(), lr=..., clip_value=...)."
)


class ProvetrainTrainerCallback(TrainerCallback):
    """Certify every optimizer step of a ``transformers.Trainer`` run against the training-loop contract.

    At train begin it refuses configurations that would make the certificate false. The Trainer calls
    ``optimizer.step()`` without the loss, so the callback takes the loss the model returns
    (``outputs.loss``, through a forward hook) and passes a non-finite one to the optimizer's finite guard.
    Each step is certified when read back: every step on CPU, at each logging step on CUDA (where the
    Trainer reads its loss anyway). Logged rows gain ``grad_norm_clipped`` and ``skipped_steps`` (in
    ``state.log_history``, and for callbacks after this one). At train end, or when the skip budget stops
    the run, the main process writes ``certificate.json``.

    Args:
        path: where to write the certificate; default ``<args.output_dir>/certificate.json``.
        contract: the contract to certify; default the bundled ``training-loop-v1.yaml``.
        contracts: the contracts the certificate has a section for (files or bundled names such as
            ``optimizer-v1``), loaded here; default ``["training-loop-v1"]``.
        max_consecutive_skips, max_total_skips: the skip budget; past it training stops with
            :class:`~provetrain.errors.ContractViolation` (no skipped update was ever applied).

    Raises (at train begin):
        ValueError: ``max_grad_norm > 0`` (the Trainer would clip first: the certified bound would be about
            an already-clipped gradient, and the work doubled).

    With ``fp16=True`` accelerate's ``GradScaler`` hands provetrain's optimizer its scale and inf flag (the
    optimizer supports torch's ``_step_supports_amp_scaling``): the clip applies to the unscaled gradient and
    an overflow is the contract's skip, counted once.
        TypeError: the optimizer is not provetrain's Adam/AdamW, or the scheduler is not skip-aware (the
            Trainer steps it after skipped steps too).

    Guarantees:
        * A step whose gradients, or whose model-returned loss, are non-finite is never applied, whatever
          ``logging_nan_inf_filter`` hides from the logged loss; the certificate counts it.
        * A skipped step does not advance the schedule (through :func:`skip_aware_scheduler`).

    A loss the model does not return (a custom ``compute_loss``) is not seen: such steps are guarded and
    certified on their gradients only, and the certificate's loss clauses count fewer checks than steps.
    """

    def __init__(
        self,
        *,
        path: str | Path | None = None,
        contract: Contract | None = None,
        contracts: Sequence[str | Path] | None = None,
        max_consecutive_skips: int = 5,
        max_total_skips: int = 50,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.contract = contract
        self.contracts = load_contracts(contracts)
        self.max_consecutive_skips = max_consecutive_skips
        self.max_total_skips = max_total_skips
        self.certifier: StepCertifier | None = None
        self._hook: RemovableHandle | None = None
        self._on_cpu = True

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _refuse_foreign_clipping(args)
        optimizer = require_provetrain_optimizer(kwargs.get("optimizer"), fix=_FIX_OPTIMIZER)
        scheduler = kwargs.get("lr_scheduler")
        if not isinstance(scheduler, SkipAwareScheduler) or scheduler.optimizer is not optimizer:
            raise TypeError(
                f"the learning-rate scheduler is {type(scheduler).__name__}, which the Trainer steps after skipped "
                "steps too; wrap it so the schedule follows applied steps: optimizers=(opt, "
                "skip_aware_scheduler(scheduler, opt)) (from provetrain.integrations.hf)."
            )
        self.certifier = StepCertifier(
            optimizer,
            contract=self.contract,
            contracts=self.contracts,
            max_consecutive_skips=self.max_consecutive_skips,
            max_total_skips=self.max_total_skips,
        )
        self._on_cpu = optimizer.skipped_steps.device.type == "cpu"
        if self._hook is not None:  # left by a train() that failed
            self._hook.remove()
        model: nn.Module = kwargs["model"]
        self._hook = model.register_forward_hook(self._capture_loss)

    def _capture_loss(self, module: nn.Module, inputs: Any, output: Any) -> None:
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if module.training and self.certifier is not None and isinstance(loss, Tensor):
            self.certifier.add_loss(loss)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.certifier is not None:
            self.certifier.guard_loss_()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.certifier is not None:
            self.certifier.record_step(state.global_step)  # incremented after this hook: the 0-based index

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # On CPU a host read is free; on CUDA read at logging steps, where the Trainer syncs for its loss.
        if self.certifier is not None and (self._on_cpu or control.should_log):
            self._read_back(self.certifier, args, state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        certifier = self.certifier
        if certifier is None or logs is None or "loss" not in logs or certifier.last_row is None:
            return
        extra = {"grad_norm_clipped": certifier.last_row["grad_norm_clipped"], "skipped_steps": certifier.skipped_steps}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer stored a copy of logs before calling on_log

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.certifier is not None:
            self._read_back(self.certifier, args, state)
            self._finish(args, state, None)

    def _read_back(self, certifier: StepCertifier, args: TrainingArguments, state: TrainerState) -> None:
        try:
            certifier.read_back()
        except ContractViolation as violation:
            self._finish(args, state, violation)  # the Trainer calls no hook on failure: write it now
            raise

    def _finish(self, args: TrainingArguments, state: TrainerState, error: BaseException | None) -> None:
        certifier, self.certifier = self.certifier, None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if certifier is not None and state.is_world_process_zero:
            path = self.path or Path(args.output_dir or ".") / "certificate.json"
            run = {
                "framework": "transformers",
                "transformers": transformers.__version__,
                "global_step": state.global_step,
            }
            certifier.write_certificate(path, outcome=outcome_of(error), run=run)


def _refuse_foreign_clipping(args: TrainingArguments) -> None:
    if args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise ValueError(
            f"TrainingArguments(max_grad_norm={args.max_grad_norm!r}) makes the Trainer clip the gradients before "
            "provetrain's optimizer does: the certified bound would be about an already-clipped gradient, and the "
            f"work doubled. Pass max_grad_norm=0 and clip_value={args.max_grad_norm!r} to provetrain.ops.adam.AdamW."
        )
