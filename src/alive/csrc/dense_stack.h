/* The grid engine's stack of rectangular dense ReLU networks (alive.grid.GridStack), float32:
 * the forward and the backward pass of every network of the stack in one call each.
 *
 * PyTorch trains such a stack with a few batched operations per layer; for the separation
 * paper's grids (100 points, 1 to 25 units, up to 120 layers) their per-call cost and the
 * padding of narrow networks to the stack's width outweigh the arithmetic. Here each network
 * runs alone at its own width, layer after layer, in units-major work buffers (R units × P
 * points, rows LD = P rounded up to 8 apart), so that every loop runs over the points,
 * contiguously, in 8-wide vectors. Column p of a layer depends only on column p of its input,
 * so the columns past P may hold anything; every reduction over the points stops at P.
 *
 * Parameters are read from, and gradients written to, the stack's flat parameter (see
 * grid._flatten_parameters), at element offsets given per layer:
 *   weights  w_off[l] + i·K_l·wm + k·wm + u   (K_0 = F inputs, K_l = wm after)
 *   biases   b_off[l] + i·wm + u
 *   BN       g_off[l] + i·wm + u, e_off[l] + i·wm + u (gamma, beta); running statistics
 *            rm[l] + i·wm + u, rv[l] + i·wm + u
 *   head     h_off + i·wm·C + k·C + c, hb_off + i·C + c
 * for network i (sorted by depth, deepest first, so layer l holds networks 0..n_l-1), unit
 * u < width[i], input k. Padded units are never read and their gradients stay 0.
 *
 * Saved for the backward pass, network after network, layer after layer: without BatchNorm the
 * pre-activation z (R × LD); with it the normalised xhat (R × LD) and 1/std (R). ext / idx:
 * per (network, layer) the penalty's extremes and their first positions, [hu | lu | hp | lp]
 * with wm units and P points each (separation_body.h's layout).
 */



/* out[r][p] = (bias ? bias[r] : 0) + Σ_s m[s·ms + r·mr] · in[s][p]  (r < R, s < S, p < LD) */
HOT FUSED static void mm(const float *restrict m, int64_t ms, int64_t mr, const float *restrict bias,
                   const float *restrict in, int64_t S, int64_t R, int64_t LD, float *restrict out)
{
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) {
        float b0 = bias ? bias[r] : 0, b1 = bias ? bias[r + 1] : 0, b2 = bias ? bias[r + 2] : 0, b3 = bias ? bias[r + 3] : 0;
        int64_t p = 0;
        for (; p + 16 <= LD; p += 16) {  /* 4 rows × 16 points: 8 accumulators */
            v8f a0 = (v8f){0} + b0, a1 = (v8f){0} + b1, a2 = (v8f){0} + b2, a3 = (v8f){0} + b3;
            v8f c0 = a0, c1 = a1, c2 = a2, c3 = a3;
            for (int64_t s = 0; s < S; s++) {
                const float *w = m + s * ms + r * mr;
                v8f h = ld8(in + s * LD + p), g = ld8(in + s * LD + p + 8);
                a0 += w[0] * h; c0 += w[0] * g;
                a1 += w[mr] * h; c1 += w[mr] * g;
                a2 += w[2 * mr] * h; c2 += w[2 * mr] * g;
                a3 += w[3 * mr] * h; c3 += w[3 * mr] * g;
            }
            st8(out + r * LD + p, a0); st8(out + r * LD + p + 8, c0);
            st8(out + (r + 1) * LD + p, a1); st8(out + (r + 1) * LD + p + 8, c1);
            st8(out + (r + 2) * LD + p, a2); st8(out + (r + 2) * LD + p + 8, c2);
            st8(out + (r + 3) * LD + p, a3); st8(out + (r + 3) * LD + p + 8, c3);
        }
        for (; p < LD; p += 8) {
            v8f a0 = (v8f){0} + b0, a1 = (v8f){0} + b1, a2 = (v8f){0} + b2, a3 = (v8f){0} + b3;
            for (int64_t s = 0; s < S; s++) {
                const float *w = m + s * ms + r * mr;
                v8f h = ld8(in + s * LD + p);
                a0 += w[0] * h; a1 += w[mr] * h; a2 += w[2 * mr] * h; a3 += w[3 * mr] * h;
            }
            st8(out + r * LD + p, a0); st8(out + (r + 1) * LD + p, a1);
            st8(out + (r + 2) * LD + p, a2); st8(out + (r + 3) * LD + p, a3);
        }
    }
    for (; r < R; r++) {
        float b0 = bias ? bias[r] : 0;
        for (int64_t p = 0; p < LD; p += 16) {
            int two = p + 16 <= LD;
            v8f a0 = (v8f){0} + b0, c0 = a0;
            for (int64_t s = 0; s < S; s++) {
                float w = m[s * ms + r * mr];
                a0 += w * ld8(in + s * LD + p);
                if (two) c0 += w * ld8(in + s * LD + p + 8);
            }
            st8(out + r * LD + p, a0);
            if (two) st8(out + r * LD + p + 8, c0);
        }
    }
}


