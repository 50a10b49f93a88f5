"""Time one clipped Adam step: provetrain's two-pass kernel against torch, and against the memory floor.

    python bench/step.py [--tensors 16 --numel 1000000 | --model gpt-12l|gpt2-small] [--dtype float32|bfloat16|float16]
                         [--repeats 40 --threads T --device cpu|cuda --flush-mb 1024] [--ops-only]

Every case runs in the same process on its own copy of the same problem, in interleaved rounds (one call
of each case per round, in turn), so a burst of load from a neighbour hits all cases alike; the table
reports the median over rounds. The gradients (standard normal, global norm ~sqrt(n) >> 1) are copied
back before each timed call, outside the timing: clipping is always active and the moments do not drift.

Cases (see bench/README.md):
    (a) torch.nn.utils.clip_grad_norm_(..., 1.0) + torch.optim.Adam(fused=True)
    (b) torch.nn.utils.clip_grad_norm_(..., 1.0) + torch.optim.Adam() (the default implementation)
    (c) provetrain.ops.fused: pass 1, the clip coefficient in Python, pass 2
    (d) provetrain.Adam(..., clip_value=1.0).step(), end to end, on its default path
    (e) provetrain.Adam(..., clip_value=1.0, foreach=True).step(): the multi-tensor path
    (f) provetrain.Adam(..., clip_value=1.0, fused=False).step(): the reference path
After the timings: dispatched aten ops per step at 10, 100 and 1000 tensors for (a), (d), (e), (f) and, on
CPU, (e)'s device branch (what a CUDA step dispatches, run on CPU with host reads off), and the bytes each
path allocates per step (fresh tensors made by its ops), against the parameter bytes.
Bandwidth probes give the floor: 32 bytes per parameter over the best bandwidth measured.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from provetrain import Adam
from provetrain.ops import adam as adam_module
from provetrain.ops import fused
from provetrain.ops import multi_tensor as multi_tensor_module

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
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter dtype")
    parser.add_argument("--model", default=None, choices=sorted(MODELS), help="a GPT's parameter shapes instead")
    parser.add_argument("--ops-only", action="store_true", help="print op counts and allocations only")
    return parser.parse_args()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gpt_shapes(layers: int, width: int, vocab: int, block: int) -> list[tuple[int, ...]]:
    """nanoGPT's parameter shapes (tied head): 12 per block, embeddings and the final norm."""
    block_shapes = [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                    (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]  # fmt: skip
    return [(vocab, width), (block, width), *block_shapes * layers, (width,), (width,)]


MODELS = {
    # A 12-layer, 256-wide character GPT: 9.6M parameters in 148 tensors.
    "gpt-12l": gpt_shapes(12, 256, 65, 256),
    # GPT-2 small: 124M parameters in 148 tensors.
    "gpt2-small": gpt_shapes(12, 768, 50257, 1024),
}


def make_problem(args: argparse.Namespace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    shapes = MODELS[args.model] if args.model else [(args.numel,)] * args.tensors
    dtype = DTYPES[args.dtype]
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    grads = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
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
    """``k`` from pass 1's sum, in Python floats, as provetrain.Adam's C kernel path computes it."""
    from provetrain.ops.clip import clip_coefficient_on_host

    def k_of(sum_sq: float, numel: int) -> float:
        return clip_coefficient_on_host(sum_sq, CLIP, numel=numel, dtypes=(torch.float32,))[1]

    return k_of, "provetrain.ops.clip.clip_coefficient_on_host"


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


PROVETRAIN_PATHS = {
    "d": ("(d) provetrain.Adam(clip_value=1.0) default", {}),
    "e": ("(e) provetrain.Adam(..., foreach=True)", {"foreach": True}),
    "f": ("(f) provetrain.Adam(..., fused=False) reference", {"fused": False}),
}


def default_path(opt: Adam) -> str:
    return {"fused": "C kernel", "multi_tensor": "multi-tensor", "reference": "reference"}[
        opt._choose_path(opt._gather())
    ]


def provetrain_adam_cases(params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[Case], str]:
    cases = []
    for key, (label, kwargs) in PROVETRAIN_PATHS.items():
        ps = leaves(params, grads)
        opt = Adam(ps, lr=1e-3, clip_value=CLIP, **kwargs)
        if key == "d":
            note = f"(d) takes provetrain.Adam's {default_path(opt)} path here"
        reset = lambda ps=ps: copy_grads([p.grad for p in ps], grads)  # noqa: E731
        cases.append(Case(label, opt.step, key=key, reset=reset))
    return cases, note


class CountOps(TorchDispatchMode):
    """Counts dispatched aten ops and the bytes of the fresh tensors they return (not views or in-place)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.fresh_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if t.untyped_storage().data_ptr() not in inputs:
                inputs.add(t.untyped_storage().data_ptr())
                self.fresh_bytes += t.untyped_storage().nbytes()
        return out


def _tensors(tree: object) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def count_step(make_step: Callable[[list[torch.Tensor]], Callable[[], object]], params, grads) -> CountOps:
    """Ops and fresh bytes of the second call (the first creates the optimizer state)."""
    ps = leaves(params, grads)
    step = make_step(ps)
    step()
    copy_grads([p.grad for p in ps], grads)
    with CountOps() as counter:
        step()
    return counter


def step_makers() -> dict[str, Callable[[list[torch.Tensor]], Callable[[], object]]]:
    def torch_fused(ps: list[torch.Tensor]) -> Callable[[], object]:
        opt = torch.optim.Adam(ps, lr=1e-3, fused=True)
        return lambda: (torch.nn.utils.clip_grad_norm_(ps, CLIP), opt.step())

    makers = {"a": torch_fused}
    for key, (_, kwargs) in PROVETRAIN_PATHS.items():
        makers[key] = lambda ps, kwargs=kwargs: Adam(ps, lr=1e-3, clip_value=CLIP, **kwargs).step
    return makers


@contextlib.contextmanager
def device_branch() -> Iterator[None]:
    """Run, on CPU, the multi-tensor path's device branch (what a CUDA step dispatches): no free host reads,
    torch's norms for pass 1 instead of the C kernel's."""
    saved = adam_module._FREE_CPU_READS, multi_tensor_module._C_PASS1_ON_CPU
    adam_module._FREE_CPU_READS = multi_tensor_module._C_PASS1_ON_CPU = False
    try:
        yield
    finally:
        adam_module._FREE_CPU_READS, multi_tensor_module._C_PASS1_ON_CPU = saved


def report_ops_and_memory(args: argparse.Namespace, params, grads) -> None:
    makers = step_makers()
    dtype = DTYPES[args.dtype]
    on_cpu = args.device == "cpu"
    print(
        f"\ndispatched ops per step ({args.dtype}, tensors of 1,000 elements; torch = (a); every op the mode "
        "sees, the optimizer's two profiler markers included on each side)"
        + ("; (e dev): (e)'s device branch, what CUDA dispatches, run on CPU with host reads off" if on_cpu else "")
        + ":"
    )
    columns = [*makers, *(["e dev"] if on_cpu else [])]
    ratio = "(e dev)/(a)" if on_cpu else "(e)/(a)"
    print(f"{'tensors':>8s} " + " ".join(f"{'(' + key + ')':>7s}" for key in columns) + f"   {ratio}")
    for count in (10, 100, 1000):
        small = [torch.randn(1000, dtype=torch.float32).to(args.device, dtype) for _ in range(count)]
        ops = {key: count_step(make, small, small).ops for key, make in makers.items()}
        if on_cpu:
            with device_branch():
                ops["e dev"] = count_step(makers["e"], small, small).ops
        top = ops["e dev" if on_cpu else "e"]
        print(f"{count:8d} " + " ".join(f"{ops[key]:7d}" for key in columns) + f"   {top / ops['a']:6.2f}")
    print("  target: (e) and its device branch at most 2x (a), constant in the tensor count")
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    print(
        f"\nmemory one step allocates (torch.profiler, CPU allocations inside ops included; a bound on the "
        f"transient peak), over the parameter bytes ({param_bytes / 2**20:.0f} MiB):"
    )
    for key, make in makers.items():
        total = allocated_bytes(make, params, grads)
        print(f"  ({key}) {total / 2**20:9.1f} MiB = {total / param_bytes:5.2f}x")


def allocated_bytes(make_step, params, grads) -> int:
    """Bytes allocated during the second step: the ops' allocations from the profiler's memory records."""
    ps = leaves(params, grads)
    step = make_step(ps)
    step()
    copy_grads([p.grad for p in ps], grads)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if ps[0].is_cuda else [])]
    with profile(activities=activities, profile_memory=True) as prof:
        step()
    usage = [e.self_cpu_memory_usage + e.self_device_memory_usage for e in prof.key_averages()]
    return sum(u for u in usage if u > 0)


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


def report(cases: list[Case], args: argparse.Namespace, notes: list[str], n: int, tensors: int) -> None:
    shape = args.model or f"{args.tensors} tensors x {args.numel:,}"
    print(
        f"bench/step.py: {shape} {args.dtype} = {n / 1e6:.1f}M params in {tensors} tensors, "
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
    for key in ("d", "e", "f"):
        if key in by_key and "a" in by_key:
            print(f"baseline_a / ({key}) = {by_key['a'].median_ms / by_key[key].median_ms:5.2f}   "
                  f"{PROVETRAIN_PATHS[key][0][4:]}")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    params, grads = make_problem(args)
    if args.ops_only:
        report_ops_and_memory(args, params, grads)
        return
    notes: list[str] = []
    cases = torch_cases(params, grads)
    with_kernel = args.device == "cpu" and args.dtype == "float32" and not args.model and fused.fused_available()
    if args.device == "cpu" and fused.fused_available():
        notes.append(f"C kernel memory walk: {fused.access_pattern()} (ops/kernels/adam_step.c says why)")
    if with_kernel:
        kernel, k_source = kernel_cases(params, grads)
        cases += kernel
        notes.append(f"k from {k_source}")
    elif args.device == "cpu" and not fused.fused_available():
        notes.append(f"fused kernel unavailable: {fused.fused_unavailable_reason()}")
    elif args.device == "cpu":
        notes.append(f"no (c) cases for {args.model or args.dtype}: they time the C kernel's float32 path")
    adam, adam_note = provetrain_adam_cases(params, grads)
    cases += adam
    notes.append(adam_note)
    cases += probe_cases(params, grads, with_kernel)
    time_rounds(cases, args.repeats, args.device, args.flush_mb)
    report(cases, args, notes, sum(p.numel() for p in params), len(params))
    report_ops_and_memory(args, params, grads)


if __name__ == "__main__":
    main()
