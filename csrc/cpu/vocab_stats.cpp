// CPU (C++17 + OpenMP) implementation of the vocab-stats kernels (docs/vocab_stats.md).
//
// Forward: per row, sweep 1 (online log-sum-exp over blocks of the vocabulary, with the entropy and
// the reverse/forward-KL sums), then for kinds 3..7 sweep 2 (the phi sums once lse_a/lse_b are known).
// Backward: one recompute sweep writing dL/da and dL/db.
//
// One row per OpenMP thread; the vocabulary is processed in blocks of kBlock entries that are first
// converted to the accumulation type, so that the inner loops vectorize (`#pragma omp simd`).  For
// fp32/fp16/bf16 inputs the per-entry math is float with vectorizable Cephes-style exp/log (~1 ulp)
// and Kahan-style expm1/log1p; per-row accumulators are double.  For fp64 inputs everything is double
// with the libm functions.
//
// The kernel body (between the ONEPASS_VS_BODY guards) is compiled twice, into namespaces `base`
// (the default target) and `avx2` (`#pragma GCC target("avx2,fma,f16c")`); the entry points pick one
// at run time.
#ifndef ONEPASS_VS_BODY
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "common.h"
#include "registry.h"

#define OP_INLINE static inline __attribute__((always_inline))

// The selects (`c ? x : y`) on float comparisons of the inner loops are only if-converted, hence
// vectorized, when comparisons may be assumed not to trap.  Affects only the FP-exception flags.
#pragma GCC optimize("no-trapping-math")

namespace onepass {
namespace vs_cpu {

struct f16_t {
  uint16_t x;
};
struct bf16_t {
  uint16_t x;
};

// One model's logit map (docs/vocab_stats.md): x = inv_temp * l, or with a soft-cap c > 0
// x = post * tanh(pre * l) with pre = 1 / c, post = inv_temp * c (inv_post = 1 / post).
template <class A>
struct LogitMap {
  A inv_temp, pre, post, inv_post;
  bool capped;
};

// Scalar parameters of one launch.
template <class A>
struct Params {
  LogitMap<A> map_a, map_b;
  A beta, alpha;
  // kind 3: log(beta), (1-beta)/beta, log(1-beta), beta/(1-beta); kind 7: 1/(1-alpha), 1/alpha
  A log_w1, r_w1, log_w2, r_w2, omb;
  // kind 7: c1 = 1 - alpha, c2 = alpha (rounded from double), inv_c1 = 1 / c1, inv_c2 = 1 / c2
  A c1, c2, inv_c1, inv_c2;
};

}  // namespace vs_cpu
}  // namespace onepass

#define ONEPASS_VS_BODY 1
namespace onepass {
namespace vs_cpu {
namespace base {
#include __FILE__
}  // namespace base
}  // namespace vs_cpu
}  // namespace onepass

#if defined(__x86_64__) || defined(__i386__)
#define ONEPASS_VS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace onepass {
namespace vs_cpu {
namespace avx2 {
#include __FILE__
}  // namespace avx2
}  // namespace vs_cpu
}  // namespace onepass
#pragma GCC pop_options
#endif
#undef ONEPASS_VS_BODY

