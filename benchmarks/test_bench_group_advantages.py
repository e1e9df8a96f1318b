"""pytest-benchmark suite of `onepass.group_advantages` (registry family `group_advantages`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("group_advantages"))
def test_group_advantages(benchmark, case, provider):
    run(benchmark, case, provider)
