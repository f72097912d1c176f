"""The TIES threshold's XLA implementation under the name the merging code used before it
moved to :mod:`cljax.kernels._ties_threshold.xla`: this module *is* that one (an alias in
``sys.modules``), so a name read or patched here is the kernel's own."""

import sys

from cljax.kernels._ties_threshold import xla

sys.modules[__name__] = xla
