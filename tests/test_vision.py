"""Vision towers: the built-in ViT, CLIP / SigLIP adapters, loading, input checks, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tiny
from PIL import Image, ImageDraw
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from interleaf.config import VisionConfig
from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.model.vision import BuiltinViT, HFVisionAdapter, VisionTower, build_vision_tower, load_vision_tower

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def tiny_clip() -> CLIPVisionModel:
    return tiny.tiny_clip(seed=0, **TINY).eval()


def tiny_siglip() -> SiglipVisionModel:
    torch.manual_seed(0)
    return SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()


def clip_cfg(model, **kw) -> VisionConfig:
    return VisionConfig(kind="clip", hf_config=model.config.to_dict(), **kw)


def siglip_cfg(model, **kw) -> VisionConfig:
    return VisionConfig(kind="siglip", hf_config=model.config.to_dict(), **kw)


# -- built-in ViT --------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_stem", [False, True])
@pytest.mark.parametrize("patch_size", [4, 8])
def test_builtin_shapes(conv_stem, patch_size):
    cfg = VisionConfig(image_size=32, patch_size=patch_size, width=48, layers=2, heads=4, conv_stem=conv_stem)
    tower = build_vision_tower(cfg)
    assert isinstance(tower.backbone, BuiltinViT)
    assert tower.out_dim == 48 and tower.num_tokens == (32 // patch_size) ** 2
    out = tower(torch.randn(2, 3, 3, 32, 32))
    assert out.shape == (2, 3, (32 // patch_size) ** 2, 48)
    assert torch.isfinite(out).all()


def test_builtin_images_are_independent_and_positions_matter():
    tower = build_vision_tower(VisionConfig(conv_stem=True)).eval()
    x = torch.randn(2, 2, 3, 32, 32)
    out = tower(x)
    x2 = x.clone()
    x2[1, 0] = torch.randn(3, 32, 32)
    out2 = tower(x2)
    assert torch.equal(out[0], out2[0]) and torch.allclose(out[1, 1], out2[1, 1], atol=1e-6)
    assert not torch.allclose(out[1, 0], out2[1, 0])
    # Learned position embeddings: the same patch content at two places gives different features.
    flat = torch.zeros(1, 1, 3, 32, 32)
    feats = tower(flat)[0, 0]
    assert not torch.allclose(feats[0], feats[-1])


def _shapes(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 32 px images of a filled square (label 0) or circle (label 1), random size, place, colour."""
    images, labels = [], []
    for i in range(n):
        label = i % 2
        img = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 80, 3)))
        draw = ImageDraw.Draw(img)
        side = int(rng.integers(12, 22))
        x0, y0 = (int(v) for v in rng.integers(0, 32 - side, 2))
        box = [x0, y0, x0 + side - 1, y0 + side - 1]
        colour = tuple(int(c) for c in rng.integers(150, 256, 3))
        (draw.rectangle if label == 0 else draw.ellipse)(box, fill=colour)
        images.append(np.asarray(img))
        labels.append(label)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, 32, 32)
    return x, torch.tensor(labels)


