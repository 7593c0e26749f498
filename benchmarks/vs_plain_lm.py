"""interleaf's decoding against the plain LM it wraps: the bound any VLM built on that LM can reach.

    python benchmarks/vs_plain_lm.py [--size smoke|tiny|mid] [--threads N] [--repeats R]
        [--new-tokens T] [--results [DIR]]

- cross-attention: a random LLaMA (``SIZES``; mid: 1024 wide x 12 layers, a 32,000-token
  vocabulary, about 220 M parameters) is copied into an interleaf model with a gated
  cross-attention block before every 4th layer (each block about one decoder layer's weights, so
  the blocks add a quarter of the LM's) and the gates open (1.0), one image per row;
- token insertion: a random ``LlavaForConditionalGeneration`` at the same LM size converted with
  ``from_llava``; its plain LM is the converted model's own ``language_model`` run on a text
  prompt of the same length (the image's positions included), so the KV caches are the same size.

Decoding rate: ``batch x (T - 1) / (t(T new tokens) - t(1 new token))`` with greedy, length-forced
``generate``: the prompt (and the image encoding) cancels out. Before timing, each interleaf model
on a text-only prompt (cross-attention: gates closed too) is checked to produce the plain LM's
greedy tokens, which shows both hold the same LM weights.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import Row  # noqa: E402
from vs_transformers import SIZES as VLM_SIZES  # noqa: E402
from vs_transformers import build_llava  # noqa: E402

from interleaf.config import InterleafConfig  # noqa: E402
from interleaf.model import InterleafForConditionalGeneration  # noqa: E402

VOCAB = {"smoke": 128, "tiny": 32000, "mid": 32000}
PROMPT = 32  # text tokens after the image
TARGET = 0.8  # interleaf's decoding / the plain LM's, cross-attention every 4 layers


def cross_attention_pair(size: str, gates: float):
    """(interleaf model with blocks every 4 layers, the plain LLaMA it wraps as a separate copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = VLM_SIZES[size]["lm"]
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB[size], max_position_embeddings=1024,
                                         initializer_range=0.2 if size == "smoke" else 0.02, **lm)).eval()
    config = InterleafConfig(
        text_config=plain.config,
        vision=dict(kind="builtin", image_size=32, patch_size=8, width=64, layers=1, heads=4),
        resampler=dict(depth=1, num_latents=64, heads=4, head_dim=32),
        cross_attention=dict(every_n_layers=4),
        tokens=dict(extra_start=VOCAB[size], num_extra=2, image_token_id=VOCAB[size]),
    )
    torch.manual_seed(1)
    ours = InterleafForConditionalGeneration(config, language_model=copy.deepcopy(plain)).eval()
    with torch.no_grad():
        for block in ours.cross_attention_blocks:
            block.attn_gate.fill_(gates)
            block.ffn_gate.fill_(gates)
    return ours, plain


def greedy(model, new_tokens: int, **inputs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)


def decode_rate(fn, batch: int, new_tokens: int, repeats: int) -> float:
    """New tokens per second of decoding alone: the prefill (one new token) subtracted."""
    full = benchlib.timed(lambda: fn(new_tokens), repeats)
    first = benchlib.timed(lambda: fn(1), repeats)
    return batch * (new_tokens - 1) / max(full - first, 1e-9)


def decode_rows(ours, plain, text, with_image, pixels, new_tokens: int, repeats: int, label: str,
                target: float | None = None) -> list[Row]:
    """At batch 1 and 8: the plain LM decoding ``text`` against interleaf decoding ``with_image`` (the same
    prompt length, with its image); ``label`` names a row, ``{batch}`` in it the batch."""
    rows = []
    for batch in (1, 8):
        ids, px = with_image[:batch], pixels[:batch]
        with torch.no_grad():
            r_plain = decode_rate(lambda n: greedy(plain, n, input_ids=text[:batch]), batch, new_tokens, repeats)
            r_ours = decode_rate(lambda n: greedy(ours, n, input_ids=ids, pixel_values=px), batch, new_tokens, repeats)
        rows.append(Row(label.format(batch=batch), r_plain, r_ours, "decode tokens/s", True, target))
    return rows


