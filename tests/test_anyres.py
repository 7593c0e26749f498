"""Any-resolution tiling against its references.

xGen-MM: every fixture folder ``xgenmm-*`` that holds numbers but no weights (the public xGen-MM code's
grid choices, canvases, unpad masks, sampler groups and their provenance, and the pixels of its PNGs).
LLaVA-NeXT: transformers' own functions (``select_best_resolution``, ``get_anyres_image_grid_shape``,
``image_size_to_num_patches``, ``unpad_image``, ``pack_image_features``), its PIL image processor and
``LlavaNextProcessor``'s token count, on many sizes including extreme aspect ratios.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import LlavaNextConfig, LlavaNextProcessor
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next as hf
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from helpers.fixtures import fixture_dirs
from interleaf import schema
from interleaf.config import AnyresConfig
from interleaf.errors import ConfigError, InputError
from interleaf.processing import anyres
from interleaf.processing import build_tiny_tokenizer

# ---------------------------------------------------------------- xGen-MM: the fixtures



@pytest.fixture(scope="module")
def anyres_folders():
    """Every xGen-MM fixture folder of numbers without weights (discovered, never skipped when absent)."""
    return fixture_dirs("xgenmm-", has=("config.json", "inputs.safetensors", "outputs.safetensors"),
                        lacks=("model.safetensors",))


@functools.lru_cache(maxsize=None)
def outputs(folder):
    return load_file(folder / "outputs.safetensors")


def fixture_cases(folders):
    """(folder, scale, AnyresConfig, index, (W, H)) for every image size of every scale each folder holds."""
    for folder in folders:
        cfg = json.loads((folder / "config.json").read_text())
        inputs = load_file(folder / "inputs.safetensors")
        scales = [k[: -len(".image_sizes")] for k in inputs if k.endswith(".image_sizes")]
        assert scales, f"{folder}: no '<scale>.image_sizes' inputs"
        for scale in scales:
            config = AnyresConfig(convention="xgenmm", base_size=cfg[f"{scale}_base_img_size"],
                                  patch_size=cfg["patch_size"], grids=cfg[f"{scale}_anyres_grids_px_w_h"])
            for k, size in enumerate(inputs[f"{scale}.image_sizes"].tolist()):
                yield folder, scale, config, k, tuple(size)


def test_xgenmm_choices_masks_and_groups_match_the_fixture(anyres_folders):
    checked = 0
    for folder, scale, cfg, k, size in fixture_cases(anyres_folders):
        out = outputs(folder)
        key, where = f"{scale}.{k}", f"{folder.name} {scale} image {size}"
        tiles = anyres.plan(size, cfg)
        groups = anyres.xgenmm_groups(tiles)
        assert list(tiles.grid) == out[f"{key}.grid"].tolist(), where
        assert list(tiles.canvas) == out[f"{key}.canvas"].tolist(), where
        assert torch.equal(anyres.unpad_mask(tiles).to(torch.uint8), out[f"{key}.unpad_mask"]), where
        assert torch.equal(groups.mask.to(torch.uint8), out[f"{key}.group_mask"]), where
        assert torch.equal(groups.src_view, out[f"{key}.group_src_view"].long()), where
        assert torch.equal(groups.src_token, out[f"{key}.group_src_token"].long()), where
        # The sampler sees one group of num_latents per view: (1 + N) * num_latents LM tokens.
        assert anyres.num_image_tokens(size, cfg, num_latents=128) == 128 * out[f"{key}.group_mask"].shape[0], where
        checked += 1
    assert checked >= 16 * len(anyres_folders)


def test_xgenmm_group_features_place_each_token_where_the_reference_does(anyres_folders):
    for folder, scale, cfg, k, size in fixture_cases(anyres_folders):
        out = outputs(folder)
        tiles = anyres.plan(size, cfg)
        t2 = tiles.tokens_per_side ** 2
        views = torch.arange(tiles.num_views).view(-1, 1).expand(-1, t2)
        tokens = torch.arange(t2).view(1, -1).expand(tiles.num_views, -1)
        features = torch.stack([views, tokens], dim=-1).float()  # token k of view v is (v, k)
        groups, mask = anyres.xgenmm_group_features(features, tiles)
        assert torch.equal(groups[..., 0].short(), out[f"{scale}.{k}.group_src_view"]), size
        assert torch.equal(groups[..., 1].short(), out[f"{scale}.{k}.group_src_token"]), size
        assert torch.equal(mask.to(torch.uint8), out[f"{scale}.{k}.group_mask"]), size


def test_xgenmm_pixel_values_match_the_fixture_exactly(anyres_folders):
    for folder in anyres_folders:
        check_fixture_pixels(folder)


def check_fixture_pixels(folder):
    cfg = json.loads((folder / "config.json").read_text())
    inputs, out = load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")
    pngs = sorted(int(k.split(".")[1]) for k in inputs if k.startswith("png.") and k.endswith(".image_size"))
    assert pngs, f"{folder}: no PNG inputs"
    config = AnyresConfig(convention="xgenmm", base_size=cfg["tiny_base_img_size"], patch_size=cfg["patch_size"],
                          grids=cfg["tiny_anyres_grids_px_w_h"])
    for j in pngs:
        image = Image.open(folder / f"image{j}.png").convert("RGB")
        assert list(image.size) == inputs[f"png.{j}.image_size"].tolist()
        pixels, tiles = anyres.pixel_values(image, config, cfg["view_normalize_mean"], cfg["view_normalize_std"])
        assert pixels.dtype == torch.float32
        assert torch.equal(pixels.unsqueeze(0), out[f"png.{j}.pixel_values"]), f"image{j}.png"  # bit-identical


# ---------------------------------------------------------------- LLaVA-NeXT: transformers

SCALES = {  # base (crop) size, patch size, pinpoints (H, W) as LlavaNextConfig holds them
    "tiny": (28, 14, [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]),
    "real": (336, 14, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
}
FIXED_SIZES_HW = [  # (H, W): squares, exact pinpoints, off-by-one, tiny and huge, extreme aspect ratios
    (1, 1), (1, 2), (2, 1), (28, 28), (29, 27), (30, 100), (40, 70), (56, 56), (84, 28), (28, 84), (336, 336),
    (337, 335), (480, 640), (256, 1024), (900, 300), (375, 500), (1000, 2000), (1920, 1080), (672, 1008),
    (5000, 5000), (10, 700), (700, 10), (3, 1000), (1000, 3), (1, 2000), (2000, 1), (13, 77), (77, 13),
]
_rng = np.random.default_rng(12)
_HEIGHTS, _ASPECTS = np.exp(_rng.uniform(0, np.log(4000), 40)), np.exp(_rng.uniform(-np.log(8), np.log(8), 40))
RANDOM_SIZES_HW = [(int(h), max(1, int(h * a))) for h, a in zip(_HEIGHTS, _ASPECTS)]  # aspect ratios 1:8 to 8:1
SIZES_HW = FIXED_SIZES_HW + RANDOM_SIZES_HW


def llava_next_config(scale: str) -> AnyresConfig:
    base, patch, pinpoints = SCALES[scale]
    return AnyresConfig(convention="llava_next", base_size=base, patch_size=patch, grids=pinpoints)


@pytest.fixture(scope="module")
def hf_processors():
    """transformers' LLaVA-NeXT processor per scale: its PIL image processor and the tiny tokenizer."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    procs = {}
    for scale, (base, patch, pinpoints) in SCALES.items():
        images = LlavaNextImageProcessorPil(size={"shortest_edge": base}, crop_size={"height": base, "width": base},
                                            image_grid_pinpoints=pinpoints)
        procs[scale] = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=patch,
                                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return procs


