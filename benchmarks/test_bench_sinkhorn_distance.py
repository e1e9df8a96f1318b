"""pytest-benchmark suite of `onepass.sinkhorn_distance` (registry family `sinkhorn`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("sinkhorn"))
def test_sinkhorn_distance(benchmark, case, provider):
    run(benchmark, case, provider)
