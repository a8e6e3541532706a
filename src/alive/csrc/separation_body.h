/* The kernels of separation.c for one element type T, names suffixed by F(name). */

/* (P, U) rows -> (R, P) columns */
static void F(transpose)(const T *restrict z, int64_t P, int64_t U, int64_t R, T *restrict zt)
{
    for (int64_t u = 0; u < R; u++)  /* strided reads, sequential writes */
        for (int64_t p = 0; p < P; p++) zt[u * P + p] = z[p * U + u];
}

static int64_t F(first_nan)(const T *z, int64_t stride, int64_t count)
{
    for (int64_t i = 0; i < count; i++)
        if (z[i * stride] != z[i * stride]) return i;
    return -1;
}

/* Max of each column (hu) and of each point across the columns (hp), or min (sign < 0), with
 * the first arg-extremes when iu is given (torch.max(dim)'s convention), found by a second,
 * branch-free pass: comparisons that pick a running extreme and its position mispredict on
 * every other entry. A NaN makes its extremes NaN (torch.amax), at its first position;
 * comparisons skip NaNs, so a rare extra pass puts them back. Rows (columns of the layer) are ld
 * apart. */
HOT static void F(extremes)(const T *restrict zt, int64_t P, int64_t ld, int64_t R, int sign, T *restrict hu,
                        T *restrict hp, int32_t *restrict iu, int32_t *restrict ip)
{
    int bad = 0;
    for (int64_t p = 0; p < P; p++) hp[p] = zt[p];
    for (int64_t u = 0; u < R; u++) {
        const T *restrict c = zt + u * ld;
        T v8[8];  /* eight running extremes: a float reduction is not vectorised otherwise */
        for (int j = 0; j < 8; j++) v8[j] = c[0];
        int64_t p = 0;
        if (sign > 0) {
            for (; p + 8 <= P; p += 8)
                for (int j = 0; j < 8; j++) v8[j] = c[p + j] > v8[j] ? c[p + j] : v8[j];
            for (; p < P; p++) v8[0] = c[p] > v8[0] ? c[p] : v8[0];
            for (int j = 1; j < 8; j++) v8[0] = v8[j] > v8[0] ? v8[j] : v8[0];
            if (u > 0) for (p = 0; p < P; p++) hp[p] = c[p] > hp[p] ? c[p] : hp[p];
        } else {
            for (; p + 8 <= P; p += 8)
                for (int j = 0; j < 8; j++) v8[j] = c[p + j] < v8[j] ? c[p + j] : v8[j];
            for (; p < P; p++) v8[0] = c[p] < v8[0] ? c[p] : v8[0];
            for (int j = 1; j < 8; j++) v8[0] = v8[j] < v8[0] ? v8[j] : v8[0];
            if (u > 0) for (p = 0; p < P; p++) hp[p] = c[p] < hp[p] ? c[p] : hp[p];
        }
        hu[u] = v8[0];
    }
    for (int64_t u = 0; u < R; u++)
        for (int64_t p = 0; p < P; p++) bad |= zt[u * ld + p] != zt[u * ld + p];
    if (bad) {
        for (int64_t u = 0; u < R; u++) {
            int64_t i = F(first_nan)(zt + u * ld, 1, P);
            if (i >= 0) hu[u] = zt[u * ld + i];
        }
        for (int64_t p = 0; p < P; p++) {
            int64_t i = F(first_nan)(zt + p, ld, R);
            if (i >= 0) hp[p] = zt[i * ld + p];
        }
    }
    if (!iu) return;
    for (int64_t u = 0; u < R; u++) {
        const T *restrict c = zt + u * ld;
        T e = hu[u];
        if (e != e) { iu[u] = (int32_t)F(first_nan)(c, 1, P); continue; }
        int32_t first = (int32_t)P;  /* the smallest position holding e */
        for (int64_t p = 0; p < P; p++) { int32_t at = c[p] == e ? (int32_t)p : (int32_t)P; first = at < first ? at : first; }
        iu[u] = first < P ? first : 0;
    }
    for (int64_t p = 0; p < P; p++) ip[p] = -1;
    for (int64_t u = 0; u < R; u++) {
        const T *restrict c = zt + u * ld;
        for (int64_t p = 0; p < P; p++) ip[p] = (ip[p] < 0) & (c[p] == hp[p]) ? (int32_t)u : ip[p];
    }
    if (bad)
        for (int64_t p = 0; p < P; p++)
            if (hp[p] != hp[p]) ip[p] = (int32_t)F(first_nan)(zt + p, ld, R);
    for (int64_t p = 0; p < P; p++) ip[p] = ip[p] < 0 ? 0 : ip[p];
}

