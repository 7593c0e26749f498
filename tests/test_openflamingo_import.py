"""OpenFlamingo checkpoint import: every tensor of a (tiny) checkpoint.pt lands where it should.

The checkpoint is built with OpenFlamingo's names and shapes (``tests/helpers/openflamingo.py``); the converted perceiver and
gated cross-attention are compared with a direct re-implementation of OpenFlamingo's math
(``helpers.py``: PerceiverAttention, MaskedCrossAttention, GatedCrossAttentionBlock).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers.openflamingo import D, DEPTH, DH_P, DH_X, DV, HEADS, LATENTS, LAYERS

import interleaf
from interleaf.convert import from_openflamingo
from interleaf.errors import CheckpointError
from interleaf.model.cross_attention import MediaCache, MediaContext


class Payload:
    """An arbitrary object: unpickling it needs code, which weights_only=True refuses."""


def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)


def of_perceiver(state, x):
    """OpenFlamingo's PerceiverResampler for one frame: x (B, T, v, Dv) -> (B, T, n, Dv)."""
    b, t = x.shape[:2]
    latents = state["perceiver.latents"].expand(b, t, -1, -1)
    for d in range(DEPTH):
        p = f"perceiver.layers.{d}"
        xm, lat = _ln(x, state, f"{p}.0.norm_media"), _ln(latents, state, f"{p}.0.norm_latents")
        q = lat @ state[f"{p}.0.to_q.weight"].T
        k, v = (torch.cat([xm, lat], dim=-2) @ state[f"{p}.0.to_kv.weight"].T).chunk(2, dim=-1)
        q, k, v = (z.unflatten(-1, (HEADS, DH_P)).transpose(2, 3) for z in (q, k, v))  # (B, T, H, n, dh)
        sim = torch.einsum("...id,...jd->...ij", q * DH_P**-0.5, k)
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        out = torch.einsum("...ij,...jd->...id", attn, v).transpose(2, 3).flatten(-2)
        latents = latents + out @ state[f"{p}.0.to_out.weight"].T
        h = F.gelu(_ln(latents, state, f"{p}.1.0") @ state[f"{p}.1.1.weight"].T) @ state[f"{p}.1.3.weight"].T
        latents = latents + h
    return _ln(latents, state, "perceiver.norm")


def of_block(state, prefix, x, media, media_locations):
    """OpenFlamingo's GatedCrossAttentionBlock (only_attend_immediate_media=True)."""
    b, t_txt, _ = x.shape
    t_img, n = media.shape[1:3]
    q = _ln(x, state, f"{prefix}.attn.norm") @ state[f"{prefix}.attn.to_q.weight"].T
    k, v = (media.flatten(1, 2) @ state[f"{prefix}.attn.to_kv.weight"].T).chunk(2, dim=-1)
    q, k, v = (z.unflatten(-1, (HEADS, DH_X)).transpose(1, 2) for z in (q, k, v))  # (B, H, n, dh)
    sim = torch.einsum("bhid,bhjd->bhij", q * DH_X**-0.5, k)
    text_time = media_locations.cumsum(-1)  # (B, T)
    media_time = (torch.arange(t_img) + 1).repeat_interleave(n)  # (T_img * n,)
    mask = text_time[:, None, :, None] == media_time[None, None, None, :]
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).flatten(2) @ state[f"{prefix}.attn.to_out.weight"].T
    x = out * state[f"{prefix}.attn_gate"].tanh() + x
    ff = F.gelu(_ln(x, state, f"{prefix}.ff.0") @ state[f"{prefix}.ff.1.weight"].T) @ state[f"{prefix}.ff.3.weight"].T
    return ff * state[f"{prefix}.ff_gate"].tanh() + x


@pytest.fixture(scope="module")
def pieces(openflamingo_pieces):
    """(a directory with lm/, clip/ and checkpoint.pt, read-only; the checkpoint's state; the base vocabulary)."""
    return openflamingo_pieces


@pytest.fixture(scope="module")
def converted(pieces, tmp_path_factory):
    root, state, base = pieces
    out = tmp_path_factory.mktemp("of-converted")
    from_openflamingo(root / "checkpoint.pt", root / "lm", root / "clip", out, cross_attn_every_n_layers=2)
    model, processor = interleaf.load(out)
    return model, processor, state, base


def test_tokens_follow_openflamingo_order_and_embedding_rows_land(converted):
    model, processor, state, base = converted
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|endofchunk|>") == base and tok.convert_tokens_to_ids("<image>") == base + 1
    assert model.config.tokens_cfg.image_token_id == base + 1
    emb = model.get_input_embeddings()
    full = state["lang_encoder.model.embed_tokens.weight"]
    ids = torch.tensor([[0, 5, base - 1, base, base + 1]])
    torch.testing.assert_close(emb(ids)[0], full[ids[0]], rtol=0, atol=0)
    # Untied head, not in checkpoint.pt: the added rows are the resized LM's, as OpenFlamingo ran with
    # (this LM has no spare rows, so transformers' resize initialised them near the other rows' mean).
    head = model.get_output_embeddings()
    torch.testing.assert_close(head.extra, head.weight[:base].mean(0).expand(2, D), atol=1e-3, rtol=0)
    assert not torch.equal(head.extra, torch.zeros(2, D))


