"""The seeds' training recipes (interleaf/recipes/seeds/) hold the seeds' hyperparameters.

tests/test_train_configs.py checks that every YAML validates; this file pins the values each
recipe takes from its seed document (IDEFICS model card, InfiMM model card, xGen-MM code, OpenFlamingo
facts in REFERENCE.md, the LLaVA-1.5 paper and scripts), so an edit that drifts from a seed fails here. The 80B / 7B variants that
the recipes give as override lines in their header comments are applied as written and checked too.
"""

from __future__ import annotations

import math
import os
import re

import pytest

from helpers.families import build_family

from interleaf.config import CrossAttentionConfig, ResamplerConfig
from interleaf.data.formats import map_image_path
from interleaf.presets import get_preset
from interleaf.recipes import ROOT
from interleaf.training import load_recipe
from interleaf.training.config import Recipe, StageConfig

SEEDS = ROOT / "seeds"
QA_PROMPT = "Answer the question using a single word or phrase."


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path) -> dict[str, str]:
    """Every ``${NAME}`` the seed configs read points at its own folder ``tmp_path/NAME``."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in SEEDS.rglob("*.yaml"))
    values = {}
    for name in sorted(set(re.findall(r"\$\{?([A-Za-z_]\w*)", text))):
        values[name] = str(tmp_path / name)
        monkeypatch.setenv(name, values[name])
    return values


def _load(rel: str, overrides: list[str] | None = None) -> Recipe:
    return load_recipe(SEEDS / rel, overrides)


def _comment_overrides(rel: str, tag: str) -> list[str]:
    """The ``key=value`` overrides on the recipe's ``#   TAG: ...`` comment lines, as written."""
    lines = [ln for ln in (SEEDS / rel).read_text(encoding="utf-8").splitlines() if ln.startswith(f"#   {tag}:")]
    assert lines, f"{rel} has no '#   {tag}:' override lines"
    return [tok for ln in lines for tok in ln.split(":", 1)[1].split()]


def _final_lr(stage: StageConfig) -> float:
    return stage.optim.lr * stage.optim.min_lr_ratio


def _expanded(value: str) -> str:
    return os.path.expandvars(value)


def _shared_seed_optim(stage: StageConfig) -> None:
    """AdamW (0.9, 0.999), weight decay 0.1: the IDEFICS and InfiMM cards agree."""
    assert stage.optim.betas == (0.9, 0.999)
    assert stage.optim.weight_decay == 0.1
    assert stage.precision == "bf16"
    assert stage.distributed.strategy == "fsdp"  # ZeRO-3 (IDEFICS) / ZeRO-2 (InfiMM)


# --------------------------------------------------------------------------- IDEFICS


def test_idefics_pretrain_stage_matches_the_model_card(env):
    recipe = _load("idefics/recipe.yaml")
    assert [s.name for s in recipe.stages] == ["pretrain", "instruct"]
    pt = recipe.stage("pretrain")
    _shared_seed_optim(pt)
    assert pt.model.preset == "idefics-9b"
    assert _expanded(pt.model.options["lm"]) == env["LLAMA_7B_DIR"]
    assert _expanded(pt.model.options["vision"]) == env["CLIP_VIT_H14_DIR"]
    assert pt.freeze == "flamingo"  # frozen backbones
    assert pt.optim.lr == pytest.approx(1e-5)
    assert _final_lr(pt) == pytest.approx(6e-6)
    assert pt.optim.schedule == "linear" and pt.optim.warmup_steps == 2000
    assert pt.optim.clip_grad_norm == 1.0
    assert pt.z_loss == pytest.approx(1e-3)
    assert pt.max_length == 1024 and pt.max_steps == 200_000
    assert pt.batch_size * pt.max_length == pytest.approx(1.31e6, rel=0.005)  # 1.31M tokens per step
    assert pt.gradient_checkpointing is True


