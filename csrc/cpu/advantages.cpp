// CPU (C++/OpenMP) kernel of onepass.group_advantages (python/onepass/advantages.py).
//
// Groups arrive in CSR form: offsets[S+1] (int64) and, for ragged group ids, perm[B] (int64; the
// members of segment s are perm[offsets[s] .. offsets[s+1]); perm == 0 means consecutive positions).
// Per segment: two-pass mean / unbiased variance around a shift (the first member: all-equal groups
// give exactly 0), then the advantage.  Batch statistics (GRPO scale="batch", REINFORCE++ whitening)
// are two-pass sums over fixed chunks whose partials are added in chunk order, so the result does
// not depend on the number of threads: the kernel is deterministic.
// Accumulation in float (double for float64 rewards); output float (double for float64 rewards).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/half_convert.h"
#include "registry.h"

namespace onepass {
namespace {

enum AdvEstimator : int { kAdvGrpo = 0, kAdvDrGrpo = 1, kAdvRloo = 2, kAdvReinforcePP = 3 };
enum AdvScale : int { kAdvScaleGroup = 0, kAdvScaleBatch = 1, kAdvScaleNone = 2 };
constexpr double kAdvVarFloor = 1e-8;
constexpr int64_t kAdvChunk = 4096;

template <typename T>
struct AdvLoad;
template <>
struct AdvLoad<float> {
  static float get(const float* p, int64_t i) { return p[i]; }
};
template <>
struct AdvLoad<double> {
  static double get(const double* p, int64_t i) { return p[i]; }
};
struct AdvHalf {
  uint16_t v;
};
struct AdvBF16 {
  uint16_t v;
};
template <>
struct AdvLoad<AdvHalf> {
  static float get(const AdvHalf* p, int64_t i) { return half_to_float(p[i].v); }
};
template <>
struct AdvLoad<AdvBF16> {
  static float get(const AdvBF16* p, int64_t i) { return bf16_to_float(p[i].v); }
};

// Deterministic sum of f(i) for i in [0, n): fixed chunks, partials added in order.
template <typename A, typename F>
A advantages_chunked_sum(int64_t n, F f) {
  const int64_t nchunks = (n + kAdvChunk - 1) / kAdvChunk;
  std::vector<A> partial(nchunks, A(0));
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t lo = c * kAdvChunk, hi = std::min(n, lo + kAdvChunk);
    A s = 0;
    for (int64_t i = lo; i < hi; ++i) s += f(i);
    partial[c] = s;
  }
  A total = 0;
  for (int64_t c = 0; c < nchunks; ++c) total += partial[c];
  return total;
}

template <typename T, typename A>
void advantages_run(const T* r, const int64_t* perm, const int64_t* off, int64_t S, int64_t B,
                    int estimator, int scale, A eps, A* out) {
  if (B <= 0 || S <= 0) return;
  auto val = [&](int64_t i) -> A { return static_cast<A>(AdvLoad<T>::get(r, i)); };
  auto member = [&](int64_t j) -> int64_t { return perm ? perm[j] : j; };

  // GRPO scale="batch": unbiased std of all rewards (0 for B < 2).
  A batch_std = 0;
  if (estimator == kAdvGrpo && scale == kAdvScaleBatch && B > 1) {
    const A shift = val(0);
    const A mean = shift + advantages_chunked_sum<A>(B, [&](int64_t i) { return val(i) - shift; }) / A(B);
    const A ss = advantages_chunked_sum<A>(B, [&](int64_t i) {
      const A d = val(i) - mean;
      return d * d;
    });
    batch_std = std::sqrt(ss / A(B - 1));
  }

  std::vector<A> seg_mean(S);
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < S; ++s) {
    const int64_t lo = off[s], hi = off[s + 1], n = hi - lo;
    if (n <= 0) {
      seg_mean[s] = 0;
      continue;
    }
    // Scale-safe: the group is summed as r / k with k a power of two near its largest |r| (exact
    // scaling), so that rewards near the float range limit do not overflow the sums.
    A amax = 0;
    for (int64_t j = lo; j < hi; ++j) amax = std::max(amax, A(std::abs(val(member(j)))));
    const A k = (amax > A(0) && std::isfinite(amax)) ? A(std::exp2(std::floor(std::log2(amax)))) : A(1);
    const A shift = val(member(lo)) / k;
    A s1 = 0;
    for (int64_t j = lo; j < hi; ++j) s1 += val(member(j)) / k - shift;
    const A mean_k = shift + s1 / A(n);  // mean / k
    const A mean = mean_k * k;
    seg_mean[s] = mean;
    if (n == 1) {
      out[member(lo)] = A(0);
      continue;
    }
    if (estimator == kAdvGrpo && scale == kAdvScaleGroup) {
      A s2 = 0;
      for (int64_t j = lo; j < hi; ++j) {
        const A d = val(member(j)) / k - mean_k;
        s2 += d * d;
      }
      A denom_k = std::sqrt(s2 / A(n - 1)) + eps / k;  // (std + eps) / k
      if (!(denom_k > A(0))) denom_k = A(1);  // only with eps = 0 and equal rewards (x = 0)
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t i = member(j);
        out[i] = (val(i) / k - mean_k) / denom_k;
      }
      continue;
    }
    A factor = 1;  // adv = (r - mean) * factor  or  / denom
    bool divide = false;
    A denom = 1;
    if (estimator == kAdvGrpo && scale == kAdvScaleBatch) {
      denom = batch_std + eps;
      divide = true;
    } else if (estimator == kAdvRloo) {
      factor = A(n) / A(n - 1);
    }
    if (!(denom > A(0))) denom = A(1);  // std + eps = 0 only with eps = 0 and equal rewards (x = 0)
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t i = member(j);
      const A x = val(i) - mean;
      out[i] = divide ? x / denom : x * factor;
    }
  }

  if (estimator == kAdvReinforcePP) {
    // out holds x = r - mean_g (0 for groups of one); whiten over the batch, biased variance.
    const A shift = out[0];
    const A mu = shift + advantages_chunked_sum<A>(B, [&](int64_t i) { return out[i] - shift; }) / A(B);
    const A var = advantages_chunked_sum<A>(B, [&](int64_t i) {
                    const A d = out[i] - mu;
                    return d * d;
                  }) / A(B);
    const A rstd = A(1) / std::sqrt(std::max(var, A(kAdvVarFloor)));
#pragma omp parallel for schedule(static)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t lo = off[s], hi = off[s + 1], n = hi - lo;
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t i = member(j);
        out[i] = n > 1 ? ((val(i) - seg_mean[s]) - mu) * rstd : A(0);
      }
    }
  }
}

