// CUDA vocab-stats kernels: forward (8 per-row statistics) and backward (one recompute sweep writing
// dL/da, dL/db), exactly the contract of docs/vocab_stats.md.
//
// Layout: one thread block per row (grid-stride over rows), 32..512 threads.  Rows are streamed with
// 16-byte vector loads (4 fp32 / 8 fp16 / 8 bf16) when every pointer has the same address modulo 16
// (the head of a row up to the first 16-byte boundary and the tail are done element-wise); otherwise
// element-wise.  All arithmetic is fp32; index math is 64-bit.
//
// Forward, sweep 1: per thread an online (max, sum exp) per distribution over chunks of W entries
// (one rescale per chunk), with the entropy accumulator t = sum e^(a-m) (a-m) (so that
// H = log s - t/s has no cancellation against m) and, for kinds 1/2, k = sum e^(a-m_a)(a-b)
// (resp. e^(b-m_b)(b-a)); then a block reduction (warp shuffles + shared memory) merging
// (m, s, t, k) with rescaling.  Sweep 2 (kinds 3..7) sums phi, phi_a, phi_b of the doc's table.
// Backward: one sweep per row, the doc's gradient formula, written in the input dtype.
//
// -inf handling: an entry a_v = -inf has p_v = 0 exactly and contributes exactly 0 (every product
// with p is guarded by p == 0, never 0 * inf); an all -inf row has lse = -inf and NaN log-probs,
// entropy and divergence (there is no distribution), its gradients are finite.  NaN entries are not filtered: they make their own
// row's statistics / gradients NaN and nothing else.
//
// Accuracy under --use_fast_math (CMakeLists.txt): sweep 1 uses __expf on arguments <= 0 on purpose
// (absolute error of each summand ~1e-7 relative to the row maximum, harmless for lse / entropy);
// p = exp(la), q = exp(lb) of sweep 2 and of the backward use exp_acc (a two-float argument
// reduction before ex2.approx, ~2-3 ulp over the whole range); log(s) uses log1pf(s - 1) (s >= 1,
// s - 1 exact for s <= 2); expm1f / log1pf are libdevice's accurate versions, which fast-math does
// not replace.  The constants of beta / alpha (log beta, 1/alpha, ...) are computed on the host in
// double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common.h"
#include "cuda/vocab_stats.cuh"

namespace onepass {
namespace cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kVecBytes = 16;

#define OP_NEG_INF (-INFINITY)
#define OP_POS_INF (INFINITY)
// Helpers are __host__ __device__ so that the per-entry math can be exercised on the host.
#define OP_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define OP_FAST_EXP(x) __expf(x)  // deliberate: arguments <= 0 (see the file comment)
#else
#define OP_FAST_EXP(x) expf(x)
#endif

template <int N>
using Int = std::integral_constant<int, N>;

// ------------------------------------------------------------------------------------------------
// Runtime parameters (beta, alpha and the constants derived from them, computed on the host in
// double precision).  Never compile-time constants.
// One model's logit map (docs/vocab_stats.md): x = inv_temp * l, or with a soft-cap c > 0
// x = post * tanh(pre * l), pre = 1 / c, post = inv_temp * c (inv_post = 1 / post).
struct LogitMap {
  float inv_temp, pre, post, inv_post;
  int capped;
};

struct Params {
  LogitMap map_a, map_b;
  // jsd: J(lb - la, beta) and J(la - lb, 1 - beta); coefficients (1 - beta), beta.
  float w_a, logw_a, r_a;  // w = beta,     log(beta),     (1 - beta) / beta
  float w_b, logw_b, r_b;  // w = 1 - beta, log(1 - beta), beta / (1 - beta)
  float one_m_beta, beta;
  // alpha: G(p, lb - la, 1 - alpha), G(q, la - lb, alpha).
  float c_a, inv_c_a;  // 1 - alpha, 1 / (1 - alpha)
  float c_b, inv_c_b;  // alpha, 1 / alpha
  float inv_alpha, inv_alpha_m1;
  int alpha_hi;  // alpha >= 1/2
};

// ------------------------------------------------------------------------------------------------
// Element loads / stores.
template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_f(float x) { return x; }
  __device__ __forceinline__ static float from_f(float x) { return x; }
};
template <>
struct Traits<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_f(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_f(float x) { return __float2half_rn(x); }
};
template <>
struct Traits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float2 to_f2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ void from_f2(float x, float y, __half2* out) { *out = __floats2half2_rn(x, y); }
__device__ __forceinline__ void from_f2(float x, float y, __nv_bfloat162* out) { *out = __floats2bfloat162_rn(x, y); }

template <typename T>
using pair_t = typename std::conditional<std::is_same<T, __half>::value, __half2, __nv_bfloat162>::type;

