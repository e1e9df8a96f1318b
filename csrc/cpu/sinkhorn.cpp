// CPU (OpenMP) kernels of onepass.sinkhorn_distance for the L1 cost (SinKD's): the banded G x G cost
// construction and its backward sweep.  The GEMM costs (sqeuclidean, hellinger) use a vocab-chunked
// torch path in python/onepass/backends/cpu/sinkhorn.py.
//
// Rows are cut into consecutive groups of G rows (the last may be smaller); a G x G quantity is stored
// banded as [N, G]: entry (i, jj) pairs row i with row gstart(i) + jj of the same group.  p = exp(a / T -
// lse_a), q = exp(b / T - lse_b) are recomputed per vocab chunk into per-thread buffers (the only scratch,
// with the forward's partial cost planes), never stored as [N, V].
//
// sinkhorn_l1_cost: out = 3 planes [N, G] (C, A, B) in the accumulation type (fp32, fp64 for fp64):
//   C_ij = sum_v |p_iv - q_jv|, A_ij = sum_v p_iv sign(p_iv - q_jv), B_ij = sum_v q_jv sign(q_jv - p_iv)
//   (= C_ij - A_ij, how it is computed).
// sinkhorn_l1_grads: both sides in one sweep, from the banded upstream matrix g = dL/dC [N, G]:
//   grad_a_iv = p_iv (sum_j g_ij sign(p_iv - q_jv) - sa_i) / T,
//   grad_b_jv = q_jv (sum_i g_ij sign(q_jv - p_iv) - sb_j) / T, written in the input dtype.
// sign(0) = 0 (the subgradient at ties, as torch.cdist's backward).
//
// Both are O(G^2 V) pair sweeps, written as register-blocked micro-kernels on GCC vector types (one
// vector = ONEPASS_SK_VEC_BYTES bytes):
// - forward: the vector lanes run over teacher rows j (q transposed to [v][j] per chunk), a block of
//   FWD_RI student rows x FWD_RJ vectors of j keeps its C and A sums in registers over the vocab chunk;
// - backward: the lanes run over the vocabulary, a block of BWD_RI rows i x BWD_RV vectors of v keeps p
//   and dL/dp in registers while j runs over the group; dL/dq_j is accumulated in a per-chunk buffer.
// Work split: forward tasks = (group, block of rows, vocab slice) with per-slice partial planes summed in
// a fixed order afterwards (deterministic for a given thread count); backward tasks = (group, vocab
// chunk), each writing its own columns of both gradients.
//
// The kernel body (between the ONEPASS_SK_BODY guards) is compiled three times, into namespaces `base`
// (the default target), `avx2` and `avx512` (`#pragma GCC target`); the entry points pick one at run time.
#ifndef ONEPASS_SK_BODY
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

