/* The kernels of separation.c for one element type T, names suffixed by F(name). */

/* (P, U) rows -> (R, P) columns (the first R units) */
HOT static void F(transpose)(const T *restrict z, int64_t P, int64_t U, int64_t R, T *restrict zt)
{
    if (R == U && U <= 8)  /* (a constant unit count moves several rows' units at once) */
        FOR_UNITS(U, W, for (int64_t p = 0; p < P; p++) for (int64_t u = 0; u < W; u++) zt[u * P + p] = z[p * W + u]);
    else
        for (int64_t u = 0; u < R; u++)  /* strided reads, sequential writes */
            for (int64_t p = 0; p < P; p++) zt[u * P + p] = z[p * U + u];
}

/* (R, P) columns -> (P, U) rows; units R..U (padding) get 0 */
HOT static void F(untranspose)(const T *restrict zt, int64_t P, int64_t U, int64_t R, T *restrict z)
{
    if (R == U && U <= 8)
        FOR_UNITS(U, W, for (int64_t p = 0; p < P; p++) for (int64_t u = 0; u < W; u++) z[p * W + u] = zt[u * P + p]);
    else
        for (int64_t p = 0; p < P; p++) {
            for (int64_t u = 0; u < R; u++) z[p * U + u] = zt[u * P + p];
            for (int64_t u = R; u < U; u++) z[p * U + u] = 0;
        }
}

static int64_t F(first_nan)(const T *z, int64_t stride, int64_t count)
{
    for (int64_t i = 0; i < count; i++)
        if (z[i * stride] != z[i * stride]) return i;
    return -1;
}

/* The first positions of the columns' extremes eu (iu) and of the points' extremes ep across
 * the columns (ip), torch.max(dim)'s convention: found by a branch-free pass, as comparisons
 * that pick a running extreme and its position mispredict on every other entry. */
HOT static void F(first_positions)(const T *restrict zt, int64_t P, int64_t ld, int64_t R, const T *restrict eu,
                                   const T *restrict ep, int bad, int32_t *restrict iu, int32_t *restrict ip)
{
    for (int64_t u = 0; u < R; u++) {
        const T *restrict c = zt + u * ld;
        T e = eu[u];
        if (e != e) { iu[u] = (int32_t)F(first_nan)(c, 1, P); continue; }
        int32_t first = (int32_t)P;  /* the smallest position holding e */
        for (int64_t p = 0; p < P; p++) { int32_t at = c[p] == e ? (int32_t)p : (int32_t)P; first = at < first ? at : first; }
        iu[u] = first < P ? first : 0;
    }
    for (int64_t p = 0; p < P; p++) ip[p] = -1;
    for (int64_t u = 0; u < R; u++) {
        const T *restrict c = zt + u * ld;
        for (int64_t p = 0; p < P; p++) ip[p] = (ip[p] < 0) & (c[p] == ep[p]) ? (int32_t)u : ip[p];
    }
    if (bad)
        for (int64_t p = 0; p < P; p++)
            if (ep[p] != ep[p]) ip[p] = (int32_t)F(first_nan)(zt + p, ld, R);
    for (int64_t p = 0; p < P; p++) ip[p] = ip[p] < 0 ? 0 : ip[p];
}

/* The maxima of the columns of th (hu) and of each point across them (hp), and the minima of
 * those of tl (lu, lp; tl may be th), in one pass; with the first arg-extremes when iu is given
 * (ju, ip, jp likewise). A NaN makes its extremes NaN (torch.amax), at its first position;
 * comparisons skip NaNs, so a rare extra pass puts them back. Rows (columns of the layer) are
 * ld apart. */
