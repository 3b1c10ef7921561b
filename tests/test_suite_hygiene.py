"""The suite collects everywhere `make test` installs: no test module imports scipy (not a
dependency; statistical tests use `torch.special.gammaincc`, see helpers.chi2_pvalue), so an
environment without it cannot lose whole test files at collection."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_module_imports_scipy():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "scipy"]
    assert not found, f"scipy imported by {found}"
