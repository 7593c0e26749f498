"""interleaf vs transformers on CPU: the same weights, side by side, in one process.

    python benchmarks/vs_transformers.py [--family idefics|llava|all] [--size smoke|tiny|mid]
        [--threads N] [--repeats R] [--new-tokens T] [--results [DIR]]

Two families, each built with transformers from a random config, saved, and converted with
interleaf's converter, so both models hold the same weights:

- ``idefics``: ``IdeficsForVisionText2Text`` (cross-attention) through ``interleaf.convert.from_idefics``;
- ``llava``: ``LlavaForConditionalGeneration`` (token insertion) through ``interleaf.convert.from_llava``.

Sizes (``SIZES``): ``smoke`` (a few seconds, for the tests), ``tiny`` (LLaMA 256 wide x 4 layers,
a 128-wide tower on 64 px images: mostly Python overhead) and ``mid`` (LLaMA 1024 wide x 12
layers, about 150 M parameters, and a ViT-B/32-shaped tower, 768 wide x 12 layers on 224 px
images: the matrix products dominate). Measured (median of ``--repeats`` after a warm-up):

- prefill: one forward pass over a batch of 8 prompts with 4 images each (no cache);
- generate: ``--new-tokens`` new tokens (greedy, length forced) at batch 1 and 8 with 1 and 4
  images per prompt, in new tokens per second; the generated ids are compared (the comparison is
  the warm-up);
- train step: forward + backward + AdamW, batch 8 with 1 to 4 images per row. IDEFICS: the
  weights IDEFICS trains (perceiver, cross-attention, added token rows); LLaVA: the projector
  (LLaVA's first stage), the same parameters in both;
- peak memory of the generate (batch 8, 4 images) and train-step cases: ``ru_maxrss`` of a
  forked child that runs only that case, minus the resident memory at the fork.

The ratio column is interleaf's speed-up (times, memory: reference / interleaf; rates:
interleaf / reference). At the mid size the targets of the performance plan are shown with the
margin by which each is met or missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import Row  # noqa: E402

import interleaf  # noqa: E402
from interleaf.model.modeling import causal_lm_loss  # noqa: E402
from interleaf.processing import build_tiny_tokenizer  # noqa: E402

IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
TEXT = "Describe the picture in detail, with the colours and the shapes you see:"

# per size: LM (LLaMA), vision tower (CLIP-like), perceiver (IDEFICS), new tokens
SIZES = {
    "smoke": dict(lm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
                  vision=dict(hidden=32, layers=2, heads=4, mlp=64, image=32, patch=8),
                  perceiver=dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8),
                  interval=1, new_tokens=4),
    "tiny": dict(lm=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
                 vision=dict(hidden=128, layers=4, heads=4, mlp=512, image=64, patch=8),
                 perceiver=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=32),
                 interval=1, new_tokens=64),
    "mid": dict(lm=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16),
                vision=dict(hidden=768, layers=12, heads=12, mlp=3072, image=224, patch=32),
                perceiver=dict(resampler_n_latents=64, resampler_depth=3, resampler_n_heads=12, resampler_head_dim=64),
                interval=4, new_tokens=32),
}
# the ratios aimed at (mid size only): case prefix -> target
TARGETS = {
    "idefics": {"generate, batch 8, 4 images": 2.5, "generate, batch 1": 1.5, "train step": 1.3,
                "peak memory, train step": 1 / 0.7},
    "llava": {"generate, batch 8": 1.2, "train step": 1.1},
}
REFERENCE_NAME = {"idefics": "transformers IDEFICS", "llava": "transformers LlavaForConditionalGeneration"}


def build_idefics(size: dict, root: Path, dtype: torch.dtype = torch.float32):
    """(transformers IDEFICS, interleaf model, processor) with identical weights (in ``dtype``)."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    from interleaf.convert import from_idefics

    tok = build_tiny_tokenizer()
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS_TOKENS})
    v = size["vision"]
    config = IdeficsConfig(
        vocab_size=base, additional_vocab_size=len(IDEFICS_TOKENS), **size["lm"],
        cross_layer_interval=size["interval"], qk_layer_norms=True, use_resampler=True, alpha_initializer="normal",
        alphas_initializer_range=0.3, alpha_type="vector", freeze_lm_head=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=1024,
        vision_config=dict(embed_dim=v["hidden"], image_size=v["image"], patch_size=v["patch"],
                           num_hidden_layers=v["layers"], num_attention_heads=v["heads"], intermediate_size=v["mlp"]),
        perceiver_config=dict(**size["perceiver"], qk_layer_norms_perceiver=True),
    )
    torch.manual_seed(0)
    reference = IdeficsForVisionText2Text(config).to(dtype).eval()
    reference.save_pretrained(root / "idefics")
    tok.save_pretrained(root / "idefics")
    from_idefics(root / "idefics", root / "interleaf")
    ours, processor = interleaf.load(root / "interleaf", dtype=dtype)
    ours.apply_freeze()  # load leaves every parameter trainable; freeze the backbones as IDEFICS does
    return reference, ours.eval(), processor


