r"""Two-pass clipped, finite-guarded Adam/AdamW step for float32 CPU tensors, in C.

One optimizer step touches memory twice:

1. :func:`sum_sq_and_finite` reads every gradient once and returns :math:`S = \sum_i g_i^2` in float64 and
   whether every element is finite.
2. :func:`adam_update_` reads ``p, g, m, v`` once and writes ``p, m, v`` once. The clipped gradient
   :math:`y_i = \mathrm{fl}_{32}(\mathrm{fl}_{64}(g_i \cdot k))` is formed in registers, never stored.

That is 32 bytes per parameter, the least a clipped Adam step can move. The caller computes ``k`` from
``S`` between the passes and decides from the finite flag whether to step at all: **pass 2 must not run on
a skipped step**, since it advances ``m`` and ``v``.

The kernel (``kernels/adam_step.c``) is compiled at first use with the system C compiler and loaded with
ctypes; no torch headers are involved, so a build takes well under a second. The shared library is cached
under ``$PROVETRAIN_CACHE_DIR/kernels/<key>/`` (default ``~/.cache/provetrain``), where ``key`` hashes the
source, the flags, the compiler's predefined macros (its version and the target ISA that ``-march=native``
selects) and the platform, so a cache shared between machines never serves a library built for another
CPU. Builds go to a temporary file renamed into place, so concurrent processes are safe; a failed build
leaves its log there, so the next process goes straight to the next set of flags. Set
``PROVETRAIN_DISABLE_KERNEL=1`` to turn the kernel off; without a compiler, or when the build fails,
:func:`fused_available` is False and :func:`fused_unavailable_reason` says why. Nothing is built or raised
at import.

Work is split into one contiguous range of the concatenated elements per thread
(``torch.get_num_threads()``), run on torch's own OpenMP threads when the compiler supports ``-fopenmp``
(libgomp is shared by soname), else on Python threads (ctypes releases the GIL). Sharing torch's runtime
matters: its workers spin for a while after every torch op, and a thread of our own would wait for the
core they hold (pass 2: 8.7 ms with OpenMP, 11.9 ms with Python threads, 2 cores).

Guarantees:
    * ``y`` is bit-identical to ``round_to_dtype(float64(g) * k)`` (the clipped value of the contract's
      ``gradient_norm`` clause); ``k == 1.0`` leaves ``g`` unchanged bit for bit.
    * The float64 sums are the exact sums of exactly representable squares, accumulated in some order:
      their relative error is at most :math:`\gamma_{n-1} = (n-1)u/(1-(n-1)u)`, :math:`u = 2^{-53}`. A sum of
      squares of finite float32 values cannot overflow float64, so ``S`` is finite iff every ``g`` is.
    * The Adam arithmetic follows ``torch.optim.Adam(foreach=False)`` operation by operation, with torch's
      float32 rounding of each scalar and the fused multiply-adds of torch's vectorised CPU kernels. The
      one known difference is ``sqrt``: torch's MKL build rounds ``exp_avg_sq.sqrt()`` one ulp low in about
      0.7% of elements, ours is correctly rounded.
    * Everything is the same bits whatever the thread count: ``params``, ``exp_avgs`` and
      ``exp_avg_sqs`` are elementwise, and the float64 sums are formed per fixed block of 65,536 elements
      of the concatenation (``PT_BLOCK`` in the C source), added in block order. So ``k``, and with it the
      whole step, agrees across processes that run different thread counts.

Memory access: each span is either streamed front to back (``"streams"``, the default: measured faster on
AMD Zen 4) or prefetched one page ahead and, in pass 2, walked as interleaved parts (``"interleaved"``, the
default on Intel CPUs: measured faster on Sapphire Rapids); the C source gives the figures.
:func:`access_pattern` says which one runs. Both add the same terms into the same accumulators in the same
order: every result is the same bits under either, so processes on Intel and AMD CPUs agree.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import importlib.resources
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

__all__ = [
    "adam_update_",
    "advance_step_counts_",
    "fits_kernel",
    "fused_available",
    "fused_unavailable_reason",
    "is_step_count",
    "sum_sq_and_finite",
    "supports",
    "supports_sum",
]

_ABI_VERSION = 7
_SCALAR_COUNT = 9
# Element types of pass 1 (PT_FLOAT32, PT_BFLOAT16, PT_FLOAT16 in the C source); pass 2 takes float32 only.
_PASS1_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAXIMIZE, _L2, _DECOUPLED, _LERP_LARGE = 1, 2, 4, 8
# Tried in order. -ffp-contract=off keeps the clipped value bit-identical to the torch reference path (the
# explicit fmaf calls in the source are the only fused operations). -fopenmp shares torch's OpenMP threads
# (see the C source for why that matters); the later sets serve compilers without OpenMP or -march=native.
_BASE_FLAGS = ("-std=c11", "-O3", "-fno-math-errno", "-ffp-contract=off", "-fPIC", "-shared")
_FLAG_SETS = (
    (*_BASE_FLAGS, "-march=native", "-fopenmp"),
    (*_BASE_FLAGS, "-march=native"),
    (*_BASE_FLAGS, "-fopenmp"),
    _BASE_FLAGS,
)
# Below this many elements per thread, waking a thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16
_BUILD_TIMEOUT_S = 120
_FAILED = "build-failed.txt"


class _Kernel:
    """The loaded library, the ctypes signatures of its entry points, and how it runs on several threads."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        lib.pt_abi_version.restype = ctypes.c_int
        lib.pt_scalar_count.restype = ctypes.c_int
        if lib.pt_abi_version() != _ABI_VERSION or lib.pt_scalar_count() != _SCALAR_COUNT:
            raise OSError(f"{path} has ABI {lib.pt_abi_version()}, expected {_ABI_VERSION}")
        i64, f64, vp, c_int = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p, ctypes.c_int
        signatures = {
            "pt_openmp": ((), c_int),
            "pt_select_access": ((c_int,), c_int),
            "pt_sum_sq": ((i64, vp, vp, i64, i64, c_int), f64),
            "pt_adam": ((i64, vp, vp, i64, i64, f64, vp, c_int), f64),
            "pt_stream": ((i64, vp, vp, i64, i64), None),
            "pt_block_count": ((i64,), i64),
            "pt_sum_sq_blocks": ((i64, vp, vp, i64, i64, i64, c_int, vp), None),
            "pt_adam_blocks": ((i64, vp, vp, i64, i64, i64, f64, vp, c_int, vp), None),
            "pt_add_in_order": ((vp, i64), f64),
            "pt_sum_sq_mt": ((i64, vp, vp, i64, c_int, c_int, vp), f64),
            "pt_adam_mt": ((i64, vp, vp, i64, f64, vp, c_int, c_int, vp), f64),
            "pt_stream_mt": ((i64, vp, vp, i64, c_int), None),
            "pt_scale": ((vp, vp, i64, f64), None),
            "pt_add_one": ((i64, vp), None),
        }
        for name, (argtypes, restype) in signatures.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = restype
        self.lib = lib
        self.path = path
        self.openmp = bool(lib.pt_openmp())
        self.access = ACCESS_PATTERNS[lib.pt_select_access(-1)]
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key = (-1, 0)  # (pid, workers) the pool was made for

    def run(self, entry: str, total: int, addrs: array.array, numels: array.array, *extra) -> float:
        """Run ``entry`` (``pt_sum_sq``, ``pt_adam``, ``pt_stream``) over ``[0, total)`` on torch's thread
        count and return its float64 sum (0.0 for ``pt_stream``).

        The sums are formed per fixed block of the concatenation and added in block order, so they are the
        same bits for every thread count; threads take contiguous runs of blocks.
        """
        head = (len(numels), addrs.buffer_info()[0], numels.buffer_info()[0])
        threads = max(1, min(torch.get_num_threads(), total // _MIN_ELEMENTS_PER_THREAD))
        if entry == "pt_stream":
            return self._stream(head, total, threads)
        blocks = self.lib.pt_block_count(total)
        partial = (ctypes.c_double * max(blocks, 1))()
        if self.openmp or threads == 1:
            return getattr(self.lib, entry + "_mt")(*head, total, *extra, threads, partial)
        fn = getattr(self.lib, entry + "_blocks")
        edges = [blocks * t // threads for t in range(threads + 1)]
        pool = self._thread_pool(threads - 1)
        futures = [pool.submit(fn, *head, total, edges[t], edges[t + 1], *extra, partial) for t in range(1, threads)]
        fn(*head, total, edges[0], edges[1], *extra, partial)
        for future in futures:
            future.result()
        return self.lib.pt_add_in_order(partial, blocks)

    def _stream(self, head: tuple[int, int, int], total: int, threads: int) -> float:
        if self.openmp or threads == 1:
            self.lib.pt_stream_mt(*head, total, threads)
            return 0.0
        bounds = [total * t // threads // 64 * 64 for t in range(threads)] + [total]
        pool = self._thread_pool(threads - 1)
        futures = [pool.submit(self.lib.pt_stream, *head, bounds[t], bounds[t + 1]) for t in range(1, threads)]
        self.lib.pt_stream(*head, bounds[0], bounds[1])
        for future in futures:
            future.result()
        return 0.0

    def _thread_pool(self, workers: int) -> ThreadPoolExecutor:
        # A pool inherited through fork() has no threads behind it: make a fresh one in the child.
        pid = os.getpid()
        if self._pool is None or self._pool_key[0] != pid or self._pool_key[1] < workers:
            if self._pool is not None and self._pool_key[0] == pid:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provetrain-adam")
            self._pool_key = (pid, workers)
        return self._pool


_lock = threading.Lock()
_kernel: _Kernel | None = None
_reason: str | None = None
_loaded = False


def fused_available() -> bool:
    """Whether the C kernel is usable here; builds and loads it on the first call."""
    return _load() is not None


ACCESS_PATTERNS = ("streams", "interleaved")
"""The kernel's memory access patterns, in the C source's order (``PT_STREAMS``, ``PT_INTERLEAVED``)."""


def access_pattern() -> str | None:
    """The access pattern the loaded kernel uses (one of :data:`ACCESS_PATTERNS`), or None without a kernel."""
    kernel = _load()
    return None if kernel is None else kernel.access


def _select_access_pattern(pattern: str | None) -> str:
    """Make the kernel use ``pattern`` (None: this machine's default); for tests and ``bench/step.py``."""
    kernel = _require_kernel()
    code = -1 if pattern is None else ACCESS_PATTERNS.index(pattern)
    kernel.access = ACCESS_PATTERNS[kernel.lib.pt_select_access(code)]
    return kernel.access


def fused_unavailable_reason() -> str | None:
    """Why :func:`fused_available` is False (disabled, no compiler, build error), or None when it is True."""
    _load()
    return _reason


def supports(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the kernel can take these tensors: plain (not subclassed), CPU, float32, dense and contiguous."""
    return all(map(_is_supported, tensors))


def supports_sum(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether pass 1 can take these tensors: plain, CPU, dense, contiguous, all float32, all bfloat16 or all
    float16."""
    if not tensors:
        return True
    dtype = tensors[0].dtype
    return dtype in _PASS1_DTYPES and all(_is_plain_cpu_contiguous(t, dtype) for t in tensors)


def sum_sq_and_finite(grads: Sequence[torch.Tensor], *, check: bool = True) -> tuple[float, bool]:
    """Pass 1: the float64 sum of squares of every element of ``grads``, and whether all are finite.

    Args:
        grads: CPU contiguous tensors, all float32, all bfloat16 or all float16 (see :func:`supports_sum`);
            each square is exact in float64 for all three.
        check: ``False`` skips the per-tensor check, for a caller that has checked with :func:`supports`
            this step (the kernel reads raw memory: an unsupported tensor would be read wrongly).

    Returns:
        ``(S, finite)``: ``S`` is the float64 sum over all elements of ``float64(g)**2``, with relative error
        at most gamma_{n-1}; ``finite`` is False iff some element is NaN or infinite (``S`` is then NaN or
        inf).
    """
    kernel = _require_kernel()
    dtype = grads[0].dtype if grads else torch.float32
    if check and not supports_sum(grads):
        for i, t in enumerate(grads):
            if not any(_is_plain_cpu_contiguous(t, d) for d in _PASS1_DTYPES):
                raise ValueError(
                    f"grads[{i}] is a {t.dtype} {t.layout} tensor on {t.device}"
                    f"{'' if t.layout is not torch.strided or t.is_contiguous() else ' (not contiguous)'}; pass 1 "
                    "takes contiguous float32, bfloat16 or float16 CPU tensors only: check `supports_sum(...)` first"
                )
        other = next(t.dtype for t in grads if t.dtype is not dtype)
        raise ValueError(
            f"grads mixes {str(dtype).removeprefix('torch.')} and {str(other).removeprefix('torch.')} tensors; "
            "pass 1 takes one dtype per call"
        )
    addrs, numels = [t.data_ptr() for t in grads], [t.numel() for t in grads]
    total = sum(numels)
    if total == 0:
        return 0.0, True
    result = kernel.run("pt_sum_sq", total, _table(addrs), _table(numels), _PASS1_DTYPES[dtype])
    return result, math.isfinite(result)


def adam_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    k: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    check: bool = True,
) -> float:
    r"""Pass 2: clip by ``k`` and take one Adam (or AdamW) step, in place on params and moments.

    Per element, in float32 except the clip product, as ``torch.optim.Adam(foreach=False)`` computes it:

    .. math::
        y &= \mathrm{fl}_{32}(\mathrm{fl}_{64}(g \cdot k)), \qquad y \leftarrow -y \text{ if maximize}\\
        y &\leftarrow y + \lambda p \text{ (Adam)}, \qquad p \leftarrow p (1 - \eta\lambda) \text{ (AdamW)}\\
        m &\leftarrow m + (1-\beta_1)(y - m), \qquad v \leftarrow \beta_2 v + (1-\beta_2) y^2\\
        p &\leftarrow p - \frac{\eta}{b_1} \frac{m}{\sqrt{v}/\sqrt{b_2} + \epsilon}

    The caller has already advanced the step count into ``bias_correction1`` (:math:`b_1 = 1-\beta_1^t`)
    and ``bias_correction2_sqrt`` (:math:`\sqrt{b_2}`, :math:`b_2 = 1-\beta_2^t`). Never call this on a
    step that the finite guard skips: it advances ``m`` and ``v``. ``check=False`` skips the per-tensor
    checks (not the shape and aliasing checks), for a caller that has checked with :func:`supports`.

    Returns:
        The float64 sum of :math:`y^2` over all elements, taken before ``maximize`` and weight decay: the
        squared norm of the clipped gradient, which the contract's ``grad_norm <= clip_value``
        postcondition checks.
    """
    kernel = _require_kernel()
    addrs, numels = _describe_update(params, grads, exp_avgs, exp_avg_sqs, check=check)
    _check_scalars(k, bias_correction1, bias_correction2_sqrt)
    total = sum(numels)
    if total == 0:
        return 0.0
    scalars, flags = _update_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                                     bias_correction1, bias_correction2_sqrt)  # fmt: skip
    result = kernel.run("pt_adam", total, _table(addrs), _table(numels), float(k), scalars, flags)
    # The writes went through raw pointers: tell autograd, as torch's own in-place ops do.
    torch._C._increment_version([*params, *exp_avgs, *exp_avg_sqs])
    return result


def advance_step_counts_(counts: Sequence[torch.Tensor], *, check: bool = True) -> None:
    """Add 1 to each 0-d float32 CPU step count in place, through its memory, in one call: one
    ``_foreach_add_`` over hundreds of 0-d tensors costs about 3.5 us each on CPU, this about 0.1 us.
    Exact below ``2^24``. ``check=False`` skips the per-count check, for a caller that has made it."""
    if check:
        for i, t in enumerate(counts):
            if not is_step_count(t):
                raise ValueError(f"counts[{i}] is a {t.dtype} tensor of {t.numel()} elements on {t.device}; "
                                 "expected a 0-d float32 CPU step count")  # fmt: skip
    if not counts:
        return
    addrs = _table([t.data_ptr() for t in counts])
    _require_kernel().lib.pt_add_one(len(counts), addrs.buffer_info()[0])
    torch._C._increment_version(list(counts))


def _bandwidth_probe_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
) -> None:
    """Pass 2's memory traffic without its arithmetic (adds ``g`` to the other three): for bench/step.py."""
    kernel = _require_kernel()
    addrs, numels = _describe_update(params, grads, exp_avgs, exp_avg_sqs)
    kernel.run("pt_stream", sum(numels), _table(addrs), _table(numels))


def _update_scalars(
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    bias_correction1: float,
    bias_correction2_sqrt: float,
) -> tuple[ctypes.Array, int]:
    """The kernel's float32 scalars, computed in float64 as torch's Python code does, then rounded."""
    w1 = _to_float32(1 - beta1)
    values = (
        weight_decay,
        1 - lr * weight_decay,
        w1,
        _to_float32(w1 - 1.0),  # torch's float32 ``1 - weight`` in lerp's large-weight branch
        beta2,
        1 - beta2,
        bias_correction2_sqrt,
        eps,
        -(lr / bias_correction1),
    )
    flags = _MAXIMIZE if maximize else 0
    if weight_decay != 0:
        flags |= _DECOUPLED if decoupled else _L2
    if not abs(w1) < 0.5:
        flags |= _LERP_LARGE
    return (ctypes.c_float * _SCALAR_COUNT)(*values), flags


def _to_float32(x: float) -> float:
    return ctypes.c_float(x).value


def _table(values: list[int]) -> array.array:
    """An int64 array whose buffer the kernel reads; the caller keeps it alive across the call."""
    return array.array("q", values)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _is_plain_cpu_contiguous(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.is_cpu
        and t.dtype is dtype
        and t.layout is torch.strided
        and t.is_contiguous()
    )


def fits_kernel(tensors: Sequence[torch.Tensor]) -> bool:
    """:func:`supports` for tensors already known to be plain (a tensor's Python type cannot change): float32,
    CPU and contiguous, read again each time since ``.data``, ``set_`` or ``resize_`` may change them."""
    float32 = torch.float32
    return all(t.dtype is float32 and t.is_cpu and t.is_contiguous() for t in tensors)


def is_step_count(t: torch.Tensor) -> bool:
    """Whether ``t`` is a step count :func:`advance_step_counts_` can write: a plain 0-d or one-element
    float32 CPU tensor."""
    return type(t) in _PLAIN_TENSOR_TYPES and t.is_cpu and t.dtype is torch.float32 and t.numel() == 1


def _is_supported(t: torch.Tensor) -> bool:
    # is_cpu and `dtype is` are ~0.04 us each, against ~0.25 us for t.device.type: this runs per tensor.
    # Tensor subclasses (DTensor shards, wrappers) are refused: their data_ptr is not the whole tensor's
    # storage, and the kernel would read or write past it.
    return (
        type(t) in _PLAIN_TENSOR_TYPES
        and t.is_cpu
        and t.dtype is torch.float32
        and t.layout is torch.strided
        and t.is_contiguous()
    )


def _describe(name: str, tensors: Sequence[torch.Tensor], *, check: bool = True) -> tuple[list[int], list[int]]:
    """Addresses and element counts of ``tensors``, after checking that the kernel supports each one."""
    if not check:
        return [t.data_ptr() for t in tensors], [t.numel() for t in tensors]
    addrs, numels = [], []
    for i, t in enumerate(tensors):
        if not _is_supported(t):
            raise ValueError(
                f"{name}[{i}] is a {t.dtype} {t.layout} tensor on {t.device}"
                f"{'' if t.layout is not torch.strided or t.is_contiguous() else ' (not contiguous)'}; the "
                "fused kernel takes contiguous float32 CPU tensors only. Check "
                "`provetrain.ops.fused.supports(...)` first and use the reference path otherwise."
            )
        addrs.append(t.data_ptr())
        numels.append(t.numel())
    return addrs, numels


def _describe_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    check: bool = True,
) -> tuple[list[int], list[int]]:
    """Addresses (params, grads, exp_avgs, exp_avg_sqs in turn) and the per-parameter element counts."""
    groups = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    addrs, numels = _describe("params", params, check=check)
    for name, group in list(groups.items())[1:]:
        if len(group) != len(params):
            raise ValueError(f"{name} has {len(group)} tensors but params has {len(params)}; pass one per parameter.")
        group_addrs, group_numels = _describe(name, group, check=check)
        if group_numels != numels:
            i = next(i for i, (a, b) in enumerate(zip(group_numels, numels, strict=True)) if a != b)
            raise ValueError(
                f"{name}[{i}] has {group_numels[i]} elements but params[{i}] has {numels[i]}; each state "
                "tensor must match its parameter."
            )
        addrs += group_addrs
    distinct = [a for a, n in zip(addrs, numels * 4, strict=True) if n]
    if len(set(distinct)) != len(distinct):
        raise ValueError(
            "a tensor appears twice among params, grads, exp_avgs and exp_avg_sqs (same data_ptr); the "
            "update is in place and needs every tensor distinct."
        )
    return addrs, numels


def _check_scalars(k: float, bias_correction1: float, bias_correction2_sqrt: float) -> None:
    if not (math.isfinite(k) and k >= 0):
        raise ValueError(f"k={k!r} must be finite and >= 0: it is the clip coefficient computed from pass 1.")
    for name, value in (("bias_correction1", bias_correction1), ("bias_correction2_sqrt", bias_correction2_sqrt)):
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0: compute it from a step count >= 1.")


def _require_kernel() -> _Kernel:
    kernel = _load()
    if kernel is None:
        raise RuntimeError(
            f"the fused Adam kernel is unavailable ({_reason}); check `fused_available()` before calling "
            "and use the reference path otherwise."
        )
    return kernel


def _load() -> _Kernel | None:
    global _kernel, _reason, _loaded
    if _loaded:
        return _kernel
    with _lock:
        if not _loaded:
            try:
                _kernel, _reason = _build_and_load(), None
            except _Unavailable as error:
                _kernel, _reason = None, str(error)
            _loaded = True
    return _kernel


class _Unavailable(Exception):
    """Why the kernel cannot be used: the message is what :func:`fused_unavailable_reason` reports."""


def _build_and_load(cache_root: Path | None = None) -> _Kernel:
    if os.environ.get("PROVETRAIN_DISABLE_KERNEL", "").strip() not in ("", "0"):
        raise _Unavailable("disabled by PROVETRAIN_DISABLE_KERNEL")
    root = cache_root or _cache_root()
    source = importlib.resources.files("provetrain.ops").joinpath("kernels/adam_step.c")
    with importlib.resources.as_file(source) as source_path:
        compiler = _find_compiler()
        errors = []
        for flags in _FLAG_SETS:
            try:
                path = _build(compiler, flags, source_path, root)
            except _Unavailable as error:
                errors.append(str(error))
                continue
            try:
                return _Kernel(path)
            except OSError:
                # A damaged or foreign file in the cache: rebuild it once, in place.
                return _Kernel(_build(compiler, flags, source_path, root, force=True))
        raise _Unavailable("; ".join(errors))


def _find_compiler() -> list[str]:
    configured = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    candidates = [shlex.split(configured)] if configured.strip() else []
    candidates += [["cc"], ["gcc"], ["clang"]]
    for argv in candidates:
        if shutil.which(argv[0]):
            return argv
    raise _Unavailable(f"no C compiler found (tried {', '.join(c[0] for c in candidates)}; set CC)")


def _cache_root() -> Path:
    configured = os.environ.get("PROVETRAIN_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "provetrain"


def _build(compiler: list[str], flags: tuple[str, ...], source: Path, root: Path, force: bool = False) -> Path:
    """Compile ``source`` into ``root/kernels/<key>/adam_step.so`` unless it (or its failure) is cached."""
    identity = _compiler_identity(compiler, flags)
    key = hashlib.sha256(
        b"\0".join(
            [source.read_bytes(), " ".join([*compiler, *flags]).encode(), identity.encode(),
             f"{sys.platform} {platform.machine()} abi{_ABI_VERSION}".encode()]
        )
    ).hexdigest()  # fmt: skip
    directory = root / "kernels" / key
    target = directory / "adam_step.so"
    if not force:
        if target.exists():
            return target
        if (directory / _FAILED).exists():
            raise _Unavailable((directory / _FAILED).read_text())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(prefix=".adam_step-", suffix=".so", dir=directory)
        os.close(fd)
    except OSError as error:
        raise _Unavailable(f"cannot write the kernel cache at {directory}: {error}") from error
    try:
        command = [*compiler, *flags, "-o", scratch, str(source), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            failure = f"`{shlex.join(command)}` failed: {done.stderr.strip()[-2000:]}"
            (directory / _FAILED).write_text(failure)
            raise _Unavailable(failure)
        os.replace(scratch, target)  # atomic: other processes see no file or a whole one
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"building the kernel with {compiler[0]} failed: {error}") from error
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


def _compiler_identity(compiler: list[str], flags: tuple[str, ...]) -> str:
    """The compiler's predefined macros under ``flags``: its version and the ISA ``-march=native`` picks."""
    preprocess = [f for f in flags if f not in ("-shared", "-fPIC")]
    command = [*compiler, *preprocess, "-dM", "-E", "-x", "c", os.devnull]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise _Unavailable(f"cannot run the C compiler {compiler[0]}: {error}") from error
    if done.returncode != 0:
        raise _Unavailable(f"`{shlex.join(command)}` failed: {done.stderr.strip()[-2000:]}")
    return "\n".join(sorted(done.stdout.splitlines()))
