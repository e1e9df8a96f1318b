"""pytest-benchmark suite of the TRL integration (registry family `trl_logprobs`), parametrized over providers."""
import pytest

pytest.importorskip("trl")  # the family exists only when TRL is installed (optional peer)

from onepass.bench.pytest_support import params, run  # noqa: E402


@pytest.mark.parametrize("case,provider", params("trl_logprobs"))
def test_trl_logprobs(benchmark, case, provider):
    run(benchmark, case, provider)
