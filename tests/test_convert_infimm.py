"""InfiMM: ``interleaf convert infimm`` against the numbers InfiMM's own code produced.

The oracles are the fixtures ``$INTERLEAF_FIXTURES/infimm-*`` (public InfiMM code, tiny random float32
weights; every folder holding a model, its inputs and outputs is checked, whichever EVA-CLIP style it
uses). Each is converted from its ``model.safetensors`` (every alias key path InfiMM registers) and
``config.json``; the fixture builds the perceiver and the blocks with fewer heads than the released
models (its ``_fixture`` section says how many), passed to the converter as ``--perceiver-heads`` /
``--xattn-heads``.

Positions: the fixture's ``logits`` use ``position_ids = cumsum(mask) - 1`` (what transformers 4.35
derived for InfiMM); interleaf derives the same from the attention mask when none are given, which is
what its ``generate`` does, so the greedy tokens are compared without passing positions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers.fixtures import config, fixture_dirs, tensors
from helpers.infimm import fixture_heads
from interleaf.convert.infimm import from_infimm, load_infimm
from interleaf.errors import CheckpointError
from interleaf.model import InterleafForConditionalGeneration
from interleaf.model.eva_clip import rope_tables

ATOL = 1e-5


def infimm_fixtures() -> list[Path]:
    return fixture_dirs("infimm-", has=("model.safetensors", "config.json", "inputs.safetensors",
                                        "outputs.safetensors"))


heads = fixture_heads  # the heads the fixture's perceiver and blocks were built with


def pad_id(folder: Path) -> int:
    return config(folder)["language"]["pad_token_id"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, InterleafForConditionalGeneration]:
    """Every fixture converted on the command line, then read back with ``from_pretrained``."""
    from interleaf.cli import main

    out = {}
    for folder in infimm_fixtures():
        dst = tmp_path_factory.mktemp("infimm") / folder.name
        h = heads(folder)
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", "infimm", str(folder), str(dst), "--perceiver-heads", str(h["perceiver_heads"]),
                  "--xattn-heads", str(h["xattn_heads"])])
        assert exit_info.value.code == 0
        out[folder.name] = InterleafForConditionalGeneration.from_pretrained(dst).eval()
    return out


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{what}: max |difference| {diff:.3g} > {ATOL}"


# -- parity ------------------------------------------------------------------------------------


@torch.no_grad()
def test_vision_features_and_perceiver_match_the_reference(converted):
    for folder in infimm_fixtures():
        model, inputs, outputs = converted[folder.name], tensors(folder / "inputs.safetensors"), \
            tensors(folder / "outputs.safetensors")
        assert model.config.vision_cfg.kind == "eva_clip"
        images = inputs["batch_images"][:, :, 0]  # (B, T_img, 3, H, W)
        features = model.vision_tower(images)  # (B, T_img, V, W): CLS first, no final norm
        close(features, outputs["vision_features"][:, :, 0], f"{folder.name} vision_features")
        close(model.resampler(outputs["vision_features"][:, :, 0]), outputs["perceiver_out"],
              f"{folder.name} perceiver_out")


@torch.no_grad()
def test_logits_match_the_reference_at_every_position(converted):
    for folder in infimm_fixtures():
        model, inputs, outputs = converted[folder.name], tensors(folder / "inputs.safetensors"), \
            tensors(folder / "outputs.safetensors")
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=inputs["position_ids"], batch_images=inputs["batch_images"]).logits
        real = inputs["attention_mask"].bool()  # padded positions are not outputs of the reference
        close(logits[real], outputs["logits"][real], f"{folder.name} logits")
        # without position_ids interleaf derives the same positions from the mask
        derived = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        batch_images=inputs["batch_images"]).logits
        close(derived[real], outputs["logits"][real], f"{folder.name} logits, positions from the mask")
        # InfiMM's flag: a row without <image> skips every block (the reference verified it is the plain LM)
        plain = model(input_ids=inputs["input_ids_noimage"], attention_mask=inputs["attention_mask_noimage"],
                      batch_images=inputs["batch_images_noimage"]).logits
        close(plain, outputs["logits_noimage"], f"{folder.name} logits_noimage")


@torch.no_grad()
def test_greedy_tokens_match_the_reference(converted):
    for folder in infimm_fixtures():
        model, inputs, outputs = converted[folder.name], tensors(folder / "inputs.safetensors"), \
            tensors(folder / "outputs.safetensors")
        prompt = inputs["input_ids"]
        out = model.generate(input_ids=prompt, attention_mask=inputs["attention_mask"],
                             batch_images=inputs["batch_images"], min_generation_length=0, max_generation_length=8,
                             do_sample=False, num_beams=1, pad_token_id=pad_id(folder), eos_token_id=2)
        assert torch.equal(out[:, prompt.shape[1]:], outputs["generated_ids"]), folder.name
        assert torch.equal(outputs["generated_ids"], outputs["generated_ids_no_position_ids"])


def _row(inputs: dict, name: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``r`` without its left padding, and its images (as many as it has ``<image>`` tokens)."""
    suffix = "" if name == "main" else "_noimage"
    ids, mask = inputs["input_ids" + suffix][r], inputs["attention_mask" + suffix][r].bool()
    images = inputs["batch_images" + suffix][r]
    return ids[mask], images


