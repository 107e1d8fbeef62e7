"""The package's import structure: one floor per module, no circles, no upward imports, imports at the top.

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "course_lib"
WIDGETS = "widgets"  # the only part of the package that may import plotly or ipywidgets
UI_LIBRARIES = ("plotly", "ipywidgets", "anywidget", "IPython")
MAX_LINES = 400


def package_modules(root: Path) -> dict[str, Path]:
    """{dotted name inside the package: path}; a package's __init__ is named by the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(p for p in parts if p != "__init__") or "__init__"] = path
    return modules


def _top_level_statements(tree: ast.Module) -> set[int]:
    """ids of the statements that run at import: the module body and the insides of its if/try blocks."""
    top, todo = set(), list(tree.body)
    while todo:
        node = todo.pop()
        top.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            todo += node.body + node.orelse + getattr(node, "finalbody", [])
            todo += [s for h in getattr(node, "handlers", []) for s in h.body]
    return top


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(target, line, at import time) for every import of one module. Targets inside the package are dotted
    names relative to it ("moe", "widgets.charts", "__init__"); outside it, the top-level package ("torch")."""
    tree = ast.parse(path.read_text())
    package = [] if name == "__init__" else name.split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    top = _top_level_statements(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                inside = target.startswith("course_lib")
                found.append((target.partition(".")[2] or "__init__" if inside else target.split(".")[0],
                              node.lineno, id(node) in top))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module.startswith("course_lib"):
                    found.append((module.partition(".")[2] or "__init__", node.lineno, id(node) in top))
                else:
                    found.append((module.split(".")[0], node.lineno, id(node) in top))
                continue
            base = package[:len(package) - node.level + 1]
            if node.module:
                found.append((".".join(base + [node.module]), node.lineno, id(node) in top))
            else:  # from . import memory
                found += [(".".join(base + [a.name]), node.lineno, id(node) in top) for a in node.names]
    return found


def internal_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: modules of the package it imports}; `from .x import name` counts as importing x."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target, _, _ in imports_of(name, path):
            while target and target not in modules:  # a name imported from a module -> the module
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (circle := visit(dep)):
                return circle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (circle := visit(name)):
            return circle
    return None


def late_imports(modules: dict[str, Path]) -> list[str]:
    return [f"{path.name}:{line} imports {target}" for name, path in modules.items()
            for target, line, at_top in imports_of(name, path) if not at_top]


def test_the_package_has_no_import_circle():
    circle = find_circle(internal_graph(package_modules(PACKAGE)))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_core_modules_never_import_widget_code_or_ui_libraries():
    modules = package_modules(PACKAGE)
    for name, path in modules.items():
        if name == WIDGETS or name.startswith(WIDGETS + "."):
            continue
        for target, line, _ in imports_of(name, path):
            where = f"course_lib/{path.relative_to(PACKAGE)}:{line}"
            assert not (target == WIDGETS or target.startswith(WIDGETS + ".")), f"{where} imports widget code"
            assert target.split(".")[0] not in UI_LIBRARIES, f"{where} imports {target}: only widgets may"


def test_every_import_is_at_the_top_of_its_module():
    late = late_imports(package_modules(PACKAGE))
    assert not late, "imports inside functions hide the structure:\n" + "\n".join(late)


def test_every_module_says_what_idea_it_holds_and_fits_one_sitting():
    for path in package_modules(PACKAGE).values():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 8, f"{path.relative_to(PACKAGE)} needs a docstring saying what it holds"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by idea"


def test_the_checks_find_a_circle_a_late_import_and_a_nested_module(tmp_path):
    """The walks above must be able to fail: a circle through a function-level import is seen, and a
    submodule's relative import resolves to the right module."""
    (tmp_path / "a.py").write_text('"""imports b at the top."""\nfrom .b import x\n')
    (tmp_path / "b.py").write_text('"""imports a inside a function."""\ndef x():\n    from .a import y\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text('"""a package."""\n')
    (tmp_path / "sub" / "c.py").write_text('"""imports a from one floor up."""\ntry:\n    from ..a import z\n'
                                           'except ImportError:\n    pass\n')
    modules = package_modules(tmp_path)
    assert set(modules) == {"a", "b", "sub", "sub.c"}
    graph = internal_graph(modules)
    assert graph == {"a": {"b"}, "b": {"a"}, "sub": set(), "sub.c": {"a"}}
    assert find_circle(graph) == ["a", "b", "a"]
    assert late_imports(modules) == ["b.py:3 imports a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def readme_floors() -> dict[str, tuple[int, set[str] | None]]:
    """The README's map of course_lib: {module or package: (layer, the modules it says it imports, or None)}."""
    text = (PACKAGE.parent / "README.md").read_text()
    block = text.split("`course_lib` in layers", 1)[1].split("```\n", 2)[1]
    floors, floor = {}, None
    for line in block.splitlines():
        head, _, deps = line.partition("<-")
        words = head.split()
        if words[0].isdigit():
            floor, words = int(words[0]), words[1:]
        floors[words[0].rstrip("/")] = (floor, {d.strip() for d in deps.split(",")} if deps else None)
    return floors


def test_the_readme_map_of_floors_is_true():
    modules = package_modules(PACKAGE)
    graph = internal_graph(modules)
    floors = readme_floors()

    def room(module: str) -> str:  # a module inside a subpackage lives in the subpackage's room
        return module.split(".")[0]

    rooms = {room(m) for m in modules} - {"__init__"}
    assert rooms == set(floors), f"README's map and course_lib differ: {sorted(rooms ^ set(floors))}"
    for module, deps in graph.items():
        if module == "__init__":
            continue
        outside = {room(d) for d in deps} - {room(module)}
        floor, listed = floors[room(module)]
        for dep in outside:
            assert floors[dep][0] < floor, f"{module} (floor {floor}) imports {dep} (floor {floors[dep][0]})"
        if "." not in module:
            assert (listed or set()) == outside, f"README says {module} imports {listed}, it imports {outside}"
