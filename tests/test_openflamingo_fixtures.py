"""``interleaf convert openflamingo`` against OpenFlamingo's own numbers (the ``openflamingo-*`` fixtures).

Each fixture folder holds what the public OpenFlamingo code was run with on tiny random weights
(the LM as transformers saves it, the vision tower in open_clip's layout, the checkpoint both as
released and as the training script saves it) and what it computed: logits, greedy tokens, the
vision tokens and the perceiver output, once per open_clip version (the versions differ in
whether the patch tokens pass through ``ln_post``). Every folder found is converted and compared:
logits within 1e-5 at every position the attention mask keeps, identical greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.fixtures import config, tensors
from helpers.openflamingo import convert_fixture, of_fixture_dirs, output_variants
from safetensors.torch import load_file

import interleaf
from interleaf.convert.open_clip import load_open_clip_vision
from interleaf.errors import CheckpointError, ConfigError

ATOL = 1e-5


def _lm_type(folder) -> str:
    return json.loads((folder / "lm" / "config.json").read_text())["model_type"]


def _logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["lang_x"], attention_mask=inputs["attention_mask"],
                     pixel_values=inputs["vision_x"]).logits


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """[(folder, inputs, outputs, {suffix: (patch_ln_post, converted model)})] for every fixture folder."""
    out = []
    for folder in of_fixture_dirs():
        inputs, outputs = tensors(folder / "inputs.safetensors"), tensors(folder / "outputs.safetensors")
        models = {}
        for suffix, ln_post in output_variants(folder, outputs).items():
            dst = tmp_path_factory.mktemp(f"{folder.name}{suffix}")
            model, _ = interleaf.load(convert_fixture(folder, dst, patch_ln_post=ln_post))
            models[suffix] = (ln_post, model.eval())
        out.append((folder, inputs, outputs, models))
    return out


def test_every_fixture_has_both_open_clip_variants(cases):
    for folder, _, _, models in cases:
        assert sorted(ln for ln, _ in models.values()) == [False, True], folder.name


def test_logits_match_openflamingo_at_every_kept_position(cases):
    for folder, inputs, outputs, models in cases:
        keep = inputs["attention_mask"].bool()
        for suffix, (_, model) in models.items():
            ref = outputs[f"logits{suffix}"]
            ours = _logits(model, inputs)
            assert ours.shape == ref.shape, (folder.name, suffix)
            torch.testing.assert_close(ours[keep], ref[keep], atol=ATOL, rtol=0, msg=f"{folder.name}{suffix}")


def test_greedy_tokens_match_openflamingo(cases):
    for folder, inputs, outputs, models in cases:
        eoc = config(folder)["eoc_token_id"]
        for suffix, (_, model) in models.items():
            new = outputs[f"new_tokens{suffix}"]
            out = model.generate(input_ids=inputs["lang_x"], attention_mask=inputs["attention_mask"],
                                 pixel_values=inputs["vision_x"], max_new_tokens=new.shape[1], do_sample=False,
                                 num_beams=1, eos_token_id=eoc)
            assert out[:, inputs["lang_x"].shape[1]:].tolist() == new.tolist(), f"{folder.name}{suffix}"
            assert out.tolist() == outputs[f"generated_ids{suffix}"].tolist()


def test_each_row_alone_without_padding_gives_the_batch_results(cases):
    """Every row run alone, without pads and with only its own images (OpenFlamingo's own generate
    fails on a batch without padding under transformers 5), gives the reference logits and tokens."""
    for folder, inputs, outputs, models in cases:
        media, eoc = config(folder)["media_token_id"], config(folder)["eoc_token_id"]
        model = models[""][1]
        for r, keep in enumerate(inputs["attention_mask"].bool()):
            ids = inputs["lang_x"][r : r + 1, keep]
            pixels = inputs["vision_x"][r : r + 1, : int((ids == media).sum())]
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=pixels).logits[0]
            torch.testing.assert_close(logits, outputs["logits"][r, keep], atol=ATOL, rtol=0, msg=f"{folder.name} row {r}")
            new = outputs["new_tokens"][r]
            out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=len(new), do_sample=False,
                                 eos_token_id=eoc)
            assert out[0, ids.shape[1]:].tolist() == new.tolist(), f"{folder.name} row {r}"


def test_vision_tokens_and_perceiver_output_match(cases):
    """The open_clip tower read into interleaf's CLIP tower, and the perceiver, each on their own."""
    for folder, inputs, outputs, models in cases:
        pixels = inputs["vision_x"][:, :, 0]  # (B, T_img, 3, H, W): one frame per image
        for suffix, (ln_post, model) in models.items():
            _, tower = load_open_clip_vision(folder / "vision", patch_ln_post=ln_post)
            with torch.no_grad():
                alone, inside = tower(pixels), model.vision_tower(pixels)
                latents = model.resampler(inside)
            ref = outputs[f"vision_tokens{suffix}"][:, :, 0]
            torch.testing.assert_close(alone, ref, atol=ATOL, rtol=0, msg=f"{folder.name}{suffix}")
            torch.testing.assert_close(inside, ref, atol=ATOL, rtol=0, msg=f"{folder.name}{suffix}")
            torch.testing.assert_close(latents, outputs[f"perceiver_out{suffix}"], atol=ATOL, rtol=0)