// The selects (`c ? x : y`) on float comparisons are only if-converted, hence vectorized, when
// comparisons may be assumed not to trap.  Affects only the FP-exception flags.
#pragma GCC optimize("no-trapping-math")
// Vector types wider than the default target's registers in the inlined helpers: no ABI is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace onepass {
namespace sk_cpu {

struct F16 { uint16_t bits; };
struct BF16 { uint16_t bits; };

inline float load_acc(const float* p, int64_t i) { return p[i]; }
inline double load_acc(const double* p, int64_t i) { return p[i]; }
inline float load_acc(const F16* p, int64_t i) { return half_to_float(p[i].bits); }
inline float load_acc(const BF16* p, int64_t i) { return bf16_to_float(p[i].bits); }

inline void store_acc(float* p, int64_t i, float v) { p[i] = v; }
inline void store_acc(double* p, int64_t i, double v) { p[i] = v; }
inline void store_acc(F16* p, int64_t i, float v) { p[i].bits = float_to_half(v); }
inline void store_acc(BF16* p, int64_t i, float v) { p[i].bits = float_to_bf16(v); }

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Forward work split: rows of a group in blocks of `rows` (a multiple of the micro-kernel's row block),
// the vocabulary in `slices` slices of `slice_len` entries (a multiple of `chunk`, the entries whose
// probabilities are held at once); partial planes of slices >= 1 are summed into slice 0's afterwards.
struct FwdSplit {
  int64_t rows, row_blocks, slices, slice_len, chunk;
};

// Enough independent tasks (~4 per thread) for dynamic scheduling on a shared machine: a group's rows are
// split first when the group is large (the teacher chunk is recomputed per row block), the vocabulary
// otherwise (each slice costs one more [N, G] partial pair of planes).
inline FwdSplit fwd_split(int64_t N, int64_t V, int64_t G, int64_t ri, int64_t lanes) {
  const int64_t groups = (N + G - 1) / G;
  const int64_t want = std::max<int64_t>(1, (4 * max_threads() + groups - 1) / groups);  // tasks per group
  FwdSplit s{};
  s.rows = round_up(std::max<int64_t>(std::min<int64_t>(G, 64), (G + want - 1) / want), ri);
  s.rows = std::min(s.rows, round_up(G, ri));
  s.row_blocks = (G + s.rows - 1) / s.rows;
  const int64_t gp = round_up(G, lanes);
  // p [rows, chunk] and q^T [chunk, gp] of the working set in ~256 KiB (fp32), a multiple of 16 entries.
  s.chunk = std::clamp<int64_t>((65536 / (s.rows + gp)) / 16 * 16, 16, 1024);
  const int64_t max_slices = std::max<int64_t>(1, V / 2048);
  s.slices = std::clamp<int64_t>((want + s.row_blocks - 1) / s.row_blocks, 1, max_slices);
  s.slice_len = round_up((V + s.slices - 1) / s.slices, s.chunk);
  s.slices = (V + s.slice_len - 1) / s.slice_len;
  return s;
}

}  // namespace sk_cpu
}  // namespace onepass

#define ONEPASS_SK_BODY 1

#define ONEPASS_SK_VEC_BYTES 16
#define ONEPASS_SK_FWD_RI 2
#define ONEPASS_SK_FWD_RJ 1
#define ONEPASS_SK_BWD_RI 2
#define ONEPASS_SK_BWD_RV 1
namespace onepass {
namespace sk_cpu {
namespace base {
#include __FILE__
}  // namespace base
}  // namespace sk_cpu
}  // namespace onepass
#undef ONEPASS_SK_VEC_BYTES
#undef ONEPASS_SK_FWD_RI
#undef ONEPASS_SK_FWD_RJ
#undef ONEPASS_SK_BWD_RI
#undef ONEPASS_SK_BWD_RV

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ONEPASS_SK_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ONEPASS_SK_VEC_BYTES 32
#define ONEPASS_SK_FWD_RI 2
#define ONEPASS_SK_FWD_RJ 2
#define ONEPASS_SK_BWD_RI 2
#define ONEPASS_SK_BWD_RV 2
namespace onepass {
namespace sk_cpu {
namespace avx2 {
#include __FILE__
}  // namespace avx2
}  // namespace sk_cpu
}  // namespace onepass
#undef ONEPASS_SK_VEC_BYTES
#undef ONEPASS_SK_FWD_RI
#undef ONEPASS_SK_FWD_RJ
#undef ONEPASS_SK_BWD_RI
#undef ONEPASS_SK_BWD_RV
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define ONEPASS_SK_VEC_BYTES 64
#define ONEPASS_SK_FWD_RI 4
#define ONEPASS_SK_FWD_RJ 2
#define ONEPASS_SK_BWD_RI 4
#define ONEPASS_SK_BWD_RV 2
namespace onepass {
namespace sk_cpu {
namespace avx512 {
#include __FILE__
}  // namespace avx512
}  // namespace sk_cpu
}  // namespace onepass
#undef ONEPASS_SK_VEC_BYTES
#undef ONEPASS_SK_FWD_RI
#undef ONEPASS_SK_FWD_RJ
#undef ONEPASS_SK_BWD_RI
#undef ONEPASS_SK_BWD_RV
#pragma GCC pop_options
#endif
#undef ONEPASS_SK_BODY