/* out[s·os + r·orr] = Σ_{p<P} a[s][p] · b[r][p]  (s < S, r < R): weight gradients */
HOT FUSED static void dots(const float *restrict a, const float *restrict b, int64_t S, int64_t R, int64_t P, int64_t LD,
                     float *restrict out, int64_t os, int64_t orr)
{
    int64_t P8 = P & ~(int64_t)7;
    int64_t s = 0;
    for (; s + 2 <= S; s += 2) {  /* 2 rows of a × 4 rows of b: 8 accumulators, 6 loads per 8 products */
        const float *x0 = a + s * LD, *x1 = x0 + LD;
        int64_t r = 0;
        for (; r + 4 <= R; r += 4) {
            const float *y0 = b + r * LD, *y1 = y0 + LD, *y2 = y1 + LD, *y3 = y2 + LD;
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
            for (int64_t p = 0; p < P8; p += 8) {
                v8f h = ld8(x0 + p), g = ld8(x1 + p), v0 = ld8(y0 + p), v1 = ld8(y1 + p), v2 = ld8(y2 + p), v3 = ld8(y3 + p);
                a0 += h * v0; a1 += h * v1; a2 += h * v2; a3 += h * v3;
                c0 += g * v0; c1 += g * v1; c2 += g * v2; c3 += g * v3;
            }
            float t[8] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3), hsum8(c0), hsum8(c1), hsum8(c2), hsum8(c3)};
            for (int64_t p = P8; p < P; p++) {
                t[0] += x0[p] * y0[p]; t[1] += x0[p] * y1[p]; t[2] += x0[p] * y2[p]; t[3] += x0[p] * y3[p];
                t[4] += x1[p] * y0[p]; t[5] += x1[p] * y1[p]; t[6] += x1[p] * y2[p]; t[7] += x1[p] * y3[p];
            }
            for (int j = 0; j < 4; j++) { out[s * os + (r + j) * orr] = t[j]; out[(s + 1) * os + (r + j) * orr] = t[4 + j]; }
        }
        for (; r < R; r++) {
            const float *y = b + r * LD;
            v8f a0 = {0}, c0 = {0};
            for (int64_t p = 0; p < P8; p += 8) { v8f v = ld8(y + p); a0 += ld8(x0 + p) * v; c0 += ld8(x1 + p) * v; }
            float t0 = hsum8(a0), t1 = hsum8(c0);
            for (int64_t p = P8; p < P; p++) { t0 += x0[p] * y[p]; t1 += x1[p] * y[p]; }
            out[s * os + r * orr] = t0;
            out[(s + 1) * os + r * orr] = t1;
        }
    }
    for (; s < S; s++) {
        const float *x = a + s * LD;
        for (int64_t r = 0; r < R; r++) {
            const float *y = b + r * LD;
            v8f a0 = {0};
            for (int64_t p = 0; p < P8; p += 8) a0 += ld8(x + p) * ld8(y + p);
            float t = hsum8(a0);
            for (int64_t p = P8; p < P; p++) t += x[p] * y[p];
            out[s * os + r * orr] = t;
        }
    }
}

HOT static float row_sum(const float *restrict x, int64_t P)
{
    int64_t P8 = P & ~(int64_t)7;
    v8f a = {0};
    for (int64_t p = 0; p < P8; p += 8) a += ld8(x + p);
    float t = hsum8(a);
    for (int64_t p = P8; p < P; p++) t += x[p];
    return t;
}

/* relu as torch.relu: a NaN stays NaN */
HOT static void relu_rows(const float *restrict y, int64_t R, int64_t P, int64_t LD, float *restrict h)
{
    for (int64_t u = 0; u < R; u++)
        for (int64_t p = 0; p < P; p++) { float v = y[u * LD + p]; h[u * LD + p] = v < 0 ? 0 : v; }
}

