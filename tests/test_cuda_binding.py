"""CUDA-specific tests of the vocab-stats launchers (onepass.backends.cuda.vocab_stats): the Qwen-size
vocabulary, misaligned pointers, far-apart distributions, side streams and the binding's errors (the
kernel contract itself is tests/test_kernel_contract.py, for every backend), against a float64
PyTorch implementation on the CPU of the same semantics (docs/vocab_stats.md): log_softmax-based lse /
logp / entropy, every divergence from its plain formula, and gradients by torch.autograd of
sum_r (g_lp logp + g_rlp ref_logp + g_H H + g_D D).

The GPU tests carry the ``gpu`` mark and are skipped without a CUDA device; the binding tests at the
end run on any machine where onepass._C was built with CUDA."""
from __future__ import annotations


import pytest
import torch

import onepass

try:
    from onepass import _C

    _WITH_CUDA = bool(getattr(_C, "with_cuda", False)) and hasattr(_C, "vocab_stats_fwd_cuda")
except ImportError:  # pragma: no cover
    _C = None
    _WITH_CUDA = False

_GPU = torch.cuda.is_available() and _WITH_CUDA


def on_gpu(fn):
    """gpu mark + skip without a CUDA device (or without the CUDA kernels in onepass._C)."""
    fn = pytest.mark.skipif(not _GPU, reason="needs a CUDA device and onepass._C built with CUDA")(fn)
    return pytest.mark.gpu(fn)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["float32", "float16", "bfloat16"]
KINDS = list(range(8))
KIND_NAMES = ["none", "reverse_kl", "forward_kl", "jsd", "tv", "hellinger", "chi2", "alpha"]


def _cuda():
    from onepass.backends.cuda import vocab_stats as cuda

    return cuda


from _vocab_stats_ref import as_map, assert_close, make_inputs, reference, uniform_map  # noqa: E402

STATS_TOL = 1e-4
GRAD_TOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def run_case(n, v, dtype, kind, inv_temp, beta=0.5, alpha=0.5, *, with_targets=True, use_b=True,
             seed=0, with_ninf=True, need_entropy=True):
    cuda = _cuda()
    dev = torch.device("cuda")
    a, b, targets, grads = make_inputs(n, v, dtype, seed=seed, with_ninf=with_ninf)
    if not with_targets:
        targets = None
        grads[:, :2] = 0
    bb = b if (use_b or kind != 0) else None
    if bb is None:
        grads[:, 1] = 0
    if kind == 0:
        grads[:, 3] = 0
    if not need_entropy:
        grads[:, 2] = 0
    ad = a.to(dev)
    bd = bb.to(dev) if bb is not None else None
    td = targets.to(dev) if targets is not None else None
    stats = cuda.vocab_stats_fwd(ad, bd, td, as_map(inv_temp), kind, beta, alpha, need_entropy)
    assert stats.shape == (n, 8) and stats.dtype == torch.float32 and stats.device == ad.device
    ref_stats, ref_ga, ref_gb = reference(a, bb, targets, inv_temp, kind, beta, alpha, grads)
    if not need_entropy:
        ref_stats[:, 4] = 0
    sc = stats.cpu()
    assert_close(sc[:, :6], ref_stats, STATS_TOL, f"stats kind={kind} V={v} {dtype}")
    if kind == 1:
        assert torch.equal(sc[:, 6], sc[:, 5]) and torch.all(sc[:, 7] == 0)
    elif kind == 2:
        assert torch.equal(sc[:, 7], sc[:, 5]) and torch.all(sc[:, 6] == 0)
    elif kind == 0:
        assert torch.all(sc[:, 5:] == 0)
    if targets is not None:
        assert torch.all(sc[targets < 0] == 0)
    gd = grads.to(dev, torch.float32)
    ga, gb = cuda.vocab_stats_bwd(ad, bd, td, stats, gd, as_map(inv_temp), kind, beta, alpha, True, bd is not None)
    assert ga.dtype == dtype and ga.shape == a.shape and ga.device == ad.device
    gtol = GRAD_TOL[dtype]
    assert_close(ga, ref_ga, gtol, f"grad_a kind={kind} V={v} {dtype}")
    if bd is not None:
        assert gb.dtype == dtype
        assert_close(gb, ref_gb, gtol, f"grad_b kind={kind} V={v} {dtype}")
    else:
        assert gb is None
    if targets is not None:
        ign = (targets < 0).to(dev)
        assert torch.all(ga[ign] == 0)
        if gb is not None:
            assert torch.all(gb[ign] == 0)
    return stats, ga, gb


