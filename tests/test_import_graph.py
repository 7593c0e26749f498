"""interleaf's own modules import each other without a cycle.

Every module under ``src/interleaf`` is parsed with :mod:`ast` (nothing is imported), and each
``import`` / ``from ... import`` is resolved to the interleaf modules it loads. Only imports that
run when the module itself is imported count for the cycle check:

- imports at module level, in class bodies and in module-level ``if`` / ``try`` / ``with`` blocks
  count; imports inside a function (lazy imports, the standard way to break a cycle) do not, nor
  do those under ``if TYPE_CHECKING:`` (its ``else`` branch counts).
- ``import a.b.c`` and ``from a.b.c import name`` load ``a.b.c``; ``from a.b import c`` loads the
  module ``a.b.c`` when there is one, else it reads the name from ``a.b``'s ``__init__`` and so
  loads ``a.b``. Relative imports are resolved against the importing module's package.
- Loading ``a.b.c`` also runs the ``__init__`` of each package above it (``a``, ``a.b``), except
  the packages that contain the importer: those are already being imported before the importer
  runs (Python imports a package before its submodules), so they are no edge. Hence a package
  ``__init__`` that imports its own submodules is no cycle with them; a submodule that *also*
  reads a name from its package at module level (``from . import name`` where ``name`` is no
  module, or ``import pkg``) while that ``__init__`` imports the submodule is a cycle: it works
  only by the order of the ``__init__``'s lines.

A cycle is reported with each edge's file and line; the fix is to move the import into the
function that needs it, or to import from the module that defines the name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import interleaf

SRC = Path(interleaf.__file__).resolve().parent


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package rooted at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _eager_imports(tree: ast.Module):
    """The import statements that run when the module is imported (not lazy, not TYPE_CHECKING)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that one import statement names (before adding parent packages)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        found.add(sub if sub in modules else source)
    return found


