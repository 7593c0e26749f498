"""The evaluation runner: tasks x shots x trials, sharded over processes, resumable.

::

    examples (eval split, first --limit) ──► shard: process r takes indices r, r + W, r + 2W, ...
        ──► skip ids already in the cache (every process's JSONL for this run key)
        ──► batches: demonstrations (seed = hash(trial seed, example id)) ──► prompts
        ──► generate_batch / score ──► records appended + flushed to cache/<task>/<key>/...rank<r>.jsonl
        ──► gather on rank 0 ──► check every index exactly once ──► metrics ──► samples/*.jsonl, results.json

With ``WORLD_SIZE > 1`` (``torchrun``) the processes share one ``torch.distributed`` group, owned by
:func:`interleaf.distributed.distributed`: ``evaluate`` uses the group already initialised (or the
``dist`` state it is given) and, called under ``torchrun`` with no group yet, opens the context for
the duration of the call. The per-task runner never creates a group. No sample is padded in or scored twice. The run key hashes everything
that changes a model output (model fingerprint, task spec, shots, trial seed, demo selection,
prompt options), so a changed setting never reuses stale samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..distributed import DistState, distributed, gather_objects
from ..errors import InputError
from ..files import iter_jsonl, skip_bad_line
from ..fingerprint import file_hash
from ..terminal import is_terminal
from .fewshot import (
    ZERO_SHOT_TRICK_DEMOS,
    FixedDemos,
    RandomDemos,
    prompt_text,
    render_chat,
    render_prompt,
    source_id,
)
from .results import aggregate_trials, compute_metrics, postprocess, results_table
from .rices import Encoder, VisionTowerEncoder, build_rices
from .scoring import generate_batch, reduce_scores, score
from .tasks import Example, TaskSpec, get_task, load_examples


@dataclass
class EvalOptions:
    """Settings of one evaluation run (recorded in the results file)."""

    shots: list[int] = field(default_factory=lambda: [0])
    trials: int = 1
    seed: int = 0  # trial t uses seed + t
    batch_size: int = 8
    rices: bool = False
    zero_shot_trick: bool = False  # 0-shot: two text-only demonstrations (OpenFlamingo); off by default
    chat: bool = False  # render prompts as chat conversations (the processor's chat template)
    limit: int | None = None
    data_dir: str | None = None
    images_dir: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    num_beams: int | None = None  # overrides the task's
    max_new_tokens: int | None = None  # overrides the task's
    compile: bool = False  # generate with a static KV cache and a compiled decoding step (same tokens)

    def __post_init__(self) -> None:
        if any(s < 0 for s in self.shots):
            raise InputError(f"--shots must be >= 0, got {self.shots}")
        if self.trials < 1 or self.batch_size < 1:
            raise InputError("--trials and --batch-size must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be at least 1, got {self.limit}")


# --------------------------------------------------------------------------- distributed


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Indices of process ``rank``: every ``world``-th from ``rank``; no index twice, none dropped."""
    return list(range(rank, n, world))


# --------------------------------------------------------------------------- fingerprints


