"""Dataset adapters: local files in each benchmark's public format -> lists of :class:`Example`.

Every adapter reads only local files through :class:`DataContext`, which resolves the task's
``files`` entries against the data directory and, for a missing file, raises an error naming
the file, where it was looked for, and where the public dataset provides it. Formats:

- ``karpathy``: COCO / Flickr30k Karpathy-split JSON (``dataset_coco.json``): ``images`` with
  ``split``, ``filename`` (+ ``filepath`` for COCO) and ``sentences[].raw``.
- ``vqa``: VQAv2 / OK-VQA question and annotation JSON, paired by ``question_id`` (never by
  position); also TextVQA's single file (``data``) and VizWiz's list of ``{image, question,
  answers}``.
- ``hateful_memes``: JSON lines ``{id, img, label, text}``.
- ``imagefolder``: an ImageNet-style tree ``split/<class>/<image>`` (class names optionally from
  a JSON map folder -> name); ranked over every class name.
- ``scienceqa``: ``problems.json`` (image questions only; images ``<split>/<pid>/image.png``).
- ``mmbench``: TSV with base64 images; every rotation of the options is one example (CircularEval).
- ``mme``: the MME_Benchmark tree (per subtask: images with ``.txt`` files of
  ``question<TAB>answer`` lines, or ``images/`` + ``questions_answer_YES_NO/``).
- ``mmmu``: the hub's parquet files (``{Subject}/validation-*.parquet``, a glob; images as
  ``{bytes, path}``; see :mod:`.tables`), or JSON / JSON lines, with ``question``, ``options``,
  ``answer`` and ``image_1..7`` (paths or base64); ``<image k>`` marks place the images inside the text.
- ``llava``: a LLaVA-format conversation JSON; the last assistant turn is the reference.

Other modules add adapters for their own data with :func:`adapter` (the synthetic corpus's are in
:mod:`interleaf.demo.tasks`).
"""

from __future__ import annotations

import ast
import base64
import csv
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import InputError
from ...files import read_json, read_jsonl
from ..metrics import index_to_letter
from .spec import IMAGE_MARK, Example, TaskSpec
from .tables import is_table_entry, table_rows

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".JPEG", ".JPG", ".PNG")


@dataclass
class DataContext:
    """Where a task's files are; records every file read (for the dataset hashes in results)."""

    task: TaskSpec
    data_dir: Path
    images_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    read: dict[str, Path] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        return key in self.task.files

    def path(self, key: str, *, directory: bool = False) -> Path:
        """The file (or folder) of ``files[key]``, which must exist."""
        if key not in self.task.files:
            raise InputError(
                f"task {self.task.name!r} has no file entry {key!r}; its files are {sorted(self.task.files)}"
            )
        rel = Path(self.task.files[key]).expanduser()
        p = rel if rel.is_absolute() else self.data_dir / rel
        ok = p.is_dir() if directory else p.is_file()
        if not ok:
            where = f" ({self.task.source})" if self.task.source else ""
            raise InputError(
                f"task {self.task.name!r}: {'folder' if directory else 'file'} {rel.as_posix()!r} ({key}) not found "
                f"at {p}; put the public dataset's file there{where}, or pass --data DIR pointing to the folder "
                "that holds it"
            )
        self.read[key] = p
        return p

    def image(self, rel: str | Path) -> Path:
        root = self.images_dir if self.images_dir is not None else self.data_dir
        p = Path(rel)
        return p if p.is_absolute() else root / p


Adapter = Callable[[DataContext, str], list[Example]]
ADAPTERS: dict[str, Adapter] = {}


def adapter(name: str) -> Callable[[Adapter], Adapter]:
    def wrap(fn: Adapter) -> Adapter:
        ADAPTERS[name] = fn
        return fn

    return wrap


def split_key(ctx: DataContext, split: str, suffix: str = "") -> str:
    """The ``files`` key of ``split`` (``f"{split}{suffix}"``); a task without one is an error."""
    key = f"{split}{suffix}"
    if not ctx.has(key):
        raise InputError(
            f"task {ctx.task.name!r} has no files for split {split!r} (expected a files entry {key!r}); "
            f"its files are {sorted(ctx.task.files)}"
        )
    return key


