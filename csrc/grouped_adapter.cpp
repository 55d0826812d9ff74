// The grouped adapter op (schema and CPU kernel): every token through its own experts in one call.
//
//   y_n = sum_j w_nj * (act(x_n W_down[e_nj] + b_down[e_nj]) W_up[e_nj] + b_up[e_nj])
//
// Tokens of one mixture slot are grouped by expert with a counting sort (segment offsets + a stable
// permutation), then each segment runs two GEMMs on gathered rows: no padding to the largest segment and no
// autograd graph of gathers and scatters. Rows are processed in chunks so buffers stay bounded whatever
// the routing skew. Accumulation is in float32 (float64 for double inputs, for gradcheck); the forward
// returns the pre-activation of every (token, slot) in that type, and the backward recomputes the
// activation from it instead of storing a second N x r tensor.
//
// Schemas live here; csrc/cuda/grouped_adapter.cu registers the CUDA kernels for the same ops, and
// alter_ds/ops/kernels.py adds autograd and fake (meta) implementations.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "activations.h"

namespace alter_ds {
namespace {

// Rows per GEMM chunk: large enough for BLAS to run at speed, small enough that the gathered copies of a
// chunk (rows x d in the accumulation type) stay in the last-level cache's neighbourhood.
constexpr int64_t kChunkRows = 1024;
// Rows per at::parallel_for task in gathers and scatters (each row is d elements of work).
constexpr int64_t kRowGrain = 16;

// width: what an expert reads (x's columns); out_width: what it writes (y's columns; LoRA experts on a
// projection that changes the width have out_width != width).
struct Shapes {
  int64_t tokens, width, slots, experts, down_width, rank, out_width;
};

// Tokens of one mixture slot sorted (stably) by expert: segment e is tokens[offsets[e], offsets[e + 1]).
struct SlotSegments {
  std::vector<int64_t> offsets;
  std::vector<int64_t> tokens;
};

SlotSegments segments_of_slot(const int64_t* ids, const Shapes& s, int64_t slot) {
  SlotSegments seg;
  seg.offsets.assign(s.experts + 1, 0);
  seg.tokens.resize(s.tokens);
  for (int64_t n = 0; n < s.tokens; ++n) {
    seg.offsets[ids[n * s.slots + slot] + 1] += 1;
  }
  for (int64_t e = 0; e < s.experts; ++e) {
    seg.offsets[e + 1] += seg.offsets[e];
  }
  std::vector<int64_t> cursor(seg.offsets.begin(), seg.offsets.end() - 1);
  for (int64_t n = 0; n < s.tokens; ++n) {
    seg.tokens[cursor[ids[n * s.slots + slot]]++] = n;
  }
  return seg;
}

// Calls visit(slot, expert, tokens, count) for every chunk of at most `chunk` tokens that one mixture slot routes
// to one expert. Within a call every token appears once, so row writes never collide.
template <typename Visit>
void for_each_chunk(const int64_t* ids, const Shapes& s, int64_t chunk, Visit&& visit) {
  for (int64_t slot = 0; slot < s.slots; ++slot) {
    const SlotSegments seg = segments_of_slot(ids, s, slot);
    for (int64_t e = 0; e < s.experts; ++e) {
      for (int64_t lo = seg.offsets[e]; lo < seg.offsets[e + 1]; lo += chunk) {
        visit(slot, e, seg.tokens.data() + lo, std::min(chunk, seg.offsets[e + 1] - lo));
      }
    }
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& w_down,
                  const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                  const c10::optional<at::Tensor>& b_up) {
  TORCH_CHECK(x.dim() == 2, "grouped_adapter: x must be [N, d]");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0), "grouped_adapter: expert_ids must be [N, k]");
  TORCH_CHECK(ids.scalar_type() == at::kLong, "grouped_adapter: expert_ids must be int64");
  TORCH_CHECK(weights.sizes() == ids.sizes(), "grouped_adapter: expert_weights must have expert_ids' shape");
  TORCH_CHECK(w_down.dim() == 3 && w_down.size(1) == x.size(1), "grouped_adapter: w_down must be [E, d, r']");
  TORCH_CHECK(w_up.dim() == 3 && w_up.size(0) == w_down.size(0), "grouped_adapter: w_up must be [E, r, d_out]");
  TORCH_CHECK(w_down.scalar_type() == x.scalar_type() && w_up.scalar_type() == x.scalar_type(),
              "grouped_adapter: weights must have x's dtype");
  TORCH_CHECK(!b_down.has_value() || b_down->sizes() == at::IntArrayRef({w_down.size(0), w_down.size(2)}),
              "grouped_adapter: b_down must be [E, r']");
  TORCH_CHECK(!b_up.has_value() || b_up->sizes() == at::IntArrayRef({w_up.size(0), w_up.size(2)}),
              "grouped_adapter: b_up must be [E, d_out]");
}

Shapes shapes_of(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w_down, const at::Tensor& w_up) {
  return {x.size(0), x.size(1), ids.size(1), w_down.size(0), w_down.size(2), w_up.size(1), w_up.size(2)};
}

void check_ids_in_range(const int64_t* ids, const Shapes& s) {
  for (int64_t i = 0; i < s.tokens * s.slots; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < s.experts, "grouped_adapter: expert id ", ids[i], " out of range [0, ",
                s.experts, ")");
  }
}

