"""Launchers of the C++/OpenMP kernels of ``onepass._C``, one module per kernel family."""
