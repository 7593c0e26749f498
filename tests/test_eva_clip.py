"""EVA-CLIP towers: one block against a computation written out here, both styles; the tower's
position embeddings, files and use with an LM. Parity with InfiMM's own code on its fixtures is in
test_convert_infimm.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import interleaf
from interleaf.config import VisionConfig
from interleaf.errors import CheckpointError, ConfigError
from interleaf.model.attention import attention_implementation
from interleaf.model.eva_clip import EvaVisionTransformer, eva_vision_config, load_eva_clip, rope_tables, save_eva_clip
from interleaf.model.vision import VisionTower, load_vision_tower

EVA02 = dict(image_size=28, patch_size=14, width=16, layers=2, head_width=8, mlp_ratio=2.5, rope=True,
             pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True, embed_dim=12)
EVA4B = dict(image_size=28, patch_size=14, width=16, layers=2, head_width=8, mlp_ratio=3.0, postnorm=True,
             embed_dim=12)


def _randomised(tower: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (norms around 1), so that no term of the computation hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = name.endswith(".weight") and any(n in name for n in ("norm", "_ln"))
            p.copy_(1 + 0.1 * noise if is_norm else noise / math.sqrt(p.shape[-1]))
    return tower.eval()


def _layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _rotate_by_hand(x: torch.Tensor, grid: int, pt: int) -> torch.Tensor:
    """2D rotary embedding of the patch tokens of ``x`` (B, H, 1 + g*g, Dh), one channel pair at a time."""
    out = x.clone()
    dh = x.shape[-1]
    half = dh // 2  # channels [0, half) follow the row, [half, dh) the column
    for token in range(grid * grid):
        row, col = divmod(token, grid)
        for block, pos in ((0, row), (1, col)):
            for pair in range(half // 2):
                theta = 1.0 / 10000 ** (2 * pair / half)
                angle = (pos / grid * pt) * theta
                a, b = block * half + 2 * pair, block * half + 2 * pair + 1
                xa, xb = x[..., 1 + token, a], x[..., 1 + token, b]
                out[..., 1 + token, a] = xa * math.cos(angle) - xb * math.sin(angle)
                out[..., 1 + token, b] = xb * math.cos(angle) + xa * math.sin(angle)
    return out


def _attention_by_hand(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def _heads(t, h):
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _eva02_block_by_hand(sd: dict, x: torch.Tensor, heads: int, grid: int, pt: int) -> torch.Tensor:
    """Pre-norm, separate q/k/v (bias on q and v), rotary on patch tokens, sub-LN, SwiGLU with its LN."""
    h = _layer_norm(x, sd["norm1.weight"], sd["norm1.bias"])
    q = _heads(h @ sd["attn.q_proj.weight"].T + sd["attn.q_bias"], heads)
    k = _heads(h @ sd["attn.k_proj.weight"].T, heads)
    v = _heads(h @ sd["attn.v_proj.weight"].T + sd["attn.v_bias"], heads)
    q, k = _rotate_by_hand(q, grid, pt), _rotate_by_hand(k, grid, pt)
    a = _merge(_attention_by_hand(q, k, v))
    a = _layer_norm(a, sd["attn.inner_attn_ln.weight"], sd["attn.inner_attn_ln.bias"])
    x = x + a @ sd["attn.proj.weight"].T + sd["attn.proj.bias"]
    h = _layer_norm(x, sd["norm2.weight"], sd["norm2.bias"])
    gate = h @ sd["mlp.w1.weight"].T + sd["mlp.w1.bias"]
    up = h @ sd["mlp.w2.weight"].T + sd["mlp.w2.bias"]
    hidden = gate * torch.sigmoid(gate) * up
    hidden = _layer_norm(hidden, sd["mlp.ffn_ln.weight"], sd["mlp.ffn_ln.bias"])
    return x + hidden @ sd["mlp.w3.weight"].T + sd["mlp.w3.bias"]


def _eva4b_block_by_hand(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Post-norm, fused qkv with bias (q_bias, 0, v_bias), no rotary, fc1 -> GELU -> fc2."""
    width = x.shape[-1]
    w = sd["attn.qkv.weight"]
    q = _heads(x @ w[:width].T + sd["attn.q_bias"], heads)
    k = _heads(x @ w[width:2 * width].T, heads)
    v = _heads(x @ w[2 * width:].T + sd["attn.v_bias"], heads)
    a = _merge(_attention_by_hand(q, k, v)) @ sd["attn.proj.weight"].T + sd["attn.proj.bias"]
    x = x + _layer_norm(a, sd["norm1.weight"], sd["norm1.bias"])
    h = x @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    m = h @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"]
    return x + _layer_norm(m, sd["norm2.weight"], sd["norm2.bias"])


