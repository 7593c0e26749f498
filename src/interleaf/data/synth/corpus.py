"""The corpus writer: scenes split by identity, then written in the on-disk formats of real datasets.

:func:`write_corpus` enumerates every scene identity, reserves a fixed fraction of each object
count for the held-out split, and samples training scenes only from the rest, so no held-out
scene is ever seen in training.

On-disk layout written by :func:`write_corpus` (paths relative to ``out_dir``)::

    corpus.json                       manifest: files, counts, seed, image size, answer vocab
    scenes.json                       image path (relative to images/) -> its scene's objects
    images/train/s0123abcd4567.png    one PNG per distinct scene, named by :func:`scene_key`
    images/heldout/s89ef01234567.png    (LLaVA "image" paths are relative to images/)
    pairs/train-000000.tar            WebDataset image-text pairs, as LAION / COYO ship:
                                        {key}.png, {key}.txt (caption), {key}.json (the scene)
    interleaved/train-000000.tar      OBELICS-style documents, one tar sample per document:
                                        {key}.json = {"texts": [...], "images": [...]}
                                        {key}.0.png, {key}.1.png, ... the document's images
    llava/vqa_train.json              single-turn VQA, LLaVA format, one "qtype" per entry
    llava/vqa_train_colour.json       the same entries split by question type (``_shape``,
                                        ``_count``, ``_position``, ``_yesno`` likewise)
    llava/vqa_heldout.json            the same for held-out scenes (evaluation)
    llava/conv_train.json             multi-turn conversations (2-3 turns) for instruction tuning
    llava/captions_heldout.json       held-out image id -> list of reference captions (CIDEr);
                                        the image of id ``s0123abcd4567`` is
                                        ``images/heldout/s0123abcd4567.png``

Interleaved documents follow OBELICS's convention: ``texts`` and ``images`` are aligned lists of
equal length and at each position exactly one of the two is non-null. An image entry is the
*full member name* of that image inside the same tar sample, e.g. ``"doc-000012.0.png"``;
WebDataset groups it with ``doc-000012.json`` under the key ``doc-000012`` and exposes it as the
field ``"0.png"`` (the member name minus ``"{key}."``). Documents read image, caption, image,
caption, ... in reading order.

Everything is deterministic for a seed: the same arguments give byte-identical files (tar
members carry mtime 0, uid/gid 0 and empty owner names; JSON is written with fixed key order).
Every random draw comes from one ``random.Random(seed)`` in a fixed order: the split, the
training split's questions, the held-out split's questions, the conversations, the documents.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ...errors import InputError
from ...files import read_json
from .scenes import (
    COLOURS,
    MIN_SIZE_FOR_SMALL,
    SHAPES,
    Scene,
    all_scenes,
    check_vocab,
    encode_png,
    render_scene,
    scene_key,
)
from .text import (
    CAPTION_PROMPT,
    QTYPES,
    answer_vocabulary,
    caption,
    conversation,
    document,
    reference_captions,
    scene_questions,
    strip_image_markers,
    vqa_entry,
)

_TAR_FORMAT = tarfile.USTAR_FORMAT
_CORPUS_DIRS = ("images", "pairs", "interleaved", "llava")
# The LLaVA-format files and the scene index, by manifest key (the per-type VQA files follow).
CORPUS_FILES: dict[str, str] = {
    "vqa_train": "llava/vqa_train.json",
    "vqa_heldout": "llava/vqa_heldout.json",
    "conv_train": "llava/conv_train.json",
    "captions_heldout": "llava/captions_heldout.json",
    "scenes": "scenes.json",
}


class _ShardWriter:
    """Writes numbered tar shards with fixed member metadata (byte-identical for the same input)."""

    def __init__(self, folder: Path, prefix: str, shard_size: int):
        self.folder, self.prefix, self.shard_size = folder, prefix, shard_size
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def add_sample(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None or self._in_shard >= self.shard_size:
            self.close()
            path = self.folder / f"{self.prefix}-{len(self.paths):06d}.tar"
            self.paths.append(path)
            self._tar = tarfile.open(path, "w", format=_TAR_FORMAT)
            self._in_shard = 0
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _dump_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")


def _split_scenes(
    rng: random.Random,
    n_train: int,
    n_heldout: int,
    heldout_fraction: float,
    max_objects: int,
    sizes: Sequence[str],
) -> tuple[list[Scene], list[Scene]]:
    """Draw training and held-out scenes from disjoint sets of identities.

    For each object count the enumerated identities are shuffled and a ``heldout_fraction`` of
    them (at least one) is reserved. Held-out scenes take an equal share of each count and
    cycle through the reserved identities (distinct until they run out); training scenes draw
    a uniform count, then a uniform identity among the unreserved ones.
    """
    reserved: dict[int, list[Scene]] = {}
    train_pool: dict[int, list[Scene]] = {}
    for k in range(1, max_objects + 1):
        pool = all_scenes(k, sizes=sizes)
        rng.shuffle(pool)
        n_res = min(len(pool) - 1, max(1, round(heldout_fraction * len(pool))))
        reserved[k], train_pool[k] = pool[:n_res], pool[n_res:]
    counts = [1 + i % max_objects for i in range(n_heldout)]
    rng.shuffle(counts)
    used = dict.fromkeys(reserved, 0)
    heldout = []
    for k in counts:
        heldout.append(reserved[k][used[k] % len(reserved[k])])
        used[k] += 1
    train = [rng.choice(train_pool[rng.randint(1, max_objects)]) for _ in range(n_train)]
    return train, heldout


def _balanced(rng: random.Random, n: int) -> list[bool]:
    labels = [i % 2 == 0 for i in range(n)]
    rng.shuffle(labels)
    return labels


class _Images:
    """Each distinct scene's PNG, rendered once, and the scene index (image path -> scene)."""

    def __init__(self, out: Path, image_size: int):
        self.out, self.image_size = out, image_size
        self.index: dict[str, dict] = {}  # image path (relative to images/) -> scene
        self._png: dict[tuple, bytes] = {}

    def png(self, scene: Scene) -> bytes:
        data = self._png.get(scene.identity)
        if data is None:
            data = self._png[scene.identity] = encode_png(render_scene(scene, self.image_size))
        return data


