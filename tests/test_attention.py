"""The attention dispatch: eager and SDPA agree, the whole model agrees under both, kernels plug in."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny import set_gates

import interleaf
from interleaf.model import attention
from interleaf.model.attention import (
    attend,
    attention_implementation,
    attention_implementations,
    get_attention_implementation,
    register_attention,
    set_attention_implementation,
    unregister_attention,
)

# float32 rounding of a softmax-weighted sum over <= 40 keys is ~1e-7; 1e-6 leaves a 10x margin
TOL = 1e-6


def _qkv(b, h, tq, tk, dh, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, t, dh, generator=g) for t in (tq, tk, tk))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 4), (2, 4, 7, 13, 8), (3, 2, 16, 40, 16), (2, 3, 5, 5, 64)])
def test_eager_equals_sdpa_without_mask(shape):
    q, k, v = _qkv(*shape, seed=sum(shape))
    eager, sdpa = attend(q, k, v, implementation="eager"), attend(q, k, v, implementation="sdpa")
    assert eager.shape == sdpa.shape == q.shape
    assert (eager - sdpa).abs().max().item() < TOL


def test_eager_equals_sdpa_with_the_cross_attention_mask_and_fully_masked_rows():
    b, h, t, n_img, per_image, dh = 3, 2, 9, 3, 4, 8
    q, k, v = _qkv(b, h, t, n_img * per_image, dh, seed=5)
    # the mask GatedCrossAttentionBlock builds: token t sees its image's latents, tokens without
    # an image (-1) see everything
    index = torch.tensor([[-1, -1, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 0], [-1] * 9])
    latent_image = torch.arange(n_img * per_image) // per_image
    mask = ((index[:, :, None] == latent_image) | (index[:, :, None] < 0))[:, None]  # (B, 1, T, N*L)
    eager, sdpa = attend(q, k, v, mask, implementation="eager"), attend(q, k, v, mask, implementation="sdpa")
    assert (eager - sdpa).abs().max().item() < TOL
    # a query that may attend nothing: SDPA gives zeros, and so must the reference
    blocked = mask.clone().expand(b, h, t, n_img * per_image).clone()
    blocked[0, :, 3] = False
    blocked[2, 1, :] = False
    eager, sdpa = attend(q, k, v, blocked, implementation="eager"), attend(q, k, v, blocked, implementation="sdpa")
    assert torch.equal(sdpa[0, :, 3], torch.zeros_like(sdpa[0, :, 3]))
    assert torch.equal(eager[0, :, 3], torch.zeros_like(eager[0, :, 3]))
    assert torch.equal(eager[2, 1], torch.zeros_like(eager[2, 1]))
    assert (eager - sdpa).abs().max().item() < TOL
    # a 2-D mask broadcast over batch and heads
    causal = torch.ones(t, n_img * per_image, dtype=torch.bool).tril()
    eager, sdpa = attend(q, k, v, causal, implementation="eager"), attend(q, k, v, causal, implementation="sdpa")
    assert (eager - sdpa).abs().max().item() < TOL


def test_whole_tiny_model_gives_the_same_logits_under_eager_and_sdpa():
    model, processor = interleaf.build("tiny-random", seed=0)
    set_gates(model, 0.8)  # non-zero gates, so every cross-attention block reaches the logits
    red, blue = Image.new("RGB", (40, 30), (220, 20, 20)), Image.new("RGB", (30, 40), (20, 20, 220))
    inputs = processor([["A photo:", red, "It shows", blue, "and"], ["text only here"], [blue, "a picture"]])
    calls = {"n": 0}

    def counted_eager(q, k, v, mask=None):
        calls["n"] += 1
        return attention.eager_attention(q, k, v, mask)

    register_attention("counted-eager", counted_eager)
    try:
        with torch.no_grad():
            sdpa = model(**inputs).logits
            with attention_implementation("counted-eager"):
                eager = model(**inputs).logits
    finally:
        unregister_attention("counted-eager")
    # every attention of the ViT, the resampler and the cross-attention blocks went through it
    cfg = model.config
    expected = cfg.vision_cfg.layers + cfg.resampler_cfg.depth + len(model.cross_attention_blocks)
    assert calls["n"] == expected
    assert (eager - sdpa).abs().max().item() < TOL
    with torch.no_grad():  # the images do reach the logits (the comparison above is not vacuous)
        dark = model(**{**inputs, "pixel_values": inputs["pixel_values"] * 0}).logits
    assert (dark[0] - sdpa[0]).abs().max().item() > 1e-3


def test_default_context_manager_and_custom_kernel_are_used():
    q, k, v = _qkv(2, 2, 3, 5, 4, seed=1)
    calls = []

    def zeros(q, k, v, mask=None):
        calls.append(q.shape)
        return torch.zeros_like(q)

    assert get_attention_implementation() == "sdpa"
    register_attention("zeros", zeros)
    try:
        assert "zeros" in attention_implementations()
        with pytest.raises(ValueError, match="'zeros' is already registered"):
            register_attention("zeros", zeros)
        with attention_implementation("zeros"):
            assert get_attention_implementation() == "zeros"
            assert torch.equal(attend(q, k, v), torch.zeros_like(q))
            assert not torch.equal(attend(q, k, v, implementation="sdpa"), torch.zeros_like(q))
        assert get_attention_implementation() == "sdpa"
        set_attention_implementation("zeros")
        try:
            assert torch.equal(attend(q, k, v), torch.zeros_like(q))
            with attention_implementation("eager"):  # the block wins over the process default
                assert not torch.equal(attend(q, k, v), torch.zeros_like(q))
        finally:
            set_attention_implementation("sdpa")
        assert len(calls) == 2
    finally:
        unregister_attention("zeros")
    assert "zeros" not in attention_implementations()


def test_unknown_name_and_non_boolean_mask_are_clear_errors():
    q, k, v = _qkv(1, 1, 2, 2, 4, seed=0)
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; registered: eager, sdpa"):
        attend(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'.*register_attention"):
        with attention_implementation("flash"):
            pass
    with pytest.raises(ValueError, match=r"set_attention_implementation: unknown .*registered: eager, sdpa"):
        set_attention_implementation("flash")
    assert get_attention_implementation() == "sdpa"
    with pytest.raises(TypeError, match="mask must be boolean"):
        attend(q, k, v, torch.zeros(2, 2))
