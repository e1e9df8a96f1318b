"""pytest-benchmark suite of `onepass.linear_divergence` (registry family `linear_divergence`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("linear_divergence"))
def test_linear_divergence(benchmark, case, provider):
    run(benchmark, case, provider)