@torch.no_grad()
def test_a_batch_of_three_rows_gives_each_rows_tokens_alone(converted):
    """Rows with different image counts (the fixture's two, and one without image), left-padded together."""
    for folder in infimm_fixtures():
        model, inputs = converted[folder.name], tensors(folder / "inputs.safetensors")
        image_id, pad = model.config.tokens_cfg.image_token_id, pad_id(folder)
        rows = [_row(inputs, "main", 0), _row(inputs, "main", 1), _row(inputs, "noimage", 0)]
        counts = [int((ids == image_id).sum()) for ids, _ in rows]
        assert len(set(counts)) == 3 and 0 in counts, counts
        alone = []
        for ids, images in rows:
            n = max(1, int((ids == image_id).sum()))
            out = model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                                 batch_images=images[None, :n], max_new_tokens=8, do_sample=False,
                                 pad_token_id=pad, eos_token_id=2)
            alone.append(out[0, ids.shape[0]:])
        length, most = max(ids.shape[0] for ids, _ in rows), max(max(counts), 1)
        ids = torch.full((3, length), pad, dtype=torch.long)
        mask = torch.zeros(3, length, dtype=torch.long)
        images = torch.zeros(3, most, *rows[0][1].shape[1:])
        for r, (row_ids, row_images) in enumerate(rows):
            ids[r, length - row_ids.shape[0]:] = row_ids
            mask[r, length - row_ids.shape[0]:] = 1
            n = min(most, row_images.shape[0])
            images[r, :n] = row_images[:n]
        batch = model.generate(input_ids=ids, attention_mask=mask, batch_images=images, max_new_tokens=8,
                               do_sample=False, pad_token_id=pad, eos_token_id=2)[:, length:]
        for r in range(3):
            assert torch.equal(batch[r, : alone[r].shape[0]], alone[r]), (folder.name, r, counts[r])


def test_rotary_tables_are_the_ones_the_reference_stored():
    for folder in infimm_fixtures():
        visual = config(folder)["visual"]
        if not visual.get("rope"):
            continue
        state = tensors(folder / "model.safetensors")
        grid = visual["image_size"] // visual["patch_size"]
        cos, sin = rope_tables(visual["head_width"], grid, visual["pt_hw_seq_len"], visual["intp_freq"])
        assert torch.equal(cos, state["model.vision_encoder.rope.freqs_cos"])
        assert torch.equal(sin, state["model.vision_encoder.rope.freqs_sin"])


# -- key paths and files -----------------------------------------------------------------------


def _only(state: dict, drop: tuple[str, ...]) -> dict:
    return {k: v.clone() for k, v in state.items() if not any(d in k for d in drop)}


