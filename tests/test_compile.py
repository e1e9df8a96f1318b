"""The custom-op layer: ``torch.library.opcheck`` of the vocab-stats ops (forward and backward), and
``torch.compile(fullgraph=True)`` (inductor) of the public functions: same values and gradients as eager."""
import pytest
import torch

import onepass


from _helpers import backend_cases

OP_BACKENDS = [p for p in backend_cases(("triton", "cpu")) if p.values[1] == "cpu"]
if torch.cuda.is_available():
    OP_BACKENDS += [p for p in backend_cases(("triton", "cuda")) if p.values[1] == "cuda"]

# (kind, beta, alpha) of the stats ops: 0 logits only; 1 reverse KL; 3 JSD (two sweeps); 7 alpha
KINDS = [(0, 0.0, 0.0), (1, 0.0, 0.0), (3, 0.3, 0.0), (7, 0.0, 0.5)]
KIND_IDS = ["logp", "reverse_kl", "jsd", "alpha"]


def _kernel_targets(n, v, device):
    t = torch.randint(0, v, (n,), device=device)
    t[1] = -1  # an ignored row (the kernel form of ignore_index)
    return t


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def _op_cases(cases, ids, interp_ids):
    """(backend, device) x cases; the Triton interpreter (slow) gets only the cases in ``interp_ids``."""
    out = []
    for bp in OP_BACKENDS:
        backend, device = bp.values
        for case, cid in zip(cases, ids):
            if backend == "triton" and device == "cpu" and cid not in interp_ids:
                continue
            out.append(pytest.param(backend, device, *case, id=f"{bp.id}-{cid}", marks=bp.marks))
    return out


@pytest.mark.parametrize("backend,device,kind,beta,alpha", _op_cases(KINDS, KIND_IDS, ("logp", "jsd")))
def test_opcheck_vocab_stats(backend, device, kind, beta, alpha):
    n, v = 5, 37
    a = torch.randn(n, v, device=device, requires_grad=True)
    b = torch.randn(n, v, device=device, requires_grad=True) if kind else None
    t = _kernel_targets(n, v, device)
    # logit map (inv_temp, softcap) per model: a soft-capped, b plain at another temperature; then β, α
    hyper = torch.tensor([1 / 0.7, 3.0, 0.9, 0.0, beta, alpha], dtype=torch.float64)
    args = (a, b, t, kind, hyper, True, backend)
    _opcheck(torch.ops.onepass.vocab_stats.default, args)
    stats = torch.ops.onepass.vocab_stats.default(*args).detach()
    grads = torch.randn(n, 4, device=device)
    for need_a, need_b in [(True, kind != 0), (True, False), (False, kind != 0)]:
        if not (need_a or need_b):
            continue
        bargs = (a.detach(), b.detach() if b is not None else None, t, stats, grads, kind, hyper, need_a, need_b,
                 backend)
        _opcheck(torch.ops.onepass.vocab_stats_backward.default, bargs)


LINEAR_CASES = [(0, 0.0, 0.0, False), (0, 0.0, 0.0, True)] + [k + (True,) for k in KINDS[1:]]
LINEAR_IDS = ["logp", "policy_ref"] + KIND_IDS[1:]


@pytest.mark.parametrize("backend,device,kind,beta,alpha,second",
                         _op_cases(LINEAR_CASES, LINEAR_IDS, ("logp", "policy_ref", "jsd")))
