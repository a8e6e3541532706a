/* The separation penalty of stacked dense pre-activations in one pass per network (CPU).
 *
 * Built and loaded by alive/native.py, which documents the layout; the PyTorch functions of
 * alive/functional.py compute the same values and are the reference in the tests. A layer
 * `k` of the stack is a (P points, U units) row-major block whose first R_k units are real
 * (the grid engine pads narrower networks); each block is transposed into a work buffer, so
 * that the reductions and the spreading of gradients run over the points, contiguously, which
 * a compiler vectorises: thin layers have a handful of units, and loops over them cost more
 * than the arithmetic.
 *
 * Compiled once per source version with `$CC -O3 -std=c99` (CC defaults to cc); nothing here
 * needs more. Each function exists for float (_f32) and double (_f64): separation_body.h is
 * included twice.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
