"""In-context learning check: a tiny model trained on word-binding episodes uses its demonstrations.

Each synthetic episode gives two shapes made-up names ("this is a dax.") only in its
demonstrations; the query shows one of the shapes. A model that reads its demonstrations scores
well above chance (1/2) with 4 shots, and exactly at chance with 0 shots, where nothing tells it
the names. The model is trained here, from scratch, in a plain PyTorch loop on episodes rendered
through the processor with the task's own template (nothing is cached on disk).

Design choices that make this learnable in well under a minute of CPU: one image patch per grid
cell (patch 16 on 32 px images, so a shape is a fixed pixel pattern inside one patch), no
resampler (text attends to the patch features directly), a one-layer LM (one attention layer
suffices to match the query's shape against each demonstration's and copy its name), gates
starting at one (training from scratch, not protecting a pretrained LM), and a tokenizer that
keeps each made-up name one token.

The 4-shot threshold holds for this seed, not for any seed: when the model starts reading its
demonstrations varies with the seed. The test is deterministic (fixed seeds for the weights, the
episodes and the batch order; one thread), so a given torch build measures the same number on
every run. Measured after 900 steps, seeds 0-4 (one seed for everything, as in ``SEED``): 4-shot
0.98, 0.76, 0.45, 0.54, 0.82; later every one of them gets there (seeds 1 and 4: 1.00 at 1200
steps; seeds 2 and 3: 0.89 and 0.93 at 1500). 0-shot stays at chance for every seed and step count
measured: 0.44-0.59 on 100 episodes.
"""

from __future__ import annotations

import random

import pytest
import torch

import interleaf
from interleaf.data.synth import NONSENSE_WORDS, fewshot_episodes
from interleaf.evaluation.fewshot import render_prompt
from interleaf.evaluation.runner import evaluate
from interleaf.evaluation.tasks import Example, get_task
from interleaf.processing import build_tiny_tokenizer
from interleaf.processing.tokenizer import DEFAULT_TEXT

SEED = 0
STEPS = 900
BATCH = 32
LR = 3e-3
TRAIN_EPISODES = 1024


def build_model(seed: int = SEED):
    tokenizer = build_tiny_tokenizer(DEFAULT_TEXT + "".join(f"this is a {w}.\n" * 20 for w in NONSENSE_WORDS))
    lm = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    return interleaf.build(
        "tiny-random", seed=seed, tokenizer=tokenizer, lm=lm, freeze="all_trainable", vision={"patch_size": 16},
        resampler={"enabled": False}, cross_attention={"every_n_layers": 1, "gate_init": "ones"},
    )


def training_batch(processor, episodes):
    """Episodes rendered with the task's template; the loss falls on every name (the token after 'this is a')."""
    template = get_task("synth-fewshot").template(processor.tokens.prompt_format)
    prompts = []
    for ep in episodes:
        demos = [Example(id=str(i), images=[img], fields={"answer": t.removeprefix("this is a ").rstrip(".")})
                 for i, (img, t) in enumerate(zip(ep.demo_images, ep.demo_texts))]
        query = Example(id="q", images=[ep.query_image], fields={"answer": ep.answer})
        prompts.append(render_prompt(template, demos, query) + [template.render_candidate(ep.answer) + "."])
    batch = processor(prompts, padding_side="right")
    ids = batch["input_ids"]  # (N, T)
    a_id = processor.tokenizer.convert_tokens_to_ids("Ġa")
    prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)  # (N, T)
    labels = torch.where(prev == a_id, ids, -100)
    return ids, batch["attention_mask"], batch["pixel_values"], labels


@pytest.mark.slow
def test_fewshot_binding_above_chance_with_4_shots_and_at_chance_with_0():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic: one thread, fixed seeds
    try:
        acc = _train_and_evaluate(SEED)
    finally:
        torch.set_num_threads(threads)
    assert acc["4"] >= 0.8, acc  # chance is 0.5; measured 0.98 at SEED = 0 (see the module docstring)
    # chance, on 100 episodes (standard deviation 0.05): measured 0.45 here, 0.44-0.59 over seeds and steps
    assert 0.3 <= acc["0"] <= 0.7, acc


def _train_and_evaluate(seed: int) -> dict[str, float]:
    """Mean accuracy by shot count ("0", "4") after STEPS steps from ``seed``."""
    torch.manual_seed(seed)
    model, processor = build_model(seed)
    episodes = fewshot_episodes(random.Random(seed + 1), TRAIN_EPISODES, shots=4)
    ids, mask, pixels, labels = training_batch(processor, episodes)
    assert int((labels != -100).sum(1).min()) == 5  # four demonstration names and the query's
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, TRAIN_EPISODES, (BATCH,), generator=gen)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warmup.step()
    model.eval()
    res = evaluate(model, processor, "synth-fewshot", shots=[0, 4], task_options={"episodes": 100}, progress=False)
    return {k: v["mean"] for k, v in res["results"]["synth-fewshot"]["shots"].items()}