def _folder(tmp_path: Path, source: Path, state: dict | None = None, pickle: bool = False, prefix: str = "") -> Path:
    folder = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    shutil.copy(source / "config.json", folder / "config.json")
    if state is not None:
        state = {prefix + k: v.contiguous() for k, v in state.items()}
        if pickle:
            torch.save(state, folder / "pytorch_model.bin")
        else:
            save_file(state, str(folder / "model.safetensors"))
    return folder


def _convert(folder: Path, source: Path, dst: Path) -> InterleafForConditionalGeneration:
    return InterleafForConditionalGeneration.from_pretrained(from_infimm(folder, dst, **heads(source))).eval()


def test_any_alias_path_and_a_deepspeed_pickle_give_the_same_model(tmp_path, converted):
    for source in infimm_fixtures():
        state, want = tensors(source / "model.safetensors"), converted[source.name].state_dict()
        variants = {
            "old_decoder_blocks + gated_cross_attn_layers, no rotary tables, pytorch_model.bin with module.":
                (_only(state, (".model.layers.", "rope.")), True, "module."),
            "model.layers.{i}.decoder_layer / gated_cross_attn_layer, safetensors":
                (_only(state, ("old_decoder_blocks", "gated_cross_attn_layers")), False, ""),
        }
        direct = load_infimm(source, **heads(source)).state_dict()  # built on the CPU, loaded strictly
        assert direct.keys() == want.keys() and all(torch.equal(direct[k], want[k]) for k in want)
        for name, (variant, pickle, prefix) in variants.items():
            folder = _folder(tmp_path, source, variant, pickle, prefix)
            got = _convert(folder, source, tmp_path / f"out{len(list(tmp_path.iterdir()))}").state_dict()
            assert got.keys() == want.keys(), name
            assert all(torch.equal(got[k], want[k]) for k in want), name


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    source = infimm_fixtures()[0]
    state = tensors(source / "model.safetensors")
    block = next(k for k in state if ".gated_cross_attn_layers." in k).split(".gated_cross_attn_layers.")[1]
    layer = int(block.split(".")[0])
    missing_block = {k: v for k, v in state.items()
                     if f"gated_cross_attn_layers.{layer}." not in k and f"layers.{layer}.gated_cross_attn_layer." not in k}
    with pytest.raises(CheckpointError, match=rf"no block before layers \[{layer}\]"):
        from_infimm(_folder(tmp_path, source, missing_block), tmp_path / "a", **heads(source))
    extra = {**state, "model.lang_encoder.model.layers.0.decoder_layer.mlp.extra_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match=r"does not know.*extra_proj"):
        from_infimm(_folder(tmp_path, source, extra), tmp_path / "b", **heads(source))
    no_norm = {k: v for k, v in state.items() if k != "model.lang_encoder.model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.norm\.weight"):
        from_infimm(_folder(tmp_path, source, no_norm), tmp_path / "c", **heads(source))
    differ = dict(state)
    key = next(k for k in state if ".old_decoder_blocks.0." in k)
    differ[key] = state[key] + 1
    with pytest.raises(CheckpointError, match="differ"):
        from_infimm(_folder(tmp_path, source, differ), tmp_path / "d", **heads(source))
    folder = _folder(tmp_path, source)
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")  # a pickle that is not a state dict
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        from_infimm(folder, tmp_path / "e", **heads(source))
    with pytest.raises(CheckpointError, match="config.json"):
        from_infimm(tmp_path / "nowhere", tmp_path / "f")


def _word_tokenizer(size: int, eoc: int, image: int):
    """A word-level tokenizer of ``size`` ids with InfiMM's two tokens at ``eoc`` and ``image``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {1: "<s>", 2: "</s>", 0: "<unk>", eoc: "<|endofchunk|>", image: "<image>"}
    vocab = {names.get(i, f"w{i}"): i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    return fast


def test_the_checkpoints_tokenizer_makes_a_loadable_processor(tmp_path):
    import interleaf

    source = infimm_fixtures()[0]
    data = config(source)
    vocab, eoc, image = data["language"]["vocab_size"], data["eoc_token_id"], data["image_token_id"]
    folder = _folder(tmp_path, source)
    shutil.copy(source / "model.safetensors", folder / "model.safetensors")
    _word_tokenizer(vocab, eoc, image).save_pretrained(folder)
    model, processor = interleaf.load(from_infimm(folder, tmp_path / "out", **heads(source)))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image == model.image_token_id
    size = data["visual"]["image_size"]
    from PIL import Image

    batch = processor([["w5 w6", Image.new("RGB", (size + 10, size)), "w7"]])
    assert (batch["input_ids"] == image).sum() == 1
    assert model(**{k: v for k, v in batch.items() if k != "image_attention_mask"}).logits.shape[-1] == vocab
    wrong = _folder(tmp_path, source)
    shutil.copy(source / "model.safetensors", wrong / "model.safetensors")
    _word_tokenizer(vocab, image, eoc).save_pretrained(wrong)  # the two tokens swapped
    with pytest.raises(CheckpointError, match="own tokenizer"):
        from_infimm(wrong, tmp_path / "out2", **heads(source))


# -- the released sizes ------------------------------------------------------------------------

# The published configs' "visual" and "language" (Infi-MM/infimm-zephyr, Infi-MM/infimm-vicuna13b) and the
# reference parameter counts: the public InfiMM code built on the meta device from those configs, unique
# parameters, checked against the released pytorch_model.bin sizes (2 bytes per parameter, 3 significant
# figures); see the shared REFERENCE notes on token insertion, section 5.
RELEASED = {
    "infimm-zephyr": (
        dict(image_size=336, layers=24, width=1024, head_width=64, patch_size=14, mlp_ratio=2.6667, rope=True,
             pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True, embed_dim=768, xattn=False,
             fusedLN=True, drop_path_rate=0.0, eva_model_name="eva-clip-l-14-336"),
        dict(model_type="mistral", vocab_size=32002, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, sliding_window=4096, tie_word_embeddings=False),
        2, 9_840_832_224, 304_432_832),
    "infimm-vicuna13b": (
        dict(image_size=224, layers=64, width=1792, head_width=112, patch_size=14, mlp_ratio=8.571428571428571,
             postnorm=True, embed_dim=1024, xattn=False, fusedLN=False, eva_model_name="eva-clip-4b-14-x"),
        dict(vocab_size=32002, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
             num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
        4, 19_710_920_980, 4_350_556_928),
}


def _released_shapes(width: int, hidden: int, blocks: list[int]) -> dict[str, torch.Tensor]:
    """The weight shapes the converter reads its perceiver and block sizes from (InfiMM's code defaults)."""
    shapes = {"perceiver.latents": (64, width)}
    for d in range(6):
        shapes |= {f"perceiver.layers.{d}.0.to_q.weight": (512, width),
                   f"perceiver.layers.{d}.1.1.weight": (4 * width, width)}
    for i in blocks:
        prefix = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer."
        shapes |= {prefix + "attn.to_q.weight": (512, hidden), prefix + "ff.1.weight": (4 * hidden, hidden)}
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_the_released_architectures_have_their_parameter_counts(name):
    from interleaf.convert.infimm import infimm_to_interleaf_config

    visual, language, every, total, tower = RELEASED[name]
    layers = language["num_hidden_layers"]
    state = _released_shapes(visual["width"], language["hidden_size"],
                             [i for i in range(layers) if (i + 1) % every == 0])
    data = dict(visual=visual, language=language, cross_attn_every_n_layers=every, image_token_id=32001,
                eoc_token_id=32000)
    with torch.device("meta"):
        model = InterleafForConditionalGeneration(infimm_to_interleaf_config(data, state))
    assert sum(p.numel() for p in model.vision_tower.parameters()) == tower
    assert sum(p.numel() for p in model.parameters()) == total
    assert model.config.text_config.model_type == language.get("model_type", "llama")