namespace onepass {
namespace vs_cpu {
namespace {

namespace py = pybind11;

bool use_avx2() {
#ifdef ONEPASS_VS_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

template <class A>
LogitMap<A> make_map(double inv_temp, double softcap, const char* name) {
  if (!(std::isfinite(inv_temp) && inv_temp > 0.0))
    throw std::invalid_argument(std::string("vocab_stats (cpu): inv_temp_") + name + " must be finite and > 0, got " +
                                std::to_string(inv_temp));
  if (!(std::isfinite(softcap) && softcap >= 0.0))
    throw std::invalid_argument(std::string("vocab_stats (cpu): softcap_") + name +
                                " must be finite and >= 0 (0 = no cap), got " + std::to_string(softcap));
  LogitMap<A> m{};
  m.inv_temp = static_cast<A>(inv_temp);
  m.capped = softcap > 0.0;
  if (m.capped) {
    m.pre = static_cast<A>(1.0 / softcap);
    m.post = static_cast<A>(inv_temp * softcap);
    m.inv_post = static_cast<A>(1.0 / (inv_temp * softcap));
  }
  return m;
}

template <class A>
Params<A> make_params(double inv_temp_a, double softcap_a, double inv_temp_b, double softcap_b, int kind,
                      double beta, double alpha) {
  Params<A> P{};
  P.map_a = make_map<A>(inv_temp_a, softcap_a, "a");
  P.map_b = make_map<A>(inv_temp_b, softcap_b, "b");
  P.beta = static_cast<A>(beta);
  P.alpha = static_cast<A>(alpha);
  if (kind == kJSD) {
    if (!(beta > 0.0 && beta < 1.0))
      throw std::invalid_argument("vocab_stats (cpu): jsd needs 0 < beta < 1, got " + std::to_string(beta));
    P.log_w1 = static_cast<A>(std::log(beta));
    P.r_w1 = static_cast<A>((1.0 - beta) / beta);
    P.log_w2 = static_cast<A>(std::log1p(-beta));
    P.r_w2 = static_cast<A>(beta / (1.0 - beta));
    P.omb = static_cast<A>(1.0 - beta);
  }
  if (kind == kAlpha) {
    if (alpha == 0.0 || alpha == 1.0 || !std::isfinite(alpha))
      throw std::invalid_argument("vocab_stats (cpu): alpha divergence needs finite alpha not in {0, 1}, got " +
                                  std::to_string(alpha));
    P.c1 = static_cast<A>(1.0 - alpha);
    P.c2 = static_cast<A>(alpha);
    P.inv_c1 = static_cast<A>(1.0 / (1.0 - alpha));
    P.inv_c2 = static_cast<A>(1.0 / alpha);
  }
  return P;
}

void check_kind_dtype(int kind, int dtype) {
  if (!valid_kind(kind))
    throw std::invalid_argument("vocab_stats (cpu): bad kind " + std::to_string(kind) + " (expected 0.." +
                                std::to_string(kNumKinds - 1) + ")");
  if (dtype < kFloat32 || dtype > kFloat64)
    throw std::invalid_argument("vocab_stats (cpu): bad dtype code " + std::to_string(dtype) + " (expected 0..3)");
}

template <class T, class A>
void fwd_typed(uintptr_t a, uintptr_t b, uintptr_t tg, uintptr_t st, int64_t N, int64_t V, const Params<A>& P,
               int kind, bool need_entropy) {
  const T* ap = reinterpret_cast<const T*>(a);
  const T* bp = reinterpret_cast<const T*>(b);
  const int64_t* tp = reinterpret_cast<const int64_t*>(tg);
  A* sp = reinterpret_cast<A*>(st);
#ifdef ONEPASS_VS_HAVE_AVX2
  if (use_avx2()) return avx2::fwd<T, A>(ap, bp, tp, sp, N, V, P, kind, need_entropy);
#endif
  base::fwd<T, A>(ap, bp, tp, sp, N, V, P, kind, need_entropy);
}

template <class T, class A>
void bwd_typed(uintptr_t a, uintptr_t b, uintptr_t tg, uintptr_t st, uintptr_t gr, uintptr_t ga, uintptr_t gb,
               int64_t N, int64_t V, const Params<A>& P, int kind) {
  const T* ap = reinterpret_cast<const T*>(a);
  const T* bp = reinterpret_cast<const T*>(b);
  const int64_t* tp = reinterpret_cast<const int64_t*>(tg);
  const A* sp = reinterpret_cast<const A*>(st);
  const A* gp = reinterpret_cast<const A*>(gr);
  T* gap = reinterpret_cast<T*>(ga);
  T* gbp = reinterpret_cast<T*>(gb);
#ifdef ONEPASS_VS_HAVE_AVX2
  if (use_avx2()) return avx2::bwd<T, A>(ap, bp, tp, sp, gp, gap, gbp, N, V, P, kind);
#endif
  base::bwd<T, A>(ap, bp, tp, sp, gp, gap, gbp, N, V, P, kind);
}

void vocab_stats_fwd_cpu(uintptr_t a, uintptr_t b, uintptr_t targets, uintptr_t stats, int64_t N, int64_t V,
                         int dtype, double inv_temp_a, double softcap_a, double inv_temp_b, double softcap_b,
                         int kind, double beta, double alpha, bool need_entropy) {
  check_kind_dtype(kind, dtype);
  if (N < 0 || V < 0) throw std::invalid_argument("vocab_stats_fwd_cpu: negative size");
  if (a == 0 || stats == 0) throw std::invalid_argument("vocab_stats_fwd_cpu: a and stats are required");
  if (kind != kNone && b == 0) throw std::invalid_argument("vocab_stats_fwd_cpu: a divergence kind needs b");
  if (N == 0) return;
  if (dtype == kFloat64) {
    auto P = make_params<double>(inv_temp_a, softcap_a, inv_temp_b, softcap_b, kind, beta, alpha);
    py::gil_scoped_release nogil;
    fwd_typed<double, double>(a, b, targets, stats, N, V, P, kind, need_entropy);
    return;
  }
  auto P = make_params<float>(inv_temp_a, softcap_a, inv_temp_b, softcap_b, kind, beta, alpha);
  py::gil_scoped_release nogil;
  switch (dtype) {
    case kFloat32: fwd_typed<float, float>(a, b, targets, stats, N, V, P, kind, need_entropy); break;
    case kFloat16: fwd_typed<f16_t, float>(a, b, targets, stats, N, V, P, kind, need_entropy); break;
    default: fwd_typed<bf16_t, float>(a, b, targets, stats, N, V, P, kind, need_entropy); break;
  }
}

void vocab_stats_bwd_cpu(uintptr_t a, uintptr_t b, uintptr_t targets, uintptr_t stats, uintptr_t grads,
                         uintptr_t grad_a, uintptr_t grad_b, int64_t N, int64_t V, int dtype, double inv_temp_a,
                         double softcap_a, double inv_temp_b, double softcap_b, int kind, double beta, double alpha) {
  check_kind_dtype(kind, dtype);
  if (N < 0 || V < 0) throw std::invalid_argument("vocab_stats_bwd_cpu: negative size");
  if (a == 0 || stats == 0 || grads == 0)
    throw std::invalid_argument("vocab_stats_bwd_cpu: a, stats and grads are required");
  if ((kind != kNone || grad_b != 0) && b == 0)
    throw std::invalid_argument("vocab_stats_bwd_cpu: a divergence kind or grad_b needs b");
  if (N == 0 || (grad_a == 0 && grad_b == 0)) return;
  if (dtype == kFloat64) {
    auto P = make_params<double>(inv_temp_a, softcap_a, inv_temp_b, softcap_b, kind, beta, alpha);
    py::gil_scoped_release nogil;
    bwd_typed<double, double>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind);
    return;
  }
  auto P = make_params<float>(inv_temp_a, softcap_a, inv_temp_b, softcap_b, kind, beta, alpha);
  py::gil_scoped_release nogil;
  switch (dtype) {
    case kFloat32: bwd_typed<float, float>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind); break;
    case kFloat16: bwd_typed<f16_t, float>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind); break;
    default: bwd_typed<bf16_t, float>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind); break;
  }
}

