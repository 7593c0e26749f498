"""``interleaf demo``: a tiny vision-language model trained from scratch, end to end, on a laptop.

::

    synthetic corpus (rendered scenes, real on-disk formats)   interleaf.data.synth
      └─► tokenizer trained on the corpus text
      └─► the packaged recipe ``demo`` (interleaf/recipes/demo/recipe.yaml), four stages through the ordinary trainer:
            lm   the tiny LM learns the corpus language from text alone
            pt   pretraining on pairs + documents; LM frozen (vision, resampler, cross-attention train)
            mtt  multi-task: captions + VQA with InfiMM's task prompts; LM frozen
            ift  instruction tuning on conversations; LM unfrozen (InfiMM's LLaMA stage)
      └─► held-out evaluation with interleaf.evaluation (VQA exact match per question type, the
          same questions on blank images, caption CIDEr)
      └─► runs/demo/metrics.json, runs/demo/report.html, runs/demo/final

``fusion="token_insertion"`` (``interleaf demo --fusion token_insertion``) runs the packaged recipe
``demo_token_insertion`` instead: the same tower and LM, an MLP projector, and each image's vision
tokens written over its ``<image>`` tokens (LLaVA's architecture), through the same stages, trainer
and evaluation; its outputs go to runs/demo_token_insertion by default.

Nothing here is special training code: the stages are shipped recipes run by ``interleaf.train``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ..files import read_json, read_yaml

RECIPE = "demo"  # the packaged recipe's name (interleaf.recipes)
# The packaged recipe of each fusion family, and where its run goes by default.
RECIPES = {"cross_attention": RECIPE, "token_insertion": "demo_token_insertion"}
DEFAULT_OUT = {"cross_attention": "runs/demo", "token_insertion": "runs/demo_token_insertion"}
CORPUS_ENV = "INTERLEAF_DEMO_CORPUS"


def _recipe_path(recipe: str | Path | None = None, fusion: str | None = None) -> Path:
    """The file of ``recipe`` (a path or a packaged recipe's name), by default the packaged demo
    recipe of ``fusion`` (cross-attention when None). Both at once is a :class:`ConfigError`: a
    recipe's own model says which family it trains."""
    from ..errors import ConfigError
    from ..recipes import resolve

    if fusion is not None and fusion not in RECIPES:
        raise ConfigError("fusion", f"{fusion!r} is not a fusion family", f"use one of {list(RECIPES)}")
    if recipe is not None and fusion is not None:
        raise ConfigError(
            "fusion", "is given with a recipe of your own, whose model already says its family",
            "pass either fusion (the packaged demo recipe of that family) or recipe",
        )
    return resolve(RECIPES[fusion or "cross_attention"] if recipe is None else recipe, "recipe")


# Question types whose text-only reading-comprehension versions the lm stage learns from.
TEXT_QA_TYPES: tuple[str, ...] = ("colour", "shape")


def write_text_corpus(corpus: Path, qtypes: tuple[str, ...] = TEXT_QA_TYPES) -> Path:
    """The text the tiny LM learns the corpus language from, before it is frozen.

    Two kinds of entries, written to ``llava/text_train.json``:

    - each training scene's caption as the answer to the caption prompt (the language of the
      captions, which pt and mtt then ask the frozen LM to continue);
    - reading comprehension: every training question of the types in ``qtypes``, asked after a
      description of its scene that says where each object is ("a red circle at the top left and
      a blue square at the bottom right. what colour is the circle?" -> "red").

    Questions are never shown without their description: alone, their answers cannot be known
    from the text, and a small LM trained on them learns that an answer does not depend on the
    question's words; frozen in pt and mtt, it then carries nothing from the question to where the
    answer is written, and colour and yes/no answers stayed near chance after instruction tuning
    (measured with the demo recipe: colour 59-64%, yes/no 47-50%). Reading comprehension about
    colours and shapes teaches the LM to look up the object a question names (measured with the
    shipped recipe on 2 cores: colour 87.0%, yes/no 90.8%). Adding the other types' text did not help and made colour unstable
    between runs (60-97%), so they are left to the image stages.
    """
    from ..data.synth import CAPTION_PROMPT, Scene, caption, located_caption, strip_image_markers

    scenes = read_json(corpus / "scenes.json", "demo corpus")
    entries = []
    for i, (path, scene) in enumerate(sorted(scenes.items())):
        if path.startswith("train/"):
            entries.append({"id": f"text-caption-{i}", "conversations": [
                {"from": "human", "value": CAPTION_PROMPT}, {"from": "gpt", "value": caption(Scene.from_dict(scene))}]})
    for e in read_json(corpus / "llava" / "vqa_train.json", "demo corpus"):
        if e["qtype"] not in qtypes:
            continue
        located = located_caption(Scene.from_dict(scenes[e["image"]]))
        question = strip_image_markers(e["conversations"][0]["value"])
        entries.append({"id": f"text-{e['id']}", "conversations": [
            {"from": "human", "value": f"{located} {question}"}, {"from": "gpt", "value": e["conversations"][1]["value"]}]})
    path = corpus / "llava" / "text_train.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def blank_copy(corpus: Path, dst: Path) -> Path:
    """The held-out split with every image replaced by a black one (same files, same questions)."""
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "images" / "heldout").mkdir(parents=True)
    shutil.copytree(corpus / "llava", dst / "llava")
    shutil.copy(corpus / "corpus.json", dst / "corpus.json")
    black = None
    for src in sorted((corpus / "images" / "heldout").glob("*.png")):
        if black is None:
            with Image.open(src) as im:
                black = Image.new("RGB", im.size)
        black.save(dst / "images" / "heldout" / src.name)
    return dst


