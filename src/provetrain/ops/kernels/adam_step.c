/*
 * adam_step.c: a clipped, finite-guarded Adam/AdamW step for float32 CPU tensors in two memory passes.
 *
 *   pass 1  pt_sum_sq:  reads g once; returns sum over all elements of (double)g * (double)g.
 *                       The sum is finite iff every g is finite: a finite float squared is below 1.2e77,
 *                       so fewer than 1e231 of them cannot overflow a double, while NaN and Inf propagate.
 *   pass 2  pt_adam:    reads p, g, m, v once and writes p, m, v once; the clipped gradient
 *                       y = (float)((double)g * k) lives in registers only. Returns sum of (double)y^2.
 *
 * Both take a half-open range [begin, end) of element indices into the concatenation of the tensors. The
 * _mt entry points split [0, total) into one range per thread. Built with -fopenmp they run the ranges on
 * OpenMP threads: loaded into a torch process, that is torch's own OpenMP runtime (libgomp is found by its
 * soname, already loaded), whose workers are still spinning from the last torch op and pick the work up at
 * once, where a thread of our own would wait for a core they occupy (pass 2: 8.7 ms against 11.9 ms with
 * Python threads, 2 cores). Built without OpenMP they run the ranges one after another, and fused.py
 * calls the single-range entry points from Python threads instead (ctypes releases the GIL).
 *
 * Floating point: built with -ffp-contract=off so that no product is fused behind our back; the only fused
 * multiply-adds are the explicit fmaf calls below, placed exactly where torch's vectorised CPU kernels
 * (lerp_, addcmul_, add(alpha=)) use one, so the Adam arithmetic follows torch's single-tensor Adam
 * operation by operation. The double-precision accumulators use separate lanes, not reassociation, so the
 * per-range sums are deterministic.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PT_ABI_VERSION 7
/* The float64 sums are formed per block of PT_BLOCK elements of the concatenation, whatever thread runs it,
 * and the block sums are added in block order: the result does not depend on the thread count. */
#define PT_BLOCK 65536
/* Element types pass 1 reads (pass 2 takes float32 only). */
#define PT_FLOAT32 0
#define PT_BFLOAT16 1
#define PT_FLOAT16 2
#define LANES 16
#define PT_MAX_THREADS 1024

/*
 * Access pattern, chosen once per process (pt_select_access), since the two machines this was measured on
 * disagree. One thread, 16M float32 from DRAM (bench/step.py --threads 1):
 *
 *   PT_STREAMS      every span is read front to back and the hardware prefetchers follow. AMD EPYC (Zen 4,
 *                   2-vCPU KVM): pass 1 2.3 ms, pass 2 9.2 ms, a no-arithmetic probe of pass 2's traffic
 *                   8.7 ms (51.8 GB/s). The default everywhere but on Intel.
 *   PT_INTERLEAVED  every stream is prefetched PT_PREFETCH_AHEAD elements (one 4 KiB page) ahead, across the
 *                   page boundaries where the hardware prefetchers stop, and pass 2 walks each span as
 *                   PASS2_PARTS contiguous parts in lockstep, so one core keeps more cache-line fills in
 *                   flight. Sapphire Rapids (2-vCPU VM): pass 2 23.3 ms -> 19.3 ms (prefetch) -> 16.1 ms
 *                   (2 parts); pass 1 13.2 ms -> 6.5 ms (prefetch) -> 4.0 ms (4 parts, so 64 accumulators
 *                   instead of 16; pass 1 now keeps the 64 in one stream on both: not re-measured on Intel).
 *                   On the Zen 4 above this pattern is the slow one: pass 2
 *                   16.2 ms, the probe 15.1 ms. The default on Intel.
 *
 * The two patterns add the same terms into the same float64 accumulators in the same order (each
 * accumulator's terms by increasing offset); only the order in time across accumulators differs. So every
 * result, the sums included, is the same bits under both: processes on different CPUs agree.
 */
#define PT_STREAMS 0
#define PT_INTERLEAVED 1
#define PASS1_GROUPS 4 /* pass 1: groups of LANES accumulators, PASS1_GROUPS * LANES independent chains */
#define PASS2_PARTS 2
#define PT_PREFETCH_AHEAD 1024
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH_READ(ptr) __builtin_prefetch((ptr) + PT_PREFETCH_AHEAD, 0, 3)
#define PREFETCH_WRITE(ptr) __builtin_prefetch((ptr) + PT_PREFETCH_AHEAD, 1, 3)
#else
#define PREFETCH_READ(ptr) ((void)0)
#define PREFETCH_WRITE(ptr) ((void)0)
#endif