def test_idefics_pretrain_mixture_has_the_cards_sources_and_shares(env):
    mix = _load("idefics/recipe.yaml").stage("pretrain").mixture(check_files=False)
    assert mix.max_length == 1024
    by_name = {s.name: s for s in mix.sources}
    assert {n: s.format for n, s in by_name.items()} == {
        "obelics": "interleaved", "wikipedia": "interleaved", "laion": "pairs", "pmd": "pairs",
    }
    assert {n: s.weight for n, s in by_name.items()} == {"obelics": 73.85, "wikipedia": 6.15, "laion": 17.18, "pmd": 2.82}
    assert all(s.loss_weight == 1.0 for s in mix.sources)  # no OpenFlamingo-style pair weighting
    assert by_name["obelics"].paths == [os.path.join(env["OBELICS_DIR"], "*.tar")]
    assert by_name["laion"].paths == [os.path.join(env["LAION_DIR"], "*.tar")]


def test_idefics_instruct_stage_unfreezes_everything_with_the_cards_values():
    recipe = _load("idefics/recipe.yaml")
    ins = recipe.stage("instruct")
    _shared_seed_optim(ins)
    assert ins.model.from_stage == "pretrain"
    assert ins.freeze == "all_trainable"
    assert ins.optim.lr == pytest.approx(1e-5) and _final_lr(ins) == pytest.approx(1.2e-6)
    assert ins.optim.schedule == "linear" and ins.optim.warmup_steps == 1000
    assert ins.z_loss == 0.0
    assert ins.max_length == 2048 and ins.max_steps == 22_000
    assert ins.batch_size * ins.max_length == pytest.approx(205e3, rel=0.005)
    mix = ins.mixture(check_files=False)
    weights = {s.name: s.weight for s in mix.sources}
    assert weights["ultrachat"] == 29.1 and weights["svit"] == 11.4 and weights["m3it"] == 7.7
    assert weights["pretrain_pairs"] == 5.1 and weights["pretrain_documents"] == 31.0
    assert sum(weights.values()) == pytest.approx(100.3)  # the card's ratios, as printed


def test_idefics_standalone_instruct_file_agrees_with_the_recipe(env):
    alone = _load("idefics/instruct.yaml").stages[0]
    in_recipe = _load("idefics/recipe.yaml").stage("instruct")
    assert _expanded(alone.model.path) == env["IDEFICS_9B_DIR"]
    for key in ("freeze", "optim", "batch_size", "max_steps", "max_length", "z_loss", "precision",
                "gradient_checkpointing", "distributed", "data"):
        assert getattr(alone, key) == getattr(in_recipe, key), key


def test_idefics_80b_override_lines_give_the_cards_80b_column(env):
    recipe = _load("idefics/recipe.yaml", _comment_overrides("idefics/recipe.yaml", "80B"))
    pt, ins = recipe.stage("pretrain"), recipe.stage("instruct")
    assert pt.model.preset == "idefics-80b"
    assert _expanded(pt.model.options["lm"]) == env["LLAMA_65B_DIR"]
    assert pt.optim.lr == pytest.approx(5e-5) and _final_lr(pt) == pytest.approx(3e-5)
    assert pt.batch_size * pt.max_length == pytest.approx(3.67e6, rel=0.005)
    assert ins.optim.lr == pytest.approx(3e-6) and _final_lr(ins) == pytest.approx(3.6e-7)
    assert ins.batch_size * ins.max_length == pytest.approx(613e3, rel=0.005)


# --------------------------------------------------------------------------- InfiMM


def test_infimm_stages_freeze_and_optimise_as_the_card_says():
    recipe = _load("infimm/recipe.yaml")
    assert [s.name for s in recipe.stages] == ["pt", "mtt", "ift"]
    pt, mtt, ift = recipe.stages
    assert [s.freeze for s in recipe.stages] == ["flamingo", "flamingo", "unfreeze_lm"]  # LLaMA trains in IFT
    assert [s.model.from_stage for s in recipe.stages] == [None, "pt", "mtt"]
    for s in recipe.stages:
        _shared_seed_optim(s)
        assert s.optim.schedule == "constant"
        assert s.max_length == 384  # 13B
        assert s.gradient_checkpointing is False
        assert s.grad_accum == 2
        assert s.optim.warmup_steps == round(0.005 * s.max_steps)  # "Warmup Step rate 0.005"
    assert pt.optim.lr == pytest.approx(1e-4) and pt.batch_size == 40 * 128
    assert ift.optim.lr == pytest.approx(1e-5) and ift.batch_size == 64
    assert mtt.optim.lr == pytest.approx(1e-5) and mtt.batch_size == 64


