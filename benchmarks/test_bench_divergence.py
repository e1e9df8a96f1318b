"""pytest-benchmark suite of `onepass.divergence` (registry family `divergence`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("divergence"))
def test_divergence(benchmark, case, provider):
    run(benchmark, case, provider)