def cross_attention_rows(size: str, repeats: int, new_tokens: int) -> tuple[list[Row], list[str], str]:
    g = torch.Generator().manual_seed(0)
    vocab = VOCAB[size]
    closed, plain = cross_attention_pair(size, gates=0.0)
    text = torch.randint(3, vocab, (8, PROMPT + 1), generator=g)
    with_image = text.clone()
    with_image[:, 0] = vocab  # <image> first: every token attends to it
    pixels = torch.randn(8, 1, 3, 32, 32, generator=g)
    mismatches = []
    with torch.no_grad():
        if not torch.equal(greedy(closed, 8, input_ids=text[:2]), greedy(plain, 8, input_ids=text[:2])):
            mismatches.append("cross-attention, gates closed")
    del closed
    ours, plain = cross_attention_pair(size, gates=1.0)
    rows = decode_rows(ours, plain, text, with_image, pixels, new_tokens, repeats,
                       "cross-attention every 4 layers, gates open, batch {batch}", TARGET)
    n_plain, n_ours = plain.num_parameters(), ours.num_parameters()
    note = (f"cross-attention: plain LM {n_plain:,} parameters, interleaf {n_ours:,} "
            f"({100 * (n_ours - n_plain) / n_plain:.0f} % more: blocks, vision tower, resampler)")
    return rows, mismatches, note


def token_insertion_rows(size: str, repeats: int, new_tokens: int) -> tuple[list[Row], list[str], str]:
    with tempfile.TemporaryDirectory() as tmp:
        reference, ours, processor = build_llava(VLM_SIZES[size], Path(tmp))
    del reference
    plain = ours.language_model  # the same module: the same weights by construction
    per_image = ours.config.tokens_cfg.image_seq_length
    g = torch.Generator().manual_seed(0)
    vocab = processor.tokenizer.convert_tokens_to_ids("<image>")  # text ids below the added token
    text = torch.randint(3, vocab, (8, PROMPT + per_image), generator=g)
    with_image = text.clone()
    with_image[:, 1:1 + per_image] = ours.image_token_id
    side = ours.config.vision_cfg.image_size
    pixels = torch.randn(8, 1, 3, side, side, generator=g)
    mismatches = []
    with torch.no_grad():
        if not torch.equal(greedy(ours, 8, input_ids=text[:2]), greedy(plain, 8, input_ids=text[:2])):
            mismatches.append("token insertion, text only")
    rows = decode_rows(ours, plain, text, with_image, pixels, new_tokens, repeats,
                       f"token insertion, 1 image ({per_image} positions), batch {{batch}}")
    note = f"token insertion: LM {plain.num_parameters():,} parameters, {PROMPT + per_image} prompt positions"
    return rows, mismatches, note


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.size_arguments(parser, VLM_SIZES)
    args = benchlib.parse_size_arguments(parser, argv)
    with benchlib.quiet():
        torch.set_num_threads(args.threads)
        new_tokens = args.new_tokens or VLM_SIZES[args.size]["new_tokens"]
        rows_x, bad_x, note_x = cross_attention_rows(args.size, args.repeats, new_tokens)
        rows_t, bad_t, note_t = token_insertion_rows(args.size, args.repeats, new_tokens)
        mismatches = bad_x + bad_t
        lines = benchlib.header(f"interleaf decoding vs the plain LM it wraps, {args.size} size", args.threads, argv,
                                "vs_plain_lm.py")
        lines += [
            f"{note_x}; {note_t}; {new_tokens} new tokens, {PROMPT} text tokens after the image; median of "
            f"{args.repeats} after a warm-up; plain LM's greedy tokens where the image cannot matter: "
            + ("identical" if not mismatches else "DIFFERENT (" + "; ".join(mismatches) + ")"),
            "",
            *benchlib.table(rows_x + rows_t, "plain LM"),
        ]
        text = benchlib.emit(lines, args.results)
        return dict(rows=rows_x + rows_t, mismatches=mismatches, text=text)


if __name__ == "__main__":
    main()
