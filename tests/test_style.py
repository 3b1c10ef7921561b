"""The Python code passes `ruff check` with the configuration in pyproject.toml (rules, line
length 100). `make test` installs ruff; without it the check is skipped."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff is not installed (make setup installs it)")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