def _curves(out: Path, stages: list[str]) -> dict[str, list[tuple[float, float]]]:
    from .report import read_jsonl

    curves = {}
    for name in stages:
        rows = read_jsonl(out / name / "metrics.jsonl")
        curves[name] = [(float(r["step"]), float(r["loss"])) for r in rows if "loss" in r and "step" in r]
    return curves


def _gallery(eval_dir: Path, corpus: Path, n: int = 30) -> list[dict[str, Any]]:
    """Held-out questions with their image, the answer and the model's output (a spread of types)."""
    from .report import read_jsonl

    entries = {e["id"]: e for e in read_json(corpus / "llava" / "vqa_heldout.json", "demo corpus")}
    rows = [r for path in sorted((eval_dir / "samples" / "synth-vqa").glob("*.jsonl")) for r in read_jsonl(path)]
    gallery = []
    for r in rows[:n]:
        entry = entries.get(r.get("source_id", r["id"]))
        if entry is None:
            continue
        gallery.append({
            "image": entry["image"],
            "question": entry["conversations"][0]["value"].replace("<image>", "").strip(),
            "answer": entry["conversations"][1]["value"],
            "prediction": str(r.get("pred", "")),
            "qtype": str(r.get("group", "")),
        })
    return gallery


def run_demo(
    out: str | Path | None = None,
    *,
    seed: int = 0,
    train_scenes: int = 8000,
    heldout_scenes: int = 400,
    overrides: list[str] | None = None,
    progress: bool = True,
    recipe: str | Path | None = None,
    fusion: str | None = None,
) -> dict[str, Any]:
    """Run the whole demo; returns the metrics written to ``out/metrics.json``.

    ``fusion`` chooses the packaged recipe: ``cross_attention`` (the default: ``demo``) or
    ``token_insertion`` (``demo_token_insertion``); ``out`` defaults to :data:`DEFAULT_OUT` of it.
    ``recipe`` (a YAML path or a packaged recipe's name) replaces the packaged recipe (a recipe
    with the same stage layout: its first stage's ``model.tokenizer`` is set to the corpus
    tokenizer); it is given instead of ``fusion``, not with it.
    """
    from ..api import load
    from ..data.synth import corpus_text, write_corpus
    from ..evaluation.runner import evaluate_synthetic
    from ..processing import build_tiny_tokenizer

    recipe_path = _recipe_path(recipe, fusion)  # a missing one fails here, before minutes of corpus writing
    out = Path(DEFAULT_OUT[fusion or "cross_attention"] if out is None else out)
    start = time.perf_counter()
    timings: dict[str, float] = {}
    corpus = out / "corpus"
    print(f"[demo] writing the synthetic corpus to {corpus}")
    write_corpus(corpus, seed=seed, n_train_scenes=train_scenes, n_heldout_scenes=heldout_scenes, overwrite=True)
    write_text_corpus(corpus)
    tokenizer = build_tiny_tokenizer(text="\n".join(corpus_text(corpus)), vocab_size=400)
    tokenizer.save_pretrained(out / "tokenizer")
    timings["corpus"] = time.perf_counter() - start

    t = time.perf_counter()
    results = _train_stages(recipe_path, out, corpus, overrides, progress)
    stage_names = [r.name for r in results]
    timings["training"] = time.perf_counter() - t
    final = results[-1].final
    if (out / "final").exists():
        shutil.rmtree(out / "final")
    shutil.copytree(final, out / "final")

    t = time.perf_counter()
    model, processor = load(out / "final")
    held = evaluate_synthetic(model, processor, corpus, chat=True, batch_size=32, out_dir=out / "eval")
    blank = evaluate_synthetic(
        model, processor, blank_copy(corpus, out / "corpus_blank"), chat=True, batch_size=32,
        out_dir=out / "eval_blank", captions=False,
    )
    timings["evaluation"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    metrics = {
        "heldout_vqa_exact_match": held["vqa"]["exact_match"],
        "heldout_vqa_per_question_type": held["vqa"]["per_qtype"],
        "blank_images_vqa_exact_match": blank["vqa"]["exact_match"],
        "blank_images_per_question_type": blank["vqa"]["per_qtype"],
        "caption_cider": held["caption"]["CIDEr"],
        "n_questions": held["vqa"]["n"],
        "stages": stage_names,
        "fusion": model.config.fusion,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "trainable_parameters": model.num_trainable_parameters(),
        "parameters": model.num_parameters(),
    }
    _write_outputs(out, corpus, metrics, stage_names)
    return metrics


def _train_stages(
    recipe_path: Path, out: Path, corpus: Path, overrides: list[str] | None, progress: bool
) -> list[Any]:
    """Every stage of the recipe, each started afresh, on the corpus's tokenizer; the stage results."""
    from ..training import train

    recipe_data = read_yaml(recipe_path, "recipe", "pass a recipe YAML")
    for stage in (recipe_data.get("stages") if isinstance(recipe_data, dict) else None) or []:  # a rerun starts each stage afresh instead of resuming it
        name = stage.get("name") if isinstance(stage, dict) else None
        if name and (out / name).exists():
            shutil.rmtree(out / name)
    # The recipe's data configs name their files ${INTERLEAF_DEMO_CORPUS}/...: the variable is set
    # for the training run only, and the caller's value (or its absence) is restored afterwards.
    previous = os.environ.get(CORPUS_ENV)
    os.environ[CORPUS_ENV] = str(corpus.resolve())
    try:
        results = train(
            recipe_path,
            [f"stages.0.model.tokenizer={(out / 'tokenizer').resolve()}", *(overrides or [])],
            out=out,
            progress=progress,
        )
    finally:
        if previous is None:
            os.environ.pop(CORPUS_ENV, None)
        else:
            os.environ[CORPUS_ENV] = previous
    return results


_TITLE_SUFFIX = {"token_insertion": " (token insertion)"}


def _write_outputs(out: Path, corpus: Path, metrics: dict[str, Any], stage_names: list[str]) -> None:
    """``metrics.json``, the HTML report, and the summary printed for the user."""
    from .report import write_report

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_report(
        out / "report.html", metrics=metrics, curves=_curves(out, stage_names), gallery=_gallery(out / "eval", corpus),
        images_root=corpus / "images",
        title="interleaf demo: a tiny VLM trained from scratch" + _TITLE_SUFFIX.get(metrics.get("fusion"), ""),
    )
    print(summary_table(metrics))
    print(f"[demo] report: {out / 'report.html'}  model: {out / 'final'}")
    print(f"[demo] try: interleaf generate --model {out / 'final'} --image "
          f"{next((corpus / 'images' / 'heldout').glob('*.png'))} \"what colour is the circle?\"")


def summary_table(metrics: dict[str, Any]) -> str:
    lines = ["", "held-out VQA exact match (blank images in brackets)", "-" * 48]
    per = metrics["heldout_vqa_per_question_type"]
    blank = metrics["blank_images_per_question_type"]
    for qtype in sorted(per):
        lines.append(f"  {qtype:<10} {per[qtype]:7.1%}   ({blank.get(qtype, float('nan')):.1%})")
    lines.append(f"  {'overall':<10} {metrics['heldout_vqa_exact_match']:7.1%}   "
                 f"({metrics['blank_images_vqa_exact_match']:.1%})")
    lines.append(f"caption CIDEr: {metrics['caption_cider']:.3f}")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in metrics["seconds"].items()))
    return "\n".join(lines)
