// pybind11 bindings of the CUDA vocab-stats kernels (csrc/cuda/vocab_stats.cu): raw pointers as
// integers, sizes, the dtype code of csrc/common.h, the stream as an integer (cudaStream_t).
// Compiled by the host compiler into onepass._C when it is built with CUDA.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/vocab_stats.cuh"
#include "registry.h"

namespace py = pybind11;

namespace onepass {
namespace {

std::string describe(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// Number of CUDA devices, or std::runtime_error (-> RuntimeError) naming the backend and the cause.
int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // reset this thread's last-error state
    throw std::runtime_error("onepass CUDA backend: no usable CUDA device (cudaGetDeviceCount: " +
                             describe(e) + ")");
  }
  if (n <= 0)
    throw std::runtime_error(
        "onepass CUDA backend: no usable CUDA device (cudaGetDeviceCount found 0 devices)");
  return n;
}

void require_device() {
  static std::atomic<bool> ok{false};
  if (ok.load(std::memory_order_relaxed)) return;
  device_count();
  ok.store(true, std::memory_order_relaxed);
}

void check_args(const char* fn, int64_t N, int64_t V, int dtype, int kind, double beta, double alpha) {
  const std::string where = std::string("onepass CUDA backend: ") + fn + ": ";
  if (dtype == kFloat64)
    throw py::type_error(where + "float64 is not supported by the CUDA kernels (use float32, "
                                 "float16 or bfloat16, or the 'cpu' / 'torch' backend)");
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    throw py::value_error(where + "unknown dtype code " + std::to_string(dtype));
  if (N < 0 || V < 0)
    throw py::value_error(where + "N and V must be >= 0, got N=" + std::to_string(N) +
                          ", V=" + std::to_string(V));
  if (!valid_kind(kind))
    throw py::value_error(where + "kind must be in 0.." + std::to_string(kNumKinds - 1) + ", got " +
                          std::to_string(kind));
  if (kind == kJSD && !(beta > 0.0 && beta < 1.0))
    throw py::value_error(where + "jsd (kind 3) needs 0 < beta < 1, got " + std::to_string(beta));
  if (kind == kAlpha && (alpha == 0.0 || alpha == 1.0 || !(alpha - alpha == 0.0)))
    throw py::value_error(where + "alpha divergence (kind 7) needs a finite alpha not in {0, 1}, got " +
                          std::to_string(alpha));
}

// Each model's logit map: inv_temp finite > 0, softcap finite >= 0 (0 = no cap).
void check_maps(const char* fn, double inv_temp_a, double softcap_a, double inv_temp_b, double softcap_b) {
  const std::string where = std::string("onepass CUDA backend: ") + fn + ": ";
  for (double it : {inv_temp_a, inv_temp_b})
    if (!(std::isfinite(it) && it > 0.0))
      throw py::value_error(where + "inv_temp must be finite and > 0, got " + std::to_string(it));
  for (double c : {softcap_a, softcap_b})
    if (!(std::isfinite(c) && c >= 0.0))
      throw py::value_error(where + "softcap must be finite and >= 0 (0 = no cap), got " + std::to_string(c));
}

void check_launch(const char* fn, cudaError_t e) {
  if (e == cudaSuccess) return;
  if (e == cudaErrorInvalidValue)
    throw py::value_error(std::string("onepass CUDA backend: ") + fn + ": invalid arguments (" +
                          describe(e) + ")");
  throw std::runtime_error(std::string("onepass CUDA backend: ") + fn + " kernel launch failed (" +
                           describe(e) + ")");
}

void fwd(uintptr_t a_ptr, uintptr_t b_ptr, uintptr_t targets_ptr, uintptr_t stats_ptr, int64_t N,
         int64_t V, int dtype, double inv_temp_a, double softcap_a, double inv_temp_b, double softcap_b,
         int kind, double beta, double alpha, bool need_entropy, uintptr_t stream) {
  constexpr const char* fn = "vocab_stats_fwd_cuda";
  check_args(fn, N, V, dtype, kind, beta, alpha);
  check_maps(fn, inv_temp_a, softcap_a, inv_temp_b, softcap_b);
  if (kind != kNone && b_ptr == 0)
    throw py::value_error(std::string("onepass CUDA backend: ") + fn + ": kind " +
                          std::to_string(kind) + " needs b (the reference / teacher logits)");
  if (N == 0) return;
  if (a_ptr == 0 || stats_ptr == 0)
    throw py::value_error(std::string("onepass CUDA backend: ") + fn + ": a and stats must not be null");
  require_device();
  cudaError_t e;
  {
    py::gil_scoped_release nogil;
    e = cuda::vocab_stats_fwd(reinterpret_cast<const void*>(a_ptr), reinterpret_cast<const void*>(b_ptr),
                              reinterpret_cast<const int64_t*>(targets_ptr),
                              reinterpret_cast<float*>(stats_ptr), N, V, dtype,
                              static_cast<float>(inv_temp_a), static_cast<float>(softcap_a),
                              static_cast<float>(inv_temp_b), static_cast<float>(softcap_b), kind,
                              static_cast<float>(beta), static_cast<float>(alpha), need_entropy, stream);
  }
  check_launch(fn, e);
}

void bwd(uintptr_t a_ptr, uintptr_t b_ptr, uintptr_t targets_ptr, uintptr_t stats_ptr,
         uintptr_t grads_ptr, uintptr_t grad_a_ptr, uintptr_t grad_b_ptr, int64_t N, int64_t V,
         int dtype, double inv_temp_a, double softcap_a, double inv_temp_b, double softcap_b, int kind,
         double beta, double alpha, uintptr_t stream) {
  constexpr const char* fn = "vocab_stats_bwd_cuda";
  check_args(fn, N, V, dtype, kind, beta, alpha);
  check_maps(fn, inv_temp_a, softcap_a, inv_temp_b, softcap_b);
  if ((kind != kNone || grad_b_ptr != 0) && b_ptr == 0)
    throw py::value_error(std::string("onepass CUDA backend: ") + fn +
                          ": b is needed for a divergence kind or for grad_b");
  if (N == 0 || (grad_a_ptr == 0 && grad_b_ptr == 0)) return;
  if (a_ptr == 0 || stats_ptr == 0 || grads_ptr == 0)
    throw py::value_error(std::string("onepass CUDA backend: ") + fn +
                          ": a, stats and grads must not be null");
  require_device();
  cudaError_t e;
  {
    py::gil_scoped_release nogil;
    e = cuda::vocab_stats_bwd(reinterpret_cast<const void*>(a_ptr), reinterpret_cast<const void*>(b_ptr),
                              reinterpret_cast<const int64_t*>(targets_ptr),
                              reinterpret_cast<const float*>(stats_ptr),
                              reinterpret_cast<const float*>(grads_ptr),
                              reinterpret_cast<void*>(grad_a_ptr), reinterpret_cast<void*>(grad_b_ptr),
                              N, V, dtype, static_cast<float>(inv_temp_a), static_cast<float>(softcap_a),
                              static_cast<float>(inv_temp_b), static_cast<float>(softcap_b), kind,
                              static_cast<float>(beta), static_cast<float>(alpha), stream);
  }
  check_launch(fn, e);
}

void register_vocab_stats_cuda(py::module_& m) {
  m.def("vocab_stats_fwd_cuda", &fwd, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("targets_ptr"),
        py::arg("stats_ptr"), py::arg("N"), py::arg("V"), py::arg("dtype"), py::arg("inv_temp_a"),
        py::arg("softcap_a"), py::arg("inv_temp_b"), py::arg("softcap_b"), py::arg("kind"), py::arg("beta"),
        py::arg("alpha"), py::arg("need_entropy"),
        py::arg("stream"),
        "CUDA vocab-stats forward (docs/vocab_stats.md): writes stats [N, 8] fp32. Pointers are "
        "integers (0 = absent b / targets); enqueued on `stream` (a cudaStream_t as integer).");
  m.def("vocab_stats_bwd_cuda", &bwd, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("targets_ptr"),
        py::arg("stats_ptr"), py::arg("grads_ptr"), py::arg("grad_a_ptr"), py::arg("grad_b_ptr"),
        py::arg("N"), py::arg("V"), py::arg("dtype"), py::arg("inv_temp_a"), py::arg("softcap_a"),
        py::arg("inv_temp_b"), py::arg("softcap_b"), py::arg("kind"), py::arg("beta"), py::arg("alpha"),
        py::arg("stream"),
        "CUDA vocab-stats backward (docs/vocab_stats.md): writes grad_a / grad_b [N, V] in the "
        "input dtype (0 = not written).");
  m.def("cuda_device_count", &device_count,
        "Number of CUDA devices visible to onepass's CUDA backend; RuntimeError when none is usable.");
}

}  // namespace

ONEPASS_REGISTER(register_vocab_stats_cuda);

}  // namespace onepass
