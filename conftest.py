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


def pytest_collection_modifyitems(config, items):
    benchmark_only = config.getoption("benchmark_only", default=False)
    unwanted = _DIRS["tests"] if benchmark_only else _DIRS["bench"]
    keep = [item for item in items if not _under(item, unwanted)]
    dropped = [item for item in items if _under(item, unwanted)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_addoption(parser):
    parser.addoption("--vsd-seed", default=None, type=int,
                     help="fixed seed for the random-input tests (default: fresh per run)")