static inline T F(slack)(T hi, T lo, double rho, double margin)
{
    T sh = (T)margin - hi, sl = lo + (T)margin;  /* x < 0 ? 0 : x keeps a NaN, as relu does */
    return (T)rho * (sh < 0 ? 0 : sh) + (T)(1.0 - rho) * (sl < 0 ? 0 : sl);
}

/* cu·A(s_u) + cp·A(s_p) of one layer from its extremes (R units, P points), summed in double;
 * a zero coefficient leaves its term out */
static double F(layer_penalty)(const T *hu, const T *lu, const T *hp, const T *lp, int64_t R, int64_t P, T cu, T cp,
                               double rho, double margin, int agg)
{
    double su = 0, sp = 0;
    for (int64_t u = 0; u < R; u++) { T s = F(slack)(hu[u], lu[u], rho, margin); su += agg == 1 ? (double)s * s : s; }
    for (int64_t p = 0; p < P; p++) { T s = F(slack)(hp[p], lp[p], rho, margin); sp += agg == 1 ? (double)s * s : s; }
    if (agg == 2) { su /= (double)R; sp /= (double)P; }
    return (cu != 0 ? cu * su : 0) + (cp != 0 ? cp * sp : 0);
}

/* out[k] = cu[k]·A(s_u) + cp[k]·A(s_p), A: sum (agg 0), sum of squares (1) or mean (2);
 * a zero coefficient leaves its term out. ext[k] = [hu (U) | lu (U) | hp (P) | lp (P)] and,
 * when idx is given ("first" ties), idx[k] its arg-extremes. zl: the minima's input (zh's
 * for dense layers; a feature map's spatial minima otherwise). Returns 0, or -1 when out of
 * memory. */
int F(sep_forward)(const T *zh, const T *zl, int64_t n, int64_t P, int64_t U, const int32_t *real,
                   const T *cu, const T *cp, double rho, double margin, int agg, T *ext, int32_t *idx, T *out)
{
    int64_t E = 2 * U + 2 * P;
    T *zt = malloc(sizeof(T) * (size_t)(U * P));
    if (!zt) return -1;
    for (int64_t k = 0; k < n; k++) {
        int64_t R = real ? real[k] : U;
        T *hu = ext + k * E, *lu = hu + U, *hp = lu + U, *lp = hp + P;
        int32_t *iu = idx ? idx + k * E : NULL, *ju = idx ? iu + U : NULL;
        int32_t *ip = idx ? ju + U : NULL, *jp = idx ? ip + P : NULL;
        if (cu[k] == 0 && cp[k] == 0) {  /* an unconstrained net of the stack (the grid's plain ReLU) */
            memset(hu, 0, sizeof(T) * (size_t)E);
            if (idx) memset(iu, 0, sizeof(int32_t) * (size_t)E);
            out[k] = 0;
            continue;
        }
        for (int64_t u = R; u < U; u++) hu[u] = lu[u] = 0;
        if (idx) for (int64_t u = R; u < U; u++) iu[u] = ju[u] = 0;
        F(transpose)(zh + k * P * U, P, U, R, zt);
        F(extremes)(zt, P, P, R, 1, hu, hp, iu, ip);
        if (zl != zh) F(transpose)(zl + k * P * U, P, U, R, zt);
        F(extremes)(zt, P, P, R, -1, lu, lp, ju, jp);
        out[k] = (T)F(layer_penalty)(hu, lu, hp, lp, R, P, cu[k], cp[k], rho, margin, agg);
    }
    free(zt);
    return 0;
}