def hf_pack(scale, features, size_hw, newline):
    """transformers' ``pack_image_features`` for one image (it reads only the config)."""
    base, patch, pinpoints = SCALES[scale]
    config = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=base, patch_size=patch),
                                   image_grid_pinpoints=pinpoints)
    packed, lens = hf.LlavaNextModel.pack_image_features(
        types.SimpleNamespace(config=config), [features], torch.tensor([size_hw]), "default", newline)
    return packed[0], int(lens[0])


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("size_hw", SIZES_HW, ids=lambda s: f"{s[0]}x{s[1]}")
def test_llava_next_matches_transformers(scale, size_hw, hf_processors):
    base, patch, pinpoints = SCALES[scale]
    cfg = llava_next_config(scale)
    h, w = size_hw
    nph, npw = hf.get_anyres_image_grid_shape(list(size_hw), pinpoints, base)
    t = base // patch
    hf_map = hf.unpad_image(torch.zeros(1, nph * t, npw * t), list(size_hw))  # (1, kept rows, kept cols)
    if 0 in hf_map.shape:  # transformers keeps no row (or column) of the image: interleaf refuses it
        with pytest.raises(InputError, match="too thin for the anyres grids"):
            anyres.plan((w, h), cfg, where="image 0")
        return
    tiles = anyres.plan((w, h), cfg)
    assert tiles.canvas[::-1] == hf_select_best_resolution(size_hw, pinpoints)
    assert tiles.grid == (npw, nph)
    assert tiles.num_views == hf.image_size_to_num_patches(list(size_hw), pinpoints, base)
    top, bottom, left, right = anyres.unpad_bounds(tiles)
    assert (bottom - top, right - left) == tuple(hf_map.shape[1:])
    gen = torch.Generator().manual_seed(0)
    features, newline = torch.randn(tiles.num_views, t * t, 8, generator=gen), torch.randn(8, generator=gen)
    ours = anyres.llava_next_pack(features, tiles, newline)
    theirs, length = hf_pack(scale, features, size_hw, newline)
    assert torch.equal(ours, theirs)
    count = hf_processors[scale]._get_num_multimodal_tokens(image_sizes=[size_hw]).num_image_tokens[0]
    assert anyres.num_image_tokens((w, h), cfg) == count == length == ours.shape[0]


