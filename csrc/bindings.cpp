// The compiled module onepass._C: CPU kernels always, CUDA kernels when built with ONEPASS_WITH_CUDA.
// Kernels take raw pointers, sizes and a dtype code (see csrc/common.h), never torch types, so the
// module builds with CMake + pybind11 (+ nvcc) alone, independent of the installed torch build.
#include "registry.h"

namespace onepass {

std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;
  return all;
}

}  // namespace onepass

PYBIND11_MODULE(_C, m) {
  m.doc() = "onepass compiled kernels (CPU, and CUDA when built with it)";
#ifdef ONEPASS_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto fn : onepass::registrars()) fn(m);
}