void register_vocab_stats_cpu(py::module_& m) {
  m.def("vocab_stats_fwd_cpu", &vocab_stats_fwd_cpu, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("targets_ptr"),
        py::arg("stats_ptr"), py::arg("N"), py::arg("V"), py::arg("dtype"), py::arg("inv_temp_a"),
        py::arg("softcap_a"), py::arg("inv_temp_b"), py::arg("softcap_b"), py::arg("kind"), py::arg("beta"),
        py::arg("alpha"), py::arg("need_entropy"),
        "Vocab-stats forward on CPU: writes stats[N, 8] (docs/vocab_stats.md). Pointers are raw addresses "
        "(0 = absent); dtype is the code of csrc/common.h.");
  m.def("vocab_stats_bwd_cpu", &vocab_stats_bwd_cpu, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("targets_ptr"),
        py::arg("stats_ptr"), py::arg("grads_ptr"), py::arg("grad_a_ptr"), py::arg("grad_b_ptr"), py::arg("N"),
        py::arg("V"), py::arg("dtype"), py::arg("inv_temp_a"), py::arg("softcap_a"), py::arg("inv_temp_b"),
        py::arg("softcap_b"), py::arg("kind"), py::arg("beta"), py::arg("alpha"),
        "Vocab-stats backward on CPU: writes grad_a / grad_b [N, V] (0 = not written).");
}

}  // namespace

ONEPASS_REGISTER(register_vocab_stats_cpu);

}  // namespace vs_cpu
}  // namespace onepass

#else  // ONEPASS_VS_BODY: the kernels, compiled once per target (see the top of the file)

constexpr int64_t kBlock = 64;

// ---------------------------------------------------------------- bit helpers, conversions
OP_INLINE float as_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
OP_INLINE uint32_t as_u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

OP_INLINE float to_acc(float x) { return x; }
OP_INLINE double to_acc(double x) { return x; }
OP_INLINE float to_acc(bf16_t h) { return as_f(static_cast<uint32_t>(h.x) << 16); }
OP_INLINE float to_acc(f16_t h) {
  const uint32_t hx = h.x;
  const uint32_t em = (hx & 0x7fffu) << 13;
  const uint32_t sign = (hx & 0x8000u) << 16;
  float f = as_f(em) * 0x1p112f;  // normals and subnormals
  uint32_t u = as_u(f);
  u = em >= (0x7c00u << 13) ? (em | 0x7f800000u) : u;  // inf / nan
  return as_f(u | sign);
}

