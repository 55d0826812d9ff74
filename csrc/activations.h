// Activations of the grouped adapter op and their derivatives, shared by the CPU and CUDA kernels.
//
// The kernels keep the down projection's output (the pre-activation, in the accumulation type) for the
// backward pass and recompute the activation from it, so each activation needs its value and its
// derivative at the pre-activation. Gated activations (swiglu, geglu, geglu_tanh, reglu) apply the base
// activation to the first half of the down projection and multiply it with the second half.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define ALTER_DS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ALTER_DS_HOST_DEVICE inline
#endif

namespace alter_ds {

enum class BaseActivation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kIdentity = 4 };

struct ActivationSpec {
  BaseActivation base;
  bool gated;  // w_down is [E, d, 2r]: gate half first, up half second
};

// Parses the op's activation name; the Python side validates it first, so an unknown name here is a bug.
inline ActivationSpec parse_activation(const std::string& name) {
  if (name == "relu") return {BaseActivation::kRelu, false};
  if (name == "gelu") return {BaseActivation::kGelu, false};
  if (name == "gelu_tanh") return {BaseActivation::kGeluTanh, false};
  if (name == "silu") return {BaseActivation::kSilu, false};
  if (name == "identity") return {BaseActivation::kIdentity, false};
  if (name == "swiglu") return {BaseActivation::kSilu, true};
  if (name == "geglu") return {BaseActivation::kGelu, true};
  if (name == "geglu_tanh") return {BaseActivation::kGeluTanh, true};
  if (name == "reglu") return {BaseActivation::kRelu, true};
  throw std::invalid_argument("alter_ds::grouped_adapter: unknown activation '" + name + "'");
}

// act(h), matching torch.nn.functional (gelu exact = erf form, gelu_tanh = approximate="tanh").
template <typename T>
ALTER_DS_HOST_DEVICE T activate(BaseActivation act, T h) {
  switch (act) {
    case BaseActivation::kRelu:
      return h > T(0) ? h : T(0);
    case BaseActivation::kGelu:
      return T(0.5) * h * (T(1) + ::erf(h * T(0.70710678118654752440)));
    case BaseActivation::kGeluTanh: {
      const T inner = T(0.79788456080286535588) * (h + T(0.044715) * h * h * h);
      return T(0.5) * h * (T(1) + ::tanh(inner));
    }
    case BaseActivation::kSilu:
      return h / (T(1) + ::exp(-h));
    default:
      return h;
  }
}

// d act(h) / dh; relu's derivative at 0 is 0, as in torch's threshold_backward.
template <typename T>
ALTER_DS_HOST_DEVICE T activate_derivative(BaseActivation act, T h) {
  switch (act) {
    case BaseActivation::kRelu:
      return h > T(0) ? T(1) : T(0);
    case BaseActivation::kGelu: {
      const T cdf = T(0.5) * (T(1) + ::erf(h * T(0.70710678118654752440)));
      const T pdf = ::exp(T(-0.5) * h * h) * T(0.39894228040143267794);
      return cdf + h * pdf;
    }
    case BaseActivation::kGeluTanh: {
      const T c = T(0.79788456080286535588);
      const T t = ::tanh(c * (h + T(0.044715) * h * h * h));
      return T(0.5) * (T(1) + t) + T(0.5) * h * (T(1) - t * t) * c * (T(1) + T(3) * T(0.044715) * h * h);
    }
    case BaseActivation::kSilu: {
      const T s = T(1) / (T(1) + ::exp(-h));
      return s * (T(1) + h * (T(1) - s));
    }
    default:
      return T(1);
  }
}

}  // namespace alter_ds