HOT static void F(extremes)(const T *restrict th, const T *restrict tl, int64_t P, int64_t ld, int64_t R,
                            T *restrict hu, T *restrict lu, T *restrict hp, T *restrict lp,
                            int32_t *restrict iu, int32_t *restrict ju, int32_t *restrict ip, int32_t *restrict jp)
{
    int bad = 0;
    for (int64_t p = 0; p < P; p++) { hp[p] = th[p]; lp[p] = tl[p]; }
    for (int64_t u = 0; u < R; u++) {
        const T *restrict a = th + u * ld, *restrict b = tl + u * ld;
        VT hi = (VT){0} + a[0], lo = (VT){0} + b[0];  /* VL running extremes */
        int64_t p = 0;
        for (; p + VL <= P; p += VL) {
            VT x = *(const VU *)(a + p), y = *(const VU *)(b + p);
            hi = VSELECT(x > hi, x, hi);
            lo = VSELECT(y < lo, y, lo);
        }
        T h = hi[0], l = lo[0];
        for (int j = 1; j < VL; j++) { h = hi[j] > h ? hi[j] : h; l = lo[j] < l ? lo[j] : l; }
        for (; p < P; p++) { h = a[p] > h ? a[p] : h; l = b[p] < l ? b[p] : l; }
        hu[u] = h;
        lu[u] = l;
        int nan = 0;
        if (u > 0)
            for (p = 0; p < P; p++) {
                hp[p] = a[p] > hp[p] ? a[p] : hp[p];
                lp[p] = b[p] < lp[p] ? b[p] : lp[p];
                nan |= (a[p] != a[p]) | (b[p] != b[p]);
            }
        else
            for (p = 0; p < P; p++) nan |= (a[p] != a[p]) | (b[p] != b[p]);
        bad |= nan;
    }
    if (bad) {
        for (int64_t u = 0; u < R; u++) {
            int64_t i = F(first_nan)(th + u * ld, 1, P), k = F(first_nan)(tl + u * ld, 1, P);
            if (i >= 0) hu[u] = th[u * ld + i];
            if (k >= 0) lu[u] = tl[u * ld + k];
        }
        for (int64_t p = 0; p < P; p++) {
            int64_t i = F(first_nan)(th + p, ld, R), k = F(first_nan)(tl + p, ld, R);
            if (i >= 0) hp[p] = th[i * ld + p];
            if (k >= 0) lp[p] = tl[k * ld + p];
        }
    }
    if (!iu) return;
    F(first_positions)(th, P, ld, R, hu, hp, bad, iu, ip);
    F(first_positions)(tl, P, ld, R, lu, lp, bad, ju, jp);
}

static inline T F(slack)(T hi, T lo, double rho, double margin)
{
    T sh = (T)margin - hi, sl = lo + (T)margin;  /* x < 0 ? 0 : x keeps a NaN, as relu does */
    return (T)rho * (sh < 0 ? 0 : sh) + (T)(1.0 - rho) * (sl < 0 ? 0 : sl);
}

/* cu·A(s_u) + cp·A(s_p) of one layer from its extremes (R units, P points), summed in double
 * (the points in eight running sums); a zero coefficient leaves its term out */
