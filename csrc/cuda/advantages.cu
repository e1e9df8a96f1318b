// CUDA kernels of onepass.group_advantages (python/onepass/advantages.py); host launcher
// advantages_cuda_launch returns a cudaError_t (bound in advantages_bindings.cpp).
//
// Groups in CSR form: offsets[S+1] int64, perm[B] int64 (nullptr: consecutive positions).
// - advantages_segment_kernel: one warp per segment.  Two-pass mean / unbiased variance around a
//   shift (the first member: all-equal groups give exactly 0), xor-butterfly warp reductions (every
//   lane gets the same bits), then the advantage written to the members' positions.
// - advantages_batch_kernel: one block, a fixed-shape two-pass reduction over the batch: the unbiased
//   std of the rewards (GRPO scale="batch") or the mean and biased variance of the group-centred
//   rewards (REINFORCE++); the result stays on the device.
// Every reduction has a fixed order: the kernels are deterministic.  Accumulation in float (double
// for float64 rewards); IEEE-rounded sqrt/div even under --use_fast_math.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace onepass {
namespace {

enum AdvSegMode : int { kAdvSegCenter = 0, kAdvSegGroupStd = 1, kAdvSegBatchStd = 2, kAdvSegRloo = 3, kAdvSegWhiten = 4 };
enum AdvBatchMode : int { kAdvBatchStd = 0, kAdvBatchMeanVar = 1 };

constexpr int kAdvWarpsPerBlock = 8;
constexpr int kAdvBatchThreads = 1024;
constexpr double kAdvVarFloorCuda = 1e-8;

__device__ __forceinline__ float adv_to_acc(float x, float) { return x; }
__device__ __forceinline__ double adv_to_acc(double x, double) { return x; }
__device__ __forceinline__ float adv_to_acc(__half x, float) { return __half2float(x); }
__device__ __forceinline__ float adv_to_acc(__nv_bfloat16 x, float) { return __bfloat162float(x); }

__device__ __forceinline__ float adv_sqrt(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double adv_sqrt(double x) { return __dsqrt_rn(x); }
__device__ __forceinline__ float adv_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double adv_div(double a, double b) { return __ddiv_rn(a, b); }

template <typename A>
__device__ __forceinline__ A adv_warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A adv_warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename T, typename A>
__global__ void advantages_segment_kernel(const T* __restrict__ r, const int64_t* __restrict__ perm,
                                          const int64_t* __restrict__ off, int64_t S, int mode, A eps,
                                          const A* __restrict__ stats, A* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t s = (int64_t)blockIdx.x * kAdvWarpsPerBlock + (threadIdx.x >> 5);
  if (s >= S) return;  // whole warp exits together
  const int64_t lo = off[s], hi = off[s + 1], n = hi - lo;
  if (n <= 0) return;
  auto member = [&](int64_t j) -> int64_t { return perm ? perm[j] : j; };
  // Scale-safe: the group is summed as r / k with k a power of two near its largest |r| (exact
  // scaling), so that rewards near the float range limit do not overflow the sums.
  A amax = 0;
  for (int64_t j = lo + lane; j < hi; j += 32) amax = max(amax, abs(adv_to_acc(r[member(j)], A(0))));
  amax = adv_warp_max(amax);
  const A k = (amax > A(0) && isfinite(double(amax))) ? A(exp2(floor(log2(double(amax))))) : A(1);
  const A shift = adv_to_acc(r[member(lo)], A(0)) / k;
  A s1 = 0;
  for (int64_t j = lo + lane; j < hi; j += 32) s1 += adv_to_acc(r[member(j)], A(0)) / k - shift;
  s1 = adv_warp_sum(s1);
  const A nf = A(n);
  const A mean_k = shift + adv_div(s1, nf);  // mean / k
  const A mean = mean_k * k;
  A denom = 1, bmean = 0, rstd = 1;
  const bool group_std = mode == kAdvSegGroupStd;
  if (group_std) {
    A s2 = 0;
    for (int64_t j = lo + lane; j < hi; j += 32) {
      const A d = adv_to_acc(r[member(j)], A(0)) / k - mean_k;
      s2 += d * d;
    }
    s2 = adv_warp_sum(s2);
    denom = adv_sqrt(adv_div(s2, n > 1 ? nf - A(1) : A(1))) + eps / k;  // (std + eps) / k
  } else if (mode == kAdvSegBatchStd) {
    denom = stats[0] + eps;
  } else if (mode == kAdvSegRloo) {
    denom = adv_div(n > 1 ? nf - A(1) : A(1), nf);
  } else if (mode == kAdvSegWhiten) {
    bmean = stats[0];
    const A v = stats[1] > A(kAdvVarFloorCuda) ? stats[1] : A(kAdvVarFloorCuda);
    rstd = adv_div(A(1), adv_sqrt(v));
  }
  if (!(denom > A(0))) denom = A(1);  // std + eps = 0 only with eps = 0 and equal rewards (x = 0)
  for (int64_t j = lo + lane; j < hi; j += 32) {
    const int64_t i = member(j);
    const A x = group_std ? adv_to_acc(r[i], A(0)) / k - mean_k : adv_to_acc(r[i], A(0)) - mean;
    A adv;
    if (mode == kAdvSegWhiten) {
      adv = (x - bmean) * rstd;
    } else if (mode == kAdvSegCenter) {
      adv = x;
    } else {
      adv = adv_div(x, denom);
    }
    out[i] = n > 1 ? adv : A(0);
  }
}

template <typename A>
__device__ A adv_block_sum(A v, A* shm) {
  const int t = threadIdx.x;
  shm[t] = v;
  __syncthreads();
  for (int w = kAdvBatchThreads / 2; w > 0; w >>= 1) {
    if (t < w) shm[t] += shm[t + w];
    __syncthreads();
  }
  const A total = shm[0];
  __syncthreads();
  return total;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kAdvBatchThreads)
    advantages_batch_kernel(const T* __restrict__ x, int64_t B, int mode, A* __restrict__ stats) {
  __shared__ A shm[kAdvBatchThreads];
  const A shift = adv_to_acc(x[0], A(0));
  A acc = 0;
  for (int64_t i = threadIdx.x; i < B; i += kAdvBatchThreads) acc += adv_to_acc(x[i], A(0)) - shift;
  const A bf = A(B);
  const A mean = shift + adv_div(adv_block_sum(acc, shm), bf);
  A acc2 = 0;
  for (int64_t i = threadIdx.x; i < B; i += kAdvBatchThreads) {
    const A d = adv_to_acc(x[i], A(0)) - mean;
    acc2 += d * d;
  }
  const A ss = adv_block_sum(acc2, shm);
  if (threadIdx.x == 0) {
    if (mode == kAdvBatchStd) {
      stats[0] = B > 1 ? adv_sqrt(adv_div(ss, bf - A(1))) : A(0);
    } else {
      stats[0] = mean;
      stats[1] = adv_div(ss, bf);
    }
  }
}

template <typename T, typename A>
cudaError_t advantages_launch_typed(const void* rewards, const int64_t* perm, const int64_t* off, int64_t S,
                                    int64_t B, int estimator, int scale, double eps, void* out_v, void* stats_v,
                                    cudaStream_t stream) {
  const T* r = static_cast<const T*>(rewards);
  A* out = static_cast<A*>(out_v);
  A* stats = static_cast<A*>(stats_v);
  const int64_t blocks = (S + kAdvWarpsPerBlock - 1) / kAdvWarpsPerBlock;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid((unsigned)blocks), block(32 * kAdvWarpsPerBlock);
  int mode = kAdvSegCenter;
  if (estimator == 0) {  // grpo
    if (scale == 0) {
      mode = kAdvSegGroupStd;
    } else if (scale == 1) {
      advantages_batch_kernel<T, A><<<1, kAdvBatchThreads, 0, stream>>>(r, B, kAdvBatchStd, stats);
      mode = kAdvSegBatchStd;
    }
  } else if (estimator == 2) {  // rloo
    mode = kAdvSegRloo;
  } else if (estimator == 3) {  // reinforce_pp
    advantages_segment_kernel<T, A><<<grid, block, 0, stream>>>(r, perm, off, S, kAdvSegCenter, A(eps), stats, out);
    advantages_batch_kernel<A, A><<<1, kAdvBatchThreads, 0, stream>>>(out, B, kAdvBatchMeanVar, stats);
    mode = kAdvSegWhiten;
  }
  advantages_segment_kernel<T, A><<<grid, block, 0, stream>>>(r, perm, off, S, mode, A(eps), stats, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t advantages_cuda_launch(const void* rewards, int dtype, const int64_t* perm, const int64_t* offsets,
                                   int64_t num_segments, int64_t batch, int estimator, int scale, double eps,
                                   void* out, void* stats, void* stream_ptr) {
  if (batch <= 0 || num_segments <= 0) return cudaSuccess;
  if (estimator < 0 || estimator > 3 || scale < 0 || scale > 2) return cudaErrorInvalidValue;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  switch (dtype) {
    case kFloat32:
      return advantages_launch_typed<float, float>(rewards, perm, offsets, num_segments, batch, estimator, scale, eps,
                                                   out, stats, stream);
    case kFloat16:
      return advantages_launch_typed<__half, float>(rewards, perm, offsets, num_segments, batch, estimator, scale,
                                                    eps, out, stats, stream);
    case kBFloat16:
      return advantages_launch_typed<__nv_bfloat16, float>(rewards, perm, offsets, num_segments, batch, estimator,
                                                           scale, eps, out, stats, stream);
    case kFloat64:
      return advantages_launch_typed<double, double>(rewards, perm, offsets, num_segments, batch, estimator, scale,
                                                     eps, out, stats, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace onepass