/* (P, K) rows -> (K, LD) columns, the columns past P zeroed */
static void to_columns(const float *restrict x, int64_t P, int64_t K, int64_t LD, float *restrict xt)
{
    for (int64_t k = 0; k < K; k++) {
        for (int64_t p = 0; p < P; p++) xt[k * LD + p] = x[p * K + k];
        for (int64_t p = P; p < LD; p++) xt[k * LD + p] = 0;
    }
}

static int64_t round8(int64_t P) { return (P + 7) & ~(int64_t)7; }

/* Floats saved per (network, layer) of width R for the backward pass. */
static int64_t saved_per_layer(int64_t R, int64_t P, int bn) { return R * round8(P) + (bn ? R : 0); }

int64_t stack_saved_f32(const int32_t *depth, const int32_t *width, int64_t N, int64_t P, int bn)
{
    int64_t total = 0;
    for (int64_t i = 0; i < N; i++) total += depth[i] * saved_per_layer(width[i], P, bn);
    return total;
}

/* The forward pass: logits (N, P, C) and the penalty of each network (N), P >= 1. x +
 * i·x_stride: the (P, F) inputs of network i. train == 0: evaluation (BatchNorm's running
 * statistics, no penalty, nothing saved; save, ext and idx are not read); otherwise training:
 * BatchNorm normalises by the batch (P >= 2) and updates its running statistics (padded units
 * too, as PyTorch's kernel does with their zero inputs), and networks with cu or cp != 0 get
 * the separation penalty of every hidden layer's pre-activation (before BatchNorm), first
 * ties, in ext / idx: one block per layer of each such network, in order. cu / cp NULL: no penalty at all. Returns 0, or -1 when out of memory. */
int stack_forward_f32(const float *x, int64_t x_stride, int64_t N, int64_t P, int64_t F, int64_t C, int64_t wm,
                      const int32_t *depth, const int32_t *width, const float *flat,
                      const int64_t *w_off, const int64_t *b_off, const int64_t *g_off, const int64_t *e_off,
                      int64_t h_off, int64_t hb_off, float *const *rm, float *const *rv, double eps, double momentum,
                      const float *cu, const float *cp, double rho, double margin, int agg, int train,
                      float *save, float *ext, int32_t *idx, float *logits, float *pen)
{
    int64_t LD = round8(P), K0 = F > wm ? F : wm, E = 2 * wm + 2 * P;
    int bn = g_off != NULL;
    /* zeroed: the columns past P of what is never written stay finite */
    float *buf = calloc((size_t)((K0 + 3 * wm + C) * LD), sizeof(float));
    if (!buf) return -1;
    float *xt = buf, *z = xt + K0 * LD, *y = z + wm * LD, *h = y + wm * LD, *o = h + wm * LD;
    if (!train) save = NULL, ext = NULL, idx = NULL;
    int64_t saved = 0, layer_index = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t R = width[i], D = depth[i];
        int penalised = train && cu && (cu[i] != 0 || cp[i] != 0);
        double total = 0;
        to_columns(x + i * x_stride, P, F, LD, xt);
        const float *in = xt;
        for (int64_t l = 0; l < D; l++) {
            int64_t K = l == 0 ? F : R, Kp = l == 0 ? F : wm;
            const float *W = flat + w_off[l] + i * Kp * wm;
            float *zl = save && !bn ? save + saved : z;
            mm(W, wm, 1, flat + b_off[l] + i * wm, in, K, R, LD, zl);
            if (penalised) {
                float *hu = ext + layer_index * E, *lu = hu + wm, *hp = lu + wm, *lp = hp + P;
                int32_t *iu = idx + layer_index * E, *ju = iu + wm, *ip = ju + wm, *jp = ip + P;
                extremes_f32(zl, zl, P, LD, R, hu, lu, hp, lp, iu, ju, ip, jp);
                total += layer_penalty_f32(hu, lu, hp, lp, R, P, cu[i], cp[i], rho, margin, agg);
                layer_index++;
            }
            const float *yl = zl;
            if (bn) {
                const float *gamma = flat + g_off[l] + i * wm, *beta = flat + e_off[l] + i * wm;
                float *mean = rm[l] + i * wm, *var = rv[l] + i * wm;
                float *xhat = save ? save + saved : NULL, *istd = save ? xhat + R * LD : NULL;
                for (int64_t u = 0; u < R; u++) {
                    const float *zu = zl + u * LD;
                    float *yu = y + u * LD;
                    if (save) {  /* the batch's statistics (biased variance), two passes in double */
                        double s = 0, q = 0;
                        for (int64_t p = 0; p < P; p++) s += zu[p];
                        double mu = s / (double)P;
                        for (int64_t p = 0; p < P; p++) q += ((double)zu[p] - mu) * ((double)zu[p] - mu);
                        double v = q / (double)P;
                        float is = (float)(1.0 / sqrt(v + eps));
                        float *xu = xhat + u * LD;
                        for (int64_t p = 0; p < P; p++) { xu[p] = (zu[p] - (float)mu) * is; yu[p] = gamma[u] * xu[p] + beta[u]; }
                        istd[u] = is;
                        mean[u] = (float)((1 - momentum) * mean[u] + momentum * mu);
                        var[u] = (float)((1 - momentum) * var[u] + momentum * (P > 1 ? v * P / (P - 1) : v));
                    } else {
                        float is = (float)(1.0 / sqrt((double)var[u] + eps)), mu = mean[u];
                        for (int64_t p = 0; p < P; p++) yu[p] = gamma[u] * ((zu[p] - mu) * is) + beta[u];
                    }
                }
                if (save)  /* padded units: PyTorch's kernel sees zeros there (mean 0, variance 0) */
                    for (int64_t u = R; u < wm; u++) {
                        mean[u] = (float)((1 - momentum) * mean[u]);
                        var[u] = (float)((1 - momentum) * var[u]);
                    }
                yl = y;
            }
            if (save) saved += saved_per_layer(R, P, bn);
            relu_rows(yl, R, P, LD, h);
            in = h;
        }
        mm(flat + h_off + i * wm * C, C, 1, flat + hb_off + i * C, in, R, C, LD, o);
        for (int64_t p = 0; p < P; p++)
            for (int64_t c = 0; c < C; c++) logits[(i * P + p) * C + c] = o[c * LD + p];
        pen[i] = (float)total;
    }
    free(buf);
    return 0;
}

