"""The synthetic shape-scene corpus: determinism, split hygiene, unambiguous questions, formats."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from interleaf.data import synth
from interleaf.data.synth import (
    COLOURS,
    NUMBER_WORDS,
    QTYPES,
    SHAPES,
    Scene,
    SceneObject,
    corpus_text,
    fewshot_episodes,
    make_question,
    render_scene,
    sample_scene,
    write_corpus,
)
from interleaf.errors import InputError

SMALL = dict(n_train_scenes=400, n_heldout_scenes=60, n_documents=40, shard_size=100)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, write_corpus(out, seed=3, **SMALL)


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _scenes(out: Path) -> dict[str, Scene]:
    return {k: Scene.from_dict(v) for k, v in json.loads((out / "scenes.json").read_text()).items()}


def _load(out: Path, name: str):
    return json.loads((out / "llava" / name).read_text())


# --------------------------------------------------------------- an independent answer oracle


def _oracle(scene: Scene, question: str) -> str:
    """Answer ``question`` from the scene's objects, checking each reference names one object."""
    objs = scene.objects

    def one(**kw) -> SceneObject:
        hits = [o for o in objs if all(getattr(o, k) == v for k, v in kw.items())]
        assert len(hits) == 1, f"{question!r} refers to {len(hits)} objects in {scene}"
        return hits[0]

    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        return one(shape=m[1]).colour
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return one(colour=m[1]).shape
    if question == "how many objects are there?":
        return ["one", "two", "three", "four"][len(objs) - 1]
    if m := re.fullmatch(r"is the (\w+) on the left or the right\?", question):
        return "left" if one(shape=m[1]).cell in (0, 2) else "right"
    if m := re.fullmatch(r"is the (\w+) at the top or the bottom\?", question):
        return "top" if one(shape=m[1]).cell in (0, 1) else "bottom"
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objs) else "no"
    raise AssertionError(f"unrecognised question {question!r}")


def _qtype_of(question: str) -> str:
    prefixes = (("what colour", "colour"), ("what shape", "shape"), ("how many", "count"),
                ("is there", "yesno"), ("is the", "position"))
    for pattern, qtype in prefixes:
        if question.startswith(pattern):
            return qtype
    raise AssertionError(question)


# --------------------------------------------------------------- pixels


def _cell_mask(arr: np.ndarray, cell: int, colour: str) -> np.ndarray:
    half = arr.shape[0] // 2
    r, c = divmod(cell, 2)
    sub = arr[r * half : (r + 1) * half, c * half : (c + 1) * half]  # (H/2, W/2, 3)
    return np.all(sub == np.array(COLOURS[colour], dtype=np.uint8), axis=-1)