def write_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train_scenes: int = 10_000,
    n_heldout_scenes: int = 500,
    n_documents: int | None = None,
    image_size: int = 32,
    shard_size: int = 1000,
    max_objects: int = 3,
    sizes: Sequence[str] = ("large",),
    heldout_fraction: float = 0.15,
    overwrite: bool = False,
) -> dict:
    """Write the synthetic corpus under ``out_dir`` and return its manifest (also ``corpus.json``).

    Training scenes give one image-text pair each, five VQA entries each (one per type, yes/no
    answers balanced over the split) and one 2-3 turn conversation each. ``n_documents``
    (default ``n_train_scenes // 4``) interleaved documents each show 2-3 training scenes.
    Held-out scenes give five VQA entries each and reference captions. An existing corpus in
    ``out_dir`` is an error unless ``overwrite=True``, which first deletes the corpus's own
    files and folders (nothing else in ``out_dir``).
    """
    n_docs = n_train_scenes // 4 if n_documents is None else n_documents
    _check_arguments(n_train_scenes, n_heldout_scenes, n_docs, shard_size, image_size, heldout_fraction,
                     max_objects, sizes)
    out = Path(out_dir)
    _prepare_folder(out, overwrite)

    rng = random.Random(seed)
    train, heldout = _split_scenes(rng, n_train_scenes, n_heldout_scenes, heldout_fraction, max_objects, sizes)
    images = _Images(out, image_size)
    train_paths, vqa_train, _ = _write_split(images, "train", train, rng)
    _, vqa_heldout, captions_heldout = _write_split(images, "heldout", heldout, rng)
    conv_train = [
        conversation(s, rel, rng, conv_id=f"train-{i:06d}-conv")
        for i, (rel, s) in enumerate(zip(train_paths, train))
    ]
    pairs = _write_pairs(images, train, shard_size)
    docs = _write_documents(images, train, n_docs, shard_size, rng)
    files = _write_llava(out, vqa_train, vqa_heldout, conv_train, captions_heldout, images.index)

    manifest = {
        "format": "interleaf-synth",
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "images_dir": "images",
        "files": {
            "pairs": [p.relative_to(out).as_posix() for p in pairs],
            "interleaved": [p.relative_to(out).as_posix() for p in docs],
            **files,
        },
        "counts": {
            "train_scenes": len(train),
            "heldout_scenes": len(heldout),
            "distinct_train_scenes": len(set(train_paths)),
            "distinct_heldout_scenes": len(captions_heldout),
            "pairs": len(train),
            "documents": n_docs,
            "vqa_train": len(vqa_train),
            "vqa_heldout": len(vqa_heldout),
            "conv_train": len(conv_train),
        },
        "qtypes": list(QTYPES),
        "answers": answer_vocabulary(max_objects),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "sizes": list(sizes),
        "max_objects": max_objects,
        "heldout_fraction": heldout_fraction,
        "caption_prompt": CAPTION_PROMPT,
    }
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_arguments(
    n_train_scenes: int,
    n_heldout_scenes: int,
    n_docs: int,
    shard_size: int,
    image_size: int,
    heldout_fraction: float,
    max_objects: int,
    sizes: Sequence[str],
) -> None:
    """Refuse arguments that would give an empty, ambiguous or unreadable corpus."""
    checks = (
        ("n_train_scenes", n_train_scenes, 1),
        ("n_heldout_scenes", n_heldout_scenes, 1),
        ("n_documents", n_docs, 0),
        ("shard_size", shard_size, 1),
        ("image_size", image_size, 16),
    )
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"write_corpus: {name}={value!r} must be an integer >= {low}")
    if not 0.0 < heldout_fraction < 1.0:
        raise InputError(f"write_corpus: heldout_fraction={heldout_fraction} must be in (0, 1)")
    check_vocab(max_objects, SHAPES, tuple(COLOURS), sizes)
    if "small" in sizes and image_size < MIN_SIZE_FOR_SMALL:
        raise InputError(
            f"write_corpus: sizes={list(sizes)} with image_size={image_size}: small shapes are "
            f"only about 8 px wide there and a small cross looks like a small circle; use "
            f"image_size >= {MIN_SIZE_FOR_SMALL} or sizes=('large',)"
        )


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Create the corpus's folders; an existing corpus is removed first, or refused."""
    if (out / "corpus.json").exists():
        if not overwrite:
            raise InputError(
                f"write_corpus: {out} already holds a corpus (corpus.json); pass overwrite=True "
                "to replace it or choose another folder"
            )
        for name in _CORPUS_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("corpus.json", "scenes.json"):
            (out / name).unlink(missing_ok=True)
    for sub in ("images/train", "images/heldout", "pairs", "interleaved", "llava"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def _write_split(
    images: _Images, split: str, scenes: list[Scene], rng: random.Random
) -> tuple[list[str], list[dict], dict]:
    """Write each distinct image once; return per-scene image paths, VQA entries, captions."""
    paths, vqa, refs = [], [], {}
    yes_labels = _balanced(rng, len(scenes))
    for i, scene in enumerate(scenes):
        name = scene_key(scene)
        rel = f"{split}/{name}.png"
        if name not in refs:
            (images.out / "images" / rel).write_bytes(images.png(scene))
            refs[name] = reference_captions(scene)
            images.index[rel] = scene.to_dict()
        paths.append(rel)
        for q in scene_questions(scene, rng, yes=yes_labels[i]):
            vqa.append(vqa_entry(q, rel, f"{split}-{i:06d}-{q.qtype}"))
    return paths, vqa, refs


def _write_pairs(images: _Images, train: list[Scene], shard_size: int) -> list[Path]:
    """One image-text pair per training scene, in WebDataset shards; returns the shard paths."""
    pairs = _ShardWriter(images.out / "pairs", "train", shard_size)
    for i, scene in enumerate(train):
        sid = f"train-{i:06d}"
        meta = json.dumps({"id": sid, **scene.to_dict()}).encode()
        text = caption(scene).encode()
        pairs.add_sample([(f"{sid}.png", images.png(scene)), (f"{sid}.txt", text), (f"{sid}.json", meta)])
    pairs.close()
    return pairs.paths


def _write_documents(
    images: _Images, train: list[Scene], n_docs: int, shard_size: int, rng: random.Random
) -> list[Path]:
    """``n_docs`` documents of 2-3 training scenes each, in WebDataset shards; returns the shard paths."""
    docs = _ShardWriter(images.out / "interleaved", "train", shard_size)
    for d in range(n_docs):
        key = f"doc-{d:06d}"
        picks = rng.sample(range(len(train)), min(len(train), rng.randint(2, 3)))
        members = [(f"{key}.json", json.dumps(document(key, [train[j] for j in picks])).encode())]
        members += [(f"{key}.{i}.png", images.png(train[j])) for i, j in enumerate(picks)]
        docs.add_sample(members)
    docs.close()
    return docs.paths


def _write_llava(
    out: Path, vqa_train: list[dict], vqa_heldout: list[dict], conv_train: list[dict],
    captions_heldout: dict, scene_index: dict,
) -> dict[str, str]:
    """The LLaVA-format files and the scene index; returns their paths by manifest key."""
    files = dict(CORPUS_FILES)
    _dump_json(out / files["vqa_train"], vqa_train)
    for qtype in QTYPES:  # the same entries split by type, for mixtures that weight tasks
        files[f"vqa_train_{qtype}"] = f"llava/vqa_train_{qtype}.json"
        _dump_json(out / files[f"vqa_train_{qtype}"], [e for e in vqa_train if e["qtype"] == qtype])
    _dump_json(out / files["vqa_heldout"], vqa_heldout)
    _dump_json(out / files["conv_train"], conv_train)
    _dump_json(out / files["captions_heldout"], captions_heldout)
    _dump_json(out / files["scenes"], scene_index)
    return files


def corpus_text(out_dir: str | Path) -> Iterator[str]:
    """Every training text of a written corpus: captions, documents, VQA and conversation turns.

    Yields, in a fixed order: each pair's caption; each document's texts joined by spaces; each
    VQA entry as ``"question answer"``; each conversation as its turns joined by spaces (the
    ``<image>`` marker removed). Held-out files are never read.
    """
    out = Path(out_dir)
    manifest_path = out / "corpus.json"
    if not manifest_path.is_file():
        raise InputError(
            f"corpus_text: {manifest_path} not found; write the corpus first with write_corpus()"
        )
    files = read_json(manifest_path, "corpus_text")["files"]
    for rel in files["pairs"]:
        with tarfile.open(out / rel) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    yield tar.extractfile(m).read().decode()
    for rel in files["interleaved"]:
        with tarfile.open(out / rel) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    doc = json.loads(tar.extractfile(m).read())
                    yield " ".join(t for t in doc["texts"] if t is not None)

    for key in ("vqa_train", "conv_train"):
        for entry in read_json(out / files[key], "corpus_text"):
            yield " ".join(strip_image_markers(turn["value"]) for turn in entry["conversations"])
