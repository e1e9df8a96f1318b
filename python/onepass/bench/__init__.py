"""Benchmarks: `python -m onepass.bench`."""
