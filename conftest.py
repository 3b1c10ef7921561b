"""Repository-wide pytest wiring.

`pytest` (the test command) collects tests/ only; `pytest --benchmark-only` collects bench/ only,
so each command runs exactly its own kind of work.
"""
from pathlib import Path

_ROOT = Path(__file__).parent


def pytest_ignore_collect(collection_path, config):
    benchmarks = bool(config.getoption("benchmark_only", default=False))
    path = Path(collection_path).resolve()
    if benchmarks and path == (_ROOT / "tests").resolve():
        return True
    if not benchmarks and path == (_ROOT / "bench").resolve():
        return True
    return None


def pytest_addoption(parser):
    parser.addoption("--vsd-seed", default=None, type=int,
                     help="fixed seed for the random-input tests (default: fresh per run)")
