"""Shared fixtures: every op test runs one body on each available device."""
import secrets

import pytest
import torch

import vsd_ext  # noqa: F401  (loads the op library)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def seed(request):
    """A fresh seed per run (printed, shown on failure) so random inputs differ between runs;
    `--vsd-seed N` replays one."""
    fixed = request.config.getoption("--vsd-seed")
    value = fixed if fixed is not None else secrets.randbelow(2**31 - 1)
    print(f"[vsd-seed] {request.node.nodeid}: rerun with --vsd-seed {value}")
    return value


@pytest.fixture
def gen(seed):
    """A CPU torch.Generator seeded from `seed`."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module (restored afterwards): tiny models run hundreds of
    small ops per generation, and on a shared, loaded machine OpenMP barriers between
    intra-op threads stall each op for a scheduler slice. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