def test_infimm_model_is_the_codes_perceiver_and_cross_attention_every_two(env):
    spec = _load("infimm/recipe.yaml").stage("pt").model
    assert spec.preset is None and spec.path is None  # infimm-llama2-13b's tower is not public: the user's own
    assert _expanded(spec.options["lm"]) == env["LLAMA2_13B_DIR"]
    resampler = ResamplerConfig(**spec.options["resampler"])
    # what InfiMM's code builds and its checkpoints hold, as the infimm-* presets (not the card's 16 x 96)
    assert (resampler.depth, resampler.num_latents, resampler.heads, resampler.head_dim) == (6, 64, 8, 64)
    assert spec.options["resampler"] == {k: v for k, v in get_preset("infimm-zephyr-7b").resampler.items()}
    xattn = CrossAttentionConfig(**spec.options["cross_attention"])
    assert xattn.every_n_layers == 2 and xattn.gate_init == "zeros" and xattn.skip_rows_without_image


def test_infimm_pt_mixture_is_one_epoch_of_the_cards_samples():
    pt = _load("infimm/recipe.yaml").stage("pt")
    mix = pt.mixture(check_files=False)
    counts = {s.name: s.samples for s in mix.sources}
    assert counts == {
        "obelics": 101_000_000, "mmc4": 53_000_000, "laion": 115_000_000, "coyo": 238_000_000,
        "laion_coco": 140_000_000, "pmd": 20_000_000,
    }
    assert pt.max_steps == math.ceil(sum(counts.values()) / pt.batch_size)
    assert {s.format for s in mix.sources if s.name in ("obelics", "mmc4")} == {"interleaved"}


def test_infimm_every_stage_keeps_at_most_six_images():
    for stage in _load("infimm/recipe.yaml").stages:
        assert {s.max_images for s in stage.mixture(check_files=False).sources} == {6}, stage.name


def test_infimm_mtt_uses_the_cards_task_prompts():
    mix = _load("infimm/recipe.yaml").stage("mtt").mixture(check_files=False)
    prompts = {s.name: s.task_prompt for s in mix.sources}
    assert set(prompts) == {
        "coco_caption", "textcaps", "vizwiz_caption", "vqav2", "okvqa", "vizwiz_vqa", "textvqa", "ocrvqa",
        "stvqa", "docvqa", "gqa", "scienceqa_img",
    }
    for name in ("coco_caption", "textcaps", "vizwiz_caption"):
        assert prompts[name] == "Please describe the image."
    for name in ("vqav2", "okvqa", "textvqa", "ocrvqa", "stvqa", "docvqa", "gqa"):
        assert prompts[name] == QA_PROMPT
    assert prompts["vizwiz_vqa"] == "When the provided information is insufficient, respond with 'Unanswerable'. " + QA_PROMPT
    assert prompts["scienceqa_img"] == "Answer with the option's letter from the given choices directly."


def test_infimm_ift_is_llava_mix665k(env):
    ift = _load("infimm/recipe.yaml").stage("ift")
    (source,) = ift.mixture(check_files=False).sources
    assert source.format == "llava"
    assert source.paths == [os.path.join(env["LLAVA_DIR"], "llava_v1_5_mix665k.json")]
    assert ift.max_steps == math.ceil(665_000 / ift.batch_size)


def test_infimm_zephyr_override_lines_give_the_7b_recipe(env):
    recipe = _load("infimm/recipe.yaml", _comment_overrides("infimm/recipe.yaml", "7B"))
    pt = recipe.stage("pt")
    assert all(s.max_length == 792 for s in recipe.stages)
    assert _expanded(pt.model.options["lm"]) == env["ZEPHYR_7B_DIR"]
    assert pt.model.options["resampler"]["num_latents"] == 64  # the rest of the model is kept
    samples = {s.name: s.samples for s in pt.mixture(check_files=False).sources}
    assert "pmd" not in samples and len(samples) == 5  # PMD only for the 13B models
    assert pt.max_steps == math.ceil(sum(samples.values()) / pt.batch_size)
    assert pt.optim.warmup_steps == round(0.005 * pt.max_steps)
    assert recipe.stage("ift").freeze == "flamingo"  # a chat LM stays frozen in IFT