namespace onepass {
namespace sk_cpu {
namespace {

enum class Isa { kBase, kAvx2, kAvx512 };

Isa isa() {
#ifdef ONEPASS_SK_X86
  static const Isa best = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
                              ? Isa::kAvx512
                              : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::kAvx2
                                                                                                   : Isa::kBase;
  return best;
#else
  return Isa::kBase;
#endif
}

template <typename In, typename Acc>
void cost_typed(std::uintptr_t a, std::uintptr_t b, std::uintptr_t lse_a, std::uintptr_t lse_b,
                std::uintptr_t out, int64_t N, int64_t V, int64_t G, double inv_temp) {
  const auto* ap = reinterpret_cast<const In*>(a);
  const auto* bp = reinterpret_cast<const In*>(b);
  const auto* la = reinterpret_cast<const Acc*>(lse_a);
  const auto* lb = reinterpret_cast<const Acc*>(lse_b);
  auto* o = reinterpret_cast<Acc*>(out);
  switch (isa()) {
#ifdef ONEPASS_SK_X86
    case Isa::kAvx512: return avx512::l1_cost<In, Acc>(ap, bp, la, lb, o, N, V, G, static_cast<Acc>(inv_temp));
    case Isa::kAvx2: return avx2::l1_cost<In, Acc>(ap, bp, la, lb, o, N, V, G, static_cast<Acc>(inv_temp));
#endif
    default: return base::l1_cost<In, Acc>(ap, bp, la, lb, o, N, V, G, static_cast<Acc>(inv_temp));
  }
}

template <typename In, typename Acc>
void grads_typed(std::uintptr_t a, std::uintptr_t b, std::uintptr_t lse_a, std::uintptr_t lse_b, std::uintptr_t gm,
                 std::uintptr_t sa, std::uintptr_t sb, std::uintptr_t grad_a, std::uintptr_t grad_b, int64_t N,
                 int64_t V, int64_t G, double inv_temp) {
  const auto* ap = reinterpret_cast<const In*>(a);
  const auto* bp = reinterpret_cast<const In*>(b);
  const auto* la = reinterpret_cast<const Acc*>(lse_a);
  const auto* lb = reinterpret_cast<const Acc*>(lse_b);
  const auto* g = reinterpret_cast<const Acc*>(gm);
  const auto* sap = reinterpret_cast<const Acc*>(sa);
  const auto* sbp = reinterpret_cast<const Acc*>(sb);
  auto* ga = reinterpret_cast<In*>(grad_a);
  auto* gb = reinterpret_cast<In*>(grad_b);
  const Acc it = static_cast<Acc>(inv_temp);
  switch (isa()) {
#ifdef ONEPASS_SK_X86
    case Isa::kAvx512: return avx512::l1_grads<In, Acc>(ap, bp, la, lb, g, sap, sbp, ga, gb, N, V, G, it);
    case Isa::kAvx2: return avx2::l1_grads<In, Acc>(ap, bp, la, lb, g, sap, sbp, ga, gb, N, V, G, it);
#endif
    default: return base::l1_grads<In, Acc>(ap, bp, la, lb, g, sap, sbp, ga, gb, N, V, G, it);
  }
}

void check_sizes(const char* name, int64_t N, int64_t V, int64_t G, double inv_temp) {
  if (N < 0 || V < 1) throw std::invalid_argument(std::string(name) + ": need n >= 0 rows and v >= 1 entries");
  if (G <= 0) throw std::invalid_argument(std::string(name) + ": group size must be >= 1");
  if (!(std::isfinite(inv_temp) && inv_temp > 0.0))
    throw std::invalid_argument(std::string(name) + ": inv_temp must be finite and > 0");
}

void sinkhorn_l1_cost(std::uintptr_t a, std::uintptr_t b, std::uintptr_t lse_a, std::uintptr_t lse_b,
                      std::uintptr_t out, int64_t N, int64_t V, int64_t G, double inv_temp, int dtype) {
  check_sizes("sinkhorn_l1_cost", N, V, G, inv_temp);
  if (N == 0) return;
  switch (dtype) {
    case kFloat32: return cost_typed<float, float>(a, b, lse_a, lse_b, out, N, V, G, inv_temp);
    case kFloat16: return cost_typed<F16, float>(a, b, lse_a, lse_b, out, N, V, G, inv_temp);
    case kBFloat16: return cost_typed<BF16, float>(a, b, lse_a, lse_b, out, N, V, G, inv_temp);
    case kFloat64: return cost_typed<double, double>(a, b, lse_a, lse_b, out, N, V, G, inv_temp);
    default: throw std::invalid_argument("sinkhorn_l1_cost: unknown dtype code");
  }
}

void sinkhorn_l1_grads(std::uintptr_t a, std::uintptr_t b, std::uintptr_t lse_a, std::uintptr_t lse_b,
                       std::uintptr_t gm, std::uintptr_t sa, std::uintptr_t sb, std::uintptr_t grad_a,
                       std::uintptr_t grad_b, int64_t N, int64_t V, int64_t G, double inv_temp, int dtype) {
  check_sizes("sinkhorn_l1_grads", N, V, G, inv_temp);
  if (N == 0 || (grad_a == 0 && grad_b == 0)) return;
#define ONEPASS_SK_GRADS(In, Acc) grads_typed<In, Acc>(a, b, lse_a, lse_b, gm, sa, sb, grad_a, grad_b, N, V, G, inv_temp)
  switch (dtype) {
    case kFloat32: ONEPASS_SK_GRADS(float, float); return;
    case kFloat16: ONEPASS_SK_GRADS(F16, float); return;
    case kBFloat16: ONEPASS_SK_GRADS(BF16, float); return;
    case kFloat64: ONEPASS_SK_GRADS(double, double); return;
    default: throw std::invalid_argument("sinkhorn_l1_grads: unknown dtype code");
  }
#undef ONEPASS_SK_GRADS
}

void sinkhorn_register(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("sinkhorn_l1_cost", &sinkhorn_l1_cost, py::arg("a"), py::arg("b"), py::arg("lse_a"), py::arg("lse_b"),
        py::arg("out"), py::arg("n"), py::arg("v"), py::arg("group_size"), py::arg("inv_temp"), py::arg("dtype"),
        py::call_guard<py::gil_scoped_release>(),
        "Banded L1 cost (C, A, B planes [3, N, G]) of softmax(a/T) vs softmax(b/T) rows, per group.");
  m.def("sinkhorn_l1_grads", &sinkhorn_l1_grads, py::arg("a"), py::arg("b"), py::arg("lse_a"), py::arg("lse_b"),
        py::arg("gm"), py::arg("sa"), py::arg("sb"), py::arg("grad_a"), py::arg("grad_b"), py::arg("n"), py::arg("v"),
        py::arg("group_size"), py::arg("inv_temp"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>(),
        "Gradients of sum gm * C_l1 w.r.t. both logits in one sweep (a null grad pointer skips that side), "
        "written in the input dtype.");
}

}  // namespace

ONEPASS_REGISTER(sinkhorn_register);

}  // namespace sk_cpu
}  // namespace onepass

#else  // ONEPASS_SK_BODY: the kernels, compiled once per target (see the top of the file)

#define SK_INLINE static inline __attribute__((always_inline))

constexpr int kVecBytes = ONEPASS_SK_VEC_BYTES;
constexpr int kFwdRI = ONEPASS_SK_FWD_RI, kFwdRJ = ONEPASS_SK_FWD_RJ;
constexpr int kBwdRI = ONEPASS_SK_BWD_RI, kBwdRV = ONEPASS_SK_BWD_RV;

// Vec<A>::V: kVecBytes of A (W lanes); Vec<A>::M: the same lanes as integers (comparison results, bits).
template <typename A>
struct Vec;
template <>
struct Vec<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t M __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 4;
  static constexpr int32_t kAbs = 0x7fffffff;
};
template <>
struct Vec<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t M __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
  static constexpr int64_t kAbs = 0x7fffffffffffffffLL;
};

