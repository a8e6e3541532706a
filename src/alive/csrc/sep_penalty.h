/* The penalty kernels' signature (separation_body.h defines them for float and double), shared
 * with dense_penalty.cpp, which calls them through pointers: a change here that the definitions
 * do not follow fails to compile. */
#ifndef ALIVE_SEP_PENALTY_H
#define ALIVE_SEP_PENALTY_H
#include <stdint.h>

#define ALIVE_SEP_PENALTY(T, name)                                                                          \
    int name(const T *zh, const T *zl, int64_t n, int64_t P, int64_t U, const int32_t *real, const T *cu,  \
             const T *cp, double rho, double margin, int agg, int first, T *out, double scale, T *total, \
             T *dzh, T *dzl)

#ifdef __cplusplus
extern "C" {
#endif
ALIVE_SEP_PENALTY(float, sep_penalty_f32);
ALIVE_SEP_PENALTY(double, sep_penalty_f64);
#ifdef __cplusplus
}
#endif
#endif
