"""LoRA: exact targets per part in both fusion families (checked against PEFT's own matching), the
trainable parameters of a LoRA stage, adapters saved with the model, loaded, merged (the merged
model's logits equal the adapter model's), a resumed run equal to an uninterrupted one, bad configs."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.families import FAMILIES, POLICIES, build_family, stage_model
from helpers.training import train_with_torchrun
from safetensors.torch import load_file

import peft

import interleaf
from interleaf.errors import CheckpointError, ConfigError
from interleaf.model import lora
from interleaf.training import train
from interleaf.training import checkpoint as ckpt
from interleaf.training.config import load_recipe


# the part each combination names, and the module prefix every one of its layers must have
COMBOS = (["lm_attention"], ["lm_mlp"], ["lm_attention", "lm_mlp"], ["resampler"], ["vision"],
          ["cross_attention"], ["lm_attention", "cross_attention", "resampler", "vision"])


def _expected(model: nn.Module, parts: list[str]) -> set[str]:
    """The linear layers of ``parts``, by a rule written from the tiny models' layouts (LLaMA LMs)."""
    connector = "projector." if model.config.fusion == "token_insertion" else "resampler."
    rules = {
        "lm_attention": lambda n: n.startswith("language_model.") and ".self_attn." in n and ".cross_attention." not in n,
        "lm_mlp": lambda n: n.startswith("language_model.") and ".mlp." in n and ".cross_attention." not in n,
        "cross_attention": lambda n: ".cross_attention." in n,
        "resampler": lambda n: n.startswith(connector),
        "vision": lambda n: n.startswith("vision_tower."),
    }
    unused = {id(p) for p in getattr(model.vision_tower.backbone, "unused_parameters", list)()}
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(rules[p](n) for p in parts) and id(m.weight) not in unused}


