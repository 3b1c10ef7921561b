"""Metadata checks of the fake (meta) kernels.

The C++ ops check every argument (csrc/common.h and the per-op check headers). Fake and meta
tensors never reach those checks — torch.compile traces with fake tensors, and a call that
mixes in a meta tensor dispatches to the fake kernel — so the fakes check shapes, dtypes and
devices themselves, raising the same `ValueError` naming the argument. The wrappers do not
call these: on real tensors the C++ checks run.
"""
from __future__ import annotations

import math

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(arg: str, msg: str):
    raise ValueError(f"vsd_ext: argument '{arg}': {msg}")


def check_rank(t, arg: str, rank: int, layout: str) -> tuple[int, ...]:
    """The shape of a tensor of ``rank`` dimensions (``layout`` names them)."""
    if not isinstance(t, torch.Tensor):
        fail(arg, f"expected a tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        fail(arg, f"expected a {rank}-D tensor {layout}, got shape {list(t.shape)}")
    return tuple(t.shape)


def check_dtype(t: torch.Tensor, arg: str, dtypes) -> None:
    if t.dtype not in dtypes:
        fail(arg, f"expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def check_tensor(t, arg: str, shape, dtypes, ref: torch.Tensor, ref_name: str) -> None:
    """Exact shape, one of ``dtypes``, and the device of ``ref`` (named ``ref_name``)."""
    if not isinstance(t, torch.Tensor):
        fail(arg, f"expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        fail(arg, f"expected shape {list(shape)}, got {list(t.shape)}")
    check_dtype(t, arg, dtypes)
    check_device(t, arg, ref, ref_name)


def check_device(t: torch.Tensor, arg: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        fail(arg, f"expected device {ref.device} (that of '{ref_name}'), got {t.device}")


def check_positive(value, arg: str) -> None:
    """A finite float > 0 (temperatures)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        fail(arg, f"expected a finite value > 0, got {value}")
