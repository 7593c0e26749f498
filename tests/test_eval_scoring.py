"""The model side: batched generation and cached log-likelihood scoring do not depend on batch size,
for every model family (``helpers.families``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.families import FAMILIES, build_family

from interleaf.evaluation.scoring import cut_at_stop, generate_batch, reduce_scores, score


@pytest.fixture(scope="module", params=FAMILIES)
def model_and_processor(request):
    # every family (cross-attention with its gates at one, so images change the outputs)
    return build_family(request.param, seed=0)


def img(c: int) -> Image.Image:
    return Image.new("RGB", (32, 32), (c, 255 - c, (3 * c) % 256))


PROMPTS = [
    [img(0), "Output:"],
    [img(40), "Output:a red square.<|endofchunk|>", img(80), "Question:what shape? Short answer:"],
    ["no image at all, Question:"],
    [img(120), "Question:how many objects are in the picture? Short answer:"],
    [img(160), "a", img(200), "b", img(240), "Output:"],
    [img(10), "this is a"],
    [img(50), "Output:two circles and a cross.<|endofchunk|>", img(90), "Output:"],
    [img(130), "Q"],
    [img(170), "Question:is there a blue triangle? Short answer:"],
]


def test_generation_identical_at_batch_size_1_and_8(model_and_processor):
    model, processor = model_and_processor
    one = generate_batch(model, processor, PROMPTS, max_new_tokens=6, batch_size=1)
    eight = generate_batch(model, processor, PROMPTS, max_new_tokens=6, batch_size=8)
    assert one == eight
    assert len(set(one)) > 1  # the prompts (and images) lead to different outputs
    beams1 = generate_batch(model, processor, PROMPTS[:4], max_new_tokens=4, num_beams=3, batch_size=1)
    beams4 = generate_batch(model, processor, PROMPTS[:4], max_new_tokens=4, num_beams=3, batch_size=4)
    assert beams1 == beams4


def test_generation_cuts_at_stop_strings(model_and_processor):
    model, processor = model_and_processor
    free = generate_batch(model, processor, PROMPTS[:3], max_new_tokens=8, batch_size=3)
    stop = [t[2] for t in free if len(t) > 3][:1]  # a character the free text contains
    cut = generate_batch(model, processor, PROMPTS[:3], max_new_tokens=8, batch_size=3, stop=stop)
    for f, c in zip(free, cut):
        assert c == cut_at_stop(f, stop) and stop[0] not in c
    assert cut_at_stop("red\nQuestion: x", ["Question", "\n"]) == "red"


def test_scores_identical_at_batch_size_1_and_8_and_match_full_forward(model_and_processor):
    model, processor = model_and_processor
    context = [img(30), "Output:a blue circle.<|endofchunk|>", img(60), "Output:"]
    candidates = [" a red square.", " two", " a green cross and a blue circle.", " dax", " yes", " no", " x", " four",
                  " white", " blicket"]
    one = score(model, processor, context, candidates, batch_size=1)
    eight = score(model, processor, context, candidates, batch_size=8)
    for (a, n), (b, m) in zip(one, eight):
        assert n == m and abs(a - b) < 1e-4
    # reference: each candidate scored by a full forward over context + candidate, without a cache
    batch = processor([context])
    for cand, (s, n) in zip(candidates, one):
        ids = processor.tokenizer(cand, add_special_tokens=False)["input_ids"]
        full = torch.cat([batch["input_ids"], torch.tensor([ids])], dim=1)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=batch["pixel_values"]).logits
        lp = torch.log_softmax(logits[0, -len(ids) - 1 : -1].float(), dim=-1)  # (n, V)
        expected = float(lp.gather(-1, torch.tensor(ids)[:, None]).sum())
        assert n == len(ids) and abs(s - expected) < 1e-4
    sums, means = reduce_scores(one, "sum"), reduce_scores(one, "mean")
    assert means == [s / n for s, n in one] and sums == [s for s, _ in one]


def test_scores_depend_on_the_context_image(model_and_processor):
    model, processor = model_and_processor
    a = score(model, processor, [img(0), "Output:"], [" red", " blue"])
    b = score(model, processor, [img(250), "Output:"], [" red", " blue"])
    assert a != b
