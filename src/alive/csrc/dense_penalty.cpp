// The separation penalty of a deep stack of same-shaped dense layers as one C++ autograd node
// (alive/native.py builds and documents it; SeparationConstraint uses it for deep rectangular
// MLPs on a CPU).
//
// The values and gradients are those of the C kernel sep_penalty_* (separation_body.h), called
// once per layer, so they equal the Python node's (alive.functional._NativePenalty) bit for
// bit. What this node saves is autograd's per-layer bookkeeping around it: the layers need no
// stacking copy (their memory is read where it is), and each layer's gradient is a tensor of
// its own, not one of 50 views into a stacked gradient, so autograd adds the activation's
// gradient into it in place instead of into a new tensor; no Python runs in either pass.
// A backward pass that builds a graph (create_graph) differentiates the Python reference
// instead: the operator alive_native::dense_penalty_graph, which alive/native.py implements.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <cstdint>
#include <vector>

#include "sep_penalty.h"

namespace alive_native {

template <typename T>
using Kernel = std::conditional_t<std::is_same_v<T, float>, decltype(&sep_penalty_f32), decltype(&sep_penalty_f64)>;

// sep_penalty_f32 / _f64 of the loaded C library, set once by set_kernels
static std::atomic<std::intptr_t> kernel_f32{0}, kernel_f64{0};

// total = scale·Σ_k (cu[k]·A(s_U) + cp[k]·A(s_P)) of the layers zs (each (P, U), contiguous),
// summed in double as the kernel sums its layers; with grads, also each layer's gradient of
// total (the kernel's: upstream gradient 1)
template <typename T>
at::Tensor run(const std::vector<at::Tensor> &zs, const at::Tensor &coef_u, const at::Tensor &coef_p, double rho,
               double margin, int agg, bool first, double scale, std::vector<at::Tensor> *grads)
{
    auto fn = reinterpret_cast<Kernel<T>>(std::is_same<T, float>::value ? kernel_f32.load() : kernel_f64.load());
    TORCH_CHECK(fn != nullptr, "dense_penalty: the C kernels were not set (alive.native loads them)");
    const int64_t n = (int64_t)zs.size(), P = zs[0].size(0), U = zs[0].size(1);
    const T *cu = coef_u.data_ptr<T>(), *cp = coef_p.data_ptr<T>();
    std::vector<T> out((size_t)n);
    T unused;  // the kernel's own total of one layer (given, so that its gradient is scale's)
    if (grads) grads->reserve((size_t)n);
    for (int64_t k = 0; k < n; k++) {
        const T *z = zs[k].data_ptr<T>();
        T *d = nullptr;
        if (grads) {
            grads->push_back(at::empty({P, U}, zs[k].options()));
            d = grads->back().data_ptr<T>();
        }
        if (fn(z, z, 1, P, U, nullptr, cu + k, cp + k, rho, margin, agg, first ? 1 : 0, &out[k], scale, &unused, d, d))
            TORCH_CHECK(false, "dense_penalty: the native separation kernel could not allocate its work buffer");
    }
    double sum = 0;
    for (int64_t k = 0; k < n; k++) sum += out[k];
    return at::full({}, (T)(scale * sum), zs[0].options());
}

at::Tensor penalty_of(const std::vector<at::Tensor> &zs, const at::Tensor &coef_u, const at::Tensor &coef_p,
                      double rho, double margin, int agg, bool first, double scale, std::vector<at::Tensor> *grads)
{
    if (zs[0].scalar_type() == at::kFloat) return run<float>(zs, coef_u, coef_p, rho, margin, agg, first, scale, grads);
    return run<double>(zs, coef_u, coef_p, rho, margin, agg, first, scale, grads);
}

// The layers the kernel reads through raw pointers: checked, as a wrong one would be read
// out of bounds. A non-contiguous layer is read from a contiguous copy. Layers of several
// shapes, dtypes or devices raise a ValueError (the constraint then groups them by shape).
// agg: the code of alive.native.AGGREGATIONS.
std::vector<at::Tensor> checked_layers(at::TensorList zs, const at::Tensor &coef_u, const at::Tensor &coef_p,
                                       int64_t agg)
{
    TORCH_CHECK(agg >= 0 && agg <= 2, "dense_penalty: no native aggregation of code ", agg);
    TORCH_CHECK(!zs.empty(), "dense_penalty: no layer");
    const at::Tensor &head = zs[0];
    TORCH_CHECK(head.dim() == 2 && head.numel() > 0,
                "dense_penalty: layers must be non-empty (points, units) matrices");
    TORCH_CHECK(head.device().is_cpu() && (head.scalar_type() == at::kFloat || head.scalar_type() == at::kDouble),
                "dense_penalty: layers must be CPU float32 or float64 tensors");
    std::vector<at::Tensor> layers;
    layers.reserve(zs.size());
    for (const at::Tensor &z : zs) {
        TORCH_CHECK_VALUE(z.sizes() == head.sizes() && z.scalar_type() == head.scalar_type()
                              && z.device() == head.device() && z.layout() == at::kStrided,
                          "dense_penalty: every layer must have the first one's shape, dtype and device");
        // (a negated view's memory holds the values' negatives)
        layers.push_back(z.is_contiguous() && !z.is_neg() ? z : z.resolve_neg().contiguous());
    }
    for (const at::Tensor *c : {&coef_u, &coef_p})
        TORCH_CHECK(c->dim() == 1 && c->size(0) == (int64_t)zs.size() && c->scalar_type() == head.scalar_type()
                        && c->device().is_cpu() && c->is_contiguous(),
                    "dense_penalty: coef_u and coef_p must be contiguous (layers,) tensors of the layers' dtype");
    return layers;
}

struct DensePenalty : public torch::autograd::Function<DensePenalty> {
    static at::Tensor forward(torch::autograd::AutogradContext *ctx, at::TensorList zs, at::Tensor coef_u,
                              at::Tensor coef_p, double rho, double margin, int64_t agg, bool first, double scale,
                              bool grad)
    {
        std::vector<at::Tensor> layers = checked_layers(zs, coef_u, coef_p, agg);
        std::vector<at::Tensor> grads;
        at::Tensor total =
            penalty_of(layers, coef_u, coef_p, rho, margin, (int)agg, first, scale, grad ? &grads : nullptr);
        if (grad) {
            ctx->save_for_backward(std::vector<at::Tensor>(zs.begin(), zs.end()));
            ctx->saved_data["grads"] = c10::List<at::Tensor>(grads);
            ctx->saved_data["coefs"] = c10::List<at::Tensor>({coef_u, coef_p});
            ctx->saved_data["rho"] = rho;
            ctx->saved_data["margin"] = margin;
            ctx->saved_data["agg"] = agg;
            ctx->saved_data["first"] = first;
            ctx->saved_data["scale"] = scale;
        }
        return total;
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                   torch::autograd::variable_list grad_outputs)
    {
        auto coefs = ctx->saved_data["coefs"].toTensorList();
        const size_t n = (size_t)coefs.get(0).size(0);
        at::Tensor g = grad_outputs[0];
        if (g.scalar_type() != coefs.get(0).scalar_type()) g = g.to(coefs.get(0).scalar_type());
        const double rho = ctx->saved_data["rho"].toDouble(), margin = ctx->saved_data["margin"].toDouble();
        const double scale = ctx->saved_data["scale"].toDouble();
        const int64_t agg = ctx->saved_data["agg"].toInt();
        const bool first = ctx->saved_data["first"].toBool();
        std::vector<at::Tensor> grads;
        auto kept = ctx->saved_data.find("grads");
        if (at::GradMode::is_enabled()) {  // a double backward: differentiate the reference
            std::vector<at::Tensor> zs = ctx->get_saved_variables();
            static auto graph = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("alive_native::dense_penalty_graph", "")
                                    .typed<std::vector<at::Tensor>(at::TensorList, const at::Tensor &,
                                                                   const at::Tensor &, double, double, int64_t,
                                                                   bool, double, const at::Tensor &)>();
            grads = graph.call(zs, coefs.get(0), coefs.get(1), rho, margin, agg, first, scale, g);
        } else {
            // handed over, to be scaled in place: a retained graph's next backward computes them again
            // (the layers are unpacked only then)
            if (kept != ctx->saved_data.end()) {
                auto list = kept->second.toTensorList();
                for (size_t k = 0; k < list.size(); k++) grads.push_back(list.get(k));
                ctx->saved_data.erase(kept);
            } else {
                penalty_of(checked_layers(ctx->get_saved_variables(), coefs.get(0), coefs.get(1), agg), coefs.get(0),
                           coefs.get(1), rho, margin, (int)agg, first, scale, &grads);
            }
            // the kernel's gradient is that of an upstream gradient 1
            if (g.item<double>() != 1.0)
                for (at::Tensor &d : grads) d.mul_(g);
        }
        torch::autograd::variable_list result(grads.begin(), grads.end());
        result.resize(n + 8);  // the forward's other arguments get none
        return result;
    }
};

at::Tensor dense_penalty(at::TensorList zs, const at::Tensor &coef_u, const at::Tensor &coef_p, double rho,
                         double margin, int64_t agg, bool first, double scale)
{
    TORCH_CHECK(!coef_u.requires_grad() && !coef_p.requires_grad(),
                "dense_penalty: coefficients that require a gradient take the PyTorch path");
    bool grad = false;
    if (at::GradMode::is_enabled())
        for (const at::Tensor &z : zs) grad = grad || z.requires_grad();
    return DensePenalty::apply(zs, coef_u, coef_p, rho, margin, agg, first, scale, grad);
}

void set_kernels(int64_t f32, int64_t f64)
{
    kernel_f32.store((std::intptr_t)f32);
    kernel_f64.store((std::intptr_t)f64);
}

}  // namespace alive_native

TORCH_LIBRARY(alive_native, m)
{
    m.def("dense_penalty(Tensor[] zs, Tensor coef_u, Tensor coef_p, float rho, float margin, int agg, bool first, "
          "float scale) -> Tensor");
    m.def("dense_penalty_graph(Tensor[] zs, Tensor coef_u, Tensor coef_p, float rho, float margin, int agg, "
          "bool first, float scale, Tensor grad) -> Tensor[]");
    m.def("set_kernels(int f32, int f64) -> ()");
}

TORCH_LIBRARY_IMPL(alive_native, CompositeImplicitAutograd, m)
{
    m.impl("dense_penalty", alive_native::dense_penalty);
    m.impl("set_kernels", alive_native::set_kernels);
}