def build_llava(size: dict, root: Path):
    """(transformers LLaVA, interleaf model, processor) with identical weights; only the projector trains."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from interleaf.convert import from_llava

    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    v = size["vision"]
    vision = CLIPVisionConfig(hidden_size=v["hidden"], intermediate_size=v["mlp"], num_hidden_layers=v["layers"],
                              num_attention_heads=v["heads"], image_size=v["image"], patch_size=v["patch"])
    text = LlamaConfig(vocab_size=len(tok), **size["lm"], max_position_embeddings=2048, initializer_range=0.2,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=(v["image"] // v["patch"]) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    reference = LlavaForConditionalGeneration(config).eval()
    reference.save_pretrained(root / "llava")
    tok.save_pretrained(root / "llava")
    from_llava(root / "llava", root / "interleaf")
    ours, processor = interleaf.load(root / "interleaf")
    for model, projector in ((reference, reference.model.multi_modal_projector), (ours, ours.projector)):
        model.requires_grad_(False)
        projector.requires_grad_(True)
    return reference, ours.eval(), processor


def inputs_for(family: str, processor, batch: int, images: int | list[int]):
    """(interleaf's inputs, the reference's view of them): LLaVA takes its images flat."""
    counts = images if isinstance(images, list) else [images] * batch
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    prompts = [
        ["User:", *[Image.new("RGB", (80, 64), colours[(r + i) % 4]) for i in range(n)], TEXT, "Assistant:"]
        for r, n in enumerate(counts)
    ]
    ours = processor(prompts, add_bos=True) if family == "llava" else processor(prompts)
    if family == "idefics":
        return ours, ours
    flat = torch.cat([ours["pixel_values"][r, :n] for r, n in enumerate(counts)])
    return ours, dict(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"], pixel_values=flat)


def generate(model, inputs, new_tokens: int):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)


def train_step_fn(model, inputs, image_token_id: int):
    """One optimiser step on the model's trainable weights; the same loss function for both
    (transformers' IDEFICS loss ignores the additional vocabulary and fails on it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == image_token_id, -100)

    def step():
        model.train()
        loss, _ = causal_lm_loss(model(**inputs).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    return step, sum(p.numel() for p in params)


def compare(family: str, size_name: str, repeats: int, new_tokens: int | None, memory: bool = True) -> dict:
    """Build the pair, measure every case; returns rows, parameter counts and the greedy check.

    One function for the whole comparison (build, prefill, generate, train, memory) so that every
    case runs on the same pair in the same order."""
    size = SIZES[size_name]
    new_tokens = new_tokens or size["new_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        reference, ours, processor = (build_idefics if family == "idefics" else build_llava)(size, Path(tmp))
    image_id = ours.image_token_id
    targets = TARGETS[family] if size_name == "mid" else {}

    def target(case: str) -> float | None:
        return next((t for prefix, t in targets.items() if case.startswith(prefix)), None)

    rows: list[Row] = []
    big_ours, big_ref = inputs_for(family, processor, 8, 4)
    with torch.no_grad():
        t_ref = benchlib.timed(lambda: reference(**big_ref), repeats)
        t_our = benchlib.timed(lambda: ours(**big_ours), repeats)
    rows.append(Row("prefill, batch 8, 4 images", t_ref, t_our, "s", target=target("prefill")))

    mismatches = []
    for batch in (1, 8):
        for images in (1, 4):
            mine, theirs = inputs_for(family, processor, batch, images)
            want, got = generate(reference, theirs, new_tokens), generate(ours, mine, new_tokens)
            if not torch.equal(want, got):
                mismatches.append(f"batch {batch}, {images} image(s)")
            t_ref = benchlib.timed(lambda: generate(reference, theirs, new_tokens), repeats, warm_up=False)
            t_our = benchlib.timed(lambda: generate(ours, mine, new_tokens), repeats, warm_up=False)
            case = f"generate, batch {batch}, {images} image{'s' if images > 1 else ''}"
            tokens = batch * new_tokens
            rows.append(Row(case, tokens / t_ref, tokens / t_our, "new tokens/s", True, target(case)))

    mixed_ours, mixed_ref = inputs_for(family, processor, 8, [1, 2, 3, 4, 1, 2, 3, 4])
    ref_step, ref_trainable = train_step_fn(reference, mixed_ref, image_id)
    our_step, our_trainable = train_step_fn(ours, mixed_ours, image_id)
    rows.append(Row("train step, batch 8, 1-4 images", benchlib.timed(ref_step, repeats),
                    benchlib.timed(our_step, repeats), "s", target=target("train step")))
    if memory:
        rows.append(Row("peak memory, generate batch 8, 4 images",
                        benchlib.peak_memory(lambda: generate(reference, big_ref, new_tokens)),
                        benchlib.peak_memory(lambda: generate(ours, big_ours, new_tokens)), "MiB",
                        target=target("peak memory, generate")))
        rows.append(Row("peak memory, train step", benchlib.peak_memory(ref_step), benchlib.peak_memory(our_step),
                        "MiB", target=target("peak memory, train step")))
    return dict(rows=rows, mismatches=mismatches, new_tokens=new_tokens,
                parameters=(reference.num_parameters(), ours.num_parameters()),
                trainable=(ref_trainable, our_trainable))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["idefics", "llava", "all"], default="all")
    benchlib.size_arguments(parser, SIZES)
    parser.add_argument("--no-memory", action="store_true", help="leave out the forked peak-memory cases")
    args = benchlib.parse_size_arguments(parser, argv)
    with benchlib.quiet():
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)

        out: dict = {}
        for family in (["idefics", "llava"] if args.family == "all" else [args.family]):
            result = compare(family, args.size, args.repeats, args.new_tokens, memory=not args.no_memory)
            (p_ref, p_our), (t_ref, t_our) = result["parameters"], result["trainable"]
            lines = benchlib.header(f"interleaf vs {REFERENCE_NAME[family]}, {args.size} size", args.threads, argv,
                                    "vs_transformers.py")
            lines += [
                f"Parameters: {p_ref:,} (transformers) / {p_our:,} (interleaf); trainable: {t_ref:,} / {t_our:,}; "
                f"{result['new_tokens']} new tokens per generate; median of {args.repeats} after a warm-up; "
                f"identical greedy generations: "
                + ("yes" if not result["mismatches"] else "NO (" + "; ".join(result["mismatches"]) + ")"),
                "",
                *benchlib.table(result["rows"], REFERENCE_NAME[family]),
            ]
            result["text"] = benchlib.emit(lines, args.results)
            out[family] = result
        return out


if __name__ == "__main__":
    main()