@pytest.mark.slow
def test_builtin_learns_shapes_quickly():
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y = _shapes(256, rng)
    x_held, y_held = _shapes(256, rng)
    cfg = VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, conv_stem=True)
    vit = BuiltinViT(cfg)

    def probe() -> tuple[float, float]:
        with torch.no_grad():
            feats, feats_held = vit(x).mean(1).numpy(), vit(x_held).mean(1).numpy()
        clf = LogisticRegression(max_iter=2000).fit(feats, y.numpy())
        return clf.score(feats, y.numpy()), clf.score(feats_held, y_held.numpy())

    train_before, _ = probe()
    head = torch.nn.Linear(64, 2)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.0)
    for _ in range(60):
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.cross_entropy(head(vit(x[idx]).mean(1)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_after, held_after = probe()
    # Seeded (torch and numpy seed 0): measured train 0.953, held-out 0.848, before training 0.754.
    # Over seeds 0-4: train 0.953-1.000, held-out 0.848-0.969, gain 0.20-0.28. Asserts 0.9, 0.75, 0.1.
    assert train_after > 0.9, (train_before, train_after, held_after)
    assert held_after > 0.75, (train_before, train_after, held_after)
    assert train_after > train_before + 0.1  # it learned; the random features do not separate the shapes


# -- CLIP / SigLIP adapters ----------------------------------------------------------------------


def test_clip_feature_layer_matches_hidden_states():
    model = tiny_clip()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        tower = VisionTower(clip_cfg(model, feature_layer=-2), model)
        out = tower(x.view(1, 3, 3, 32, 32))
        no_cls = VisionTower(clip_cfg(model, feature_layer=-2, drop_cls_token=True), model)(x[None])
        normed = VisionTower(clip_cfg(model, feature_layer=-2, post_layernorm=True), model)(x[None])
        last = VisionTower(clip_cfg(model, feature_layer=-1), model)(x[None])
        first = VisionTower(clip_cfg(model, feature_layer=0), model)(x[None])
    assert tower.num_tokens == 17 and tower.out_dim == 32
    assert out.shape == (1, 3, 17, 32)
    torch.testing.assert_close(out[0], ref.hidden_states[-2], rtol=0, atol=1e-6)
    assert no_cls.shape == (1, 3, 16, 32)
    torch.testing.assert_close(no_cls[0], ref.hidden_states[-2][:, 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(normed[0], model.post_layernorm(ref.hidden_states[-2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(last[0], ref.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(first[0], ref.hidden_states[0], rtol=0, atol=1e-6)


def test_siglip_feature_layer_matches_hidden_states():
    model = tiny_siglip()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True)
        tower = VisionTower(siglip_cfg(model, feature_layer=-2), model)
        out = tower(x[:, None])
        normed = VisionTower(siglip_cfg(model, feature_layer=-1, post_layernorm=True), model)(x[:, None])
    assert tower.num_tokens == 16  # no class token
    assert out.shape == (2, 1, 16, 32)
    torch.testing.assert_close(out[:, 0], ref.hidden_states[-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(normed[:, 0], ref.last_hidden_state, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="no class token"):
        VisionTower(siglip_cfg(model, drop_cls_token=True), model)


def test_adapter_built_from_config_dict_has_transformers_state_dict():
    model = tiny_clip()
    tower = build_vision_tower(clip_cfg(model, feature_layer=-2))
    assert isinstance(tower.backbone, HFVisionAdapter)
    assert isinstance(tower.backbone.tower, CLIPVisionModel)
    # The full tower's weights load strictly, under the 'tower.' prefix.
    tower.backbone.load_state_dict({f"tower.{k}": v for k, v in model.state_dict().items()}, strict=True)
    x = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x[0], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(x)[0], expected, rtol=0, atol=1e-6)
    siglip = build_vision_tower(siglip_cfg(tiny_siglip()))
    assert isinstance(siglip.backbone.tower, SiglipVisionModel)


def test_adapter_stops_at_the_feature_layer():
    model = tiny_clip()
    tower = VisionTower(clip_cfg(model, feature_layer=1), model)
    x = torch.randn(1, 2, 3, 32, 32)
    out = tower(x)
    out.sum().backward()
    last = model.encoder.layers[1]
    assert all(p.grad is None for p in last.parameters())  # the last layer never ran
    assert all(p.grad is not None for p in model.encoder.layers[0].parameters())
    unused = {id(p) for p in tower.backbone.unused_parameters()}
    assert {id(p) for p in last.parameters()} <= unused
    assert {id(p) for p in model.post_layernorm.parameters()} <= unused
    assert not unused & {id(p) for p in model.encoder.layers[0].parameters()}


def test_feature_layer_out_of_range():
    model = tiny_clip()
    with pytest.raises(ConfigError, match="feature_layer"):
        VisionTower(VisionConfig(kind="clip", hf_config=model.config.to_dict(), feature_layer=-4), model)


# -- loading -------------------------------------------------------------------------------------


def test_load_clip_vision_model_directory(tmp_path):
    model = tiny_clip()
    model.save_pretrained(tmp_path)
    cfg, tower = load_vision_tower(tmp_path, feature_layer=-2, drop_cls_token=True)
    assert cfg.kind == "clip" and cfg.hf_config["hidden_size"] == 32
    assert cfg.image_size == 32 and cfg.width == 32 and cfg.feature_layer == -2
    assert cfg.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert cfg.resize == "shortest_edge_crop"
    x = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x[:, 0], output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower.eval()(x)[:, 0], expected, rtol=0, atol=1e-6)
    # The returned config rebuilds the same architecture.
    rebuilt = build_vision_tower(cfg)
    rebuilt.load_state_dict(tower.state_dict(), strict=True)


def test_load_reads_preprocessor_config(tmp_path):
    tiny_clip().save_pretrained(tmp_path)
    pre = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "do_center_crop": False, "crop_size": 32}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    cfg, _ = load_vision_tower(tmp_path)
    assert cfg.image_mean == pytest.approx((0.1, 0.2, 0.3))
    assert cfg.image_std == pytest.approx((0.4, 0.5, 0.6))
    assert cfg.resize == "squash"


def test_load_full_clip_and_siglip_models(tmp_path):
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99)
    clip = CLIPModel(
        CLIPConfig(text_config=text, vision_config=TINY, projection_dim=16, bos_token_id=0, eos_token_id=1)
    ).eval()
    clip.save_pretrained(tmp_path / "clip")
    cfg, tower = load_vision_tower(tmp_path / "clip")
    assert cfg.kind == "clip"
    x = torch.randn(1, 1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(x)[0], clip.vision_model(x[0]).last_hidden_state, rtol=0, atol=1e-6)

    siglip = SiglipModel(SiglipConfig(text_config=text, vision_config=TINY)).eval()
    siglip.save_pretrained(tmp_path / "siglip")
    cfg, tower = load_vision_tower(tmp_path / "siglip", post_layernorm=True)
    assert cfg.kind == "siglip" and cfg.image_mean == (0.5, 0.5, 0.5) and cfg.resize == "squash"
    with torch.no_grad():
        torch.testing.assert_close(tower(x)[0], siglip.vision_model(x[0]).last_hidden_state, rtol=0, atol=1e-6)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_vision_tower(tmp_path / "nowhere")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="'bert'.*clip"):
        load_vision_tower(tmp_path / "bert")
    (tmp_path / "noweights").mkdir()
    tiny_clip().config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(CheckpointError, match="noweights"):
        load_vision_tower(tmp_path / "noweights")


# -- input checks --------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors():
    tower = build_vision_tower(VisionConfig(image_size=32, patch_size=4))
    with pytest.raises(InputError, match=r"32x32.*got 64x64.*processor"):
        tower(torch.randn(1, 1, 3, 64, 64))
    with pytest.raises(InputError, match="3 colour channels"):
        tower(torch.randn(1, 1, 1, 32, 32))
    with pytest.raises(InputError, match=r"\(batch, images, 3, H, W\)"):
        tower(torch.randn(2, 3, 32, 32))
    with pytest.raises(InputError, match="floating point"):
        tower(torch.zeros(1, 1, 3, 32, 32, dtype=torch.uint8))
    clip = VisionTower(clip_cfg(tiny_clip()), tiny_clip())
    with pytest.raises(InputError, match="32x32"):
        clip(torch.randn(1, 1, 3, 224, 224))
