"""vsd_ext: kernels and training for Variational Speculative Decoding (VSD) drafters.

Importing the package loads the compiled op libraries (`vsd_ext._C`, the schemas and CPU kernels
of `torch.ops.vsd_ext.*`, and `vsd_ext._C_cuda`, the CUDA kernels, when torch has CUDA) and
exposes typed wrappers for every op. The subpackages read straight down, each using only those
below it (docs/design/ARCHITECTURE.md):

    app → {eval, training} → decoding → models → tree → ops
"""
from ._loader import build_info, load_extension
from ._version import __version__

load_extension()

from . import corpus, tree  # noqa: E402
from .decoding import OracleDrafter, TreeConfig, calibrate_drafter, generate  # noqa: E402
from .eval import evaluate  # noqa: E402
from .models import DecodeSettings, Drafter, load_drafter, load_target  # noqa: E402
from .ops import (  # noqa: E402
    tree_attention,
    verify_tree,
    weighted_cross_entropy,
    weighted_linear_cross_entropy,
    weighted_linear_divergence,
)
from .training.trainer import train_drafter  # noqa: E402

__all__ = ["__version__", "build_info", "tree_attention", "verify_tree", "weighted_cross_entropy",
           "weighted_linear_cross_entropy", "weighted_linear_divergence", "corpus", "tree",
           "Drafter", "load_drafter", "load_target", "generate", "TreeConfig", "OracleDrafter",
           "evaluate", "train_drafter", "calibrate_drafter", "DecodeSettings"]