# --------------------------------------------------------------------------- captioning


@adapter("karpathy")
def load_karpathy(ctx: DataContext, split: str) -> list[Example]:
    """Karpathy-split captions; ``train`` includes ``restval``."""
    data = read_json(ctx.path("annotations"), f"task {ctx.task.name!r}")
    if not isinstance(data, dict) or "images" not in data:
        raise InputError(f"{ctx.read['annotations']} is not a Karpathy-split file: it has no 'images' list")
    wanted = {"train", "restval"} if split == "train" else {split}
    out = []
    for item in data["images"]:
        if item.get("split") not in wanted:
            continue
        refs = [s["raw"].strip() for s in item.get("sentences", [])]
        if not refs:
            continue
        image_id = item.get("cocoid", item.get("imgid"))
        rel = Path(item.get("filepath", "")) / item["filename"]
        out.append(Example(id=str(image_id), images=[ctx.image(rel)], fields={"caption": refs[0]}, answers=refs))
    return out


# --------------------------------------------------------------------------- VQA


def _most_common(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0] if answers else ""


@adapter("vqa")
def load_vqa(ctx: DataContext, split: str) -> list[Example]:
    """VQA-format questions + annotations paired by question_id; TextVQA / VizWiz single files."""
    qkey = split_key(ctx, split, "_questions")
    qdata = read_json(ctx.path(qkey), f"task {ctx.task.name!r}")
    pattern = ctx.task.files.get(f"{split}_images", "{image_id}")
    if isinstance(qdata, dict) and "data" in qdata:  # TextVQA: one file with answers
        rows = [
            (str(q["question_id"]), q["question"], q.get("answers", []), str(q["image_id"]), q.get("answer_type"))
            for q in qdata["data"]
        ]
    elif isinstance(qdata, list):  # VizWiz: a list of {image, question, answers}
        rows = [
            (Path(q["image"]).stem, q["question"], [a["answer"] for a in q.get("answers", [])], q["image"],
             q.get("answer_type"))
            for q in qdata
        ]
    else:
        if "questions" not in qdata:
            raise InputError(f"{ctx.read[qkey]} is not a VQA question file: no 'questions' list")
        akey = split_key(ctx, split, "_annotations")
        adata = read_json(ctx.path(akey), f"task {ctx.task.name!r}")
        by_qid = {a["question_id"]: a for a in adata.get("annotations", [])}
        rows = []
        for q in qdata["questions"]:
            a = by_qid.get(q["question_id"])
            if a is None:
                raise InputError(
                    f"question_id {q['question_id']} of {ctx.read[qkey]} has no annotation in {ctx.read[akey]}; "
                    "use the annotation file of the same split"
                )
            rows.append((str(q["question_id"]), q["question"], [x["answer"] for x in a["answers"]],
                         q["image_id"], a.get("answer_type")))
    out = []
    for qid, question, answers, image_id, atype in rows:
        rel = pattern.format(image_id=image_id)
        out.append(Example(
            id=qid, images=[ctx.image(rel)], fields={"question": question.strip(), "answer": _most_common(answers)},
            answers=list(answers), group=atype,
        ))
    return out


# --------------------------------------------------------------------------- classification


@adapter("hateful_memes")
def load_hateful_memes(ctx: DataContext, split: str) -> list[Example]:
    out = []
    for row in read_jsonl(ctx.path(split_key(ctx, split)), f"task {ctx.task.name!r}"):
        label = int(row["label"]) if "label" in row else None
        out.append(Example(
            id=str(row["id"]), images=[ctx.image(row["img"])],
            fields={"ocr": row.get("text", ""), "answer": ("yes" if label else "no") if label is not None else ""},
            candidates=["no", "yes"], label=label,
        ))
    return out


