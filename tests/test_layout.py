"""The package's layout (docs/design/ARCHITECTURE.md): rooms import only the rooms below them,
no import cycles, no project imports hidden inside functions, references independent of the
code they check, and short functions."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vsd_ext"

# Rooms, bottom to top: a module may import its own room and the rooms of lower levels only.
LEVELS = {
    "_version": 0,
    "_loader": 1, "ops": 1, "corpus": 1, "durable": 1,
    "tree": 2,
    "reference": 3, "models": 3,
    "decoding": 4,
    "eval": 5, "training": 5,
    "app": 6,
}
MAX_FUNCTION_LINES = 100  # the goal is 60


def modules():
    """{dotted name: path} of every module of the package (the package's own __init__ and
    __main__ excluded: they re-export and run the rooms)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if name not in ("vsd_ext", "vsd_ext.__main__"):
            found[name] = path
    return found


def room(module: str) -> str:
    return module.split(".")[1]


def project_imports(module: str, path: Path):
    """(imported module, line, inside a function) for every import of a vsd_ext module."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    functions = {id(n) for f in ast.walk(tree)
                 if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base] * (base != "vsd_ext")
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("vsd_ext.") or name == "vsd_ext":
                yield name, node.lineno, id(node) in functions


def import_graph():
    mods = modules()
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for name, _, _ in project_imports(module, path):
            while name not in mods and "." in name:  # `from .x import y` names y, not a module
                name = name.rpartition(".")[0]
            if name in mods and name != module:
                graph[module].add(name)
    return graph


def test_rooms_import_only_downward():
    mods = modules()
    wrong = []
    for module, path in mods.items():
        for name, line, _ in project_imports(module, path):
            if name == "vsd_ext":
                wrong.append(f"{module}:{line} imports the vsd_ext package (import the room)")
                continue
            own, other = room(module), room(name)
            if other != own and LEVELS[other] >= LEVELS[own]:
                wrong.append(f"{module}:{line} imports {name} ({other} is not below {own})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_project_imports_inside_functions():
    """Imports inside functions hide cycles; third-party lazy imports are fine."""
    hidden = [f"{module}:{line} imports {name}"
              for module, path in modules().items()
              for name, line, inside in project_imports(module, path) if inside]
    assert not hidden, "\n".join(hidden)


def test_references_import_no_code_they_check():
    """A reference may use the tree utilities (the mask format is part of the contract), never
    the ops, models or training code it is the oracle of."""
    for module, path in modules().items():
        if room(module) == "reference":
            for name, line, _ in project_imports(module, path):
                assert room(name) in ("reference", "tree"), f"{module}:{line} imports {name}"


@pytest.mark.parametrize("directory", ["vsd_ext", "tests", "bench", "python"])
def test_functions_are_short(directory):
    root = PACKAGE.parent / directory
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(root.parent)}:{node.lineno} "
                                f"{node.name}: {lines} lines")
    assert not long, "\n".join(long)
