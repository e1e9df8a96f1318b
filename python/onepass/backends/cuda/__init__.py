"""Launchers of the CUDA kernels of ``onepass._C``, one module per kernel family."""
