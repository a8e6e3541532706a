/* The extremes of feature maps over their positions, and their gradient, for one element type
 * T (names suffixed by F(name)): alive.functional._PositionExtremes, the first reduction of the
 * "channel" separation terms (a unit is a channel). A map is read as (N, C, S): N rows of C
 * channels of S positions, element (n, c, s) at z[n·sn + c·sc + s·sp], with the positions
 * contiguous (sp = 1: NCHW) or the channels (sc = 1: channels-last). PyTorch takes one pass
 * for the max and another for the min (torch.aminmax is slower still); its backward gathers
 * the rows whose extremes have a gradient, then compares, counts and scales them in five
 * operations more. A NaN makes its extremes NaN, as torch.amax / amin; an extreme of 0 may
 * differ from theirs in its sign (which of -0.0 and +0.0 is kept depends on the lanes), which
 * neither the hinges relu(m -+ e) nor the ties (==) see. */

/* the max (*h) and min (*l) of n elements a stride apart; NaN if one is */
HOT static void F(row_extremes)(const T *restrict a, int64_t n, int64_t stride, T *h, T *l)
{
    T hs = a[0], ls = a[0];
    int64_t i = 0;
    int nan = 0;
    if (stride == 1 && n >= VL) {
        VT hi = *(const VU *)a, lo = hi;
        VI bad = hi != hi;
        for (i = VL; i + VL <= n; i += VL) {
            VT x = *(const VU *)(a + i);
            hi = VSELECT(x > hi, x, hi);
            lo = VSELECT(x < lo, x, lo);
            bad |= x != x;
        }
        hs = hi[0], ls = lo[0];
        for (int j = 1; j < VL; j++) { hs = hi[j] > hs ? hi[j] : hs; ls = lo[j] < ls ? lo[j] : ls; }
        for (int j = 0; j < VL; j++) nan |= bad[j] != 0;
    }
    for (; i < n; i++) {
        T x = a[i * stride];
        hs = x > hs ? x : hs;
        ls = x < ls ? x : ls;
        nan |= x != x;
    }
    if (nan) {  /* (comparisons skip NaNs: put the first one back) */
        int64_t k = F(first_nan)(a, stride, n);
        hs = ls = a[k * stride];
    }
    *h = hs;
    *l = ls;
}

/* channels-last rows n in [n0, n1): every position's C channels at once, the channels' running
 * extremes in hi / lo (the rows' C outputs) */
HOT static void F(channel_extremes)(const T *restrict z, int64_t n0, int64_t n1, int64_t C, int64_t S, int64_t sn,
                                    int64_t sp, T *restrict hi, T *restrict lo)
{
    for (int64_t n = n0; n < n1; n++) {
        const T *restrict r = z + n * sn;
        T *restrict h = hi + n * C, *restrict l = lo + n * C;
        int nan = 0;
        for (int64_t c = 0; c < C; c++) { h[c] = l[c] = r[c]; nan |= r[c] != r[c]; }
        for (int64_t s = 1; s < S; s++) {
            const T *restrict x = r + s * sp;
            for (int64_t c = 0; c < C; c++) {
                h[c] = x[c] > h[c] ? x[c] : h[c];
                l[c] = x[c] < l[c] ? x[c] : l[c];
                nan |= x[c] != x[c];
            }
        }
        if (nan)
            for (int64_t c = 0; c < C; c++) {
                int64_t k = F(first_nan)(r + c, sp, S);
                if (k >= 0) h[c] = l[c] = r[c + k * sp];
            }
    }
}

/* hi, lo (N, C) contiguous <- the max and min over the positions of each (n, c) */
int F(position_extremes)(const T *z, int64_t N, int64_t C, int64_t S, int64_t sn, int64_t sc, int64_t sp,
                         T *hi, T *lo, int threads)
{
    if (sp == 1 || sc != 1)
        IN_PARTS(threads, N * C, 1, r0, r1,
                 for (int64_t r = r0; r < r1; r++) {
                     int64_t n = r / C, c = r - n * C;
                     F(row_extremes)(z + n * sn + c * sc, S, sp, hi + r, lo + r);
                 });
    else
        IN_PARTS(threads, N, 1, n0, n1, F(channel_extremes)(z, n0, n1, C, S, sn, sp, hi, lo));
    return 0;
}

/* The gradient of the extremes over positions at the k rows (n, c) whose upstream gradient
 * is non-zero, found here: those of the maxima (gh, (N, C)) first, then those of the minima
 * (gl), each in row order, as torch.nonzero lists them (a NaN is non-zero). index (2, k) gets
 * each row's n and c; row i of out (k, S) gets its gradient shared equally among the positions
 * that hold the row's extreme and 0 elsewhere: (z == e) · (g / count), which is NaN throughout
 * for a row holding a NaN, as PyTorch's (tied · share) is. F(spread_count) gives k. */
int64_t F(spread_count)(const T *gh, const T *gl, int64_t m)
{
    int64_t k = 0;
    for (int64_t r = 0; r < m; r++) k += (gh[r] != 0) + (gl[r] != 0);
    return k;
}

HOT static void F(spread_rows)(const T *restrict z, int64_t C, int64_t S, int64_t sn, int64_t sc, int64_t sp,
                               const T *restrict gh, const T *restrict gl, const int64_t *restrict index, int64_t k,
                               int64_t kh, int64_t i0, int64_t i1, T *restrict out)
{
    for (int64_t i = i0; i < i1; i++) {
        int64_t n = index[i], c = index[k + i], r = n * C + c;
        const T *restrict a = z + n * sn + c * sc;
        T *restrict o = out + i * S;
        T h, l;
        F(row_extremes)(a, S, sp, &h, &l);
        T e = i < kh ? h : l;
        int64_t count = 0;
        for (int64_t s = 0; s < S; s++) count += a[s * sp] == e;
        T share = (i < kh ? gh[r] : gl[r]) / (T)(float)count;  /* (in float32, as PyTorch's sparse path counts) */
        for (int64_t s = 0; s < S; s++) o[s] = (a[s * sp] == e ? (T)1 : (T)0) * share;
    }
}

int F(position_spread)(const T *z, int64_t N, int64_t C, int64_t S, int64_t sn, int64_t sc, int64_t sp, const T *gh,
                       const T *gl, int64_t k, int64_t *index, T *out, int threads)
{
    int64_t i = 0, kh;
    for (int64_t r = 0; r < N * C && i < k; r++)
        if (gh[r] != 0) { index[i] = r / C; index[k + i] = r % C; i++; }
    kh = i;
    for (int64_t r = 0; r < N * C && i < k; r++)
        if (gl[r] != 0) { index[i] = r / C; index[k + i] = r % C; i++; }
    if (i != k) return 1;  /* (k was not F(spread_count) of these gradients) */
    IN_PARTS(threads, k, 1, i0, i1, F(spread_rows)(z, C, S, sn, sc, sp, gh, gl, index, k, kh, i0, i1, out));
    return 0;
}
