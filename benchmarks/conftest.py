"""pytest-benchmark suites of onepass: ``pytest benchmarks --benchmark-only`` (see README.md)."""
import os


def pytest_addoption(parser):
    parser.addoption("--bench-shapes", default=None, choices=("quick", "default"),
                     help="quick (tiny, default) or default (the CLI's default shapes of the device)")


def pytest_configure(config):
    shapes = config.getoption("--bench-shapes")
    if shapes:
        os.environ["ONEPASS_BENCH_SHAPES"] = shapes
