/* The mirror-linked ReLU of alive.functional.linked_relu for one element type T (names
 * suffixed by F(name)), one pass each way. Each of `rows` rows of `len` input elements becomes
 * two output rows, relu(z) then relu(-z): the layout of cat((relu(z), relu(-z)), dim) for a
 * tensor whose dimension `dim` and those after it make one row in memory (a contiguous tensor,
 * or channels-last with dim 1). PyTorch's three passes forward (two thresholds and a negation)
 * and three backward (two threshold_backward, a subtraction) each read and write whole tensors;
 * here every element is read once and written once. NaNs pass as PyTorch's relu passes them.
 * Large tensors are split among `threads` threads of PyTorch's own OpenMP pool (see
 * separation.c): PyTorch's passes use both cores' memory bandwidth, and a single thread
 * writing 2x the input into freshly allocated memory lost to them. */

/* elements [start, end) of the input, in memory order, and their two output elements each */
HOT static void F(linked_span)(const T *restrict z, int64_t len, int64_t start, int64_t end, T *restrict out)
{
    while (start < end) {
        int64_t r = start / len, c = start - r * len, stop = (r + 1) * len < end ? (r + 1) * len : end;
        const T *restrict s = z + start;
        T *restrict p = out + 2 * r * len + c, *restrict n = p + len;
        for (int64_t i = 0; i < stop - start; i++) {
            T v = s[i];
            p[i] = v < 0 ? 0 : v;
            n[i] = v > 0 ? 0 : -v;
        }
        start = stop;
    }
}

/* dz = g_pos·[out_pos > 0] − g_neg·[out_neg > 0], threshold_backward's convention (a NaN output
 * passes its gradient), for the same elements as F(linked_span) */
HOT static void F(linked_span_grad)(const T *restrict g, const T *restrict out, int64_t len, int64_t start,
                                    int64_t end, T *restrict dz)
{
    VT zero = (VT){0};
    while (start < end) {
        int64_t r = start / len, c = start - r * len, stop = (r + 1) * len < end ? (r + 1) * len : end;
        int64_t m = stop - start, off = 2 * r * len + c;
        const T *gp = g + off, *gn = gp + len, *op = out + off, *on = op + len;
        T *d = dz + start;
        int64_t i = 0;
        for (; i + VL <= m; i += VL) {  /* (masks, not selections: the compiler keeps branches there) */
            VT a = *(const VU *)(gp + i), b = *(const VU *)(gn + i);
            VT pa = (VT)(~(VI)(*(const VU *)(op + i) <= zero) & (VI)a);
            VT nb = (VT)(~(VI)(*(const VU *)(on + i) <= zero) & (VI)b);
            *(VU *)(d + i) = pa - nb;
        }
        for (; i < m; i++) {
            T a = gp[i], b = gn[i];
            d[i] = (op[i] <= 0 ? (T)0 : a) - (on[i] <= 0 ? (T)0 : b);
        }
        start = stop;
    }
}

int F(linked_relu_forward)(const T *z, int64_t rows, int64_t len, T *out, int threads)
{
    int64_t total = rows * len;
    IN_PARTS(threads, total, 16, lo, hi, F(linked_span)(z, len, lo, hi, out));
    return 0;
}

int F(linked_relu_backward)(const T *g, const T *out, int64_t rows, int64_t len, T *dz, int threads)
{
    int64_t total = rows * len;
    IN_PARTS(threads, total, 16, lo, hi, F(linked_span_grad)(g, out, len, lo, hi, dz));
    return 0;
}