@adapter("imagefolder")
def load_imagefolder(ctx: DataContext, split: str) -> list[Example]:
    """``<split dir>/<class folder>/<image>``; classes sorted by folder name; names from ``class_names``."""
    root = ctx.path(split_key(ctx, split), directory=True)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise InputError(f"{root} holds no class folders; an image-folder split is <split>/<class>/<image files>")
    names = dict(zip(folders, folders))
    if ctx.has("class_names"):
        mapping = read_json(ctx.path("class_names"), f"task {ctx.task.name!r}")
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise InputError(f"{ctx.read['class_names']} has no name for the class folders {missing[:5]}")
        names = {f: str(mapping[f]) for f in folders}
    candidates = [names[f] for f in folders]
    out = []
    for label, folder in enumerate(folders):
        for img in sorted((root / folder).iterdir()):
            if img.suffix in IMAGE_EXTENSIONS:
                out.append(Example(
                    id=f"{folder}/{img.stem}", images=[img], fields={"class_name": names[folder]},
                    candidates=candidates, label=label, answers=[names[folder]],
                ))
    return out


# --------------------------------------------------------------------------- multiple choice


def _options_text(options: list[str]) -> str:
    return "\n".join(f"{index_to_letter(i)}. {o}" for i, o in enumerate(options))


@adapter("scienceqa")
def load_scienceqa(ctx: DataContext, split: str) -> list[Example]:
    """ScienceQA-IMG: problems with an image; images at ``<split>/<pid>/<image>``."""
    problems = read_json(ctx.path("problems"), f"task {ctx.task.name!r}")
    out = []
    for pid, p in problems.items():
        if p.get("split") != split or not p.get("image"):
            continue
        choices = list(p["choices"])
        answer = index_to_letter(int(p["answer"]))
        out.append(Example(
            id=str(pid), images=[ctx.image(Path(split) / pid / p["image"])],
            fields={"question": p["question"], "hint": p.get("hint") or "", "options": _options_text(choices),
                    "answer": answer},
            answers=[answer], group=p.get("subject"), meta={"options": choices},
        ))
    return out


def _decode_image(value: str) -> bytes:
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    return base64.b64decode(text)


@adapter("mmbench")
def load_mmbench(ctx: DataContext, split: str) -> list[Example]:
    """MMBench TSV; the eval split gives every circular rotation, the demo split rotation 0."""
    path = ctx.path(split_key(ctx, split))
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rotate = split == ctx.task.eval_split
    out = []
    for row in rows:
        options = [row[c] for c in "ABCDEFGHI" if c in row and row[c] not in (None, "", "nan")]
        answer = row.get("answer", "")
        if answer not in "ABCDEFGHI" or not answer:
            continue
        image = _decode_image(row["image"])
        qid = str(row["index"])
        answer_index = "ABCDEFGHI".index(answer)
        rotations = [(options[r:] + options[:r], (answer_index - r) % len(options)) for r in range(len(options))]
        for r, (opts, a) in enumerate(rotations if rotate else rotations[:1]):
            letter = index_to_letter(a)
            hint = row.get("hint") or ""
            out.append(Example(
                id=f"{qid}:r{r}" if rotate else qid, images=[image],
                fields={"question": row["question"], "hint": "" if hint == "nan" else hint,
                        "options": _options_text(opts), "answer": letter},
                answers=[letter], group=row.get("category"),
                meta={"source_id": qid, "rotation": r, "options": opts},
            ))
    return out


@adapter("mme")
def load_mme(ctx: DataContext, split: str) -> list[Example]:
    """The MME_Benchmark tree: one folder per subtask; two yes/no questions per image."""
    root = ctx.path(split_key(ctx, split), directory=True)
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / "questions_answer_YES_NO").is_dir():
            txts, image_dir = sorted((sub / "questions_answer_YES_NO").glob("*.txt")), sub / "images"
        else:
            txts, image_dir = sorted(sub.glob("*.txt")), sub
        for txt in txts:
            images = [image_dir / (txt.stem + ext) for ext in IMAGE_EXTENSIONS]
            image = next((p for p in images if p.is_file()), None)
            if image is None:
                raise InputError(f"MME: no image for {txt} in {image_dir} (expected {txt.stem}.png or .jpg)")
            lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
            for n, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) < 2:
                    raise InputError(f"MME: {txt}, line {n + 1}: expected 'question<TAB>answer'")
                question, answer = parts[-2].strip(), parts[-1].strip()
                out.append(Example(
                    id=f"{sub.name}/{txt.stem}/{n}", images=[image], fields={"question": question, "answer": answer},
                    answers=[answer], group=sub.name, meta={"image_id": f"{sub.name}/{txt.stem}"},
                ))
    return out