/* relu's gradient as autograd's threshold_backward takes it: 0 where y <= 0 */
HOT static void relu_grad(const float *restrict y, const float *restrict gh, int64_t R, int64_t P, int64_t LD,
                          float *restrict gz)
{
    for (int64_t u = 0; u < R; u++)
        for (int64_t p = 0; p < P; p++) gz[u * LD + p] = y[u * LD + p] <= 0 ? 0 : gh[u * LD + p];
}

/* BatchNorm's backward (training mode) in place on g, from xhat and 1/std */
HOT static void batchnorm_grad(const float *restrict xhat, const float *restrict istd, const float *restrict gamma,
                               int64_t R, int64_t P, int64_t LD, float *restrict gz, float *restrict ggamma,
                               float *restrict gbeta)
{
    for (int64_t u = 0; u < R; u++) {
        float *restrict g = gz + u * LD;
        const float *restrict xu = xhat + u * LD;
        double sg = 0, sgx = 0;
        for (int64_t p = 0; p < P; p++) { sg += g[p]; sgx += (double)g[p] * xu[p]; }
        ggamma[u] = (float)sgx;
        gbeta[u] = (float)sg;
        float k = gamma[u] * istd[u] / (float)P, a = (float)sg, b = (float)sgx;
        for (int64_t p = 0; p < P; p++) g[p] = k * ((float)P * g[p] - a - xu[p] * b);
    }
}

/* y of a layer from what its forward pass saved (z itself without BatchNorm) */
HOT static const float *layer_output(const float *restrict s, int64_t R, int64_t P, int64_t LD, int bn,
                                     const float *restrict gamma, const float *restrict beta, float *restrict y)
{
    if (!bn) return s;
    for (int64_t u = 0; u < R; u++)
        for (int64_t p = 0; p < P; p++) y[u * LD + p] = gamma[u] * s[u * LD + p] + beta[u];
    return y;
}

/* The backward pass: the gradient of Σ glogits·logits + Σ gpen·pen with respect to the flat
 * parameter, written into grad (zeroed by the caller), from what stack_forward_f32 saved. */
