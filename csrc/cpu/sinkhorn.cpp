// CPU (OpenMP) kernels of onepass.sinkhorn_distance for the L1 cost (SinKD's): the banded G x G cost
// construction and its backward sweep.  The GEMM costs (sqeuclidean, hellinger) use a vocab-chunked
// torch path in python/onepass/backends/sinkhorn.py.
//
// Rows are cut into consecutive groups of G rows (the last may be smaller); a G x G quantity is stored
// banded as [N, G]: entry (i, jj) pairs row i with row gstart(i) + jj of the same group.
//
// sinkhorn_l1_cost: out = 3 planes [N, G] (C, A, B) in the accumulation type (fp32, fp64 for fp64):
//   C_ij = sum_v |p_iv - q_jv|, A_ij = sum_v p_iv sign(p_iv - q_jv), B_ij = sum_v q_jv sign(q_jv - p_iv)
//   (= C_ij - A_ij, how it is computed), with p = exp(a / T - lse_a), q = exp(b / T - lse_b) recomputed per vocab chunk.
// sinkhorn_l1_grad (one side x; the teacher side passes the transposed banded upstream matrix):
//   grad_x_iv = x_iv (sum_j G_ij sign(x_iv - y_jv) - S_i) / T, written in the input dtype.
//
// Work split: independent tasks (group, block of rows), no barrier inside; a task loops over vocab chunks
// of VC entries, computes the probabilities of its rows and of its group's other-side rows for the chunk
// into private buffers ([BI + G, VC] per thread: the only scratch memory), then runs the O(BI G VC) pair
// loop with vectorized inner loops.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu/half_convert.h"
#include "registry.h"

namespace onepass {
namespace {

constexpr int64_t kSinkhornChunk = 256;

struct SinkhornF16 { uint16_t bits; };
struct SinkhornBF16 { uint16_t bits; };

template <typename Acc> inline Acc sinkhorn_load(const float* p, int64_t i) { return static_cast<Acc>(p[i]); }
template <typename Acc> inline Acc sinkhorn_load(const double* p, int64_t i) { return static_cast<Acc>(p[i]); }
template <typename Acc> inline Acc sinkhorn_load(const SinkhornF16* p, int64_t i) { return half_to_float(p[i].bits); }
template <typename Acc> inline Acc sinkhorn_load(const SinkhornBF16* p, int64_t i) { return bf16_to_float(p[i].bits); }

inline void sinkhorn_store(float* p, int64_t i, float v) { p[i] = v; }
inline void sinkhorn_store(double* p, int64_t i, double v) { p[i] = v; }
inline void sinkhorn_store(SinkhornF16* p, int64_t i, float v) { p[i].bits = float_to_half(v); }
inline void sinkhorn_store(SinkhornBF16* p, int64_t i, float v) { p[i].bits = float_to_bf16(v); }

// Hot loops.  The float versions are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (GCC target_clones); the double versions (fp64 inputs: tests, references) are plain.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ONEPASS_SINKHORN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ONEPASS_SINKHORN_CLONES
#endif

// In-place exp of n floats, vectorizable: Cody-Waite reduction + degree-7 Taylor on |r| <= ln2/2
// (relative error < 1e-7); exp(x) = 0 for x < -87.3 (results below FLT_MIN flush to 0), exp(-inf) = 0.
ONEPASS_SINKHORN_CLONES
void sinkhorn_exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k];
    const float t = std::min(std::max(v, -87.3f), 88.7f);
    const float kf = std::floor(t * 1.44269504088896341f + 0.5f);
    const float r = (t - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;
    float y = 1.0f / 5040.0f;
    y = y * r + 1.0f / 720.0f;
    y = y * r + 1.0f / 120.0f;
    y = y * r + 1.0f / 24.0f;
    y = y * r + 1.0f / 6.0f;
    y = y * r + 0.5f;
    y = y * r + 1.0f;
    y = y * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    x[k] = v < -87.3f ? 0.0f : y * scale;
  }
}

void sinkhorn_exp_inplace(double* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) x[k] = std::exp(x[k]);
}