template <typename A>
SK_INLINE typename Vec<A>::V vload(const A* p) {
  typename Vec<A>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename A>
SK_INLINE void vstore(A* p, typename Vec<A>::V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename A>
SK_INLINE typename Vec<A>::V vsplat(A x) {
  return typename Vec<A>::V{} + x;
}
template <typename A>
SK_INLINE typename Vec<A>::V vabs(typename Vec<A>::V x) {
  return (typename Vec<A>::V)((typename Vec<A>::M)x & Vec<A>::kAbs);
}
// w sign(d) lane-wise, 0 where d = 0.
template <typename A>
SK_INLINE typename Vec<A>::V signed_weight(typename Vec<A>::V d, typename Vec<A>::V w) {
  const typename Vec<A>::V zero{};
  return (d > zero ? w : zero) - (d < zero ? w : zero);
}

// In-place exp of n floats, vectorizable: Cody-Waite reduction + degree-7 Taylor on |r| <= ln2/2
// (relative error < 1e-7); exp(x) = 0 for x < -87.3 (results below FLT_MIN flush to 0), exp(-inf) = 0.
// Plain selects only (no std::min / std::floor calls, which are not inlined here and stop vectorization).
SK_INLINE void exp_inplace(float* x, int64_t n) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k];
    float t = v < -87.3f ? -87.3f : v;
    t = t > 88.7f ? 88.7f : t;
    const float shifted = t * 1.44269504088896341f + magic;
    const float kf = shifted - magic;  // round(t / ln 2)
    int32_t ki;
    std::memcpy(&ki, &shifted, 4);
    ki -= 0x4b400000;  // the bits of magic
    const float r = (t - kf * 0.693145751953125f) - kf * 1.428606765330187045e-06f;
    float y = 1.0f / 5040.0f;
    y = y * r + 1.0f / 720.0f;
    y = y * r + 1.0f / 120.0f;
    y = y * r + 1.0f / 24.0f;
    y = y * r + 1.0f / 6.0f;
    y = y * r + 0.5f;
    y = y * r + 1.0f;
    y = y * r + 1.0f;
    const int32_t bits = (ki + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    x[k] = v < -87.3f ? 0.0f : y * scale;
  }
}
SK_INLINE void exp_inplace(double* x, int64_t n) {
  for (int64_t k = 0; k < n; ++k) x[k] = std::exp(x[k]);
}

