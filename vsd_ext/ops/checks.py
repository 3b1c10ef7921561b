"""Metadata checks of the fake (meta) kernels.

The C++ ops check every argument (csrc/common.h and the per-op check headers). Fake and meta
tensors never reach those checks — torch.compile traces with fake tensors, and a call that
mixes in a meta tensor dispatches to the fake kernel — so the fakes check shapes, dtypes and
devices themselves, raising the same `ValueError` naming the argument. The wrappers do not
call these: on real tensors the C++ checks run.
"""
from __future__ import annotations

import math
import numbers

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
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        fail(arg, f"expected a finite value > 0, got {value}")


def real_scalar(value, arg: str) -> float:
    """A Python number (not a bool) or a 0-D real tensor, as a float for the op schemas
    (whose own checks then test its range); anything else is named."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() \
            and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    fail(arg, f"expected a number, got {type(value).__name__} {value!r:.40}")


def chunk_arg(chunk_size) -> int:
    """``chunk_size`` of the fused linear ops: None (the ops' 0, their default) or an int
    >= 1 (not a bool)."""
    if chunk_size is None:
        return 0
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        fail("chunk_size", f"expected None or an int >= 1, got {chunk_size!r}")
    return chunk_size


def check_linear_head(hidden, weight, bias, chunk_size) -> tuple[int, int, int]:
    """The LM-head arguments the fused linear ops share (fake kernels; csrc/weighted_ce_args.h):
    hidden ``[M, H]`` floating, weight ``[V, H]`` (V >= 1) and bias ``[V]`` of its dtype and
    device, the op-level ``chunk_size`` (0: the default). Returns (M, H, V)."""
    M, H = check_rank(hidden, "hidden", 2, "[M, H]")
    check_dtype(hidden, "hidden", FLOATS)
    V, Hw = check_rank(weight, "weight", 2, "[V, H]")
    check_dtype(weight, "weight", (hidden.dtype,))
    if Hw != H or V < 1:
        fail("weight", f"expected shape [V, {H}] with V >= 1 (H from 'hidden' "
             f"{list(hidden.shape)}), got {list(weight.shape)}")
    check_tensor(weight, "weight", (V, H), (hidden.dtype,), hidden, "hidden")
    if bias is not None:
        check_tensor(bias, "bias", (V,), (weight.dtype,), weight, "weight")
    if not (isinstance(chunk_size, int) and chunk_size >= 0):
        fail("chunk_size", f"expected None or an int >= 1, got {chunk_size}")
    return M, H, V


def requires_grad(t, arg: str) -> bool:
    """Whether tensor ``t`` needs a gradient (None: no); a non-tensor is named."""
    if t is None:
        return False
    if not isinstance(t, torch.Tensor):
        fail(arg, f"expected a tensor, got {type(t).__name__}")
    return t.requires_grad