// tanh without tanhf (which --use_fast_math may turn into tanh.approx, ~5e-4 relative): |x| < 0.1:
// x - x^3/3 + 2x^5/15 (next term 17x^7/315 < 1e-8 relative), else (1 - u) / (1 + u), u = exp(-2|x|) <= 0.82.
__device__ __forceinline__ float tanh_acc(float x) {
  const float a = fabsf(x);
  const float a2 = a * a;
  const float u = expf(-2.0f * a);
  const float t = a < 0.1f ? a * (1.0f - a2 * (1.0f / 3.0f - a2 * (2.0f / 15.0f))) : (1.0f - u) / (1.0f + u);
  return copysignf(t, x);
}

// A raw logit through a model's logit map.
__device__ __forceinline__ float map_logit(float l, const LogitMap& m) {
  return m.capped ? m.post * tanh_acc(l * m.pre) : l * m.inv_temp;
}

// dx/dl of a mapped logit x: inv_temp, or inv_temp * (1 - tanh^2) with tanh = x / post when capped.
__device__ __forceinline__ float map_slope(float x, const LogitMap& m) {
  if (!m.capped) return m.inv_temp;
  const float t = x * m.inv_post;
  return m.inv_temp * (1.0f - t * t);
}

// Load W consecutive entries p[0..W) (W = 1 or the vector width; p 16-byte aligned when W > 1)
// through the logit map s.
template <typename T, int W>
__device__ __forceinline__ void load_mapped(const T* __restrict__ p, float (&x)[W], const LogitMap& s) {
  if constexpr (W == 1) {
    x[0] = map_logit(Traits<T>::to_f(p[0]), s);
  } else if constexpr (std::is_same<T, float>::value) {
    static_assert(W == 4, "fp32 vector width is 4");
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    x[0] = map_logit(v.x, s);
    x[1] = map_logit(v.y, s);
    x[2] = map_logit(v.z, s);
    x[3] = map_logit(v.w, s);
  } else {
    static_assert(W == 8, "16-bit vector width is 8");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const pair_t<T>* h = reinterpret_cast<const pair_t<T>*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = to_f2(h[i]);
      x[2 * i] = map_logit(f.x, s);
      x[2 * i + 1] = map_logit(f.y, s);
    }
  }
}

