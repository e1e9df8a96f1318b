"""Backend dispatch: available_backends, auto choice, and the fallback when onepass._C is missing."""
import sys
import warnings

import pytest
import torch

import onepass
from onepass import _dispatch
from onepass.backends import _common


def test_available_backends_here():
    backends = onepass.available_backends("cpu")
    assert "torch" in backends and "cpu" in backends  # CI builds onepass._C
    assert _dispatch.resolve_backend("auto", torch.zeros(1), "vocab_stats", "op") == "cpu"


def test_missing_compiled_module_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(_common, "_COMPILED", [])
    monkeypatch.setitem(sys.modules, "onepass._C", None)  # the import now fails, as with no build
    monkeypatch.delattr(onepass, "_C", raising=False)
    x = torch.randn(4, 50)
    t = torch.randint(0, 50, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = onepass.token_logprobs(x, t)
        onepass.token_logprobs(x, t)
    assert len([w for w in caught if "onepass._C" in str(w.message)]) == 1
    assert "cpu" not in onepass.available_backends("cpu")
    torch.testing.assert_close(got, onepass.reference.token_logprobs(x, t))
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run here: the compiled module"):
        onepass.token_logprobs(x, t, backend="cpu")

