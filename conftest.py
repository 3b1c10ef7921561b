"""Repository-wide pytest wiring.

`pytest` (the test command) runs tests/ only; `pytest --benchmark-only` runs bench/ only, so each
command runs exactly its own kind of work. Both directories are in testpaths; the items of the
other kind are deselected here (pytest_ignore_collect does not apply to testpaths themselves).
"""
from pathlib import Path

_ROOT = Path(__file__).parent.resolve()
_DIRS = {"tests": _ROOT / "tests", "bench": _ROOT / "bench"}


def _under(item, directory: Path) -> bool:
    return directory in Path(str(item.path)).resolve().parents


def _needs_cuda(item) -> bool:
    """A test that a machine without a GPU skips: a CUDA case of the `device` fixture or a
    test marked skipif(no CUDA device)."""
    return any("CUDA" in str(mark.kwargs.get("reason", ""))
               for mark in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    benchmark_only = config.getoption("benchmark_only", default=False)
    unwanted = _DIRS["tests"] if benchmark_only else _DIRS["bench"]
    cuda_only = config.getoption("cuda_only")
    dropped = [item for item in items
               if _under(item, unwanted) or (cuda_only and not _needs_cuda(item))]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = {id(item) for item in dropped}
        items[:] = [item for item in items if id(item) not in gone]


def pytest_addoption(parser):
    parser.addoption("--vsd-seed", default=None, type=int,
                     help="fixed seed for the random-input tests (default: fresh per run)")
    parser.addoption("--cuda-only", action="store_true",
                     help="run only the tests that need a GPU (those a CPU machine skips)")