def _shape_from_pixels(mask: np.ndarray) -> str:
    """Classify a filled silhouette by its bounding box: corners, then an inner quarter point."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    corners = (mask[y0, x0], mask[y0, x1], mask[y1, x0], mask[y1, x1])
    if all(corners):
        return "square"
    if not corners[0] and not corners[1] and corners[2] and corners[3]:
        return "triangle"
    assert not any(corners)
    quarter = mask[y0 + (y1 - y0 + 1) // 4, x0 + (x1 - x0 + 1) // 4]
    return "circle" if quarter else "cross"


@pytest.mark.parametrize(
    "size,obj_size", [(32, "large"), (48, "small"), (64, "large"), (64, "small")]
)
def test_pixels_show_each_object_in_its_cell(size, obj_size):
    rng = random.Random(size)
    for _ in range(60):
        scene = sample_scene(rng, sizes=(obj_size,))
        arr = np.asarray(render_scene(scene, size))
        assert arr.shape == (size, size, 3)
        occupied = {o.cell for o in scene.objects}
        for o in scene.objects:
            mask = _cell_mask(arr, o.cell, o.colour)
            half = size // 2
            assert mask[half // 2, half // 2], "the cell centre shows the object's colour"
            total = np.all(arr == np.array(COLOURS[o.colour], dtype=np.uint8), axis=-1).sum()
            assert mask.sum() == total > 0, "the object stays inside its own cell"
            assert _shape_from_pixels(mask) == o.shape
        for cell in set(range(4)) - occupied:
            r, c = divmod(cell, 2)
            half = size // 2
            assert not arr[r * half : (r + 1) * half, c * half : (c + 1) * half].any()


def test_render_is_deterministic_and_sizes_differ():
    big, small = SceneObject("circle", "red", "large", 0), SceneObject("cross", "blue", "small", 3)
    scene = Scene((big, small))
    a, b = render_scene(scene, 48), render_scene(scene, 48)
    assert a.tobytes() == b.tobytes()
    arr = np.asarray(a)
    # the rendering is fixed: measured 308 red pixels against 80 blue; asserts more than twice
    assert _cell_mask(arr, 0, "red").sum() > 2 * _cell_mask(arr, 3, "blue").sum()


def test_colours_are_far_apart_in_rgb():
    values = np.array(list(COLOURS.values()), dtype=float)
    dists = np.linalg.norm(values[:, None] - values[None], axis=-1)  # (C, C)
    # the palette is a constant: measured 190.5 between the closest pair and 206.2 from black; asserts 150
    assert dists[~np.eye(len(values), dtype=bool)].min() > 150
    assert np.linalg.norm(values, axis=-1).min() > 150  # every colour stands out from black


def test_png_encoding_round_trips():
    rng = random.Random(0)
    for size in (32, 40):
        img = render_scene(sample_scene(rng), size)
        back = Image.open(io.BytesIO(synth.encode_png(img)))
        assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(img))


# --------------------------------------------------------------- scenes and questions


def test_scene_rejects_shared_attributes():
    with pytest.raises(InputError, match="share a colour"):
        Scene((SceneObject("circle", "red", "large", 0), SceneObject("square", "red", "large", 1)))
    with pytest.raises(InputError, match="share a cell"):
        Scene((SceneObject("circle", "red", "large", 0), SceneObject("square", "blue", "large", 0)))
    with pytest.raises(InputError, match="unknown object"):
        Scene((SceneObject("hexagon", "red", "large", 0),))


def test_generated_questions_are_unambiguous_and_correct():
    rng = random.Random(7)
    seen_answers = {t: set() for t in QTYPES}
    for _ in range(400):
        scene = sample_scene(rng, sizes=("large", "small"))
        for qtype in QTYPES:
            q = make_question(scene, qtype, rng)
            assert q.qtype == qtype == _qtype_of(q.question)
            assert q.answer == _oracle(scene, q.question)
            assert " " not in q.answer
            seen_answers[qtype].add(q.answer)
    vocab = synth.answer_vocabulary(3)
    for qtype in QTYPES:
        assert seen_answers[qtype] == set(vocab[qtype])


def test_caption_lists_objects_in_reading_order():
    square = SceneObject("square", "blue", "large", 3)
    scene = Scene((square, SceneObject("circle", "red", "small", 0)))
    assert synth.caption(scene) == "a small red circle and a blue square."
    refs = synth.reference_captions(scene)
    assert refs[0] == synth.caption(scene) and len(set(refs)) == len(refs)
    assert "bottom right" in refs[1]


def test_scene_identity_ignores_object_order():
    a = SceneObject("circle", "red", "large", 2)
    b = SceneObject("cross", "green", "large", 1)
    assert Scene((a, b)).identity == Scene((b, a)).identity
    assert Scene((a, b)) == Scene((b, a))


# --------------------------------------------------------------- the written corpus


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    write_corpus(tmp_path / "a", seed=11, **SMALL)
    write_corpus(tmp_path / "b", seed=11, **SMALL)
    write_corpus(tmp_path / "c", seed=12, **SMALL)
    ha, hb, hc = (_hash_tree(tmp_path / x) for x in "abc")
    assert ha == hb
    assert len(ha) > 10
    assert ha["llava/vqa_train.json"] != hc["llava/vqa_train.json"]


def test_heldout_scenes_never_appear_in_training(corpus):
    out, manifest = corpus
    scenes = _scenes(out)
    train = {s.identity for k, s in scenes.items() if k.startswith("train/")}
    heldout = {s.identity for k, s in scenes.items() if k.startswith("heldout/")}
    assert train and heldout and not train & heldout
    # Every training image anywhere in the corpus is one of the training scenes.
    for rel in manifest["files"]["pairs"]:
        for sample in wds.WebDataset(str(out / rel), shardshuffle=False):
            assert Scene.from_dict(json.loads(sample["json"])).identity in train
    for entry in _load(out, "vqa_train.json") + _load(out, "conv_train.json"):
        assert entry["image"].startswith("train/")
    for entry in _load(out, "vqa_heldout.json"):
        assert entry["image"].startswith("heldout/")
    # Held-out scenes cover every object count.
    counts = {len(scenes[e["image"]].objects) for e in _load(out, "vqa_heldout.json")}
    assert counts == {1, 2, 3}


def test_every_vqa_answer_rederived_from_its_scene(corpus):
    out, manifest = corpus
    scenes = _scenes(out)
    for name in ("vqa_train.json", "vqa_heldout.json", "conv_train.json"):
        for entry in _load(out, name):
            turns = entry["conversations"]
            assert turns[0]["value"].startswith("<image>\n")
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            scene = scenes[entry["image"]]
            kinds = entry.get("qtypes", [entry["qtype"]])
            for human, gpt, kind in zip(turns[::2], turns[1::2], kinds):
                question = human["value"].removeprefix("<image>\n")
                if kind == "caption":
                    assert question == synth.CAPTION_PROMPT
                    assert gpt["value"] == synth.caption(scene)
                    continue
                assert _qtype_of(question) == kind
                assert gpt["value"] == _oracle(scene, question)
                assert gpt["value"] in manifest["answers"][kind]


def test_vqa_files_have_one_question_per_type_and_balanced_yesno(corpus):
    out, _ = corpus
    splits = (("vqa_train.json", "n_train_scenes"), ("vqa_heldout.json", "n_heldout_scenes"))
    for name, n_key in splits:
        n = SMALL[n_key]
        entries = _load(out, name)
        assert len(entries) == n * len(QTYPES)
        by_type = {t: [e for e in entries if e["qtype"] == t] for t in QTYPES}
        assert all(len(v) == n for v in by_type.values())
        yes = sum(e["conversations"][1]["value"] == "yes" for e in by_type["yesno"])
        assert abs(yes - (n - yes)) <= 1
        assert len({e["id"] for e in entries}) == len(entries)
    # The per-type training files hold exactly the training entries of their type, in order.
    train = _load(out, "vqa_train.json")
    for qtype in QTYPES:
        assert _load(out, f"vqa_train_{qtype}.json") == [e for e in train if e["qtype"] == qtype]
    convs = _load(out, "conv_train.json")
    assert all(2 <= len(c["conversations"]) // 2 <= 3 for c in convs)


def test_image_files_match_their_scenes(corpus):
    out, manifest = corpus
    for rel, scene in _scenes(out).items():
        img = Image.open(out / "images" / rel)
        assert img.size == (manifest["image_size"],) * 2
        expected = render_scene(scene, manifest["image_size"])
        assert np.array_equal(np.asarray(img), np.asarray(expected))
    refs = _load(out, "captions_heldout.json")
    for image_id, captions in refs.items():
        assert (out / "images" / "heldout" / f"{image_id}.png").is_file()
        assert len(captions) >= 2 and all(isinstance(c, str) and c for c in captions)


def test_pair_shards_are_webdataset_samples(corpus):
    out, manifest = corpus
    shards = manifest["files"]["pairs"]
    assert len(shards) == SMALL["n_train_scenes"] // SMALL["shard_size"]
    with tarfile.open(out / shards[0]) as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        assert [m.name.split(".", 1)[1] for m in members[:3]] == ["png", "txt", "json"]
    n = 0
    for rel in shards:
        for sample in wds.WebDataset(str(out / rel), shardshuffle=False):
            assert set(sample) >= {"__key__", "png", "txt", "json"}
            scene = Scene.from_dict(json.loads(sample["json"]))
            assert sample["txt"].decode() == synth.caption(scene)
            arr = np.asarray(Image.open(io.BytesIO(sample["png"])))
            assert np.array_equal(arr, np.asarray(render_scene(scene, manifest["image_size"])))
            n += 1
    assert n == SMALL["n_train_scenes"] == manifest["counts"]["pairs"]


def test_interleaved_documents_follow_obelics_convention(corpus):
    out, manifest = corpus
    n = 0
    for rel in manifest["files"]["interleaved"]:
        with tarfile.open(out / rel) as tar:
            names = set(tar.getnames())
        for sample in wds.WebDataset(str(out / rel), shardshuffle=False):
            key = sample["__key__"]
            doc = json.loads(sample["json"])
            assert set(doc) == {"texts", "images"} and len(doc["texts"]) == len(doc["images"])
            assert all((t is None) != (i is None) for t, i in zip(doc["texts"], doc["images"]))
            images = [i for i in doc["images"] if i is not None]
            assert 2 <= len(images) <= 3
            for pos, (text, image) in enumerate(zip(doc["texts"], doc["images"])):
                if image is None:
                    continue
                assert image in names and image.startswith(f"{key}.")
                field = image[len(key) + 1 :]
                scene_img = np.asarray(Image.open(io.BytesIO(sample[field])))
                caption = doc["texts"][pos + 1]  # reading order: image, then its caption
                assert caption is not None and caption.endswith(".")
                assert scene_img.shape == (manifest["image_size"], manifest["image_size"], 3)
            n += 1
    assert n == SMALL["n_documents"] == manifest["counts"]["documents"]


def test_manifest_lists_existing_files_and_answer_vocabulary(corpus):
    out, manifest = corpus
    on_disk = json.loads((out / "corpus.json").read_text())
    assert on_disk == manifest
    for value in manifest["files"].values():
        for rel in value if isinstance(value, list) else [value]:
            assert (out / rel).is_file(), rel
    assert manifest["seed"] == 3 and manifest["image_size"] == 32
    assert set(manifest["answers"]) == set(QTYPES)
    assert manifest["answers"]["count"] == list(NUMBER_WORDS[1:4])
    assert manifest["answers"]["shape"] == list(SHAPES)


def test_corpus_text_covers_training_texts_only(corpus):
    out, manifest = corpus
    texts = list(corpus_text(out))
    c = manifest["counts"]
    assert len(texts) == c["pairs"] + c["documents"] + c["vqa_train"] + c["conv_train"]
    assert all(isinstance(t, str) and t and "<image>" not in t for t in texts)
    assert any(t.startswith("what colour is the") for t in texts)
    heldout_only = set(json.loads((out / "llava" / "captions_heldout.json").read_text()))
    assert not any(key in t for t in texts for key in list(heldout_only)[:5])
    with pytest.raises(InputError, match="write_corpus"):
        next(corpus_text(out / "missing"))


def test_bad_arguments_say_what_to_fix(tmp_path):
    with pytest.raises(InputError, match="n_train_scenes"):
        write_corpus(tmp_path, n_train_scenes=0)
    with pytest.raises(InputError, match="max_objects"):
        write_corpus(tmp_path, n_train_scenes=10, max_objects=9)
    small = dict(n_train_scenes=30, n_heldout_scenes=6, shard_size=10)
    write_corpus(tmp_path / "c", seed=0, **small)
    with pytest.raises(InputError, match="overwrite=True"):
        write_corpus(tmp_path / "c", seed=1, **small)
    write_corpus(tmp_path / "c", seed=1, overwrite=True, **{**small, "shard_size": 15})
    assert sorted(p.name for p in (tmp_path / "c" / "pairs").iterdir()) == [
        "train-000000.tar", "train-000001.tar"
    ]
    assert write_corpus(tmp_path / "d", seed=1, **{**small, "shard_size": 15}) == json.loads(
        (tmp_path / "c" / "corpus.json").read_text()
    )
    with pytest.raises(InputError, match="image_size >= 48"):
        write_corpus(tmp_path, n_train_scenes=10, sizes=("large", "small"))
    with pytest.raises(InputError, match="too small"):
        render_scene(sample_scene(random.Random(0)), size=8)


# --------------------------------------------------------------- few-shot episodes


def test_fewshot_names_are_defined_only_by_demonstrations():
    episodes = fewshot_episodes(random.Random(5), 30, shots=4)
    assert len(episodes) == 30
    name_sets = set()
    for ep in episodes:
        assert len(ep.demo_images) == len(ep.demo_texts) == 4
        shapes_named = {}
        for scene, text in zip(ep.demo_scenes, ep.demo_texts):
            m = re.fullmatch(r"this is a (\w+)\.", text)
            assert m, text
            shape = scene.objects[0].shape
            assert shapes_named.setdefault(shape, m[1]) == m[1], "one name per shape"
        assert len(set(shapes_named.values())) == len(shapes_named) == 2
        assert ep.query_text == "this is a"
        assert ep.answer == shapes_named[ep.query_scene.objects[0].shape]
        assert np.array_equal(np.asarray(ep.query_image), np.asarray(render_scene(ep.query_scene)))
        name_sets.add(tuple(sorted(ep.names.items())))
    # seeded: measured 28 different name sets among the 30 episodes; asserts more than 10
    assert len(name_sets) > 10, "names are drawn afresh for each episode"
    with pytest.raises(InputError, match="shots"):
        fewshot_episodes(random.Random(0), 1, shots=1, ways=2)
