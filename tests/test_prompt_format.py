"""The prompt format is one rule: the processor (inference) and the training tokeniser write the same tokens.

Property: random content (text, 0-4 images) in every prompt family, as a chat conversation through
the chat template or as a plain interleaved document, goes through the processor and through the
training path (``data.tokenize``); both give identical input ids, the same image positions and
the same images, also when cut to a random length. ``llava-next`` is the ``llava`` format with
LLaVA-NeXT's any-resolution tiling: there each image's token count depends on its size, so the
images are of several sizes (their counts differ), and both paths must agree on every one. A plain document is given to the processor as
the training format writes it: consecutive texts joined by a space, and for OpenFlamingo
``<|endofchunk|>`` closing each image's chunk, with EOS at the end.

Examples pin the span rule: two consecutive IDEFICS images share their fake token, and a cut on
either side of it leaves ``<fake><image><fake>``, as transformers' ``IdeficsProcessor`` writes one
image; LLaVA's images are runs of ``image_seq_length`` ``<image>`` tokens, told apart by length.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fuzz_profiles import examples, timeout
import io

from interleaf.config import PROMPT_FORMATS, AnyresConfig, TokensConfig
from interleaf.data.formats import Conversation, ImageSource
from interleaf.data.tokenize import tokenize_conversation, tokenize_document, truncate
from interleaf.errors import InputError
from interleaf.processing import IGNORE_INDEX, ImageTransform, InterleafProcessor, build_tiny_tokenizer

IMAGE = object()  # stands for an image in a generated conversation
PIXEL = Image.new("RGB", (4, 4), (10, 20, 30))
FORMATS = [*PROMPT_FORMATS, "llava-next"]
# llava-next: 4 px views of 2 x 2 tokens; images of these sizes (width, height) take different token counts
NEXT_IMAGES = [Image.new("RGB", size, (10 * i, 20, 30)) for i, size in enumerate([(4, 4), (9, 4), (3, 10), (12, 5), (7, 7)])]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


NEXT_BYTES = [_png(image) for image in NEXT_IMAGES]


def image_for(fmt: str, i: int):
    """The i-th image of a prompt, for the processor."""
    return NEXT_IMAGES[i % len(NEXT_IMAGES)] if fmt == "llava-next" else PIXEL


def source_for(fmt: str, i: int) -> ImageSource:
    """The i-th image of a sample, for the training path (the same image as :func:`image_for`)."""
    return ImageSource(NEXT_BYTES[i % len(NEXT_BYTES)], f"image {i}") if fmt == "llava-next" else ImageSource(b"", "img")


def numbered(items, make):
    """``items`` with the k-th IMAGE replaced by ``make(k)``."""
    k, out = 0, []
    for item in items:
        if item is IMAGE:
            out.append(make(k))
            k += 1
        else:
            out.append(item)
    return out
# Words of letters, digits, punctuation and a few non-ASCII characters; no "<" or ">", so no text
# spells a special token, and no whitespace, so texts join and split at the same token boundaries.
words = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzABC0123456789.,!?'-:éß猫🐱"), min_size=1, max_size=8)
texts = st.lists(words, min_size=1, max_size=5).map(" ".join)


@pytest.fixture(scope="module")
def processors():
    out = {}
    for fmt in FORMATS:
        tokens = TokensConfig(prompt_format="llava" if fmt == "llava-next" else fmt,
                              image_seq_length=3 if fmt == "llava" else 1)
        tok = build_tiny_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": tokens.required_tokens()})
        anyres = AnyresConfig(convention="llava_next", base_size=4, patch_size=2) if fmt == "llava-next" else None
        out[fmt] = InterleafProcessor(tok, tokens, ImageTransform(4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize="squash"),
                                      anyres=anyres)
    return out


@st.composite
def conversations(draw) -> list[tuple[str, list]]:
    """[(role, parts)], parts text or IMAGE; user and assistant turns alternate, the assistant's last;
    at most 4 images, all in user turns."""
    turns = []
    if draw(st.booleans()):
        turns.append(("system", [draw(texts)]))
    budget = draw(st.integers(0, 4))
    for _ in range(draw(st.integers(1, 3))):
        parts = draw(st.lists(st.one_of(texts, st.just(IMAGE)), min_size=1, max_size=4))
        kept = []
        for part in parts:
            if part is IMAGE:
                if budget == 0:
                    continue
                budget -= 1
            kept.append(part)
        turns.append(("user", kept or [draw(texts)]))
        turns.append(("assistant", [draw(texts)]))
    return turns


@st.composite
def documents(draw) -> list:
    """Texts and at most 4 images, in any order (consecutive texts and images too), not empty."""
    items = draw(st.lists(st.one_of(texts, st.just(IMAGE)), min_size=1, max_size=8))
    images = [i for i, item in enumerate(items) if item is IMAGE]
    drop = set(images[4:])
    items = [item for i, item in enumerate(items) if i not in drop]
    return items if any(item is not IMAGE for item in items) else [*items, draw(texts)]


def image_positions(out) -> list[int]:
    """Where each image's mask column switches on: the position of that image's token."""
    mask = out["image_attention_mask"][0]  # (T, N)
    return [int(mask[:, n].nonzero()[0]) for n in range(mask.shape[1]) if mask[:, n].any()]


def training_as_prompt(items: list, processor, fmt: str) -> list:
    """A document as the processor is given it to write the training format's tokens."""
    eoc = processor.tokens.end_of_chunk_token
    out: list = []
    chunk_open = last_was_text = False
    k = 0
    for item in items:
        if item is IMAGE:
            if processor.format.closes_chunks and chunk_open:
                out.append(eoc)
            out.append(image_for(fmt, k))
            k += 1
            chunk_open, last_was_text = True, False
        else:
            if last_was_text:
                out[-1] += " " + item
            else:
                out.append(item)
            last_was_text = True
    if processor.format.closes_chunks and chunk_open:
        out.append(eoc)
    return out


