"""Data formats: exact tokens and loss masks for pairs, documents and LLaVA chats; truncation; bad samples; collate."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from helpers.data import png, write_tar

import interleaf
from interleaf.data import collate
from interleaf.data.formats import (
    REASONS,
    BadSample,
    LlavaRecord,
    iter_tar_samples,
    load_llava,
    parse_conversation,
    parse_document,
    parse_pair,
)
from interleaf.data.mixture import load_mixture
from interleaf.data.stream import iter_source
from interleaf.data.tokenize import IGNORE_INDEX, encode_sample, text_ids, truncate, tokenize_document


@pytest.fixture(scope="module")
def proc():
    return interleaf.build("tiny-random")[1]


@pytest.fixture(scope="module")
def idefics_proc():
    return interleaf.build("tiny-random", tokens={"prompt_format": "idefics"})[1]


def trained(sample) -> list[int]:
    return [label for label in sample["labels"] if label != IGNORE_INDEX]


def trained_runs(sample) -> list[list[int]]:
    runs, cur = [], []
    for label in sample["labels"]:
        if label != IGNORE_INDEX:
            cur.append(label)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def one_pair(tmp_path, caption_member=("txt", b"a red circle.")):
    path = write_tar(tmp_path / "p.tar", [("k1.png", png()), (f"k1.{caption_member[0]}", caption_member[1])])
    return parse_pair(next(iter_tar_samples(path)))


# -- pairs --


def test_pair_openflamingo_tokens_and_mask(tmp_path, proc):
    tok = proc.tokenizer
    sample = encode_sample(one_pair(tmp_path), proc, source="laion", loss_weight=0.2)
    cap = text_ids(tok, "a red circle.")
    eoc, eos = proc.end_of_chunk_token_id, tok.eos_token_id
    assert sample["input_ids"] == [tok.bos_token_id, proc.image_token_id, *cap, eoc, eos]
    assert sample["labels"] == [IGNORE_INDEX, IGNORE_INDEX, *cap, eoc, eos]
    assert tok.decode(trained(sample), skip_special_tokens=False) == "a red circle.<|endofchunk|></s>"
    assert len(sample["images"]) == 1 and sample["images"][0].shape == (3, proc.image_size, proc.image_size)
    assert sample["source"] == "laion" and sample["loss_weight"] == 0.2 and sample["key"] == "k1"


def test_pair_idefics_format_and_json_caption(tmp_path, idefics_proc):
    tok, p = idefics_proc.tokenizer, idefics_proc
    pair = one_pair(tmp_path, ("json", json.dumps({"caption": "a blue square."}).encode()))
    sample = encode_sample(pair, p, source="coyo")
    cap = text_ids(tok, "a blue square.")
    fake, image = p.fake_image_token_id, p.image_token_id
    assert sample["input_ids"] == [tok.bos_token_id, fake, image, fake, *cap, tok.eos_token_id]
    assert sample["labels"] == [IGNORE_INDEX] * 4 + cap + [tok.eos_token_id]


def test_pair_task_prompt_is_after_the_image_and_not_trained(tmp_path, proc):
    tok = proc.tokenizer
    sample = encode_sample(one_pair(tmp_path), proc, source="mtt", task_prompt="Please describe the image.")
    prompt = text_ids(tok, "Please describe the image.")
    assert sample["input_ids"][1] == proc.image_token_id
    assert sample["input_ids"][2 : 2 + len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in sample["labels"][: 2 + len(prompt)])
    assert tok.decode(trained(sample), skip_special_tokens=False) == " a red circle.<|endofchunk|></s>"


def test_caption_with_literal_image_token_stays_text(tmp_path, proc):
    pair = one_pair(tmp_path, ("txt", b"look: <image> here"))
    sample = encode_sample(pair, proc, source="x")
    assert sample["input_ids"].count(proc.image_token_id) == 1


# -- documents --


def test_document_openflamingo_mmc4_mask(tmp_path, proc):
    tok = proc.tokenizer
    doc = {"texts": ["An intro.", None, "First.", "More.", None, "Second."],
           "images": [None, "d1.0.png", None, None, "d1.1.png", None]}
    path = write_tar(tmp_path / "d.tar", [("d1.json", json.dumps(doc).encode()), ("d1.0.png", png()),
                                          ("d1.1.png", png((0, 0, 255)))])
    parsed = parse_document(next(iter_tar_samples(path)))
    sample = encode_sample(parsed, proc, source="docs")
    eoc, image, eos = proc.end_of_chunk_token_id, proc.image_token_id, tok.eos_token_id
    intro, first, more, second = (text_ids(tok, t) for t in ("An intro.", "First.", " More.", "Second."))
    assert sample["input_ids"] == [tok.bos_token_id, *intro, image, *first, *more, eoc, image, *second, eoc, eos]
    # not trained: BOS, the text before the first image, images, the EOS after the last end-of-chunk
    assert sample["labels"] == [IGNORE_INDEX] * (1 + len(intro) + 1) + first + more + [eoc, IGNORE_INDEX] + second + [eoc, IGNORE_INDEX]
    assert tok.decode(trained(sample), skip_special_tokens=False) == "First. More.<|endofchunk|>Second.<|endofchunk|>"
    assert len(sample["images"]) == 2
    assert sample["images"][0][2].mean() < sample["images"][1][2].mean()  # red then blue, in order


def test_document_idefics_and_inline_images(tmp_path, idefics_proc):
    p, tok = idefics_proc, idefics_proc.tokenizer
    data_url = "data:image/png;base64," + base64.b64encode(png()).decode()
    bare = base64.b64encode(png((0, 255, 0))).decode()
    doc = {"texts": [None, None, "Two shapes."], "images": [data_url, bare, None]}
    path = write_tar(tmp_path / "d.tar", [("d2.json", json.dumps(doc).encode())])
    sample = encode_sample(parse_document(next(iter_tar_samples(path))), p, source="obelics")
    fake, image = p.fake_image_token_id, p.image_token_id
    text = text_ids(tok, "Two shapes.")
    # consecutive images share the fake token between them
    assert sample["input_ids"] == [tok.bos_token_id, fake, image, fake, image, fake, *text, tok.eos_token_id]
    assert tok.decode(trained(sample), skip_special_tokens=False) == "Two shapes.</s>"
    assert len(sample["images"]) == 2


# -- LLaVA conversations --


def llava_record(tmp_path, entry) -> LlavaRecord:
    path = tmp_path / "l.json"
    path.write_text(json.dumps([entry]))
    return load_llava(path)[0]


def test_llava_single_image_chat_mask_and_task_prompt(tmp_path, proc):
    tok = proc.tokenizer
    (tmp_path / "im.png").write_bytes(png())
    entry = {"id": "c1", "image": "im.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "one"}]}
    conv = parse_conversation(llava_record(tmp_path, entry), images_root=tmp_path,
                              task_prompt="Answer the question using a single word or phrase.")
    sample = encode_sample(conv, proc, source="vqa")
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(sample)]
    assert runs == ["red</s>", "one</s>"]  # assistant turns only
    text = tok.decode(sample["input_ids"], skip_special_tokens=False)
    assert "<|endofchunk|><image>what colour is it?\nAnswer the question using a single word or phrase.</s>" in text
    assert "how many?</s>" in text and text.count("Answer the question") == 1
    # the rendering equals the processor's own chat rendering of [image, question]
    messages = [{"role": "user", "content": [{"image": str(tmp_path / "im.png")},
                                             "what colour is it?\nAnswer the question using a single word or phrase."]},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "how many?"},
                {"role": "assistant", "content": "one"}]
    ref = proc([messages], add_bos=False)["input_ids"][0].tolist()
    assert sample["input_ids"] == ref


def test_llava_multi_image_text_only_and_no_placeholder(tmp_path, proc):
    tok = proc.tokenizer
    for name, rgb in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        (tmp_path / name).write_bytes(png(rgb))
    multi = {"id": "m", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image> vs <image>: which is blue?"}, {"from": "gpt", "value": "the second"}]}
    sample = encode_sample(parse_conversation(llava_record(tmp_path, multi), images_root=tmp_path), proc, source="x")
    ids = sample["input_ids"]
    image_pos = [i for i, t in enumerate(ids) if t == proc.image_token_id]
    assert len(image_pos) == 2 and len(sample["images"]) == 2
    assert all(ids[i - 1] == proc.end_of_chunk_token_id for i in image_pos)
    assert all(sample["labels"][i] == IGNORE_INDEX and sample["labels"][i - 1] == IGNORE_INDEX for i in image_pos)
    assert sample["images"][0][0].mean() > sample["images"][1][0].mean()  # red first
    assert tok.decode(trained(sample), skip_special_tokens=False) == "the second</s>"

    text_only = {"id": "t", "conversations": [{"from": "human", "value": "say hi"}, {"from": "gpt", "value": "hi"}]}
    sample = encode_sample(parse_conversation(llava_record(tmp_path, text_only)), proc, source="x")
    assert sample["images"] == [] and proc.image_token_id not in sample["input_ids"]
    assert tok.decode(trained(sample), skip_special_tokens=False) == "hi</s>"

    no_placeholder = {"id": "n", "image": "a.png", "conversations": [
        {"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "red"}]}
    sample = encode_sample(parse_conversation(llava_record(tmp_path, no_placeholder), images_root=tmp_path), proc, source="x")
    text = tok.decode(sample["input_ids"], skip_special_tokens=False)
    assert "<|user|>\n<|endofchunk|><image>what is it?" in text


def test_llava_bad_entries(tmp_path, proc):
    (tmp_path / "a.png").write_bytes(png())
    cases = {
        "image_mismatch": {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "x"}]},
        "missing_file": {"id": "2", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]},
        "empty_text": {"id": "3", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]},
        "malformed_json": {"id": "4", "conversations": [{"from": "robot", "value": "hi"}]},
    }
    for reason, entry in cases.items():
        with pytest.raises(BadSample) as e:
            parse_conversation(llava_record(tmp_path, entry), images_root=tmp_path)
        assert e.value.reason == reason


def test_llava_image_path_map_remote_images_and_too_many_images(tmp_path, proc):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "x.png").write_bytes(png())
    entry = {"id": "m", "image": "/data/coco/x.png", "conversations": [
        {"from": "human", "value": "<image>what?"}, {"from": "gpt", "value": "red"}]}
    conv = parse_conversation(llava_record(tmp_path, entry), images_root=tmp_path,
                              image_path_map={"/data/": "/elsewhere/", "/data/coco/": "coco/"})  # longest prefix wins
    assert conv.images[0].value == tmp_path / "coco" / "x.png"
    sample = encode_sample(conv, proc, source="x")
    assert len(sample["images"]) == 1
    with pytest.raises(BadSample) as e:
        encode_sample(conv, proc, source="x", max_images=0)
    assert e.value.reason == "too_many_images"
    entry["image"] = "https://example.com/x.png"
    with pytest.raises(BadSample) as e:
        parse_conversation(llava_record(tmp_path, entry))
    assert e.value.reason == "remote_image"


# -- truncation --


@pytest.mark.parametrize("fmt", ["openflamingo", "idefics"])
def test_truncation_never_splits_an_image(tmp_path, fmt, proc, idefics_proc):
    p = proc if fmt == "openflamingo" else idefics_proc
    from interleaf.data.formats import ImageSource

    items = ["intro text here.", ImageSource(png(), "i0"), ImageSource(png(), "i1"), "one two three.",
             ImageSource(png(), "i2"), "four five six seven."]
    full = tokenize_document(p, items)
    wrapper = {p.image_token_id, p.fake_image_token_id} - {None}
    for max_length in range(2, len(full.input_ids) + 1):
        t = truncate(p, full, max_length, chat=False)
        assert len(t.input_ids) <= max_length
        assert t.input_ids == full.input_ids[: len(t.input_ids)]
        assert t.input_ids.count(p.image_token_id) == t.n_images
        if fmt == "idefics" and t.input_ids and t.input_ids[-1] in wrapper:
            assert t.input_ids[-1] == p.fake_image_token_id  # an image always ends with its fake token
        assert len(t.input_ids) >= max_length - 3  # at most one image's tokens dropped beyond the limit


def test_truncated_chat_drops_whole_images_and_counts_no_trainable(tmp_path, proc):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png())
    entry = {"id": "c", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>first?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "and this one <image>"}, {"from": "gpt", "value": "no"}]}
    conv = parse_conversation(llava_record(tmp_path, entry), images_root=tmp_path)
    full = encode_sample(conv, proc, source="x")
    second = [i for i, t in enumerate(full["input_ids"]) if t == proc.image_token_id][1]
    assert full["input_ids"][second - 1] == proc.end_of_chunk_token_id
    cut = encode_sample(conv, proc, source="x", max_length=second)  # the cut falls between <|endofchunk|> and <image>
    assert cut["input_ids"] == full["input_ids"][: second - 1]  # the whole second image went
    assert len(cut["images"]) == 1 and cut["input_ids"].count(proc.image_token_id) == 1
    assert proc.tokenizer.decode(trained(cut), skip_special_tokens=False) == "yes</s>"
    first = full["input_ids"].index(proc.image_token_id)
    with pytest.raises(BadSample) as e:
        encode_sample(conv, proc, source="x", max_length=first + 2)
    assert e.value.reason == "no_trainable_tokens"


# -- bad samples in a shard --


def test_shard_with_bad_members_yields_good_samples_and_counts_reasons(tmp_path, proc):
    good = [(f"g{i}.png", png()) for i in range(3)]
    members = [good[0], ("g0.txt", b"good zero."),
               ("bad1.png", b"not a png at all"), ("bad1.txt", b"broken image."),
               good[1], ("g1.txt", b"good one."),
               ("bad2.jpg", png()), ("bad2.txt", b"   "),
               ("bad3.txt", b"no image member."),
               ("bad4.png", png()), ("bad4.json", b"{broken"),
               good[2], ("g2.txt", b"good two.")]
    path = write_tar(tmp_path / "mixed.tar", members)
    # a truncated copy: cut inside the data of g0.txt (after two headers and the PNG's data block)
    raw = open(path, "rb").read()
    (tmp_path / "truncated.tar").write_bytes(raw[: 512 * 3 + 5])
    cfg = load_mixture({"sources": [{"name": "p", "format": "pairs", "paths": ["mixed.tar", "truncated.tar"]}]},
                       base_dir=tmp_path).sources[0]
    goods, bads = [], []
    for sample, bad in iter_source(cfg, proc):
        (goods if sample is not None else bads).append(sample or bad)
    assert [s["key"] for s in goods] == ["g0", "g1", "g2"]
    reasons = sorted(b.reason for b in bads)
    assert reasons == sorted(["unreadable_image", "empty_text", "missing_file", "malformed_json", "corrupt_shard"])
    assert set(reasons) <= set(REASONS)


def test_jsonl_with_broken_lines(tmp_path, proc):
    lines = [json.dumps({"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
             "{not json", "", "[1, 2]",
             json.dumps({"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"}]})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    records = load_llava(tmp_path / "c.jsonl")
    assert [r.error is None for r in records] == [True, False, False, True]
    bad = []
    for r in records:
        try:
            parse_conversation(r)
        except BadSample as e:
            bad.append(e.reason)
    assert bad == ["malformed_json", "malformed_json"]


# -- collate --


def test_collate_right_pads_and_masks(proc):
    s = proc.image_size
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "images": [torch.ones(3, s, s)], "loss_weight": 0.2}
    b = {"input_ids": [8], "labels": [8], "images": [torch.ones(3, s, s) * 2, torch.ones(3, s, s) * 3], "loss_weight": 1.0}
    c = {"input_ids": [9, 9], "labels": [9, 9], "images": [], "loss_weight": 1.0}
    batch = collate([a, b, c], pad_token_id=proc.pad_token_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2], [9, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [9, 9, -100]]
    assert batch["pixel_values"].shape == (3, 2, 3, s, s)
    assert batch["pixel_values"][0, 1].abs().sum() == 0 and batch["pixel_values"][2].abs().sum() == 0
    assert batch["pixel_values"][1, 1].mean() == 3
    assert batch["loss_weight"].tolist() == pytest.approx([0.2, 1.0, 1.0])
    assert "pixel_values" not in collate([c], pad_token_id=0)


def test_truncated_images_of_every_format_are_skipped_as_unreadable_and_named(tmp_path, proc):
    import numpy as np

    arr = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)  # (H, W, 3)
    members, expected_bad = [], []
    for fmt, ext in [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")]:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        data = buf.getvalue()
        for cut in (20, len(data) // 2):
            key = f"{ext}-cut{cut}"
            members += [(f"{key}.{ext}", data[:cut]), (f"{key}.txt", b"a truncated picture.")]
            expected_bad.append(key)
        members += [(f"{ext}-whole.{ext}", data), (f"{ext}-whole.txt", b"a whole picture.")]
    write_tar(tmp_path / "cut.tar", members)
    cfg = load_mixture({"sources": [{"name": "p", "format": "pairs", "paths": "cut.tar"}]}, base_dir=tmp_path).sources[0]
    goods, bads = [], []
    for sample, bad in iter_source(cfg, proc):
        (goods if sample is not None else bads).append(sample or bad)
    assert [s["key"] for s in goods] == ["png-whole", "jpg-whole", "webp-whole"]
    assert [b.reason for b in bads] == ["unreadable_image"] * len(expected_bad)
    for bad, key in zip(bads, expected_bad):
        assert bad.where == f"{tmp_path / 'cut.tar'}:{key} image" and "truncated or corrupt" in bad.detail, bad
