"""Each module of ``src/interleaf`` holds one idea and each function one job: no module over about
500 lines and no function over 80, unless the limit below names it with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

import interleaf

SRC = Path(interleaf.__file__).resolve().parent
MAX_MODULE_LINES = 510  # "about 500"
MAX_FUNCTION_LINES = 80
EXCEPTIONS: dict[str, str] = {}  # "path:function" or "path" -> why it may be longer


def oversized(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES and rel not in EXCEPTIONS:
            found.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in EXCEPTIONS:
                    found.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_or_function_outgrows_one_idea():
    found = oversized(SRC)
    assert not found, "split these by idea, or name them in EXCEPTIONS with the reason:\n  " + "\n  ".join(found)


def test_the_size_check_sees_long_functions_and_modules(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    (tmp_path / "short.py").write_text("def g():\n    return 1\n")
    assert oversized(tmp_path) == [f"long.py: {MAX_FUNCTION_LINES + 1 + MAX_MODULE_LINES} lines",
                                   f"long.py:1 f: {MAX_FUNCTION_LINES + 1} lines"]