def _combos(family: str):
    return [c for c in COMBOS if family == "cross_attention" or "cross_attention" not in c]


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_are_exactly_the_named_parts_and_peft_agrees(family):
    model, _ = build_family(family)
    for parts in _combos(family):
        names = interleaf.lora_targets(model, parts)
        assert set(names) == _expected(model, parts), parts
        # PEFT's own get_peft_model with these names adapts exactly them, nothing else
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=names))
        assert sorted(peft_model.targeted_module_names) == names, parts
        adapted = {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
                   for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_A." in n}
        assert adapted == set(names)


def test_bare_layer_names_collide_and_part_names_do_not():
    """``q_proj`` alone also matches the resampler and the cross-attention blocks: the trap the parts avoid."""
    model, _ = build_family("cross_attention")
    bare = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert any(n.startswith("resampler.") for n in bare.targeted_module_names)
    assert any(".cross_attention." in n for n in bare.targeted_module_names)
    names = interleaf.lora_targets(model, ["lm_attention"])
    assert all(n.startswith("language_model.") and ".cross_attention." not in n for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_parameters_follow_the_parts_and_the_freeze_policy(family):
    for parts in _combos(family):
        model, _ = build_family(family)
        model.apply_freeze(POLICIES[family][1])  # the connector (and cross-attention, token rows) in full
        before = {n for n, p in model.named_parameters() if p.requires_grad}
        targets = lora.add_lora(model, parts, rank=2)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        adapters = {n for n in trainable if ".lora_" in n}
        assert adapters == {f"{t}.lora_{ab}.default.weight" for t in targets for ab in "AB"}
        full = trainable - adapters
        assert full <= before  # nothing starts training in full
        assert not any(n.startswith("vision_tower.") for n in full)
        for t in targets:  # an adapted layer's own weights are frozen
            assert not any(n.startswith(f"{t}.base_layer.") for n in full)
        if any(p.startswith("lm_") for p in parts):  # the LM's own weights, but its added token rows, are frozen
            assert all(".cross_attention." in n or n.endswith(".extra") for n in full if n.startswith("language_model."))
        # what the policy trains and no adapter covers still trains in full
        covered = {n for n in before if any(n.startswith(f"{t}.") for t in targets)}
        kept = {n for n in before - covered if not n.startswith("language_model.") or ".cross_attention." in n
                or n.endswith(".extra") or not any(p.startswith("lm_") for p in parts)}
        assert {n.replace(".base_layer.", ".") for n in full} == kept


def test_peft_modules_to_save_trains_the_flamingo_parts_in_full():
    """The documented pattern for PEFT's own get_peft_model: adapters on the LM, the resampler and the
    cross-attention blocks in full; the vision tower untouched; outputs unchanged before training."""
    model, processor = build_family("cross_attention")
    names = interleaf.lora_targets(model, ["lm_attention", "lm_mlp"])
    config = peft.LoraConfig(r=4, target_modules=names, modules_to_save=["resampler", "cross_attention"])
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    full = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
            if p.requires_grad and ".lora_" not in n}
    assert full and all(n.startswith("resampler.modules_to_save.") or ".cross_attention.modules_to_save." in n
                        for n in full)
    assert sorted(peft_model.targeted_module_names) == names
    inputs = _batch(processor, model)
    torch.testing.assert_close(_logits(peft_model, inputs), _logits(model, inputs), rtol=0, atol=0)


def test_unknown_parts_and_missing_parts_are_config_errors():
    model, _ = build_family("expand")
    with pytest.raises(ConfigError, match=r"lora.parts\[1\].*unknown part 'mlp'.*lm_mlp"):
        interleaf.lora_targets(model, ["lm_attention", "mlp"])
    with pytest.raises(ConfigError, match="cross_attention.*no cross-attention blocks"):
        interleaf.lora_targets(model, ["cross_attention"])
    with pytest.raises(ConfigError, match="names no part"):
        interleaf.lora_targets(model, [])


# --------------------------------------------------------------------------- training stages


@pytest.fixture(scope="module")
def corpus(synth_corpus, tmp_path_factory):
    root = synth_corpus.copy(tmp_path_factory.mktemp("corpus") / "corpus", n_train_scenes=40, n_heldout_scenes=10)
    entries = json.loads((root / "llava" / "vqa_train.json").read_text())
    (root / "eight.json").write_text(json.dumps(entries[:8]))
    return root


def _stage(corpus: Path, out: Path, family: str, **kw) -> dict:
    d = {
        "model": stage_model(family),
        "data": {"sources": [{"name": "vqa", "format": "llava", "paths": str(corpus / "eight.json"),
                              "images_root": str(corpus / "images")}]},
        "freeze": POLICIES[family][1],
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "parts": ["lm_attention", "lm_mlp"]},
        "optim": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1},
        "batch_size": 2, "max_steps": 4, "max_length": 48 + (15 if family != "cross_attention" else 0), "log_every": 1,
        "checkpoint": {"every": 2, "keep_last": 2}, "out": str(out),
    }
    d.update(kw)
    return d