// Probabilities exp(z_rv / T - lse_r) of row r, entries [v0, v0 + vc), into out[0, vc).
template <typename In, typename Acc>
SK_INLINE void probs_row(const In* z, const Acc* lse, int64_t r, int64_t V, int64_t v0, int64_t vc, Acc inv_temp,
                         Acc* out) {
  const In* row = z + r * V + v0;
  const Acc l = lse[r];
  for (int64_t v = 0; v < vc; ++v) out[v] = load_acc(row, v) * inv_temp - l;
  exp_inplace(out, vc);
}

// ---------------------------------------------------------------- forward
// C and A sums of kFwdRI student rows (p rows at stride ldp) against kFwdRJ * W teacher rows (q^T at
// stride ldq, lanes = teacher rows) over vc vocab entries, added into c_out / a_out rows (stride G) for
// the ni valid rows and nj valid teacher rows.
template <typename A>
SK_INLINE void fwd_tile(const A* p, int64_t ldp, const A* qt, int64_t ldq, int64_t vc, A* c_out, A* a_out,
                        int64_t G, int64_t ni, int64_t nj) {
  using V = typename Vec<A>::V;
  constexpr int W = Vec<A>::W;
  V c[kFwdRI][kFwdRJ], s[kFwdRI][kFwdRJ];
  for (int ri = 0; ri < kFwdRI; ++ri)
    for (int rj = 0; rj < kFwdRJ; ++rj) c[ri][rj] = s[ri][rj] = V{};
  for (int64_t v = 0; v < vc; ++v) {
    V q[kFwdRJ];
    for (int rj = 0; rj < kFwdRJ; ++rj) q[rj] = vload(qt + v * ldq + rj * W);
    for (int ri = 0; ri < kFwdRI; ++ri) {
      const V pv = vsplat(p[ri * ldp + v]);
      for (int rj = 0; rj < kFwdRJ; ++rj) {
        const V d = pv - q[rj];
        c[ri][rj] += vabs<A>(d);
        s[ri][rj] += signed_weight<A>(d, pv);
      }
    }
  }
  for (int64_t ri = 0; ri < std::min<int64_t>(ni, kFwdRI); ++ri)
    for (int rj = 0; rj < kFwdRJ; ++rj)
      for (int w = 0; w < W; ++w) {
        const int64_t j = rj * W + w;
        if (j < nj) {
          c_out[ri * G + j] += c[ri][rj][w];
          a_out[ri * G + j] += s[ri][rj][w];
        }
      }
}

