"""The ``provetrain`` command line: parse, call the library, format. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from provetrain import __version__
from provetrain.contract.load import LoadedContract, bundled_contract_path, load_contract_with_warnings
from provetrain.contract.registry import ClauseStatus, clause_statuses
from provetrain.errors import ConfigError, ContractError, ContractViolation
from provetrain.train.config import MAX_SEED

app = typer.Typer(
    help="Train PyTorch models under a machine-checked contract.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
contract_app = typer.Typer(help="Show the contract and how each clause is enforced and evidenced.")
app.add_typer(contract_app, name="contract")

# Text that quotes the user (config values, paths, clause texts, model output names) is printed with markup
# off or escaped: `[/x]` in a config value must neither crash the printer nor vanish.
# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 180)
stderr = Console(stderr=True, soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


class Device(str, Enum):
    """Where a run trains: ``auto`` picks CUDA when it is available."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _version(value: bool) -> None:
    if value:
        stdout.print(f"provetrain {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train PyTorch models under a machine-checked contract."""


def _print_error(label: str, error: Exception) -> None:
    stderr.print(Text.assemble((label, "bold red"), " ", str(error)), highlight=False)


def _exit_with_error(error: Exception, code: int = 2) -> NoReturn:
    """One clear line on stderr and an exit code; never a traceback for the user's mistakes."""
    _print_error("error:", error)
    raise typer.Exit(code) from None


def _load_all(paths: list[Path] | None) -> tuple[list[LoadedContract], bool]:
    """Each contract named (default: the bundled training-loop contract), and whether any failed to load;
    each failure is printed as one located error line, and the others are still read."""
    loaded, failed = [], False
    for path in paths or [None]:
        try:
            loaded.append(load_contract_with_warnings(path))
        except ContractError as error:
            _print_error("error:", error)
            failed = True
    return loaded, failed


def _print_warnings(contract: LoadedContract, console: Console) -> None:
    for warning in contract.warnings:
        console.print(str(warning), highlight=False, markup=False, soft_wrap=True)


def _statuses(contract: LoadedContract) -> list[ClauseStatus]:
    return clause_statuses(contract.contract, name=contract.name)


def _as_json(status: ClauseStatus, contract: str) -> dict[str, Any]:
    clause = status.clause
    return {
        "contract": contract,
        "id": clause.id,
        "kind": clause.kind,
        "owner": clause.owner,
        "text": clause.text,
        "predicate": status.predicate.name if status.predicate else None,
        "enforced_by": list(status.binding.enforced_by),
        "evidence": [{"kind": e.kind, "ref": e.ref} for e in status.binding.evidence],
        "state": status.state,
        "bound": status.bound,
        "not_applicable": status.not_applicable,
        "carried_from": status.carried_from,
        "gaps": list(status.gaps),
    }


def _verdict(status: ClauseStatus) -> Text:
    if status.not_applicable is not None:
        return Text(f"n/a: {status.not_applicable}", "cyan")
    if status.gaps:
        return Text("; ".join(status.gaps), "yellow")
    return Text("bound" + (f" (by text, from {status.carried_from})" if status.carried_from else ""), "green")


def _table(statuses: list[ClauseStatus], title: str) -> Table:
    table = Table(title=title, show_lines=False, expand=False)
    for column in ("clause", "kind", "text", "binding", "evidence", "status"):
        table.add_column(column, overflow="fold")
    for status in statuses:
        clause = status.clause
        binding = [status.predicate.function.__name__] if status.predicate else []
        binding += [site.rsplit(".", 1)[-1] for site in status.binding.enforced_by]
        evidence = sorted({e.kind for e in status.binding.evidence})
        table.add_row(
            escape(clause.id),
            escape(clause.kind),
            escape(clause.text),
            escape(", ".join(binding) or "-"),
            escape(f"{len(status.binding.evidence)} ({', '.join(evidence)})" if evidence else "-"),
            _verdict(status),
        )
    return table


def _summary(statuses: list[ClauseStatus]) -> str:
    bound = sum(s.bound for s in statuses)
    na = sum(s.not_applicable is not None for s in statuses)
    gaps = sum(bool(s.gaps) for s in statuses)
    text = f"{bound} of {len(statuses)} clauses bound."
    if na:
        text += f" {na} not applicable."
    if gaps:
        text += f" {gaps} unbound."
    return text


def _title(contract: LoadedContract) -> str:
    bundled = contract.path == bundled_contract_path(contract.name)
    return f"{contract.name} ({'bundled' if bundled else contract.path})"


ContractFiles = Annotated[
    list[Path] | None,
    typer.Argument(
        help="Contract YAML files, or names of bundled contracts (optimizer-v1, ...); default: training-loop-v1.",
        show_default=False,
    ),
]


@contract_app.command("status")
def contract_status(paths: ContractFiles = None, as_json: JsonFlag = False) -> None:
    """List every clause of each contract with its binding (predicate, enforcing code) and evidence, or as not
    applicable with the reason, or as a gap. Warnings go to stderr, located. Exit 2 if a contract does not
    load, else 0."""
    contracts, failed = _load_all(paths)
    rows = []
    for contract in contracts:
        _print_warnings(contract, stderr)
        statuses = _statuses(contract)
        if as_json:
            rows += [_as_json(s, contract.name) for s in statuses]
            continue
        stdout.print(_table(statuses, escape(_title(contract))))
        stdout.print(f"{contract.name}: {_summary(statuses)}", highlight=False, markup=False)
    if as_json:
        print(json.dumps(rows, indent=2))
    if failed:
        raise typer.Exit(2)


@contract_app.command("audit")
def contract_audit(paths: ContractFiles = None, as_json: JsonFlag = False) -> None:
    """List each unbound clause or untested falsification id of each contract. Exit 0 when every clause of
    every contract is bound or not applicable (with its reason), 1 when any clause is unbound, 2 when a
    contract does not load (the others are still audited). Warnings do not count: `contract lint` does."""
    contracts, failed = _load_all(paths)
    total, unbound, summaries = 0, [], []
    for contract in contracts:
        statuses = _statuses(contract)
        gaps = [s for s in statuses if s.gaps]
        total += len(statuses)
        unbound += [_as_json(s, contract.name) for s in gaps]
        na = sum(s.not_applicable is not None for s in statuses)
        summaries.append(
            {"contract": contract.name, "total": len(statuses), "unbound": len(gaps), "not_applicable": na}
        )
        if as_json:
            continue
        if len(contracts) > 1:
            stdout.print(f"== {contract.name}", highlight=False, markup=False)
        for status in gaps:
            stdout.print(
                f"UNBOUND {status.clause.id} `{status.clause.text}`: {'; '.join(status.gaps)}",
                highlight=False,
                markup=False,
            )
        stdout.print(f"{contract.name}: {_audit_line(len(statuses), len(gaps), na)}", highlight=False)
    if as_json:
        report = {"ok": not unbound and not failed, "total": total, "unbound": unbound, "contracts": summaries}
        print(json.dumps(report, indent=2))
    if failed:
        raise typer.Exit(2)
    if unbound:
        raise typer.Exit(1)


def _audit_line(total: int, gaps: int, na: int) -> str:
    not_applicable = f", {na} not applicable" if na else ""
    if gaps:
        return f"{gaps} of {total} clauses unbound{not_applicable}."
    return (
        f"All {total - na} clauses bound and evidenced{not_applicable}."
        if na
        else f"All {total} clauses bound and evidenced."
    )


@contract_app.command("lint")
def contract_lint(paths: ContractFiles = None) -> None:
    """The strict reading: print every located warning (unknown keys, a harness naming no obligation, the
    format's own validator warnings). Exit 0 when every contract is clean, 1 on any warning, 2 when a
    contract does not load."""
    contracts, failed = _load_all(paths)
    warned = 0
    for contract in contracts:
        _print_warnings(contract, stdout)
        count = len(contract.warnings)
        warned += count
        verdict = f"{count} warning{'s' if count != 1 else ''}" if count else "clean"
        stdout.print(f"{contract.name}: {verdict}", highlight=False, markup=False)
    if failed:
        raise typer.Exit(2)
    if warned:
        raise typer.Exit(1)


@app.command("train")
def train(
    config: Annotated[
        Path | None, typer.Argument(help="Training config YAML (default: the embedded digits + MLP job).")
    ] = None,
    output_dir: Annotated[str | None, typer.Option(help="Where to write the run outputs.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Override the number of steps.")] = None,
    device: Annotated[Device | None, typer.Option(help="Override the device.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=MAX_SEED, help="Override the seed.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages; results only.")] = False,
    resume: Annotated[
        Path | None, typer.Option(help="Continue from a checkpoint directory (<run>/checkpoints or its step-N).")
    ] = None,
) -> None:
    """Train under the contract; print test accuracy, the clause summary and where the outputs are.

    Under torchrun (``torchrun --nproc-per-node N -m provetrain train ...``) each process joins one
    data-parallel run; rank 0 writes the outputs and prints the summary."""
    from torch.distributed import DistError

    from provetrain.train.checkpoint import ResumeError
    from provetrain.train.config import load_config
    from provetrain.train.distributed import launched_by_torchrun, torchrun_process_group
    from provetrain.train.run import default_config_path, prepare_trainer
    from provetrain.train.trainer import Terminated

    device_name = device.value if device is not None else None
    overrides = {"output_dir": output_dir, "steps": steps, "device": device_name, "seed": seed}
    trainer = None
    try:
        settings = load_config(default_config_path() if config is None else config)
        timeout = settings.collective_timeout_minutes
        with torchrun_process_group(device_name or settings.device, timeout_minutes=timeout) as rank:
            trainer = prepare_trainer(settings, console=None if quiet else stdout, **overrides)
            result = trainer.fit(resume_from=resume)
    except (ConfigError, ContractError, FileExistsError, ResumeError) as error:
        _exit_with_error(error)
    except ContractViolation as violation:
        _print_error("contract violation:", violation)
        raise typer.Exit(1) from None
    except (OSError, DistError) as error:  # a full disk, a lost or frozen peer: the certificate says failed
        _exit_with_error(error, code=1)
    except RuntimeError as error:
        if not launched_by_torchrun():
            _exit_with_run_failure(error, trainer)
        # gloo reports a peer that timed out or died as a plain RuntimeError
        _exit_with_error(RuntimeError(f"this process's run ended: {error}"), code=1)
    except Terminated:
        stderr.print("terminated by SIGTERM; the run's certificate says failed", highlight=False)
        raise typer.Exit(143) from None
    except Exception as error:  # the model's, the loss's or a DataLoader worker's own error
        _exit_with_run_failure(error, trainer)
    if rank == 0:
        _print_run_summary(result, quiet=quiet)
        outcome = result.certificate["outcome"]
        if outcome != "kept":  # the run finished, but a violation was counted that no policy undid
            stderr.print(Text.assemble(("contract not kept:", "bold red"), " ", outcome), highlight=False)
            raise typer.Exit(1)


def _raised_at(error: BaseException) -> str:
    """``file:line in function`` of the innermost frame outside torch and provetrain (the user's code), else
    of the innermost frame."""
    import traceback

    import torch

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    library = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
    user = [f for f in frames if not f.filename.startswith(library)]
    frame = (user or frames)[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}"


def _exit_with_run_failure(error: BaseException, trainer: Any) -> NoReturn:
    """One paragraph for an error raised by the user's code (the model, the loss, the data) during a run:
    what, where, and where the certificate and the last checkpoint are; exit 1, no traceback."""
    where = _raised_at(error)
    message = f"the run failed: {type(error).__name__}: {error}" + (f" (raised at {where})" if where else "")
    outputs = getattr(trainer, "outputs", None)
    if outputs is not None:
        message += f"; {outputs.certificate_path} says failed"
        checkpoints = outputs.directory / "checkpoints"
        if checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir()):
            message += f", and --resume {checkpoints} continues from its last checkpoint"
    stderr.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)
    raise typer.Exit(1) from None


@app.command("lr-max")
def lr_max(
    config: Annotated[Path | None, typer.Argument(help="Training config YAML (default: the embedded job).")] = None,
    batches: Annotated[
        int | None, typer.Option(min=1, help="Batches averaged for Adam's preconditioner (default: lr_max_budget).")
    ] = None,
    iterations: Annotated[
        int | None, typer.Option(min=1, help="Most Hessian-vector products in all (default: lr_max_budget.hvp).")
    ] = None,
    seconds: Annotated[
        float | None, typer.Option(min=0.0, help="Wall-time budget in seconds (default: lr_max_budget.seconds).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Estimate the largest stable learning rate (Adam's edge of stability at the initial point) for a config's
    model and data, within a budget of Hessian-vector products and seconds, and compare the config's peak lr
    with it. Progress goes to stderr. The estimate is advice: exit 1 only when the peak lr breaks the config's
    declared numeric lr_max, which training enforces."""
    from provetrain.train.config import load_config
    from provetrain.train.run import default_config_path, prepare_trainer

    try:
        trainer = prepare_trainer(load_config(default_config_path() if config is None else config))
        total = iterations or trainer.config.lr_max_budget.hvp
        with _product_progress(total) as progress:
            estimate = trainer.estimate_lr_max(
                batches=batches, iterations=iterations, seconds=seconds, progress=progress
            )
    except (ConfigError, ValueError, TypeError) as error:
        _exit_with_error(error)
    peak, declared = trainer.schedule.extremes()[1], trainer.lr_max
    refused = declared is not None and not peak < declared
    if as_json:
        report = {"lr": peak, "lr_below_lr_max": peak < estimate.lr_max, "declared_lr_max": declared}
        print(json.dumps(report | {"refused": refused} | estimate.to_dict(), indent=2))
    else:
        state = "converged" if estimate.converged else "NOT converged: optimistic"
        if estimate.stopped:
            state += f", budget spent ({estimate.stopped})"
        stdout.print(
            f"lr_max estimate = {estimate.lr_max:.6g} ({estimate.method}, eigenvalue {estimate.eigenvalue:.6g}, "
            f"{estimate.iterations} Hessian-vector products, {state})",
            highlight=False,
        )
        stdout.print(estimate.explanation, highlight=False, markup=False)
        where = "below" if peak < estimate.lr_max else "at or above"
        stdout.print(
            f"peak lr = {peak:g} is {where} the estimate; the estimate is not enforced (rates above it often train)",
            highlight=False,
        )
        if declared is None:
            stdout.print("no lr_max declared: training reports `lr < lr_max` as unchecked", highlight=False)
        else:
            verdict = "refuses" if refused else "accepts"
            stdout.print(f"declared lr_max = {declared:g}: training {verdict} this lr", highlight=False)
    if refused:
        raise typer.Exit(1)


@contextmanager
def _product_progress(total: int) -> Iterator[Callable[[int], None]]:
    """Progress of an estimate on stderr: a bar on a terminal, else a line at every tenth of the budget."""
    import time

    if stderr.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress("lr_max", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr) as bar:
            task = bar.add_task("lr_max", total=total)
            yield lambda done: bar.update(task, completed=done)
        return
    started, every = time.monotonic(), max(1, total // 10)

    def line(done: int) -> None:
        if done % every == 0 or done == total:
            took = time.monotonic() - started
            stderr.print(f"lr_max: {done}/{total} Hessian-vector products, {took:.1f} s", highlight=False)

    yield line


def _print_run_summary(result: Any, *, quiet: bool) -> None:
    if not quiet:
        table = Table(title="contract clauses checked during training")
        for column in ("clause", "text", "checks", "violations", "policy actions"):
            table.add_column(column, overflow="fold")
        for clause in result.certificate["clauses"]:
            if clause["kind"] in ("precondition", "postcondition", "invariant"):
                actions = ", ".join(f"{k} x{v}" for k, v in clause["actions"].items()) or "-"
                cells = (clause["id"], clause["text"], str(clause["checks"]), str(clause["violations"]), actions)
                table.add_row(*map(escape, cells))
        stdout.print(table)
    evaluation = result.evaluation or {}
    if "accuracy" in evaluation:
        stdout.print(f"test accuracy: {evaluation['accuracy']:.4f}  (test loss {evaluation['loss']:.4f})")
    stdout.print(
        f"steps: {result.steps} ({result.applied_steps} applied, {result.skipped_steps} skipped, "
        f"{result.rollbacks} rollbacks); final train loss {result.final_loss:.4f}"
    )
    stdout.print(_lr_max_summary(result), highlight=False)
    for section in result.certificate.get("contracts", []):
        counts = section["summary"]
        line = f"contract {section['name']}: {counts['bound']} of {counts['total']} clauses bound"
        if counts["not_applicable"]:
            line += f", {counts['not_applicable']} not applicable"
        if counts["unbound"]:
            line += f", {counts['unbound']} unbound"
        stdout.print(f"{line}; {counts['checked_at_run_time']} checked at run time", highlight=False, markup=False)
    stdout.print(
        f"outputs: {result.output_dir}/ (metrics.jsonl, certificate.json, report.png)", highlight=False, markup=False
    )


def _lr_max_summary(result: Any) -> str:
    if result.lr_max is not None:
        line = f"lr < lr_max: enforced with the declared lr_max = {result.lr_max:g}"
    else:
        line = "lr < lr_max: unchecked (no lr_max declared)"
    estimate = result.lr_max_estimate
    if estimate is not None:
        state = "converged" if estimate.converged else "NOT converged: optimistic"
        line += (
            f"; estimated edge of stability {estimate.lr_max:.4g} ({estimate.iterations} Hessian-vector products, "
            f"{state}), reported, not enforced"
        )
    return line


@app.command("parity")
def parity(
    model: Annotated[str | None, typer.Option(help="module:factory returning a model or (model, inputs).")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input batch shape for a factory's model, e.g. 8,64.")] = None,
    tolerance: Annotated[float, typer.Option(min=0.0, help="Per-element absolute tolerance.")] = 1e-4,
    as_json: JsonFlag = False,
) -> None:
    """CUDA forward vs CPU forward per element (TF32 off; TF32 on reported apart); without CUDA, float32 vs
    a float64 CPU reference. Exits 1 when the obligation fails."""
    from provetrain.verify.parity import forward_parity
    from provetrain.verify.suite import model_and_inputs

    try:
        net, inputs = model_and_inputs(model, input_shape)
        results = forward_parity(net, inputs, tolerance=tolerance)
    except (ValueError, TypeError) as error:
        _exit_with_error(error)
    failed = [r for r in results if r.obligation and not r.passed]
    if as_json:
        rows = [r.__dict__ | {"passed": r.passed} for r in results]
        print(
            json.dumps({"ok": not failed, "cuda": results[0].candidate.startswith("cuda"), "results": rows}, indent=2)
        )
    else:
        import torch

        if not torch.cuda.is_available():
            stdout.print("no CUDA device: comparing float32 CPU against a float64 CPU reference instead")
        table = Table(title=f"forward parity (tolerance {tolerance:g} per element)")
        for column in ("output", "reference", "candidate", "elements", "max abs error", "max rel error", "result"):
            table.add_column(column)
        for r in results:
            verdict = ("[green]pass[/]" if r.passed else "[red]FAIL[/]") if r.obligation else "(informational)"
            table.add_row(
                escape(r.output),
                r.reference,
                r.candidate,
                str(r.elements),
                f"{r.max_abs_error:.3e}",
                f"{r.max_rel_error:.3e}",
                verdict,
            )
        stdout.print(table)
    if failed:
        raise typer.Exit(1)


PROVE_RLIMIT = 2_000_000_000
"""``provetrain.verify.smt_derivation.DEFAULT_RLIMIT``, spelt out so the CLI starts without importing z3 (a test
pins them equal)."""


@app.command("prove")
def prove(
    bound: Annotated[
        int, typer.Option(min=1, max=64, help="Largest gradient length proved (the contract's is 4).")
    ] = 4,
    rlimit: Annotated[
        int,
        typer.Option(
            min=1,
            max=2**32 - 1,
            help="z3 resource units allowed per solver call: a count of solver work, not seconds, so the "
            "verdict does not depend on machine load.",
        ),
    ] = PROVE_RLIMIT,
    torch_algorithm: Annotated[
        bool, typer.Option("--torch", help="Run the same harness on torch.nn.utils.clip_grad_norm_'s algorithm.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """train-kani-001: SMT proof (z3) that the clip keeps the exact norm <= clip_value for every finite gradient
    of length 1..bound, on every execution path and dtype (sqrt stubbed by its error contract), bound to the
    shipped code by runs of it; exits 1 unless every length is proved. Prints resource units and wall time."""
    from provetrain.verify.prove import PROOF_COLUMNS, proof_rows, prove_clip_bound

    report = prove_clip_bound(bound, rlimit=rlimit, algorithm="torch" if torch_algorithm else "provetrain")
    rows = proof_rows(report)
    if as_json:
        print(
            json.dumps(
                {
                    "proved": report.proved,
                    "rlimit": report.rlimit,
                    "rlimit_used": report.rlimit_used,
                    "seconds": report.seconds,
                    "rows": [dict(zip(PROOF_COLUMNS, r, strict=True)) for r in rows],
                },
                indent=2,
            )
        )
    else:
        table = Table(title=f"train-kani-001 on {'torch' if torch_algorithm else 'provetrain'}'s clip, bound {bound}")
        for column in PROOF_COLUMNS:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        stdout.print(table)
        verdict = "proved" if report.proved else "NOT proved"
        summary = f"{verdict}: {report.rlimit_used} z3 resource units (limit {rlimit} per call), {report.seconds:.1f}s"
        stdout.print(summary, highlight=False)
    if not report.proved:
        raise typer.Exit(1)


@app.command("verify")
def verify(
    model: Annotated[str | None, typer.Option(help="module:factory returning a model or (model, inputs).")] = None,
    input_shape: Annotated[str | None, typer.Option(help="Input batch shape for a factory's model, e.g. 8,64.")] = None,
    thorough: Annotated[bool, typer.Option("--thorough", help="10x the examples and the full proof bound.")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")
    ] = None,
    gradient_samples: Annotated[
        int,
        typer.Option(
            min=1,
            help="backward-pass-v1's gradient check: coordinates per parameter tensor compared with float64 "
            "central differences (2 forwards each).",
        ),
    ] = 3,
    contracts: Annotated[
        list[str] | None,
        typer.Option(
            "--contract",
            help="A contract to verify against: a file or a bundled name (optimizer-v1, backward-pass-v1...); "
            "repeat for several. Default: training-loop-v1.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the contracts' falsification tests and proof obligations on a model, and backward-pass-v1's gradient
    check (analytical vs numerical, gradients finite); exit 1 unless all pass.
    After the checks, each contract's clauses are summarised (bound, not applicable, unbound); exit 2 when a
    contract does not load."""
    import inspect

    from provetrain.train.certificate import load_contracts
    from provetrain.verify.suite import model_and_inputs, run_verification

    if json_path is not None and json_path.is_dir():  # found before the checks run, not after
        _exit_with_error(ValueError(f"--json {json_path} is a directory; give the name of a file to write"))
    try:
        loaded = load_contracts(contracts)
    except ContractError as error:
        _exit_with_error(error)
    # The suite runs the checks of the contracts it is given, where it takes them (the training loop's always).
    takes_contracts = "contracts" in inspect.signature(run_verification).parameters
    try:
        net, inputs = model_and_inputs(model, input_shape)
        options = {"contracts": loaded} if takes_contracts else {}
        results = run_verification(net, inputs, thorough=thorough, gradient_samples=gradient_samples, **options)
    except (ValueError, TypeError) as error:
        _exit_with_error(error)
    table = Table(title="provetrain verify" + (" --thorough" if thorough else ""))
    for column in ("clause", "what is shown", "method", "result", "evidence", "time"):
        table.add_column(column, overflow="fold")
    colour = {"pass": "green", "fail": "red", "unknown": "yellow"}
    for r in results:
        result = Text(r.result, colour[r.result])
        table.add_row(r.clause, escape(r.text), r.method, result, escape(r.evidence), f"{r.seconds:.2f}s")
    stdout.print(table)
    for r in results:
        if r.details:
            _print_gradient_details(r.details)
    for contract in loaded:
        _print_warnings(contract, stderr)
        stdout.print(f"{contract.name}: {_summary(_statuses(contract))}", highlight=False, markup=False)
    if json_path is not None:
        from provetrain.train.outputs import atomic_write

        text = json.dumps([r.__dict__ for r in results], indent=2) + "\n"
        try:
            atomic_write(json_path, lambda file: file.write(text.encode("utf-8")))
        except OSError as error:
            _exit_with_error(ValueError(f"--json {json_path}: cannot write it ({error.strerror or error})"))
    if any(r.result != "pass" for r in results):
        raise typer.Exit(1)


def _print_gradient_details(details: tuple[dict[str, Any], ...]) -> None:
    """The gradient check per parameter tensor: its largest sampled error and where."""
    table = Table(title="gradient check per tensor (float64 central differences)")
    for column in ("tensor", "shape", "coordinates", "max error", "at", "analytical", "numerical", "result"):
        table.add_column(column, overflow="fold")
    for d in details:
        verdict = "[green]pass[/]" if d["result"] == "pass" else "[red]FAIL[/]"
        table.add_row(
            escape(d["tensor"]),
            str(tuple(d["shape"])),
            str(d["coordinates"]),
            f"{d['max_error']:.2e}",
            str(tuple(d["index"])),
            f"{d['analytical']:.6e}",
            f"{d['numerical']:.6e}",
            verdict,
        )
    stdout.print(table)


def main() -> None:
    """Console-script entry point."""
    # `python -m provetrain` puts the current directory first on sys.path; the console script puts its own
    # bin/ there instead. Do as -m does, so `model: mymodule:build` finds ./mymodule.py either way.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app()
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
