"""open_clip's ViT image tower read into interleaf's CLIP tower: the config, the key table, refusals.

The numbers are checked against open_clip itself in ``test_openflamingo_fixtures.py`` (the
fixtures' vision tokens); here the mapping is checked tensor by tensor and every input the
reader cannot convert faithfully gets an error naming it.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.openflamingo import of_fixture_dirs
from safetensors.torch import load_file, save_file

from interleaf.convert.open_clip import is_open_clip_dir, load_open_clip_vision, open_clip_vision_config
from interleaf.errors import CheckpointError


@pytest.fixture
def vision_dir(tmp_path):
    """A writable copy of the first fixture's open_clip ``vision/`` folder."""
    dst = tmp_path / "vision"
    shutil.copytree(of_fixture_dirs()[0] / "vision", dst)
    return dst


def _edit_config(folder, **vision_cfg):
    path = folder / "open_clip_config.json"
    meta = json.loads(path.read_text())
    meta["model_cfg"]["vision_cfg"].update(vision_cfg)
    path.write_text(json.dumps(meta))


def _edit_weights(folder, drop=(), add=None):
    path = folder / "open_clip_model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if k not in drop}
    save_file({**state, **(add or {})}, str(path))


def test_every_tensor_lands_where_the_table_says(vision_dir):
    state = load_file(str(vision_dir / "open_clip_model.safetensors"))
    cfg, tower = load_open_clip_vision(vision_dir)
    assert is_open_clip_dir(vision_dir) and cfg.kind == "clip" and cfg.drop_cls_token and not cfg.post_layernorm
    clip = tower.backbone.tower
    ours = clip.state_dict()
    assert torch.equal(ours["embeddings.patch_embedding.weight"], state["visual.conv1.weight"])
    assert torch.equal(ours["embeddings.position_embedding.weight"], state["visual.positional_embedding"])
    assert torch.equal(ours["post_layernorm.bias"], state["visual.ln_post.bias"])
    q, k, v = state["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    assert torch.equal(ours["encoder.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(ours["encoder.layers.1.self_attn.v_proj.bias"],
                      state["visual.transformer.resblocks.1.attn.in_proj_bias"].chunk(3)[2])
    assert torch.equal(ours["encoder.layers.0.mlp.fc2.weight"], state["visual.transformer.resblocks.0.mlp.c_proj.weight"])
    assert clip.config.hidden_act == "gelu" and clip.config.layer_norm_eps == 1e-5
    meta = json.loads((vision_dir / "open_clip_config.json").read_text())
    assert list(cfg.image_mean) == pytest.approx(meta["preprocess_cfg"]["mean"])


def test_quick_gelu_and_head_width_are_read():
    hf = open_clip_vision_config({"quick_gelu": True, "vision_cfg": {"width": 96, "head_width": 32, "layers": 3,
                                                                     "patch_size": [14, 14], "image_size": 28}})
    assert hf["hidden_act"] == "quick_gelu" and hf["num_attention_heads"] == 3 and hf["patch_size"] == 14
    assert hf["intermediate_size"] == 384 and hf["num_hidden_layers"] == 3


@pytest.mark.parametrize("setting, value", [("ls_init_value", 0.1), ("no_ln_pre", True),
                                            ("pos_embed_type", "sin_cos_2d"), ("timm_model_name", "vit_base"),
                                            ("some_future_option", 1)])
def test_towers_built_differently_are_refused_by_name(vision_dir, setting, value):
    _edit_config(vision_dir, **{setting: value})
    with pytest.raises(CheckpointError, match=setting):
        load_open_clip_vision(vision_dir)


def test_a_resnet_tower_is_refused(vision_dir):
    _edit_config(vision_dir, layers=[3, 4, 6, 3])
    with pytest.raises(CheckpointError, match="ResNet"):
        load_open_clip_vision(vision_dir)


def test_missing_and_unexpected_visual_keys_are_listed(vision_dir):
    _edit_weights(vision_dir, drop=["visual.ln_pre.bias"], add={"visual.attn_pool.query": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="missing keys") as info:
        load_open_clip_vision(vision_dir)
    assert "visual.ln_pre.bias" in str(info.value) and "visual.attn_pool.query" in str(info.value)


def test_weights_of_another_shape_are_named(vision_dir):
    _edit_config(vision_dir, layers=3)
    with pytest.raises(CheckpointError, match=r"resblocks\.2"):
        load_open_clip_vision(vision_dir)


def test_no_weights_or_no_visual_tensors_are_explained(vision_dir):
    _edit_weights(vision_dir, drop=[k for k in load_file(str(vision_dir / "open_clip_model.safetensors"))
                                    if k.startswith("visual.")])
    with pytest.raises(CheckpointError, match=r"no visual\.\* tensors"):
        load_open_clip_vision(vision_dir)
    (vision_dir / "open_clip_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="open_clip_model.safetensors"):
        load_open_clip_vision(vision_dir)