def test_opcheck_linear_vocab_stats(backend, device, kind, beta, alpha, second):
    n, d, dr, v = 5, 8, 12, 37
    ha = torch.randn(n, d, device=device, requires_grad=True)
    wa = torch.randn(v, d, device=device, requires_grad=True)
    bias_a = torch.randn(v, device=device, requires_grad=True)
    hb = torch.randn(n, dr, device=device, requires_grad=True) if second else None
    wb = torch.randn(v, dr, device=device, requires_grad=True) if second else None
    bias_b = torch.randn(v, device=device) if second else None
    t = _kernel_targets(n, v, device)
    hyper = torch.tensor([1.3, 2.0, 1.1, 4.0, beta, alpha], dtype=torch.float64)  # both models soft-capped
    args = (ha, wa, bias_a, hb, wb, bias_b, t, kind, hyper, True, backend)
    _opcheck(torch.ops.onepass.linear_vocab_stats.default, args)
    stats = torch.ops.onepass.linear_vocab_stats.default(*args).detach()
    grads = torch.randn(n, 4, device=device)
    det = lambda x: x.detach() if x is not None else None  # noqa: E731
    needs_list = [[True, True, True, second, second, False],
                  [False, True, False, False, False, False],
                  [True, False, False, False, False, False]]
    for needs in needs_list:
        bargs = (det(ha), det(wa), det(bias_a), det(hb), det(wb), det(bias_b), t, stats, grads, kind, hyper, needs,
                 backend)
        _opcheck(torch.ops.onepass.linear_vocab_stats_backward.default, bargs)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------
def _leaves(*xs):
    return [x.detach().clone().requires_grad_(x.is_floating_point()) if x is not None else None for x in xs]


def _compare(f, inputs, grad_of=()):
    """Run f eagerly and compiled (fullgraph) on fresh leaves; values and gradients of ``grad_of`` (input
    positions) must agree."""
    eager_in, comp_in = _leaves(*inputs), _leaves(*inputs)
    for xs in (eager_in, comp_in):
        for i, x in enumerate(xs):
            if x is not None and i not in grad_of:
                x.requires_grad_(False)
    torch._dynamo.reset()
    out_e = f(*eager_in)
    out_c = torch.compile(f, fullgraph=True)(*comp_in)
    flat_e, flat_c = _flat(out_e), _flat(out_c)
    assert len(flat_e) == len(flat_c)
    for e, c in zip(flat_e, flat_c):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    if grad_of:
        ws = [torch.randn(e.shape, dtype=e.dtype) for e in flat_e]
        sum((e * w).sum() for e, w in zip(flat_e, ws) if e.requires_grad).backward()
        sum((c * w).sum() for c, w in zip(flat_c, ws) if c.requires_grad).backward()
        for i in grad_of:
            assert comp_in[i].grad is not None, f"input {i}: no gradient under compile"
            torch.testing.assert_close(comp_in[i].grad, eager_in[i].grad, rtol=1e-5, atol=1e-6)
    return out_c


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [x for o in out for x in _flat(o)]


@pytest.mark.parametrize("backend,device", [p for p in OP_BACKENDS if p.values[1] == "cpu"])
def test_compile_token_logprobs_with_entropy(backend, device):
    logits = torch.randn(2, 3, 50) * 2
    t = torch.randint(0, 50, (2, 3))
    t[0, 1] = -100

    def f(x, t):
        lp, ent = onepass.token_logprobs(x, t, temperature=0.8, return_entropy=True, backend=backend)
        return lp, ent, (lp * 2 - 0.1 * ent).sum()

    _compare(f, (logits, t), grad_of=(0,))


def test_compile_forced_torch_backend():
    """backend="torch" (plain PyTorch, traced by dynamo rather than called as a custom op) compiles with
    fullgraph: the launcher lookup and the stats assembly are traceable."""
    logits, other = torch.randn(5, 30) * 2, torch.randn(5, 30)
    t = torch.randint(0, 30, (5,))
    t[3] = -100

    def f(x, y, t):
        lp, ent = onepass.token_logprobs(x, t, temperature=0.7, return_entropy=True, backend="torch")
        div = onepass.divergence(x, y, kind="jsd", beta=0.4, targets=t, backend="torch")
        return lp, ent, div, onepass.sinkhorn_distance(x, y, epsilon=0.5, n_iters=4, backend="torch")

    _compare(f, (logits, other, t), grad_of=(0, 1))