template <typename T, int W>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&x)[W]) {
  if constexpr (W == 1) {
    p[0] = Traits<T>::from_f(x[0]);
  } else if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  } else {
    uint4 raw;
    pair_t<T>* h = reinterpret_cast<pair_t<T>*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) from_f2(x[2 * i], x[2 * i + 1], &h[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Visit the entries [0, V) of a row: f(Int<W>{}, idx) handles entries idx .. idx + W - 1.  With
// vec, `head` entries (up to the first 16-byte boundary) and the tail are visited one at a time and
// the body in aligned vectors of VEC.
template <int VEC, class F>
__device__ __forceinline__ void for_row(int64_t V, bool vec, int head, F&& f) {
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  if (vec) {
    for (int64_t i = tid; i < head; i += nt) f(Int<1>{}, i);
    const int64_t nvec = (V - head) / VEC;
#pragma unroll 2
    for (int64_t j = tid; j < nvec; j += nt) f(Int<VEC>{}, head + j * VEC);
    for (int64_t i = head + nvec * VEC + tid; i < V; i += nt) f(Int<1>{}, i);
  } else {
#pragma unroll 2
    for (int64_t i = tid; i < V; i += nt) f(Int<1>{}, i);
  }
}

// ------------------------------------------------------------------------------------------------
// Accurate math helpers (fast-math safe; see the file comment).

// exp(x) to ~2-3 ulp: x * log2(e) as an unevaluated sum hi + lo (hi exact product in float, lo its
// rounding error plus x * (log2 e - float(log2 e))), then 2^hi * (1 + lo ln 2).  exp(+-inf) = inf, 0.
OP_HD float exp_acc(float x) {
  if (x == OP_POS_INF) return x;
  if (x == OP_NEG_INF) return 0.0f;
  const float kL2eHi = 1.44269502162933349609375f;
  const float kL2eLo = 1.925963033500011079e-8f;
  const float hi = x * kL2eHi;
  float lo = fmaf(x, kL2eHi, -hi);
  lo = fmaf(x, kL2eLo, lo);
  const float e = exp2f(hi);
  return fmaf(e, lo * 0.693147180559945309f, e);
}

// log(s) for s >= 1 (or 0 / NaN): s - 1 is exact for s in [1, 2], log1pf is libdevice's accurate one.
OP_HD float log_ge1(float s) { return log1pf(s - 1.0f); }

// J(x, w) = log(w e^x + 1 - w), 0 < w < 1 (logw = log w, r = (1 - w) / w).
OP_HD float jfun(float x, float w, float logw, float r) {
  if (x <= 0.0f) return log1pf(w * expm1f(x));
  return x + logw + log1pf(r * exp_acc(-x));
}

// G(base, lbase, x, c) = base (e^(c x) - 1) / c with base = e^lbase: base expm1(c x) / c for
// c x <= 1, else (e^(lbase + c x) - base) / c (no overflow * tiny); base x for c == 0; 0 where
// lbase = -inf (not where base merely underflows).
OP_HD float gfun(float base, float lbase, float x, float c, float inv_c) {
  if (lbase == OP_NEG_INF) return 0.0f;
  if (c == 0.0f) return base * x;
  const float cx = c * x;
  if (cx <= 1.0f) return base * expm1f(cx) * inv_c;
  return (exp_acc(lbase + cx) - base) * inv_c;
}

// phi, phi_a, phi_b of the doc's table for one entry (la, lb, p = e^la, q = e^lb; p == 0 where
// la = -inf, q == 0 where lb = -inf).
template <int KIND, bool NEED_F>
OP_HD void phi(float la, float lb, float p, float q, const Params& P, float& f,
                                    float& fa, float& fb) {
  if constexpr (KIND == kReverseKL) {
    fa = (p == 0.0f) ? 0.0f : p * (la - lb);
    fb = q - p;
    if (NEED_F) f = fa;
  } else if constexpr (KIND == kForwardKL) {
    fa = p - q;
    fb = (q == 0.0f) ? 0.0f : q * (lb - la);
    if (NEED_F) f = fb;
  } else if constexpr (KIND == kJSD) {
    // d_a = -J(lb - la, beta), d_b = -J(la - lb, 1 - beta).
    fa = (p == 0.0f) ? 0.0f : -P.one_m_beta * p * jfun(lb - la, P.w_a, P.logw_a, P.r_a);
    fb = (q == 0.0f) ? 0.0f : -P.beta * q * jfun(la - lb, P.w_b, P.logw_b, P.r_b);
    if (NEED_F) f = fa + fb;
  } else if constexpr (KIND == kTV) {
    const float d = p - q;
    const float sg = (d > 0.0f) ? 0.5f : ((d < 0.0f) ? -0.5f : d * 0.0f);  // 0 at 0, NaN stays NaN
    fa = sg * p;
    fb = -sg * q;
    if (NEED_F) f = 0.5f * fabsf(d);
  } else if constexpr (KIND == kHellinger) {
    // phi_a = -p expm1((lb - la)/2), or p - e^((la + lb)/2) where lb - la > 1 (no overflow * tiny).
    const float x = 0.5f * (lb - la);
    const float ea = expm1f(x);
    const float eb = expm1f(-x);
    const float lmid = 0.5f * (la + lb);
    fa = (la == OP_NEG_INF) ? 0.0f : ((lb - la > 1.0f) ? p - exp_acc(lmid) : -p * ea);
    fb = (lb == OP_NEG_INF) ? 0.0f : ((la - lb > 1.0f) ? q - exp_acc(lmid) : -q * eb);
    if (NEED_F) f = (p >= q) ? ((p == 0.0f) ? 0.0f : p * ea * ea) : q * eb * eb;
  } else if constexpr (KIND == kChi2) {
    if (lb == OP_NEG_INF) {  // q exactly 0
      const bool z = (la == OP_NEG_INF);
      if (NEED_F) f = z ? 0.0f : OP_POS_INF;
      fa = z ? 0.0f : OP_POS_INF;
      fb = z ? 0.0f : OP_NEG_INF;
    } else if (la - lb > 1.0f) {  // r = p^2 / q = e^(2 la - lb); no cancellation here
      const float r = exp_acc(2.0f * la - lb);
      if (NEED_F) f = r - 2.0f * p + q;
      fa = 2.0f * (r - p);
      fb = q - r;
    } else {
      const float em = expm1f(la - lb);
      if (NEED_F) f = (q * em) * em;
      fa = (p == 0.0f) ? 0.0f : 2.0f * p * em;
      fb = -(p + q) * em;
    }
  } else if constexpr (KIND == kAlpha) {
    // Gp = G(p, la, lb - la, 1 - alpha), Gq = G(q, lb, la - lb, alpha).
    const float gp = gfun(p, la, lb - la, P.c_a, P.inv_c_a);
    const float gq = gfun(q, lb, la - lb, P.c_b, P.inv_c_b);
    fa = -gp;
    fb = -gq;
    if (NEED_F) f = P.alpha_hi ? -(gp + p - q) * P.inv_alpha : (gq - p + q) * P.inv_alpha_m1;
  } else {
    fa = 0.0f;
    fb = 0.0f;
    if (NEED_F) f = 0.0f;
  }
}

// Gradient of one entry w.r.t. the mapped logits (the caller applies the map's slope):
//   grad_a = g_lp (1[v=y] - p) - g_H p (la + H) + g_D (phi_a - p S_a)
//   grad_b = g_lpb (1[v=y] - q) + g_D (phi_b - q S_b)
// A term whose upstream gradient is 0 is skipped (no 0 * inf), p (la + H) is 0 where p = 0.
template <int KIND>
OP_HD void grad_entry(float la, float p, float lb, float q, float fa, float fb, bool is_y, float H,
                      float Sa, float Sb, float g_lpa, float g_lpb, float g_h, float g_d, float& ga,
                      float& gb) {
  const float ind = is_y ? 1.0f : 0.0f;
  ga = (g_lpa == 0.0f) ? 0.0f : g_lpa * (ind - p);
  if (g_h != 0.0f && p != 0.0f) ga -= g_h * (p * (la + H));
  if (KIND != kNone && g_d != 0.0f) ga += g_d * (fa - ((p == 0.0f) ? 0.0f : p * Sa));
  gb = (g_lpb == 0.0f) ? 0.0f : g_lpb * (ind - q);
  if (KIND != kNone && g_d != 0.0f) gb += g_d * (fb - ((q == 0.0f) ? 0.0f : q * Sb));
}

// ------------------------------------------------------------------------------------------------
// Online softmax accumulator: m running max, s = sum e^(x - m), t = sum e^(x - m) (x - m),
// k = sum e^(x - m) * d (kinds 1/2).
struct Acc {
  float m, s, t, k;
};

OP_HD Acc acc_empty() { return Acc{OP_NEG_INF, 0.0f, 0.0f, 0.0f}; }

OP_HD Acc acc_merge(const Acc& x, const Acc& y) {
  const float M = fmaxf(x.m, y.m);
  const float d1 = (x.m == M) ? 0.0f : x.m - M;  // <= 0 or -inf; never -inf - -inf
  const float d2 = (y.m == M) ? 0.0f : y.m - M;
  const float c1 = OP_FAST_EXP(d1);
  const float c2 = OP_FAST_EXP(d2);
  Acc r;
  r.m = M;
  r.t = ((x.s == 0.0f) ? 0.0f : c1 * fmaf(d1, x.s, x.t)) + ((y.s == 0.0f) ? 0.0f : c2 * fmaf(d2, y.s, y.t));
  r.k = ((c1 == 0.0f) ? 0.0f : c1 * x.k) + ((c2 == 0.0f) ? 0.0f : c2 * y.k);
  r.s = fmaf(c1, x.s, c2 * y.s);
  return r;
}

__device__ __forceinline__ Acc acc_shfl_xor(const Acc& x, int off) {
  Acc y;
  y.m = __shfl_xor_sync(0xffffffffu, x.m, off);
  y.s = __shfl_xor_sync(0xffffffffu, x.s, off);
  y.t = __shfl_xor_sync(0xffffffffu, x.t, off);
  y.k = __shfl_xor_sync(0xffffffffu, x.k, off);
  return y;
}

// Block-wide merge; every thread gets the result.  blockDim.x is a multiple of 32, <= 1024.
// `sh` holds 32 entries; the trailing barrier makes it reusable.
__device__ Acc block_merge(Acc x, Acc* sh) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = acc_merge(x, acc_shfl_xor(x, off));
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    Acc y = (lane < nw) ? sh[lane] : acc_empty();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) y = acc_merge(y, acc_shfl_xor(y, off));
    if (lane == 0) sh[32] = y;
  }
  __syncthreads();
  const Acc r = sh[32];
  __syncthreads();
  return r;
}