template <typename In, typename Acc>
void l1_cost(const In* a, const In* b, const Acc* lse_a, const Acc* lse_b, Acc* out, int64_t N, int64_t V,
             int64_t G, Acc inv_temp) {
  constexpr int W = Vec<Acc>::W;
  constexpr int64_t kLanes = kFwdRJ * W;
  const FwdSplit sp = fwd_split(N, V, G, kFwdRI, kLanes);
  const int64_t groups = (N + G - 1) / G;
  const int64_t tasks = groups * sp.row_blocks * sp.slices;
  const int64_t plane = N * G;
  // Slice 0 accumulates into out (planes C, A); slice s >= 1 into partial[s - 1] (2 planes each).
  std::vector<Acc> partial(static_cast<size_t>((sp.slices - 1) * 2 * plane));
#pragma omp parallel
  {
    const int64_t gp = round_up(G, kLanes);
    const int64_t ldp = sp.chunk;
    std::vector<Acc> pbuf(static_cast<size_t>(round_up(sp.rows, kFwdRI) * ldp), Acc(0));
    std::vector<Acc> qt(static_cast<size_t>(sp.chunk * gp), Acc(0));
    std::vector<Acc> row(static_cast<size_t>(sp.chunk));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t slice = t % sp.slices;
      const int64_t block = (t / sp.slices) % sp.row_blocks;
      const int64_t gs = (t / sp.slices / sp.row_blocks) * G;
      const int64_t gn = std::min(G, N - gs);  // rows of this group
      const int64_t i0 = gs + block * sp.rows;
      const int64_t i1 = std::min(i0 + sp.rows, gs + gn);
      if (i0 >= i1) continue;
      Acc* c_out = slice == 0 ? out : partial.data() + (slice - 1) * 2 * plane;
      Acc* a_out = c_out + plane;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t jj = 0; jj < G; ++jj) c_out[i * G + jj] = a_out[i * G + jj] = Acc(0);
      // Rows of pbuf past i1 - i0 and columns of q^T past gn stay 0 (allocated zeroed, never written): they
      // only feed lanes that are not stored.
      const int64_t pad_rows = round_up(i1 - i0, kFwdRI);
      for (int64_t r = i1 - i0; r < pad_rows; ++r) std::fill_n(pbuf.data() + r * ldp, ldp, Acc(0));
      for (int64_t v = 0; v < sp.chunk; ++v) std::fill_n(qt.data() + v * gp + gn, gp - gn, Acc(0));
      const int64_t v_end = std::min(V, (slice + 1) * sp.slice_len);
      for (int64_t v0 = slice * sp.slice_len; v0 < v_end; v0 += sp.chunk) {
        const int64_t vc = std::min(sp.chunk, v_end - v0);
        for (int64_t i = i0; i < i1; ++i) probs_row<In, Acc>(a, lse_a, i, V, v0, vc, inv_temp, pbuf.data() + (i - i0) * ldp);
        for (int64_t jj = 0; jj < gn; ++jj) {
          probs_row<In, Acc>(b, lse_b, gs + jj, V, v0, vc, inv_temp, row.data());
          for (int64_t v = 0; v < vc; ++v) qt[v * gp + jj] = row[v];
        }
        for (int64_t ib = 0; ib < i1 - i0; ib += kFwdRI)
          for (int64_t j0 = 0; j0 < gn; j0 += kLanes)
            fwd_tile<Acc>(pbuf.data() + ib * ldp, ldp, qt.data() + j0, gp, vc, c_out + (i0 + ib) * G + j0,
                          a_out + (i0 + ib) * G + j0, G, i1 - i0 - ib, gn - j0);
      }
    }
    // Slices in a fixed order, then B = C - A (B_ij = sum_v q_jv sign(q_jv - p_iv) and
    // C = sum_v (p - q) sign(p - q)).
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      Acc* c = out + i * G;
      Acc* s = c + plane;
      for (int64_t k = 0; k + 1 < sp.slices; ++k) {
        const Acc* pc = partial.data() + k * 2 * plane + i * G;
        const Acc* ps = pc + plane;
        for (int64_t jj = 0; jj < G; ++jj) {
          c[jj] += pc[jj];
          s[jj] += ps[jj];
        }
      }
      for (int64_t jj = 0; jj < G; ++jj) c[jj + 2 * plane] = c[jj] - s[jj];
    }
  }
}

