"""Perceiver resampler: shapes, per-image independence, parity with transformers' IDEFICS."""

from __future__ import annotations

import pytest
import torch
from transformers import IdeficsConfig
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from interleaf.config import ResamplerConfig
from interleaf.errors import InputError
from interleaf.model.resampler import PerceiverResampler, idefics_perceiver_key_map


def small(**kw) -> ResamplerConfig:
    return ResamplerConfig(**{"depth": 2, "num_latents": 5, "heads": 2, "head_dim": 8, "ff_mult": 2, **kw})


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_shapes(qk_norm, activation):
    resampler = PerceiverResampler(small(qk_norm=qk_norm, activation=activation), dim=24)
    out = resampler(torch.randn(3, 2, 7, 24))
    assert out.shape == (3, 2, 5, 24)
    assert torch.isfinite(out).all()
    params = dict(resampler.named_parameters())
    assert params["latents"].shape == (5, 24)
    assert params["layers.0.ff.fc1.weight"].shape == (48, 24)
    assert ("layers.1.attn.q_norm.weight" in params) == qk_norm
    assert not any(name.endswith("proj.bias") or name.endswith("fc1.bias") for name in params)


def test_images_are_resampled_independently():
    torch.manual_seed(0)
    resampler = PerceiverResampler(small(qk_norm=True), dim=16)
    media = torch.randn(2, 3, 6, 16)
    out = resampler(media)
    changed = media.clone()
    changed[1, 1] = torch.randn(6, 16)
    out2 = resampler(changed)
    for b in range(2):
        for n in range(3):
            same = torch.allclose(out[b, n], out2[b, n], atol=1e-6)
            assert same == ((b, n) != (1, 1)), (b, n)
    # One image alone gives the same latents as inside a batch.
    torch.testing.assert_close(resampler(media[1:2, 2:3])[0, 0], out[1, 2], rtol=0, atol=1e-6)


def test_gradients_reach_every_parameter():
    resampler = PerceiverResampler(small(qk_norm=True), dim=16)
    resampler(torch.randn(1, 2, 4, 16)).pow(2).sum().backward()
    missing = [n for n, p in resampler.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bad_input_shape():
    resampler = PerceiverResampler(small(), dim=16)
    with pytest.raises(InputError, match=r"\(batch, images, tokens, 16\)"):
        resampler(torch.randn(2, 6, 16))
    with pytest.raises(InputError, match="got \\(1, 1, 6, 8\\)"):
        resampler(torch.randn(1, 1, 6, 8))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_parity_with_idefics(qk_norm):
    dim, depth = 32, 2
    config = IdeficsConfig(
        vision_config={"embed_dim": dim, "image_size": 16, "patch_size": 4, "num_hidden_layers": 1,
                       "num_attention_heads": 4, "intermediate_size": 64},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 6, "resampler_depth": depth,
                          "resampler_n_heads": 4, "resampler_head_dim": 8, "qk_layer_norms_perceiver": qk_norm},
    )
    torch.manual_seed(0)
    reference = IdeficsPerceiverResampler(config, dim, depth, 4, 8, 6).eval()
    with torch.no_grad():  # make every norm non-trivial so a wrong mapping shows
        for name, p in reference.named_parameters():
            if "norm" in name or "ln" in name.split("."):
                p.add_(0.3 * torch.randn_like(p))
    ours = PerceiverResampler(
        ResamplerConfig(depth=depth, num_latents=6, heads=4, head_dim=8, ff_mult=4, qk_norm=qk_norm, activation="relu"),
        dim=dim,
    ).eval()
    key_map = idefics_perceiver_key_map(depth)
    state = {key_map[k]: v for k, v in reference.state_dict().items()}
    ours.load_state_dict(state, strict=True)  # every one of our parameters is covered

    media = torch.randn(3, 2, 10, dim)
    with torch.no_grad():
        expected = reference(media.flatten(0, 1)).view(3, 2, 6, dim)
        got = ours(media)
    # Within 1e-6 (plus 1e-6 relative: the outputs are LayerNorm-ed, of order 1, and our
    # scaled_dot_product_attention rounds differently from IDEFICS' einsum softmax).
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_key_map_with_prefix():
    key_map = idefics_perceiver_key_map(1, prefix="model.perceiver_resampler.")
    assert key_map["model.perceiver_resampler.blocks.0.0.output_proj.weight"] == "layers.0.attn.out_proj.weight"
    assert key_map["model.perceiver_resampler.blocks.0.1.c_proj.weight"] == "layers.0.ff.fc2.weight"
    assert key_map["model.perceiver_resampler.layer_norm.bias"] == "norm.bias"
