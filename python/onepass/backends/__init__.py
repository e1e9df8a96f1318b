"""Backend launchers: thin layers that validate nothing, allocate outputs and call one kernel.

One sub-package per backend (``cpu``, ``cuda``, ``torch``; the Triton launchers live next to their
kernels in ``onepass.triton_kernels``), one module per kernel family with the same file name and
functions in each (``vocab_stats``, ``sinkhorn``, ``advantages``).  ``onepass._dispatch.LAUNCHERS``
lists them.  Argument checking happens once, in the public functions.
"""