// Block-wide sum of 3 floats; every thread gets the result.  `sh` holds 3 * 33 floats.
__device__ void block_sum3(float& a, float& b, float& c, float* sh) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nw = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
  if (lane == 0) {
    sh[warp] = a;
    sh[33 + warp] = b;
    sh[66 + warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    float x = (lane < nw) ? sh[lane] : 0.0f;
    float y = (lane < nw) ? sh[33 + lane] : 0.0f;
    float z = (lane < nw) ? sh[66 + lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      x += __shfl_xor_sync(0xffffffffu, x, off);
      y += __shfl_xor_sync(0xffffffffu, y, off);
      z += __shfl_xor_sync(0xffffffffu, z, off);
    }
    if (lane == 0) {
      sh[32] = x;
      sh[65] = y;
      sh[98] = z;
    }
  }
  __syncthreads();
  a = sh[32];
  b = sh[65];
  c = sh[98];
  __syncthreads();
}

// Online update of `acc` with W entries x[] (entries -inf contribute exactly 0); WITH_T: entropy
// accumulator, WITH_K: k += e * (x - y) with the partner row y[].
template <int W, bool WITH_T, bool WITH_K>
OP_HD void acc_update(Acc& acc, const float (&x)[W], const float (&y)[W]) {
  float cm = x[0];
#pragma unroll
  for (int i = 1; i < W; ++i) cm = fmaxf(cm, x[i]);
  const float mn = fmaxf(acc.m, cm);
  const float dm = (acc.m == mn) ? 0.0f : acc.m - mn;
  const float sc = OP_FAST_EXP(dm);
  float se = 0.0f, te = 0.0f, ke = 0.0f;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float e = (x[i] == OP_NEG_INF) ? 0.0f : OP_FAST_EXP(x[i] - mn);
    se += e;
    if (WITH_T) te += (e == 0.0f) ? 0.0f : e * (x[i] - mn);
    if (WITH_K) ke += (e == 0.0f) ? 0.0f : e * (x[i] - y[i]);
  }
  if (WITH_T) acc.t = ((acc.s == 0.0f) ? 0.0f : sc * fmaf(dm, acc.s, acc.t)) + te;
  if (WITH_K) acc.k = ((sc == 0.0f) ? 0.0f : sc * acc.k) + ke;
  acc.s = fmaf(sc, acc.s, se);
  acc.m = mn;
}

