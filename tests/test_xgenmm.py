"""xGen-MM (BLIP-3) end to end at the model level: parity with the reference fixtures, the converter of the
released checkpoints, the ``xgen-mm-phi3-mini`` preset, bad input.

The oracles are the fixtures the public xGen-MM code produced on tiny random weights
(``$INTERLEAF_FIXTURES/xgenmm-*``), found by their files: every folder whose checkpoint holds a whole
model (``vlm.lang_model.*``) is checked, as an instruct (anyres) fixture when its inputs hold per-image
``pixel_values.{row}.{image}`` and ``image_size.{row}.{image}``, as a base fixture when they hold
``vision_x``. The preset's reference figure is the released checkpoint's own: the key shapes of its
``model.safetensors.index.json`` (listed in ``released_shapes``), summed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import interleaf
from helpers.fixtures import config, fixture_dirs, tensor_names, tensors
from interleaf.convert.xgenmm import (
    from_xgenmm,
    load_xgenmm,
    map_from_xgenmm,
    xgenmm_to_interleaf_config,
)
from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.model import InterleafForConditionalGeneration

ATOL = 1e-5  # the READMEs suggest 1e-4 for logits; the model meets 1e-5


# -- discovery ---------------------------------------------------------------------------------


def model_fixtures() -> list[Path]:
    """Every xgenmm-* folder whose checkpoint is a whole model."""
    found = [d for d in fixture_dirs("xgenmm-", has=("model.safetensors", "config.json", "inputs.safetensors",
                                                      "outputs.safetensors"))
             if any(k.startswith("vlm.lang_model.") for k in tensor_names(d / "model.safetensors"))]
    assert found, "no xgenmm-* fixture holds a whole model (vlm.lang_model.* keys)"
    return found


def instruct_fixtures() -> list[Path]:
    found = [d for d in model_fixtures() if any(n.startswith("pixel_values.") for n in
                                                tensor_names(d / "inputs.safetensors"))]
    assert found, "no xgenmm-* model fixture with per-image pixel_values.{row}.{image} inputs"
    return found


def base_fixtures() -> list[Path]:
    found = [d for d in model_fixtures() if "vision_x" in tensor_names(d / "inputs.safetensors")]
    assert found, "no xgenmm-* model fixture with vision_x inputs (the base format)"
    return found


def per_image(inputs: dict, prefix: str) -> list[list]:
    """``{prefix}.{row}.{image}`` tensors as a list per row, in order."""
    names = [n for n in inputs if n.startswith(prefix + ".")]
    keys = sorted((tuple(int(i) for i in n[len(prefix) + 1:].split(".")), n) for n in names)
    rows: list[list] = []
    for (r, _), name in keys:
        while len(rows) <= r:
            rows.append([])
        rows[r].append(inputs[name])
    return rows


def instruct_inputs(folder: Path) -> dict:
    inputs = tensors(folder / "inputs.safetensors")
    rows = len(inputs["input_ids"])
    pixels, sizes = per_image(inputs, "pixel_values"), per_image(inputs, "image_size")
    pixels += [[] for _ in range(rows - len(pixels))]
    sizes += [[] for _ in range(rows - len(sizes))]
    return dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels,
                image_sizes=[[tuple(s.tolist()) for s in row] for row in sizes])


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol:g}"


_MODELS: dict[Path, InterleafForConditionalGeneration] = {}


def model_of(folder: Path) -> InterleafForConditionalGeneration:
    if folder not in _MODELS:
        _MODELS[folder] = load_xgenmm(folder)
    return _MODELS[folder]


def text_logits(logits: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, text_mask: torch.Tensor,
                lengths: list[int], image_id: int, last: bool = False) -> torch.Tensor:
    """One row's logits at its real text positions: an ``<image>`` takes the first of its inserted
    positions (the reference's ``_postprocess_outputs_from_forward``), or with ``last`` the last one
    (interleaf's forward: the logit that predicts the text after the image)."""
    real = logits[mask.bool()]
    out, at, k = [], 0, 0
    for token in ids[text_mask.bool()].tolist():
        out.append(real[at + (lengths[k] - 1 if last and token == image_id else 0)])
        if token == image_id:
            at += lengths[k]
            k += 1
        else:
            at += 1
    assert at == real.shape[0]
    return torch.stack(out)


# -- parity: instruct (anyres, one <image> replaced by each image's tokens) ----------------------


def test_instruct_fixtures_parity_logits_masks_vision_tokens_and_greedy_tokens():
    for folder in instruct_fixtures():
        model, cfg = model_of(folder), config(folder)
        inputs, outputs = instruct_inputs(folder), tensors(folder / "outputs.safetensors")
        assert model.config.insertion_cfg.anyres.grids == [tuple(g) for g in cfg["anyres_grids_px_w_h"]]
        from interleaf.model import xgenmm

        counts = [len(row) for row in inputs["pixel_values"]]
        with torch.no_grad():
            images = xgenmm.split_images(inputs["pixel_values"], inputs["image_sizes"], counts,
                                         model.config.insertion_cfg.anyres)
            sequences = iter(xgenmm.encode_images(model, images))
            for r, row in enumerate(inputs["pixel_values"]):
                for k in range(len(row)):
                    close(next(sequences), outputs[f"vision_tokens.{r}.{k}"], f"{folder.name} vision_tokens.{r}.{k}")
            out = model(**inputs)  # logits at the caller's positions
            ids, mask, _, embeds = xgenmm.prepare_replace(model, inputs["input_ids"], inputs["attention_mask"], None,
                                                          inputs["pixel_values"], inputs["image_sizes"])
            fused = model(input_ids=ids, attention_mask=mask, image_embeds=embeds).logits  # the grown rows
        # the fused masks: generate's (left padded) exactly; forward's (right padded) has the same real tokens
        assert torch.equal(mask, outputs["fused_attention_mask_generate"].to(mask.dtype)), folder.name
        ref_mask = outputs["fused_attention_mask"]
        assert mask.sum(-1).tolist() == ref_mask.sum(-1).tolist()
        lengths = xgenmm.image_lengths(model, images)
        image_id = cfg["special_token_ids"]["media"]
        for b in range(len(counts)):
            close(fused[b][mask[b].bool()], outputs["logits_fused"][b][ref_mask[b].bool()],
                  f"{folder.name} row {b} logits over the fused sequence")
            text_mask = inputs["attention_mask"][b]
            ours = text_logits(fused[b], mask[b], inputs["input_ids"][b], text_mask, lengths[b], image_id)
            close(ours, outputs["logits_text"][b][text_mask.bool()], f"{folder.name} row {b} logits_text")
            # forward's own logits: the reference's at every text position; at an <image>, the fused
            # sequence's logit at that image's last vision token
            want = text_logits(outputs["logits_fused"][b], ref_mask[b], inputs["input_ids"][b], text_mask, lengths[b],
                               image_id, last=True)
            close(out.logits[b][text_mask.bool()], want, f"{folder.name} row {b} forward's logits at the text positions")
        kwargs = cfg["generate_kwargs"]
        generated = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=kwargs["max_new_tokens"],
                                   eos_token_id=kwargs["eos_token_id"], pad_token_id=kwargs["pad_token_id"])
        prompt = inputs["input_ids"]
        assert torch.equal(generated[:, : prompt.shape[1]], prompt), "the caller's prompt comes back unchanged"
        assert torch.equal(generated[:, prompt.shape[1]:], outputs["generated_ids"]), folder.name


def test_every_layout_of_the_pixels_gives_the_same_logits():
    folder = instruct_fixtures()[0]
    model, inputs = model_of(folder), instruct_inputs(folder)
    flat_pixels = [p for row in inputs["pixel_values"] for p in row]
    flat_sizes = [s for row in inputs["image_sizes"] for s in row]
    most = max(p.shape[1] for p in flat_pixels)
    padded = torch.zeros(len(inputs["pixel_values"]), max(map(len, inputs["pixel_values"])), most,
                         *flat_pixels[0].shape[2:])
    sizes = torch.zeros(padded.shape[0], padded.shape[1], 2, dtype=torch.long)
    for r, row in enumerate(inputs["pixel_values"]):
        for k, p in enumerate(row):
            padded[r, k, : p.shape[1]] = p[0]
            sizes[r, k] = torch.tensor(inputs["image_sizes"][r][k])
    base = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        reference = model(**inputs).logits
        for pixels, image_sizes in (
            (flat_pixels, flat_sizes),  # one list of the batch's images, in reading order
            ([p[0] for p in flat_pixels], torch.tensor(flat_sizes)),  # (V, 3, S, S) each; sizes (K, 2)
            (padded, sizes),  # (B, N, V_max, 3, S, S) zero padded, sizes (B, N, 2)
        ):
            assert torch.equal(model(**base, pixel_values=pixels, image_sizes=image_sizes).logits, reference)
        # xGen-MM's own spelling of the argument
        assert torch.equal(model(**base, pixel_values=flat_pixels, image_size=flat_sizes).logits, reference)


def test_labels_are_minus_100_on_every_vision_position_and_the_loss_is_finite():
    folder = instruct_fixtures()[0]
    model, inputs = model_of(folder), instruct_inputs(folder)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    from interleaf.model import xgenmm

    ids, mask, grown, _ = xgenmm.prepare_replace(model, inputs["input_ids"], inputs["attention_mask"], labels,
                                                 inputs["pixel_values"], inputs["image_sizes"])
    vision = ids == model.image_token_id
    assert bool((grown[vision] == -100).all()) and bool((grown[mask == 0] == -100).all())
    assert torch.equal(grown[(mask == 1) & ~vision], labels[(labels != -100) & (labels != model.image_token_id)])
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    assert torch.isfinite(loss)


# -- parity: base (<image> + placeholders overwritten, one view) ---------------------------------


def test_base_fixtures_parity_logits_vision_tokens_and_greedy_tokens():
    for folder in base_fixtures():
        model, cfg = model_of(folder), config(folder)
        inputs, outputs = tensors(folder / "inputs.safetensors"), tensors(folder / "outputs.safetensors")
        assert model.config.insertion_cfg.placement == "expand" and model.config.insertion_cfg.anyres is None
        vision_x = inputs["vision_x"]  # (B, N, F=1, 3, S, S)
        assert vision_x.shape[2] == 1
        pixels = vision_x[:, :, 0]
        b, n = pixels.shape[:2]
        with torch.no_grad():
            tokens = model.projector(model.vision_tower(pixels.reshape(1, b * n, *pixels.shape[2:]))[0])
            close(tokens.reshape(outputs["vision_tokens"].shape), outputs["vision_tokens"], f"{folder.name} vision")
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixels)
        real = inputs["attention_mask"].bool()
        assert out.logits.shape == outputs["logits"].shape  # length-preserving, logits 1:1 with input_ids
        close(out.logits[real], outputs["logits"][real], f"{folder.name} logits")
        kwargs = cfg["generate_kwargs"]
        generated = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                   pixel_values=pixels, do_sample=False, num_beams=1,
                                   max_new_tokens=kwargs["max_new_tokens"], eos_token_id=kwargs["eos_token_id"],
                                   pad_token_id=kwargs["pad_token_id"])
        assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        assert torch.equal(generated[:, inputs["input_ids"].shape[1]:], outputs["generated_ids"]), folder.name


