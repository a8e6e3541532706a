/* Native CPU kernels of alive (built and loaded by alive/native.py, which documents them):
 * the separation penalty of stacked dense pre-activations in one pass per network (here and in
 * separation_body.h), and the grid engine's dense ReLU stacks (dense_stack.h).
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

#define T float
#define F(name) name##_f32
#include "separation_body.h"
#undef T
#undef F

#define T double
#define F(name) name##_f64
#include "separation_body.h"
#undef T
#undef F

#include "dense_stack.h"
