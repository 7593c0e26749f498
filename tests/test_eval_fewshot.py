"""Few-shot prompts: rendering per prompt format (snapshots), random demos, RICES, the zero-shot trick."""

from __future__ import annotations

import pytest
import torch
from helpers.families import build_family
from PIL import Image

import interleaf
from interleaf.evaluation.fewshot import RandomDemos, example_seed, render_prompt
from interleaf.evaluation.rices import RICESDemos, build_rices, image_features
from interleaf.evaluation.tasks import Example, get_task


def colour_image(c: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (c, 0, 255 - c))


def vqa_example(i: int) -> Example:
    return Example(id=f"q{i}", images=[colour_image(i * 20)], fields={"question": f"what is {i}?", "answer": f"a{i}"},
                   answers=[f"a{i}"])


DEMOS = [vqa_example(i) for i in range(4)]
QUERY = vqa_example(9)


def test_openflamingo_four_shot_snapshot():
    model, processor = interleaf.build("tiny-random", seed=0)
    prompt = render_prompt(get_task("vqav2").template("openflamingo"), DEMOS, QUERY)
    images = [x for x in prompt if isinstance(x, Image.Image)]
    assert images == [d.images[0] for d in DEMOS] + [QUERY.images[0]]  # four demos in order, then the query
    batch = processor([prompt])
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    expected = "<s>" + "".join(
        f"<image>Question:what is {i}? Short answer:a{i}<|endofchunk|>" for i in range(4)
    ) + "<image>Question:what is 9? Short answer:"
    assert text == expected
    assert batch["pixel_values"].shape[:2] == (1, 5)
    for n, img in enumerate(images):  # the pixels are those images, in that order
        assert torch.equal(batch["pixel_values"][0, n], processor.process_images([img])[0])


def test_idefics_four_shot_snapshot():
    model, processor = interleaf.build("tiny-random", seed=0, tokens={"prompt_format": "idefics"})
    prompt = render_prompt(get_task("vqav2").template(processor.tokens.prompt_format), DEMOS, QUERY)
    batch = processor([prompt])
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    wrap = "<fake_token_around_image><image><fake_token_around_image>"
    expected = "<s>" + "".join(f"{wrap}Question: what is {i}? Answer: a{i}\n" for i in range(4)) + \
        f"{wrap}Question: what is 9? Answer:"
    assert text == expected
    assert batch["pixel_values"].shape[:2] == (1, 5)


@pytest.mark.parametrize("family", ["expand", "replace"])
def test_token_insertion_four_shot_snapshot(family):
    """A token-insertion model (prompt format llava) takes OpenFlamingo's few-shot format (xGen-MM's
    base model's): each image as the processor writes it for the placement, its demos in order."""
    model, processor = build_family(family, seed=0)
    assert processor.tokens.prompt_format == "llava"
    prompt = render_prompt(get_task("vqav2").template(processor.tokens.prompt_format), DEMOS, QUERY)
    assert prompt == render_prompt(get_task("vqav2").template("openflamingo"), DEMOS, QUERY)
    batch = processor([prompt])
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    image = "<image>" * (16 if family == "expand" else 1)  # one per vision token, or one the model replaces
    expected = "<s>" + "".join(
        f"{image}Question:what is {i}? Short answer:a{i}<|endofchunk|>" for i in range(4)
    ) + f"{image}Question:what is 9? Short answer:"
    assert text == expected
    assert batch["pixel_values"].shape[:2] == (1, 5)
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_caption_template_and_text_only_demos():
    tpl = get_task("coco").template("openflamingo")
    demos = [Example(id="d", images=["d.jpg"], fields={"caption": "a dog"})]
    query = Example(id="q", images=["q.jpg"], fields={"caption": "unused"})
    d, q = {"image": "d.jpg"}, {"image": "q.jpg"}  # string paths are marked as images, never read as text
    assert render_prompt(tpl, demos, query) == [d, "Output:a dog<|endofchunk|>", q, "Output:"]
    # zero-shot trick rendering: the demonstrations' images are dropped, the query keeps its own
    assert render_prompt(tpl, demos, query, text_only_demos=True) == ["Output:a dog<|endofchunk|>", q, "Output:"]


