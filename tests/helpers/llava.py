"""Writing a transformers LLaVA or LLaVA-NeXT model in either hub key layout, for the converter tests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file


def hub_layout(state: dict, layout: str) -> dict:
    """The reference's weights under one of the hub key layouts transformers reads: ``transformers5``
    (the module names: ``model.language_model.*``, ``model.vision_tower.*``, ``lm_head``,
    ``model.image_newline``) or llava-hf's older one (``language_model.model.*``,
    ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``)."""
    if layout == "transformers5":
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model."):]
        elif key.startswith("lm_head."):
            key = "language_model." + key
        elif key.startswith("model.vision_tower."):
            key = "vision_tower.vision_model." + key[len("model.vision_tower."):]
        elif key.startswith("model."):  # model.multi_modal_projector.*, model.image_newline
            key = key[len("model."):]
        out[key] = value
    return out


def save_reference(reference, tok, directory, layout: str) -> None:
    """``save_pretrained`` of the model and its tokenizer; for another ``layout``, its weights rewritten so."""
    reference.save_pretrained(directory)
    tok.save_pretrained(directory)
    if layout != "save_pretrained":
        state = {k: v.contiguous() for k, v in reference.state_dict().items()}
        if reference.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(hub_layout(state, layout), str(directory / "model.safetensors"), metadata={"format": "pt"})


def assert_same_weights(want, got) -> None:
    """Two models hold the same tensors under the same names, bit for bit."""
    want, got = want.state_dict(), got.state_dict()
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def assert_cli_round_trip(verb: str, reference_cls, saved, tmp_path) -> None:
    """``interleaf convert VERB`` to interleaf and back (``--to VERB``) gives bit-identical weights, and an
    unknown ``--to`` is a user error (exit code 2)."""
    from interleaf.cli import main

    reference = reference_cls.from_pretrained(saved)
    for args in ([str(saved), str(tmp_path / "ours")], [str(tmp_path / "ours"), str(tmp_path / "back"), "--to", verb]):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert", verb, *args])
        assert exit_info.value.code == 0
    assert_same_weights(reference, reference_cls.from_pretrained(tmp_path / "back"))
    with pytest.raises(SystemExit) as exit_info:  # a user error: one line, exit code 2
        main(["convert", verb, str(saved), str(tmp_path / "x"), "--to", "nowhere"])
    assert exit_info.value.code == 2