def test_compile_linear_token_logprobs():
    h, w, b = torch.randn(2, 4, 16), torch.randn(64, 16) / 4, torch.randn(64)
    t = torch.randint(0, 64, (2, 4))
    t[1, 0] = -100

    def f(h, w, b, t):
        return onepass.linear_token_logprobs(h, w, t, bias=b, return_entropy=True, temperature=1.1, backend="cpu")

    _compare(f, (h, w, b, t), grad_of=(0, 1, 2))


def test_compile_divergence():
    a, b = torch.randn(6, 40), torch.randn(6, 40)
    t = torch.randint(0, 40, (6,))
    t[2] = -100

    def f(a, b, t):
        return (onepass.divergence(a, b, kind="jsd", beta=0.3, targets=t, backend="cpu"),
                onepass.divergence(a, b, kind="reverse_kl", temperature=2.0, backend="cpu"))

    _compare(f, (a, b, t), grad_of=(0, 1))


def test_compile_linear_policy_ref_stats():
    h, w, rh, rw = torch.randn(5, 12), torch.randn(48, 12) / 3, torch.randn(5, 20), torch.randn(48, 20) / 4
    t = torch.randint(0, 48, (5,))
    t[3] = -100

    def f(h, w, rh, rw, t):
        return onepass.linear_policy_ref_stats(h, w, rh, rw, t, temperature=0.9, backend="cpu")

    _compare(f, (h, w, rh, rw, t), grad_of=(0, 1))


@pytest.mark.parametrize("with_ref", [False, True], ids=["ref_logp", "ref_model"])
def test_compile_grpo_loss(with_ref):
    B, T, D, V = 2, 5, 16, 64
    h, w = torch.randn(B, T, D), torch.randn(V, D) / 4
    t = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.2).float()
    adv = torch.randn(B)
    old = -torch.rand(B, T) * 3
    if with_ref:
        rh, rw = torch.randn(B, T, 8), torch.randn(V, 8)

        def f(h, w, t, adv, mask, old, rh, rw):
            loss, m = onepass.grpo_loss(h, w, t, adv, mask=mask, old_logp=old, ref_hidden=rh, ref_weight=rw,
                                        beta=0.1, kl_estimator="full", entropy_coef=0.01, backend="cpu")
            return loss, m["kl"], m["clip_frac"]

        _compare(f, (h, w, t, adv, mask, old, rh, rw), grad_of=(0, 1))
    else:
        ref = -torch.rand(B, T) * 3

        def f(h, w, t, adv, mask, old, ref):
            loss, m = onepass.grpo_loss(h, w, t, adv, mask=mask, old_logp=old, ref_logp=ref, beta=0.1,
                                        loss_agg="seq-mean-token-mean", backend="cpu")
            return loss, m["kl"], m["pg_loss"]

        _compare(f, (h, w, t, adv, mask, old, ref), grad_of=(0, 1))


def test_compile_group_advantages():
    r = torch.randn(12)
    ids = torch.tensor([3, 1, 3, 2, 1, 1, 2, 3, 3, 1, 2, 7])

    def f(r, ids):
        return (onepass.group_advantages(r, group_size=4, backend="cpu"),
                onepass.group_advantages(r, group_ids=ids, estimator="rloo", backend="cpu"))

    _compare(f, (r, ids))


def test_compile_nn_modules():
    import onepass.nn as onn

    h, w = torch.randn(2, 3, 8), torch.randn(32, 8)
    t = torch.randint(0, 32, (2, 3))
    mod = onn.LinearTokenLogprobs(temperature=0.9, return_entropy=True, backend="cpu")
    _compare(lambda h, w, t: mod(h, w, t), (h, w, t), grad_of=(0, 1))


