"""Drop-ins for trainers' per-token log-prob / entropy / divergence computations (optional dependencies,
imported lazily: ``import onepass.integrations.trl`` needs trl, ``.verl`` verl, ``.openrlhf`` openrlhf only
for its ``patch``).  See docs/integrations/."""
from ._common import UnsupportedOption  # noqa: F401