def _batch(processor, model):
    from PIL import Image

    image = Image.new("RGB", (40, 30), (200, 30, 60))
    return processor([["A picture:", image, "of a red square"], ["Text only here"]], return_tensors="pt")


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_saves_adapters_that_load_and_merge(corpus, tmp_path, family):
    [result] = train(_stage(corpus, tmp_path / "run", family), progress=False)
    final = result.final
    assert {"config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in final.iterdir()}
    # the checkpoints hold exactly the stage's trainable weights: adapters, connector, token rows
    saved = load_file(str(ckpt.list_checkpoints(result.out)[-1] / "trainable.safetensors"))
    assert any(".lora_A." in n for n in saved) and not any(n.startswith("vision_tower.") for n in saved)
    assert not any(".base_layer." in n for n in saved)

    model, processor = interleaf.load(final)  # the base model with its adapters attached, unmerged
    assert isinstance(model, interleaf.InterleafForConditionalGeneration) and lora.has_adapters(model)
    inputs = _batch(processor, model)
    adapted = _logits(model, inputs)
    # PEFT reads the directory's adapters onto its base model (the directory without its adapter files)
    base_dir = tmp_path / "base"
    shutil.copytree(final, base_dir, ignore=shutil.ignore_patterns("adapter_*"))
    base, _ = interleaf.load(base_dir)
    assert not lora.has_adapters(base)
    peft_model = peft.PeftModel.from_pretrained(base, final)
    torch.testing.assert_close(_logits(peft_model, inputs), adapted, rtol=0, atol=1e-5)
    assert not torch.allclose(_plain(base_dir, inputs),
                              adapted, atol=1e-4)  # the adapters changed the model
    # a loaded adapted model saves again as it was
    interleaf.save(model, processor, tmp_path / "again")
    again, _ = interleaf.load(tmp_path / "again")
    assert lora.has_adapters(again)
    torch.testing.assert_close(_logits(again, inputs), adapted, rtol=0, atol=0)

    from interleaf.cli import main

    merged_dir = tmp_path / "merged"
    with pytest.raises(SystemExit) as e:
        main(["merge-lora", str(final), str(merged_dir)])
    assert e.value.code == 0
    assert not (merged_dir / "adapter_config.json").exists()
    merged, _ = interleaf.load(merged_dir)
    assert not lora.has_adapters(merged)
    assert not any(".lora_" in n or ".base_layer." in n for n in merged.state_dict())
    torch.testing.assert_close(_logits(merged, inputs), adapted, rtol=0, atol=1e-5)
    # generation with the adapters attached gives the merged model's tokens
    prompt = {k: v[:1] for k, v in inputs.items()}
    with torch.no_grad():
        torch.testing.assert_close(model.generate(**prompt, max_new_tokens=4, do_sample=False),
                                   merged.generate(**prompt, max_new_tokens=4, do_sample=False))


def _plain(directory: Path, inputs) -> torch.Tensor:
    return _logits(interleaf.load(directory)[0], inputs)


@pytest.mark.parametrize("family", ["cross_attention", "expand"])
def test_resumed_lora_run_equals_an_uninterrupted_one(corpus, tmp_path, capsys, family):
    [reference] = train(_stage(corpus, tmp_path / "reference", family), progress=False)
    out = tmp_path / "resumed"
    train(_stage(corpus, out, family), progress=False)
    # undo the run's second half: it resumes from the checkpoint of step 2
    shutil.rmtree(out / "final")
    shutil.rmtree(ckpt.list_checkpoints(out)[-1])
    (out / "summary.json").unlink()
    capsys.readouterr()
    [resumed] = train(_stage(corpus, out, family), resume=True, progress=False)
    assert "at step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_losses = [json.loads(line)["loss"] for line in (reference.out / "metrics.jsonl").read_text().splitlines()]
    assert losses[4:] == ref_losses[2:]
    for name in ("model.safetensors", "adapter_model.safetensors"):
        a, b = load_file(str(resumed.final / name)), load_file(str(reference.final / name))
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], name


