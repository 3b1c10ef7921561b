"""Typed Python wrappers of the vsd_ext ops, their fake (meta) kernels and autograd rules.

One module per op family: verify.py, attention.py, cross_entropy.py.
"""
from .attention import tree_attention  # noqa: F401
from .verify import verify_tree  # noqa: F401
from .cross_entropy import weighted_cross_entropy, weighted_linear_cross_entropy  # noqa: F401