# --------------------------------------------------------------------------- xGen-MM


def test_xgen_mm_sft_optimiser_matches_its_code():
    (sft,) = _load("xgen_mm/sft.yaml").stages
    assert sft.optim.lr == pytest.approx(2e-5)
    assert sft.optim.schedule == "cosine" and sft.optim.warmup_steps == 2000
    assert sft.optim.weight_decay == 0.0
    assert sft.precision == "bf16" and sft.gradient_checkpointing is True
    assert sft.distributed.strategy == "fsdp"
    assert sft.batch_size == 8 * 8  # 8 per GPU on 8 GPUs
    assert sft.freeze == "projector_lm"  # everything but the vision encoder trains


def test_xgen_mm_sft_starts_from_the_converted_base_model(env):
    """The real architecture (token insertion: the token sampler, each <image> replaced by its
    tokens) comes with the base model's weights, converted; no stand-in is built."""
    (sft,) = _load("xgen_mm/sft.yaml").stages
    assert _expanded(sft.model.path) == env["XGENMM_BASE_DIR"] and sft.model.options == {}
    assert sft.model.preset is None


def test_xgen_mm_sft_runs_a_step_on_a_token_insertion_model(env, tmp_path, synth_corpus):
    """The recipe as written (its freeze policy, optimiser, schedule) on a tiny model with xGen-MM's
    placement saved where XGENMM_BASE_DIR points, on other data and a smaller batch."""
    import interleaf
    from interleaf.training import train

    corpus = synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)
    interleaf.save(*build_family("replace"), env["XGENMM_BASE_DIR"])
    [result] = train(SEEDS / "xgen_mm" / "sft.yaml", ["max_steps=1", "batch_size=2", "max_length=64", "precision=fp32"],
                     data=corpus / "llava" / "vqa_train.json", images=corpus / "images", out=tmp_path / "run",
                     progress=False)
    model = interleaf.load(result.final)[0]
    assert model.config.insertion_cfg.placement == "replace" and model.config.freeze == "projector_lm"


def test_xgen_mm_mixture_maps_llava_jsons_to_counts_and_image_paths(env):
    (sft,) = _load("xgen_mm/sft.yaml").stages
    mix = sft.mixture(check_files=False)
    assert mix.uses_counts and all(s.format == "llava" for s in mix.sources)
    counts = {s.name: s.samples for s in mix.sources}
    assert counts["llava_665k_sharegpt4v"] == 665_058 and counts["lima"] == 5000
    assert sft.max_steps == math.ceil(sum(counts.values()) / sft.batch_size)  # one epoch
    assert {s.max_images for s in mix.sources} == {4}
    main = mix.source("llava_665k_sharegpt4v")
    mapped = map_image_path("coco/train2017/000000033471.jpg", main.image_path_map)
    assert os.path.join(main.images_root, mapped) == os.path.join(
        env["BLIP3_DATA_DIR"], "coco", "images", "train2017", "000000033471.jpg"
    )
    assert map_image_path("vg/VG_100K/1.jpg", main.image_path_map) == "visual-genome/VG_100K/1.jpg"


# --------------------------------------------------------------------------- OpenFlamingo


def test_openflamingo_pretrain_matches_reference():
    (pt,) = _load("openflamingo/pretrain.yaml").stages
    assert pt.model.preset == "openflamingo-9b" and pt.freeze == "flamingo"
    assert pt.optim.lr == pytest.approx(1e-4) and pt.optim.schedule == "constant"
    assert 1875 <= pt.optim.warmup_steps <= 5000
    assert pt.optim.weight_decay == 0.1 and pt.optim.clip_grad_norm == 1.0
    mix = pt.mixture(check_files=False)
    assert mix.source("laion").format == "pairs" and mix.source("laion").loss_weight == pytest.approx(0.2)
    assert mix.source("mmc4").format == "interleaved" and mix.source("mmc4").max_images == 6
    assert pt.max_length == 256


# --------------------------------------------------------------------------- LLaVA-1.5