def test_base_mode_labels_cover_the_whole_image_span():
    folder = base_fixtures()[0]
    model, inputs = model_of(folder), tensors(folder / "inputs.safetensors")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tokens = model.config.tokens_cfg
    span = (ids == tokens.image_token_id) | (ids == tokens.image_placeholder_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["vision_x"][:, :, 0], labels=labels)
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["vision_x"][:, :, 0],
                      labels=labels.masked_fill(span, -100))
    assert torch.equal(out.loss, plain.loss)  # the image span is never a target


# -- the decoupled rows and the head's bias ----------------------------------------------------


def test_the_decoupled_rows_and_the_head_bias_are_loaded_and_used():
    folder = instruct_fixtures()[0]
    model, state = model_of(folder), tensors(folder / "model.safetensors")
    lm = model.language_model
    assert torch.equal(lm.lm_head.bias, state["vlm.lang_model.lm_head.bias"])
    assert torch.equal(lm.lm_head.extra, state["vlm.lang_model.lm_head.additional_fc.weight"])
    assert torch.equal(lm.lm_head.extra_bias, state["vlm.lang_model.lm_head.additional_fc.bias"])
    assert torch.equal(lm.get_input_embeddings().extra,
                       state["vlm.lang_model.model.embed_tokens.additional_embedding.weight"])
    initial = config(folder)["initial_tokenizer_len"]
    hidden = torch.randn(2, 3, lm.config.hidden_size)
    logits = lm.lm_head(hidden)
    assert logits.shape[-1] == initial + 3  # the logits end after the added rows (real: 32015)
    w, b = state["vlm.lang_model.lm_head.weight"], state["vlm.lang_model.lm_head.bias"]
    a, c = state["vlm.lang_model.lm_head.additional_fc.weight"], state["vlm.lang_model.lm_head.additional_fc.bias"]
    close(logits, torch.cat([(hidden @ w.T + b)[..., :initial], hidden @ a.T + c], -1), "head", 1e-6)