def import_graph(root: Path) -> dict[str, dict[str, str]]:
    """``{importer: {imported: "file:line"}}`` over the eager imports between the package's modules."""
    files = module_names(root)
    modules = set(files)
    graph: dict[str, dict[str, str]] = {name: {} for name in files}
    for importer, path in files.items():
        is_package = path.name == "__init__.py"
        own = importer if is_package else importer.rpartition(".")[0]
        enclosing = {".".join(own.split(".")[:i]) for i in range(1, len(own.split(".")) + 1)}
        for node in _eager_imports(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, importer, is_package, modules):
                parts = target.split(".")
                # the module named, and every package above it that is not already being imported
                loaded = {".".join(parts[:i]) for i in range(1, len(parts))} - enclosing
                for name in sorted(loaded | {target}):
                    if name in modules and name != importer:
                        graph[importer].setdefault(name, f"{path.relative_to(root.parent)}:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a closed path of module names) per strongly connected component with one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; interleaf's graph is a few hundred nodes deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:
        members = set(component)
        start = min(component)
        # a shortest path back to start inside the component (breadth first)
        previous = {start: None}
        queue = [start]
        closing = None
        while queue and closing is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    closing = v
                    break
                if w in members and w not in previous:
                    previous[w] = v
                    queue.append(w)
        path = [start]
        v = closing
        while v is not None and v != start:
            path.insert(1, v)
            v = previous[v]
        found.append(path + [start])
    return found


def describe(graph: dict[str, dict[str, str]], cycle: list[str]) -> str:
    return "\n".join(f"  {a} -> {b}  ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_interleaf_has_no_import_cycle():
    graph = import_graph(SRC)
    # the parser sees the real imports (a graph with no edges would pass vacuously)
    assert "interleaf.presets" in graph["interleaf.api"]
    assert {"interleaf.presets.registry", "interleaf.presets.tiny", "interleaf.presets.seeds"} <= set(
        graph["interleaf.presets"]
    )
    found = cycles(graph)
    assert not found, "import cycles among interleaf's modules (move an import into the function that needs " \
        "it, or import from the defining module):\n" + "\n\n".join(describe(graph, c) for c in found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_checker_finds_the_cycles_it_promises_and_only_those(tmp_path):
    pkg = _write(tmp_path, {
        # a package __init__ importing its submodules, which import each other one way: no cycle
        "pkg/__init__.py": "from .registry import get\nfrom . import tiny\n",
        "pkg/registry.py": "import os\n\ndef get(): ...\n",
        "pkg/tiny.py": "from .registry import get\n",
        # two modules importing each other at module level: a cycle
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "from .a import thing\n",
        # the same pair made lazy on one side, or under TYPE_CHECKING: no cycle
        "pkg/c.py": "from . import d\n",
        "pkg/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import x\n"
                    "def f():\n    from . import c\n",
        # a submodule reading a name from its package's __init__, which imports it: a cycle
        "pkg/sub/__init__.py": "from .leaf import x\nVALUE = 1\n",
        "pkg/sub/leaf.py": "from . import VALUE\nx = VALUE\n",
        # importing a deep module runs the packages above it: e -> pkg.other (its __init__) -> e
        "pkg/other/__init__.py": "from ..e import y\n",
        "pkg/other/deep.py": "",
        "pkg/e.py": "from .other.deep import z\ny = 1\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.d"] == {}
    assert set(graph["pkg.tiny"]) == {"pkg.registry"}
    assert set(graph["pkg"]) == {"pkg.registry", "pkg.tiny"}
    found = sorted(tuple(c) for c in cycles(graph))
    assert found == [
        ("pkg.a", "pkg.b", "pkg.a"),
        ("pkg.e", "pkg.other", "pkg.e"),
        ("pkg.sub", "pkg.sub.leaf", "pkg.sub"),
    ]
    assert "pkg/b.py:1" in describe(graph, list(found[0]))


# --------------------------------------------------------------------------- the test suite's own imports

TESTS = Path(__file__).resolve().parent


def _parse_script(text: str) -> ast.Module | None:
    """``text`` parsed as Python, as it is or as a ``str.format`` template (fields read as ``None``)."""
    for candidate in (text, re.sub(r"\{[^{}]*\}", "None", text)):
        try:
            return ast.parse(candidate)
        except SyntaxError:
            pass
    return None


def _imported_modules(tree: ast.Module) -> list[tuple[str, int]]:
    """(module, line) of every absolute import anywhere in ``tree`` (lazy ones included), and of
    those in the scripts a test runs in a subprocess: module-level ``NAME = "..."`` strings that
    parse as Python (the line is then the assignment's)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.module, node.lineno))
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and "import" in value.value:
            script = _parse_script(value.value)
            if script is not None:
                found += [(name, node.lineno) for name, _ in _imported_modules(script)]
    return found


def imports_of_test_modules(root: Path) -> list[str]:
    """``file:line imports module`` for each ``.py`` file under ``root`` that imports a ``test_*``
    module or ``conftest``."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        for module, line in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            top = module.split(".")[0]
            if top.startswith("test_") or top == "conftest":
                problems.append(f"{path.relative_to(root)}:{line} imports {module}")
    return problems


def test_no_test_module_imports_another_or_conftest():
    problems = imports_of_test_modules(TESTS)
    assert not problems, "test modules import each other or conftest (move the shared code into tests/helpers/ " \
        "or tests/tiny.py, or make it a fixture in conftest.py):\n  " + "\n  ".join(problems)


def test_the_test_import_checker_finds_each_kind(tmp_path):
    _write(tmp_path, {
        "test_a.py": "from test_b import helper\n",
        "test_b.py": "def f():\n    import conftest\n",
        "test_c.py": 'SCRIPT = r"""\nimport sys\nfrom test_a import x\n"""\nTEMPLATE = """\nsys.path.insert(0, {tests!r})\nimport test_b\n"""\n',
        "helpers/util.py": "import test_c.sub\n",
        "test_fine.py": "from helpers.util import y\nimport tiny\nimport testing_tools\nTEXT = 'not code: import test_a'\n"
                        "def f():\n    return 'import test_a'\n",
        "pkg/__init__.py": "",
    })
    assert imports_of_test_modules(tmp_path) == [
        "helpers/util.py:1 imports test_c.sub",
        "test_a.py:1 imports test_b",
        "test_b.py:2 imports conftest",
        "test_c.py:1 imports test_a",
        "test_c.py:5 imports test_b",
    ]


# -- the import rules docs/ARCHITECTURE.md states --------------------------------------------------

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"


def part_of(module: str) -> str:
    """The part of the tree a dotted ``interleaf...`` module belongs to: its first name below
    ``interleaf`` (a subpackage or a top-level module), ``__init__`` for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def parts_imported(root: Path) -> dict[str, dict[str, str]]:
    """``{part: {part it imports: "file:line"}}`` over every import of another part, lazy ones included."""
    files = module_names(root)
    found: dict[str, dict[str, str]] = {part_of(m): {} for m in files}
    for importer, path in files.items():
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - (node.level - 1)] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                # "from . import x" inside interleaf/ names the part x; otherwise the module names it
                targets = [f"{source}.{a.name}" for a in node.names] if source == "interleaf" else [source]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "interleaf" and part_of(target) != part_of(importer):
                    found[part_of(importer)].setdefault(part_of(target), f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


def stated_rules(text: str) -> dict[str, set[str] | None]:
    """``{part: the parts it may import}`` from the package table (None: anything); the parts one
    row names may import each other."""
    table = text.split("## Packages", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str] | None] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("path", "---"):
            continue
        allowed = None if cells[1] == "anything" else {n.strip("/").removesuffix(".py") for n in re.findall(r"`([^`]+)`", cells[1])}
        row = {name.strip("/").removesuffix(".py") for name in re.findall(r"`([^`]+)`", cells[0])}
        for name in row:
            rules[name] = None if allowed is None else allowed | row - {name}
    return rules


def rule_breaks(actual: dict[str, dict[str, str]], rules: dict[str, set[str] | None]) -> list[str]:
    problems = [f"{part}: no row in the package table" for part in sorted(set(actual) - set(rules))]
    problems += [f"{part}: a row names it, but src/interleaf has no such part" for part in sorted(set(rules) - set(actual))]
    for part, imported in sorted(actual.items()):
        allowed = rules.get(part)
        if allowed is None:  # anything, or no row (reported above)
            continue
        problems += [f"{part} imports {other} ({where}), which its row does not list"
                     for other, where in sorted(imported.items()) if other not in allowed]
    return problems


def test_each_part_imports_only_what_the_architecture_page_says():
    rules = stated_rules(ARCHITECTURE.read_text(encoding="utf-8"))
    # the table was read (an empty table would pass vacuously)
    assert rules["cli"] is None and rules["errors"] == set() and rules["model"] == {"config", "errors", "files", "processing"}
    problems = rule_breaks(parts_imported(SRC), rules)
    assert not problems, "docs/ARCHITECTURE.md's package table and the code disagree (change the import, or the " \
        "table if the new dependency is right):\n  " + "\n  ".join(problems)


def test_the_rule_checker_sees_lazy_and_relative_imports_and_missing_rows(tmp_path):
    pkg = _write(tmp_path, {
        "interleaf/__init__.py": "from .api import build\n",
        "interleaf/api.py": "import interleaf.model\n",
        "interleaf/model/__init__.py": "from ..errors import E\n",
        "interleaf/model/core.py": "def f():\n    from interleaf.serving import app\n",
        "interleaf/errors.py": "import interleaf.api\n",
        "interleaf/serving/__init__.py": "from . import app\n",
        "interleaf/serving/app.py": "from .. import errors\n",
    }).parent / "interleaf"
    rules = stated_rules(
        "## Packages\n\n| path | may import | what |\n| --- | --- | --- |\n"
        "| `api.py`, `__init__.py` | `model` | x |\n| `model/` | `errors` | x |\n| `errors.py` | nothing | x |\n"
        "| `gone/` | nothing | x |\n\n## Next\n| `other/` | nothing | x |\n"
    )
    assert rules == {"api": {"model", "__init__"}, "__init__": {"model", "api"}, "model": {"errors"}, "errors": set(),
                     "gone": set()}
    assert rule_breaks(parts_imported(pkg), rules) == [
        "serving: no row in the package table",
        "gone: a row names it, but src/interleaf has no such part",
        "errors imports api (interleaf/errors.py:1), which its row does not list",
        "model imports serving (interleaf/model/core.py:2), which its row does not list",
    ]
