// The compiled module onepass._C: CPU kernels always, CUDA kernels when built with ONEPASS_WITH_CUDA.
// Kernels take raw pointers, sizes and a dtype code (see csrc/common.h), never torch types, so the
// module builds with CMake + pybind11 (+ nvcc) alone, independent of the installed torch build.
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "common.h"
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
  // The compiled values of the kernel contract (csrc/common.h), compared with onepass._contract by a test.
  using namespace onepass;
  m.attr("contract") = std::map<std::string, std::map<std::string, int>>{
      {"DType", {{"FLOAT32", kFloat32}, {"FLOAT16", kFloat16}, {"BFLOAT16", kBFloat16}, {"FLOAT64", kFloat64}}},
      {"Kind", {{"NONE", kNone}, {"REVERSE_KL", kReverseKL}, {"FORWARD_KL", kForwardKL}, {"JSD", kJSD},
                {"TV", kTV}, {"HELLINGER", kHellinger}, {"CHI2", kChi2}, {"ALPHA", kAlpha}}},
      {"Stat", {{"LSE_A", kLseA}, {"LSE_B", kLseB}, {"LOGP_A", kLogpA}, {"LOGP_B", kLogpB},
                {"ENTROPY", kEntropyA}, {"DIV", kDiv}, {"SUM_A", kSumA}, {"SUM_B", kSumB}}},
      {"Grad", {{"LOGP_A", kGradLogpA}, {"LOGP_B", kGradLogpB}, {"ENTROPY", kGradEntropyA}, {"DIV", kGradDiv}}},
      {"sizes", {{"NUM_KINDS", kNumKinds}, {"NUM_STATS", kNumStats}, {"NUM_GRADS", kNumGrads}}},
  };
  for (auto fn : registrars()) fn(m);
}
