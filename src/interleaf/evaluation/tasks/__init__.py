"""The task registry: shipped benchmark specs, user tasks from YAML, and ``llava:PATH`` tasks.

``get_task(name)`` accepts a registered name (``interleaf eval --task vqav2``), a path to a YAML
file of :class:`TaskSpec` fields (optionally ``base: <registered name>`` to override a shipped
task), or ``llava:PATH`` for a LLaVA-format JSON of one's own. ``load_examples`` reads a split
through the task's adapter.

The shipped benchmarks are the table in :mod:`.builtin`. Other parts of interleaf define tasks
of their own over their own data and register them when imported; they are named in
:data:`TASK_MODULES`, which the registry imports the first time it is used, so that evaluation
never imports their code.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

from ...errors import ConfigError, InputError
from .adapters import ADAPTERS, DataContext
from .builtin import BUILTIN_TASKS, VQA_STOP
from .spec import PROMPT_FAMILIES, Example, PromptTemplate, TaskSpec

TASKS: dict[str, TaskSpec] = {}
# Modules that register tasks (and their adapters) when imported: the synthetic corpus's
# held-out VQA, captions and word-binding episodes (``synth-vqa``, ``synth-caption``,
# ``synth-fewshot``). Read ``TASKS`` through ``get_task`` / ``list_tasks``, which load them.
TASK_MODULES: list[str] = ["interleaf.demo.tasks"]
_modules_loaded = False


def _load_task_modules() -> None:
    """Import every module of ``TASK_MODULES`` once (they call ``register_task`` as they load)."""
    global _modules_loaded
    if _modules_loaded:
        return
    _modules_loaded = True  # first: a module being imported registers through this registry
    try:
        for name in TASK_MODULES:
            importlib.import_module(name)
    except BaseException:
        _modules_loaded = False
        raise


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    _load_task_modules()  # a name they register is taken, as a shipped one is
    return _register(spec, overwrite)


def _register(spec: TaskSpec, overwrite: bool) -> TaskSpec:
    if spec.adapter not in ADAPTERS:
        raise ConfigError(f"task {spec.name}.adapter", f"is {spec.adapter!r}", f"choose one of {sorted(ADAPTERS)}")
    if spec.name in TASKS and not overwrite:
        raise ConfigError(f"task {spec.name}", "is already registered", "pick another name or pass overwrite=True")
    TASKS[spec.name] = spec
    return spec


def list_tasks() -> dict[str, str]:
    _load_task_modules()
    return {name: spec.description for name, spec in sorted(TASKS.items())}


def llava_task(path: str | Path, *, name: str | None = None) -> TaskSpec:
    """A task over one's own LLaVA-format JSON: exact match (and VQA accuracy) on the last answer."""
    p = Path(path).expanduser().resolve()
    return TaskSpec(
        name=name or f"llava:{Path(path).name}", adapter="llava", metric="exact_match", postprocess="vqa",
        templates={"openflamingo": PromptTemplate(
            demo="<image>{history}Question:{question} Short answer:{answer}<|endofchunk|>", chat_user="<image>\n{question}"),
            "idefics": PromptTemplate(demo="<image>{history}Question: {question} Answer: {answer}\n",
                                      query="<image>{history}Question: {question} Answer:")},
        files={"test": str(p), "train": str(p)}, max_new_tokens=16, stop=VQA_STOP,
        description=f"LLaVA-format conversations in {p}",
    )


def load_task_yaml(path: str | Path) -> TaskSpec:
    """A :class:`TaskSpec` from YAML; ``base: NAME`` starts from a registered task."""
    from ...files import read_yaml
    from ...schema import coerce, fields_of, read, reject_unknown, with_context

    p = Path(path)
    data = read_yaml(p, "task", "pass the path of a task YAML, or a registered task's name")
    try:
        if not isinstance(data, dict):
            raise ConfigError("task", f"must be a mapping of task fields, got {type(data).__name__}")
        base = coerce(data.pop("base", None), str | None, "base")
        reject_unknown(data, [*fields_of(TaskSpec), "base"], "")
        if base is not None:
            data = {**dataclasses.asdict(get_task(base)), **data}
        data.setdefault("name", p.stem)
        return read(TaskSpec, data, f"task {data['name']}")
    except ConfigError as e:
        raise with_context(e, "", f" (in {p})") from e


def get_task(name: str) -> TaskSpec:
    """A registered task, a YAML task file, or ``llava:PATH``."""
    if name.startswith("llava:"):
        return llava_task(name.split(":", 1)[1])
    if name.endswith((".yaml", ".yml")):
        return load_task_yaml(name)
    _load_task_modules()
    if name not in TASKS:
        raise ConfigError("--task", f"unknown task {name!r}",
                          f"known: {', '.join(sorted(TASKS))}; or a task YAML file, or llava:PATH")
    return TASKS[name]


def load_examples(
    task: TaskSpec, split: str, *, data_dir: str | Path | None = None, images_dir: str | Path | None = None,
    options: dict[str, Any] | None = None, read: dict[str, Path] | None = None,
) -> list[Example]:
    """Read one split of ``task`` from local files. ``read`` collects the files read (key -> path)."""
    _load_task_modules()  # a task of one's own may use an adapter that one of them registers
    ctx = DataContext(task, Path(data_dir or ".").expanduser(), Path(images_dir).expanduser() if images_dir else None,
                      dict(options or {}))
    examples = ADAPTERS[task.adapter](ctx, split)
    if read is not None:
        read.update(ctx.read)
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"task {task.name!r}, split {split!r}: example id {dup!r} appears more than once")
    return examples


for _spec in BUILTIN_TASKS:
    _register(_spec, overwrite=False)

__all__ = [
    "ADAPTERS", "PROMPT_FAMILIES", "TASKS", "DataContext", "Example", "PromptTemplate", "TaskSpec", "get_task",
    "list_tasks", "llava_task", "load_examples", "load_task_yaml", "register_task",
]