def test_a_stage_from_an_adapter_directory_starts_from_the_merged_model(corpus, tmp_path):
    [first] = train(_stage(corpus, tmp_path / "first", "cross_attention", max_steps=2), progress=False)
    model, processor = interleaf.load(first.final)
    inputs = _batch(processor, model)
    adapted = _logits(model, inputs)
    from interleaf.training.prepare import _build_model

    stage = load_recipe(_stage(corpus, tmp_path / "second", "cross_attention", model={"path": str(first.final)})).stages[0]
    started, _ = _build_model(stage, {})
    assert not lora.has_adapters(started)
    torch.testing.assert_close(_logits(started, inputs), adapted, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("section, match", [
    ({"parts": ["lm_attention", "mlp"]}, r"lora.parts\[1\].*'mlp'.*lm_mlp"),
    ({"rank": 0}, r"lora.rank.*0"),
    ({"rank": -4}, r"lora.rank"),
    ({"alpha": 0}, r"lora.alpha"),
    ({"dropout": 1.0}, r"lora.dropout.*below 1"),
    ({"parts": []}, r"lora.parts"),
    ({"parts": ["vision", "vision"]}, r"lora.parts.*twice"),
    ({"quantize": "8bit"}, r"lora.quantize"),
    ({"ranks": 4}, r"ranks.*rank"),
])
def test_bad_lora_sections_are_config_errors(tmp_path, section, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe({"name": "s", "lora": section, "out": str(tmp_path)})


def test_quantize_on_cpu_is_refused_before_training(corpus, tmp_path):
    stage = _stage(corpus, tmp_path / "q", "expand")
    stage["lora"] = {**stage["lora"], "quantize": "4bit"}
    with pytest.raises(ConfigError, match=r"lora.quantize.*needs a CUDA GPU.*remove lora.quantize"):
        train(stage, progress=False)
    assert not (tmp_path / "q" / "final").exists()


def test_lora_part_the_model_lacks_is_a_config_error(corpus, tmp_path):
    stage = _stage(corpus, tmp_path / "x", "expand")
    stage["lora"] = {**stage["lora"], "parts": ["cross_attention"]}
    with pytest.raises(ConfigError, match="lora.parts.*cross_attention.*no cross-attention blocks"):
        train(stage, progress=False)


def test_adapter_directories_without_peft_or_base_are_refused(corpus, tmp_path, monkeypatch):
    model, processor = build_family("expand")
    lora.add_lora(model, ["lm_attention"], rank=2)
    interleaf.save(model, processor, tmp_path / "adapted")
    # an adapter-only directory (PEFT's own save) whose adapter_config names no local base model
    only = tmp_path / "only"
    only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapted" / name, only / name)
    with pytest.raises(CheckpointError, match="names no local base model.*base_model_name_or_path"):
        interleaf.load(only)
    config = json.loads((only / "adapter_config.json").read_text())
    (only / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "adapted")}))
    loaded, _ = interleaf.load(only)
    assert lora.has_adapters(loaded)
    from interleaf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["merge-lora", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert e.value.code == 2
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(CheckpointError, match="adapters.*need peft.*pip install"):
        interleaf.load(tmp_path / "adapted")


# --------------------------------------------------------------------------- DPO and several processes


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """Four one-colour images and eight preference pairs: chosen names the image's colour."""
    from PIL import Image

    root = tmp_path_factory.mktemp("prefs")
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
    (root / "images").mkdir()
    for name, rgb in colours.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{name}.png")
    names = list(colours)
    pairs = [{"id": f"p{i}", "image": f"{names[i % 4]}.png", "prompt": "<image>\nWhat colour is the image?",
              "chosen": names[i % 4], "rejected": names[(i + 1) % 4]} for i in range(8)]
    (root / "prefs.json").write_text(json.dumps(pairs))
    return root


@pytest.mark.parametrize("reference", ["model", "cached"])
def test_dpo_stage_trains_adapters(prefs, tmp_path, reference):
    stage = _stage(prefs, tmp_path / "dpo", "expand", objective="dpo", dpo={"beta": 0.5, "reference": reference},
                   data={"sources": [{"name": "p", "format": "preference", "paths": str(prefs / "prefs.json"),
                                      "images_root": str(prefs / "images")}]},
                   max_length=79, max_steps=6, batch_size=4, checkpoint={"every": None})
    [result] = train(stage, progress=False)
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # adapters start at zero: policy = reference
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    model, _ = interleaf.load(result.final)
    assert lora.has_adapters(model)


@pytest.mark.slow
def test_ddp_and_fsdp_lora_stages_match_a_single_process(corpus, tmp_path):
    """torchrun with 2 processes (gloo on CPU): the loss curve of one process with the same global
    batch (summation order differs: 1e-4 relative), and a final directory with the adapters."""
    import yaml

    # no dropout: each process draws the dropout masks of its own half of the batch
    lora_section = {"rank": 4, "alpha": 8, "dropout": 0.0, "parts": ["lm_attention", "lm_mlp"]}
    stage = {k: v for k, v in _stage(corpus, tmp_path, "cross_attention", checkpoint={"every": None},
                                     lora=lora_section).items() if k != "out"}
    stages = [{"name": s, "distributed": {"strategy": s}} for s in ("ddp", "fsdp")]
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({**stage, "out": str(tmp_path / "multi"), "stages": stages}))
    train_with_torchrun(config)
    [single] = train({**stage, "out": str(tmp_path / "single")}, progress=False)
    expected = [json.loads(x)["loss"] for x in (single.out / "metrics.jsonl").read_text().splitlines()]
    reference, _ = interleaf.load(single.final)
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / "multi" / strategy
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert losses == pytest.approx(expected, rel=1e-4, abs=1e-6), strategy
        model, processor = interleaf.load(out / "final")
        assert lora.has_adapters(model)
        inputs = _batch(processor, model)
        torch.testing.assert_close(_logits(model, inputs), _logits(reference, inputs), rtol=1e-3, atol=1e-4)