OP_INLINE void store(float& o, float f) { o = f; }
OP_INLINE void store(double& o, double f) { o = f; }
OP_INLINE void store(bf16_t& o, float f) {
  const uint32_t u = as_u(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (u & 0x7fffffffu) > 0x7f800000u ? ((u >> 16) | 0x40u) : r;  // quiet NaN
  o.x = static_cast<uint16_t>(r);
}
OP_INLINE void store(f16_t& o, float f) {
  // Round-to-nearest-even float -> half (F. Giesen's float_to_half_fast3_rtne, branch-free).
  uint32_t u = as_u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t nrm = (u + 0xc8000fffu + mant_odd) >> 13;
  const uint32_t den = as_u(as_f(u) + 0.5f) - 0x3f000000u;
  const uint32_t infnan = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  const uint32_t o16 = u >= 0x47800000u ? infnan : (u < 0x38800000u ? den : nrm);
  o.x = static_cast<uint16_t>(o16 | sign);
}

// ---------------------------------------------------------------- math: float (vectorizable) / double (libm)
OP_INLINE float vexp(float x) {
  // Cephes expf: exp(x) = 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial; ~1 ulp.
  const float lo = -104.0f, hi = 88.72283f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: round-to-nearest via the mantissa
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float t = xc * 1.44269504088896341f + magic;
  const int32_t n = static_cast<int32_t>(as_u(t) - as_u(magic));
  const float fx = t - magic;
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const int32_t n1 = n >> 1, n2 = n - n1;  // 2^n = 2^n1 * 2^n2, n in [-150, 128]
  float res = y * as_f(static_cast<uint32_t>(n1 + 127) << 23) * as_f(static_cast<uint32_t>(n2 + 127) << 23);
  res = x < lo ? 0.0f : res;
  res = x > hi ? std::numeric_limits<float>::infinity() : res;
  return res;  // NaN in -> NaN out (the polynomial of NaN)
}
OP_INLINE double vexp(double x) { return std::exp(x); }

OP_INLINE float vlog(float x) {
  // Cephes logf; log(0) = -inf, log(<0) = NaN, log(inf) = inf, NaN -> NaN.
  const float inf = std::numeric_limits<float>::infinity();
  const bool sub = x < 1.17549435e-38f;
  const float xs = sub ? x * 8388608.0f : x;  // scale subnormals by 2^23
  const uint32_t u = as_u(xs);
  float e = static_cast<float>(static_cast<int32_t>((u >> 23) & 0xffu) - 126) - (sub ? 23.0f : 0.0f);
  float m = as_f((u & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  const float f = small ? (m + m - 1.0f) : (m - 1.0f);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  float res = f + y;
  res = res + e * 0.693359375f;
  res = x == 0.0f ? -inf : res;
  res = x < 0.0f ? std::numeric_limits<float>::quiet_NaN() : res;
  res = x == inf ? inf : res;
  res = x != x ? x : res;
  return res;
}
OP_INLINE double vlog(double x) { return std::log(x); }

OP_INLINE float vabs(float x) { return as_f(as_u(x) & 0x7fffffffu); }
OP_INLINE double vabs(double x) { return std::fabs(x); }

// expm1(x) given u = exp(x) (Kahan: x if u == 1, -1 if u - 1 == -1, else (u - 1) x / log(u)).
OP_INLINE float expm1_u(float x, float u) {
  const float um1 = u - 1.0f;
  float res = um1 * x / vlog(u);
  res = u == 1.0f ? x : res;
  res = um1 == -1.0f ? -1.0f : res;
  res = u == std::numeric_limits<float>::infinity() ? u : res;
  res = x != x ? x : res;
  return res;
}
OP_INLINE double expm1_u(double x, double) { return std::expm1(x); }
OP_INLINE float vexpm1(float x) { return expm1_u(x, vexp(x)); }
OP_INLINE double vexpm1(double x) { return std::expm1(x); }

// tanh(x) = -e / (2 + e) with e = expm1(-2|x|) in (-1, 0], signed: exact near 0, never inf / inf.
OP_INLINE float vtanh(float x) {
  const float e = vexpm1(-2.0f * vabs(x));
  const float t = -e / (2.0f + e);
  return as_f(as_u(t) | (as_u(x) & 0x80000000u));
}
OP_INLINE double vtanh(double x) { return std::tanh(x); }

OP_INLINE float vlog1p(float x) {
  // Kahan: u = 1 + x; x if u == 1 else log(u) x / (u - 1).
  const float u = 1.0f + x;
  float res = vlog(u) * x / (u - 1.0f);
  res = u == 1.0f ? x : res;
  res = u == std::numeric_limits<float>::infinity() ? u : res;
  res = u == 0.0f ? -std::numeric_limits<float>::infinity() : res;
  res = x != x ? x : res;
  return res;
}
OP_INLINE double vlog1p(double x) { return std::log1p(x); }

template <class A>
OP_INLINE A vmax(A a, A b) {
  return a < b ? b : a;
}

// (J(x, w1), J(-x, w2)) with J(x, w) = log(w e^x + 1 - w), w2 = 1 - w1; log_w = log(w), r = (1 - w) / w.
// J(x, w) = log1p(w expm1(x)) for x <= 0, x + log(w) + log1p(r e^{-x}) for x > 0; both J share
// u = e^{-|x|} and expm1(-|x|).
template <class A>
OP_INLINE void J2fun(A x, A w1, A log_w1, A r1, A w2, A log_w2, A r2, A& j1, A& j2) {
  const A ax = vabs(x);
  const A y = -ax;
  const A u = vexp(y);
  const A em = expm1_u(y, u);
  const bool pos = x > A(0);
  // j1 = J(x, w1): x <= 0 -> log1p(w1 em); x > 0 -> x + log w1 + log1p(r1 u)
  const A a1 = pos ? r1 * u : w1 * em;
  const A l1 = vlog1p(a1);
  j1 = pos ? x + log_w1 + l1 : l1;
  // j2 = J(-x, w2): -x <= 0 (x >= 0) -> log1p(w2 em); else -x + log w2 + log1p(r2 u)
  const bool neg = x < A(0);
  const A a2 = neg ? r2 * u : w2 * em;
  const A l2 = vlog1p(a2);
  j2 = neg ? -x + log_w2 + l2 : l2;
}

// G(base, lbase, x, c) = base (e^{c x} - 1) / c, 0 where lbase == -inf; inv_c = 1 / c (docs/vocab_stats.md).
template <class A>
OP_INLINE A Gfun(A base, A lbase, A x, A c, A inv_c) {
  const A cx = c * x;
  A g = base * vexpm1(cx);
  // cx > 1: base e^{cx} - base without cancellation, and no inf * tiny where e^{cx} overflows or base
  // underflows while e^{lbase + cx} does not.
  g = cx > A(1) ? vexp(lbase + cx) - base : g;
  g = g * inv_c;
  g = c == A(0) ? base * x : g;
  return lbase == -std::numeric_limits<A>::infinity() ? A(0) : g;
}

// phi, phi_a, phi_b of the table in docs/vocab_stats.md.
template <int KIND, class A>
OP_INLINE void phi_fn(A la, A lb, A p, A q, const Params<A>& P, A& phi, A& pa, A& pb) {
  const A zero(0);
  const A inf = std::numeric_limits<A>::infinity();
  if constexpr (KIND == kReverseKL) {
    pa = p == zero ? zero : p * (la - lb);
    pb = q - p;
    phi = pa;
  } else if constexpr (KIND == kForwardKL) {
    pb = q == zero ? zero : q * (lb - la);
    pa = p - q;
    phi = pb;
  } else if constexpr (KIND == kJSD) {
    // d_a = -J(lb - la, beta), d_b = -J(la - lb, 1 - beta)
    A j1, j2;
    J2fun(lb - la, P.beta, P.log_w1, P.r_w1, P.omb, P.log_w2, P.r_w2, j1, j2);
    const A da = -j1, db = -j2;
    pa = p == zero ? zero : P.omb * p * da;
    pb = q == zero ? zero : P.beta * q * db;
    phi = pa + pb;
  } else if constexpr (KIND == kTV) {
    const A s = A(p > q) - A(p < q);
    phi = A(0.5) * vabs(p - q);
    pa = A(0.5) * s * p;
    pb = A(-0.5) * s * q;
  } else if constexpr (KIND == kHellinger) {
    const A e1 = vexpm1(A(0.5) * (lb - la));
    // expm1(-h) = -expm1(h) / (expm1(h) + 1)
    const A e2 = e1 == inf ? A(-1) : -e1 / (e1 + A(1));
    A f = p >= q ? (p * e1) * e1 : (q * e2) * e2;
    phi = (p + q) == zero ? zero : f;  // p, q >= 0 (no &&: it blocks if-conversion)
    const A sq = vexp(A(0.5) * (la + lb));  // sqrt(p q): the form used where one side is > e times the other
    const A fa = (lb - la) > A(1) ? p - sq : -p * e1;
    const A fb = (la - lb) > A(1) ? q - sq : -q * e2;
    pa = p == zero ? zero : fa;
    pb = q == zero ? zero : fb;
  } else if constexpr (KIND == kChi2) {
    const A e = vexpm1(la - lb);
    const A r = vexp(A(2) * la - lb);  // p^2 / q, used where la - lb > 1 (no cancellation, no inf * tiny)
    const bool big = (la - lb) > A(1);
    const A f = big ? r - A(2) * p + q : (q * e) * e;
    const A fa = big ? A(2) * (r - p) : A(2) * p * e;
    const A fb = big ? q - r : -(p + q) * e;
    // q exactly 0 (lb = -inf), not an underflowed q: p^2/q may still be finite
    const A ninf = -inf;
    const A pinf = la == ninf ? zero : inf;
    const bool qz = lb == ninf;
    phi = qz ? pinf : f;
    pa = qz ? pinf : fa;
    pb = qz ? -pinf : fb;
  } else if constexpr (KIND == kAlpha) {
    const A ga = Gfun(p, la, lb - la, P.c1, P.inv_c1);
    const A gb = Gfun(q, lb, la - lb, P.c2, P.inv_c2);
    pa = -ga;
    pb = -gb;
    const A phi_hi = -(ga + p - q) / P.alpha;
    const A phi_lo = (gb - p + q) / (P.alpha - A(1));
    phi = P.alpha >= A(0.5) ? phi_hi : phi_lo;
  } else {
    phi = pa = pb = zero;
  }
}

// ---------------------------------------------------------------- block loading
// One raw logit through a model's map (capped: post * tanh(pre * l)).
template <class A>
OP_INLINE A map_logit(A l, const LogitMap<A>& m, bool capped) {
  return capped ? m.post * vtanh(l * m.pre) : l * m.inv_temp;
}

// Loads entries [v0, v0 + n) of row z, through the logit map m, into buf[0, kBlock), padding with -inf.
template <class T, class A>
OP_INLINE void load_block(const T* __restrict z, int64_t v0, int64_t n, const LogitMap<A>& m, A* __restrict buf) {
  if (m.capped) {
    for (int64_t i = n; i < kBlock; ++i) buf[i] = -std::numeric_limits<A>::infinity();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = map_logit(to_acc(z[v0 + i]), m, true);
  } else if (n == kBlock) {
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) buf[i] = map_logit(to_acc(z[v0 + i]), m, false);
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = map_logit(to_acc(z[v0 + i]), m, false);
    for (int64_t i = n; i < kBlock; ++i) buf[i] = -std::numeric_limits<A>::infinity();
  }
}

// dx/dl of a mapped logit x: inv_temp, or inv_temp * (1 - tanh^2) with tanh = x / post when capped.
template <class A>
OP_INLINE A map_slope(A x, const LogitMap<A>& m) {
  if (!m.capped) return m.inv_temp;
  const A t = x * m.inv_post;
  return m.inv_temp * (A(1) - t * t);
}

// Online accumulator of one side: m, s = sum e^{x - m}, t = sum e^{x - m} (x - m), k = kl sum.
struct Online {
  double m = -std::numeric_limits<double>::infinity();
  double s = 0.0, t = 0.0, k = 0.0;
  // Moves the reference to max(m, bm); returns false when everything so far is -inf.
  template <class A>
  inline __attribute__((always_inline)) bool update_max(double bm, const A* x) {
    if (!(bm > m)) {
      if (m != -std::numeric_limits<double>::infinity()) return true;
      // everything so far is -inf (or NaN, which the block max skips): keep a NaN in s
      for (int64_t i = 0; i < kBlock; ++i)
        if (x[i] != x[i]) s = std::numeric_limits<double>::quiet_NaN();
      return false;
    }
    if (m != -std::numeric_limits<double>::infinity()) {
      const double c = std::exp(m - bm);
      t = c * (t + (m - bm) * s);
      s *= c;
      k *= c;
    }
    m = bm;
    return true;
  }
};

// mode: 0 = a only, 1 = a and b, 2 = a, b and the reverse-KL sum, 3 = a, b and the forward-KL sum.
// The per-row sweeps are kept out of line: vectorized reliably as standalone functions (inlined into the
// OpenMP-outlined row loops, some copies were not).
#define OP_NOINLINE __attribute__((noinline))

template <class T, class A, int MODE, bool ENT>
OP_NOINLINE void sweep1(const T* __restrict ar, const T* __restrict br, int64_t V, const Params<A>& P, Online& oa,
                        Online& ob) {
  alignas(64) A xa[kBlock];
  alignas(64) A xb[kBlock];
  const A ninf = -std::numeric_limits<A>::infinity();
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t n = V - v0 < kBlock ? V - v0 : kBlock;
    load_block(ar, v0, n, P.map_a, xa);
    if (MODE >= 1) load_block(br, v0, n, P.map_b, xb);
    A bma = ninf, bmb = ninf;
#pragma omp simd reduction(max : bma)
    for (int64_t i = 0; i < kBlock; ++i) bma = vmax(bma, xa[i]);
    if (MODE >= 1) {
#pragma omp simd reduction(max : bmb)
      for (int64_t i = 0; i < kBlock; ++i) bmb = vmax(bmb, xb[i]);
    }
    if (oa.update_max(static_cast<double>(bma), xa)) {
      const A m = static_cast<A>(oa.m);
      A s = 0, t = 0, k = 0;
#pragma omp simd reduction(+ : s, t, k)
      for (int64_t i = 0; i < kBlock; ++i) {
        const A d = xa[i] - m;
        const A e = vexp(d);
        s += e;
        if (ENT) t += e == A(0) ? A(0) : e * d;
        if (MODE == 2) k += e == A(0) ? A(0) : e * (xa[i] - xb[i]);
      }
      oa.s += s;
      oa.t += t;
      oa.k += k;
    }
    if (MODE >= 1 && ob.update_max(static_cast<double>(bmb), xb)) {
      const A m = static_cast<A>(ob.m);
      A s = 0, k = 0;
#pragma omp simd reduction(+ : s, k)
      for (int64_t i = 0; i < kBlock; ++i) {
        const A d = xb[i] - m;
        const A e = vexp(d);
        s += e;
        if (MODE == 3) k += e == A(0) ? A(0) : e * (xb[i] - xa[i]);
      }
      ob.s += s;
      ob.k += k;
    }
  }
}

template <class T, class A, int KIND>
OP_NOINLINE void sweep2(const T* __restrict ar, const T* __restrict br, int64_t V, const Params<A>& P, A lse_a, A lse_b,
            double& D, double& Sa, double& Sb) {
  alignas(64) A xa[kBlock];
  alignas(64) A xb[kBlock];
  D = Sa = Sb = 0.0;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t n = V - v0 < kBlock ? V - v0 : kBlock;
    load_block(ar, v0, n, P.map_a, xa);
    load_block(br, v0, n, P.map_b, xb);
    alignas(64) A t0[kBlock];
    alignas(64) A t1[kBlock];
    alignas(64) A t2[kBlock];
    // two loops: the selects of phi_fn are if-converted only outside of a reduction
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) {
      const A la = xa[i] - lse_a, lb = xb[i] - lse_b;
      const A p = vexp(la), q = vexp(lb);
      A phi, pa, pb;  // locals: selects on array elements would be conditional stores
      phi_fn<KIND>(la, lb, p, q, P, phi, pa, pb);
      t0[i] = phi;
      t1[i] = pa;
      t2[i] = pb;
    }
    // padding entries (-inf on both sides) have p = q = 0 and contribute exactly 0
    A d = 0, sa = 0, sb = 0;
#pragma omp simd reduction(+ : d, sa, sb)
    for (int64_t i = 0; i < kBlock; ++i) {
      d += t0[i];
      sa += t1[i];
      sb += t2[i];
    }
    D += d;
    Sa += sa;
    Sb += sb;
  }
}