HOT static double F(layer_penalty)(const T *restrict hu, const T *restrict lu, const T *restrict hp,
                                   const T *restrict lp, int64_t R, int64_t P, T cu, T cp, double rho, double margin,
                                   int agg)
{
    double su = 0, sp = 0;
    if (cu != 0)
        for (int64_t u = 0; u < R; u++) { double s = F(slack)(hu[u], lu[u], rho, margin); su += agg == 1 ? s * s : s; }
    if (cp != 0) {
        double a[8] = {0};
        int64_t p = 0;
        if (agg == 1)
            for (; p + 8 <= P; p += 8)
                for (int j = 0; j < 8; j++) { double s = F(slack)(hp[p + j], lp[p + j], rho, margin); a[j] += s * s; }
        else
            for (; p + 8 <= P; p += 8)
                for (int j = 0; j < 8; j++) a[j] += F(slack)(hp[p + j], lp[p + j], rho, margin);
        for (; p < P; p++) { double s = F(slack)(hp[p], lp[p], rho, margin); a[0] += agg == 1 ? s * s : s; }
        sp = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
    if (agg == 2) { su /= (double)R; sp /= (double)P; }
    return (cu != 0 ? cu * su : 0) + (cp != 0 ? cp * sp : 0);
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
HOT static void F(hinge_grads)(const T *restrict hu, const T *restrict lu, const T *restrict hp, const T *restrict lp,
                               int64_t R, int64_t P, T G, T cu, T cp, double rho, double margin, int agg,
                               T *restrict gu_h, T *restrict gu_l, T *restrict gp_h, T *restrict gp_l,
                               int *any_u, int *any_p)
{
    T c_u = cu != 0 ? G * cu : 0, c_p = cp != 0 ? G * cp : 0;
    int au = 0, ap = 0;
    for (int64_t u = 0; u < R; u++) {
        F(slack_grads)(hu[u], lu[u], c_u, rho, margin, agg, R, gu_h + u, gu_l + u);
        au |= (gu_h[u] != 0) | (gu_l[u] != 0);
    }
    /* the points' loops, one per aggregation: the compiler vectorises them */
    T mh = (T)margin, ml = (T)(-margin), kh = (T)(-rho), kl = (T)(1.0 - rho);
    /* (products outside the selections: the compiler does not move a float operation into one) */
    if (agg == 1)
        for (int64_t p = 0; p < P; p++) {
            T ds = 2 * F(slack)(hp[p], lp[p], rho, margin) * c_p, vh = ds * kh, vl = ds * kl;
            gp_h[p] = hp[p] >= mh ? 0 : vh;
            gp_l[p] = lp[p] <= ml ? 0 : vl;
        }
    else {
        T ds = agg == 2 ? c_p / (T)P : c_p, vh = ds * kh, vl = ds * kl;
        for (int64_t p = 0; p < P; p++) {
            gp_h[p] = hp[p] >= mh ? 0 : vh;
            gp_l[p] = lp[p] <= ml ? 0 : vl;
        }
    }
    for (int64_t p = 0; p < P; p++) ap |= (gp_h[p] != 0) | (gp_l[p] != 0);
    *any_u = au;
    *any_p = ap;
}

/* Add the extremes' gradients at their first positions (idx: [iu | ju | ip | jp], U units
 * and P points, the layout of sep_penalty's first positions) into dh (maxima) and dl (minima, dh itself
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

/* Each point's share of the gradient gh of its maximum hp among the columns th that hold it
 * (mh: P), and of gl of its minimum lp among those of tl (ml); g/0 for a NaN extreme, which no
 * entry equals: the PyTorch path's NaN */
HOT static void F(point_shares)(const T *restrict th, const T *restrict tl, int64_t P, int64_t R,
                                const T *restrict hp, const T *restrict lp, const T *restrict gh,
                                const T *restrict gl, T *restrict mh, T *restrict ml)
{
    for (int64_t p = 0; p < P; p++) mh[p] = ml[p] = 0;
    for (int64_t u = 0; u < R; u++) {
        const T *restrict a = th + u * P, *restrict b = tl + u * P;
        for (int64_t p = 0; p < P; p++) {
            mh[p] += a[p] == hp[p] ? (T)1 : (T)0;
            ml[p] += b[p] == lp[p] ? (T)1 : (T)0;
        }
    }
    for (int64_t p = 0; p < P; p++) { mh[p] = gh[p] / mh[p]; ml[p] = gl[p] / ml[p]; }
}

/* A column's share of its maximum's gradient gh among its entries (a) equal to the maximum eh
 * (*sh), and what every other entry gets (*zh: 0, or 0·gh/0 for a NaN extreme, which no entry
 * equals); the same for its minimum el in b (*sl, *zl) */
HOT static void F(unit_shares)(const T *restrict a, const T *restrict b, int64_t P, T eh, T el, T gh, T gl,
                               T *sh, T *zh, T *sl, T *zl)
{
    int32_t th = 0, tl = 0;  /* integer counts: a float sum would not be vectorised */
    for (int64_t p = 0; p < P; p++) { th += a[p] == eh; tl += b[p] == el; }
    *sh = gh / (T)th;
    *zh = th == 0 ? (T)0 * *sh : (T)0;
    *sl = gl / (T)tl;
    *zl = tl == 0 ? (T)0 * *sl : (T)0;
}

/* The gradient of the extremes (gu_h / gp_h of the unit / point maxima hu / hp of the columns
 * th, gu_l / gp_l of the minima lu / lp of tl) shared equally among tied entries, written into
 * the columns dh (maxima) and dl (minima; tl == th and dl == dh for dense layers), adding up
 * each entry's shares in the order of the PyTorch path: unit maxima, point maxima, unit
 * minima, point minima. s: 2P scratch. */
HOT static void F(spread)(const T *restrict th, const T *restrict tl, int64_t P, int64_t R, const T *restrict hu,
                          const T *restrict lu, const T *restrict hp, const T *restrict lp, const T *restrict gu_h,
                          const T *restrict gu_l, const T *restrict gp_h, const T *restrict gp_l, int any_u, int any_p,
                          T *restrict s, T *dh, T *dl)
{
    T *restrict mh = s, *restrict ml = s + P;
    if (any_p)
        F(point_shares)(th, tl, P, R, hp, lp, gp_h, gp_l, mh, ml);
    else
        for (int64_t p = 0; p < P; p++) mh[p] = ml[p] = 0;
    for (int64_t u = 0; u < R; u++) {
        const T *restrict a = th + u * P, *restrict b = tl + u * P;
        T eh = hu[u], el = lu[u], sh = 0, zh = 0, sl = 0, zl = 0;
        if (any_u) F(unit_shares)(a, b, P, eh, el, gu_h[u], gu_l[u], &sh, &zh, &sl, &zl);
        if (dh == dl) {
            T *restrict d = dh + u * P;
            for (int64_t p = 0; p < P; p++) {
                T v = (T)0 + (a[p] == eh ? sh : zh);
                v += (T)(a[p] == hp[p]) * mh[p];
                v += a[p] == el ? sl : zl;
                d[p] = v + (T)(a[p] == lp[p]) * ml[p];
            }
        } else {
            T *restrict x = dh + u * P, *restrict y = dl + u * P;
            for (int64_t p = 0; p < P; p++) {
                x[p] = ((T)0 + (a[p] == eh ? sh : zh)) + (T)(a[p] == hp[p]) * mh[p];
                y[p] = ((T)0 + (b[p] == el ? sl : zl)) + (T)(b[p] == lp[p]) * ml[p];
            }
        }
    }
}

/* out[k] = cu[k]·A(s_u) + cp[k]·A(s_p) for each layer k of the stack zh (maxima) and zl
 * (minima: zh itself for dense layers; a feature map's spatial minima otherwise), A: sum (agg
 * 0), sum of squares (1) or mean (2); a zero coefficient leaves its term out; the first
 * real[k] units of a layer are real, the rest padding (real NULL: all). When total is given,
 * *total = scale·Σ out[k] (summed in double). When dzh is given, also the gradient, while the
 * layer is at hand: of *total (total given) or of Σ out[k] (not) with respect to zh and zl,
 * written into dzh and dzl (the same buffer when zl == zh; padded units get 0), adding up each
 * entry's shares in the order of the PyTorch path: split ties (first 0): unit maxima, point
 * maxima, unit minima, point minima, each extreme's gradient shared equally among the entries
 * holding it; first ties: unit maxima, unit minima, point maxima, point minima, each at its first
 * position. Returns 0, or -1 when out of memory. (Declared in sep_penalty.h, for
 * dense_penalty.cpp.) */
ALIVE_SEP_PENALTY(T, F(sep_penalty))
{
    int64_t E = 2 * U + 2 * P;
    int joint = zl == zh, grad = dzh != NULL;
    /* columns of zh and zl, and of their gradients; the extremes, their first positions, their
     * gradients and the points' shares of them */
    size_t cols = (size_t)((joint ? 1 : 2) * U * P) * (grad ? 2 : 1);
    T *th = scratch(sizeof(T) * (cols + (size_t)(2 * E + 2 * P)) + sizeof(int32_t) * (size_t)E);
    if (!th) return -1;
    T *tl = joint ? th : th + U * P, *dth = th + (joint ? 1 : 2) * U * P, *dtl = joint ? dth : dth + U * P;
    T *hu = th + cols, *lu = hu + U, *hp = lu + U, *lp = hp + P;
    T *gu_h = lp + P, *gu_l = gu_h + U, *gp_h = gu_l + U, *gp_l = gp_h + P, *shares = gp_l + P;
    int32_t *iu = first ? (int32_t *)(shares + 2 * P) : NULL, *ju = first ? iu + U : NULL;
    int32_t *ip = first ? ju + U : NULL, *jp = first ? ip + P : NULL;
    T G = (T)(total ? scale : 1.0);
    for (int64_t k = 0; k < n; k++) {
        int64_t R = real ? real[k] : U;
        T *dh = grad ? dzh + k * P * U : NULL, *dl = grad ? dzl + k * P * U : NULL;
        int any_u = 0, any_p = 0;
        out[k] = 0;
        if (cu[k] != 0 || cp[k] != 0) {  /* (both 0: an unconstrained net of the grid's stack) */
            F(transpose)(zh + k * P * U, P, U, R, th);
            if (!joint) F(transpose)(zl + k * P * U, P, U, R, tl);
            F(extremes)(th, tl, P, P, R, hu, lu, hp, lp, iu, ju, ip, jp);
            out[k] = (T)F(layer_penalty)(hu, lu, hp, lp, R, P, cu[k], cp[k], rho, margin, agg);
            if (grad)
                F(hinge_grads)(hu, lu, hp, lp, R, P, G, cu[k], cp[k], rho, margin, agg, gu_h, gu_l, gp_h, gp_l,
                               &any_u, &any_p);
        }
        if (!grad) continue;
        if (first || (!any_u && !any_p)) {  /* entry (p, u) at p·U + u */
            memset(dh, 0, sizeof(T) * (size_t)(P * U));
            if (!joint) memset(dl, 0, sizeof(T) * (size_t)(P * U));
            if (any_u || any_p)
                F(scatter_first)(iu, U, R, P, gu_h, gu_l, gp_h, gp_l, any_u, any_p, U, 1, dh, dl);
            continue;
        }
        F(spread)(th, tl, P, R, hu, lu, hp, lp, gu_h, gu_l, gp_h, gp_l, any_u, any_p, shares, dth, dtl);
        F(untranspose)(dth, P, U, R, dh);
        if (!joint) F(untranspose)(dtl, P, U, R, dl);
    }
    release(th);
    if (total) {
        double sum = 0;
        for (int64_t k = 0; k < n; k++) sum += out[k];
        *total = (T)(scale * sum);
    }
    return 0;
}
