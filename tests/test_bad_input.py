"""Bad inputs raise clear errors that name the argument; odd-but-valid inputs (non-contiguous, empty) work."""
import pytest
import torch

import onepass

V, D, DR = 11, 6, 5
LONG = torch.int64


def _logits(*lead, v=V):
    return torch.randn(*lead, v)


def _targets(*lead, v=V):
    return torch.randint(0, v, lead)


def _lin(b=2, t=3, d=D, v=V):
    return torch.randn(b, t, d), torch.randn(v, d) / d ** 0.5, torch.randint(0, v, (b, t))


# Every op with valid small inputs: (function, names of its positional arguments, builder of the inputs).
def _in_token_logprobs():
    return dict(logits=_logits(2, 3), targets=_targets(2, 3))


def _in_linear_token_logprobs():
    h, w, t = _lin()
    return dict(hidden=h, weight=w, targets=t)


def _in_divergence():
    return dict(student_logits=_logits(2, 3), teacher_logits=_logits(2, 3))


def _in_linear_divergence():
    h, w, t = _lin()
    return dict(student_hidden=h, student_weight=w, teacher_hidden=torch.randn(2, 3, DR),
                teacher_weight=torch.randn(V, DR), targets=t)


def _in_linear_policy_ref_stats():
    h, w, t = _lin()
    return dict(hidden=h, weight=w, ref_hidden=torch.randn(2, 3, DR), ref_weight=torch.randn(V, DR), targets=t)


def _in_kl_penalty():
    return dict(logp=-torch.rand(2, 3), ref_logp=-torch.rand(2, 3))


def _in_grpo_loss():
    h, w, t = _lin()
    return dict(hidden=h, weight=w, targets=t, advantages=torch.randn(2), mask=torch.ones(2, 3))


def _in_opd_loss():
    h, w, t = _lin()
    return dict(student_hidden=h, student_weight=w, teacher_hidden=torch.randn(2, 3, DR),
                teacher_weight=torch.randn(V, DR), targets=t, mask=torch.ones(2, 3))


def _in_group_advantages():
    return dict(rewards=torch.randn(6), group_size=3)


POSITIONAL = {
    "token_logprobs": ("logits", "targets"),
    "linear_token_logprobs": ("hidden", "weight", "targets"),
    "divergence": ("student_logits", "teacher_logits"),
    "linear_divergence": ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight"),
    "linear_policy_ref_stats": ("hidden", "weight", "ref_hidden", "ref_weight", "targets"),
    "kl_penalty": ("logp", "ref_logp"),
    "grpo_loss": ("hidden", "weight", "targets", "advantages"),
    "opd_loss": ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "targets"),
    "group_advantages": ("rewards",),
}


def _caller(op):
    build = globals()[f"_in_{op}"]

    def call(**over):
        a = build()
        a.update(over)
        pos = [a.pop(k) for k in POSITIONAL[op]]
        return getattr(onepass, op)(*pos, **a)

    call.__name__ = f"call_{op}"
    call.inputs = build
    return call


call_token_logprobs = _caller("token_logprobs")
call_linear_token_logprobs = _caller("linear_token_logprobs")
call_divergence = _caller("divergence")
call_linear_divergence = _caller("linear_divergence")
call_linear_policy_ref_stats = _caller("linear_policy_ref_stats")
call_kl_penalty = _caller("kl_penalty")
call_grpo_loss = _caller("grpo_loss")
call_opd_loss = _caller("opd_loss")
call_group_advantages = _caller("group_advantages")


WITH_TARGETS = [call_token_logprobs, call_linear_token_logprobs, call_linear_policy_ref_stats, call_grpo_loss,
                call_opd_loss]
WITH_OPTIONAL_TARGETS = [call_divergence, call_linear_divergence]
WITH_TEMPERATURE = WITH_TARGETS + WITH_OPTIONAL_TARGETS
WITH_BACKEND = WITH_TEMPERATURE + [call_group_advantages]
ids = lambda fs: [f.__name__[5:] for f in fs]  # noqa: E731