# -- the converter -----------------------------------------------------------------------------


def test_command_line_conversion_of_every_model_fixture(tmp_path):
    from interleaf.cli import main

    for folder in model_fixtures():
        dst = tmp_path / folder.name
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "xgen-mm", str(folder), str(dst)])
        assert exit_info.value.code == 0
        converted = InterleafForConditionalGeneration.from_pretrained(dst).eval()
        original = model_of(folder)
        for section in ("fusion", "vision", "projector", "insertion", "tokens", "freeze"):
            assert getattr(converted.config, section) == getattr(original.config, section), section
        for key, value in original.state_dict().items():
            assert torch.equal(converted.state_dict()[key], value), key


def test_shards_with_an_index_load_like_one_file(tmp_path):
    folder = instruct_fixtures()[0]
    state = tensors(folder / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(tmp_path / name))
        weight_map.update({k: name for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    sharded, single = load_xgenmm(tmp_path), model_of(folder)
    for key, value in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[key], value), key


def _bad_checkpoint(tmp_path: Path, drop: str | None = None, add: str | None = None) -> Path:
    folder = instruct_fixtures()[0]
    state = tensors(folder / "model.safetensors")
    tmp_path.mkdir()
    if drop:
        state.pop(drop)
    if add:
        state[add] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    return tmp_path


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    src = _bad_checkpoint(tmp_path / "a", drop="vlm.lang_model.lm_head.bias")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): language_model\.lm_head\.bias"):
        load_xgenmm(src)
    src = _bad_checkpoint(tmp_path / "b", add="vlm.lang_model.model.layers.0.mlp.extra_proj.weight")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): language_model\.model\.layers\.0\.mlp\.extra"):
        load_xgenmm(src)
    src = _bad_checkpoint(tmp_path / "c", add="vlm.other_part.weight")
    with pytest.raises(CheckpointError, match=r"vlm\.other_part\.weight"):
        load_xgenmm(src)
    src = _bad_checkpoint(tmp_path / "d", add="vlm.vision_tokenizer.media_time_embs")
    with pytest.raises(CheckpointError, match="media_time_embs"):
        load_xgenmm(src)