// la = x - lse and p = e^la, with p = 0 and la = -inf exactly for x = -inf.
OP_HD void logprob(float x, float lse, float& l, float& p) {
  const bool ninf = (x == OP_NEG_INF);
  l = ninf ? OP_NEG_INF : x - lse;
  p = ninf ? 0.0f : exp_acc(l);
}

template <typename T>
__device__ __forceinline__ int row_head(const T* row, int64_t V) {
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) & (kVecBytes - 1));
  const int64_t h = mis ? static_cast<int64_t>((kVecBytes - mis) / sizeof(T)) : 0;
  return static_cast<int>(h < V ? h : V);
}

// ------------------------------------------------------------------------------------------------
// Forward.
template <typename T, int KIND, bool HAS_B, bool NEED_ENT>
__global__ void __launch_bounds__(kMaxThreads)
    vocab_stats_fwd_kernel(const T* __restrict__ a, const T* __restrict__ b,
                           const int64_t* __restrict__ targets, float* __restrict__ stats, int64_t N,
                           int64_t V, Params P, bool vec) {
  constexpr int VEC = Traits<T>::kVec;
  constexpr bool kSweep2 = KIND >= kJSD;
  __shared__ Acc sh_acc[33];
  __shared__ float sh_sum[99];

  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    float* out = stats + row * kNumStats;
    const int64_t y = targets ? targets[row] : -1;
    if (targets && y < 0) {  // ignored row (uniform over the block)
      if (threadIdx.x < kNumStats) out[threadIdx.x] = 0.0f;
      continue;
    }
    const T* ar = a + row * V;
    const T* br = HAS_B ? b + row * V : nullptr;
    const int head = row_head(ar, V);

    // Sweep 1.
    Acc A = acc_empty();
    Acc B = acc_empty();
    for_row<VEC>(V, vec, head, [&](auto w, int64_t idx) {
      constexpr int W = decltype(w)::value;
      float xa[W];
      load_mapped<T, W>(ar + idx, xa, P.map_a);
      if constexpr (HAS_B) {
        float xb[W];
        load_mapped<T, W>(br + idx, xb, P.map_b);
        acc_update<W, NEED_ENT, KIND == kReverseKL>(A, xa, xb);
        acc_update<W, false, KIND == kForwardKL>(B, xb, xa);
      } else {
        acc_update<W, NEED_ENT, false>(A, xa, xa);
      }
    });
    A = block_merge(A, sh_acc);
    if constexpr (HAS_B) B = block_merge(B, sh_acc);

    const float log_sa = log_ge1(A.s);
    const float lse_a = A.m + log_sa;
    float lse_b = 0.0f, log_sb = 0.0f;
    if constexpr (HAS_B) {
      log_sb = log_ge1(B.s);
      lse_b = B.m + log_sb;
    }

    // Sweep 2.
    float D = 0.0f, Sa = 0.0f, Sb = 0.0f;
    if constexpr (kSweep2) {
      for_row<VEC>(V, vec, head, [&](auto w, int64_t idx) {
        constexpr int W = decltype(w)::value;
        float xa[W], xb[W];
        load_mapped<T, W>(ar + idx, xa, P.map_a);
        load_mapped<T, W>(br + idx, xb, P.map_b);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          float la, p, lb, q, f, fa, fb;
          logprob(xa[i], lse_a, la, p);
          logprob(xb[i], lse_b, lb, q);
          phi<KIND, true>(la, lb, p, q, P, f, fa, fb);
          D += f;
          Sa += fa;
          Sb += fb;
        }
      });
      block_sum3(D, Sa, Sb, sh_sum);
      if (A.s == 0.0f || B.s == 0.0f) D = Sa = Sb = __int_as_float(0x7fc00000);  // no distribution
    } else if constexpr (KIND == kReverseKL) {
      D = A.k / A.s + ((B.m - A.m) + (log_sb - log_sa));
      Sa = D;
    } else if constexpr (KIND == kForwardKL) {
      D = B.k / B.s + ((A.m - B.m) + (log_sa - log_sb));
      Sb = D;
    }

    if (threadIdx.x == 0) {
      float lp_a = 0.0f, lp_b = 0.0f;
      if (targets) {
        if (y < V) {
          lp_a = map_logit(Traits<T>::to_f(ar[y]), P.map_a) - lse_a;  // NaN in an all -inf row
          if constexpr (HAS_B) lp_b = map_logit(Traits<T>::to_f(br[y]), P.map_b) - lse_b;
        } else {  // out-of-range target (the Python layer validates; never read out of bounds)
          lp_a = __int_as_float(0x7fc00000);
          lp_b = HAS_B ? lp_a : 0.0f;
        }
      }
      out[kLseA] = lse_a;
      out[kLseB] = lse_b;
      out[kLogpA] = lp_a;
      out[kLogpB] = lp_b;
      out[kEntropyA] = NEED_ENT ? log_sa - A.t / A.s : 0.0f;
      out[kDiv] = D;
      out[kSumA] = Sa;
      out[kSumB] = Sb;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.
template <typename T, int KIND, bool HAS_B>
__global__ void __launch_bounds__(kMaxThreads)
    vocab_stats_bwd_kernel(const T* __restrict__ a, const T* __restrict__ b,
                           const int64_t* __restrict__ targets, const float* __restrict__ stats,
                           const float* __restrict__ grads, T* __restrict__ grad_a,
                           T* __restrict__ grad_b, int64_t N, int64_t V, Params P, bool vec) {
  constexpr int VEC = Traits<T>::kVec;
  // a is needed for grad_a and, for a divergence, for grad_b; b likewise.
  const bool load_a = grad_a != nullptr || KIND != kNone;
  const bool load_b = HAS_B && (grad_b != nullptr || KIND != kNone);

  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t y = targets ? targets[row] : -1;
    T* gar = grad_a ? grad_a + row * V : nullptr;
    T* gbr = grad_b ? grad_b + row * V : nullptr;
    const T* ar = a + row * V;
    const T* br = HAS_B ? b + row * V : nullptr;
    const int head = row_head(ar, V);

    if (targets && y < 0) {  // ignored row: zero gradients
      for_row<VEC>(V, vec, head, [&](auto w, int64_t idx) {
        constexpr int W = decltype(w)::value;
        float z[W];
#pragma unroll
        for (int i = 0; i < W; ++i) z[i] = 0.0f;
        if (gar) store<T, W>(gar + idx, z);
        if (gbr) store<T, W>(gbr + idx, z);
      });
      continue;
    }

    const float* st = stats + row * kNumStats;
    const float* g = grads + row * kNumGrads;
    const float lse_a = st[kLseA];
    const float lse_b = st[kLseB];
    const float H = st[kEntropyA];
    const float Sa = st[kSumA];
    const float Sb = st[kSumB];
    // Without targets the log-prob statistics are the constant 0: no gradient through them.
    const float g_lpa = targets ? g[kGradLogpA] : 0.0f;
    const float g_lpb = targets ? g[kGradLogpB] : 0.0f;
    const float g_h = g[kGradEntropyA];
    const float g_d = g[kGradDiv];

    for_row<VEC>(V, vec, head, [&](auto w, int64_t idx) {
      constexpr int W = decltype(w)::value;
      float xa[W], xb[W];
      if (load_a) {
        load_mapped<T, W>(ar + idx, xa, P.map_a);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) xa[i] = OP_NEG_INF;
      }
      if (load_b) {
        load_mapped<T, W>(br + idx, xb, P.map_b);
      } else {
#pragma unroll
        for (int i = 0; i < W; ++i) xb[i] = OP_NEG_INF;
      }
      float oa[W], ob[W];
#pragma unroll
      for (int i = 0; i < W; ++i) {
        float la, p, lb, q, f, fa, fb;
        logprob(xa[i], lse_a, la, p);
        logprob(xb[i], lse_b, lb, q);
        phi<KIND, false>(la, lb, p, q, P, f, fa, fb);
        grad_entry<KIND>(la, p, lb, q, fa, fb, idx + i == y, H, Sa, Sb, g_lpa, g_lpb, g_h, g_d, oa[i], ob[i]);
        oa[i] *= map_slope(xa[i], P.map_a);  // dL/dx -> dL/dl (chain rule through the logit map)
        ob[i] *= map_slope(xb[i], P.map_b);
      }
      if (gar) store<T, W>(gar + idx, oa);
      if (gbr) store<T, W>(gbr + idx, ob);
    });
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

bool make_map(float inv_temp, float softcap, LogitMap* m) {
  if (!(std::isfinite(inv_temp) && inv_temp > 0.0f && std::isfinite(softcap) && softcap >= 0.0f)) return false;
  *m = LogitMap{};
  m->inv_temp = inv_temp;
  m->capped = softcap > 0.0f ? 1 : 0;
  if (m->capped) {
    const double post = static_cast<double>(inv_temp) * softcap;
    m->pre = static_cast<float>(1.0 / softcap);
    m->post = static_cast<float>(post);
    m->inv_post = static_cast<float>(1.0 / post);
  }
  return true;
}

bool make_params(float inv_temp_a, float softcap_a, float inv_temp_b, float softcap_b, int kind, float beta,
                 float alpha, Params* P) {
  *P = Params{};
  if (!make_map(inv_temp_a, softcap_a, &P->map_a) || !make_map(inv_temp_b, softcap_b, &P->map_b)) return false;
  const double be = beta, al = alpha;
  if (kind == kJSD) {
    if (!(be > 0.0 && be < 1.0)) return false;
    P->beta = static_cast<float>(be);
    P->one_m_beta = static_cast<float>(1.0 - be);
    P->w_a = static_cast<float>(be);
    P->logw_a = static_cast<float>(std::log(be));
    P->r_a = static_cast<float>((1.0 - be) / be);
    P->w_b = static_cast<float>(1.0 - be);
    P->logw_b = static_cast<float>(std::log1p(-be));
    P->r_b = static_cast<float>(be / (1.0 - be));
  }
  if (kind == kAlpha) {
    if (!std::isfinite(al) || al == 0.0 || al == 1.0) return false;
    P->c_a = static_cast<float>(1.0 - al);
    P->inv_c_a = P->c_a == 0.0f ? 0.0f : static_cast<float>(1.0 / (1.0 - al));
    P->c_b = static_cast<float>(al);
    P->inv_c_b = static_cast<float>(1.0 / al);
    P->inv_alpha = static_cast<float>(1.0 / al);
    P->inv_alpha_m1 = static_cast<float>(1.0 / (al - 1.0));
    P->alpha_hi = al >= 0.5 ? 1 : 0;
  }
  return true;
}

int threads_for(int64_t V, int vec) {
  const int64_t units = (V + vec - 1) / vec;
  int64_t t = ((units + 31) / 32) * 32;
  if (t < 32) t = 32;
  if (t > kMaxThreads) t = kMaxThreads;
  return static_cast<int>(t);
}

unsigned grid_for(int64_t N) { return static_cast<unsigned>(N < INT_MAX ? N : INT_MAX); }

// Vector path: every present pointer has the same address modulo 16 (so every row of every array
// has the same head) and is element-aligned.
bool same_alignment(size_t elem, std::initializer_list<const void*> ptrs) {
  long first = -1;
  for (const void* p : ptrs) {
    if (!p) continue;
    const auto u = reinterpret_cast<uintptr_t>(p);
    if (u % elem) return false;
    const long m = static_cast<long>(u % kVecBytes);
    if (first < 0) first = m;
    else if (m != first) return false;
  }
  return true;
}

template <typename T>
cudaError_t fwd_typed(const void* a, const void* b, const int64_t* targets, float* stats, int64_t N,
                      int64_t V, const Params& P, int kind, bool need_entropy, cudaStream_t stream) {
  const T* ta = static_cast<const T*>(a);
  const T* tb = static_cast<const T*>(b);
  const bool vec = same_alignment(sizeof(T), {a, b});
  const dim3 grid(grid_for(N));
  const dim3 block(threads_for(V, Traits<T>::kVec));
#define OP_FWD(K, HB, E) \
  vocab_stats_fwd_kernel<T, K, HB, E><<<grid, block, 0, stream>>>(ta, tb, targets, stats, N, V, P, vec)
#define OP_FWD_E(K, HB) \
  do {                  \
    if (need_entropy)   \
      OP_FWD(K, HB, true); \
    else                \
      OP_FWD(K, HB, false); \
  } while (0)
  switch (kind) {
    case kNone:
      if (b)
        OP_FWD_E(kNone, true);
      else
        OP_FWD_E(kNone, false);
      break;
    case kReverseKL: OP_FWD_E(kReverseKL, true); break;
    case kForwardKL: OP_FWD_E(kForwardKL, true); break;
    case kJSD: OP_FWD_E(kJSD, true); break;
    case kTV: OP_FWD_E(kTV, true); break;
    case kHellinger: OP_FWD_E(kHellinger, true); break;
    case kChi2: OP_FWD_E(kChi2, true); break;
    case kAlpha: OP_FWD_E(kAlpha, true); break;
    default: return cudaErrorInvalidValue;
  }
#undef OP_FWD_E
#undef OP_FWD
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* a, const void* b, const int64_t* targets, const float* stats,
                      const float* grads, void* grad_a, void* grad_b, int64_t N, int64_t V,
                      const Params& P, int kind, cudaStream_t stream) {
  const T* ta = static_cast<const T*>(a);
  const T* tb = static_cast<const T*>(b);
  T* ga = static_cast<T*>(grad_a);
  T* gb = static_cast<T*>(grad_b);
  const bool vec = same_alignment(sizeof(T), {a, b, grad_a, grad_b});
  const dim3 grid(grid_for(N));
  const dim3 block(threads_for(V, Traits<T>::kVec));
#define OP_BWD(K, HB) \
  vocab_stats_bwd_kernel<T, K, HB><<<grid, block, 0, stream>>>(ta, tb, targets, stats, grads, ga, gb, N, V, P, vec)
  switch (kind) {
    case kNone:
      if (b)
        OP_BWD(kNone, true);
      else
        OP_BWD(kNone, false);
      break;
    case kReverseKL: OP_BWD(kReverseKL, true); break;
    case kForwardKL: OP_BWD(kForwardKL, true); break;
    case kJSD: OP_BWD(kJSD, true); break;
    case kTV: OP_BWD(kTV, true); break;
    case kHellinger: OP_BWD(kHellinger, true); break;
    case kChi2: OP_BWD(kChi2, true); break;
    case kAlpha: OP_BWD(kAlpha, true); break;
    default: return cudaErrorInvalidValue;
  }
#undef OP_BWD
  return cudaGetLastError();
}

}  // namespace