def test_nn_modules_match_functions():
    """onepass.nn wrappers (eager): stored keyword arguments, per-call overrides, same results as the functions."""
    import onepass.nn as onn

    B, T, D, V = 2, 3, 8, 32
    h, w, b = torch.randn(B, T, D), torch.randn(V, D), torch.randn(V)
    th, tw = torch.randn(B, T, 6), torch.randn(V, 6)
    t = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    adv = torch.randn(B)
    ref_lp = -torch.rand(B, T)
    mod = onn.LinearTokenLogprobs(temperature=0.9, return_entropy=True, backend="cpu")
    for got, want in zip(mod(h, w, t, bias=b), onepass.linear_token_logprobs(h, w, t, bias=b, temperature=0.9,
                                                                             return_entropy=True, backend="cpu")):
        torch.testing.assert_close(got, want)
    a, c = torch.randn(B, T, V), torch.randn(B, T, V)
    torch.testing.assert_close(onn.Divergence(kind="jsd", beta=0.2, backend="cpu")(a, c, t),
                               onepass.divergence(a, c, kind="jsd", beta=0.2, targets=t, backend="cpu"))
    grpo = onn.GRPOLoss(beta=0.05, kl_estimator="k2", loss_agg="seq-mean-token-sum", backend="cpu")
    got, _ = grpo(h, w, t, adv, mask, ref_logp=ref_lp)
    want, _ = onepass.grpo_loss(h, w, t, adv, mask=mask, ref_logp=ref_lp, beta=0.05, kl_estimator="k2",
                                loss_agg="seq-mean-token-sum", backend="cpu")
    torch.testing.assert_close(got, want)
    got, _ = grpo(h, w, t, adv, mask, ref_logp=ref_lp, beta=0.5)  # a per-call override wins
    want, _ = onepass.grpo_loss(h, w, t, adv, mask=mask, ref_logp=ref_lp, beta=0.5, kl_estimator="k2",
                                loss_agg="seq-mean-token-sum", backend="cpu")
    torch.testing.assert_close(got, want)
    opd = onn.OPDLoss(divergence="forward_kl", backend="cpu")
    torch.testing.assert_close(opd(h, w, th, tw, t, mask)[0],
                               onepass.opd_loss(h, w, th, tw, t, mask=mask, divergence="forward_kl", backend="cpu")[0])
    with pytest.raises(ValueError, match="kind"):
        onn.Divergence(kind="nope")(a, c)
    try:
        from onepass.sinkhorn import sinkhorn_distance
    except ImportError:
        sinkhorn_distance = getattr(onepass, "sinkhorn_distance", None)
    if sinkhorn_distance is not None:
        sk = onn.SinkhornDistance(epsilon=0.5, n_iters=5, cost="l1")
        torch.testing.assert_close(sk(a.reshape(-1, V), c.reshape(-1, V)),
                                   sinkhorn_distance(a.reshape(-1, V), c.reshape(-1, V), epsilon=0.5, n_iters=5,
                                                     cost="l1"))


def test_compile_dynamic_shapes():
    """dynamic=True: one graph for several N (Python float options must not break the trace)."""
    def f(x, t):
        lp, ent = onepass.token_logprobs(x, t, return_entropy=True, backend="cpu")
        return lp, ent

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, dynamic=True)
    for n in (3, 5, 8):
        x = torch.randn(n, 20)
        t = torch.randint(0, 20, (n,))
        for c, e in zip(cf(x, t), f(x, t)):
            torch.testing.assert_close(c, e)


def test_compile_out_of_range_target_is_not_silent():
    """Under torch.compile the eager range check of targets is skipped; the kernels must then not read
    another row's logit: an out-of-range target must raise or give NaN (not a plausible wrong value)."""
    x = torch.randn(4, 20)
    t = torch.tensor([1, 25, 3, 4])  # 25 >= V: row 1 would read x[2, 5] without a bounds check
    torch._dynamo.reset()
    cf = torch.compile(lambda x, t: onepass.token_logprobs(x, t, backend="cpu"), fullgraph=True)
    try:
        out = cf(x, t)
    except (RuntimeError, ValueError, IndexError):
        return
    assert torch.isnan(out[1]), f"out-of-range target gave the finite value {out[1].item()} under compile"
