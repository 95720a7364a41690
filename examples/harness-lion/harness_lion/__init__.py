"""harness-lion: the Lion optimizer (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") as a
gpu-harness technique on the ``optimizer`` axis. The harness finds it through the ``harness.plugins`` entry point
in this package's setup.cfg; nothing in the harness names it."""
from harness_lion.optim import Lion

__all__ = ["Lion"]
__version__ = "0.1.0"