def assert_same(processor, prompt: list, trained, cut: int, *, chat: bool, add_eos: bool) -> None:
    """Processor output for ``prompt`` == the training path's ``trained`` tokens, whole and cut right."""
    out = processor(prompt, add_eos=add_eos)
    ids = out["input_ids"][0].tolist()
    assert ids == trained.input_ids
    assert len(trained.labels) == len(ids)
    counts = trained.image_counts  # each image's token count (LLaVA-NeXT), else None: a fixed count
    positions = processor.format.image_starts(ids, counts)  # each image's (first) image token
    assert image_positions(out) == positions and len(positions) == trained.n_images
    assert sum(1 for t in ids if t == processor.image_token_id) == image_tokens(processor, trained)
    assert pixel_images(out) == trained.n_images
    assert processor.format.image_spans(ids, chat, counts) == processor.format.image_spans(trained.input_ids, chat, counts)

    cut = max(1, min(cut, len(ids)))
    kept = truncate(processor, trained, cut, chat=chat)
    try:
        short = processor(prompt, add_eos=add_eos, max_length=cut, truncation=True, padding_side="right")
    except InputError as e:  # the processor refuses a row with nothing but BOS left; training keeps that row
        assert "cannot truncate" in str(e)
        assert kept.input_ids in ([], [processor.tokenizer.bos_token_id])
        return
    short_ids = short["input_ids"][0].tolist()
    assert short_ids == kept.input_ids
    assert image_positions(short) == processor.format.image_starts(short_ids, kept.image_counts)
    assert pixel_images(short) == kept.n_images
    assert sum(1 for t in short_ids if t == processor.image_token_id) == image_tokens(processor, kept)  # never cut


def image_tokens(processor, t) -> int:
    """The ``<image>`` tokens of the images ``t`` holds (LLaVA: one per vision token; anyres: each image's count)."""
    if t.image_counts is not None:
        assert len(t.image_counts) == t.n_images
        return sum(t.image_counts)
    return processor.format.image_token_count() * t.n_images


def pixel_images(out) -> int:
    """How many images the processor's pixels hold: (B, N, ...) per row, or LLaVA-NeXT's (K, views, ...)."""
    if "pixel_values" not in out:
        return 0
    return out["pixel_values"].shape[0] if "image_sizes" in out else out["pixel_values"].shape[1]


@pytest.mark.parametrize("fmt", FORMATS)
@timeout(60, 0.2)
@settings(max_examples=examples(60))
@given(turns=conversations(), cut=st.integers(1, 400))
def test_chat_conversations_tokenise_the_same_for_training_and_inference(processors, fmt, turns, cut):
    processor = processors[fmt]
    flat = [p for _, parts in turns for p in parts]
    images = iter(numbered(flat, lambda k: image_for(fmt, k)))
    sources = iter(numbered(flat, lambda k: source_for(fmt, k)))
    for_processor = [{"role": role, "content": [next(images) for _ in parts]} for role, parts in turns]
    for_training = Conversation(
        [{"role": role, "content": [next(sources) for _ in parts]} for role, parts in turns], key="conversation",
    )
    trained = tokenize_conversation(processor, for_training)
    assert_same(processor, for_processor, trained, cut, chat=True, add_eos=False)
    for s, e in processor.format.image_spans(trained.input_ids, chat=True, counts=trained.image_counts):
        assert trained.labels[s:e] == [IGNORE_INDEX] * (e - s)  # an image's tokens are never trained


@pytest.mark.parametrize("fmt", FORMATS)
@timeout(60, 0.2)
@settings(max_examples=examples(60))
@given(items=documents(), cut=st.integers(1, 400))
def test_plain_documents_tokenise_the_same_for_training_and_inference(processors, fmt, items, cut):
    processor = processors[fmt]
    trained = tokenize_document(processor, numbered(items, lambda k: source_for(fmt, k)))
    assert_same(processor, training_as_prompt(items, processor, fmt), trained, cut, chat=False, add_eos=True)


