"""pytest-benchmark suite of `onepass.linear_token_logprobs` (registry family `linear_logprobs`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("linear_logprobs"))
def test_linear_token_logprobs(benchmark, case, provider):
    run(benchmark, case, provider)