template <class T, class A, int MODE, bool ENT, int KIND>
void fwd_impl(const T* a, const T* b, const int64_t* tg, A* stats, int64_t N, int64_t V, const Params<A>& P) {
// Rows in small dynamic chunks: with static halves, a thread that shares its core with another process
// holds back the whole sweep (benchmarks/results/2026-12-01-cpu-2core-main-job-loaded).
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r = 0; r < N; ++r) {
    A* st = stats + r * kNumStats;
    const int64_t y = tg ? tg[r] : -1;
    if (tg && y < 0) {
      for (int j = 0; j < kNumStats; ++j) st[j] = A(0);
      continue;
    }
    const T* ar = a + r * V;
    const T* br = MODE >= 1 ? b + r * V : nullptr;
    Online oa, ob;
    sweep1<T, A, MODE, ENT>(ar, br, V, P, oa, ob);
    const double log_sa = std::log(oa.s);
    const double lse_a = oa.m + log_sa;
    const double log_sb = MODE >= 1 ? std::log(ob.s) : 0.0;
    const double lse_b = MODE >= 1 ? ob.m + log_sb : 0.0;
    double logp_a = 0.0, logp_b = 0.0;
    if (tg && y >= V) {  // out of range (unchecked under torch.compile): NaN, never a read past the row
      logp_a = logp_b = std::numeric_limits<double>::quiet_NaN();
    } else if (tg) {
      logp_a = static_cast<double>(map_logit(to_acc(ar[y]), P.map_a, P.map_a.capped)) - lse_a;
      if (MODE >= 1) logp_b = static_cast<double>(map_logit(to_acc(br[y]), P.map_b, P.map_b.capped)) - lse_b;
    }
    const double H = ENT ? log_sa - oa.t / oa.s : 0.0;
    double D = 0.0, Sa = 0.0, Sb = 0.0;
    if constexpr (KIND == kReverseKL) {
      D = oa.k / oa.s - lse_a + lse_b;
      Sa = D;
    } else if constexpr (KIND == kForwardKL) {
      D = ob.k / ob.s - lse_b + lse_a;
      Sb = D;
    } else if constexpr (KIND >= kJSD) {
      sweep2<T, A, KIND>(ar, br, V, P, static_cast<A>(lse_a), static_cast<A>(lse_b), D, Sa, Sb);
    }
    st[kLseA] = static_cast<A>(lse_a);
    st[kLseB] = static_cast<A>(lse_b);
    st[kLogpA] = static_cast<A>(logp_a);
    st[kLogpB] = static_cast<A>(logp_b);
    st[kEntropyA] = static_cast<A>(H);
    st[kDiv] = static_cast<A>(D);
    st[kSumA] = static_cast<A>(Sa);
    st[kSumB] = static_cast<A>(Sb);
  }
}

