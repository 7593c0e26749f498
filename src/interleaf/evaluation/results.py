"""Scoring finished samples, aggregating trials, and printing / comparing results files.

``compute_metrics`` turns the per-sample records of one (task, shots, trial) into the task's
metric, extra metrics and per-group (subtask, question type) breakdowns; ``aggregate_trials``
gives mean and standard deviation (population, ``ddof=0``, as OpenFlamingo reports) over trials;
``results_table`` and ``compare_table`` format a results JSON for the terminal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import read_json
from .metrics import (
    caption_scores,
    circular_eval,
    exact_match,
    extract_choice,
    mme_parse_yes_no,
    mme_scores,
    roc_auc,
    vqa_accuracy,
)
from .tasks.spec import TaskSpec


def postprocess(kind: str, text: str) -> str:
    """Clean a generated answer: ``vqa``/``caption`` keep the first line, trimmed; ``yes_no`` maps to
    yes/no/other; ``choice`` is left for the metric (it needs the options)."""
    t = text.strip()
    if kind in ("vqa", "caption"):
        t = t.split("\n")[0].strip()
    if kind == "yes_no":
        return mme_parse_yes_no(t)
    return t


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _by_group(records: list[dict], values: list[float]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r, v in zip(records, values):
        if r.get("group") is not None:
            groups[str(r["group"])].append(v)
    return {g: _mean(v) for g, v in sorted(groups.items())}


def sample_scores(task: TaskSpec, record: dict) -> dict[str, float]:
    """Per-sample scores (empty for corpus-level metrics such as CIDEr)."""
    pred, answers = record.get("pred"), record.get("answers") or []
    if task.request == "rank":
        return {"correct": float(record["pred_index"] == record["label"])} if record.get("label") is not None else {}
    if task.metric == "vqa_accuracy":
        return {"vqa_accuracy": vqa_accuracy(pred, answers, task.vqa_mode)}
    if task.metric == "exact_match":
        # single references: VQA accuracy against the reference repeated 10 times (normalised match)
        refs = answers if len(answers) >= 3 else list(answers) * 10
        return {"exact_match": exact_match(pred, answers), "vqa_accuracy": vqa_accuracy(pred, refs, task.vqa_mode)}
    if task.metric in ("choice_accuracy", "circular"):
        letter = extract_choice(pred, record.get("options") or None)
        return {"correct": float(letter is not None and letter == answers[0]), "parsed": float(letter is not None)}
    if task.metric == "mme":
        return {"correct": float(pred == answers[0].strip().lower())}
    return {}


def compute_metrics(task: TaskSpec, records: list[dict]) -> dict[str, Any]:
    """``{"score": primary, "metrics": {...}, "groups": {group: primary}, "n": count}``; fills
    each record's ``score``."""
    if not records:
        raise InputError(f"task {task.name!r}: no samples to score")
    for r in records:
        r["score"] = sample_scores(task, r)
    metrics: dict[str, Any] = {}
    groups: dict[str, float] = {}
    m = task.metric
    if m in ("vqa_accuracy", "exact_match"):
        for key in records[0]["score"]:
            metrics[key] = _mean([r["score"][key] for r in records])
        groups = _by_group(records, [r["score"][m] for r in records])
        if m == "vqa_accuracy":
            metrics["vqa_mode"] = task.vqa_mode
        primary = metrics[m]
    elif m == "cider":
        ids = [r["id"] for r in records]
        scores = caption_scores({i: r["pred"] for i, r in zip(ids, records)},
                                {i: r["answers"] for i, r in zip(ids, records)})
        per_image = scores.pop("CIDEr_per_image")
        for r in records:
            r["score"] = {"CIDEr": per_image[r["id"]]}
        metrics = {k: v for k, v in scores.items()}
        primary = metrics["CIDEr"]
    elif m in ("accuracy", "choice_accuracy"):
        values = [r["score"]["correct"] for r in records]
        metrics["accuracy"] = primary = _mean(values)
        if m == "choice_accuracy":
            metrics["parse_failure_rate"] = 1 - _mean([r["score"]["parsed"] for r in records])
        groups = _by_group(records, values)
    elif m == "roc_auc":
        metrics["roc_auc"] = primary = roc_auc([r["label"] for r in records], [r["positive_prob"] for r in records])
        metrics["accuracy"] = _mean([r["score"]["correct"] for r in records])
    elif m == "circular":
        result = circular_eval(
            {"question_index": r["source_id"], "rotation": r["rotation"],
             "prediction": extract_choice(r["pred"], r.get("options") or None), "answer": r["answers"][0]}
            for r in records
        )
        metrics = result
        primary = result["circular_accuracy"]
        groups = _circular_groups(records)
    elif m == "mme":
        result = mme_scores(
            ({"image_id": r["image_id"], "subtask": r["group"], "prediction": r["pred"], "answer": r["answers"][0]}
             for r in records),
            require_pairs=False,
        )
        metrics = result
        primary = result["perception"] + result["cognition"]
        groups = {k: v["score"] for k, v in result["subtasks"].items()}
    else:
        raise InputError(f"task {task.name!r}: no scorer for metric {m!r}")
    return {"score": float(primary), "metrics": metrics, "groups": groups, "n": len(records)}