at::ScalarType accumulation_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

// What both ops take apart from their own tensors, checked once and made contiguous.
struct OpInputs {
  at::Tensor x, ids, w_down, w_up;
  Shapes s;
  ActivationSpec spec;
  at::TensorOptions acc;  // float32, or float64 for double inputs
};

OpInputs prepare(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& mix, const at::Tensor& w_down,
                 const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                 const c10::optional<at::Tensor>& b_up, c10::string_view activation) {
  check_inputs(x, ids, mix, w_down, b_down, w_up, b_up);
  OpInputs in{x.contiguous(), ids.contiguous(), w_down.contiguous(), w_up.contiguous(), {}, {}, {}};
  in.spec = parse_activation(std::string(activation));
  in.s = shapes_of(in.x, in.ids, in.w_down, in.w_up);
  TORCH_CHECK(in.s.down_width == (in.spec.gated ? 2 : 1) * in.s.rank,
              "grouped_adapter: w_down width does not match w_up");
  check_ids_in_range(in.ids.data_ptr<int64_t>(), in.s);
  in.acc = in.x.options().dtype(accumulation_type(in.x.scalar_type()));
  return in;
}

// dst[i, :] = acc(src[rows[i], :]) for i in [0, count)
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* src, const int64_t* rows, int64_t count, int64_t width, acc_t* dst) {
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* from = src + rows[i] * width;
      acc_t* to = dst + i * width;
      for (int64_t c = 0; c < width; ++c) to[c] = static_cast<acc_t>(from[c]);
    }
  });
}