def test_valid_calls_run():
    for f in WITH_BACKEND + [call_kl_penalty]:
        f()


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [V, V + 5, -1, -99])
@pytest.mark.parametrize("f", WITH_TARGETS + WITH_OPTIONAL_TARGETS, ids=ids(WITH_TARGETS + WITH_OPTIONAL_TARGETS))
def test_targets_out_of_range(f, bad):
    t = torch.randint(0, V, (2, 3))
    t[1, 2] = bad
    # (for the divergences targets only mask ignore_index positions; another out-of-range value is still an error)
    with pytest.raises(ValueError, match=r"targets.*outside \[0, 11\)"):
        f(targets=t)


@pytest.mark.parametrize("f", WITH_TARGETS + WITH_OPTIONAL_TARGETS, ids=ids(WITH_TARGETS + WITH_OPTIONAL_TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_targets_wrong_dtype(f, dtype):
    t = torch.randint(0, V, (2, 3)).to(dtype)
    with pytest.raises(TypeError, match="targets"):
        f(targets=t)


def test_int32_targets_accepted():
    logits, t = _logits(2, 3), _targets(2, 3)
    torch.testing.assert_close(onepass.token_logprobs(logits, t.int()), onepass.token_logprobs(logits, t))


def test_targets_ignore_index_custom():
    logits, t = _logits(4), _targets(4)
    t[1] = -1
    with pytest.raises(ValueError, match="targets"):
        onepass.token_logprobs(logits, t)
    lp = onepass.token_logprobs(logits, t, ignore_index=-1)
    assert lp[1] == 0


@pytest.mark.parametrize("f", WITH_TARGETS + WITH_OPTIONAL_TARGETS, ids=ids(WITH_TARGETS + WITH_OPTIONAL_TARGETS))
def test_targets_shape_mismatch(f):
    with pytest.raises(ValueError, match="targets"):
        f(targets=torch.randint(0, V, (2, 4)))


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
def test_divergence_student_teacher_shape_mismatch():
    with pytest.raises(ValueError, match="teacher_logits.*student_logits"):
        call_divergence(teacher_logits=_logits(2, 3, v=V + 1))
    with pytest.raises(ValueError, match="teacher_logits.*student_logits"):
        call_divergence(teacher_logits=_logits(3, 3))


def test_kl_penalty_shape_mismatch():
    with pytest.raises(ValueError, match="ref_logp.*logp"):
        call_kl_penalty(ref_logp=-torch.rand(2, 4))


@pytest.mark.parametrize("f,names", [
    (call_linear_token_logprobs, dict(weight=torch.randn(V, D + 1))),
    (call_linear_policy_ref_stats, dict(weight=torch.randn(V, D + 1))),
    (call_grpo_loss, dict(weight=torch.randn(V, D + 1))),
    (call_linear_divergence, dict(student_weight=torch.randn(V, D + 1))),
    (call_opd_loss, dict(student_weight=torch.randn(V, D + 1))),
], ids=["linear_token_logprobs", "linear_policy_ref_stats", "grpo_loss", "linear_divergence", "opd_loss"])
def test_weight_d_mismatch(f, names):
    (name,) = names
    hname = name.replace("weight", "hidden")
    with pytest.raises(ValueError, match=rf"{name} has D={D + 1} but {hname} has D={D}"):
        f(**names)


@pytest.mark.parametrize("f,prefix", [(call_linear_policy_ref_stats, "ref_"), (call_linear_divergence, "teacher_"),
                                      (call_opd_loss, "teacher_")], ids=["policy_ref", "linear_divergence", "opd"])
def test_second_model_weight_d_mismatch(f, prefix):
    with pytest.raises(ValueError, match=rf"{prefix}weight has D={DR + 1} but {prefix}hidden has D={DR}"):
        f(**{f"{prefix}weight": torch.randn(V, DR + 1)})


@pytest.mark.parametrize("f,name", [(call_linear_policy_ref_stats, "ref_weight"),
                                    (call_linear_divergence, "teacher_weight"), (call_opd_loss, "teacher_weight")],
                         ids=["policy_ref", "linear_divergence", "opd"])
def test_second_model_vocab_mismatch(f, name):
    with pytest.raises(ValueError, match=rf"{name} has V={V + 2}"):
        f(**{name: torch.randn(V + 2, DR)})


def test_weight_not_2d_and_bad_bias():
    with pytest.raises(ValueError, match="weight"):
        call_linear_token_logprobs(weight=torch.randn(1, V, D))
    with pytest.raises(ValueError, match="bias"):
        call_linear_token_logprobs(bias=torch.randn(V + 1))


def test_loss_shapes():
    with pytest.raises(ValueError, match="advantages"):
        call_grpo_loss(advantages=torch.randn(3))
    with pytest.raises(ValueError, match="mask"):
        call_grpo_loss(mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask"):
        call_opd_loss(mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="old_logp"):
        call_grpo_loss(old_logp=torch.randn(2, 4))
    with pytest.raises(ValueError, match="hidden"):
        call_grpo_loss(hidden=torch.randn(6, D), targets=_targets(6))  # [B, T, D] required
    with pytest.raises(ValueError, match="teacher_hidden"):
        call_opd_loss(teacher_hidden=torch.randn(2, 4, DR))


def test_group_advantages_shapes():
    with pytest.raises(ValueError, match="group_size"):
        call_group_advantages(group_size=4)
    with pytest.raises(ValueError, match="rewards"):
        call_group_advantages(rewards=torch.randn(2, 3))
    with pytest.raises(ValueError, match="group_ids"):
        call_group_advantages(group_size=None, group_ids=torch.zeros(5, dtype=LONG))
    with pytest.raises(TypeError, match="group_ids"):
        call_group_advantages(group_size=None, group_ids=torch.zeros(6))
    with pytest.raises(ValueError, match="rewards"):
        call_group_advantages(rewards=torch.tensor([1.0, float("nan"), 0, 0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# scalar options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("f", WITH_TEMPERATURE, ids=ids(WITH_TEMPERATURE))
@pytest.mark.parametrize("T", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_temperature(f, T):
    with pytest.raises(ValueError, match="temperature"):
        f(temperature=T)


@pytest.mark.parametrize("f", [call_divergence, call_linear_divergence], ids=["divergence", "linear_divergence"])
def test_bad_kind(f):
    with pytest.raises(ValueError, match="kind"):
        f(kind="kl")


def test_bad_opd_divergence():
    with pytest.raises(ValueError, match="divergence"):
        call_opd_loss(divergence="bogus")


@pytest.mark.parametrize("f,kw", [(call_divergence, "kind"), (call_linear_divergence, "kind"),
                                  (call_opd_loss, "divergence")], ids=["divergence", "linear_divergence", "opd"])
@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_jsd_beta_out_of_range(f, kw, beta):
    with pytest.raises(ValueError, match="beta"):
        f(**{kw: "jsd", "beta": beta})


def test_bad_kl_estimator():
    with pytest.raises(ValueError, match="estimator"):
        call_kl_penalty(estimator="k4")
    with pytest.raises(ValueError, match="estimator"):
        call_kl_penalty(estimator="k3++")
    with pytest.raises(ValueError, match="estimator"):
        call_grpo_loss(beta=0.1, ref_logp=-torch.rand(2, 3), kl_estimator="k9")
    with pytest.raises(ValueError, match="clamp"):
        call_kl_penalty(clamp=0.0)


def test_bad_advantage_estimator_and_scale():
    with pytest.raises(ValueError, match="estimator"):
        call_group_advantages(estimator="ppo")
    with pytest.raises(ValueError, match="scale"):
        call_group_advantages(scale="sequence")


@pytest.mark.parametrize("f", [call_grpo_loss, call_opd_loss], ids=["grpo", "opd"])
def test_bad_loss_agg(f):
    with pytest.raises(ValueError, match="loss_agg"):
        f(loss_agg="mean")


@pytest.mark.parametrize("f", WITH_BACKEND, ids=ids(WITH_BACKEND))
def test_bad_backend_name(f):
    with pytest.raises(ValueError, match="backend"):
        f(backend="bogus")


@pytest.mark.parametrize("f", WITH_BACKEND, ids=ids(WITH_BACKEND))
def test_forced_cuda_backend_on_cpu_tensors(f):
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run here: .*CPU tensors|backend 'cuda' cannot "
                                           r"run here: .*cpu tensors|backend 'cuda' cannot run here: .*built"):
        f(backend="cuda")


def test_forced_triton_without_gpu_or_interpreter(monkeypatch):
    from onepass import _dispatch

    if not _dispatch._TRITON_INSTALLED:
        pytest.skip("triton is not installed (the error then says so; checked below)")
    monkeypatch.setattr(_dispatch, "triton_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run here: .*CUDA tensors"):
        call_token_logprobs(backend="triton")


def test_float64_on_gpu_backend_is_a_type_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (float64 is refused by the GPU backends only)")
    x = torch.randn(3, V, dtype=torch.float64, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        onepass.token_logprobs(x, torch.zeros(3, dtype=LONG, device="cuda"), backend="triton")


# ---------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------
OTHER = "cuda" if torch.cuda.is_available() else "meta"  # meta: a second device without a GPU

DEVICE_CASES = [
    (call_token_logprobs, "targets"),
    (call_linear_token_logprobs, "weight"),
    (call_linear_token_logprobs, "targets"),
    (call_divergence, "teacher_logits"),
    (call_linear_divergence, "teacher_weight"),
    (call_linear_divergence, "teacher_hidden"),
    (call_linear_policy_ref_stats, "ref_hidden"),
    (call_linear_policy_ref_stats, "weight"),
    (call_kl_penalty, "ref_logp"),
    (call_grpo_loss, "weight"),
    (call_grpo_loss, "advantages"),
    (call_grpo_loss, "mask"),
    (call_opd_loss, "teacher_weight"),
    (call_opd_loss, "mask"),
]


@pytest.mark.parametrize("f,name", DEVICE_CASES, ids=[f"{f.__name__[5:]}-{n}" for f, n in DEVICE_CASES])
def test_tensors_on_different_devices(f, name):
    value = f.inputs()[name]
    with pytest.raises(ValueError, match=rf"{name} is on {OTHER}.*one device"):
        f(**{name: value.to(OTHER)})


def test_group_ids_on_other_device():
    with pytest.raises(ValueError, match=rf"group_ids is on {OTHER}"):
        call_group_advantages(group_size=None, group_ids=torch.zeros(6, dtype=LONG, device=OTHER))


# ---------------------------------------------------------------------------------------------
# non-contiguous and empty inputs
# ---------------------------------------------------------------------------------------------
BACKENDS_CPU = ["cpu", "torch"]


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_non_contiguous_logits_ops(backend):
    base = torch.randn(5, 4, 2 * V)
    logits = base[..., ::2].transpose(0, 1)  # [4, 5, V], strided in every dim
    teacher = torch.randn(V, 5, 4).permute(2, 1, 0)
    t = torch.randint(0, V, (5, 4)).T
    assert not logits.is_contiguous() and not teacher.is_contiguous() and not t.is_contiguous()
    got = onepass.token_logprobs(logits, t, return_entropy=True, backend=backend)
    want = onepass.token_logprobs(logits.contiguous(), t.contiguous(), return_entropy=True, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(onepass.divergence(logits, teacher, kind="jsd", backend=backend),
                               onepass.divergence(logits.contiguous(), teacher.contiguous(), kind="jsd",
                                                  backend=backend))
    # gradients through a non-contiguous view
    x1 = base.clone().requires_grad_()
    x2 = base.clone().requires_grad_()
    onepass.token_logprobs(x1[..., ::2].transpose(0, 1), t, backend=backend).sum().backward()
    onepass.token_logprobs(x2[..., ::2].transpose(0, 1).contiguous(), t.contiguous(), backend=backend).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_non_contiguous_linear_ops(backend):
    hidden = torch.randn(3, 2, D).transpose(0, 1)      # [2, 3, D] non-contiguous
    weight = torch.randn(D, V).T                       # [V, D] non-contiguous (a transposed matrix)
    bias = torch.randn(2 * V)[::2]
    t = torch.randint(0, V, (3, 2)).T
    rh = torch.randn(DR, 3, 2).permute(2, 1, 0)
    rw = torch.randn(DR, V).T
    c = lambda x: x.contiguous()  # noqa: E731
    torch.testing.assert_close(onepass.linear_token_logprobs(hidden, weight, t, bias=bias, backend=backend),
                               onepass.linear_token_logprobs(c(hidden), c(weight), c(t), bias=c(bias), backend=backend))
    got = onepass.linear_policy_ref_stats(hidden, weight, rh, rw, t, bias=bias, backend=backend)
    want = onepass.linear_policy_ref_stats(c(hidden), c(weight), c(rh), c(rw), c(t), bias=c(bias), backend=backend)
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    torch.testing.assert_close(onepass.linear_divergence(hidden, weight, rh, rw, backend=backend),
                               onepass.linear_divergence(c(hidden), c(weight), c(rh), c(rw), backend=backend))
    # gradients w.r.t. a non-contiguous weight leaf
    w1 = torch.randn(D, V, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    onepass.linear_token_logprobs(hidden, w1.T, t, backend=backend).sum().backward()
    onepass.linear_token_logprobs(c(hidden), c(w2.T), c(t), backend=backend).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    mask = torch.ones(4, 3)[::2].T.T  # [2, 3] from a strided view
    adv = torch.randn(4)[::2]
    l1, _ = onepass.grpo_loss(hidden, weight, t, adv, mask=mask, backend=backend)
    l2, _ = onepass.grpo_loss(c(hidden), c(weight), c(t), c(adv), mask=c(mask), backend=backend)
    torch.testing.assert_close(l1, l2)


def test_non_contiguous_small_ops():
    lp = -torch.rand(4, 6)[:, ::2]
    rl = -torch.rand(3, 4).T
    torch.testing.assert_close(onepass.kl_penalty(lp, rl), onepass.kl_penalty(lp.contiguous(), rl.contiguous()))
    r = torch.randn(12)[::2]
    torch.testing.assert_close(onepass.group_advantages(r, group_size=3), onepass.group_advantages(r.contiguous(),
                                                                                                   group_size=3))


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_empty_inputs_give_empty_outputs(backend):
    e = torch.empty(0, 4, V)
    te = torch.empty(0, 4, dtype=LONG)
    lp, ent = onepass.token_logprobs(e, te, return_entropy=True, backend=backend)
    assert lp.shape == (0, 4) and ent.shape == (0, 4) and lp.dtype == torch.float32
    assert onepass.divergence(e, e, backend=backend).shape == (0, 4)
    h, w = torch.empty(0, D), torch.randn(V, D)
    t0 = torch.empty(0, dtype=LONG)
    assert onepass.linear_token_logprobs(h, w, t0, backend=backend).shape == (0,)
    assert onepass.linear_divergence(h, w, torch.empty(0, DR), torch.randn(V, DR), backend=backend).shape == (0,)
    stats = onepass.linear_policy_ref_stats(h, w, torch.empty(0, DR), torch.randn(V, DR), t0, backend=backend)
    assert all(v.shape == (0,) for v in stats.values())
    assert onepass.kl_penalty(torch.empty(0, 3), torch.empty(0, 3)).shape == (0, 3)
    assert onepass.group_advantages(torch.empty(0), group_size=4, backend=backend).shape == (0,)
    # backward through empty outputs
    x = torch.empty(0, V, requires_grad=True)
    onepass.token_logprobs(x, torch.empty(0, dtype=LONG), backend=backend).sum().backward()
    assert x.grad.shape == (0, V)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_empty_loss_batch(backend):
    """B = 0 sequences: loss 0 (nothing to average), no NaN."""
    h, w = torch.empty(0, 3, D), torch.randn(V, D)
    t, m = torch.empty(0, 3, dtype=LONG), torch.empty(0, 3)
    loss, _ = onepass.grpo_loss(h, w, t, torch.empty(0), mask=m, backend=backend)
    assert loss.item() == 0.0
    loss, _ = onepass.opd_loss(h, w, torch.empty(0, 3, DR), torch.randn(V, DR), t, mask=m, backend=backend)
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# V = 0
# ---------------------------------------------------------------------------------------------
V0_CASES = {
    "token_logprobs": (r"logits.*(V=0|vocab)",
                       lambda be: onepass.token_logprobs(torch.randn(3, 0), torch.full((3,), -100), backend=be)),
    "divergence": (r"logits.*(V=0|vocab)",
                   lambda be: onepass.divergence(torch.randn(3, 0), torch.randn(3, 0), backend=be)),
    "linear_token_logprobs": (r"weight.*(V=0|vocab)",
                              lambda be: onepass.linear_token_logprobs(torch.randn(3, 4), torch.randn(0, 4),
                                                                       torch.full((3,), -100), backend=be)),
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("op", list(V0_CASES))
def test_empty_vocabulary_is_a_clear_error(op, backend):
    """A vocabulary of size 0 has no distribution: expect a ValueError naming the logits / weight and V
    (currently: an internal reshape / index error, or silently 0 for divergence on the torch backend)."""
    match, call = V0_CASES[op]
    with pytest.raises(ValueError, match=match):
        call(backend)