def _circular_groups(records: list[dict]) -> dict[str, float]:
    by_q: dict[str, list[bool]] = defaultdict(list)
    group_of: dict[str, str] = {}
    for r in records:
        by_q[r["source_id"]].append(r["score"]["correct"] == 1.0)
        group_of[r["source_id"]] = str(r.get("group"))
    groups: dict[str, list[float]] = defaultdict(list)
    for q, flags in by_q.items():
        groups[group_of[q]].append(float(all(flags)))
    return {g: _mean(v) for g, v in sorted(groups.items())}


def aggregate_trials(trials: list[dict]) -> dict[str, Any]:
    """Mean and population standard deviation of the primary score (and of each group) over trials."""
    scores = [t["score"] for t in trials]
    mean = _mean(scores)
    std = math.sqrt(_mean([(s - mean) ** 2 for s in scores]))
    names = sorted({g for t in trials for g in t["groups"]})
    groups = {g: _mean([t["groups"][g] for t in trials if g in t["groups"]]) for g in names}
    return {"mean": mean, "std": std, "n_trials": len(trials), "groups": groups, "trials": trials}


# --------------------------------------------------------------------------- printing


def _rows(results: dict) -> dict[tuple[str, str, str], tuple[float, float, int]]:
    rows = {}
    for task, tr in results.get("results", {}).items():
        for shots, agg in tr["shots"].items():
            n = agg["trials"][0]["n"] if agg["trials"] else 0
            rows[(task, tr["metric"], str(shots))] = (agg["mean"], agg["std"], n)
            for g, v in agg["groups"].items():
                rows[(f"{task}/{g}", tr["metric"], str(shots))] = (v, float("nan"), 0)
    return rows


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.4f}"


def results_table(results: dict) -> str:
    """A plain-text table: task (and task/group), metric, shots, mean, std, n."""
    rows = _rows(results)
    head = ("task", "metric", "shots", "mean", "std", "n")
    body = [(t, m, s, _fmt(mean), _fmt(std), str(n) if n else "") for (t, m, s), (mean, std, n) in rows.items()]
    return _table(head, body)


def compare_table(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Two results side by side, with B - A for rows both hold."""
    ra, rb = _rows(a), _rows(b)
    keys = list(ra) + [k for k in rb if k not in ra]
    body = []
    for k in keys:
        va, vb = ra.get(k, (float("nan"),) * 2)[0], rb.get(k, (float("nan"),) * 2)[0]
        body.append((*k, _fmt(va), _fmt(vb), _fmt(vb - va) if va == va and vb == vb else "-"))
    return _table(("task", "metric", "shots", names[0], names[1], "diff"), body)


def _table(head: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in body)])


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"results file {p} not found; pass the results.json written by `interleaf eval --out DIR`")
    data = read_json(p, "results file")
    if not isinstance(data, dict) or "results" not in data:
        raise InputError(f"{p} is not an interleaf results file (no 'results' key)")
    return data