/* The gradients of one slack's term (coefficient c) with respect to its max and its min;
 * relu's derivative as autograd takes it: 1 unless the hinge's input is <= 0. */
static inline void F(slack_grads)(T hi, T lo, T c, double rho, double margin, int agg, int64_t count, T *gh, T *gl)
{
    T ds = c;
    if (agg == 1) ds = 2 * F(slack)(hi, lo, rho, margin) * c;
    else if (agg == 2) ds = c / (T)count;
    *gh = hi >= (T)margin ? 0 : ds * (T)(-rho);
    *gl = lo <= (T)(-margin) ? 0 : ds * (T)(1.0 - rho);
}

/* The gradients of one layer's terms (upstream gradient G) with respect to its unit extremes
 * (gu_h, gu_l: R) and point extremes (gp_h, gp_l: P); any_u / any_p: whether any is non-zero. */
static void F(hinge_grads)(const T *hu, const T *lu, const T *hp, const T *lp, int64_t R, int64_t P, T G, T cu, T cp,
                           double rho, double margin, int agg, T *gu_h, T *gu_l, T *gp_h, T *gp_l, int *any_u, int *any_p)
{
    T c_u = cu != 0 ? G * cu : 0, c_p = cp != 0 ? G * cp : 0;
    *any_u = *any_p = 0;
    for (int64_t u = 0; u < R; u++) {
        F(slack_grads)(hu[u], lu[u], c_u, rho, margin, agg, R, gu_h + u, gu_l + u);
        *any_u |= gu_h[u] != 0 || gu_l[u] != 0;
    }
    for (int64_t p = 0; p < P; p++) {
        F(slack_grads)(hp[p], lp[p], c_p, rho, margin, agg, P, gp_h + p, gp_l + p);
        *any_p |= gp_h[p] != 0 || gp_l[p] != 0;
    }
}

/* Add the extremes' gradients at their first positions (idx: [iu | ju | ip | jp], U units
 * and P points, the layout of sep_forward's idx) into dh (maxima) and dl (minima, dh itself
 * for dense layers), entry (p, u) at p·ps + u·us: unit maxima, unit minima, point maxima,
 * point minima. */
static void F(scatter_first)(const int32_t *idx, int64_t U, int64_t R, int64_t P, const T *gu_h, const T *gu_l,
                             const T *gp_h, const T *gp_l, int any_u, int any_p, int64_t ps, int64_t us, T *dh, T *dl)
{
    const int32_t *iu = idx, *ju = iu + U, *ip = ju + U, *jp = ip + P;
    if (any_u) {
        for (int64_t u = 0; u < R; u++) dh[iu[u] * ps + u * us] += gu_h[u];
        for (int64_t u = 0; u < R; u++) dl[ju[u] * ps + u * us] += gu_l[u];
    }
    if (any_p) {
        for (int64_t p = 0; p < P; p++) dh[p * ps + ip[p] * us] += gp_h[p];
        for (int64_t p = 0; p < P; p++) dl[p * ps + jp[p] * us] += gp_l[p];
    }
}

/* Add to the columns dt the gradients gu of their extremes eu and gp of the points' extremes
 * ep, shared equally among tied entries (m: P scratch). */