cudaError_t vocab_stats_fwd(const void* a, const void* b, const int64_t* targets, float* stats,
                            int64_t N, int64_t V, int dtype, float inv_temp_a, float softcap_a,
                            float inv_temp_b, float softcap_b, int kind, float beta, float alpha,
                            bool need_entropy, uintptr_t stream) {
  if (N < 0 || V < 0 || !valid_kind(kind)) return cudaErrorInvalidValue;
  if (kind != kNone && !b) return cudaErrorInvalidValue;
  Params P;
  if (!make_params(inv_temp_a, softcap_a, inv_temp_b, softcap_b, kind, beta, alpha, &P)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  if (!a || !stats) return cudaErrorInvalidValue;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: return fwd_typed<float>(a, b, targets, stats, N, V, P, kind, need_entropy, s);
    case kFloat16: return fwd_typed<__half>(a, b, targets, stats, N, V, P, kind, need_entropy, s);
    case kBFloat16: return fwd_typed<__nv_bfloat16>(a, b, targets, stats, N, V, P, kind, need_entropy, s);
    default: return cudaErrorInvalidValue;  // float64 and unknown codes
  }
}

cudaError_t vocab_stats_bwd(const void* a, const void* b, const int64_t* targets, const float* stats,
                            const float* grads, void* grad_a, void* grad_b, int64_t N, int64_t V,
                            int dtype, float inv_temp_a, float softcap_a, float inv_temp_b,
                            float softcap_b, int kind, float beta, float alpha, uintptr_t stream) {
  if (N < 0 || V < 0 || !valid_kind(kind)) return cudaErrorInvalidValue;
  if ((kind != kNone || grad_b) && !b) return cudaErrorInvalidValue;
  Params P;
  if (!make_params(inv_temp_a, softcap_a, inv_temp_b, softcap_b, kind, beta, alpha, &P)) return cudaErrorInvalidValue;
  if (N == 0 || (!grad_a && !grad_b)) return cudaSuccess;
  if (!a || !stats || !grads) return cudaErrorInvalidValue;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return bwd_typed<float>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind, s);
    case kFloat16:
      return bwd_typed<__half>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind, s);
    case kBFloat16:
      return bwd_typed<__nv_bfloat16>(a, b, targets, stats, grads, grad_a, grad_b, N, V, P, kind, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace onepass