static int access_pattern = PT_STREAMS;

/* pattern < 0: the machine's default (PT_INTERLEAVED on Intel x86, else PT_STREAMS). Returns the one in use.
 * Called once when the library is loaded (and by tests and the benchmark), before any step runs. */
int pt_select_access(int pattern) {
    if (pattern < 0) {
        pattern = PT_STREAMS;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        if (__builtin_cpu_is("intel")) pattern = PT_INTERLEAVED;
#endif
    }
    access_pattern = pattern == PT_INTERLEAVED ? PT_INTERLEAVED : PT_STREAMS;
    return access_pattern;
}

enum {
    PT_MAXIMIZE = 1,     /* y = -y: applied by negating k, since (float)((double)g * -k) == -y exactly */
    PT_L2 = 2,           /* Adam's L2 term: y = y + weight_decay * p */
    PT_DECOUPLED = 4,    /* AdamW: p = p * (1 - lr * weight_decay) before the update */
    PT_LERP_LARGE = 8,   /* |1 - beta1| >= 0.5: torch's lerp takes its other branch */
};

/* Scalars, each already rounded to float the way torch rounds a Python scalar argument. */
enum {
    S_WD,         /* weight_decay                     (grad.add(param, alpha=weight_decay)) */
    S_WD_SCALE,   /* 1 - lr * weight_decay            (param.mul_) */
    S_W1,         /* 1 - beta1                        (exp_avg.lerp_ weight) */
    S_W1_M1,      /* (float)(1 - beta1) - 1.0f        (lerp's large-weight branch) */
    S_BETA2,      /* beta2                            (exp_avg_sq.mul_) */
    S_C2,         /* 1 - beta2                        (addcmul_ value) */
    S_BC2_SQRT,   /* bias_correction2 ** 0.5          (divisor of sqrt(exp_avg_sq)) */
    S_EPS,        /* eps                              (denom.add_) */
    S_NEG_STEP,   /* -(lr / bias_correction1)         (addcdiv_ value) */
    S_COUNT
};

int pt_abi_version(void) { return PT_ABI_VERSION; }

int pt_scalar_count(void) { return S_COUNT; }

int pt_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static double sum_lanes(const double *acc) {
    double s = 0.0;
    for (int j = 0; j < LANES; ++j) s += acc[j];
    return s;
}

/* bfloat16 is the upper half of a float32: widening is a shift, exact. */
static inline __attribute__((always_inline)) double widen_bf16(uint16_t bits) {
    const uint32_t wide = (uint32_t)bits << 16;
    float x;
    memcpy(&x, &wide, sizeof x);
    return x;
}

/* |float16| to float32, exactly, without F16C and without ever forming a float32 subnormal (which a CPU in
 * denormals-are-zero mode, torch.set_flush_denormal(True), would read as 0), in branch-free integer steps that
 * vectorise: the half's exponent and mantissa bits moved to a float's positions, the exponent rebiased by
 * 127 - 15 = 112; an all-ones exponent (infinity, NaN) moved to 255; a subnormal half m 2^-24 built as the
 * normal float 2^-14 (1 + m 2^-10) minus 2^-14 (exact: Sterbenz). The sign is dropped (only squares are
 * taken). Every finite half is tested against torch's conversion, with and without flush-denormal. */
static inline __attribute__((always_inline)) float half_magnitude(uint16_t bits) {
    const uint32_t magnitude = bits & 0x7fffu, exponent = magnitude & 0x7c00u;
    const uint32_t special = 0u - (uint32_t)(exponent == 0x7c00u), subnormal = 0u - (uint32_t)(exponent == 0u);
    const uint32_t moved = (magnitude << 13) + (112u << 23) + (special & (112u << 23)) + (subnormal & (1u << 23));
    const uint32_t offset = subnormal & 0x38800000u; /* 2^-14 for a subnormal half, else +0 */
    float x, y;
    memcpy(&x, &moved, sizeof x);
    memcpy(&y, &offset, sizeof y);
    return x - y;
}

