"""pytest-benchmark suite of `onepass.grpo_loss` (registry family `grpo_loss`), parametrized over providers."""
import pytest

from onepass.bench.pytest_support import params, run


@pytest.mark.parametrize("case,provider", params("grpo_loss"))
def test_grpo_loss(benchmark, case, provider):
    run(benchmark, case, provider)