# ----------------------------------------------------------------------------- GPU tests
@pytest.mark.parametrize("v", [151936])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: KIND_NAMES[k])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@on_gpu
def test_matches_reference(dtype, kind, v):
    run_case(4 if v > 30000 else 5, v, dtype, kind, 1 / 0.7, beta=0.3, alpha=0.5, seed=v + kind)


@on_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offsets", [(1, 1), (1, 0), (0, 3)], ids=["both-misaligned", "a-misaligned", "b-misaligned"])
def test_misaligned_pointers(dtype, offsets):
    """Views starting inside a 16-byte segment: the head/tail element path, and the all-scalar path
    when a and b are misaligned differently."""
    cuda = _cuda()
    n, v = 3, 1003
    a, b, targets, grads = make_inputs(n, v, dtype, seed=13)
    buf_a = torch.empty(n * v + 8, dtype=dtype, device="cuda")
    buf_b = torch.empty(n * v + 8, dtype=dtype, device="cuda")
    ad = buf_a[offsets[0]:offsets[0] + n * v].view(n, v)
    bd = buf_b[offsets[1]:offsets[1] + n * v].view(n, v)
    ad.copy_(a)
    bd.copy_(b)
    td = targets.cuda()
    for kind in (1, 3, 5):
        stats = cuda.vocab_stats_fwd(ad, bd, td, uniform_map(), kind, 0.5, 0.5, True)
        ref, ga_r, gb_r = reference(a, b, targets, 1.0, kind, 0.5, 0.5, grads)
        assert_close(stats.cpu()[:, :6], ref, STATS_TOL, f"misaligned stats kind={kind}")
        ga, gb = cuda.vocab_stats_bwd(ad, bd, td, stats, grads.float().cuda(), uniform_map(), kind, 0.5, 0.5,
                                      True, True)
        assert_close(ga, ga_r, GRAD_TOL[dtype], f"misaligned grad_a kind={kind}")
        assert_close(gb, gb_r, GRAD_TOL[dtype], f"misaligned grad_b kind={kind}")


@on_gpu
@pytest.mark.parametrize("scale", [4.0, 8.0])
@pytest.mark.parametrize("kind,alpha", [(3, 0.5), (5, 0.5), (6, 0.5), (7, 2.0), (7, -0.5), (7, 0.8), (7, 0.2)])
def test_far_apart_distributions(scale, kind, alpha):
    """Independent wide logits: the overflow-safe alternative forms of hellinger / chi2 / alpha."""
    cuda = _cuda()
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 2000, generator=g) * scale
    b = torch.randn(3, 2000, generator=g) * scale
    targets = torch.tensor([1, -1, 5])
    grads = torch.randn(3, 4, generator=g, dtype=torch.float64)
    stats = cuda.vocab_stats_fwd(a.cuda(), b.cuda(), targets.cuda(), uniform_map(), kind, 0.3, alpha, True)
    ref, ga_r, gb_r = reference(a, b, targets, 1.0, kind, 0.3, alpha, grads)
    assert_close(stats.cpu()[:, :6], ref, STATS_TOL, f"kind {kind} alpha {alpha}")
    ga, gb = cuda.vocab_stats_bwd(a.cuda(), b.cuda(), targets.cuda(), stats, grads.float().cuda(), uniform_map(), kind,
                                  0.3, alpha, True, True)
    assert_close(ga, ga_r, GRAD_TOL[torch.float32], "grad_a")
    assert_close(gb, gb_r, GRAD_TOL[torch.float32], "grad_b")


