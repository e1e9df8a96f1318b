"""pytest-benchmark suite of `onepass.linear_policy_ref_stats` (registry family `policy_ref`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("policy_ref"))
def test_linear_policy_ref_stats(benchmark, case, provider):
    run(benchmark, case, provider)
