"""Run outputs: ``metrics.jsonl``, ``certificate.json`` and ``report.png`` in one run directory.

Every file that is rewritten (certificate, report) is written to a temporary file, flushed to disk and
renamed over the old one, so a crash leaves the previous version, never half a file. ``metrics.jsonl`` is
appended one complete line at a time and flushed.

The run directory is claimed atomically: it must be new or empty, and the run that creates its
``metrics.jsonl`` (``O_CREAT | O_EXCL``) owns it, so of two runs given one directory at the same moment
exactly one proceeds. A certificate that cannot be written in full (a full disk) falls back to a minimal
one: the outcome and the run's counts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["RunOutputs", "atomic_write", "check_output_dir", "write_json"]


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary sibling, fsync, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the mode a plain open() would
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _json_safe(value: Any) -> Any:
    """NaN and Inf as strings, since JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON (NaN/Inf as strings), written atomically."""
    text = json.dumps(_json_safe(value), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def check_output_dir(directory: Path) -> None:
    """Refuse, before any work, a directory the run could not claim: a file, or a directory holding files."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"output directory {directory} is a file; choose another output_dir")
    if directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(
            f"output directory {directory} already holds files; choose another output_dir or move them away"
        )


class RunOutputs:
    """The files of one run. The directory must be new or empty: a run never overwrites another's outputs.

    Raises:
        FileExistsError: ``directory`` is a file, holds files, or another run claimed it first.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        check_output_dir(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = directory / "metrics.jsonl"
        self.certificate_path = directory / "certificate.json"
        self.report_path = directory / "report.png"
        try:  # the claim: exactly one run creates metrics.jsonl
            self._metrics = self.metrics_path.open("x", encoding="utf-8")
        except FileExistsError:
            raise FileExistsError(
                f"output directory {directory} was claimed by another run at the same moment; choose another output_dir"
            ) from None

    def log(self, row: dict[str, Any]) -> None:
        """Append one metrics row as a complete line."""
        self._metrics.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")
        self._metrics.flush()

    def write_certificate(self, certificate: dict[str, Any]) -> None:
        """Write the certificate; when that fails (a full disk), a minimal one: outcome and counts.

        The minimal one is written atomically, else over the previous certificate in place (the run's first
        certificate, written when it started, holds the space). Warns if even that fails."""
        try:
            write_json(self.certificate_path, certificate)
            return
        except OSError as error:
            minimal = _minimal_certificate(certificate, error)
        try:
            write_json(self.certificate_path, minimal)
        except OSError:
            try:
                text = json.dumps(_json_safe(minimal), allow_nan=False).encode("utf-8")
                with open(self.certificate_path, "r+b" if self.certificate_path.exists() else "wb") as file:
                    file.write(text)
                    file.truncate()
                    file.flush()
                    os.fsync(file.fileno())
            except OSError as last:
                warnings.warn(
                    f"could not write {self.certificate_path} ({last}); the run's outcome was: {minimal['outcome']}",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def write_report(self, rows: Sequence[dict[str, Any]], *, clip_value: float | None) -> None:
        """``report.png``: loss (skipped steps marked), gradient norm before/after clipping against the clip
        line, learning rate, and evaluation metrics."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in rows if "loss" in r]
        evals = [r for r in rows if "eval" in r]
        figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
        loss_ax, norm_ax, lr_ax, eval_ax = axes.flat
        good = [r for r in steps if not r["skipped"]]
        skipped = [r for r in steps if r["skipped"]]
        loss_ax.plot([r["step"] for r in good], [r["loss"] for r in good], lw=0.8, label="train loss")
        if evals:
            loss_ax.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="eval loss")
        for r in skipped:
            loss_ax.axvline(r["step"], color="red", alpha=0.4, lw=0.8)
        loss_ax.set(title=f"loss ({len(skipped)} skipped steps in red)", xlabel="step")
        loss_ax.legend()
        norm_ax.semilogy([r["step"] for r in good], [r["grad_norm"] for r in good], lw=0.8, label="before clipping")
        norm_ax.semilogy(
            [r["step"] for r in good], [r["grad_norm_clipped"] for r in good], lw=0.8, label="after clipping"
        )
        if clip_value is not None:
            norm_ax.axhline(clip_value, color="black", ls="--", lw=1, label=f"clip_value = {clip_value:g}")
        norm_ax.set(title="global gradient norm", xlabel="step")
        norm_ax.legend()
        lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], lw=1)
        lr_ax.set(title="learning rate", xlabel="step")
        if evals and "accuracy" in evals[0]["eval"]:
            eval_ax.plot([r["step"] for r in evals], [r["eval"]["accuracy"] for r in evals], "o-")
            eval_ax.set(title="eval accuracy", xlabel="step", ylim=(0, 1))
        else:
            eval_ax.set_axis_off()
        atomic_write(self.report_path, lambda file: figure.savefig(file, format="png", dpi=100))
        plt.close(figure)

    def close(self) -> None:
        self._metrics.close()


def _minimal_certificate(certificate: dict[str, Any], error: OSError) -> dict[str, Any]:
    run = certificate.get("run", {})
    counts = ("steps", "applied_steps", "skipped_steps", "rollbacks")
    return {
        "contract": certificate.get("contract"),
        "outcome": certificate.get("outcome"),
        "run": {k: run[k] for k in counts if k in run},
        "minimal": f"the full certificate could not be written: {error}",
    }
