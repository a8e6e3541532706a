/* The mirror-linked ReLU of alive.functional.linked_relu for one element type T (names
 * suffixed by F(name)), one pass each way. Each of `rows` rows of `len` input elements becomes
 * two output rows, relu(z) then relu(-z): the layout of cat((relu(z), relu(-z)), dim) for a
 * tensor whose dimension `dim` and those after it make one row in memory (a contiguous tensor,
 * or channels-last with dim 1). PyTorch's three passes forward (two thresholds and a negation)
 * and three backward (two threshold_backward, a subtraction) each read and write whole tensors;
 * here every element is read once and written once. NaNs pass as PyTorch's relu passes them. */

HOT static void F(linked_rows)(const T *restrict z, int64_t rows, int64_t len, T *restrict out)
{
    for (int64_t r = 0; r < rows; r++) {
        const T *restrict s = z + r * len;
        T *restrict p = out + 2 * r * len, *restrict n = p + len;
        for (int64_t i = 0; i < len; i++) {
            T v = s[i];
            p[i] = v < 0 ? 0 : v;
            n[i] = v > 0 ? 0 : -v;
        }
    }
}

/* dz = g_pos·[out_pos > 0] − g_neg·[out_neg > 0], threshold_backward's convention (a NaN output
 * passes its gradient), in the same rows as the forward pass */
HOT static void F(linked_rows_grad)(const T *restrict g, const T *restrict out, int64_t rows, int64_t len,
                                    T *restrict dz)
{
    VT zero = (VT){0};
    for (int64_t r = 0; r < rows; r++) {
        const T *gp = g + 2 * r * len, *gn = gp + len, *op = out + 2 * r * len, *on = op + len;
        T *d = dz + r * len;
        int64_t i = 0;
        for (; i + VL <= len; i += VL) {  /* (masks, not selections: the compiler keeps branches there) */
            VT a = *(const VU *)(gp + i), b = *(const VU *)(gn + i);
            VT pa = (VT)(~(VI)(*(const VU *)(op + i) <= zero) & (VI)a);
            VT nb = (VT)(~(VI)(*(const VU *)(on + i) <= zero) & (VI)b);
            *(VU *)(d + i) = pa - nb;
        }
        for (; i < len; i++) {
            T a = gp[i], b = gn[i];
            d[i] = (op[i] <= 0 ? (T)0 : a) - (on[i] <= 0 ? (T)0 : b);
        }
    }
}

int F(linked_relu_forward)(const T *z, int64_t rows, int64_t len, T *out)
{
    F(linked_rows)(z, rows, len, out);
    return 0;
}

int F(linked_relu_backward)(const T *g, const T *out, int64_t rows, int64_t len, T *dz)
{
    F(linked_rows_grad)(g, out, rows, len, dz);
    return 0;
}
