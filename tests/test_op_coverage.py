"""Every registered op has its pieces (docs/design/OPS.md, "How an op is put together"): a
fake (meta) kernel, a pure-PyTorch reference in vsd_ext/reference/, tests and a benchmark.

An op belongs to the family of its public function: its name without `_forward` /
`_backward` (`weighted_cross_entropy_forward` → `vsd_ext.weighted_cross_entropy`). The
reference of a family is a function of that name in a `vsd_ext.reference` module."""
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch
from torch._library.simple_registry import singleton

import vsd_ext
import vsd_ext.reference

ROOT = Path(__file__).resolve().parent.parent
OPS = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("vsd_ext::"))


def family(op: str) -> str:
    return op.removesuffix("_forward").removesuffix("_backward")


def mentions(directory: str, pattern: str, word: str) -> list[str]:
    """Files of ``directory`` matching ``pattern`` that use ``word`` as a whole name."""
    regex = re.compile(rf"\b{re.escape(word)}\b")
    return [p.name for p in sorted((ROOT / directory).glob(pattern)) if regex.search(p.read_text())]


def test_ops_are_registered():
    assert {"tree_attention", "verify_tree", "weighted_cross_entropy_forward",
            "weighted_linear_cross_entropy_forward"} <= set(OPS)
    for op in OPS:
        assert callable(getattr(vsd_ext, family(op), None)), f"vsd_ext.{family(op)} is missing"


@pytest.mark.parametrize("op", OPS)
def test_op_has_a_fake_kernel(op):
    assert singleton.find(f"vsd_ext::{op}").fake_impl.kernel is not None


@pytest.mark.parametrize("op", OPS)
def test_op_has_a_reference(op):
    modules = [importlib.import_module(f"vsd_ext.reference.{m.name}")
               for m in pkgutil.iter_modules(vsd_ext.reference.__path__)]
    assert any(callable(getattr(m, family(op), None)) for m in modules), (
        f"no vsd_ext.reference module defines {family(op)}()")


@pytest.mark.parametrize("op", OPS)
def test_op_has_tests(op):
    """A test file calls the op itself (opcheck) and one its public function."""
    assert mentions("tests", "test_*.py", op), f"no tests/test_*.py uses {op}"
    assert mentions("tests", "test_*.py", family(op))


@pytest.mark.parametrize("op", OPS)
def test_op_has_a_benchmark(op):
    assert mentions("bench", "bench_*.py", f"vsd_ext.{family(op)}"), (
        f"no bench/bench_*.py times vsd_ext.{family(op)}")