def test_the_open_clip_choice_changes_the_logits(cases):
    """ln_post on the patch tokens is not a detail: each variant's model misses the other's numbers."""
    for folder, inputs, outputs, models in cases:
        keep = inputs["attention_mask"].bool()
        by_ln = {ln: (suffix, model) for suffix, (ln, model) in models.items()}
        for ln, (_, model) in by_ln.items():
            other_suffix = by_ln[not ln][0]
            gap = (_logits(model, inputs) - outputs[f"logits{other_suffix}"])[keep].abs().max()
            assert gap > 100 * ATOL, (folder.name, ln, float(gap))


def test_released_and_training_script_checkpoints_load_to_identical_weights(tmp_path):
    for folder in of_fixture_dirs():
        assert (folder / "checkpoint_0.pt").is_file(), f"{folder.name} lacks the training script's checkpoint_0.pt"
        raw = torch.load(folder / "checkpoint_0.pt", map_location="cpu", weights_only=True)
        assert set(raw) >= {"epoch", "model_state_dict", "optimizer_state_dict"}
        assert all(k.startswith("module.") for k in raw["model_state_dict"])
        weights = []
        for name in ("checkpoint.pt", "checkpoint_0.pt"):
            model, _ = interleaf.load(convert_fixture(folder, tmp_path / folder.name / name))
            weights.append(model.state_dict())
        assert weights[0].keys() == weights[1].keys()
        for key in weights[0]:
            assert torch.equal(weights[0][key], weights[1][key]), (folder.name, key)


# -------------------------------------------------------------------------------- the LM's output head


def _untied_fixtures() -> list:
    """The fixtures whose LM has an untied GPT-NeoX head that the checkpoint does not carry."""
    found = [f for f in of_fixture_dirs() if _lm_type(f) == "gpt_neox"]
    assert found, "no openflamingo-* fixture with a GPT-NeoX LM: the output-head checks need one"
    return found


def test_head_saved_under_its_transformers_4_name_is_read(tmp_path):
    """Under transformers 4.x GPT-NeoX's head is ``embed_out`` and OpenFlamingo saves it
    (``lang_encoder.embed_out.weight``, as in the released 4B checkpoint); transformers 5 calls the
    module ``lm_head``. Such a checkpoint converts to the same numbers."""
    for folder in _untied_fixtures():
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert not any(k.endswith(("embed_out.weight", "lm_head.weight")) for k in state)  # written under 5.x
        rows = state["lang_encoder.gpt_neox.embed_in.weight"].shape[0]
        base_head = load_file(str(folder / "lm" / "model.safetensors"))["embed_out.weight"][:rows]
        torch.save({**state, "lang_encoder.embed_out.weight": base_head}, tmp_path / "v4.pt")
        model, _ = interleaf.load(convert_fixture(folder, tmp_path / folder.name, tmp_path / "v4.pt"))
        inputs, outputs = tensors(folder / "inputs.safetensors"), tensors(folder / "outputs.safetensors")
        keep = inputs["attention_mask"].bool()
        torch.testing.assert_close(_logits(model.eval(), inputs)[keep], outputs["logits"][keep], atol=ATOL, rtol=0)