def test_pickles_are_never_read_and_a_folder_without_weights_says_so(tmp_path):
    folder = instruct_fixtures()[0]
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_xgenmm(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_xgenmm(tmp_path / "absent")
    with pytest.raises(ConfigError, match="initial_tokenizer_len|vision_encoder"):
        xgenmm_to_interleaf_config({"text_config": {}})


# -- the preset --------------------------------------------------------------------------------

# The released r-v1.5 config.json (identical for base and instruct): it names little and relies on
# XGenMMConfig's defaults.
RELEASED_CONFIG = {
    "architectures": ["XGenMMModelForConditionalGeneration"], "model_type": "xgenmm",
    "text_config": {"initial_tokenizer_len": 32012, "model_type": "phi3", "sliding_window": 2047,
                    "torch_dtype": "bfloat16"},
    "vision_encoder_config": {"anyres_patch_sampling": True, "image_aspect_ratio": "anyres",
                              "model_type": "xgenmm_vision_encoder"},
    "vision_tokenizer_config": {"model_type": "xgenmm_vision_tokenizer"},
}


def released_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the released checkpoint with its shape (its model.safetensors.index.json: 718 keys)."""
    shapes: dict[str, tuple[int, ...]] = {}
    v, w, mlp = "vlm.vision_encoder.", 1152, 4304
    shapes.update({v + "embeddings.patch_embedding.weight": (w, 3, 14, 14), v + "embeddings.patch_embedding.bias": (w,),
                   v + "embeddings.position_embedding.weight": (729, w)})
    for i in range(27):
        p = f"{v}encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({p + norm + ".weight": (w,), p + norm + ".bias": (w,)})
        shapes.update({p + "mlp.fc1.weight": (mlp, w), p + "mlp.fc1.bias": (mlp,), p + "mlp.fc2.weight": (w, mlp),
                       p + "mlp.fc2.bias": (w,)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({p + f"self_attn.{proj}.weight": (w, w), p + f"self_attn.{proj}.bias": (w,)})
    shapes.update({v + "post_layernorm.weight": (w,), v + "post_layernorm.bias": (w,)})
    h = v + "head."  # SigLIP's MAP head: in the checkpoint, never used by xGen-MM
    shapes.update({h + "probe": (1, 1, w), h + "attention.in_proj_weight": (3 * w, w),
                   h + "attention.in_proj_bias": (3 * w,),
                   h + "attention.out_proj.weight": (w, w), h + "attention.out_proj.bias": (w,),
                   h + "layernorm.weight": (w,), h + "layernorm.bias": (w,), h + "mlp.fc1.weight": (mlp, w),
                   h + "mlp.fc1.bias": (mlp,), h + "mlp.fc2.weight": (w, mlp), h + "mlp.fc2.bias": (w,)})
    s, inner, d = "vlm.vision_tokenizer.", 16 * 96, 3072
    shapes[s + "latents"] = (128, w)
    for i in range(6):
        p = f"{s}layers.{i}."
        for norm in ("0.norm_media", "0.norm_latents", "1.0"):
            shapes.update({p + norm + ".weight": (w,), p + norm + ".bias": (w,)})
        shapes.update({p + "0.to_q.weight": (inner, w), p + "0.to_kv.weight": (2 * inner, w),
                       p + "0.to_out.weight": (w, inner), p + "1.1.weight": (4 * w, w), p + "1.3.weight": (w, 4 * w)})
    shapes.update({s + "norm.weight": (w,), s + "norm.bias": (w,), s + "projection.weight": (d, w),
                   s + "projection.bias": (d,)})
    lm, vocab = "vlm.lang_model.", 32064
    shapes.update({lm + "model.embed_tokens.weight": (vocab, d),
                   lm + "model.embed_tokens.additional_embedding.weight": (3, d),
                   lm + "model.norm.weight": (d,), lm + "lm_head.weight": (vocab, d), lm + "lm_head.bias": (vocab,),
                   lm + "lm_head.additional_fc.weight": (3, d), lm + "lm_head.additional_fc.bias": (3,)})
    for i in range(32):
        p = f"{lm}model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.qkv_proj.weight": (3 * d, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_up_proj.weight": (2 * 8192, d), p + "mlp.down_proj.weight": (d, 8192)})
    return shapes


def test_the_preset_has_exactly_the_released_checkpoints_parameters_and_keys():
    shapes = released_shapes()
    assert len(shapes) == 718
    released = sum(math.prod(s) for s in shapes.values())
    assert released == 4_359_257_219  # REFERENCE: total_size / 4 bytes of the fp32 index
    head = sum(math.prod(s) for k, s in shapes.items() if k.startswith("vlm.vision_encoder.head."))
    assert released - head == 4_344_018_867  # without the unused MAP head, which the preset does count
    model, processor = interleaf.build("xgen-mm-phi3-mini", device="meta")
    assert processor is None and next(model.parameters()).is_meta
    assert model.num_parameters() == released
    # every released key maps, strictly and with its shape, onto one of the preset's parameters
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert set(map_from_xgenmm(state, model)) == set(model.state_dict())
    # the preset is what the converter makes of the released config.json
    converted = xgenmm_to_interleaf_config(RELEASED_CONFIG)
    for section in ("vision", "projector", "insertion", "tokens"):
        assert getattr(model.config, section) == getattr(converted, section), section
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "sliding_window",
                "tie_word_embeddings", "pad_token_id"):
        assert getattr(model.config.text_config, key) == getattr(converted.text_config, key), key
    vision = model.config.vision_cfg
    assert (vision.image_size, vision.image_mean, vision.image_std, vision.resize) == (384, (0.5,) * 3, (0.5,) * 3,
                                                                                        "squash")
    assert model.config.insertion_cfg.anyres.grids == [(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]


def test_the_preset_carries_the_instruct_template_and_stop_token():
    from interleaf.presets import seeds

    assert seeds.XGENMM_INSTRUCT_TEMPLATE.startswith("<|system|>\nA chat between a curious user")
    assert seeds.XGENMM_INSTRUCT_TEMPLATE.endswith("<|user|>\n{content}<|end|>\n<|assistant|>\n")
    assert (seeds.XGENMM_STOP_TOKEN, seeds.XGENMM_STOP_TOKEN_ID) == ("<|end|>", 32007)
    assert "interleaf convert xgen-mm" in interleaf.presets()["xgen-mm-phi3-mini"]


# -- bad input ---------------------------------------------------------------------------------


def test_an_image_count_that_does_not_match_the_image_tokens_names_the_row():
    folder = instruct_fixtures()[0]
    model, inputs = model_of(folder), instruct_inputs(folder)
    pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]
    base = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(InputError, match="batch row 0 has 2 <image> tokens but 1 entries in pixel_values"):
        model(**base, pixel_values=[pixels[0][:1], pixels[1]], image_sizes=sizes)
    flat = [p for row in pixels for p in row]
    with pytest.raises(InputError, match="pixel_values holds 2 images but the text of the batch has 3 <image>"):
        model(**base, pixel_values=flat[:2], image_sizes=[s for row in sizes for s in row][:2])
    with pytest.raises(InputError, match="needs image_sizes"):
        model(**base, pixel_values=pixels)
    with pytest.raises(InputError, match="either image_sizes or image_size"):
        model(**base, pixel_values=pixels, image_sizes=sizes, image_size=sizes)


def test_sizes_that_do_not_fit_the_pixels_name_the_image():
    folder = instruct_fixtures()[0]
    model, inputs = model_of(folder), instruct_inputs(folder)
    sizes = [list(row) for row in inputs["image_sizes"]]
    views = inputs["pixel_values"][0][0].shape[1]
    sizes[0][0] = (28, 28)  # a 1x2 grid: 3 views, the pixels hold more
    with pytest.raises(InputError, match=rf"batch row 0, image 0: .* 3 views .* shape \(1, {views}, 3"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              pixel_values=inputs["pixel_values"], image_sizes=sizes)
    sizes[0][0] = (10_000, 1)
    with pytest.raises(InputError, match="batch row 0, image 0: image of 10000 x 1 px is too thin"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              pixel_values=inputs["pixel_values"], image_sizes=sizes)


def test_a_row_whose_images_do_not_fit_the_language_model_is_refused(monkeypatch):
    folder = instruct_fixtures()[0]
    model, inputs = model_of(folder), instruct_inputs(folder)
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", 60)
    with pytest.raises(InputError, match=r"batch row 0 takes 93 positions .* at most 60"):
        model(**inputs)


def test_base_mode_spans_that_are_cut_short_or_stray_placeholders_name_the_row():
    folder = base_fixtures()[0]
    model, inputs = model_of(folder), tensors(folder / "inputs.safetensors")
    tokens = model.config.tokens_cfg
    ids, mask, pixels = inputs["input_ids"].clone(), inputs["attention_mask"], inputs["vision_x"][:, :, 0]
    first = int((ids[1] == tokens.image_token_id).nonzero()[0])
    short = ids.clone()
    short[1, first + 3] = 5  # the row-1 image's span holds text
    with pytest.raises(InputError, match=rf"batch row 1: the <image> at position {first} is followed by 2 "):
        model(input_ids=short, attention_mask=mask, pixel_values=pixels)
    stray = ids.clone()
    stray[1, first] = 5  # its placeholders now follow no <image>
    with pytest.raises(InputError, match=rf"batch row 1: <image placeholder> at position {first + 1} follows no"):
        model(input_ids=stray, attention_mask=mask, pixel_values=pixels)
    end = ids.clone()
    end[1, -1] = tokens.image_token_id  # an image at the row's end: no room for its span
    with pytest.raises(InputError, match=rf"batch row 1: the <image> at position {ids.shape[1] - 1} is followed by 0"):
        model(input_ids=end, attention_mask=mask, pixel_values=pixels)


def test_configs_that_xgenmm_insertion_cannot_run_are_refused():
    folder = instruct_fixtures()[0]
    data = config(folder)
    cfg = xgenmm_to_interleaf_config(data)
    with pytest.raises(ConfigError, match="projector.kind"):
        InterleafForConditionalGeneration(type(cfg)(**{**cfg.to_dict(), "projector": {"kind": "linear"}}))
    tokens = {**cfg.tokens, "image_placeholder_token_id": 91}
    with pytest.raises(ConfigError, match="tokens.image_placeholder_token_id"):
        InterleafForConditionalGeneration(type(cfg)(**{**cfg.to_dict(), "tokens": tokens}))
    with pytest.raises(ConfigError, match="mode"):
        xgenmm_to_interleaf_config(data, mode="chat")


def test_from_xgenmm_with_a_tokenizer_that_lacks_the_added_ids_is_refused(tmp_path):
    folder = instruct_fixtures()[0]
    from interleaf.processing import build_tiny_tokenizer

    with pytest.raises(CheckpointError, match="initial_tokenizer_len"):
        from_xgenmm(folder, tmp_path / "out", tokenizer=build_tiny_tokenizer())


def _word_tokenizer(size: int, pad: int):
    """A word-level tokenizer of exactly ``size`` tokens (``w0``.., ``<pad>`` at ``pad``): a stand-in for
    Phi-3's, whose length is xGen-MM's initial_tokenizer_len."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(size)}
    vocab["<pad>"] = vocab.pop(f"w{pad}")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="w0")


def test_with_a_tokenizer_the_converted_directory_loads_with_its_processor(tmp_path):
    folder = instruct_fixtures()[0]
    cfg = config(folder)
    initial = cfg["initial_tokenizer_len"]
    out = from_xgenmm(folder, tmp_path / "out", tokenizer=_word_tokenizer(initial, initial - 1))
    model, processor = interleaf.load(out)
    ids = processor.tokenizer.convert_tokens_to_ids(["<image>", "<image placeholder>", "<|endofchunk|>"])
    assert ids == [cfg["special_token_ids"][k] for k in ("media", "placeholder", "eoc")]
    for key, value in model_of(folder).state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_base_mode_also_takes_the_llava_layout_of_the_same_positions():
    folder = base_fixtures()[0]
    model, inputs = model_of(folder), tensors(folder / "inputs.safetensors")
    tokens = model.config.tokens_cfg
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["vision_x"][:, :, 0]
    llava_ids = ids.masked_fill(ids == tokens.image_placeholder_token_id, tokens.image_token_id)
    with torch.no_grad():
        same = model(input_ids=llava_ids, attention_mask=mask, pixel_values=pixels).logits
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(same, reference)
