"""The documents a clone can follow: the design documents live in docs/design/, every reference
to them points there, and the README's layout section matches the tree."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ("OPS.md", "METHOD.md", "ARCHITECTURE.md", "ANCHORS.md")
# csrc/ is the C++ half of the restructure (its comments move to docs/design/ there).
SCANNED = ("README.md", "vsd_ext", "tests", "bench", "python", "docs", "csrc", "Makefile", ".ci")
SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".h", ".cpp", ".cu", ".cuh", ""}


def scanned_files():
    for name in SCANNED:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if (file.suffix in SUFFIXES and "__pycache__" not in file.parts
                    and file != Path(__file__).resolve()):
                yield file


@pytest.mark.parametrize("name", DESIGN)
def test_design_documents_are_in_the_repository(name):
    assert (ROOT / "docs" / "design" / name).is_file()


def test_references_point_into_the_repository():
    bare = re.compile(r"(?<!docs/design/)\b(?:" + "|".join(re.escape(d) for d in DESIGN) + r")")
    wrong = []
    for file in scanned_files():
        text = file.read_text(errors="replace")
        in_design = file.parent == ROOT / "docs" / "design"  # siblings may say "OPS.md"
        for number, line in enumerate(text.splitlines(), 1):
            if "shared/design" in line or (not in_design and bare.search(line)):
                wrong.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not wrong, "\n".join(wrong)


def test_readme_layout_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = [line.split()[0] for line in block.splitlines()
              if line.strip() and not line.startswith(" ")]
    assert listed, "no layout block"
    missing = [p for p in listed for part in p.rstrip(",").split(",")
               if part and not (ROOT / part.strip()).exists()]
    assert not missing, f"README layout lists paths that do not exist: {missing}"
    packages = sorted(p.parent.relative_to(ROOT).as_posix() + "/"
                      for p in (ROOT / "vsd_ext").glob("*/__init__.py"))
    unlisted = [p for p in packages if p not in listed]
    assert not unlisted, f"README layout omits {unlisted}"