template <class T, class A, int MODE, int KIND>
void fwd_ent(const T* a, const T* b, const int64_t* tg, A* stats, int64_t N, int64_t V, const Params<A>& P,
             bool need_entropy) {
  if (need_entropy)
    fwd_impl<T, A, MODE, true, KIND>(a, b, tg, stats, N, V, P);
  else
    fwd_impl<T, A, MODE, false, KIND>(a, b, tg, stats, N, V, P);
}

template <class T, class A>
void fwd(const T* a, const T* b, const int64_t* tg, A* stats, int64_t N, int64_t V, const Params<A>& P, int kind,
         bool need_entropy) {
  switch (kind) {
    case kNone:
      if (b)
        fwd_ent<T, A, 1, kNone>(a, b, tg, stats, N, V, P, need_entropy);
      else
        fwd_ent<T, A, 0, kNone>(a, b, tg, stats, N, V, P, need_entropy);
      break;
    case kReverseKL: fwd_ent<T, A, 2, kReverseKL>(a, b, tg, stats, N, V, P, need_entropy); break;
    case kForwardKL: fwd_ent<T, A, 3, kForwardKL>(a, b, tg, stats, N, V, P, need_entropy); break;
    case kJSD: fwd_ent<T, A, 1, kJSD>(a, b, tg, stats, N, V, P, need_entropy); break;
    case kTV: fwd_ent<T, A, 1, kTV>(a, b, tg, stats, N, V, P, need_entropy); break;
    case kHellinger: fwd_ent<T, A, 1, kHellinger>(a, b, tg, stats, N, V, P, need_entropy); break;
    case kChi2: fwd_ent<T, A, 1, kChi2>(a, b, tg, stats, N, V, P, need_entropy); break;
    case kAlpha: fwd_ent<T, A, 1, kAlpha>(a, b, tg, stats, N, V, P, need_entropy); break;
    default: break;
  }
}