_MMMU_MARK = re.compile(r"<image (\d+)>")


@adapter("mmmu")
def load_mmmu(ctx: DataContext, split: str) -> list[Example]:
    """MMMU's parquet files (a glob, see :mod:`.tables`) or an export to JSON / JSON lines; images
    (``image_1``..) interleaved at ``<image k>``."""
    key, what = split_key(ctx, split), f"task {ctx.task.name!r}"
    if is_table_entry(ctx, key):
        path, rows = ctx.task.files[key], table_rows(ctx, key)
    else:
        path = ctx.path(key)
        rows = read_jsonl(path, what) if path.suffix == ".jsonl" else read_json(path, what)
    out = []
    for row in rows:
        options = row.get("options", [])
        if isinstance(options, str):
            options = ast.literal_eval(options)
        question = str(row["question"])
        text_opts = _options_text([str(o) for o in options]) if options else ""
        order: list[int] = []

        def mark(m: re.Match) -> str:
            order.append(int(m.group(1)))
            return IMAGE_MARK

        question = _MMMU_MARK.sub(mark, question)
        text_opts = _MMMU_MARK.sub(mark, text_opts)
        images = []
        for k in order:
            value = row.get(f"image_{k}")
            if value is None:
                raise InputError(f"MMMU {path}: question {row.get('id')!r} refers to <image {k}> but has no image_{k}")
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str) and (value.startswith("data:") or len(value) > 512):
                value = _decode_image(value)
            elif isinstance(value, str):
                value = ctx.image(value)
            images.append(value)
        answer = str(row.get("answer", ""))
        out.append(Example(
            id=str(row["id"]), images=images,
            fields={"question": question, "options": text_opts, "answer": answer},
            answers=[answer], group=row.get("subfield") or row.get("subject") or _mmmu_subject(str(row["id"])),
            meta={"options": options, "open": not options},
        ))
    return out


def _mmmu_subject(qid: str) -> str | None:
    parts = qid.split("_")  # "validation_Art_Theory_12" -> "Art_Theory"
    return "_".join(parts[1:-1]) if len(parts) >= 3 else None


# --------------------------------------------------------------------------- LLaVA conversations


def _turn_role(turn: dict) -> str:
    who = turn.get("from", turn.get("role"))
    return "assistant" if who in ("gpt", "assistant") else "user"


@adapter("llava")
def load_llava(ctx: DataContext, split: str) -> list[Example]:
    """A LLaVA-format JSON: the prompt is the conversation up to the last user turn, the
    reference the last assistant turn; ``qtype`` (if any) groups the results."""
    path = ctx.path(split_key(ctx, split))
    data = read_json(path, f"task {ctx.task.name!r}")
    if not isinstance(data, list):
        raise InputError(f"{path} is not a LLaVA-format file: expected a JSON list of conversations")
    out = []
    for n, entry in enumerate(data):
        turns = entry.get("conversations", [])
        last = max((i for i, t in enumerate(turns) if _turn_role(t) == "assistant"), default=None)
        if last is None or last == 0 or _turn_role(turns[last - 1]) != "user":
            raise InputError(f"{path}, entry {n} (id {entry.get('id')!r}): no user turn followed by an assistant turn")
        images = entry.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        history = "".join(
            f"Question:{_clean(turns[i]['value'])} Short answer:{turns[i + 1]['value']} "
            for i in range(0, last - 1, 2)
        )
        answer = str(turns[last]["value"]).strip()
        out.append(Example(
            id=str(entry.get("id", n)), images=[ctx.image(i) for i in images],
            fields={"question": _clean(turns[last - 1]["value"]), "answer": answer, "history": history},
            answers=[answer], group=entry.get("qtype"),
            meta={"history_turns": [(_clean(turns[i]["value"]), str(turns[i + 1]["value"]).strip())
                                    for i in range(0, last - 1, 2)]},
        ))
    return out


def _clean(text: str) -> str:
    return text.replace(IMAGE_MARK + "\n", "").replace(IMAGE_MARK, "").strip()
