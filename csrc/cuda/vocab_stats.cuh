// Host launch functions of the CUDA vocab-stats kernels (docs/vocab_stats.md).
//
// Plain C types only (raw pointers, sizes, the dtype code of csrc/common.h, floats, the stream as
// uintptr_t), so this header is included both by vocab_stats.cu (nvcc) and by the pybind11 bindings
// (host compiler).  Each function enqueues one kernel on `stream` and returns the launch status
// (cudaGetLastError() after the launch); cudaErrorInvalidValue for arguments the kernels do not take
// (float64, kind out of range, a logit map with inv_temp <= 0 or softcap < 0 (0 = no cap), missing b
// for a divergence kind, jsd beta outside (0, 1), alpha in {0, 1}).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace onepass {
namespace cuda {

// stats [N, 8] fp32.  b and targets may be null (see the doc: absent b -> b-statistics 0, absent
// targets -> no gather and no skipped row).  a, b: [N, V] row-major contiguous in `dtype`.
cudaError_t vocab_stats_fwd(const void* a, const void* b, const int64_t* targets, float* stats,
                            int64_t N, int64_t V, int dtype, float inv_temp_a, float softcap_a,
                            float inv_temp_b, float softcap_b, int kind, float beta, float alpha,
                            bool need_entropy, uintptr_t stream);

// grad_a / grad_b [N, V] in `dtype`, each may be null (not written).  stats [N, 8] and
// grads [N, 4] fp32.  b may be null only for kind 0 without grad_b.
cudaError_t vocab_stats_bwd(const void* a, const void* b, const int64_t* targets, const float* stats,
                            const float* grads, void* grad_a, void* grad_b, int64_t N, int64_t V,
                            int dtype, float inv_temp_a, float softcap_a, float inv_temp_b,
                            float softcap_b, int kind, float beta, float alpha, uintptr_t stream);

}  // namespace cuda
}  // namespace onepass