@pytest.mark.parametrize("style", ["eva02", "eva4b"])
def test_one_block_matches_a_computation_by_hand(style):
    visual = EVA02 if style == "eva02" else EVA4B
    tower = _randomised(EvaVisionTransformer(eva_vision_config(visual)))
    block = tower.blocks[0]
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))  # CLS + a 2x2 patch grid
    sd = {k: v for k, v in block.state_dict().items()}
    if style == "eva02":
        rope = rope_tables(8, 2, 16, True)
        expected = _eva02_block_by_hand(sd, x, heads=2, grid=2, pt=16)
    else:
        rope = None
        expected = _eva4b_block_by_hand(sd, x, heads=2)
    with torch.no_grad(), attention_implementation("eager"):
        got = block(x, rope)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["eva02", "eva4b"])
def test_tower_features_are_the_last_block_with_cls_and_no_final_norm(style):
    visual = EVA02 if style == "eva02" else EVA4B
    cfg = eva_vision_config(visual)
    tower = _randomised(EvaVisionTransformer(cfg))
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        x = F.conv2d(pixels, tower.patch_embed.proj.weight, tower.patch_embed.proj.bias, stride=14)
        x = torch.cat([tower.cls_token.expand(3, -1, -1), x.flatten(2).transpose(1, 2)], 1) + tower.pos_embed
        tables = rope_tables(8, 2, 16, True) if style == "eva02" else None
        for block in tower.blocks:
            x = block(x, tables)
        got = tower(pixels)
    assert got.shape == (3, 5, 16) and cfg.num_tokens == 5
    torch.testing.assert_close(got, x)
    wrapped = VisionTower(cfg, tower)
    assert wrapped.out_dim == 16 and wrapped.num_tokens == 5
    # the final norm and the CLIP head are held (released checkpoints load whole) but unused
    unused = {id(p) for p in tower.unused_parameters()}
    assert {id(p) for p in [*tower.norm.parameters(), *tower.head.parameters()]} <= unused


def test_position_embeddings_are_interpolated_at_another_image_size():
    cfg = eva_vision_config({**EVA4B, "image_size": 42, "trained_image_size": 28})
    tower = EvaVisionTransformer(cfg)
    assert tower.pos_embed.shape == (1, 5, 16) and cfg.num_tokens == 10
    with torch.no_grad():
        tower.pos_embed[:, 1:] = 0.25  # a constant field stays constant under bicubic resizing
        tower.pos_embed[:, 0] = 3.0
    pe = tower.position_embeddings()
    assert pe.shape == (1, 10, 16)
    torch.testing.assert_close(pe[:, 0], torch.full((1, 16), 3.0))
    torch.testing.assert_close(pe[:, 1:], torch.full((1, 9, 16), 0.25))
    same = EvaVisionTransformer(eva_vision_config(EVA4B))
    assert same.position_embeddings() is same.pos_embed
    assert tower(torch.randn(1, 3, 42, 42)).shape == (1, 10, 16)


def test_saved_tower_loads_alone_and_serves_any_lm(tmp_path):
    cfg = eva_vision_config(EVA02)
    tower = _randomised(EvaVisionTransformer(cfg))
    save_eva_clip(tower, cfg, tmp_path / "eva")
    loaded_cfg, loaded = load_vision_tower(tmp_path / "eva")
    assert loaded_cfg.kind == "eva_clip" and loaded_cfg.eva == cfg.eva
    pixels = torch.randn(1, 2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels)[0], tower(pixels[0]))
    lm = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)
    model, processor = interleaf.build(vision=tmp_path / "eva", lm=lm, tokenizer="tiny",
                                       resampler=dict(depth=1, num_latents=4, heads=2, head_dim=8))
    assert model.config.vision_cfg.kind == "eva_clip"
    with torch.no_grad():
        torch.testing.assert_close(model.vision_tower(pixels)[0], tower(pixels[0]))
    ids = torch.tensor([[1, model.image_token_id, 5, 6]])
    assert model(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 28, 28)).logits.shape[:2] == (1, 4)


def test_bad_configs_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="vision.eva"):
        VisionConfig(kind="clip", hf_config={}, eva={})
    with pytest.raises(ConfigError, match="multiple of 4"):
        eva_vision_config({**EVA02, "head_width": 6, "width": 18})
    with pytest.raises(ConfigError, match="visual.ls_init_value"):
        eva_vision_config({**EVA02, "ls_init_value": 0.1})
    with pytest.raises(ConfigError, match="head_width"):
        eva_vision_config({**EVA02, "head_width": 5})
    cfg = eva_vision_config(EVA4B)
    save_eva_clip(EvaVisionTransformer(cfg), cfg, tmp_path / "eva")
    (tmp_path / "eva" / "config.json").write_text(
        (tmp_path / "eva" / "config.json").read_text().replace('"layers": 2', '"layers": 3'))
    with pytest.raises(CheckpointError, match="missing"):
        load_eva_clip(tmp_path / "eva")
