// CUDA implementation of alter_ds::grouped_adapter and alter_ds::grouped_adapter_backward (schemas in
// csrc/grouped_adapter.cpp, math and test oracle in alter_ds/ops/grouped_adapter.py).
//
// Every call groups the N*k (token, slot) assignments by expert on the device (routing.cuh), then runs
// either the tensor-core kernels (tensor_core.cuh: half / bf16 on sm_80+, d % 8 == 0, r <= 64,
// r' <= 128) or the generic scalar kernels (generic.cuh: everything else). No host-device sync: grids
// are sized from N*k and E, and blocks past the last row tile exit.
//
// ALTER_DS_CUDA_GENERIC=1 forces the generic kernels, so a GPU test can check one path against the other.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

#include "../activations.h"
#include "common.cuh"
#include "generic.cuh"
#include "routing.cuh"
#include "tensor_core.cuh"

namespace alter_ds {
namespace cuda {
namespace {

// The tensor-core kernels take the CUDA-native 16-bit types; ATen's are layout-identical.
template <typename S>
struct NativeOf {
  using type = S;
};
template <>
struct NativeOf<at::Half> {
  using type = __half;
};
template <>
struct NativeOf<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename S>
constexpr bool kIsHalfLike = std::is_same_v<S, at::Half> || std::is_same_v<S, at::BFloat16>;

struct Shape {
  int64_t n = 0, k = 0, d = 0, experts = 0;
  int64_t rd = 0;  // r' = width of the down projection (2r when gated)
  int64_t r = 0;
  int64_t total = 0;  // N * k assignments
  ActivationSpec spec{BaseActivation::kIdentity, false};
};

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
int round16(int64_t v) { return static_cast<int>((v + 15) / 16 * 16); }

// Cheap re-checks of the contract the Python wrapper enforces with readable messages.
Shape check_args(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& expert_weights,
                 const at::Tensor& w_down, const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                 const std::optional<at::Tensor>& b_up, std::string_view activation) {
  Shape s;
  s.spec = parse_activation(std::string(activation));
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(),
              "grouped_adapter: x must be a contiguous CUDA [N, d] tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "grouped_adapter: unsupported dtype ", dtype);
  s.n = x.size(0);
  s.d = x.size(1);
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.size(0) == s.n && expert_ids.scalar_type() == at::kLong &&
                  expert_ids.is_contiguous(),
              "grouped_adapter: expert_ids must be a contiguous int64 [N, k] tensor");
  s.k = expert_ids.size(1);
  TORCH_CHECK(s.k >= 1, "grouped_adapter: k must be >= 1");
  TORCH_CHECK(expert_weights.sizes() == expert_ids.sizes() && at::isFloatingType(expert_weights.scalar_type()),
              "grouped_adapter: expert_weights must be a floating [N, k] tensor");
  TORCH_CHECK(w_down.dim() == 3 && w_down.size(1) == s.d && w_down.scalar_type() == dtype && w_down.is_contiguous(),
              "grouped_adapter: w_down must be a contiguous [E, d, r'] tensor of x's dtype");
  s.experts = w_down.size(0);
  s.rd = w_down.size(2);
  TORCH_CHECK(!s.spec.gated || s.rd % 2 == 0, "grouped_adapter: a gated activation needs an even r'");
  s.r = s.spec.gated ? s.rd / 2 : s.rd;
  TORCH_CHECK(s.r >= 1, "grouped_adapter: rank must be >= 1");
  TORCH_CHECK(w_up.dim() == 3 && w_up.size(0) == s.experts && w_up.size(1) == s.r && w_up.size(2) == s.d &&
                  w_up.scalar_type() == dtype && w_up.is_contiguous(),
              "grouped_adapter: w_up must be a contiguous [E, r, d] tensor of x's dtype");
  if (b_down) {
    TORCH_CHECK(b_down->dim() == 2 && b_down->size(0) == s.experts && b_down->size(1) == s.rd &&
                    b_down->scalar_type() == dtype && b_down->is_contiguous(),
                "grouped_adapter: b_down must be a contiguous [E, r'] tensor of x's dtype");
  }
  if (b_up) {
    TORCH_CHECK(b_up->dim() == 2 && b_up->size(0) == s.experts && b_up->size(1) == s.d &&
                    b_up->scalar_type() == dtype && b_up->is_contiguous(),
                "grouped_adapter: b_up must be a contiguous [E, d] tensor of x's dtype");
  }
  const auto device = x.device();
  bool same_device = expert_ids.device() == device && expert_weights.device() == device &&
                     w_down.device() == device && w_up.device() == device;
  if (b_down) same_device = same_device && b_down->device() == device;
  if (b_up) same_device = same_device && b_up->device() == device;
  TORCH_CHECK(same_device, "grouped_adapter: all tensors must be on x's device");
  s.total = s.n * s.k;
  TORCH_CHECK(s.total < (int64_t{1} << 31), "grouped_adapter: N * k must be < 2^31");
  TORCH_CHECK(s.total == 0 || s.experts >= 1, "grouped_adapter: no experts");
  // grid.y / grid.z of the generic kernels cover d + 1 (the bias row) in blocks of 32 (at most 65535 blocks)
  TORCH_CHECK(ceil_div(s.d + 1, 32) <= 65535 && ceil_div(s.rd + 1, 32) <= 65535,
              "grouped_adapter: d and r' must be below 65535 * 32 - 1");
  return s;
}

bool generic_forced() {
  const char* v = std::getenv("ALTER_DS_CUDA_GENERIC");
  return v != nullptr && *v != '\0' && std::string_view(v) != "0";
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the tensor-core kernels handle this call; `rows` are the [*, d] operands read 16 bytes at a time.
bool use_tensor_cores(const Shape& s, at::ScalarType dtype, std::initializer_list<const void*> rows,
                      bool backward) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  if (s.d % 8 != 0 || s.r > tc::kMaxRank || s.rd > tc::kMaxDownWidth || generic_forced()) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8) return false;
  for (const void* p : rows) {
    if (!aligned16(p)) return false;
  }
  const tc::Layout layout = tc::make_layout(backward, round16(s.rd), round16(s.r));
  return static_cast<size_t>(layout.bytes) <= prop->sharedMemPerBlockOptin;
}

template <typename Kernel, typename Args>
void launch_tc(Kernel tensor_core_kernel, const Args& args, int64_t grid, int smem_bytes, cudaStream_t stream) {
  // Allow the device's whole opt-in shared memory rather than this call's size: kernel variants are shared by
  // several r', and one fixed value cannot race between host threads launching different sizes.
  const int optin = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(tensor_core_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  tensor_core_kernel<<<static_cast<unsigned>(grid), tc::kThreads, smem_bytes, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The H accumulators of the forward kernel are sized for r' rounded up to 16, 32, 64 or 128.
template <typename T>
void tc_forward(const tc::ForwardArgs& args, int64_t grid, cudaStream_t stream) {
  const int smem = tc::make_layout(false, args.rdp, args.rp).bytes;
  const int frags = args.rdp / 16;
  if (frags <= 1) {
    launch_tc(tc::forward_kernel<T, 1>, args, grid, smem, stream);
  } else if (frags <= 2) {
    launch_tc(tc::forward_kernel<T, 2>, args, grid, smem, stream);
  } else if (frags <= 4) {
    launch_tc(tc::forward_kernel<T, 4>, args, grid, smem, stream);
  } else {
    launch_tc(tc::forward_kernel<T, 8>, args, grid, smem, stream);
  }
}

// The G accumulators of the backward kernel are sized for r rounded up to 16, 32 or 64.
template <typename T>
void tc_backward(const tc::BackwardArgs& args, int64_t grid, cudaStream_t stream) {
  const int smem = tc::make_layout(true, args.rdp, args.rp).bytes;
  const int frags = args.rp / 16;
  if (frags <= 1) {
    launch_tc(tc::backward_kernel<T, 1>, args, grid, smem, stream);
  } else if (frags <= 2) {
    launch_tc(tc::backward_kernel<T, 2>, args, grid, smem, stream);
  } else {
    launch_tc(tc::backward_kernel<T, 4>, args, grid, smem, stream);
  }
}

int elementwise_blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

// A [N, d] output in x's dtype: written once per token when k == 1; with k > 1 accumulated atomically
// in the accumulation type, into the output itself when that is the accumulation type.
struct TokenOutput {
  at::Tensor out;          // x's dtype
  at::Tensor accumulator;  // undefined when k == 1
  at::Tensor finish() const {
    return accumulator.defined() && accumulator.scalar_type() != out.scalar_type() ? accumulator.to(out.scalar_type())
                                                                                   : out;
  }
};

TokenOutput make_token_output(const at::Tensor& x, int64_t k, at::ScalarType acc_type) {
  TokenOutput t;
  if (k == 1) {
    t.out = at::empty_like(x);
  } else if (x.scalar_type() == acc_type) {
    t.out = at::zeros_like(x);
    t.accumulator = t.out;
  } else {
    t.out = at::empty({0}, x.options());
    t.accumulator = at::zeros(x.sizes(), x.options().dtype(acc_type));
  }
  return t;
}

// Runs the tensor-core forward when it applies (half / bf16 and a supported shape); false otherwise.
template <typename scalar_t>
bool tensor_core_forward(const Shape& s, const at::Tensor& x, const at::Tensor& weights, const at::Tensor& w_down,
                         const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                         const std::optional<at::Tensor>& b_up, at::Tensor& hidden, TokenOutput& y,
                         const Routing& routing, cudaStream_t stream) {
  if constexpr (!kIsHalfLike<scalar_t>) {
    return false;
  } else {
    if (!use_tensor_cores(s, x.scalar_type(), {x.const_data_ptr(), w_up.const_data_ptr()}, false)) return false;
    tc::ForwardArgs args{};
    args.x = x.const_data_ptr();
    args.weights = weights.const_data_ptr<float>();
    args.w_down = w_down.const_data_ptr();
    args.b_down = b_down ? b_down->const_data_ptr() : nullptr;
    args.w_up = w_up.const_data_ptr();
    args.b_up = b_up ? b_up->const_data_ptr() : nullptr;
    args.hidden = hidden.mutable_data_ptr<float>();
    args.y = y.accumulator.defined() ? nullptr : y.out.mutable_data_ptr();
    args.y_acc = y.accumulator.defined() ? y.accumulator.mutable_data_ptr<float>() : nullptr;
    args.seg = routing.view();
    args.k = static_cast<int>(s.k);
    args.d = static_cast<int>(s.d);
    args.rd = static_cast<int>(s.rd);
    args.r = static_cast<int>(s.r);
    args.rdp = round16(s.rd);
    args.rp = round16(s.r);
    args.act = s.spec.base;
    args.gated = s.spec.gated;
    args.w_down_vec = s.rd % 8 == 0 && aligned16(w_down.const_data_ptr());
    tc_forward<typename NativeOf<scalar_t>::type>(args, routing.max_tiles(kWideTileRows), stream);
    return true;
  }
}

// Runs the tensor-core backward when it applies; false otherwise.
template <typename scalar_t>
bool tensor_core_backward(const Shape& s, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weights,
                          const at::Tensor& w_down, const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                          const std::optional<at::Tensor>& b_up, const at::Tensor& hidden, bool weight_grads,
                          TokenOutput& grad_x, at::Tensor& grad_weights, at::Tensor& grad_w_down, at::Tensor& grad_b_down,
                          at::Tensor& grad_w_up, at::Tensor& grad_b_up, const Routing& routing, cudaStream_t stream) {
  if constexpr (!kIsHalfLike<scalar_t>) {
    return false;
  } else {
    if (!use_tensor_cores(s, x.scalar_type(), {x.const_data_ptr(), grad_y.const_data_ptr(), w_up.const_data_ptr()},
                          true)) {
      return false;
    }
    tc::BackwardArgs args{};
    args.grad_y = grad_y.const_data_ptr();
    args.x = x.const_data_ptr();
    args.weights = weights.const_data_ptr<float>();
    args.w_down = w_down.const_data_ptr();
    args.w_up = w_up.const_data_ptr();
    args.b_up = b_up ? b_up->const_data_ptr() : nullptr;
    args.hidden = hidden.const_data_ptr<float>();
    args.grad_x = grad_x.accumulator.defined() ? nullptr : grad_x.out.mutable_data_ptr();
    args.grad_x_acc = grad_x.accumulator.defined() ? grad_x.accumulator.mutable_data_ptr<float>() : nullptr;
    args.grad_weights = grad_weights.mutable_data_ptr<float>();
    // null weight-gradient pointers: the kernel skips those accumulations (a router-only stage)
    args.grad_w_down = weight_grads ? grad_w_down.mutable_data_ptr<float>() : nullptr;
    args.grad_b_down = weight_grads && b_down ? grad_b_down.mutable_data_ptr<float>() : nullptr;
    args.grad_w_up = weight_grads ? grad_w_up.mutable_data_ptr<float>() : nullptr;
    args.grad_b_up = weight_grads && b_up ? grad_b_up.mutable_data_ptr<float>() : nullptr;
    args.seg = routing.view();
    args.k = static_cast<int>(s.k);
    args.d = static_cast<int>(s.d);
    args.rd = static_cast<int>(s.rd);
    args.r = static_cast<int>(s.r);
    args.rdp = round16(s.rd);
    args.rp = round16(s.r);
    args.act = s.spec.base;
    args.gated = s.spec.gated;
    args.w_down_vec = s.rd % 8 == 0 && aligned16(w_down.const_data_ptr());
    args.grad_w_down_vec = s.rd % 4 == 0;
    tc_backward<typename NativeOf<scalar_t>::type>(args, routing.max_tiles(kWideTileRows), stream);
    return true;
  }
}

std::tuple<at::Tensor, at::Tensor> grouped_adapter_cuda(const at::Tensor& x, const at::Tensor& expert_ids,
                                                        const at::Tensor& expert_weights, const at::Tensor& w_down,
                                                        const std::optional<at::Tensor>& b_down,
                                                        const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                                        std::string_view activation) {
  const Shape s = check_args(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = x.options().dtype(acc_type);
  at::Tensor hidden = at::empty({s.n, s.k, s.rd}, acc_options);
  if (s.total == 0) return {at::zeros_like(x), hidden};
  if (s.d == 0) {  // nothing to multiply: the pre-activation is the bias (the kernels would get empty grids)
    hidden.copy_(b_down ? b_down->index_select(0, expert_ids.reshape(-1)).view({s.n, s.k, s.rd})
                        : at::zeros({s.n, s.k, s.rd}, acc_options));
    return {at::empty_like(x), hidden};
  }

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor weights = expert_weights.to(acc_type).contiguous();
  const Routing routing = build_routing(expert_ids, static_cast<int>(s.experts), stream);
  const Segments seg = routing.view();
  TokenOutput y = make_token_output(x, s.k, acc_type);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grouped_adapter_cuda", [&] {
    if (tensor_core_forward<scalar_t>(s, x, weights, w_down, b_down, w_up, b_up, hidden, y, routing, stream)) return;
    using Acc = typename AccOf<scalar_t>::type;
    const scalar_t* b_down_ptr = b_down ? b_down->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* b_up_ptr = b_up ? b_up->const_data_ptr<scalar_t>() : nullptr;
    using namespace generic;
    const int64_t narrow_tiles = routing.max_tiles(kNarrowTileRows);
    Acc* hidden_ptr = hidden.mutable_data_ptr<Acc>();
    row_gemm_kernel<Acc><<<dim3(static_cast<unsigned>(narrow_tiles), ceil_div(s.rd, kTileCols)), kThreads, 0, stream>>>(
        seg, static_cast<int>(s.k), static_cast<int>(s.d), static_cast<int>(s.rd),
        TokenRows<scalar_t, Acc>{x.const_data_ptr<scalar_t>(), s.d},
        ExpertMatrix<scalar_t, Acc, false>{w_down.const_data_ptr<scalar_t>(), s.d, s.rd},
        HiddenEpilogue<scalar_t, Acc>{hidden_ptr, b_down_ptr, s.rd});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor act = at::empty({s.total, s.r}, acc_options);
    activation_kernel<<<elementwise_blocks(s.total * s.r, kThreads), kThreads, 0, stream>>>(
        hidden_ptr, weights.const_data_ptr<Acc>(), s.total, static_cast<int>(s.r), static_cast<int>(s.rd),
        s.spec.base, s.spec.gated, act.mutable_data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    row_gemm_kernel<Acc><<<dim3(static_cast<unsigned>(narrow_tiles), ceil_div(s.d, kTileCols)), kThreads, 0, stream>>>(
        seg, static_cast<int>(s.k), static_cast<int>(s.r), static_cast<int>(s.d),
        AssignmentRows<Acc>{act.const_data_ptr<Acc>(), s.r},
        ExpertMatrix<scalar_t, Acc, false>{w_up.const_data_ptr<scalar_t>(), s.r, s.d},
        TokenEpilogue<scalar_t, Acc>{y.accumulator.defined() ? nullptr : y.out.mutable_data_ptr<scalar_t>(),
                                     y.accumulator.defined() ? y.accumulator.mutable_data_ptr<Acc>() : nullptr,
                                     b_up_ptr, weights.const_data_ptr<Acc>(), s.d});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y.finish(), hidden};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_adapter_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& expert_weights,
    const at::Tensor& w_down, const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_up, const at::Tensor& hidden, std::string_view activation,
    bool weight_grads) {
  const Shape s = check_args(x, expert_ids, expert_weights, w_down, b_down, w_up, b_up, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = x.options().dtype(acc_type);
  TORCH_CHECK(grad_y_in.sizes() == x.sizes() && grad_y_in.device() == x.device(),
              "grouped_adapter_backward: grad_y must be [N, d] on x's device");
  TORCH_CHECK(hidden.scalar_type() == acc_type && hidden.numel() == s.total * s.rd && hidden.is_contiguous() &&
                  hidden.device() == x.device(),
              "grouped_adapter_backward: hidden must be the forward's contiguous [N, k, r'] ", acc_type, " tensor");
  const at::Tensor grad_y = grad_y_in.to(dtype).contiguous();

  // Weight gradients accumulate in the accumulation type and are dense: experts without tokens get zeros.
  // Without weight_grads (a router-only stage) they are never computed and come back as empty [0] tensors.
  const bool bias_down = weight_grads && b_down.has_value(), bias_up = weight_grads && b_up.has_value();
  at::Tensor grad_w_down = weight_grads ? at::zeros({s.experts, s.d, s.rd}, acc_options) : at::Tensor();
  at::Tensor grad_w_up = weight_grads ? at::zeros({s.experts, s.r, s.d}, acc_options) : at::Tensor();
  at::Tensor grad_b_down = bias_down ? at::zeros({s.experts, s.rd}, acc_options) : at::Tensor();
  at::Tensor grad_b_up = bias_up ? at::zeros({s.experts, s.d}, acc_options) : at::Tensor();
  at::Tensor grad_weights = at::empty({s.n, s.k}, acc_options);
  auto finish = [&](const at::Tensor& grad_x) {
    const auto empty = at::empty({0}, w_down.options());
    return std::make_tuple(grad_x, grad_weights.to(expert_weights.scalar_type()),
                           weight_grads ? grad_w_down.to(dtype) : empty, bias_down ? grad_b_down.to(dtype) : empty,
                           weight_grads ? grad_w_up.to(dtype) : empty, bias_up ? grad_b_up.to(dtype) : empty);
  };
  if (s.total == 0 || s.d == 0) {  // d == 0: grad_y is empty, so every gradient is zero
    grad_weights.zero_();
    return finish(at::zeros_like(x));
  }

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor weights = expert_weights.to(acc_type).contiguous();
  const Routing routing = build_routing(expert_ids, static_cast<int>(s.experts), stream);
  const Segments seg = routing.view();
  TokenOutput grad_x = make_token_output(x, s.k, acc_type);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grouped_adapter_backward_cuda", [&] {
    if (tensor_core_backward<scalar_t>(s, grad_y, x, weights, w_down, b_down, w_up, b_up, hidden, weight_grads, grad_x,
                                       grad_weights, grad_w_down, grad_b_down, grad_w_up, grad_b_up, routing, stream)) {
      return;
    }
    using Acc = typename AccOf<scalar_t>::type;
    const scalar_t* b_up_ptr = b_up ? b_up->const_data_ptr<scalar_t>() : nullptr;
    Acc* grad_b_down_ptr = bias_down ? grad_b_down.mutable_data_ptr<Acc>() : nullptr;
    Acc* grad_b_up_ptr = bias_up ? grad_b_up.mutable_data_ptr<Acc>() : nullptr;
    using namespace generic;
    const unsigned narrow_tiles = static_cast<unsigned>(routing.max_tiles(kNarrowTileRows));
    const unsigned wide_tiles = static_cast<unsigned>(routing.max_tiles(kWideTileRows));
    const int k = static_cast<int>(s.k), d = static_cast<int>(s.d), r = static_cast<int>(s.r);
    const int rd = static_cast<int>(s.rd);
    const Acc* hidden_ptr = hidden.const_data_ptr<Acc>();
    const Acc* weights_ptr = weights.const_data_ptr<Acc>();
    const scalar_t* grad_y_ptr = grad_y.const_data_ptr<scalar_t>();

    at::Tensor g = at::empty({s.total, s.r}, acc_options);  // grad_y * w_up^T
    row_gemm_kernel<Acc><<<dim3(narrow_tiles, ceil_div(s.r, kTileCols)), kThreads, 0, stream>>>(
        seg, k, d, r, TokenRows<scalar_t, Acc>{grad_y_ptr, s.d},
        ExpertMatrix<scalar_t, Acc, true>{w_up.const_data_ptr<scalar_t>(), s.d, s.r},
        StoreEpilogue<Acc>{g.mutable_data_ptr<Acc>(), s.r});
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    at::Tensor dh = at::empty({s.total, s.rd}, acc_options);
    hidden_grad_kernel<<<ceil_div(s.total * 32, kThreads), kThreads, 0, stream>>>(  // a warp per assignment
        g.const_data_ptr<Acc>(), hidden_ptr, weights_ptr, expert_ids.const_data_ptr<int64_t>(), grad_y_ptr, b_up_ptr,
        s.total, k, d, r, rd, static_cast<int>(s.experts), s.spec.base, s.spec.gated, dh.mutable_data_ptr<Acc>(),
        grad_weights.mutable_data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    row_gemm_kernel<Acc><<<dim3(narrow_tiles, ceil_div(s.d, kTileCols)), kThreads, 0, stream>>>(
        seg, k, rd, d, AssignmentRows<Acc>{dh.const_data_ptr<Acc>(), s.rd},
        ExpertMatrix<scalar_t, Acc, true>{w_down.const_data_ptr<scalar_t>(), s.rd, s.d},
        TokenEpilogue<scalar_t, Acc>{
            grad_x.accumulator.defined() ? nullptr : grad_x.out.mutable_data_ptr<scalar_t>(),
            grad_x.accumulator.defined() ? grad_x.accumulator.mutable_data_ptr<Acc>() : nullptr, nullptr,
            weights_ptr, s.d});
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    if (!weight_grads) return;
    // grad_w_down[e] = x^T dH (+ grad_b_down = column sums of dH)
    const dim3 down_grid(wide_tiles, ceil_div(s.d + (b_down ? 1 : 0), 32), ceil_div(s.rd, kTileCols));
    weight_grad_kernel<Acc><<<down_grid, kThreads, 0, stream>>>(
        seg, k, d, rd, TokenRows<scalar_t, Acc>{x.const_data_ptr<scalar_t>(), s.d},
        AssignmentRows<Acc>{dh.const_data_ptr<Acc>(), s.rd}, weights_ptr, false, grad_w_down.mutable_data_ptr<Acc>(),
        grad_b_down_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // grad_w_up[e] = (w act(h))^T grad_y (+ grad_b_up = w^T grad_y)
    at::Tensor act = at::empty({s.total, s.r}, acc_options);  // w * act(h)
    activation_kernel<<<elementwise_blocks(s.total * s.r, kThreads), kThreads, 0, stream>>>(
        hidden_ptr, weights_ptr, s.total, r, rd, s.spec.base, s.spec.gated, act.mutable_data_ptr<Acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 up_grid(wide_tiles, ceil_div(s.r + (b_up ? 1 : 0), 32), ceil_div(s.d, kTileCols));
    weight_grad_kernel<Acc><<<up_grid, kThreads, 0, stream>>>(
        seg, k, r, d, AssignmentRows<Acc>{act.const_data_ptr<Acc>(), s.r}, TokenRows<scalar_t, Acc>{grad_y_ptr, s.d},
        weights_ptr, true, grad_w_up.mutable_data_ptr<Acc>(), grad_b_up_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return finish(grad_x.finish());
}

}  // namespace
}  // namespace cuda
}  // namespace alter_ds

TORCH_LIBRARY_IMPL(alter_ds, CUDA, m) {
  m.impl("grouped_adapter", &alter_ds::cuda::grouped_adapter_cuda);
  m.impl("grouped_adapter_backward", &alter_ds::cuda::grouped_adapter_backward_cuda);
}