def test_llava_stages_train_the_projector_then_the_lm_with_the_papers_values(env):
    recipe = _load("llava/recipe.yaml")
    assert [s.name for s in recipe.stages] == ["pretrain", "instruct"]
    pt, ft = recipe.stages
    assert pt.model.preset == "llava-1.5-7b"
    assert _expanded(pt.model.options["vision"]) == env["CLIP_VIT_L14_336_DIR"]
    assert _expanded(pt.model.options["lm"]) == env["VICUNA_7B_DIR"]
    assert ft.model.from_stage == "pretrain"
    assert (pt.freeze, ft.freeze) == ("projector", "projector_lm")  # vision tower and LM frozen, then the LM unfrozen
    assert (pt.optim.lr, ft.optim.lr) == (pytest.approx(1e-3), pytest.approx(2e-5))
    assert (pt.batch_size, ft.batch_size) == (256, 128)  # 32 and 16 per GPU on 8 GPUs
    for stage, samples in ((pt, 558_128), (ft, 665_298)):  # one epoch
        assert stage.max_steps == math.ceil(samples / stage.batch_size)
        assert stage.optim.warmup_steps == round(0.03 * stage.max_steps)  # warmup ratio 0.03
        assert stage.optim.schedule == "cosine" and stage.optim.min_lr_ratio == 0.0
        assert stage.optim.weight_decay == 0.0 and stage.optim.betas == (0.9, 0.999)
        assert stage.max_length == 2048 and stage.precision == "bf16" and stage.gradient_checkpointing is True


def test_llava_data_is_lcs558k_then_the_665k_mix(env):
    recipe = _load("llava/recipe.yaml")
    (pairs,) = recipe.stage("pretrain").mixture(check_files=False).sources
    (mix,) = recipe.stage("instruct").mixture(check_files=False).sources
    assert pairs.format == mix.format == "llava" and pairs.max_images == mix.max_images == 1
    assert pairs.paths == [os.path.join(env["LLAVA_PRETRAIN_DIR"], "blip_laion_cc_sbu_558k.json")]
    assert pairs.images_root == os.path.join(env["LLAVA_PRETRAIN_DIR"], "images")
    assert mix.paths == [os.path.join(env["LLAVA_DIR"], "llava_v1_5_mix665k.json")] and mix.images_root == env["LLAVA_DIR"]


def test_llava_13b_override_lines_change_the_model_only(env):
    base = _load("llava/recipe.yaml")
    recipe = _load("llava/recipe.yaml", _comment_overrides("llava/recipe.yaml", "13B"))
    pt = recipe.stage("pretrain")
    assert pt.model.preset == "llava-1.5-13b" and _expanded(pt.model.options["lm"]) == env["VICUNA_13B_DIR"]
    for a, b in zip(base.stages, recipe.stages):
        assert (a.optim, a.batch_size, a.max_steps, a.freeze) == (b.optim, b.batch_size, b.max_steps, b.freeze)


def test_llava_stages_run_in_order_on_a_tiny_llava(env, tmp_path, synth_corpus):
    """Both stages as written (freeze policies, optimiser, the second built from the first) on a
    tiny LLaVA, other data and smaller batches: the projector alone moves, then the LM too."""
    import torch

    import interleaf
    from interleaf.training import train

    corpus = synth_corpus.get(n_train_scenes=40, n_heldout_scenes=10)
    interleaf.save(*build_family("expand"), tmp_path / "start")
    small = [f"stages.{s}.{k}" for s in ("pretrain", "instruct") for k in ("max_steps=1", "batch_size=2",
                                                                            "max_length=64", "precision=fp32")]
    pt, ft = train(SEEDS / "llava" / "recipe.yaml", small, model=tmp_path / "start",
                   data=corpus / "llava" / "vqa_train.json", images=corpus / "images", out=tmp_path / "run",
                   progress=False)
    start, after_pt, after_ft = (interleaf.load(p)[0].state_dict() for p in (tmp_path / "start", pt.final, ft.final))
    moved = lambda a, b, prefix: any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))  # noqa: E731
    assert moved(start, after_pt, "projector.") and not moved(start, after_pt, "language_model.model.layers.")
    assert moved(after_pt, after_ft, "language_model.model.layers.")
    assert not moved(start, after_ft, "vision_tower.")