// ---------------------------------------------------------------- backward
// out[i] = dL/dl_i = dL/dx_i * dx_i/dl_i for the n entries of one block (x: the mapped logits).
template <class T, class A>
OP_INLINE void store_grad_block(T* __restrict out, int64_t n, const A* __restrict dx, const A* __restrict x,
                                const LogitMap<A>& m) {
  if (n == kBlock) {
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) store(out[i], dx[i] * map_slope(x[i], m));
  } else {
    for (int64_t i = 0; i < n; ++i) store(out[i], dx[i] * map_slope(x[i], m));
  }
}

template <class T, class A, int KIND, bool HAS_B, bool DIV>
OP_NOINLINE void bwd_row(const T* __restrict ar, const T* __restrict br, int64_t y, const A* st, const A* g,
             T* __restrict ga, T* __restrict gb, int64_t V, const Params<A>& P) {
  alignas(64) A xa[kBlock];
  alignas(64) A xb[kBlock];
  alignas(64) A oa[kBlock];
  alignas(64) A ob[kBlock];
  const A lse_a = st[kLseA], lse_b = st[kLseB], H = st[kEntropyA], Sa = st[kSumA], Sb = st[kSumB];
  const A g_lpa = g[kGradLogpA], g_lpb = g[kGradLogpB], g_h = g[kGradEntropyA], g_d = g[kGradDiv];
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t n = V - v0 < kBlock ? V - v0 : kBlock;
    load_block(ar, v0, n, P.map_a, xa);
    if (HAS_B) load_block(br, v0, n, P.map_b, xb);
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) {
      const A la = xa[i] - lse_a;
      const A p = vexp(la);
      A da = -g_lpa * p - g_h * (p == A(0) ? A(0) : p * (la + H));
      if (HAS_B) {
        const A lb = xb[i] - lse_b;
        const A q = vexp(lb);
        A db = -g_lpb * q;
        if (DIV) {
          A phi, pa, pb;
          phi_fn<KIND>(la, lb, p, q, P, phi, pa, pb);
          da += g_d * (pa - p * Sa);
          db += g_d * (pb - q * Sb);
        }
        ob[i] = db;
      }
      oa[i] = da;
    }
    if (y >= v0 && y < v0 + n) {
      oa[y - v0] += g_lpa;
      if (HAS_B) ob[y - v0] += g_lpb;
    }
    if (ga) store_grad_block(ga + v0, n, oa, xa, P.map_a);
    if (HAS_B && gb) store_grad_block(gb + v0, n, ob, xb, P.map_b);
  }
}