@on_gpu
def test_side_stream_and_empty():
    cuda = _cuda()
    a, b, targets, grads = make_inputs(8, 4096, torch.bfloat16, seed=14)
    a, b, targets = a.cuda(), b.cuda(), targets.cuda()
    ref = cuda.vocab_stats_fwd(a, b, targets, uniform_map(), 3, 0.5, 0.5, True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = cuda.vocab_stats_fwd(a, b, targets, uniform_map(), 3, 0.5, 0.5, True)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(got, ref)
    e = torch.zeros(0, 10, device="cuda")
    st = cuda.vocab_stats_fwd(e, None, None, uniform_map(), 0, 0.5, 0.5, True)
    assert st.shape == (0, 8)
    ga, gb = cuda.vocab_stats_bwd(e, None, None, st, torch.zeros(0, 4, device="cuda"), uniform_map(), 0, 0.5, 0.5,
                                  True, False)
    assert ga.shape == (0, 10) and gb is None
    with pytest.raises(TypeError, match="float64"):
        cuda.vocab_stats_fwd(a.double(), None, None, uniform_map(), 0, 0.5, 0.5, True)


# ----------------------------------------------------------------------------- binding tests (any machine)
_needs_cuda_build = pytest.mark.skipif(not _WITH_CUDA, reason="onepass._C was built without CUDA")


def _device_usable() -> bool:
    try:
        return _C.cuda_device_count() > 0
    except RuntimeError:
        return False


@_needs_cuda_build
def test_binding_without_device_raises():
    if _device_usable():
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError, match=r"onepass CUDA backend: no usable CUDA device \(cudaGetDeviceCount: "):
        _C.cuda_device_count()
    x = torch.zeros(2, 10)
    st = torch.zeros(2, 8)
    g = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="onepass CUDA backend: no usable CUDA device"):
        _C.vocab_stats_fwd_cuda(x.data_ptr(), 0, 0, st.data_ptr(), 2, 10, 0, 1.0, 0.0, 1.0, 0.0, 0, 0.5, 0.5, True,
                                0)
    with pytest.raises(RuntimeError, match="onepass CUDA backend: no usable CUDA device"):
        _C.vocab_stats_bwd_cuda(x.data_ptr(), 0, 0, st.data_ptr(), g.data_ptr(), x.data_ptr(), 0, 2, 10, 0, 1.0,
                                0.0, 1.0, 0.0, 0, 0.5, 0.5, 0)
    assert "cuda" not in onepass.available_backends("cuda")


@_needs_cuda_build
def test_binding_argument_errors():
    """Argument errors are reported before any device is touched (no device needed)."""
    with pytest.raises(TypeError, match="float64"):
        _C.vocab_stats_fwd_cuda(16, 0, 0, 16, 2, 10, 3, 1.0, 0.0, 1.0, 0.0, 0, 0.5, 0.5, True, 0)
    with pytest.raises(ValueError, match="kind"):
        _C.vocab_stats_fwd_cuda(16, 16, 0, 16, 2, 10, 0, 1.0, 0.0, 1.0, 0.0, 8, 0.5, 0.5, True, 0)
    with pytest.raises(ValueError, match="beta"):
        _C.vocab_stats_fwd_cuda(16, 16, 0, 16, 2, 10, 0, 1.0, 0.0, 1.0, 0.0, 3, 0.0, 0.5, True, 0)
    with pytest.raises(ValueError, match="alpha"):
        _C.vocab_stats_bwd_cuda(16, 16, 0, 16, 16, 16, 0, 2, 10, 0, 1.0, 0.0, 1.0, 0.0, 7, 0.5, 1.0, 0)
    with pytest.raises(ValueError, match="needs b"):
        _C.vocab_stats_fwd_cuda(16, 0, 0, 16, 2, 10, 0, 1.0, 0.0, 1.0, 0.0, 1, 0.5, 0.5, True, 0)
    # N == 0: nothing to launch, no device needed
    _C.vocab_stats_fwd_cuda(0, 0, 0, 0, 0, 10, 0, 1.0, 0.0, 1.0, 0.0, 0, 0.5, 0.5, True, 0)