static inline __attribute__((always_inline)) double widen(const void *restrict data, int64_t i, int dtype) {
    if (dtype == PT_BFLOAT16) return widen_bf16(((const uint16_t *)data)[i]);
    if (dtype == PT_FLOAT16) return half_magnitude(((const uint16_t *)data)[i]);
    return ((const float *)data)[i];
}

/* Sum of (double)g^2 over a span of float32 (dtype PT_FLOAT32), bfloat16 (PT_BFLOAT16) or float16
 * (PT_FLOAT16) elements. Each square is exact (mantissas of at most 24 bits squared fit in 53 bits) and the sum
 * is formed in PASS1_GROUPS x LANES float64 accumulators, each element read once (float16 widened
 * PASS1_GROUPS * LANES at a time into a local array first). */
static inline __attribute__((always_inline)) double sum_sq_span_as(const void *restrict data, int64_t n, int dtype,
                                                                   int prefetch) {
    /* Accumulator q (of PASS1_GROUPS, each LANES wide) takes the q-th run of LANES elements of every
     * PASS1_GROUPS * LANES: the span is read front to back, with PASS1_GROUPS * LANES independent chains. */
    double acc[PASS1_GROUPS][LANES] = {{0.0}};
    const int64_t whole = n / (PASS1_GROUPS * LANES) * (PASS1_GROUPS * LANES);
    for (int64_t i = 0; i < whole; i += PASS1_GROUPS * LANES) {
        /* float16 is widened a chunk at a time into registers first: its conversion only vectorises apart */
        float halves[PASS1_GROUPS * LANES];
        if (dtype == PT_FLOAT16)
            for (int k = 0; k < PASS1_GROUPS * LANES; ++k) halves[k] = half_magnitude(((const uint16_t *)data)[i + k]);
        for (int q = 0; q < PASS1_GROUPS; ++q) {
            const int64_t o = i + q * LANES;
            if (prefetch) {
                if (dtype == PT_FLOAT32) PREFETCH_READ((const float *)data + o);
                else PREFETCH_READ((const uint16_t *)data + o);
            }
            for (int j = 0; j < LANES; ++j) {
                const double x = dtype == PT_FLOAT16 ? (double)halves[q * LANES + j] : widen(data, o + j, dtype);
                acc[q][j] = fma(x, x, acc[q][j]);
            }
        }
    }
    double total = 0.0;
    for (int64_t i = whole; i < n; ++i) {
        const double x = widen(data, i, dtype);
        total = fma(x, x, total);
    }
    for (int q = 0; q < PASS1_GROUPS; ++q) total += sum_lanes(acc[q]);
    return total;
}

static double sum_sq_span(const void *g, int64_t n, int dtype) {
    const int prefetch = access_pattern == PT_INTERLEAVED;
    switch (dtype) {
        case PT_BFLOAT16: return prefetch ? sum_sq_span_as(g, n, PT_BFLOAT16, 1) : sum_sq_span_as(g, n, PT_BFLOAT16, 0);
        case PT_FLOAT16: return prefetch ? sum_sq_span_as(g, n, PT_FLOAT16, 1) : sum_sq_span_as(g, n, PT_FLOAT16, 0);
        default: return prefetch ? sum_sq_span_as(g, n, PT_FLOAT32, 1) : sum_sq_span_as(g, n, PT_FLOAT32, 0);
    }
}

/* One element of the update; the flags are compile-time constants in every instantiation below. */
static inline __attribute__((always_inline)) float adam_elem(float *restrict p, const float *restrict g,
                                                             float *restrict m, float *restrict v,
                                                             double k, const float *restrict s, int flags) {
    const float clipped = (float)((double)*g * k); /* the contract's value: double product, one rounding */
    float y = clipped;
    float pv = *p;
    if (flags & PT_L2) y = fmaf(pv, s[S_WD], y);          /* grad.add(param, alpha=weight_decay) */
    if (flags & PT_DECOUPLED) pv = pv * s[S_WD_SCALE];    /* param.mul_(1 - lr * weight_decay) */
    const float mv = *m;
    const float d = y - mv;                                /* exp_avg.lerp_(grad, 1 - beta1) */
    const float mn = (flags & PT_LERP_LARGE) ? fmaf(s[S_W1_M1], d, y) : fmaf(s[S_W1], d, mv);
    const float vn = fmaf(s[S_C2] * y, y, *v * s[S_BETA2]); /* exp_avg_sq.mul_(beta2).addcmul_(grad, grad) */
    const float denom = sqrtf(vn) / s[S_BC2_SQRT] + s[S_EPS];
    *p = pv + (s[S_NEG_STEP] * mn) / denom;                /* param.addcdiv_(exp_avg, denom, value=-step) */
    *m = mn;
    *v = vn;
    return clipped;
}

