/* Native CPU kernels of alive (built and loaded by alive/native.py, which documents them):
 * the separation penalty of stacked dense pre-activations in one pass per network (here and in
 * separation_body.h), the extremes of feature maps over their positions and their gradient
 * (position_extremes.h), the mirror-linked ReLU (linked_relu.h), and the grid engine's dense
 * ReLU stacks (dense_stack.h).
 *
 * The penalty: the PyTorch functions of alive/functional.py compute the same values and are
 * the reference in the tests. A layer
 * `k` of the stack is a (P points, U units) row-major block whose first R_k units are real
 * (the grid engine pads narrower networks); each block is transposed into a work buffer, so
 * that the reductions and the spreading of gradients run over the points, contiguously, which
 * a compiler vectorises: thin layers have a handful of units, and loops over them cost more
 * than the arithmetic.
 *
 * Compiled once per source version with `$CC -O3 -std=c99 ... -lm` (CC defaults to cc), by a
 * compiler with GCC's vector extensions (GCC, clang). Each penalty function exists for float
 * (_f32) and double (_f64): separation_body.h is included twice; the dense stack is float only.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sep_penalty.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
/* HOT: an AVX2 + FMA copy of a function besides the baseline one, chosen when the library is
 * loaded where the CPU has them (target_clones: glibc's ifunc). Multiply-adds are fused in the
 * dense stack's matrix products only (FUSED): -std=c99 leaves them apart, as the penalty's
 * reference values expect. So the dense stack's results differ, by float rounding, between
 * CPUs with and without AVX2 + FMA. */
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FUSED __attribute__((optimize("fp-contract=fast")))
#else
#define HOT
#define FUSED
#endif

/* BODY run with W an integer constant equal to U (1 to 8): loops over a constant number of
 * units let the compiler move several rows' interleaved units at once */
#define FOR_UNITS(U, W, ...) do { switch (U) { \
    case 1: { enum { W = 1 }; __VA_ARGS__; } break; case 2: { enum { W = 2 }; __VA_ARGS__; } break; \
    case 3: { enum { W = 3 }; __VA_ARGS__; } break; case 4: { enum { W = 4 }; __VA_ARGS__; } break; \
    case 5: { enum { W = 5 }; __VA_ARGS__; } break; case 6: { enum { W = 6 }; __VA_ARGS__; } break; \
    case 7: { enum { W = 7 }; __VA_ARGS__; } break; default: { enum { W = 8 }; __VA_ARGS__; } break; } } while (0)

/* The penalty's work buffer (a layer's transposes): one per thread, kept between calls up to
 * SCRATCH_KEPT bytes, so that a training step's calls do not each go through malloc and free
 * (which consolidates the heap's free small blocks before a large request); freed when its
 * thread ends. Without POSIX threads every call allocates. */
#define SCRATCH_KEPT ((size_t)1 << 20)
#define SCRATCH_HEAD 8  /* size_t words before the buffer: its size, and 64-byte room */
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;
static int kept_ok;

static void kept_init(void)
{
    kept_ok = pthread_key_create(&kept_key, free) == 0;
}

static void *scratch(size_t bytes)
{
    if (bytes > SCRATCH_KEPT) return malloc(bytes);
    pthread_once(&kept_once, kept_init);
    if (!kept_ok) return malloc(bytes);
    size_t *block = pthread_getspecific(kept_key);
    if (!block || block[0] < bytes) {
        size_t size = SCRATCH_KEPT < 2 * bytes ? SCRATCH_KEPT : 2 * bytes;
        size_t *grown = malloc(sizeof(size_t) * SCRATCH_HEAD + size);
        if (!grown) return NULL;
        grown[0] = size;
        if (pthread_setspecific(kept_key, grown)) {
            free(grown);
            return malloc(bytes);
        }
        free(block);
        block = grown;
    }
    return block + SCRATCH_HEAD;
}

static void release(void *p)
{
    size_t *block = kept_ok ? pthread_getspecific(kept_key) : NULL;
    if (!block || p != (void *)(block + SCRATCH_HEAD)) free(p);
}
#else
static void *scratch(size_t bytes)
{
    return malloc(bytes);
}

static void release(void *p)
{
    free(p);
}
#endif

/* Run the body (the arguments after HI) over [LO, HI) = parts of [0, TOTAL) on up to THREADS
 * threads, each part a whole number of ALIGN items (64-byte lines of elements, or whole
 * rows): built with -fopenmp
 * (alive/native.py does so only where PyTorch's own OpenMP runtime, libgomp, is loaded: the
 * library then shares PyTorch's thread pool, whose workers are already awake after PyTorch's
 * operations, instead of starting a second one that competes with them for the cores);
 * otherwise, or inside a parallel region, in one part. */
#ifdef _OPENMP
#include <omp.h>
#define IN_PARTS(THREADS, TOTAL, ALIGN, LO, HI, ...) do { \
    int64_t total_ = (TOTAL), align_ = (ALIGN); int threads_ = (THREADS); \
    if (threads_ > 1 && !omp_in_parallel()) { \
        _Pragma("omp parallel num_threads(threads_)") { \
            int64_t n_ = omp_get_num_threads(), t_ = omp_get_thread_num(); \
            int64_t LO = total_ * t_ / n_ / align_ * align_; \
            int64_t HI = t_ + 1 == n_ ? total_ : total_ * (t_ + 1) / n_ / align_ * align_; \
            __VA_ARGS__; \
        } \
    } else { int64_t LO = 0, HI = total_; __VA_ARGS__; } } while (0)
#else
#define IN_PARTS(THREADS, TOTAL, ALIGN, LO, HI, ...) do { \
    (void)(THREADS); (void)(ALIGN); int64_t LO = 0, HI = (TOTAL); __VA_ARGS__; } while (0)
#endif

/* 32-byte vectors (GCC's vector extensions): 8 floats or 4 doubles, the integer vectors
 * their comparisons give, and unaligned loads of T arrays */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4i __attribute__((vector_size(32)));
typedef double v4u __attribute__((vector_size(32), aligned(8), may_alias));
#define ld8(p) (*(const v8u *)(p))
#define st8(p, v) (*(v8u *)(p) = (v))
/* a where the comparison m holds, else b, lane by lane (VT, VI: the vector types of the T in
 * use; masks, not selections: the compiler keeps branches there). A running extreme
 * e = VSELECT(x > e, x, e) is never replaced by a NaN x. */
#define VSELECT(m, a, b) ((VT)(((m) & (VI)(a)) | (~(m) & (VI)(b))))
/* in index order, as a scalar loop would add them */
#define hsum8(v) ((((((((v)[0] + (v)[1]) + (v)[2]) + (v)[3]) + (v)[4]) + (v)[5]) + (v)[6]) + (v)[7])

#define T float
#define F(name) name##_f32
#define VT v8f  /* a vector of T, VL lanes; VI its comparisons; VU its unaligned loads */
#define VI v8i
#define VU v8u
#define VL 8
#include "separation_body.h"
#include "linked_relu.h"
#include "position_extremes.h"
#undef T
#undef F
#undef VT
#undef VI
#undef VU
#undef VL

#define T double
#define F(name) name##_f64
#define VT v4d
#define VI v4i
#define VU v4u
#define VL 4
#include "separation_body.h"
#include "linked_relu.h"
#include "position_extremes.h"
#undef T
#undef F
#undef VT
#undef VI
#undef VU
#undef VL

#include "dense_stack.h"
