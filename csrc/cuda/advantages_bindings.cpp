// pybind11 binding of the CUDA group-advantages kernels (csrc/cuda/advantages.cu).
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "registry.h"

namespace onepass {

cudaError_t advantages_cuda_launch(const void* rewards, int dtype, const int64_t* perm, const int64_t* offsets,
                                   int64_t num_segments, int64_t batch, int estimator, int scale, double eps,
                                   void* out, void* stats, void* stream_ptr);

namespace {

void advantages_cuda(uintptr_t rewards, int dtype, uintptr_t perm, uintptr_t offsets, int64_t num_segments,
                     int64_t batch, int64_t max_n, int estimator, int scale, double eps, uintptr_t out,
                     uintptr_t stats, uintptr_t stream) {
  (void)max_n;  // one warp per segment loops over any group size
  cudaError_t err;
  {
    pybind11::gil_scoped_release release;
    err = advantages_cuda_launch(reinterpret_cast<const void*>(rewards), dtype,
                                 reinterpret_cast<const int64_t*>(perm), reinterpret_cast<const int64_t*>(offsets),
                                 num_segments, batch, estimator, scale, eps, reinterpret_cast<void*>(out),
                                 reinterpret_cast<void*>(stats), reinterpret_cast<void*>(stream));
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("onepass.group_advantages (cuda backend): kernel launch failed: ") +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

void advantages_register_cuda(pybind11::module_& m) {
  m.def("advantages_cuda", &advantages_cuda, pybind11::arg("rewards"), pybind11::arg("dtype"),
        pybind11::arg("perm"), pybind11::arg("offsets"), pybind11::arg("num_segments"), pybind11::arg("batch"),
        pybind11::arg("max_n"), pybind11::arg("estimator"), pybind11::arg("scale"), pybind11::arg("eps"),
        pybind11::arg("out"), pybind11::arg("stats"), pybind11::arg("stream"),
        "Group advantages on CUDA: device pointers as in advantages_cpu plus a 2-element stats workspace "
        "(float32, float64 for float64 rewards) and the stream (uintptr_t). Raises RuntimeError on a CUDA error.");
}

}  // namespace

ONEPASS_REGISTER(advantages_register_cuda);

}  // namespace onepass
