"""A tiny OpenFlamingo checkpoint with OpenFlamingo's names and shapes, and the pieces it is converted
with (a tiny LLaMA with the tiny tokenizer, a tiny CLIP vision tower); and the reference fixtures
``openflamingo-*`` (found, their output variants read, converted)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.fixtures import config, fixture_dirs
from tiny import tiny_clip, tiny_lm

from interleaf.convert import from_openflamingo
from interleaf.processing import build_tiny_tokenizer

D, DV, HEADS, DH_X, DH_P, LAYERS, DEPTH, LATENTS = 32, 16, 8, 4, 2, 4, 2, 3


def of_checkpoint(vocab_rows: int, every: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = {"perceiver.latents": r(LATENTS, DV, scale=1.0)}
    for d in range(DEPTH):
        p = f"perceiver.layers.{d}"
        for ln in ("0.norm_media", "0.norm_latents", "1.0"):
            state[f"{p}.{ln}.weight"], state[f"{p}.{ln}.bias"] = 1 + r(DV, scale=0.1), r(DV, scale=0.1)
        state[f"{p}.0.to_q.weight"] = r(HEADS * DH_P, DV)
        state[f"{p}.0.to_kv.weight"] = r(2 * HEADS * DH_P, DV)
        state[f"{p}.0.to_out.weight"] = r(DV, HEADS * DH_P)
        state[f"{p}.1.1.weight"], state[f"{p}.1.3.weight"] = r(4 * DV, DV), r(DV, 4 * DV)
    state["perceiver.norm.weight"], state["perceiver.norm.bias"] = 1 + r(DV, scale=0.1), r(DV, scale=0.1)
    for i in range(LAYERS):
        if (i + 1) % every:
            continue
        p = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer"
        state[f"{p}.attn_gate"], state[f"{p}.ff_gate"] = r(1, scale=1.0), r(1, scale=1.0)
        for ln in ("attn.norm", "ff.0"):
            state[f"{p}.{ln}.weight"], state[f"{p}.{ln}.bias"] = 1 + r(D, scale=0.1), r(D, scale=0.1)
        state[f"{p}.attn.to_q.weight"] = r(HEADS * DH_X, D)
        state[f"{p}.attn.to_kv.weight"] = r(2 * HEADS * DH_X, DV)
        state[f"{p}.attn.to_out.weight"] = r(D, HEADS * DH_X)
        state[f"{p}.ff.1.weight"], state[f"{p}.ff.3.weight"] = r(4 * D, D), r(D, 4 * D)
    state["lang_encoder.model.embed_tokens.weight"] = r(vocab_rows, D, scale=0.05)
    return state


def write_pieces(root: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Write ``root/lm`` (LLaMA and tokenizer), ``root/clip`` and ``root/checkpoint.pt``;
    returns (the checkpoint's state dict, the tokenizer's base vocabulary size)."""
    tok = build_tiny_tokenizer()
    base = len(tok)
    lm = tiny_lm("llama", seed=0, vocab_size=base, hidden_size=D, num_hidden_layers=LAYERS, num_key_value_heads=4,
                 max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    tiny_clip(hidden_size=DV, intermediate_size=32, image_size=16, patch_size=4).save_pretrained(root / "clip")
    state = of_checkpoint(base + 2, every=2)  # <|endofchunk|>, <image>; the tiny tokenizer has a pad token
    torch.save(state, root / "checkpoint.pt")
    return state, base


# --------------------------------------------------------------------------------------------
# The reference fixtures openflamingo-* (numbers from OpenFlamingo's own code)
# --------------------------------------------------------------------------------------------

FIXTURE_FILES = ("checkpoint.pt", "config.json", "inputs.safetensors", "outputs.safetensors", "lm/config.json",
                 "vision/open_clip_config.json")
LN_POST_SINCE = (2, 23)  # open_clip passes the patch tokens through ln_post from this version on


def of_fixture_dirs() -> list[Path]:
    """Every ``openflamingo-*`` fixture folder (fails when there is none)."""
    return fixture_dirs("openflamingo-", has=FIXTURE_FILES)


def output_variants(folder: Path, outputs: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Suffix of each set of reference outputs ("" or e.g. "_open_clip_3_3_0") -> whether the open_clip
    version that produced it (the fixture's config.json) applies ln_post to the patch tokens."""
    reference = config(folder)["reference"]
    variants = {}
    for name in outputs:
        if name.startswith("logits"):
            suffix = name.removeprefix("logits")
            version = reference[f"open_clip_version_for_outputs{suffix}"]
            variants[suffix] = tuple(int(p) for p in version.split(".")[:2]) >= LN_POST_SINCE
    return variants


def convert_fixture(folder: Path, dst: Path, checkpoint: str | Path = "checkpoint.pt", **options) -> Path:
    """``from_openflamingo`` on a fixture folder's pieces (``lm/``, ``vision/``, a checkpoint)."""
    every = config(folder)["cross_attn_every_n_layers"]
    return from_openflamingo(folder / checkpoint, folder / "lm", folder / "vision", dst,
                             cross_attn_every_n_layers=every, **options)