def model_fingerprint(model: Any) -> str:
    """A cheap identity of a model's weights and config (for cache keys)."""
    h = hashlib.sha256(getattr(model.config, "_name_or_path", "").encode())
    h.update(json.dumps(model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else {},
                        sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{float(p.double().sum()):.8e}:{float(p.double().abs().sum()):.8e}".encode())
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("interleaf", "torch", "transformers", "tokenizers", "pycocoevalcap", "scikit-learn", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------- the cache


def _read_records(folder: Path) -> dict[str, dict]:
    """Finished records of every process's JSONL in ``folder``; a torn last line is ignored.

    A line that does not parse is what an interrupted write leaves: it is skipped, and its sample
    runs again.
    """
    done: dict[str, dict] = {}
    if not folder.is_dir():
        return done
    for path in sorted(folder.glob("*.jsonl")):
        for _, rec in iter_jsonl(path, "evaluation cache", on_bad_line=skip_bad_line):
            done[rec["id"]] = rec
    return done


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last line (an interrupted run) so appended records start on a new line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


# --------------------------------------------------------------------------- one (task, shots, trial)


class _TaskRun:
    def __init__(self, model, processor, task: TaskSpec, opts: EvalOptions, *, out_dir: Path | None,
                 model_id: str, encoder: Encoder | None, encoder_identity: str | None, progress: bool):
        self.model, self.processor, self.task, self.opts = model, processor, task, opts
        self.out_dir, self.model_id, self.progress = out_dir, model_id, progress
        self.family = processor.tokens.prompt_format
        self.template = task.template(self.family)
        self.files: dict[str, Path] = {}
        load = dict(data_dir=opts.data_dir, images_dir=opts.images_dir, options=opts.task_options, read=self.files)
        self.examples = load_examples(task, task.eval_split, **load)
        if opts.limit is not None:
            self.examples = self.examples[: opts.limit]
        if not self.examples:
            raise InputError(f"task {task.name!r}: the {task.eval_split!r} split is empty")
        self.fixed = self.examples[0].demos is not None
        needs_pool = not self.fixed and (max(opts.shots) > 0 or opts.zero_shot_trick)
        self.pool: list[Example] = (
            load_examples(task, task.demo_split, **load) if needs_pool else []
        )
        self.encoder = encoder
        self.encoder_identity = encoder_identity

    def key(self, shots: int, trial_seed: int) -> str:
        spec = dataclasses.asdict(self.task)
        payload = dict(model=self.model_id, task=spec, shots=shots, seed=trial_seed, rices=self.opts.rices,
                       encoder=self.encoder_identity if self.opts.rices else None, zst=self.opts.zero_shot_trick,
                       chat=self.opts.chat, family=self.family, options=self.opts.task_options,
                       beams=self.opts.num_beams, max_new=self.opts.max_new_tokens)
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def sampler(self, trial_seed: int, mine: list[Example], rank: int):
        if self.fixed:
            return FixedDemos()
        if self.opts.rices:
            cache = self.out_dir / "cache" / "rices" if self.out_dir else None
            return build_rices(self.pool, mine, self.processor, self.encoder, identity=self.encoder_identity,
                               cache_dir=cache)
        return RandomDemos(self.pool, trial_seed, self.task.query_set_size)

    def demos_for(self, sampler, ex: Example, shots: int, trial_seed: int) -> tuple[list[Example], bool]:
        if shots == 0 and self.opts.zero_shot_trick and not self.fixed:
            return RandomDemos(self.pool, trial_seed, self.task.query_set_size).sample(ex, ZERO_SHOT_TRICK_DEMOS), True
        return sampler.sample(ex, shots), False

    def prompt(self, demos: list[Example], ex: Example, text_only: bool) -> list[Any]:
        if self.opts.chat:
            if text_only:
                raise InputError("the zero-shot trick and chat rendering cannot be combined")
            return render_chat(self.template, demos, ex)
        return render_prompt(self.template, demos, ex, text_only_demos=text_only)

    def run(self, shots: int, trial: int, state: DistState) -> tuple[dict, list[dict]] | None:
        task, opts = self.task, self.opts
        rank, world = state.rank, state.world_size
        trial_seed = opts.seed + trial
        key = self.key(shots, trial_seed)
        cache_dir = self.out_dir / "cache" / _safe(task.name) / key if self.out_dir else None
        done = _read_records(cache_dir) if cache_dir else {}
        index = {e.id: i for i, e in enumerate(self.examples)}
        mine = [self.examples[i] for i in shard_indices(len(self.examples), rank, world)]
        todo = [e for e in mine if e.id not in done]
        sampler = self.sampler(trial_seed, mine if opts.rices else [], rank) if todo else None
        writer = None
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            path = cache_dir / f"rank{rank}.jsonl"
            _drop_torn_tail(path)
            writer = path.open("a", encoding="utf-8")
        from tqdm.auto import tqdm

        show = self.progress and rank == 0
        what = f"{task.name} {shots}-shot trial {trial}"
        # a bar on a terminal; elsewhere (a log file) one plain line when the run is done
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=what,
                   disable=not (show and is_terminal(sys.stderr)), leave=False)
        new: list[dict] = []
        try:
            for start in range(0, len(todo), opts.batch_size):
                batch = todo[start : start + opts.batch_size]
                records = self._run_batch(batch, sampler, shots, trial_seed)
                for rec in records:
                    rec["index"] = index[rec["id"]]
                    if writer is not None:
                        writer.write(json.dumps(rec) + "\n")
                if writer is not None:
                    writer.flush()
                new += records
                bar.update(len(batch))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if show and not is_terminal(sys.stderr):
            print(f"{what}: {len(mine)} examples ({len(mine) - len(todo)} from the cache)", file=sys.stderr, flush=True)
        mine_ids = {e.id for e in mine}
        local = [r for r in done.values() if r["id"] in mine_ids] + new
        gathered = gather_objects(local, state)
        if rank != 0:
            return None
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
        seen = [r["index"] for r in records]
        if seen != list(range(len(self.examples))):
            raise InputError(
                f"task {task.name!r}: gathered {len(seen)} samples for {len(self.examples)} examples "
                "(duplicated or missing indices); delete the run's cache folder and run again"
            )
        result = compute_metrics(task, records)
        result.update(trial=trial, seed=trial_seed, run_key=key)
        if self.out_dir is not None:
            path = self.out_dir / "samples" / _safe(task.name) / f"{shots}shot-trial{trial}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        return result, records

    def _run_batch(self, batch: list[Example], sampler, shots: int, trial_seed: int) -> list[dict]:
        task, opts = self.task, self.opts
        prompts, demo_ids = [], []
        for ex in batch:
            demos, text_only = self.demos_for(sampler, ex, shots, trial_seed)
            prompts.append(self.prompt(demos, ex, text_only))
            demo_ids.append([d.id for d in demos])
        records = []
        if task.request == "generate":
            raws = generate_batch(
                self.model, self.processor, prompts, max_new_tokens=opts.max_new_tokens or task.max_new_tokens,
                num_beams=opts.num_beams or task.num_beams, stop=task.stop, length_penalty=task.length_penalty,
                batch_size=opts.batch_size, compile=opts.compile,
            )
            for ex, prompt, ids, raw in zip(batch, prompts, demo_ids, raws):
                records.append(self._record(ex, prompt, ids, raw=raw, pred=postprocess(task.postprocess, raw)))
        else:
            for ex, prompt, ids in zip(batch, prompts, demo_ids):
                if not ex.candidates:
                    raise InputError(f"task {task.name!r}: example {ex.id!r} has no candidates to rank")
                conts = [self.template.render_candidate(c) for c in ex.candidates]
                raw_scores = score(self.model, self.processor, prompt, conts, batch_size=opts.batch_size)
                reduced = reduce_scores(raw_scores, task.rank_reduce)
                best = max(range(len(reduced)), key=lambda i: (reduced[i], -i))
                rec = self._record(ex, prompt, ids, raw=ex.candidates[best], pred=ex.candidates[best])
                rec.update(logprobs=[s for s, _ in raw_scores], n_tokens=[n for _, n in raw_scores],
                           pred_index=best, label=ex.label)
                if task.positive is not None:
                    t = torch.tensor(reduced)
                    rec["positive_prob"] = float(torch.softmax(t, 0)[ex.candidates.index(task.positive)])
                records.append(rec)
        return records

    def _record(self, ex: Example, prompt, demo_ids, *, raw: str, pred: str) -> dict:
        rec = {"id": ex.id, "prompt": prompt_text(prompt), "demo_ids": demo_ids, "raw": raw, "pred": pred,
               "answers": ex.answers, "group": ex.group, "source_id": source_id(ex)}
        for k in ("rotation", "image_id", "options"):
            if k in ex.meta:
                rec[k] = ex.meta[k]
        return rec


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- the public entry


def evaluate(
    model: Any, processor: Any, tasks: str | TaskSpec | list[str | TaskSpec], *, shots: int | list[int] = 0,
    trials: int = 1, seed: int = 0, batch_size: int = 8, rices: bool = False, zero_shot_trick: bool = False,
    chat: bool = False, limit: int | None = None, data_dir: str | Path | None = None,
    images_dir: str | Path | None = None, out_dir: str | Path | None = None, task_options: dict | None = None,
    rices_encoder: Encoder | None = None, rices_encoder_id: str | None = None, model_id: str | None = None,
    num_beams: int | None = None, max_new_tokens: int | None = None, compile: bool = False, progress: bool = True,
    print_table: bool = False, extra_config: dict | None = None,
    on_trial: Callable[[str, int, int, list[dict]], None] | None = None,
    dist: DistState | None = None,
) -> dict:
    """Evaluate ``model`` on ``tasks`` at each shot count over ``trials`` seeds; returns the results
    dict (also written to ``out_dir/results.json`` by rank 0, with per-sample JSONL under
    ``out_dir/samples``). Every process returns the same dict.

    Several processes: ``dist`` (or a group already initialised) is used as it is; under ``torchrun``
    with no group yet, the call opens :func:`interleaf.distributed.distributed` for its duration
    (destroyed after success; a failure in this process ends it with a non-zero status).
    """
    opts = EvalOptions(
        shots=[shots] if isinstance(shots, int) else list(shots), trials=trials, seed=seed, batch_size=batch_size,
        rices=rices, zero_shot_trick=zero_shot_trick, chat=chat, limit=limit,
        data_dir=str(data_dir) if data_dir is not None else None,
        images_dir=str(images_dir) if images_dir is not None else None, task_options=dict(task_options or {}),
        num_beams=num_beams, max_new_tokens=max_new_tokens, compile=compile,
    )
    task_list = [tasks] if isinstance(tasks, (str, TaskSpec)) else list(tasks)
    specs = [t if isinstance(t, TaskSpec) else get_task(t) for t in task_list]
    with contextlib.nullcontext(dist) if dist is not None else distributed() as state:
        return _evaluate(model, processor, specs, opts, state, out_dir=out_dir, rices_encoder=rices_encoder,
                         rices_encoder_id=rices_encoder_id, model_id=model_id, progress=progress,
                         print_table=print_table, extra_config=extra_config, on_trial=on_trial)


def _evaluate(
    model: Any, processor: Any, specs: list[TaskSpec], opts: EvalOptions, state: DistState, *,
    out_dir: str | Path | None, rices_encoder: Encoder | None, rices_encoder_id: str | None, model_id: str | None,
    progress: bool, print_table: bool, extra_config: dict | None,
    on_trial: Callable[[str, int, int, list[dict]], None] | None,
) -> dict:
    """``evaluate`` inside the process group ``state`` (every collective of the run happens here)."""
    rank, world = state.rank, state.world_size
    out = Path(out_dir) if out_dir is not None else None
    model_id = model_id or model_fingerprint(model)
    encoder, encoder_id = rices_encoder, rices_encoder_id
    if opts.rices and encoder is None:
        vt = VisionTowerEncoder(model)
        encoder, encoder_id = vt, vt.identity
    elif opts.rices and encoder_id is None:
        raise InputError("rices_encoder needs rices_encoder_id (a name that changes when the encoder does)")
    model.eval()
    results: dict[str, Any] = {}
    data_files: dict[str, dict] = {}
    for spec in specs:
        run = _TaskRun(model, processor, spec, opts, out_dir=out, model_id=model_id, encoder=encoder,
                       encoder_identity=encoder_id, progress=progress)
        per_shots = {}
        for k in opts.shots:
            trial_results = []
            for t in range(opts.trials):
                got = run.run(k, t, state)
                if got is not None:
                    trial_results.append(got[0])
                    if on_trial is not None:
                        on_trial(spec.name, k, t, got[1])
            if rank == 0:
                per_shots[str(k)] = aggregate_trials(trial_results)
        results[spec.name] = {"metric": spec.metric, "shots": per_shots, "n_examples": len(run.examples)}
        data_files[spec.name] = {k: {"path": str(p), "sha256": file_hash(p)} for k, p in sorted(run.files.items())} \
            if rank == 0 else {}
    summary = {
        "results": results,
        "config": {**dataclasses.asdict(opts), "tasks": [dataclasses.asdict(s) for s in specs], "world_size": world,
                   "model_id": model_id, "prompt_format": processor.tokens.prompt_format,
                   "rices_encoder": encoder_id if opts.rices else None, **(extra_config or {})},
        "versions": package_versions(),
        "data_files": data_files,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    summary = gather_objects(summary if rank == 0 else None, state)[0]
    if rank == 0:
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        if print_table:
            print(results_table(summary))
    return summary


def evaluate_synthetic(
    model: Any, processor: Any, corpus_dir: str | Path, *, shots: int = 0, limit: int | None = None,
    chat: bool = False, batch_size: int = 8, out_dir: str | Path | None = None, captions: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out synthetic VQA (exact match overall and per question type) and captions (CIDEr).

    Returns ``{"vqa": {"exact_match", "vqa_accuracy", "per_qtype": {qtype: exact match}, "n"},
    "caption": {"CIDEr", "BLEU-4", "n"}, "results": <full results dict>}``. ``chat=True`` renders
    prompts with the processor's chat template (for instruction-tuned models).
    """
    tasks = ["synth-vqa"] + (["synth-caption"] if captions else [])
    res = evaluate(model, processor, tasks, shots=shots, limit=limit, chat=chat, batch_size=batch_size,
                   data_dir=corpus_dir, out_dir=out_dir, progress=progress)
    vqa = res["results"]["synth-vqa"]["shots"][str(shots)]["trials"][0]
    out: dict[str, Any] = {
        "vqa": {"exact_match": vqa["metrics"]["exact_match"], "vqa_accuracy": vqa["metrics"]["vqa_accuracy"],
                "per_qtype": vqa["groups"], "n": vqa["n"]},
        "results": res,
    }
    if captions:
        cap = res["results"]["synth-caption"]["shots"][str(shots)]["trials"][0]
        out["caption"] = {"CIDEr": cap["metrics"]["CIDEr"], "BLEU-4": cap["metrics"]["BLEU-4"], "n": cap["n"]}
    return out