/* The interleaved walk's prefetch of pass 2's four streams at element offset o. */
static inline __attribute__((always_inline)) void prefetch_pass2(const float *p, const float *g, const float *m,
                                                                 const float *v, int64_t o) {
    PREFETCH_WRITE(p + o);
    PREFETCH_READ(g + o);
    PREFETCH_WRITE(m + o);
    PREFETCH_WRITE(v + o);
}

static inline __attribute__((always_inline)) double adam_span(float *restrict p, const float *restrict g,
                                                              float *restrict m, float *restrict v, int64_t n,
                                                              double k, const float *restrict s, int flags,
                                                              int interleaved) {
    /* Accumulator q takes part q = [q * part, (q + 1) * part) of the span (and the tail goes to `total`),
     * whichever the walk: interleaved runs the parts in lockstep, streams runs part 0 then part 1. */
    double acc[PASS2_PARTS][LANES] = {{0.0}};
    const int64_t part = n / PASS2_PARTS / LANES * LANES;
    const int rounds = interleaved ? 1 : PASS2_PARTS, lockstep = interleaved ? PASS2_PARTS : 1;
    for (int r = 0; r < rounds; ++r)
        for (int64_t i = 0; i < part; i += LANES)
            for (int l = 0; l < lockstep; ++l) {
                const int q = r + l;
                const int64_t o = q * part + i;
                if (interleaved) prefetch_pass2(p, g, m, v, o);
                for (int j = 0; j < LANES; ++j) {
                    const double y = adam_elem(p + o + j, g + o + j, m + o + j, v + o + j, k, s, flags);
                    acc[q][j] = fma(y, y, acc[q][j]);
                }
            }
    double total = 0.0;
    for (int64_t i = PASS2_PARTS * part; i < n; ++i) {
        const double y = adam_elem(p + i, g + i, m + i, v + i, k, s, flags);
        total = fma(y, y, total);
    }
    for (int q = 0; q < PASS2_PARTS; ++q) total += sum_lanes(acc[q]);
    return total;
}

/* adam_span_F_A: flags F, access pattern A (S: PT_STREAMS, I: PT_INTERLEAVED), all compile-time constants. */
#define SPAN(F) \
    static double adam_span_##F##_S(float *p, const float *g, float *m, float *v, int64_t n, double k, \
                                    const float *s) { return adam_span(p, g, m, v, n, k, s, F, 0); } \
    static double adam_span_##F##_I(float *p, const float *g, float *m, float *v, int64_t n, double k, \
                                    const float *s) { return adam_span(p, g, m, v, n, k, s, F, 1); }
SPAN(0) SPAN(2) SPAN(4) SPAN(8) SPAN(10) SPAN(12)
#undef SPAN

typedef double (*span_fn)(float *, const float *, float *, float *, int64_t, double, const float *);

static span_fn select_span(int flags) {
    const int interleaved = access_pattern == PT_INTERLEAVED;
    switch (flags & ~PT_MAXIMIZE) {
        case 0: return interleaved ? adam_span_0_I : adam_span_0_S;
        case PT_L2: return interleaved ? adam_span_2_I : adam_span_2_S;
        case PT_DECOUPLED: return interleaved ? adam_span_4_I : adam_span_4_S;
        case PT_LERP_LARGE: return interleaved ? adam_span_8_I : adam_span_8_S;
        case PT_LERP_LARGE | PT_L2: return interleaved ? adam_span_10_I : adam_span_10_S;
        case PT_LERP_LARGE | PT_DECOUPLED: return interleaved ? adam_span_12_I : adam_span_12_S;
        default: return 0; /* L2 and decoupled together: rejected */
    }
}