@pytest.mark.parametrize("scale, sizes_hw", [
    ("tiny", [(30, 100), (40, 70), (1, 1), (28, 28), (77, 13), (200, 60), (5, 9)]),
    ("real", [(480, 640), (700, 10)]),
])
def test_llava_next_pixel_values_match_the_pil_image_processor_exactly(scale, sizes_hw, hf_processors):
    proc = hf_processors[scale]
    cfg = llava_next_config(scale)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes_hw]
    theirs = proc.image_processor(images, return_tensors="pt")
    text = ["x <image> y"] * len(images)
    ids = proc(images=[[im] for im in images], text=text, padding=True, return_tensors="pt")["input_ids"]
    for i, image in enumerate(images):
        ours, tiles = anyres.pixel_values(image, cfg, proc.image_processor.image_mean, proc.image_processor.image_std)
        assert theirs["image_sizes"][i].tolist() == list(sizes_hw[i])
        assert torch.equal(ours, theirs["pixel_values"][i, : tiles.num_views]), sizes_hw[i]
        assert not theirs["pixel_values"][i, tiles.num_views:].any()  # the processor pads the batch with zeros
        assert anyres.num_image_tokens(image.size, cfg) == int((ids[i] == proc.image_token_id).sum())


def test_llava_next_default_pinpoints_are_transformers_defaults():
    cfg = AnyresConfig(convention="llava_next", base_size=336)
    assert [list(g) for g in cfg.grids] == LlavaNextConfig().image_grid_pinpoints
    assert anyres.candidates(cfg) == [(672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336)]  # (W, H)


def test_the_default_grids_break_ties_by_each_conventions_order():
    square = (100, 100)  # every grid keeps all of it: the first listed among the least wasteful wins
    xgen = anyres.plan(square, AnyresConfig(convention="xgenmm", base_size=28))
    nxt = anyres.plan(square, AnyresConfig(convention="llava_next", base_size=28))
    assert xgen.canvas == (56, 56) and nxt.canvas == (56, 56)
    tiny = (3, 3)
    assert anyres.plan(tiny, AnyresConfig(convention="xgenmm", base_size=28)).canvas == (28, 56)  # tall first
    assert anyres.plan(tiny, AnyresConfig(convention="llava_next", base_size=28)).canvas == (56, 28)  # wide first


# ---------------------------------------------------------------- config

def test_config_defaults_are_xgen_mm_r_v1_5():
    cfg = AnyresConfig()
    assert (cfg.convention, cfg.base_size, cfg.patch_size, cfg.max_crops) == ("xgenmm", 384, 14, 4)
    assert [list(g) for g in cfg.grids] == [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]]
    assert anyres.plan((640, 480), cfg).tokens_per_side == 27  # SigLIP at 384 / 14: 27 x 27 = 729 tokens


def test_config_reads_from_yaml_data_and_round_trips():
    data = {"convention": "llava_next", "base_size": 28, "patch_size": 14, "grids": [[28, 56], [56, 28]]}
    cfg = schema.read(AnyresConfig, data, "anyres")
    assert cfg.grids == [(28, 56), (56, 28)]
    assert schema.read(AnyresConfig, dataclasses.asdict(cfg), "anyres") == cfg


