"""pytest-benchmark suite of `onepass.token_logprobs` (registry family `logprobs`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("logprobs"))
def test_token_logprobs(benchmark, case, provider):
    run(benchmark, case, provider)
