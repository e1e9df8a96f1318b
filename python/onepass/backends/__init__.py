"""Backend launchers: thin layers that validate nothing, allocate outputs and call one kernel.

Each module (``cpu``, ``cuda``, ``onepass.triton_kernels``) implements the launcher signatures of
``docs/vocab_stats.md``.  Argument checking happens once, in the public functions.
"""