def test_added_head_rows_zeros_leaves_the_untied_heads_added_rows_at_zero(pieces, tmp_path):
    root, _, _ = pieces
    out = from_openflamingo(root / "checkpoint.pt", root / "lm", root / "clip", tmp_path / "out",
                            cross_attn_every_n_layers=2, added_head_rows="zeros")
    model, _ = interleaf.load(out)
    assert torch.equal(model.get_output_embeddings().extra, torch.zeros(2, D))  # untied head: not in checkpoint.pt


def test_perceiver_matches_openflamingo_math(converted):
    model, _, state, _ = converted
    x = torch.randn(2, 3, 7, DV)
    with torch.no_grad():
        ours = model.resampler(x)
    torch.testing.assert_close(ours, of_perceiver(state, x), atol=1e-5, rtol=1e-5)


def test_cross_attention_blocks_match_openflamingo_math(converted):
    model, _, state, _ = converted
    blocks = model.cross_attention_blocks
    assert [b for b, _ in enumerate(blocks)] == [0, 1] and model.config.xattn_cfg.layer_indices(LAYERS) == [1, 3]
    x = torch.randn(2, 6, D)
    media = torch.randn(2, 2, LATENTS, DV)
    locations = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)  # row 1 sees one image
    num_images = locations.sum(-1)
    index = torch.minimum(locations.long().cumsum(-1) - 1, (num_images - 1)[:, None])
    for block_index, layer in enumerate([1, 3]):
        block = blocks[block_index]
        with torch.no_grad():
            cache = MediaCache(latents=media, num_images=num_images, kv=[block.project_media(media)] * 2)
            ctx = MediaContext(cache=cache, image_index=index, row_index=None, sees_image=(index >= 0)[..., None].float())
            ours = block(x, ctx, block_index)
        ref = of_block(state, f"lang_encoder.model.layers.{layer}.gated_cross_attn_layer", x, media, locations)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_converted_model_sees_its_images_only_after_them(converted):
    from PIL import Image

    model, processor, _, _ = converted
    logits = []
    for colour in ((200, 10, 10), (10, 10, 200)):
        inputs = processor([["A red", Image.new("RGB", (20, 16), colour), "photo of"]])
        with torch.no_grad():
            logits.append(model(**inputs).logits[0])
    image_at = int((inputs["input_ids"][0] == model.image_token_id).nonzero())
    assert torch.equal(logits[0][:image_at], logits[1][:image_at])
    assert not torch.allclose(logits[0][image_at:], logits[1][image_at:])
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_unexpected_keys_are_listed(pieces, tmp_path, change):
    root, state, _ = pieces
    broken = dict(state)
    if change == "missing":
        del broken["lang_encoder.model.layers.3.gated_cross_attn_layer.ff.3.weight"]
        key = "lang_encoder.model.layers.3.gated_cross_attn_layer.ff.3.weight"
    else:
        broken["perceiver.media_time_embs"] = torch.zeros(4, 1, DV)
        key = "perceiver.media_time_embs"
    torch.save(broken, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        from_openflamingo(tmp_path / "checkpoint.pt", root / "lm", root / "clip", tmp_path / "out", cross_attn_every_n_layers=2)


def test_wrong_cross_attention_interval_is_explained(pieces, tmp_path):
    root, _, _ = pieces
    with pytest.raises(CheckpointError, match=r"cross_attn_every_n_layers=1 places them before \[0, 1, 2, 3\]"):
        from_openflamingo(root / "checkpoint.pt", root / "lm", root / "clip", tmp_path / "out", cross_attn_every_n_layers=1)


def test_pickles_with_code_are_refused(pieces, tmp_path):
    root, _, _ = pieces
    torch.save({"perceiver.latents": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        from_openflamingo(tmp_path / "checkpoint.pt", root / "lm", root / "clip", tmp_path / "out")


@pytest.mark.skipif(
    importlib.util.find_spec("open_flamingo") is None,
    reason="the open-flamingo package is not installed (its dependencies open_clip and einops_exts need the network)",
)
def test_against_the_open_flamingo_package(pieces, converted):  # pragma: no cover - needs open_flamingo
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    model, _, state, _ = converted
    perceiver = PerceiverResampler(dim=DV, depth=DEPTH, dim_head=DH_P, heads=HEADS, num_latents=LATENTS)
    perceiver.load_state_dict({k.removeprefix("perceiver."): v for k, v in state.items() if k.startswith("perceiver.")})
    x = torch.randn(2, 3, 1, 7, DV)
    with torch.no_grad():
        torch.testing.assert_close(model.resampler(x[:, :, 0]), perceiver(x), atol=1e-5, rtol=1e-5)
    block = GatedCrossAttentionBlock(dim=D, dim_visual=DV, dim_head=DH_X, heads=HEADS)
    prefix = "lang_encoder.model.layers.1.gated_cross_attn_layer."
    block.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    xt, media = torch.randn(2, 6, D), torch.randn(2, 2, LATENTS, DV)
    loc = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            block(xt, media, media_locations=loc), of_block(state, prefix.rstrip("."), xt, media, loc), atol=1e-5, rtol=1e-5
        )
