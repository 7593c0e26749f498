"""``interleaf eval``: evaluate a model on benchmark tasks, or compare two results files.

    interleaf eval --model DIR_OR_PRESET --task synth-vqa --data CORPUS --shots 0,4 --trials 3 --out runs/a
    torchrun --standalone --nproc_per_node 2 -m interleaf eval --model DIR --task vqav2 --data /data/vqav2 --out runs/b
    interleaf eval --compare runs/a/results.json runs/b/results.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _parse_shots(text: str) -> list[int]:
    from ..errors import InputError

    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--shots {text!r}: give comma-separated integers, e.g. 0,4,8") from None
    if not shots:
        raise InputError("--shots is empty; e.g. --shots 0,4,8")
    return shots


def eval_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A saved model directory or a preset name."),
    task: list[str] = typer.Option([], "--task", "-t", help="A task name, a task YAML file, or llava:PATH; repeat."),
    shots: str = typer.Option("0", help="Comma-separated shot counts, e.g. 0,4,8."),
    trials: int = typer.Option(1, min=1, help="Trials (demonstration seeds) per shot count."),
    seed: int = typer.Option(0, help="Seed of the first trial (trial t uses seed + t); also a preset's weights."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    rices: bool = typer.Option(False, "--rices/--random", help="Choose demonstrations by image similarity."),
    zero_shot_trick: bool = typer.Option(False, "--zero-shot-trick", help="0-shot: two text-only demonstrations."),
    chat: bool = typer.Option(False, "--chat", help="Render prompts with the model's chat template."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder holding the task's files (default: .)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder the images' relative paths start from."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (results.json, samples/, cache/)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N examples only."),
    option: list[str] = typer.Option([], "--option", help="A task option KEY=VALUE (e.g. episodes=50); repeat."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", min=1, help="Override the task's beams."),
    compare: Optional[tuple[Path, Path]] = typer.Option(None, "--compare", help="Print two results.json side by side."),
    list_tasks: bool = typer.Option(False, "--list", help="List the registered tasks."),
    compile: bool = typer.Option(False, "--compile", help="Generate with a static KV cache and a compiled decoding step."),
) -> None:
    """Evaluate a model on tasks (few-shot, random or RICES demonstrations), or compare results."""
    from ..errors import InputError
    from ..evaluation.results import compare_table, load_results
    from ..evaluation.tasks import list_tasks as registered

    if list_tasks:
        for name, desc in registered().items():
            typer.echo(f"{name:<16} {desc}")
        return
    if compare:
        a, b = (load_results(p) for p in compare)
        typer.echo(compare_table(a, b, names=(str(compare[0]), str(compare[1]))))
        return
    if model is None or not task:
        raise InputError("interleaf eval needs --model and at least one --task (or --compare A.json B.json)")
    options = {}
    for item in option:
        if "=" not in item:
            raise InputError(f"--option {item!r}: write KEY=VALUE")
        k, v = item.split("=", 1)
        options[k.strip()] = v.strip()
    from ..distributed import distributed, end_launched_process
    from ..evaluation.runner import evaluate
    from .models import load_model

    parsed_shots = _parse_shots(shots)
    with distributed() as state:  # under torchrun: the processes' group, destroyed after success
        m, p = load_model(model, seed=seed)
        evaluate(
            m, p, list(task), shots=parsed_shots, trials=trials, seed=seed, batch_size=batch_size, rices=rices,
            zero_shot_trick=zero_shot_trick, chat=chat, limit=limit, data_dir=data, images_dir=images, out_dir=out,
            task_options=options, num_beams=num_beams, compile=compile, print_table=True, extra_config={"model": model},
            dist=state,
        )
    end_launched_process(state)  # under torchrun: no interpreter teardown after the results are written


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