// ---------------------------------------------------------------- backward
// For kBwdRI rows i (p at stride ld, upstream g rows at stride G, zero rows past the group) and kBwdRV
// vectors of vocab entries: da_iv = sum_j g_ij sign(p_iv - q_jv) over the nj rows of q (stride ld) into
// da (stride ld); db_jv -= g_ij sign(p_iv - q_jv) accumulated into db (stride ld).
template <typename A, bool NEED_A, bool NEED_B>
SK_INLINE void bwd_tile(const A* p, const A* q, const A* g, int64_t G, int64_t ld, int64_t nj, A* da, A* db) {
  using V = typename Vec<A>::V;
  constexpr int W = Vec<A>::W;
  V pv[kBwdRI][kBwdRV], acc[kBwdRI][kBwdRV];
  for (int ri = 0; ri < kBwdRI; ++ri)
    for (int rv = 0; rv < kBwdRV; ++rv) {
      pv[ri][rv] = vload(p + ri * ld + rv * W);
      acc[ri][rv] = V{};
    }
  for (int64_t j = 0; j < nj; ++j) {
    V qv[kBwdRV], bv[kBwdRV];
    for (int rv = 0; rv < kBwdRV; ++rv) {
      qv[rv] = vload(q + j * ld + rv * W);
      bv[rv] = NEED_B ? vload(db + j * ld + rv * W) : V{};
    }
    for (int ri = 0; ri < kBwdRI; ++ri) {
      const V gv = vsplat(g[ri * G + j]);
      for (int rv = 0; rv < kBwdRV; ++rv) {
        const V t = signed_weight<A>(pv[ri][rv] - qv[rv], gv);
        if (NEED_A) acc[ri][rv] += t;
        if (NEED_B) bv[rv] -= t;
      }
    }
    if (NEED_B)
      for (int rv = 0; rv < kBwdRV; ++rv) vstore(db + j * ld + rv * W, bv[rv]);
  }
  if (NEED_A)
    for (int ri = 0; ri < kBwdRI; ++ri)
      for (int rv = 0; rv < kBwdRV; ++rv) vstore(da + ri * ld + rv * W, acc[ri][rv]);
}

