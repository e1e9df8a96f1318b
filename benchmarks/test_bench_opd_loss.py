"""pytest-benchmark suite of `onepass.opd_loss` (registry family `opd_loss`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("opd_loss"))
def test_opd_loss(benchmark, case, provider):
    run(benchmark, case, provider)
