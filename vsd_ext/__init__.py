"""vsd_ext: kernels and training for Variational Speculative Decoding (VSD) drafters.

Importing the package loads the compiled op library `vsd_ext._C` (which registers
`torch.ops.vsd_ext.*`) and exposes typed wrappers for every op.
"""
from ._version import __version__
from ._loader import build_info, load_extension

load_extension()

from .ops import weighted_cross_entropy, weighted_linear_cross_entropy  # noqa: E402


__all__ = ["__version__", "build_info", "weighted_cross_entropy", "weighted_linear_cross_entropy"]