int stack_backward_f32(const float *x, int64_t x_stride, int64_t N, int64_t P, int64_t F, int64_t C, int64_t wm,
                       const int32_t *depth, const int32_t *width, const float *flat,
                       const int64_t *w_off, const int64_t *b_off, const int64_t *g_off, const int64_t *e_off,
                       int64_t h_off, int64_t hb_off, const float *cu, const float *cp, double rho, double margin,
                       int agg, const float *save, const float *ext, const int32_t *idx,
                       const float *glogits, const float *gpen, float *grad)
{
    int64_t LD = round8(P), K0 = F > wm ? F : wm, E = 2 * wm + 2 * P;
    int bn = g_off != NULL;
    float *buf = calloc((size_t)((K0 + 5 * wm + C) * LD + 2 * wm + 2 * P), sizeof(float));
    if (!buf) return -1;
    float *xt = buf, *ya = xt + K0 * LD, *yb = ya + wm * LD, *h = yb + wm * LD, *gh = h + wm * LD;
    float *gz = gh + wm * LD, *gl = gz + wm * LD, *gu_h = gl + C * LD, *gu_l = gu_h + wm, *gp_h = gu_l + wm, *gp_l = gp_h + P;
    int64_t saved = 0, layers = 0;
    for (int64_t i = 0; i < N; i++) {
        int64_t R = width[i], D = depth[i], per = saved_per_layer(R, P, bn);
        const float *s_top = save + saved + (D - 1) * per;
        float G = gpen ? gpen[i] : 0;
        int has_penalty = cu && (cu[i] != 0 || cp[i] != 0), penalised = has_penalty && G != 0;
        const float *gamma_top = bn ? flat + g_off[D - 1] + i * wm : NULL, *beta_top = bn ? flat + e_off[D - 1] + i * wm : NULL;
        const float *y = layer_output(s_top, R, P, LD, bn, gamma_top, beta_top, ya);
        relu_rows(y, R, P, LD, h);
        for (int64_t c = 0; c < C; c++) {
            for (int64_t p = 0; p < P; p++) gl[c * LD + p] = glogits[(i * P + p) * C + c];
            for (int64_t p = P; p < LD; p++) gl[c * LD + p] = 0;
        }
        const float *hw = flat + h_off + i * wm * C;
        dots(h, gl, R, C, P, LD, grad + h_off + i * wm * C, C, 1);
        for (int64_t c = 0; c < C; c++) grad[hb_off + i * C + c] = row_sum(gl + c * LD, P);
        mm(hw, 1, C, NULL, gl, C, R, LD, gh);
        for (int64_t l = D - 1; l >= 0; l--) {
            const float *s = save + saved + l * per;
            relu_grad(y, gh, R, P, LD, gz);
            if (bn) batchnorm_grad(s, s + R * LD, flat + g_off[l] + i * wm, R, P, LD, gz, grad + g_off[l] + i * wm,
                                   grad + e_off[l] + i * wm);
            if (penalised) {
                int64_t q = layers + l;
                const float *hu = ext + q * E, *lu = hu + wm, *hp = lu + wm, *lp = hp + P;
                int any_u, any_p;  /* entry (p, u) of the units-major gz at u·LD + p */
                hinge_grads_f32(hu, lu, hp, lp, R, P, G, cu[i], cp[i], rho, margin, agg, gu_h, gu_l, gp_h, gp_l, &any_u, &any_p);
                scatter_first_f32(idx + q * E, wm, R, P, gu_h, gu_l, gp_h, gp_l, any_u, any_p, 1, LD, gz, gz);
            }
            const float *in;
            if (l > 0) {
                const float *gamma = bn ? flat + g_off[l - 1] + i * wm : NULL, *beta = bn ? flat + e_off[l - 1] + i * wm : NULL;
                y = layer_output(s - per, R, P, LD, bn, gamma, beta, y == ya ? yb : ya);
                relu_rows(y, R, P, LD, h);
                in = h;
            } else {
                to_columns(x + i * x_stride, P, F, LD, xt);
                in = xt;
            }
            int64_t K = l == 0 ? F : R, Kp = l == 0 ? F : wm;
            dots(in, gz, K, R, P, LD, grad + w_off[l] + i * Kp * wm, wm, 1);
            for (int64_t u = 0; u < R; u++) grad[b_off[l] + i * wm + u] = row_sum(gz + u * LD, P);
            if (l > 0) mm(flat + w_off[l] + i * Kp * wm, 1, wm, NULL, gz, R, R, LD, gh);
        }
        saved += D * per;
        if (has_penalty) layers += D;
    }
    free(buf);
    return 0;
}
