"""Lightning: certify a ``lightning.pytorch.Trainer`` run that uses provetrain's Adam/AdamW.

The change to a Lightning script::

    from provetrain.ops.adam import AdamW
    from provetrain.integrations.lightning import ProvetrainCallback

    def configure_optimizers(self):                       # in the LightningModule
        return AdamW(self.parameters(), lr=1e-3, clip_value=1.0)   # the clip moves into the optimizer

    trainer = lightning.pytorch.Trainer(callbacks=[ProvetrainCallback()])   # no gradient_clip_val

Import this module explicitly; it needs ``pip install 'provetrain[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provetrain.contract.schema import Contract
from provetrain.integrations._certify import (
    SkipAwareScheduler,
    StepCertifier,
    outcome_of,
    require_provetrain_optimizer,
    skip_aware_scheduler,
)
from provetrain.ops.adam import Adam
from provetrain.train.certificate import load_contracts

try:
    import lightning
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "provetrain.integrations.lightning needs Lightning: pip install 'provetrain[lightning]'"
    ) from error

__all__ = ["ProvetrainCallback", "SkipAwareScheduler", "skip_aware_scheduler"]

_FIX_OPTIMIZER = (
    "Return provetrain.ops.adam.AdamW(self.parameters(), lr=..., clip_value=...) (or Adam) from configure_optimizers."
)


class ProvetrainCallback(pl.Callback):
    """Certify every optimizer step of a Lightning fit against the training-loop contract.

    At fit start it refuses configurations that would make the certificate false, and makes every
    ``interval="step"`` LR scheduler a :class:`~provetrain.integrations._certify.SkipAwareScheduler`
    (Lightning steps schedulers after skipped steps too, Lightning #5558), so the learning rate follows the
    applied steps. Each optimizer step then logs ``grad_norm`` (before clipping), ``grad_norm_clipped`` and
    ``skipped_steps`` with ``pl_module.log`` (device tensors: no host read), and is certified when read back:
    every step on CPU, every ``log_every_n_steps`` on CUDA (no host-device sync per step). At fit end, or
    when the fit fails, rank 0 writes ``certificate.json``.

    Args:
        path: where to write the certificate; default ``<trainer.log_dir>/certificate.json``.
        contract: the contract to certify; default the bundled ``training-loop-v1.yaml``.
        contracts: the contracts the certificate has a section for (files or bundled names such as
            ``optimizer-v1``), loaded here; default ``["training-loop-v1"]``.
        max_consecutive_skips, max_total_skips: the skip budget; past it the fit stops with
            :class:`~provetrain.errors.ContractViolation` (no skipped update was ever applied).

    Raises (at fit start):
        ValueError: ``Trainer(gradient_clip_val=...)`` is set (double clipping: the certified bound would be
            about an already-clipped gradient).

    Under ``precision="16-mixed"`` Lightning's ``GradScaler`` hands provetrain's optimizer its scale and inf
    flag (the optimizer supports torch's ``_step_supports_amp_scaling``): the clip applies to the unscaled
    gradient and an overflow is the contract's skip, counted once, holding the schedule like any skip.
        TypeError: the optimizer is not provetrain's Adam/AdamW, or optimization is manual.

    Guarantees:
        * A step whose loss or gradients are non-finite is never applied: provetrain's optimizer sees the
          closure's loss, and a non-finite loss of an earlier accumulated micro-batch is passed to its finite
          guard by :meth:`~provetrain.integrations._certify.StepCertifier.guard_loss_`.
        * A skipped step does not advance ``interval="step"`` schedulers.
        * The certificate counts every optimizer step Lightning took, skipped or not.

    Epoch-interval and ``ReduceLROnPlateau`` schedulers are left as they are: a skipped step does not change
    the epoch count or the monitored metric's schedule.
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
        self._optimizer: Adam | None = None
        self._path = Path("certificate.json")
        self._global_step = 0
        self._read_every = 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_foreign_clipping(trainer)
        if not pl_module.automatic_optimization:
            raise TypeError(
                "ProvetrainCallback supports automatic optimization only (one optimizer step per batch); with "
                "automatic_optimization=False, call provetrain's optimizer.step(loss=loss) yourself and read its "
                "counters."
            )
        if len(trainer.optimizers) != 1:
            raise TypeError(
                f"ProvetrainCallback needs exactly one optimizer, got {len(trainer.optimizers)}. {_FIX_OPTIMIZER}"
            )
        self._optimizer = require_provetrain_optimizer(trainer.optimizers[0], fix=_FIX_OPTIMIZER)
        # Now, before Lightning restores a checkpoint into the schedulers (the wrapper's state is theirs).
        _make_step_schedulers_skip_aware(trainer, self._optimizer)
        # Every rank resolves the directory here: trainer.log_dir broadcasts, so it cannot wait for rank 0 alone.
        self._path = self.path or Path(trainer.log_dir or trainer.default_root_dir) / "certificate.json"
        # On CPU a host read costs nothing, so each step is certified as it happens.
        self._read_every = 1 if self._optimizer.skipped_steps.device.type == "cpu" else trainer.log_every_n_steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a resumed fit restored the optimizer's counters: the certificate covers this fit's steps.
        assert self._optimizer is not None  # set by on_fit_start, which Lightning calls first
        self.certifier = StepCertifier(
            self._optimizer,
            contract=self.contract,
            contracts=self.contracts,
            max_consecutive_skips=self.max_consecutive_skips,
            max_total_skips=self.max_total_skips,
        )
        self._global_step = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Runs inside the closure, after the last backward: the losses added so far are the earlier
        # accumulated micro-batches' (the optimizer checks the last one, which the closure returns).
        if self.certifier is not None:
            self.certifier.guard_loss_()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        certifier = self.certifier
        if certifier is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            certifier.add_loss(loss)
        if trainer.global_step == self._global_step:
            return  # accumulating gradients: no optimizer step yet
        self._global_step = trainer.global_step
        certifier.record_step(trainer.global_step - 1)
        opt = certifier.optimizer
        pl_module.log("grad_norm", opt.last_grad_norm.float())
        pl_module.log("grad_norm_clipped", opt.last_clipped_grad_norm.float())
        pl_module.log("skipped_steps", opt.skipped_steps.float())
        if trainer.global_step % self._read_every == 0:
            certifier.read_back()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, None)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(trainer, exception)

    def _finish(self, trainer: pl.Trainer, error: BaseException | None) -> None:
        certifier = self.certifier
        if certifier is None:
            return  # refused at fit start, or no training started: nothing to certify
        self.certifier = None
        try:
            certifier.read_back()
        except Exception as late:  # a budget or bound violation in the last window
            error = error or late
            raise
        finally:
            if trainer.is_global_zero:
                run = {"framework": "lightning", "lightning": lightning.__version__, "global_step": trainer.global_step}
                certifier.write_certificate(self._path, outcome=outcome_of(error), run=run)


def _make_step_schedulers_skip_aware(trainer: pl.Trainer, optimizer: Adam) -> None:
    """Wrap each per-step scheduler; before Lightning restores a checkpoint into it (the state is the same)."""
    for config in trainer.lr_scheduler_configs:
        per_step = config.interval == "step" and not config.reduce_on_plateau
        if per_step and not isinstance(config.scheduler, SkipAwareScheduler):
            config.scheduler = skip_aware_scheduler(config.scheduler, optimizer)  # type: ignore[arg-type]


def _refuse_foreign_clipping(trainer: pl.Trainer) -> None:
    clip = trainer.gradient_clip_val
    if clip:
        raise ValueError(
            f"Trainer(gradient_clip_val={clip!r}) clips the gradients before provetrain's optimizer does: the "
            "certified bound would be about an already-clipped gradient, and the work doubled. Remove "
            f"gradient_clip_val and pass clip_value={clip!r} to provetrain.ops.adam.AdamW/Adam in "
            "configure_optimizers."
        )
