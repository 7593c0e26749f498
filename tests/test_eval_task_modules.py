"""Evaluation imports no corpus code: tasks over interleaf's own data register themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import interleaf.evaluation
from interleaf.evaluation.tasks import TASK_MODULES, get_task, list_tasks

EVALUATION = Path(interleaf.evaluation.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, lazy ones included, as absolute names."""
    package = "interleaf." + ".".join(path.relative_to(EVALUATION.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.removesuffix(".__init__")
    else:
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            names |= {source} | {f"{source}.{alias.name}" for alias in node.names}
    return names


def test_evaluation_imports_neither_the_data_nor_the_demo_package():
    seen = {str(p.relative_to(EVALUATION.parent)): _imports(p) for p in sorted(EVALUATION.rglob("*.py"))}
    assert "interleaf.evaluation.tasks.spec" in seen["evaluation/tasks/__init__.py"]  # the parser resolves
    bad = {
        path: sorted(n for n in names if n.split(".")[:2] in (["interleaf", "data"], ["interleaf", "demo"]))
        for path, names in seen.items()
    }
    assert not any(bad.values()), f"evaluation imports corpus code: { {k: v for k, v in bad.items() if v} }"


def test_the_synthetic_corpus_tasks_come_from_the_module_that_registers_them():
    import interleaf.demo.tasks as synth_tasks

    assert synth_tasks.__name__ in TASK_MODULES
    assert [get_task(spec.name) for spec in synth_tasks.SYNTH_TASKS] == list(synth_tasks.SYNTH_TASKS)
    assert {"synth-vqa", "synth-caption", "synth-fewshot", "vqav2", "coco"} <= set(list_tasks())