// One row p against nj rows of qbuf: c[j] += sum |p - q_j|, a[j] += sum p sign(p - q_j).
template <typename Acc>
inline void sinkhorn_l1_row_generic(const Acc* p, const Acc* qbuf, int64_t nj, int64_t vc, Acc* c_out, Acc* a_out) {
  for (int64_t j = 0; j < nj; ++j) {
    const Acc* q = qbuf + j * kSinkhornChunk;
    Acc c = 0, sa = 0;
#pragma omp simd reduction(+ : c, sa)
    for (int64_t v = 0; v < vc; ++v) {
      const Acc pv = p[v];
      const Acc d = pv - q[v];
      c += std::abs(d);
      sa += (d > 0 ? pv : Acc(0)) - (d < 0 ? pv : Acc(0));
    }
    c_out[j] += c;
    a_out[j] += sa;
  }
}

ONEPASS_SINKHORN_CLONES
void sinkhorn_l1_row(const float* p, const float* qbuf, int64_t nj, int64_t vc, float* c_out, float* a_out) {
  sinkhorn_l1_row_generic<float>(p, qbuf, nj, vc, c_out, a_out);
}

void sinkhorn_l1_row(const double* p, const double* qbuf, int64_t nj, int64_t vc, double* c_out, double* a_out) {
  sinkhorn_l1_row_generic<double>(p, qbuf, nj, vc, c_out, a_out);
}

// acc[v] = sum_j g[j] sign(p[v] - q_j[v]).
template <typename Acc>
inline void sinkhorn_l1_grad_row_generic(const Acc* p, const Acc* qbuf, const Acc* g, int64_t nj, int64_t vc,
                                         Acc* acc) {
  for (int64_t v = 0; v < vc; ++v) acc[v] = 0;
  for (int64_t j = 0; j < nj; ++j) {
    const Acc gj = g[j];
    if (gj == 0) continue;
    const Acc* q = qbuf + j * kSinkhornChunk;
#pragma omp simd
    for (int64_t v = 0; v < vc; ++v) {
      const Acc d = p[v] - q[v];
      acc[v] += (d > 0 ? gj : Acc(0)) - (d < 0 ? gj : Acc(0));
    }
  }
}

ONEPASS_SINKHORN_CLONES
void sinkhorn_l1_grad_row(const float* p, const float* qbuf, const float* g, int64_t nj, int64_t vc, float* acc) {
  sinkhorn_l1_grad_row_generic<float>(p, qbuf, g, nj, vc, acc);
}

void sinkhorn_l1_grad_row(const double* p, const double* qbuf, const double* g, int64_t nj, int64_t vc,
                          double* acc) {
  sinkhorn_l1_grad_row_generic<double>(p, qbuf, g, nj, vc, acc);
}

// Probabilities exp(z * inv_temp - lse) of rows [r0, r1) for vocab entries [v0, v0 + vc) into buf[r1 - r0, VC].
template <typename In, typename Acc>
inline void sinkhorn_probs(const In* z, const Acc* lse, Acc* buf, int64_t r0, int64_t r1, int64_t V, int64_t v0,
                           int64_t vc, Acc inv_temp) {
  for (int64_t r = r0; r < r1; ++r) {
    const In* row = z + r * V + v0;
    Acc* out = buf + (r - r0) * kSinkhornChunk;
    const Acc l = lse[r];
    for (int64_t v = 0; v < vc; ++v) out[v] = sinkhorn_load<Acc>(row, v) * inv_temp - l;
    sinkhorn_exp_inplace(out, vc);
  }
}

// Work split: tasks = (group, block of BI rows of the group), independent (no barrier); every task keeps
// private [BI, VC] and [G, VC] probability buffers for the current vocab chunk.
inline int64_t sinkhorn_row_block(int64_t N, int64_t G) {
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  int64_t groups = (N + G - 1) / G;
  int64_t want = std::max<int64_t>(1, (4 * threads + groups - 1) / groups);  // blocks per group
  return std::clamp<int64_t>((G + want - 1) / want, 4, 64);
}