// activated[i] = act(pre[i]); gated: act(gate) * up, gate the first half of the row.
template <typename acc_t>
void activate_rows(const acc_t* pre, int64_t count, const Shapes& s, ActivationSpec spec, acc_t* activated) {
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* h = pre + i * s.down_width;
      acc_t* a = activated + i * s.rank;
      for (int64_t j = 0; j < s.rank; ++j) {
        a[j] = spec.gated ? activate(spec.base, h[j]) * h[s.rank + j] : activate(spec.base, h[j]);
      }
    }
  });
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& mix, const at::Tensor& w_down,
                    const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                    const c10::optional<at::Tensor>& b_up, ActivationSpec spec, const Shapes& s, at::Tensor& y_acc,
                    at::Tensor& hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = y_acc.options();
  const at::Tensor wd = w_down.to(acc.dtype()), wu = w_up.to(acc.dtype());
  const at::Tensor bd = b_down.has_value() ? b_down->to(acc.dtype()).contiguous() : at::Tensor();
  const at::Tensor bu = b_up.has_value() ? b_up->to(acc.dtype()).contiguous() : at::Tensor();
  const at::Tensor mixture = mix.to(acc.dtype()).contiguous();
  const int64_t chunk = std::min<int64_t>(kChunkRows, std::max<int64_t>(s.tokens, 1));
  at::Tensor rows_in = at::empty({chunk, s.width}, acc), pre = at::empty({chunk, s.down_width}, acc);
  at::Tensor activated = at::empty({chunk, s.rank}, acc), rows_out = at::empty({chunk, s.out_width}, acc);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  const acc_t* mix_ptr = mixture.data_ptr<acc_t>();
  acc_t* y_ptr = y_acc.data_ptr<acc_t>();
  acc_t* hidden_ptr = hidden.data_ptr<acc_t>();

  for_each_chunk(id_ptr, s, chunk, [&](int64_t slot, int64_t e, const int64_t* tokens, int64_t count) {
    at::Tensor x_rows = rows_in.narrow(0, 0, count), h = pre.narrow(0, 0, count);
    at::Tensor a = activated.narrow(0, 0, count), out = rows_out.narrow(0, 0, count);
    gather_rows(x_ptr, tokens, count, s.width, x_rows.data_ptr<acc_t>());
    if (bd.defined()) {
      at::addmm_out(h, bd[e].unsqueeze(0), x_rows, wd[e]);
    } else {
      at::mm_out(h, x_rows, wd[e]);
    }
    activate_rows(h.data_ptr<acc_t>(), count, s, spec, a.data_ptr<acc_t>());
    if (bu.defined()) {
      at::addmm_out(out, bu[e].unsqueeze(0), a, wu[e]);
    } else {
      at::mm_out(out, a, wu[e]);
    }
    const acc_t* h_ptr = h.data_ptr<acc_t>();
    const acc_t* out_ptr = out.data_ptr<acc_t>();
    at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t n = tokens[i];
        const acc_t w = mix_ptr[n * s.slots + slot];
        acc_t* y_row = y_ptr + n * s.out_width;
        const acc_t* o = out_ptr + i * s.out_width;
        for (int64_t c = 0; c < s.out_width; ++c) y_row[c] += w * o[c];
        std::copy(h_ptr + i * s.down_width, h_ptr + (i + 1) * s.down_width,
                  hidden_ptr + (n * s.slots + slot) * s.down_width);
      }
    });
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& mix,
                     const at::Tensor& w_down, const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                     const at::Tensor& hidden, ActivationSpec spec, const Shapes& s, bool weight_grads,
                     at::Tensor& grad_x, at::Tensor& grad_mix, at::Tensor& grad_wd, at::Tensor& grad_bd,
                     at::Tensor& grad_wu, at::Tensor& grad_bu) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = grad_x.options();
  const at::Tensor wd = w_down.to(acc.dtype()), wu = w_up.to(acc.dtype());
  const at::Tensor bu = b_up.has_value() ? b_up->to(acc.dtype()).contiguous() : at::Tensor();
  const at::Tensor mixture = mix.to(acc.dtype()).contiguous();
  const int64_t chunk = std::min<int64_t>(kChunkRows, std::max<int64_t>(s.tokens, 1));
  at::Tensor rows_x = at::empty({chunk, s.width}, acc), rows_dy = at::empty({chunk, s.out_width}, acc);
  at::Tensor rows_dx = at::empty({chunk, s.width}, acc), pre = at::empty({chunk, s.down_width}, acc);
  at::Tensor activated = at::empty({chunk, s.rank}, acc), weighted = at::empty({chunk, s.rank}, acc);
  at::Tensor g = at::empty({chunk, s.rank}, acc), d_pre = at::empty({chunk, s.down_width}, acc);
  at::Tensor row_mix = at::empty({chunk}, acc);
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* dy_ptr = grad_y.data_ptr<scalar_t>();
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  const acc_t* mix_ptr = mixture.data_ptr<acc_t>();
  const acc_t* hidden_ptr = hidden.data_ptr<acc_t>();
  acc_t* dx_ptr = grad_x.data_ptr<acc_t>();
  acc_t* dmix_ptr = grad_mix.data_ptr<acc_t>();

  for_each_chunk(id_ptr, s, chunk, [&](int64_t slot, int64_t e, const int64_t* tokens, int64_t count) {
    at::Tensor xr = rows_x.narrow(0, 0, count), dyr = rows_dy.narrow(0, 0, count);
    at::Tensor h = pre.narrow(0, 0, count), a = activated.narrow(0, 0, count);
    at::Tensor aw = weighted.narrow(0, 0, count), gr = g.narrow(0, 0, count);
    at::Tensor dh = d_pre.narrow(0, 0, count), dxr = rows_dx.narrow(0, 0, count);
    at::Tensor wr = row_mix.narrow(0, 0, count);
    gather_rows(x_ptr, tokens, count, s.width, xr.data_ptr<acc_t>());
    gather_rows(dy_ptr, tokens, count, s.out_width, dyr.data_ptr<acc_t>());
    acc_t* h_ptr = h.data_ptr<acc_t>();
    acc_t* w_ptr = wr.data_ptr<acc_t>();
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = tokens[i];
      const acc_t* from = hidden_ptr + (n * s.slots + slot) * s.down_width;
      std::copy(from, from + s.down_width, h_ptr + i * s.down_width);
      w_ptr[i] = mix_ptr[n * s.slots + slot];
    }
    activate_rows(h_ptr, count, s, spec, a.data_ptr<acc_t>());
    at::mm_out(gr, dyr, wu[e].t());  // d(expert output) / d(activated), before the mixture weight
    const acc_t* g_ptr = gr.data_ptr<acc_t>();
    const acc_t* a_ptr = a.data_ptr<acc_t>();
    const acc_t* dyr_ptr = dyr.data_ptr<acc_t>();
    const acc_t* bu_ptr = bu.defined() ? bu.data_ptr<acc_t>() + e * s.out_width : nullptr;
    acc_t* dh_ptr = dh.data_ptr<acc_t>();
    acc_t* aw_ptr = aw.data_ptr<acc_t>();
    at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t w = w_ptr[i];
        const acc_t* gi = g_ptr + i * s.rank;
        const acc_t* ai = a_ptr + i * s.rank;
        const acc_t* hi = h_ptr + i * s.down_width;
        acc_t* dhi = dh_ptr + i * s.down_width;
        acc_t dmix = 0;
        for (int64_t j = 0; j < s.rank; ++j) {
          dmix += gi[j] * ai[j];
          aw_ptr[i * s.rank + j] = w * ai[j];
          if (spec.gated) {
            dhi[j] = w * gi[j] * hi[s.rank + j] * activate_derivative(spec.base, hi[j]);
            dhi[s.rank + j] = w * gi[j] * activate(spec.base, hi[j]);
          } else {
            dhi[j] = w * gi[j] * activate_derivative(spec.base, hi[j]);
          }
        }
        if (bu_ptr != nullptr) {
          const acc_t* dyi = dyr_ptr + i * s.out_width;
          for (int64_t c = 0; c < s.out_width; ++c) dmix += dyi[c] * bu_ptr[c];
        }
        dmix_ptr[tokens[i] * s.slots + slot] = dmix;
      }
    });
    if (weight_grads) {  // a router-only stage needs grad_x and the mixture's gradient, not these
      grad_wu[e].addmm_(aw.t(), dyr);
      grad_wd[e].addmm_(xr.t(), dh);
      if (grad_bu.numel() > 0) grad_bu[e].addmv_(dyr.t(), wr);
      if (grad_bd.numel() > 0) grad_bd[e].add_(dh.sum(0));
    }
    at::mm_out(dxr, dh, wd[e].t());
    const acc_t* dxr_ptr = dxr.data_ptr<acc_t>();
    at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t* to = dx_ptr + tokens[i] * s.width;
        const acc_t* from = dxr_ptr + i * s.width;
        for (int64_t c = 0; c < s.width; ++c) to[c] += from[c];
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> grouped_adapter_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                       const at::Tensor& mix, const at::Tensor& w_down_in,
                                                       const c10::optional<at::Tensor>& b_down,
                                                       const at::Tensor& w_up_in,
                                                       const c10::optional<at::Tensor>& b_up,
                                                       c10::string_view activation) {
  const OpInputs in = prepare(x_in, ids_in, mix, w_down_in, b_down, w_up_in, b_up, activation);
  const at::Tensor &x = in.x, &ids = in.ids, &w_down = in.w_down, &w_up = in.w_up;
  const Shapes& s = in.s;
  const ActivationSpec spec = in.spec;
  const auto acc = in.acc;
  at::Tensor y_acc = at::zeros({s.tokens, s.out_width}, acc);
  at::Tensor hidden = at::empty({s.tokens, s.slots, s.down_width}, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_adapter_cpu", [&] {
    forward_kernel<scalar_t>(x, ids, mix, w_down, b_down, w_up, b_up, spec, s, y_acc, hidden);
  });
  return {y_acc.to(x.scalar_type()), hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_adapter_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& mix,
    const at::Tensor& w_down_in, const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up_in,
    const c10::optional<at::Tensor>& b_up, const at::Tensor& hidden_in, c10::string_view activation,
    bool weight_grads) {
  const OpInputs in = prepare(x_in, ids_in, mix, w_down_in, b_down, w_up_in, b_up, activation);
  const at::Tensor &x = in.x, &ids = in.ids, &w_down = in.w_down, &w_up = in.w_up;
  const Shapes& s = in.s;
  const ActivationSpec spec = in.spec;
  const auto acc = in.acc;
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type()).contiguous();
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.tokens && grad_y.size(1) == s.out_width,
              "grouped_adapter_backward: grad_y must be [N, d_out]");
  TORCH_CHECK(hidden_in.sizes() == at::IntArrayRef({s.tokens, s.slots, s.down_width}),
              "grouped_adapter_backward: hidden must be [N, k, r']");
  const at::Tensor hidden = hidden_in.to(acc.dtype()).contiguous();
  at::Tensor grad_x = at::zeros({s.tokens, s.width}, acc), grad_mix = at::zeros({s.tokens, s.slots}, acc);
  // Without weight_grads the weight gradients are empty [0] tensors and never computed.
  const at::Tensor none = at::empty({0}, acc);
  at::Tensor grad_wd = weight_grads ? at::zeros({s.experts, s.width, s.down_width}, acc) : none;
  at::Tensor grad_wu = weight_grads ? at::zeros({s.experts, s.rank, s.out_width}, acc) : none;
  at::Tensor grad_bd = weight_grads && b_down.has_value() ? at::zeros({s.experts, s.down_width}, acc) : none;
  at::Tensor grad_bu = weight_grads && b_up.has_value() ? at::zeros({s.experts, s.out_width}, acc) : none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_adapter_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_y, x, ids, mix, w_down, w_up, b_up, hidden, spec, s, weight_grads, grad_x,
                              grad_mix, grad_wd, grad_bd, grad_wu, grad_bu);
  });
  const auto type = x.scalar_type();
  return {grad_x.to(type), grad_mix.to(mix.scalar_type()), grad_wd.to(type), grad_bd.to(type), grad_wu.to(type),
          grad_bu.to(type)};
}

}  // namespace

TORCH_LIBRARY(alter_ds, m) {
  m.def(
      "grouped_adapter(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor w_down, Tensor? b_down, "
      "Tensor w_up, Tensor? b_up, str activation) -> (Tensor, Tensor)");
  m.def(
      "grouped_adapter_backward(Tensor grad_y, Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor w_down, "
      "Tensor? b_down, Tensor w_up, Tensor? b_up, Tensor hidden, str activation, bool weight_grads=True) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alter_ds, CPU, m) {
  m.impl("grouped_adapter", &grouped_adapter_cpu);
  m.impl("grouped_adapter_backward", &grouped_adapter_backward_cpu);
}

}  // namespace alter_ds