/*
 * g_addrs[t], numels[t] for t < n_tensors, elements of `dtype` (PT_FLOAT32, PT_BFLOAT16 or PT_FLOAT16). Returns the sum
 * of squares over elements [begin, end) of the concatenation.
 */
double pt_sum_sq(int64_t n_tensors, const int64_t *g_addrs, const int64_t *numels, int64_t begin, int64_t end,
                 int dtype) {
    double total = 0.0;
    int64_t offset = 0;
    for (int64_t t = 0; t < n_tensors && offset < end; offset += numels[t], ++t) {
        const int64_t lo = begin > offset ? begin - offset : 0;
        const int64_t hi = end - offset < numels[t] ? end - offset : numels[t];
        if (lo >= hi) continue;
        const int64_t width = dtype == PT_FLOAT32 ? 4 : 2;
        total += sum_sq_span((const char *)(intptr_t)g_addrs[t] + lo * width, hi - lo, dtype);
    }
    return total;
}

/*
 * addrs holds four rows of n_tensors addresses: params, grads, exp_avgs, exp_avg_sqs. scalars holds
 * S_COUNT floats (see the enum). Returns the sum of squares of the clipped gradients over [begin, end),
 * or NaN for an unsupported flag combination.
 */
double pt_adam(int64_t n_tensors, const int64_t *addrs, const int64_t *numels, int64_t begin, int64_t end,
               double k, const float *scalars, int flags) {
    const span_fn span = select_span(flags);
    if (!span) return NAN;
    if (flags & PT_MAXIMIZE) k = -k;
    double total = 0.0;
    int64_t offset = 0;
    for (int64_t t = 0; t < n_tensors && offset < end; offset += numels[t], ++t) {
        const int64_t lo = begin > offset ? begin - offset : 0;
        const int64_t hi = end - offset < numels[t] ? end - offset : numels[t];
        if (lo >= hi) continue;
        total += span((float *)(intptr_t)addrs[t] + lo, (const float *)(intptr_t)addrs[n_tensors + t] + lo,
                      (float *)(intptr_t)addrs[2 * n_tensors + t] + lo,
                      (float *)(intptr_t)addrs[3 * n_tensors + t] + lo, hi - lo, k, scalars);
    }
    return total;
}

/*
 * Pass 2's memory traffic, walked the same way, with no arithmetic to speak of (p += g, m += g, v += g):
 * the bandwidth this access pattern reaches here, for bench/step.py's floor.
 */
static inline __attribute__((always_inline)) void stream_span_as(float *restrict p, const float *restrict g,
                                                                  float *restrict m, float *restrict v, int64_t n,
                                                                  int interleaved) {
    const int64_t part = n / PASS2_PARTS / LANES * LANES;
    const int rounds = interleaved ? 1 : PASS2_PARTS, lockstep = interleaved ? PASS2_PARTS : 1;
    for (int r = 0; r < rounds; ++r)
        for (int64_t i = 0; i < part; i += LANES)
            for (int l = 0; l < lockstep; ++l) {
                const int64_t o = (r + l) * part + i;
                if (interleaved) prefetch_pass2(p, g, m, v, o);
                for (int j = 0; j < LANES; ++j) {
                    p[o + j] += g[o + j];
                    m[o + j] += g[o + j];
                    v[o + j] += g[o + j];
                }
            }
    for (int64_t i = PASS2_PARTS * part; i < n; ++i) {
        p[i] += g[i];
        m[i] += g[i];
        v[i] += g[i];
    }
}

static void stream_span(float *p, const float *g, float *m, float *v, int64_t n) {
    if (access_pattern == PT_INTERLEAVED) stream_span_as(p, g, m, v, n, 1);
    else stream_span_as(p, g, m, v, n, 0);
}

void pt_stream(int64_t n_tensors, const int64_t *addrs, const int64_t *numels, int64_t begin, int64_t end) {
    int64_t offset = 0;
    for (int64_t t = 0; t < n_tensors && offset < end; offset += numels[t], ++t) {
        const int64_t lo = begin > offset ? begin - offset : 0;
        const int64_t hi = end - offset < numels[t] ? end - offset : numels[t];
        if (lo >= hi) continue;
        stream_span((float *)(intptr_t)addrs[t] + lo, (const float *)(intptr_t)addrs[n_tensors + t] + lo,
                    (float *)(intptr_t)addrs[2 * n_tensors + t] + lo,
                    (float *)(intptr_t)addrs[3 * n_tensors + t] + lo, hi - lo);
    }
}