void advantages_cpu(uintptr_t rewards, int dtype, uintptr_t perm, uintptr_t offsets, int64_t num_segments,
                    int64_t batch, int estimator, int scale, double eps, uintptr_t out) {
  if (estimator < 0 || estimator > 3) throw std::invalid_argument("advantages_cpu: bad estimator code");
  if (scale < 0 || scale > 2) throw std::invalid_argument("advantages_cpu: bad scale code");
  const auto* p = reinterpret_cast<const int64_t*>(perm);
  const auto* o = reinterpret_cast<const int64_t*>(offsets);
  switch (dtype) {
    case kFloat32:
      advantages_run<float, float>(reinterpret_cast<const float*>(rewards), p, o, num_segments, batch, estimator,
                                   scale, float(eps), reinterpret_cast<float*>(out));
      break;
    case kFloat16:
      advantages_run<AdvHalf, float>(reinterpret_cast<const AdvHalf*>(rewards), p, o, num_segments, batch,
                                     estimator, scale, float(eps), reinterpret_cast<float*>(out));
      break;
    case kBFloat16:
      advantages_run<AdvBF16, float>(reinterpret_cast<const AdvBF16*>(rewards), p, o, num_segments, batch,
                                     estimator, scale, float(eps), reinterpret_cast<float*>(out));
      break;
    case kFloat64:
      advantages_run<double, double>(reinterpret_cast<const double*>(rewards), p, o, num_segments, batch,
                                     estimator, scale, eps, reinterpret_cast<double*>(out));
      break;
    default:
      throw std::invalid_argument("advantages_cpu: unknown dtype code " + std::to_string(dtype));
  }
}

void advantages_register_cpu(pybind11::module_& m) {
  m.def("advantages_cpu", &advantages_cpu, pybind11::arg("rewards"), pybind11::arg("dtype"),
        pybind11::arg("perm"), pybind11::arg("offsets"), pybind11::arg("num_segments"), pybind11::arg("batch"),
        pybind11::arg("estimator"), pybind11::arg("scale"), pybind11::arg("eps"), pybind11::arg("out"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Group advantages on CPU: rewards [B] (dtype code), CSR groups (perm [B] int64 or 0, offsets [S+1] "
        "int64), estimator/scale codes, eps -> out [B] (float32, float64 for float64 rewards).");
}

}  // namespace

ONEPASS_REGISTER(advantages_register_cpu);

}  // namespace onepass