@pytest.mark.parametrize("data, field, words", [
    ({"grids": [[1152, 1152]]}, "anyres.grids[0]", "9 crops, above max_crops 4"),
    ({"max_crops": 2, "grids": [[384, 768], [768, 768]]}, "anyres.grids[1]", "above max_crops 2"),
    ({"grids": [[384, 700]]}, "anyres.grids[0]", "not a multiple of base_size 384"),
    ({"grids": []}, "anyres.grids", "must not be empty"),
    ({"grids": [[0, 384]]}, "anyres.grids[0][0]", ">= 1"),
    ({"patch_size": 400}, "anyres.patch_size", "larger than base_size"),
    ({"convention": "llava"}, "anyres.convention", "expected one of"),
    ({"max_crop": 4}, "anyres.max_crop", "did you mean 'max_crops'"),
])
def test_bad_configs_name_the_field(data, field, words):
    with pytest.raises(ConfigError) as info:
        schema.read(AnyresConfig, data, "anyres")
    assert info.value.field == field and words in str(info.value)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("size", [(0, 30), (30, 0), (-4, 10), (0, 0)])
def test_empty_images_are_refused(size):
    with pytest.raises(InputError, match=r"image 2: image size .* is empty"):
        anyres.plan(size, AnyresConfig(), where="image 2")


@pytest.mark.parametrize("size", [(30.5, 10), (True, 10), ("30", 10), (30,), (1, 2, 3), 30, None])
def test_sizes_that_are_not_integer_pairs_are_refused(size):
    with pytest.raises(InputError, match="not a \\(width, height\\) pair of integers"):
        anyres.num_image_tokens(size, AnyresConfig(), num_latents=128)


def test_sizes_may_be_tensors_or_numpy():
    cfg = AnyresConfig()
    expected = anyres.plan((640, 480), cfg)
    assert anyres.plan(torch.tensor([640, 480]), cfg) == expected
    assert anyres.plan(np.array([640, 480]), cfg) == expected


def test_images_above_the_pixel_limit_are_refused():
    cfg = AnyresConfig(max_image_pixels=1_000_000)
    anyres.plan((1000, 1000), cfg)
    with pytest.raises(InputError, match="image 1: image of 1001 x 1000 px is larger .* anyres.max_image_pixels"):
        anyres.plan((1001, 1000), cfg, where="image 1")


@pytest.mark.parametrize("convention", ["xgenmm", "llava_next"])
@pytest.mark.parametrize("size", [(2000, 1), (1, 2000), (20, 1), (1_000_000, 1), (1, 1_000_000)])
def test_images_too_thin_for_the_grids_are_refused(convention, size):
    cfg = AnyresConfig(convention=convention, base_size=28)
    with pytest.raises(InputError, match="row 0, image 1: image of .* too thin for the anyres grids.*squarer"):
        anyres.num_image_tokens(size, cfg, num_latents=128 if convention == "xgenmm" else None,
                                where="row 0, image 1")


def test_a_grid_above_the_crop_limit_set_after_checking_is_refused():
    cfg = AnyresConfig(base_size=28)
    cfg.max_crops = 1  # bypasses the config check: plan() still refuses
    with pytest.raises(ConfigError, match="above max_crops 1"):
        anyres.plan((40, 30), cfg)


def test_features_of_the_wrong_shape_are_refused():
    tiles = anyres.plan((40, 30), AnyresConfig(base_size=28))  # 2 x 2 grid: 5 views of 4 tokens
    with pytest.raises(InputError, match=r"image 3: expected vision features of shape \(5, 4, C\).*got \(5, 5, 8\)"):
        anyres.xgenmm_group_features(torch.zeros(5, 5, 8), tiles, where="image 3")
    with pytest.raises(InputError, match=r"expected vision features of shape \(5, 4, C\).*got \(4, 4, 8\)"):
        anyres.llava_next_pack(torch.zeros(4, 4, 8), tiles, torch.zeros(8))


def test_token_counts_need_latents_for_xgen_mm_only():
    with pytest.raises(ConfigError, match="resampler.num_latents"):
        anyres.num_image_tokens((40, 30), AnyresConfig(base_size=28))
    with pytest.raises(ConfigError, match="LLaVA-NeXT has no sampler"):
        anyres.num_image_tokens((40, 30), AnyresConfig(convention="llava_next", base_size=28), num_latents=64)


def test_views_need_the_image_their_plan_was_made_for():
    tiles = anyres.plan((40, 30), AnyresConfig(base_size=28))
    with pytest.raises(InputError, match=r"does not match its plan's size \(40, 30\)"):
        anyres.tile_views(Image.new("RGB", (30, 40)), tiles)
