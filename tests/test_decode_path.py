"""The decode path: no host synchronisation in interleaf's code on any step after the prefill, for
every family, with and without images, at batch 1 and in a batch of rows with different lengths and
image counts; a decode step's cross-attention attends only the image its row sees."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from helpers.families import FAMILIES, build_family
from helpers.host_sync import HostSyncs

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
# (number of images, text) per row; three rows of different lengths and image counts
ROWS = [(2, "what is in these two pictures"), (0, "hello"), (1, "describe this picture in a few words please")]


def _batch(processor, rows: int, with_images: bool):
    prompts = []
    for n, text in ROWS[:rows]:
        n = n if with_images else 0
        if rows == 1 and with_images:
            n = 2
        prompts.append([Image.new("RGB", (20, 20), COLOURS[i]) for i in range(n)] + [text])
    return processor(prompts)


def _inputs(inputs) -> dict:
    return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}


class _StepSyncs:
    """Records the syncing operations of every ``model.forward`` call (one list per call) through
    forward pre/post hooks, so that each decoding step is checked on its own."""

    def __init__(self, model):
        self.steps: list[HostSyncs] = []
        self.handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, with_kwargs=True),
        ]

    def _enter(self, module, args, kwargs):
        mode = HostSyncs()
        mode.__enter__()
        self.steps.append(mode)

    def _exit(self, module, args, kwargs, output):
        self.steps[-1].__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_images", [True, False], ids=["images", "text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_no_host_sync_in_interleaf_after_the_prefill(family, with_images, rows):
    model, processor = build_family(family)
    model.eval()
    inputs = _batch(processor, rows, with_images)
    assert ("pixel_values" in inputs) == with_images
    recorder = _StepSyncs(model)
    try:
        model.generate(**_inputs(inputs), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        recorder.remove()
    assert len(recorder.steps) == 4  # the prefill and three decoding steps
    for step, syncs in enumerate(recorder.steps[1:], start=1):
        assert not syncs.in_interleaf(), f"decoding step {step}:\n{syncs.report()}"


def test_a_decode_step_attends_only_its_rows_last_image():
    """The step's keys and values are the L latents of each row's last image (gathered, not masked),
    and its output equals the masked attention over all N * L latents."""
    model, processor = build_family("cross_attention")
    model.eval()
    inputs = _batch(processor, 3, True)
    cache = model.prepare_media(inputs["input_ids"], inputs["pixel_values"])
    block = model.cross_attention_blocks[0]
    step_ids = torch.full((3, 1), 5)
    gathered = model._media_context(step_ids, cache, past_length=7)
    assert gathered.one_image_per_row
    masked = model._media_context(step_ids, cache, past_length=7)
    masked.one_image_per_row = False
    x = torch.randn(3, 1, model.config.text_config.hidden_size)
    seen = {}

    def record(fn):
        def wrapped(q, k, v, mask=None, **kw):
            seen["keys"] = k.shape[2]
            return fn(q, k, v, mask, **kw)

        return wrapped

    import interleaf.model.cross_attention as xa

    with torch.no_grad():
        original = xa.attend
        xa.attend = record(original)
        try:
            out_gathered = block(x, gathered, 0)
            assert seen["keys"] == cache.latents_per_image
            out_masked = block(x, masked, 0)
            assert seen["keys"] == cache.latents.shape[1] * cache.latents_per_image
        finally:
            xa.attend = original
    torch.testing.assert_close(out_gathered, out_masked, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out_gathered[0], x[0]) and torch.equal(out_gathered[1], x[1])  # row 1 has no image


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decoding_gives_the_same_greedy_tokens(family, fresh_dynamo):
    """``generate(compile=True)``: a static KV cache and a compiled decoding step (inductor), the same
    tokens as the default path, for rows with and without images; a second call reuses the compiled step."""
    model, processor = build_family(family)
    model.eval()
    inputs = _inputs(_batch(processor, 3, True))
    options = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    expected = model.generate(**inputs, **options)
    recorder = _StepSyncs(model)
    try:
        compiled = model.generate(**inputs, **options, compile=True)
    finally:
        recorder.remove()
    assert torch.equal(compiled, expected)
    for step, syncs in enumerate(recorder.steps[1:], start=1):  # the compiled steps too
        assert not syncs.in_interleaf(), f"decoding step {step}:\n{syncs.report()}"
    assert torch.equal(model.generate(**inputs, **options, compile=True), expected)


def test_compile_refuses_a_cache_it_cannot_use():
    from interleaf.errors import InputError

    model, processor = build_family("cross_attention")
    inputs = _inputs(_batch(processor, 1, False))
    from transformers import DynamicCache

    with pytest.raises(InputError, match="past_key_values"):
        model.generate(**inputs, max_new_tokens=2, compile=True, past_key_values=DynamicCache())


@pytest.fixture
def generate_options(monkeypatch):
    """Every ``compile`` option ``model.generate`` receives (the call itself runs without it, quickly)."""
    from interleaf.model.modeling import InterleafForConditionalGeneration

    seen = []
    original = InterleafForConditionalGeneration.generate

    def recording(self, *args, compile=False, **kwargs):
        seen.append(compile)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterleafForConditionalGeneration, "generate", recording)
    return seen


def test_the_generate_and_eval_verbs_pass_compile_on(generate_options, synth_corpus, tmp_path):
    from typer.testing import CliRunner

    from interleaf.cli import app

    runner = CliRunner()
    for extra in ([], ["--compile"]):
        result = runner.invoke(app, ["generate", "--model", "tiny-random", "--max-new-tokens", "3", "hi", *extra])
        assert result.exit_code == 0, result.output
    assert generate_options == [False, True]
    generate_options.clear()
    corpus = synth_corpus.get(n_train_scenes=30, n_heldout_scenes=6)
    result = runner.invoke(app, ["eval", "--model", "tiny-random", "--task", "synth-vqa", "--data", str(corpus),
                                 "--limit", "2", "--batch-size", "2", "--out", str(tmp_path / "run"), "--compile"])
    assert result.exit_code == 0, result.output
    assert generate_options and all(generate_options)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["compile"] is True


@pytest.mark.parametrize("skip_rows", [True, False])
def test_a_batch_whose_tokens_see_no_image_computes_as_without_images(skip_rows):
    """Cross-attention runs without asking the host whether any token sees an image; a batch whose
    image mask takes every image away (IDEFICS' packed input) still gets exactly the logits of the
    same text without images, also with an image-independent FFN (InfiMM's per-row flag on and off)."""
    options = dict(gate_init="ones", ffn_without_image=True, skip_rows_without_image=skip_rows)
    model, processor = build_family("cross_attention", cross_attention=options)
    model.eval()
    inputs = _batch(processor, 3, True)
    hidden = torch.zeros_like(inputs["image_attention_mask"])
    with torch.no_grad():
        masked = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"], image_attention_mask=hidden).logits
        plain = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        seeing = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(masked, plain)
    assert not torch.allclose(seeing, plain)  # the images matter when tokens see them
