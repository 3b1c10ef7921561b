"""Every C++/CUDA file in csrc/ is formatted as .clang-format says (clang-format -Werror)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _clang_format() -> str:
    exe = (shutil.which("clang-format", path=os.path.dirname(sys.executable))
           or shutil.which("clang-format"))
    assert exe, ("clang-format is a test dependency and was not found next to "
                 f"{sys.executable} or on PATH: pip install clang-format (make setup does)")
    return exe


def test_csrc_is_clang_formatted():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                     if p.suffix in (".h", ".cpp", ".cuh", ".cu"))
    assert (ROOT / ".clang-format").is_file() and any(s.endswith(".cu") for s in sources)
    exe = _clang_format()
    result = subprocess.run([exe, "--style=file", "--dry-run", "-Werror", *sources], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        unformatted = sorted({line.split(":")[0] for line in result.stderr.splitlines()
                              if line.startswith("csrc/") and ": error:" in line})
        raise AssertionError(
            f"not formatted as .clang-format says ({version}): {unformatted}; fix with "
            f"`{exe} -i {' '.join(unformatted) or 'csrc/...'}`\n{result.stderr[-3000:]}")