def test_random_demos_never_the_query_and_seeded_by_example_not_rank(monkeypatch):
    pool = [vqa_example(i) for i in range(30)]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        sampler = RandomDemos(pool, trial_seed=3, query_set_size=20)
        picks = {q.id: [d.id for d in sampler.sample(q, 8)] for q in pool}
        if rank == "0":
            first = picks
    assert picks == first  # the rank plays no part
    assert all(q not in ids for q, ids in picks.items())
    assert len({tuple(v) for v in picks.values()}) > 1  # different examples get different demos
    # the same example asked for in another order or batch gets the same demonstrations
    s = RandomDemos(pool, trial_seed=3, query_set_size=20)
    assert [d.id for d in s.sample(pool[5], 8)] == first["q5"]
    other = RandomDemos(pool, trial_seed=4, query_set_size=20)
    assert [d.id for d in other.sample(pool[5], 8)] != first["q5"]
    assert example_seed(3, "q5") != example_seed(4, "q5")
    # a query set of 20 out of 30: only those 20 are ever used
    assert len({d for v in picks.values() for d in v}) <= 20


def test_rices_picks_nearest_most_similar_last(tmp_path):
    _, processor = interleaf.build("tiny-random", seed=0)
    pool = [Example(id=f"p{c}", images=[colour_image(c)]) for c in (0, 60, 120, 180, 240)]
    query = Example(id="q", images=[colour_image(130)])
    calls = []

    def encoder(pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 2): a known feature space
        calls.append(pixels.shape[0])
        red = pixels[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.cos(red), torch.sin(red)], dim=-1)

    sampler = build_rices(pool, [query], processor, encoder, identity="redness-v1", cache_dir=tmp_path)
    picked = [d.id for d in sampler.sample(query, 3)]
    assert picked == ["p60", "p180", "p120"]  # 120 is nearest to 130 and comes last; then 180, 60
    assert len(calls) == 2
    # the features are cached on disk, keyed by encoder identity and dataset
    image_features(pool, processor, encoder, identity="redness-v1", cache_dir=tmp_path)
    assert len(calls) == 2
    image_features(pool, processor, encoder, identity="redness-v2", cache_dir=tmp_path)
    assert len(calls) == 3
    image_features(pool[:4], processor, encoder, identity="redness-v1", cache_dir=tmp_path)
    assert len(calls) == 4


def test_rices_excludes_the_query_itself():
    pool = [Example(id=f"p{i}", images=[]) for i in range(4)]
    feats = torch.nn.functional.normalize(torch.eye(4)[:, :3] + 0.1, dim=-1)  # p0 matches itself best
    sampler = RICESDemos(pool, feats, {"p0": feats[0]})
    ids = [d.id for d in sampler.sample(pool[0], 3)]
    assert "p0" not in ids and len(ids) == 3


@pytest.mark.parametrize("family", ["cross_attention", "expand"])  # the tower of each fusion family
def test_model_vision_tower_rices_prefers_same_image(tmp_path, family):
    model, processor = interleaf.build("tiny-random", seed=0) if family == "cross_attention" else build_family(family)
    pool = [Example(id=f"p{c}", images=[colour_image(c)]) for c in (0, 100, 200)]
    query = Example(id="q", images=[colour_image(200)])
    from interleaf.evaluation.rices import VisionTowerEncoder

    enc = VisionTowerEncoder(model)
    sampler = build_rices(pool, [query], processor, enc, identity=enc.identity)
    assert sampler.sample(query, 2)[-1].id == "p200"  # an identical image is the most similar


def test_chat_rendering_puts_demos_in_turns():
    from interleaf.evaluation.fewshot import render_chat

    _, processor = interleaf.build("tiny-random", seed=0)
    tpl = get_task("synth-vqa").template("openflamingo")
    messages = render_chat(tpl, DEMOS[:2], QUERY)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "a0" and messages[0]["content"] == [DEMOS[0].images[0], "\nwhat is 0?"]
    batch = processor([messages])
    assert batch["pixel_values"].shape[:2] == (1, 3)
    text = processor.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=False)
    assert text.count("what is") == 3 and text.index("a0") < text.index("what is 9?")
