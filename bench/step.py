"""Time one clipped Adam step: provetrain's two-pass kernel against torch, and against the memory floor.

    python bench/step.py [--tensors 16 --numel 1000000 --repeats 40 --threads T --device cpu --flush-mb 1024]

Every case runs in the same process on its own copy of the same problem, in interleaved rounds (one call
of each case per round, in turn), so a burst of load from a neighbour hits all cases alike; the table
reports the median over rounds. The gradients (standard normal, global norm ~sqrt(n) >> 1) are copied
back before each timed call, outside the timing: clipping is always active and the moments do not drift.

Cases (see bench/README.md):
    (a) torch.nn.utils.clip_grad_norm_(..., 1.0) + torch.optim.Adam(fused=True)
    (b) torch.nn.utils.clip_grad_norm_(..., 1.0) + torch.optim.Adam() (the default implementation)
    (c) provetrain.ops.fused: pass 1, the clip coefficient in Python, pass 2
    (d) provetrain.Adam(..., clip_value=1.0).step(), end to end, when provetrain.Adam exists
Bandwidth probes give the floor: 32 bytes per parameter over the best bandwidth measured.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from provetrain.ops import fused

BYTES_PER_PARAM = 32  # pass 1 reads g (4); pass 2 reads p, g, m, v (16) and writes p, m, v (12)
CLIP = 1.0


@dataclass
class Case:
    """A timed callable; ``reset`` restores its inputs before each call and is not timed."""

    name: str
    run: Callable[[], object]
    key: str = ""  # "a" to "d" for the cases the ratios use
    reset: Callable[[], object] = lambda: None
    bytes_moved: int | None = None  # for bandwidth probes
    times: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=16, help="number of parameter tensors")
    parser.add_argument("--numel", type=int, default=1_000_000, help="elements per tensor")
    parser.add_argument("--repeats", type=int, default=40, help="timed rounds (after 3 warm-up rounds)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flush-mb", type=int, default=1024, help="cache flush before each call (0: none)")
    return parser.parse_args()


def make_problem(args: argparse.Namespace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    params = [torch.randn(args.numel, generator=generator) for _ in range(args.tensors)]
    grads = [torch.randn(args.numel, generator=generator) for _ in range(args.tensors)]
    return [p.to(args.device) for p in params], [g.to(args.device) for g in grads]


def leaves(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """A fresh copy of the problem as leaf parameters with ``.grad`` set."""
    copies = [p.clone().requires_grad_() for p in params]
    for p, g in zip(copies, grads, strict=True):
        p.grad = g.clone()
    return copies


def copy_grads(targets: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    torch._foreach_copy_(targets, grads)


def torch_cases(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[Case]:
    cases = []
    for label, kwargs in (("(a) clip_grad_norm_ + Adam(fused=True)", {"fused": True}),
                          ("(b) clip_grad_norm_ + Adam() default", {})):  # fmt: skip
        ps = leaves(params, grads)
        opt = torch.optim.Adam(ps, lr=1e-3, **kwargs)

        def step(ps=ps, opt=opt) -> None:
            torch.nn.utils.clip_grad_norm_(ps, CLIP)
            opt.step()

        reset = lambda ps=ps: copy_grads([p.grad for p in ps], grads)  # noqa: E731
        cases.append(Case(label, step, key=label[1], reset=reset))
    return cases


def clip_coefficient_fn() -> tuple[Callable[[float, int], float], str]:
    """``k`` from pass 1's sum: provetrain's bounded coefficient if it exists, else a placeholder."""
    try:
        from provetrain.ops.clip import clip_coefficient

        def k_of(sum_sq: float, numel: int) -> float:
            s = torch.tensor(sum_sq, dtype=torch.float64)
            return float(clip_coefficient(s, CLIP, numel=numel, dtypes=(torch.float32,))[1])

        k_of(4.0, 4)
        return k_of, "provetrain.ops.clip.clip_coefficient"
    except (ImportError, TypeError):

        def k_of(sum_sq: float, numel: int) -> float:
            upper = math.sqrt(sum_sq) * (1 + (numel + 4) * 2.0**-53)
            return min(1.0, CLIP / upper * (1 - 4 * 2.0**-24))

        return k_of, "placeholder formula (provetrain.ops.clip.clip_coefficient not importable)"


def kernel_cases(params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[Case], str]:
    k_of, k_source = clip_coefficient_fn()
    ps = [p.clone() for p in params]
    gs = [g.clone() for g in grads]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    state = {"t": 0}
    beta1, beta2 = 0.9, 0.999

    def update(k: float) -> float:
        state["t"] += 1
        t = state["t"]
        return fused.adam_update_(
            ps, gs, ms, vs, k=k, lr=1e-3, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=0.0,
            decoupled=False, maximize=False, bias_correction1=1 - beta1**t,
            bias_correction2_sqrt=(1 - beta2**t) ** 0.5,
        )  # fmt: skip

    def step() -> None:
        sum_sq, finite = fused.sum_sq_and_finite(gs)
        if finite:  # a skipped step must not run pass 2
            update(k_of(sum_sq, numel))

    sum_sq = fused.sum_sq_and_finite(gs)[0]
    k_fixed = k_of(sum_sq, numel)
    cases = [
        Case("(c) provetrain kernel: pass 1 + k + pass 2", step, key="c"),
        Case("    pass 1 alone: sum of squares, finite", lambda: fused.sum_sq_and_finite(gs)),
        Case("    k alone: clip coefficient from the sum", lambda: k_of(sum_sq, numel)),
        Case("    pass 2 alone: clipped Adam update", lambda: update(k_fixed)),
    ]
    return cases, k_source


def provetrain_adam_case(params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[Case], str]:
    try:
        from provetrain import Adam
    except ImportError:
        try:
            from provetrain.ops.adam import Adam
        except ImportError:
            return [], "provetrain.Adam not importable: case (d) skipped"
    ps = leaves(params, grads)
    opt = Adam(ps, lr=1e-3, clip_value=CLIP)
    case = Case(
        "(d) provetrain.Adam(clip_value=1.0).step()",
        opt.step,
        key="d",
        reset=lambda: copy_grads([p.grad for p in ps], grads),
    )
    path = "fused kernel" if getattr(opt, "_use_fused", None) and opt._use_fused(opt._gather()) else "reference"
    return [case], f"provetrain.Adam takes its {path} path here"


def probe_cases(params: list[torch.Tensor], grads: list[torch.Tensor], with_kernel: bool) -> list[Case]:
    """Streaming kernels with (almost) no arithmetic over the step's own tensor shapes: the bandwidth that
    each access pattern reaches on this working set."""
    n = sum(p.numel() for p in params)
    ps, gs = [p.clone() for p in params], [g.clone() for g in grads]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    cases = [
        Case(
            "torch in-place triad p += s*g (12 B/param)",
            lambda: torch._foreach_add_(ps, gs, alpha=1e-30),
            bytes_moved=12 * n,
        ),
        Case("torch copy m <- g (8 B/param)", lambda: torch._foreach_copy_(ms, gs), bytes_moved=8 * n),
    ]
    if with_kernel:
        cases.append(
            Case(
                "C stream, pass-2 pattern (28 B/param)",
                lambda: fused._bandwidth_probe_(ps, gs, ms, vs),
                bytes_moved=28 * n,
            )
        )
    return cases


def time_rounds(cases: list[Case], repeats: int, device: str, flush_mb: int) -> None:
    """Interleaved rounds; before each timed call, write ``flush_mb`` MB elsewhere so that every case starts
    with none of its data in cache, as an optimizer step does after a forward and backward pass."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    flush = torch.empty(flush_mb * 2**18, device=device)  # float32: 2**18 per MB
    for round_index in range(repeats + 3):
        for case in cases:
            case.reset()
            flush.fill_(round_index)
            sync()
            start = time.perf_counter()
            case.run()
            sync()
            if round_index >= 3:
                case.times.append(time.perf_counter() - start)