# -- the span rule, by example --


def test_consecutive_idefics_images_share_their_fake_token_and_either_cut_keeps_a_whole_image(processors):
    processor = processors["idefics"]
    fmt, f, img = processor.format, processor.fake_image_token_id, processor.image_token_id
    ids = [f, img, f, img, f]  # what IdeficsProcessor writes for two images in a row
    assert fmt.image_ids(False, chat=False) + fmt.image_ids(True, chat=False) == ids
    assert fmt.image_spans(ids, chat=False) == [(0, 3), (2, 5)]  # the shared fake token is in both
    assert fmt.cut_right(ids, 4, chat=False) == (3, 1)  # keeps <fake><image><fake>: the first image
    assert fmt.cut_left(ids, 4, chat=False) == (2, 1)  # keeps <fake><image><fake>: the second image
    assert fmt.cut_right(ids, 2, chat=False) == (0, 0) and fmt.cut_left(ids, 2, chat=False) == (5, 2)
    for prompt in ([PIXEL, PIXEL, "end"], ["start", PIXEL, PIXEL]):  # the processor writes the same
        out = processor(prompt)["input_ids"][0].tolist()
        assert ids == [t for t in out if t in (f, img)]


def test_an_end_of_chunk_before_an_image_closes_the_previous_chunk_in_plain_prompts(processors):
    processor = processors["openflamingo"]
    fmt, eoc, img = processor.format, processor.end_of_chunk_token_id, processor.image_token_id
    ids = [7, eoc, img, 8]
    assert fmt.image_spans(ids, chat=False) == [(2, 3)]  # a document's chunk end is no part of the image
    assert fmt.image_spans(ids, chat=True) == [(1, 3)]  # a chat image is written <|endofchunk|><image>
    assert fmt.cut_right(ids, 2, chat=False) == (2, 0) and fmt.cut_right(ids, 2, chat=True) == (1, 0)
    assert fmt.cut_left(ids, 2, chat=False) == (2, 0) and fmt.cut_left(ids, 2, chat=True) == (3, 1)
    prompt = ["a cat.<|endofchunk|>", PIXEL, "a dog."]
    full = processor(prompt)["input_ids"][0].tolist()
    at = full.index(img)
    right = processor(prompt, max_length=at, truncation=True, padding_side="right")["input_ids"][0].tolist()
    assert right == full[:at] and right[-1] == eoc
    left = processor(prompt, max_length=len(full) - at + 1, truncation=True)["input_ids"][0].tolist()
    assert left == full[:1] + full[at:]  # BOS, then the image with its text


def test_llava_images_are_runs_of_image_seq_length_tokens_and_a_cut_keeps_whole_runs(processors):
    processor = processors["llava"]
    fmt, img = processor.format, processor.image_token_id
    assert fmt.image_ids(False, chat=False) == [img] * 3
    ids = [7, img, img, img, img, img, img, 8]  # two consecutive images of 3 tokens
    assert fmt.image_spans(ids, chat=False) == [(1, 4), (4, 7)]
    assert fmt.cut_right(ids, 6, chat=False) == (4, 1) and fmt.cut_left(ids, 6, chat=False) == (4, 1)
    out = processor([PIXEL, PIXEL, "end"])
    row = out["input_ids"][0].tolist()
    assert [t for t in row if t == img] == [img] * 6 and out["pixel_values"].shape[1] == 2


def test_llava_next_training_samples_hold_each_images_views_and_size(processors):
    from interleaf.data.formats import BadSample, Document, Pair
    from interleaf.data.tokenize import encode_sample

    processor = processors["llava-next"]
    doc = Document(["a cat", source_for("llava-next", 1), "then", source_for("llava-next", 2), "end"], key="doc")
    sample = encode_sample(doc, processor, source="test")
    assert sample["image_sizes"] == [(4, 9), (10, 3)]  # (height, width) of (9, 4) and (3, 10) px images
    inputs = processor(training_as_prompt(["a cat", IMAGE, "then", IMAGE, "end"], processor, "llava-next"),
                       add_eos=True)
    # the processor's first image is image_for(.., 0); the sample's are 1 and 2: compare one image at a time
    pair = encode_sample(Pair(source_for("llava-next", 3), "a caption", key="pair"), processor, source="test")
    alone = processor([image_for("llava-next", 3), "a caption"], add_eos=True)
    assert pair["input_ids"] == alone["input_ids"][0].tolist()
    assert pair["image_sizes"] == [(5, 12)] and alone["image_sizes"].tolist() == [[5, 12]]
    views = alone["pixel_values"][0]
    assert torch.equal(pair["images"][0], views[: pair["images"][0].shape[0]])
    assert inputs["image_sizes"].shape == (2, 2)
    thin = ImageSource(_png(Image.new("RGB", (200, 1))), "thin image")
    with pytest.raises(BadSample, match="thin image: unreadable_image: .*too thin for the anyres grids"):
        encode_sample(Pair(thin, "a caption", key="pair"), processor, source="test")