template <class T, class A, int KIND, bool HAS_B>
void bwd_impl(const T* a, const T* b, const int64_t* tg, const A* stats, const A* grads, T* ga, T* gb, int64_t N,
              int64_t V, const Params<A>& P) {
// Rows in small dynamic chunks: with static halves, a thread that shares its core with another process
// holds back the whole sweep (benchmarks/results/2026-12-01-cpu-2core-main-job-loaded).
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t r = 0; r < N; ++r) {
    const int64_t off = r * V;
    const int64_t y = tg ? tg[r] : -1;
    T* gar = ga ? ga + off : nullptr;
    T* gbr = gb ? gb + off : nullptr;
    if (tg && y < 0) {
      T z;
      store(z, A(0));
      if (gar)
        for (int64_t v = 0; v < V; ++v) gar[v] = z;
      if (gbr)
        for (int64_t v = 0; v < V; ++v) gbr[v] = z;
      continue;
    }
    const A* st = stats + r * kNumStats;
    const A* g = grads + r * kNumGrads;
    const T* ar = a + off;
    const T* br = HAS_B ? b + off : nullptr;
    // a zero upstream gradient of the divergence contributes exactly 0 (even where phi_a is infinite)
    if (KIND != kNone && g[kGradDiv] != A(0))
      bwd_row<T, A, KIND, HAS_B, true>(ar, br, y, st, g, gar, gbr, V, P);
    else
      bwd_row<T, A, KIND, HAS_B, false>(ar, br, y, st, g, gar, gbr, V, P);
  }
}

template <class T, class A>
void bwd(const T* a, const T* b, const int64_t* tg, const A* stats, const A* grads, T* ga, T* gb, int64_t N,
         int64_t V, const Params<A>& P, int kind) {
  switch (kind) {
    case kNone:
      if (gb)
        bwd_impl<T, A, kNone, true>(a, b, tg, stats, grads, ga, gb, N, V, P);
      else
        bwd_impl<T, A, kNone, false>(a, b, tg, stats, grads, ga, gb, N, V, P);
      break;
    case kReverseKL: bwd_impl<T, A, kReverseKL, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    case kForwardKL: bwd_impl<T, A, kForwardKL, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    case kJSD: bwd_impl<T, A, kJSD, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    case kTV: bwd_impl<T, A, kTV, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    case kHellinger: bwd_impl<T, A, kHellinger, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    case kChi2: bwd_impl<T, A, kChi2, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    case kAlpha: bwd_impl<T, A, kAlpha, true>(a, b, tg, stats, grads, ga, gb, N, V, P); break;
    default: break;
  }
}

#endif  // ONEPASS_VS_BODY