def report(cases: list[Case], args: argparse.Namespace, notes: list[str]) -> None:
    n = args.tensors * args.numel
    print(
        f"bench/step.py: {args.tensors} tensors x {args.numel:,} float32 = {n / 1e6:.1f}M params, "
        f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds, "
        f"{args.flush_mb} MB cache flush before each call"
    )
    for note in notes:
        print(f"  note: {note}")
    by_key = {c.key: c for c in cases if c.key}
    print(f"\n{'case':48s} {'median ms':>10s} {'min ms':>8s} {'GB/s':>7s}")
    for c in cases:
        rate = f"{c.bytes_moved / (c.median_ms * 1e6):7.1f}" if c.bytes_moved else ""
        print(f"{c.name:48s} {c.median_ms:10.2f} {min(c.times) * 1e3:8.2f} {rate:>7s}")

    probes = [c for c in cases if c.bytes_moved]
    ours = by_key.get("c") or by_key.get("d")
    print()
    if probes:
        best = max(probes, key=lambda c: c.bytes_moved / c.median_ms)
        bandwidth = best.bytes_moved / (best.median_ms * 1e6)  # GB/s
        floor_ms = BYTES_PER_PARAM * n / (bandwidth * 1e6)
        print(
            f"floor: {BYTES_PER_PARAM} B x {n / 1e6:.1f}M params / {bandwidth:.1f} GB/s "
            f"(best probe: {best.name.split(',')[0].split(' (')[0]}) = {floor_ms:.2f} ms"
        )
    if ours is None:
        return
    for key, target in (("a", ">= 1.2"), ("b", ">= 2.5")):
        if key in by_key:
            print(f"baseline_{key} / ours = {by_key[key].median_ms / ours.median_ms:5.2f}   (target {target})")
    if probes:
        print(f"ours / floor       = {ours.median_ms / floor_ms:5.2f}   (target <= 1.15)")
    if "d" in by_key and ours is not by_key["d"]:
        d = by_key["d"].median_ms
        print(f"baseline_a / provetrain.Adam = {by_key['a'].median_ms / d:5.2f}, provetrain.Adam / ours = "
              f"{d / ours.median_ms:5.2f}")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    params, grads = make_problem(args)
    notes: list[str] = []
    cases = torch_cases(params, grads)
    with_kernel = args.device == "cpu" and fused.fused_available()
    if with_kernel:
        kernel, k_source = kernel_cases(params, grads)
        cases += kernel
        notes.append(f"k from {k_source}")
    elif args.device == "cpu":
        notes.append(f"fused kernel unavailable: {fused.fused_unavailable_reason()}")
    adam, adam_note = provetrain_adam_case(params, grads)
    cases += adam
    notes.append(adam_note)
    cases += probe_cases(params, grads, with_kernel)
    time_rounds(cases, args.repeats, args.device, args.flush_mb)
    report(cases, args, notes)


if __name__ == "__main__":
    main()