def test_a_head_under_another_name_needs_head_key(tmp_path):
    folder = _untied_fixtures()[0]
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    rows = state["lang_encoder.gpt_neox.embed_in.weight"].shape[0]
    head = load_file(str(folder / "lm" / "model.safetensors"))["embed_out.weight"][:rows]
    torch.save({**state, "lang_encoder.output_head.weight": head}, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"lang_encoder\.output_head\.weight"):
        convert_fixture(folder, tmp_path / "refused", tmp_path / "renamed.pt")
    out = convert_fixture(folder, tmp_path / "ok", tmp_path / "renamed.pt", head_key="lang_encoder.output_head.weight")
    model, _ = interleaf.load(out)
    assert torch.equal(model.get_output_embeddings().weight, head)
    torch.save({**state, "lang_encoder.lm_head.weight": head, "lang_encoder.embed_out.weight": head},
               tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="head twice"):
        convert_fixture(folder, tmp_path / "two", tmp_path / "two.pt")


def test_added_tokens_output_rows_are_the_resized_lms_unless_zeros_asked(tmp_path, cases):
    """Without a saved head, OpenFlamingo computes the added tokens' logits with the base LM's own
    rows (the LM has more rows than the tokenizer); ``added_head_rows="zeros"`` is the opt-out."""
    for folder in _untied_fixtures():
        rows = config(folder)["lm"]["embedding_rows_after_openflamingo_resize"]
        base = config(folder)["tokenizer"]["base_len"]
        lm_head = load_file(str(folder / "lm" / "model.safetensors"))["embed_out.weight"]
        _, inputs, outputs, models = next(c for c in cases if c[0] == folder)
        default = models[""][1]
        assert torch.equal(default.get_output_embeddings().extra, lm_head[base:rows])
        model, _ = interleaf.load(convert_fixture(folder, tmp_path / folder.name, added_head_rows="zeros"))
        assert torch.equal(model.get_output_embeddings().extra, torch.zeros(rows - base, lm_head.shape[1]))
        keep = inputs["attention_mask"].bool()
        ours, ref = _logits(model.eval(), inputs)[keep], outputs["logits"][keep]
        torch.testing.assert_close(ours[:, :base], ref[:, :base], atol=ATOL, rtol=0)
        assert torch.equal(ours[:, base:], torch.zeros_like(ours[:, base:]))
        assert ref[:, base:].abs().max() > 100 * ATOL


def test_a_bad_added_head_rows_value_is_named(tmp_path):
    folder = of_fixture_dirs()[0]
    with pytest.raises(ConfigError, match="added_head_rows"):
        convert_fixture(folder, tmp_path / "out", added_head_rows="random")


# -------------------------------------------------------------------------------- bad checkpoints


class Payload:
    """An arbitrary object: unpickling it needs code, which weights_only=True refuses."""


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_unexpected_keys_of_a_fixture_checkpoint_are_listed(tmp_path, change):
    for folder in of_fixture_dirs():
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        block = next(k for k in state if k.endswith("gated_cross_attn_layer.ff.3.weight"))
        if change == "missing":
            key = block
            del state[key]
        else:
            key = block.replace("ff.3.weight", "media_time_embs")
            state[key] = torch.zeros(4)
        torch.save({"epoch": 0, "model_state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            convert_fixture(folder, tmp_path / "out", tmp_path / "c.pt")


@pytest.mark.parametrize("content", [[1, 2, 3], {"epoch": 0}, {"model_state_dict": {"a": 1}}],
                         ids=["list", "no-tensors", "training-dict-without-tensors"])
def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path, content):
    torch.save(content, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        convert_fixture(of_fixture_dirs()[0], tmp_path / "out", tmp_path / "checkpoint.pt")


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"epoch": 0, "model_state_dict": {"perceiver.latents": Payload()}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"weights_only=True"):
        convert_fixture(of_fixture_dirs()[0], tmp_path / "out", tmp_path / "checkpoint.pt")


def test_command_line_imports_the_training_script_checkpoint_with_ln_post(tmp_path, cases):
    from interleaf.cli import main

    folder, inputs, outputs, models = cases[0]
    suffix = next(s for s, (ln, _) in models.items() if ln)
    args = ["convert", "openflamingo", str(folder / "checkpoint_0.pt"), str(tmp_path / "out"), "--lm",
            str(folder / "lm"), "--vision", str(folder / "vision"), "--every",
            str(config(folder)["cross_attn_every_n_layers"]), "--patch-ln-post"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    model, _ = interleaf.load(tmp_path / "out")
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(_logits(model.eval(), inputs)[keep], outputs[f"logits{suffix}"][keep], atol=ATOL, rtol=0)
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line, exit code 2
        main(args[:-1] + ["--added-head-rows", "random"])
    assert exit_info.value.code == 2
