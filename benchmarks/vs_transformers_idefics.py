"""interleaf vs transformers' IDEFICS on CPU: the same model, side by side, in one process.

    .venv/bin/python benchmarks/vs_transformers_idefics.py [--threads N] [--repeats R] [--out FILE]

A tiny-but-not-trivial IDEFICS (LLaMA 256 wide x 4 layers with cross-attention before each, a
CLIP-like tower 128 wide x 4 layers on 64 px images, a 2-layer perceiver with 64 latents, q/k
norms) is built with transformers, saved, and converted with ``interleaf.convert.from_idefics``,
so both models hold the same weights. Measured (median of ``--repeats`` after a warm-up):

- prefill: one forward pass over a batch of 8 prompts with 4 images each (no cache);
- generate: 64 new tokens (greedy, length forced), 1 and 4 images per prompt, batch 1 and 8,
  in new tokens per second; the generated ids are compared too;
- train step: forward + backward + AdamW on the trainable weights (backbones frozen: perceiver,
  cross-attention, the added token rows), batch 8 with 1 to 4 images per row;
- peak memory of the generate (batch 8, 4 images) and train-step cases: ``ru_maxrss`` of a
  forked child that runs only that case, minus the resident memory at the fork (so each model's
  peak is measured on its own, within one parent process).

Runs in a few minutes on 2 CPU cores; prints a markdown table of times and interleaf's speed-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

import interleaf
from interleaf.convert import from_idefics
from interleaf.model.modeling import causal_lm_loss
from interleaf.processing import build_tiny_tokenizer

NEW_TOKENS = 64
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
TEXT = "Describe the picture in detail, with the colours and the shapes you see:"


def build_pair(root: Path):
    """(transformers IDEFICS, interleaf model, processor) with identical weights."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    tok = build_tiny_tokenizer()
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS_TOKENS})
    config = IdeficsConfig(
        vocab_size=base, additional_vocab_size=len(IDEFICS_TOKENS), hidden_size=256, intermediate_size=688,
        num_hidden_layers=4, num_attention_heads=8, cross_layer_interval=1, qk_layer_norms=True,
        use_resampler=True, alpha_initializer="normal", alphas_initializer_range=0.3, alpha_type="vector",
        freeze_lm_head=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, max_position_embeddings=512,
        vision_config=dict(embed_dim=128, image_size=64, patch_size=8, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512),
        perceiver_config=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=32,
                              qk_layer_norms_perceiver=True),
    )
    torch.manual_seed(0)
    reference = IdeficsForVisionText2Text(config).eval()
    reference.save_pretrained(root / "idefics")
    tok.save_pretrained(root / "idefics")
    from_idefics(root / "idefics", root / "interleaf")
    ours, processor = interleaf.load(root / "interleaf")
    ours.apply_freeze()  # load leaves every parameter trainable; freeze the backbones as IDEFICS does
    return reference, ours.eval(), processor


def inputs_for(processor, batch: int, images: int | list[int]):
    counts = images if isinstance(images, list) else [images] * batch
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    prompts = [
        ["User:", *[Image.new("RGB", (80, 64), colours[(r + i) % 4]) for i in range(n)], TEXT, "Assistant:"]
        for r, n in enumerate(counts)
    ]
    return processor(prompts)


def timed(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate(model, inputs):
    return model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )


def train_step_fn(model, inputs):
    """One optimiser step; the same loss function for both (transformers' IDEFICS loss ignores the
    additional vocabulary and fails on it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def step():
        model.train()
        loss, _ = causal_lm_loss(model(**inputs).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    return step, sum(p.numel() for p in params)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], object]) -> float:
    """MiB above the resident memory at the fork, in a child that runs ``fn`` once."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without cleanup
        os.close(read)
        base = rss_bytes()
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        os.write(write, str(max(0, peak - base)).encode())
        os._exit(0)
    os.close(write)
    data = os.read(read, 64)
    os.waitpid(pid, 0)
    return int(data or 0) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        reference, ours, processor = build_pair(Path(tmp))
    rows: list[tuple[str, float, float, str]] = []  # (case, reference, interleaf, unit)

    big = inputs_for(processor, 8, 4)
    with torch.no_grad():
        t_ref = timed(lambda: reference(**big), args.repeats)
        t_our = timed(lambda: ours(**big), args.repeats)
    rows.append(("prefill, batch 8, 4 images (s)", t_ref, t_our, "s"))

    same = True
    for batch in (1, 8):
        for images in (1, 4):
            inputs = inputs_for(processor, batch, images)
            same &= bool(torch.equal(generate(reference, inputs), generate(ours, inputs)))
            # the comparison above was the warm-up
            t_ref = timed(lambda: generate(reference, inputs), args.repeats, warm_up=False)
            t_our = timed(lambda: generate(ours, inputs), args.repeats, warm_up=False)
            tokens = batch * NEW_TOKENS
            rows.append((f"generate, batch {batch}, {images} image(s) (tokens/s)", tokens / t_ref, tokens / t_our, "tok/s"))

    mixed = inputs_for(processor, 8, [1, 2, 3, 4, 1, 2, 3, 4])
    ref_step, ref_trainable = train_step_fn(reference, mixed)
    our_step, our_trainable = train_step_fn(ours, mixed)
    rows.append(("train step, batch 8, 1-4 images (s)", timed(ref_step, args.repeats), timed(our_step, args.repeats), "s"))

    mem_gen = (peak_memory(lambda: generate(reference, big)), peak_memory(lambda: generate(ours, big)))
    mem_train = (peak_memory(ref_step), peak_memory(our_step))
    rows.append(("peak memory, generate batch 8, 4 images (MiB)", *mem_gen, "MiB"))
    rows.append(("peak memory, train step (MiB)", *mem_train, "MiB"))

    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores; parameters: {reference.num_parameters():,} (transformers) / "
        f"{ours.num_parameters():,} (interleaf); trainable: {ref_trainable:,} / {our_trainable:,}; "
        f"identical greedy generations: {'yes' if same else 'NO'}",
        "",
        "| case | transformers IDEFICS | interleaf | interleaf speed-up |",
        "| --- | ---: | ---: | ---: |",
    ]
    for case, ref, our, unit in rows:
        if unit == "tok/s":
            ratio = our / ref
        else:  # seconds and memory: lower is better
            ratio = ref / our if our else float("inf")
        fmt = "{:.1f}" if unit in ("tok/s", "MiB") else "{:.3f}"
        lines.append(f"| {case} | {fmt.format(ref)} | {fmt.format(our)} | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
