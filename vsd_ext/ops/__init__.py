"""Typed Python wrappers of the vsd_ext ops, their fake (meta) kernels and autograd rules.

One module per op family: verify.py, attention.py, cross_entropy.py, divergence.py; checks.py
holds the metadata checks of the fake kernels (the C++ ops check real tensors themselves).
"""
from .attention import tree_attention
from .cross_entropy import weighted_cross_entropy, weighted_linear_cross_entropy
from .divergence import weighted_linear_divergence
from .verify import verify_tree

__all__ = ["tree_attention", "verify_tree", "weighted_cross_entropy",
           "weighted_linear_cross_entropy", "weighted_linear_divergence"]