template <typename In, typename Acc>
void sinkhorn_l1_cost_impl(const In* a, const In* b, const Acc* lse_a, const Acc* lse_b, Acc* out, int64_t N,
                           int64_t V, int64_t G, double inv_temp_d) {
  const Acc inv_temp = static_cast<Acc>(inv_temp_d);
  Acc* out_c = out;
  Acc* out_a = out + N * G;
  Acc* out_b = out + 2 * N * G;
  const int64_t bi = sinkhorn_row_block(N, G);
  const int64_t blocks_per_group = (G + bi - 1) / bi;
  const int64_t tasks = ((N + G - 1) / G) * blocks_per_group;
#pragma omp parallel
  {
    std::vector<Acc> pbuf(static_cast<size_t>(bi) * kSinkhornChunk), qbuf(static_cast<size_t>(G) * kSinkhornChunk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t gs = (t / blocks_per_group) * G;
      const int64_t ge = std::min(gs + G, N);
      const int64_t i0 = gs + (t % blocks_per_group) * bi;
      const int64_t i1 = std::min(i0 + bi, ge);
      if (i0 >= i1) continue;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t jj = 0; jj < G; ++jj) out_c[i * G + jj] = out_a[i * G + jj] = Acc(0);
      for (int64_t v0 = 0; v0 < V; v0 += kSinkhornChunk) {
        const int64_t vc = std::min(kSinkhornChunk, V - v0);
        sinkhorn_probs<In, Acc>(a, lse_a, pbuf.data(), i0, i1, V, v0, vc, inv_temp);
        sinkhorn_probs<In, Acc>(b, lse_b, qbuf.data(), gs, ge, V, v0, vc, inv_temp);
        for (int64_t i = i0; i < i1; ++i)
          sinkhorn_l1_row(pbuf.data() + (i - i0) * kSinkhornChunk, qbuf.data(), ge - gs, vc, out_c + i * G,
                          out_a + i * G);
      }
      // B_ij = sum_v q_jv sign(q_jv - p_iv) = C_ij - A_ij (since C = sum (p - q) sign(p - q)).
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t jj = 0; jj < G; ++jj) out_b[i * G + jj] = out_c[i * G + jj] - out_a[i * G + jj];
    }
  }
}

template <typename In, typename Acc>
void sinkhorn_l1_grad_impl(const In* x, const In* y, const Acc* lse_x, const Acc* lse_y, const Acc* gm,
                           const Acc* sx, In* out, int64_t N, int64_t V, int64_t G, double inv_temp_d) {
  const Acc inv_temp = static_cast<Acc>(inv_temp_d);
  const int64_t bi = sinkhorn_row_block(N, G);
  const int64_t blocks_per_group = (G + bi - 1) / bi;
  const int64_t tasks = ((N + G - 1) / G) * blocks_per_group;
#pragma omp parallel
  {
    std::vector<Acc> xbuf(static_cast<size_t>(bi) * kSinkhornChunk), ybuf(static_cast<size_t>(G) * kSinkhornChunk);
    Acc acc[kSinkhornChunk];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t gs = (t / blocks_per_group) * G;
      const int64_t ge = std::min(gs + G, N);
      const int64_t i0 = gs + (t % blocks_per_group) * bi;
      const int64_t i1 = std::min(i0 + bi, ge);
      if (i0 >= i1) continue;
      for (int64_t v0 = 0; v0 < V; v0 += kSinkhornChunk) {
        const int64_t vc = std::min(kSinkhornChunk, V - v0);
        sinkhorn_probs<In, Acc>(x, lse_x, xbuf.data(), i0, i1, V, v0, vc, inv_temp);
        sinkhorn_probs<In, Acc>(y, lse_y, ybuf.data(), gs, ge, V, v0, vc, inv_temp);
        for (int64_t i = i0; i < i1; ++i) {
          const Acc* p = xbuf.data() + (i - i0) * kSinkhornChunk;
          sinkhorn_l1_grad_row(p, ybuf.data(), gm + i * G, ge - gs, vc, acc);
          const Acc s = sx[i];
          In* o = out + i * V + v0;
          for (int64_t v = 0; v < vc; ++v) sinkhorn_store(o, v, p[v] * (acc[v] - s) * inv_temp);
        }
      }
    }
  }
}

