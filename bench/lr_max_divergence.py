"""Where training really diverges, next to ``lr_max: auto``'s estimate (issue 11, item 8).

    python bench/lr_max_divergence.py [--cases mlp,cnn,tiny-gpt,tiny-lm] [--factor 2]

For each case (a config, changed only as the case says): estimate lr_max exactly as ``lr_max: auto`` does
(``Trainer.estimate_lr_max``: 16 batches for Adam's preconditioner, 50 Hessian-vector products at most),
then train short runs through the Trainer (``lr_max: null``, so nothing is refused; the config's clip,
schedule and warmup) at learning rates spaced by ``--factor``, from a quarter of the smaller of the
config's lr and the estimate, upwards until two rates in a row diverge.

A run *diverges* when it does not train: it ends with an error (a skip budget exhausted by non-finite
losses), or the mean training loss of its last 10 steps is not below 0.9 times the loss of its first step
(a run that blows up, or collapses to the uniform prediction, ends near or above where it started). Each
run's final loss is printed, so the threshold can be judged. The table gives, per case, the estimate,
whether power iteration converged, the rate with the lowest final loss, the largest rate that trained
before the first that diverged, that first diverging rate, and their ratios to the estimate. A ratio above
1 is a rate that the old default (``lr_max: auto`` enforced) refused.

Cost, measured on a shared 2-core CPU: mlp under a minute; all four cases 28 minutes at a load of 3 to 5,
most of it the two language models' estimates (double backward through attention: 2 minutes for the tiny
LM on an idle machine, 10 under that load). ``--cases mlp,cnn`` keeps it to a few minutes.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provetrain.train.config import TrainConfig, load_config, override
from provetrain.train.run import default_config_path, prepare_trainer
from provetrain.train.trainer import Callback, Trainer

ROOT = Path(__file__).resolve().parent.parent
TAIL = 10  # steps averaged for the final loss
TRAINED = 0.9  # a run trains when its final loss is below this fraction of its first

# case: (config file, or None for the embedded default job; what changes; steps per run)
CASES: dict[str, tuple[Path | None, dict[str, Any], int]] = {
    "mlp": (None, {}, 100),  # the default job: digits, MLP [128, 64], AdamW lr 0.01, clip 1.0
    "cnn": (None, {"model": "cnn", "model_args": {}}, 100),  # the default job with the built-in CNN
    # the built-in tiny-gpt, one layer of width 32, on this repository's README (character level)
    "tiny-gpt": (
        None,
        {
            "data": "text",
            "data_args": {"path": str(ROOT / "README.md"), "block_size": 32},
            "model": "tiny-gpt",
            "model_args": {"width": 32, "layers": 1, "heads": 2},
            "batch_size": 32,
            "eval_every": None,
        },
        80,
    ),
    "tiny-lm": (ROOT / "examples" / "tiny-lm.yaml", {"data_args": {"path": str(ROOT / "README.md")}}, 80),
}


class _Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if not row.get("skipped"):
            self.values.append(row["loss"])


@dataclass(frozen=True)
class Run:
    lr: float
    first_loss: float
    final_loss: float
    error: str | None

    @property
    def diverged(self) -> bool:
        return self.error is not None or not (self.final_loss < TRAINED * self.first_loss)


def config_of(case: str) -> tuple[TrainConfig, int]:
    path, changes, steps = CASES[case]
    config = load_config(default_config_path() if path is None else path)
    if "data_args" in changes:
        changes = changes | {"data_args": config.data_args | changes["data_args"]}
    return override(config, changes), steps


def train_once(config: TrainConfig, steps: int, lr: float, directory: Path) -> Run:
    losses = _Losses()
    settings = {"lr": lr, "steps": steps, "lr_max": None, "checkpoint_every": None, "eval_every": None}
    trainer = prepare_trainer(override(config, settings | {"output_dir": str(directory)}))
    trainer.callbacks.append(losses)
    error = None
    try:
        trainer.fit()
    except Exception as caught:  # the skip budget, exhausted by non-finite losses, ends the run: it diverged
        error = f"{type(caught).__name__}: {str(caught).splitlines()[0][:80]}"
    values = losses.values or [math.nan]
    tail = values[-TAIL:]
    return Run(lr, values[0], sum(tail) / len(tail), error)


def sweep(case: str, factor: float) -> dict[str, Any]:
    config, steps = config_of(case)
    started = time.perf_counter()
    estimate = prepare_trainer(override(config, {"lr_max": None})).estimate_lr_max()
    print(
        f"\n{case}: estimate {estimate.lr_max:.4g} ({estimate.iterations} Hessian-vector products, "
        f"{'converged' if estimate.converged else 'NOT converged'}) in {time.perf_counter() - started:.0f}s; "
        f"config lr {config.lr:g}; {steps} steps a run",
        flush=True,
    )
    lr = min(config.lr, estimate.lr_max) / 4
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as scratch:
        while lr < 1e3 and not (len(runs) >= 2 and runs[-1].diverged and runs[-2].diverged):
            run = train_once(config, steps, lr, Path(scratch) / f"lr-{len(runs)}")
            runs.append(run)
            verdict = f"DIVERGED ({run.error})" if run.error else ("DIVERGED" if run.diverged else "trains")
            print(
                f"  lr {lr:10.4g}  ({lr / estimate.lr_max:7.3g} x estimate)  first loss {run.first_loss:8.4g}  "
                f"last-{TAIL} loss {run.final_loss:10.4g}  {verdict}",
                flush=True,
            )
            lr *= factor
    first = next((i for i, r in enumerate(runs) if r.diverged), len(runs))
    best = min((r for r in runs if not r.diverged), key=lambda r: r.final_loss, default=None)
    return {
        "case": case,
        "estimate": estimate.lr_max,
        "converged": estimate.converged,
        "best": math.nan if best is None else best.lr,
        "largest_trained": runs[first - 1].lr if first > 0 else math.nan,
        "first_diverged": runs[first].lr if first < len(runs) else math.nan,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--factor", type=float, default=2.0, help="ratio between successive learning rates")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not args.factor > 1:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}" if unknown else "--factor must be > 1")
    rows = [sweep(case, args.factor) for case in cases]
    print(
        "\n| case | estimate | converged | best lr | largest lr that trained | first diverging lr | "
        "trained / estimate | diverged / estimate |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['estimate']:.3g} | {'yes' if r['converged'] else 'no'} | {r['best']:.3g} | "
            f"{r['largest_trained']:.3g} | {r['first_diverged']:.3g} | "
            f"{r['largest_trained'] / r['estimate']:.3g} | {r['first_diverged'] / r['estimate']:.3g} |"
        )


if __name__ == "__main__":
    main()
