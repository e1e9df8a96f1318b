// Shared definitions of the compiled kernels (CPU and CUDA).
#pragma once
#include <cstdint>

namespace onepass {

// The kernel contract, mirrored from python/onepass/_contract.py (DType, Kind, Stat, Grad); the test
// tests/test_kernel_contract.py::test_compiled_contract_matches_python compares the compiled values.

// dtype codes passed from Python.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Divergence kinds of the vocab-stats kernels (docs/vocab_stats.md).
enum Kind : int {
  kNone = 0,
  kReverseKL = 1,
  kForwardKL = 2,
  kJSD = 3,
  kTV = 4,
  kHellinger = 5,
  kChi2 = 6,
  kAlpha = 7,
  kNumKinds = 8,
};

inline bool valid_kind(int kind) { return kind >= kNone && kind < kNumKinds; }

// Columns of the per-row stats array [N, kNumStats] written by the forward kernels.
enum StatColumn : int {
  kLseA = 0,
  kLseB = 1,
  kLogpA = 2,
  kLogpB = 3,
  kEntropyA = 4,
  kDiv = 5,
  kSumA = 6,
  kSumB = 7,
  kNumStats = 8,
};

// Columns of the per-row upstream gradients [N, kNumGrads] read by the backward kernels.
enum GradColumn : int { kGradLogpA = 0, kGradLogpB = 1, kGradEntropyA = 2, kGradDiv = 3, kNumGrads = 4 };

}  // namespace onepass