static void F(spread)(const T *restrict zt, int64_t P, int64_t R, const T *restrict eu, const T *restrict ep,
                      const T *restrict gu, const T *restrict gp, int any_u, int any_p, T *restrict m, T *restrict dt)
{
    if (any_u)
        for (int64_t u = 0; u < R; u++) {
            const T *restrict c = zt + u * P;
            T e = eu[u];
            int64_t ties = 0;  /* an integer count: a float sum would not be vectorised */
            for (int64_t p = 0; p < P; p++) ties += c[p] == e;
            T s = gu[u] / (T)ties;
            T *restrict d = dt + u * P;
            if (ties == 0)  /* a NaN extreme: no entry equals it, and the PyTorch path's 0·(g/0) is NaN */
                for (int64_t p = 0; p < P; p++) d[p] += (T)0 * s;
            else  /* (a product with the tie mask is not vectorised here) */
                for (int64_t p = 0; p < P; p++) d[p] += c[p] == e ? s : (T)0;
        }
    if (any_p) {
        for (int64_t p = 0; p < P; p++) m[p] = 0;
        for (int64_t u = 0; u < R; u++) {
            const T *restrict c = zt + u * P;
            for (int64_t p = 0; p < P; p++) m[p] += c[p] == ep[p] ? (T)1 : (T)0;
        }
        for (int64_t p = 0; p < P; p++) m[p] = gp[p] / m[p];
        for (int64_t u = 0; u < R; u++) {
            const T *restrict c = zt + u * P;
            T *restrict d = dt + u * P;
            for (int64_t p = 0; p < P; p++) d[p] += (T)(c[p] == ep[p]) * m[p];  /* (a ?: here is not vectorised) */
        }
    }
}

/* The gradient of out (G[k] per network) with respect to zh and zl, written into dzh and dzl
 * (the same buffer when zl == zh; padded units get 0), in the order of the PyTorch path:
 * split ties (idx NULL): unit maxima, point maxima, unit minima, point minima; first ties:
 * unit maxima, unit minima, point maxima, point minima. Returns 0, or -1 when out of memory. */
int F(sep_backward)(const T *zh, const T *zl, int64_t n, int64_t P, int64_t U, const int32_t *real,
                    const T *cu, const T *cp, double rho, double margin, int agg,
                    const T *ext, const int32_t *idx, const T *G, T *dzh, T *dzl)
{
    int64_t E = 2 * U + 2 * P;
    int joint = zl == zh;
    T *zt = malloc(sizeof(T) * (size_t)(3 * U * P + 2 * U + 3 * P));
    if (!zt) return -1;
    T *dt = zt + U * P, *dlt = joint ? dt : dt + U * P, *gu_h = zt + 3 * U * P, *gu_l = gu_h + U;
    T *gp_h = gu_l + U, *gp_l = gp_h + P, *m = gp_l + P;
    for (int64_t k = 0; k < n; k++) {
        int64_t R = real ? real[k] : U;
        const T *h = zh + k * P * U, *l = zl + k * P * U;
        T *dh = dzh + k * P * U, *dl = dzl + k * P * U;
        memset(dh, 0, sizeof(T) * (size_t)(P * U));
        if (!joint) memset(dl, 0, sizeof(T) * (size_t)(P * U));
        const T *hu = ext + k * E, *lu = hu + U, *hp = lu + U, *lp = hp + P;
        if (cu[k] == 0 && cp[k] == 0) continue;
        int any_u, any_p;
        F(hinge_grads)(hu, lu, hp, lp, R, P, G[k], cu[k], cp[k], rho, margin, agg, gu_h, gu_l, gp_h, gp_l, &any_u, &any_p);
        if (!any_u && !any_p) continue;
        if (idx) {  /* entry (p, u) at p·U + u */
            F(scatter_first)(idx + k * E, U, R, P, gu_h, gu_l, gp_h, gp_l, any_u, any_p, U, 1, dh, dl);
            continue;
        }
        memset(dt, 0, sizeof(T) * (size_t)(R * P));
        F(transpose)(h, P, U, R, zt);
        F(spread)(zt, P, R, hu, hp, gu_h, gp_h, any_u, any_p, m, dt);
        if (!joint) {
            memset(dlt, 0, sizeof(T) * (size_t)(R * P));
            F(transpose)(l, P, U, R, zt);
        }
        F(spread)(zt, P, R, lu, lp, gu_l, gp_l, any_u, any_p, m, dlt);
        for (int64_t p = 0; p < P; p++)
            for (int64_t u = 0; u < R; u++) dh[p * U + u] = dt[u * P + p];
        if (!joint)
            for (int64_t p = 0; p < P; p++)
                for (int64_t u = 0; u < R; u++) dl[p * U + u] = dlt[u * P + p];
    }
    free(zt);
    return 0;
}