/*
 * pt_stream_mt: [0, total) in `threads` ranges on multiples of 64 elements, one per OpenMP thread (serially
 * without OpenMP). The sums (pt_sum_sq_mt, pt_adam_mt) go by blocks of PT_BLOCK elements instead, so their
 * rounding is the same for every thread count.
 */
static int clamp_threads(int threads) {
    return threads < 1 ? 1 : threads > PT_MAX_THREADS ? PT_MAX_THREADS : threads;
}

static int64_t bound(int64_t total, int t, int threads) {
    /* floor(total * t / threads) without overflow, rounded down to a multiple of 64 */
    return t == threads ? total : (total / threads * t + total % threads * t / threads) / 64 * 64;
}

int64_t pt_block_count(int64_t total) { return (total + PT_BLOCK - 1) / PT_BLOCK; }

static int64_t block_end(int64_t b, int64_t total) {
    return (b + 1) * PT_BLOCK < total ? (b + 1) * PT_BLOCK : total;
}

/* partial[b] for the blocks b in [b_lo, b_hi): the sums of squares of those blocks of the concatenation. */
void pt_sum_sq_blocks(int64_t n_tensors, const int64_t *g_addrs, const int64_t *numels, int64_t total, int64_t b_lo,
                      int64_t b_hi, int dtype, double *partial) {
    for (int64_t b = b_lo; b < b_hi; ++b)
        partial[b] = pt_sum_sq(n_tensors, g_addrs, numels, b * PT_BLOCK, block_end(b, total), dtype);
}

/* pt_adam on the blocks b in [b_lo, b_hi); partial[b] is each block's clipped sum of squares. */
void pt_adam_blocks(int64_t n_tensors, const int64_t *addrs, const int64_t *numels, int64_t total, int64_t b_lo,
                    int64_t b_hi, double k, const float *scalars, int flags, double *partial) {
    for (int64_t b = b_lo; b < b_hi; ++b)
        partial[b] = pt_adam(n_tensors, addrs, numels, b * PT_BLOCK, block_end(b, total), k, scalars, flags);
}

double pt_add_in_order(const double *partial, int64_t n) {
    double total = 0.0;
    for (int64_t b = 0; b < n; ++b) total += partial[b];
    return total;
}

/* The _mt entries take `partial`, room for pt_block_count(total) doubles, from the caller. */
double pt_sum_sq_mt(int64_t n_tensors, const int64_t *g_addrs, const int64_t *numels, int64_t total, int dtype,
                    int threads, double *partial) {
    const int64_t blocks = pt_block_count(total);
    threads = clamp_threads(threads);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t b = 0; b < blocks; ++b)
        pt_sum_sq_blocks(n_tensors, g_addrs, numels, total, b, b + 1, dtype, partial);
    return pt_add_in_order(partial, blocks);
}

double pt_adam_mt(int64_t n_tensors, const int64_t *addrs, const int64_t *numels, int64_t total, double k,
                  const float *scalars, int flags, int threads, double *partial) {
    const int64_t blocks = pt_block_count(total);
    threads = clamp_threads(threads);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t b = 0; b < blocks; ++b)
        pt_adam_blocks(n_tensors, addrs, numels, total, b, b + 1, k, scalars, flags, partial);
    return pt_add_in_order(partial, blocks);
}

void pt_stream_mt(int64_t n_tensors, const int64_t *addrs, const int64_t *numels, int64_t total, int threads) {
    threads = clamp_threads(threads);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
    for (int t = 0; t < threads; ++t)
        pt_stream(n_tensors, addrs, numels, bound(total, t, threads), bound(total, t + 1, threads));
}

/* counts: n addresses of float32 step counts, each advanced by one (exact below 2^24). */
void pt_add_one(int64_t n, const int64_t *counts) {
    for (int64_t i = 0; i < n; ++i) *(float *)(intptr_t)counts[i] += 1.0f;
}

/* The clipped value alone, dst[i] = (float)((double)src[i] * k): lets tests pin y bit for bit. */
void pt_scale(float *restrict dst, const float *restrict src, int64_t n, double k) {
    for (int64_t i = 0; i < n; ++i) dst[i] = (float)((double)src[i] * k);
}
