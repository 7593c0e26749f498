"""Model cards: the ``README.md`` of a saved model directory, and pushing a directory to the hub.

:func:`write_model_card` writes the card :func:`interleaf.save` (and so training's final model and
the converters' outputs) leaves in every directory it writes. The card opens with the hub's
metadata block, read by ``huggingface_hub.ModelCard.load``::

    ---
    library_name: interleaf
    pipeline_tag: image-text-to-text
    base_model: [openai/clip-vit-large-patch14, meta-llama/Llama-2-7b-hf]   # when known
    datasets: [...]                                                         # when given
    tags: [interleaf, cross-attention, idefics]
    model-index: [...]                                                      # evaluation results, when known
    # license: ...   (a comment: the licence is the model's owner's choice, never filled in here)
    ---

followed by the architecture, how to load the model, the training summary (a stage's
``summary.json``: steps, final loss, tokens, data sources) and the evaluation results (an
``interleaf eval`` ``results.json``) when known.

``base_model`` lists only hub repository ids: one given by the caller, or a source path that
spells one (``owner/name`` that is not a local path, or a hub cache folder
``.../models--owner--name/snapshots/...``). A local directory never becomes metadata; it is
named in the card's text instead.

A ``README.md`` that interleaf did not write (it lacks the marker line :data:`CARD_MARKER`) is
kept as it is: the call logs that and returns ``None``. interleaf's own card is rewritten on
every save, keeping a ``license`` (and ``license_name``, ``license_link``, ``language``) its
owner added to the metadata; delete the marker line to make the card yours.

:func:`push` uploads a directory with ``huggingface_hub`` (``interleaf push DIR REPO``): the one
step in interleaf that uses the network, refused when ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import CheckpointError, InputError
from .files import read_json

log = logging.getLogger(__name__)

CARD_MARKER = "<!-- interleaf model card: rewritten on every save; delete this line to keep your own edits -->"
KEPT_FIELDS = ("license", "license_name", "license_link", "language")  # the owner's choices, kept on rewrite
_LICENSE_NOTE = (
    "# license: set the licence of these weights here (e.g. apache-2.0, or other with license_name and "
    "license_link); it must respect the base models' licences. interleaf does not choose one."
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_DIR = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)(?:/|$)")
_FUSION = {
    "cross_attention": "gated cross-attention layers read the images (the Flamingo family)",
    "token_insertion": "image embeddings are written into the language model's input (the LLaVA family)",
}


def hub_id(source: Any) -> str | None:
    """The hub repository id a source names, or None (a local directory, a config, nothing)."""
    if not isinstance(source, (str, Path)) or not str(source):
        return None
    text = str(source).replace("\\", "/")
    cached = _CACHE_DIR.search(text)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if _HUB_ID.match(text) and not Path(text).expanduser().exists():
        return text
    return None


def write_model_card(
    path: str | Path,
    *,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    training: dict | None = None,
    evaluation: dict | str | Path | None = None,
    tags: list[str] | None = None,
    converted_from: str | Path | None = None,
    carry_from: str | Path | None = None,
    keep_evaluation: bool = False,
) -> Path | None:
    """Write ``path/README.md`` for the model saved in ``path``; returns it, or None when the user's own is kept.

    ``base_model`` and ``datasets`` are hub ids (added to those the model's config names);
    ``training`` is a stage's summary (``summary.json``) with an optional ``"stage"`` config dict
    under ``"config"``; ``evaluation`` is a results dict or the path of a ``results.json`` written
    by ``interleaf eval`` (default: ``path/results.json`` when present); ``converted_from`` is the
    checkpoint a converter read (named in the text, and a base model when it spells a hub id).
    ``carry_from`` is a directory whose interleaf card (``path`` itself allowed) passes on its base
    models, datasets and training stages: a fine-tune's card lists every stage that led to it.
    Evaluation results belong to one set of weights and are never passed on, except with
    ``keep_evaluation=True`` and no new results: then the card in ``carry_from`` keeps its own.
    """
    from huggingface_hub import ModelCardData

    p = Path(path)
    config = read_json(p / "config.json", "model config", error=CheckpointError) if (p / "config.json").is_file() else {}
    readme = p / "README.md"
    kept = {}
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if CARD_MARKER not in text:
            log.info("%s was not written by interleaf; it is kept as it is (no model card written)", readme)
            return None
        kept = {k: v for k, v in _front_matter(text).items() if k in KEPT_FIELDS}
    rows = _eval_rows(_evaluation(p, evaluation))
    sources = _sources(config)
    if converted_from is not None:
        sources["converted from"] = str(converted_from)
    earlier = _card_parts(carry_from)
    rows = rows or (earlier["evaluation"] if keep_evaluation else [])
    bases = _unique([*earlier["base_model"], *_as_list(base_model), *(hub_id(s) for s in sources.values())])
    data = ModelCardData(
        library_name="interleaf", pipeline_tag="image-text-to-text", base_model=bases or None,
        datasets=_unique([*earlier["datasets"], *_as_list(datasets)]) or None, tags=_tags(config, tags),
        eval_results=_eval_results(rows) or None, model_name=_title(p) if rows else None, **kept,
    )
    meta = data.to_yaml().rstrip("\n")
    if "license" not in kept:
        meta += "\n" + _LICENSE_NOTE
    stages = earlier["stages"] + (_stage_lines(training) if training else [])
    body = _body(p, config, sources, stages, rows)
    readme.write_text(f"---\n{meta}\n---\n{CARD_MARKER}\n\n{body}", encoding="utf-8")
    return readme


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _unique(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _card_parts(directory: str | Path | None) -> dict[str, list]:
    """What an interleaf card in ``directory`` holds: base models, datasets, its training stages' lines, evaluation rows."""
    parts: dict[str, list] = {"base_model": [], "datasets": [], "stages": [], "evaluation": []}
    readme = Path(directory) / "README.md" if directory else None
    if readme is None or not readme.is_file():
        return parts
    text = readme.read_text(encoding="utf-8", errors="replace")
    if CARD_MARKER not in text:
        return parts
    meta = _front_matter(text)
    parts["base_model"], parts["datasets"] = _as_list(meta.get("base_model")), _as_list(meta.get("datasets"))
    section = re.search(r"\n## Training\n(.*?)(?=\n## |\Z)", text, re.S)
    if section and "\n### " in "\n" + section.group(1):
        block = section.group(1)[section.group(1).index("### "):].rstrip("\n")
        parts["stages"] = block.split("\n") + [""]
    parts["evaluation"] = _model_index_rows(meta)
    return parts


def _model_index_rows(meta: dict) -> list[tuple[str, str, str, float]]:
    from huggingface_hub.repocard_data import model_index_to_eval_results

    index = meta.get("model-index")
    if not isinstance(index, list):
        return []
    try:
        _, results = model_index_to_eval_results(index)
    except (KeyError, TypeError, ValueError):  # a hand-edited index that no longer parses is dropped
        return []
    return [(r.dataset_name, r.metric_type, (r.dataset_config or "?").removesuffix("-shot"), float(r.metric_value))
            for r in results]


def _front_matter(text: str) -> dict:
    import yaml

    m = re.match(r"^---\n(.*?)\n---", text, re.S)
    try:
        data = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _sources(config: dict) -> dict[str, str]:
    """Where the model's parts came from, as its config records them (``_name_or_path``)."""
    out = {}
    text = config.get("text_config") or {}
    if text.get("_name_or_path"):
        out["language model"] = str(text["_name_or_path"])
    vision = (config.get("vision") or {}).get("hf_config") or {}
    if isinstance(vision, dict) and vision.get("_name_or_path"):
        out["vision tower"] = str(vision["_name_or_path"])
    return out


def _tags(config: dict, extra: list[str] | None) -> list[str]:
    fusion = config.get("fusion")
    fmt = (config.get("tokens") or {}).get("prompt_format")
    return _unique(["interleaf", "vision-language", fusion and fusion.replace("_", "-"), fmt, *(extra or [])])


def _evaluation(path: Path, evaluation: dict | str | Path | None) -> dict:
    if isinstance(evaluation, dict):
        return evaluation
    file = Path(evaluation) if evaluation is not None else path / "results.json"
    if evaluation is None and not file.is_file():
        return {}
    if not file.is_file():
        raise InputError(f"evaluation results {str(file)!r} not found; pass the results.json `interleaf eval --out DIR` writes")
    data = read_json(file, "evaluation results")
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise InputError(f"{str(file)!r} is not an interleaf results file (no 'results' mapping); pass the results.json "
                         "`interleaf eval --out DIR` writes")
    return data


def _eval_rows(results: dict) -> list[tuple[str, str, str, float]]:
    """(task, metric, shots, mean) for every finite result."""
    rows = []
    for task, tr in (results.get("results") or {}).items():
        for shots, agg in (tr.get("shots") or {}).items():
            mean = agg.get("mean") if isinstance(agg, dict) else None
            if isinstance(mean, (int, float)) and math.isfinite(mean):
                rows.append((str(task), str(tr.get("metric", "score")), str(shots), float(mean)))
    return rows


def _eval_results(rows: list[tuple[str, str, str, float]]) -> list:
    from huggingface_hub import EvalResult

    return [
        EvalResult(task_type="image-text-to-text", dataset_type=task, dataset_name=task, metric_type=metric,
                   metric_value=mean, metric_name=f"{metric} ({shots}-shot)", dataset_config=f"{shots}-shot")
        for task, metric, shots, mean in rows
    ]


def _body(path: Path, config: dict, sources: dict[str, str], stages: list[str], rows: list) -> str:
    fusion = config.get("fusion", "cross_attention")
    vision = config.get("vision") or {}
    text = config.get("text_config") or {}
    lines = [
        f"# {_title(path)}", "",
        f"A vision-language model built with interleaf: {_FUSION.get(fusion, fusion)}.",
        "", "## Architecture", "",
        f"- fusion: `{fusion}`",
        f"- vision tower: `{vision.get('kind', 'unknown')}`" + _from(sources.get("vision tower")),
        f"- language model: `{text.get('model_type', 'unknown')}`" + _from(sources.get("language model")),
        f"- prompt format: `{(config.get('tokens') or {}).get('prompt_format', 'unknown')}`",
        *([f"- converted from `{sources['converted from']}`"] if "converted from" in sources else []),
        "", "## Use", "", "```python", "import interleaf", "from huggingface_hub import snapshot_download", "",
        "model, processor = interleaf.load(snapshot_download(\"OWNER/NAME\"))  # or a local directory",
        "```", "",
    ]
    if stages:
        lines += ["## Training", "", "Trained with `interleaf train`, in this order:", "", *stages]
    if rows:
        lines += ["## Evaluation", "", "| task | metric | shots | mean |", "| --- | --- | --- | --- |"]
        lines += [f"| {t} | {m} | {s} | {v:.4f} |" for t, m, s, v in rows] + [""]
    lines += ["## Licence", "", "Not set by interleaf: add `license:` to the metadata above, respecting the base models' "
              "licences.", ""]
    return "\n".join(lines)


def _title(path: Path) -> str:
    """The directory's name; a training run's ``OUT/final`` is named after ``OUT``."""
    p = path.resolve()
    return p.parent.name if p.name in ("final", ".tmp-final") and p.parent.name else p.name


def _from(source: str | None) -> str:
    return f" from `{source}`" if source else ""


def _stage_lines(s: dict) -> list[str]:
    """One training stage's subsection: its summary (``summary.json``) and settings."""
    loss = s.get("final_loss")
    stage = s.get("config") or {}
    lines = [f"### Stage `{s.get('stage', '?')}`", "",
             f"- steps: {s.get('steps', '?')}" + (f" (batch size {stage['batch_size']})" if "batch_size" in stage else ""),
             "- final loss: " + ("none (every step was skipped)" if loss is None else f"{float(loss):.4f}")]
    for key, label in (("tokens_seen", "tokens seen"), ("samples_seen", "samples seen"),
                       ("trainable_parameters", "trainable parameters"), ("processes", "processes"),
                       ("time_s", "time (s)"), ("nonfinite_steps", "steps skipped (non-finite)")):
        if s.get(key) is not None:
            lines.append(f"- {label}: {s[key]:,}" if isinstance(s[key], int) else f"- {label}: {s[key]}")
    for key in ("objective", "freeze"):
        if stage.get(key):
            lines.append(f"- {key}: `{stage[key]}`")
    start = stage.get("model")
    if isinstance(start, dict) and start:
        lines.append("- started from: " + ", ".join(f"{k} `{v}`" for k, v in start.items()))
    if stage.get("data"):
        lines.append(f"- data: `{_data_text(stage['data'])}`")
    read = s.get("samples_read_by_source") or {}
    if read:
        lines.append("- samples read by source: " + ", ".join(f"{k} {v:,}" for k, v in sorted(read.items())))
    return lines + [""]


def _data_text(data: Any) -> str:
    if isinstance(data, dict):
        names = [src.get("name", "?") for src in data.get("sources", []) if isinstance(src, dict)]
        return "inline mixture of " + ", ".join(names) if names else "inline mixture"
    return str(data)


# --------------------------------------------------------------------------- the hub


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(str(f).upper() in ("1", "ON", "YES", "TRUE") for f in flags if f)


def push(path: str | Path, repo: str, *, private: bool | None = None, revision: str | None = None,
         message: str | None = None, api: Any = None) -> str:
    """Upload the model directory ``path`` to the hub repository ``repo`` (created if absent); returns its URL.

    The only call in interleaf that needs the network. Refused when ``HF_HUB_OFFLINE`` (or
    ``TRANSFORMERS_OFFLINE``) is set; the directory must hold a saved model, and gets interleaf's
    card first when it has no ``README.md``. ``api`` is a ``huggingface_hub.HfApi`` (default: a new one,
    which reads the token from ``HF_TOKEN`` or ``hf auth login``).
    """
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() or not any(p.glob("*.safetensors")):
        raise InputError(f"{str(p)!r} is not a saved model directory (config.json and *.safetensors); pass the directory "
                         "interleaf.save, `interleaf train` (OUT/final) or `interleaf convert` wrote")
    if not _HUB_ID.match(repo):
        raise InputError(f"repository {repo!r} is not a hub id; pass OWNER/NAME, e.g. my-user/my-model")
    if _offline():
        raise InputError(f"cannot push {str(p)!r} to {repo!r}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set; unset it "
                         "to use the network, or upload the directory later")
    if not (p / "README.md").is_file():
        write_model_card(p)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(p), revision=revision,
                      commit_message=message or "Upload an interleaf model", ignore_patterns=[".tmp-*", "*.lock"])
    return f"https://huggingface.co/{repo}"


__all__ = ["CARD_MARKER", "hub_id", "push", "write_model_card"]