template <typename In, typename Acc, bool NEED_A, bool NEED_B>
void l1_grads_impl(const In* a, const In* b, const Acc* lse_a, const Acc* lse_b, const Acc* gm, const Acc* sa,
                   const Acc* sb, In* grad_a, In* grad_b, int64_t N, int64_t V, int64_t G, Acc inv_temp) {
  constexpr int64_t kEntries = kBwdRV * Vec<Acc>::W;
  // p, q, dL/dp, dL/dq of one chunk of a group in ~256 KiB (fp32).
  const int64_t chunk = std::clamp<int64_t>((16384 / G) / kEntries * kEntries, kEntries, 1024);
  const int64_t gr = round_up(G, kBwdRI);  // rows of the padded buffers
  const int64_t chunks = (V + chunk - 1) / chunk;
  const int64_t groups = (N + G - 1) / G;
#pragma omp parallel
  {
    std::vector<Acc> pbuf(static_cast<size_t>(gr * chunk), Acc(0)), qbuf(static_cast<size_t>(G * chunk), Acc(0));
    std::vector<Acc> da(static_cast<size_t>(gr * chunk)), db(static_cast<size_t>(G * chunk));
    std::vector<Acc> gpad(static_cast<size_t>(gr * G), Acc(0));  // the group's g rows, zero rows past the group
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < groups * chunks; ++t) {
      const int64_t gs = (t / chunks) * G;
      const int64_t gn = std::min(G, N - gs);
      const int64_t v0 = (t % chunks) * chunk;
      const int64_t vc = std::min(chunk, V - v0);
      std::fill(gpad.begin(), gpad.end(), Acc(0));
      for (int64_t i = 0; i < gn; ++i) std::copy_n(gm + (gs + i) * G, gn, gpad.data() + i * G);
      // Entries past vc (and rows past gn) of p and q are 0: sign(0 - 0) = 0 adds nothing.
      for (int64_t r = 0; r < gr; ++r) {
        Acc* pr = pbuf.data() + r * chunk;
        if (r < gn) {
          probs_row<In, Acc>(a, lse_a, gs + r, V, v0, vc, inv_temp, pr);
          probs_row<In, Acc>(b, lse_b, gs + r, V, v0, vc, inv_temp, qbuf.data() + r * chunk);
          std::fill(pr + vc, pr + chunk, Acc(0));
          std::fill(qbuf.data() + r * chunk + vc, qbuf.data() + (r + 1) * chunk, Acc(0));
        } else {
          std::fill_n(pr, chunk, Acc(0));
        }
      }
      if (NEED_B) std::fill(db.begin(), db.end(), Acc(0));
      const int64_t vpad = round_up(vc, kEntries);
      for (int64_t i0 = 0; i0 < gn; i0 += kBwdRI)
        for (int64_t e0 = 0; e0 < vpad; e0 += kEntries)
          bwd_tile<Acc, NEED_A, NEED_B>(pbuf.data() + i0 * chunk + e0, qbuf.data() + e0, gpad.data() + i0 * G, G,
                                        chunk, gn, da.data() + i0 * chunk + e0, db.data() + e0);
      for (int64_t r = 0; r < gn; ++r) {
        const int64_t row = gs + r;
        if (NEED_A) {
          const Acc* pr = pbuf.data() + r * chunk;
          const Acc* dr = da.data() + r * chunk;
          const Acc s = sa[row];
          for (int64_t v = 0; v < vc; ++v) store_acc(grad_a + row * V + v0, v, pr[v] * (dr[v] - s) * inv_temp);
        }
        if (NEED_B) {
          const Acc* qr = qbuf.data() + r * chunk;
          const Acc* dr = db.data() + r * chunk;
          const Acc s = sb[row];
          for (int64_t v = 0; v < vc; ++v) store_acc(grad_b + row * V + v0, v, qr[v] * (dr[v] - s) * inv_temp);
        }
      }
    }
  }
}

template <typename In, typename Acc>
void l1_grads(const In* a, const In* b, const Acc* lse_a, const Acc* lse_b, const Acc* gm, const Acc* sa,
              const Acc* sb, In* grad_a, In* grad_b, int64_t N, int64_t V, int64_t G, Acc inv_temp) {
  if (grad_a && grad_b)
    l1_grads_impl<In, Acc, true, true>(a, b, lse_a, lse_b, gm, sa, sb, grad_a, grad_b, N, V, G, inv_temp);
  else if (grad_a)
    l1_grads_impl<In, Acc, true, false>(a, b, lse_a, lse_b, gm, sa, sb, grad_a, grad_b, N, V, G, inv_temp);
  else
    l1_grads_impl<In, Acc, false, true>(a, b, lse_a, lse_b, gm, sa, sb, grad_a, grad_b, N, V, G, inv_temp);
}

#undef SK_INLINE

#endif  // ONEPASS_SK_BODY