void sinkhorn_l1_cost(std::uintptr_t a, std::uintptr_t b, std::uintptr_t lse_a, std::uintptr_t lse_b,
                      std::uintptr_t out, int64_t N, int64_t V, int64_t G, double inv_temp, int dtype) {
  if (N <= 0) return;
  if (G <= 0) throw std::invalid_argument("sinkhorn_l1_cost: group size must be >= 1");
  switch (dtype) {
    case kFloat32:
      return sinkhorn_l1_cost_impl<float, float>(reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b),
                                                 reinterpret_cast<const float*>(lse_a), reinterpret_cast<const float*>(lse_b),
                                                 reinterpret_cast<float*>(out), N, V, G, inv_temp);
    case kFloat16:
      return sinkhorn_l1_cost_impl<SinkhornF16, float>(
          reinterpret_cast<const SinkhornF16*>(a), reinterpret_cast<const SinkhornF16*>(b),
          reinterpret_cast<const float*>(lse_a), reinterpret_cast<const float*>(lse_b), reinterpret_cast<float*>(out), N,
          V, G, inv_temp);
    case kBFloat16:
      return sinkhorn_l1_cost_impl<SinkhornBF16, float>(
          reinterpret_cast<const SinkhornBF16*>(a), reinterpret_cast<const SinkhornBF16*>(b),
          reinterpret_cast<const float*>(lse_a), reinterpret_cast<const float*>(lse_b), reinterpret_cast<float*>(out), N,
          V, G, inv_temp);
    case kFloat64:
      return sinkhorn_l1_cost_impl<double, double>(
          reinterpret_cast<const double*>(a), reinterpret_cast<const double*>(b), reinterpret_cast<const double*>(lse_a),
          reinterpret_cast<const double*>(lse_b), reinterpret_cast<double*>(out), N, V, G, inv_temp);
    default:
      throw std::invalid_argument("sinkhorn_l1_cost: unknown dtype code");
  }
}

void sinkhorn_l1_grad(std::uintptr_t x, std::uintptr_t y, std::uintptr_t lse_x, std::uintptr_t lse_y,
                      std::uintptr_t gm, std::uintptr_t sx, std::uintptr_t out, int64_t N, int64_t V, int64_t G,
                      double inv_temp, int dtype) {
  if (N <= 0) return;
  if (G <= 0) throw std::invalid_argument("sinkhorn_l1_grad: group size must be >= 1");
#define ONEPASS_SINKHORN_GRAD(In, Acc)                                                                          \
  sinkhorn_l1_grad_impl<In, Acc>(reinterpret_cast<const In*>(x), reinterpret_cast<const In*>(y),                \
                                 reinterpret_cast<const Acc*>(lse_x), reinterpret_cast<const Acc*>(lse_y),      \
                                 reinterpret_cast<const Acc*>(gm), reinterpret_cast<const Acc*>(sx),            \
                                 reinterpret_cast<In*>(out), N, V, G, inv_temp)
  switch (dtype) {
    case kFloat32: ONEPASS_SINKHORN_GRAD(float, float); return;
    case kFloat16: ONEPASS_SINKHORN_GRAD(SinkhornF16, float); return;
    case kBFloat16: ONEPASS_SINKHORN_GRAD(SinkhornBF16, float); return;
    case kFloat64: ONEPASS_SINKHORN_GRAD(double, double); return;
    default: throw std::invalid_argument("sinkhorn_l1_grad: unknown dtype code");
  }
#undef ONEPASS_SINKHORN_GRAD
}

void sinkhorn_register(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sinkhorn_l1_cost", &sinkhorn_l1_cost, py::arg("a"), py::arg("b"), py::arg("lse_a"), py::arg("lse_b"),
        py::arg("out"), py::arg("n"), py::arg("v"), py::arg("group_size"), py::arg("inv_temp"), py::arg("dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "Banded L1 cost (C, A, B planes [3, N, G]) of softmax(a/T) vs softmax(b/T) rows, per group.");
  m.def("sinkhorn_l1_grad", &sinkhorn_l1_grad, py::arg("x"), py::arg("y"), py::arg("lse_x"), py::arg("lse_y"),
        py::arg("gm"), py::arg("sx"), py::arg("out"), py::arg("n"), py::arg("v"), py::arg("group_size"),
        py::arg("inv_temp"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
        "Gradient of sum G * C_l1 w.r.t. the logits x (one side), written in x's dtype.");
}

}  // namespace

ONEPASS_REGISTER(sinkhorn_register);

}  // namespace onepass
