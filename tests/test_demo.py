"""The demo pipeline end to end, with a tiny corpus and a few steps per stage (the real run is `make demo`)."""

from __future__ import annotations

import json
import os

import pytest

from interleaf.demo import CORPUS_ENV, run_demo


def _exact_match_by_hand(eval_dir, corpus) -> tuple[float, dict[str, float]]:
    """The demo's written predictions scored against the corpus's answers: overall and per question type."""
    from interleaf.evaluation.metrics.vqa import exact_match

    truth = {e["id"]: e for e in json.loads((corpus / "llava" / "vqa_heldout.json").read_text())}
    rows = [json.loads(line) for path in sorted((eval_dir / "samples" / "synth-vqa").glob("*.jsonl"))
            for line in path.read_text().splitlines()]
    assert sorted(r["source_id"] for r in rows) == sorted(truth)  # every held-out question, once
    hits: dict[str, list[float]] = {}
    for r in rows:
        entry = truth[r["source_id"]]
        hits.setdefault(entry["qtype"], []).append(exact_match(r["pred"], entry["conversations"][1]["value"]))
    overall = [h for values in hits.values() for h in values]
    return sum(overall) / len(overall), {q: sum(v) / len(v) for q, v in hits.items()}


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    steps = [f"stages.{i}.max_steps=3" for i in range(4)]
    metrics = run_demo(tmp_path / "demo", train_scenes=200, heldout_scenes=20, overrides=steps, progress=False)
    out = tmp_path / "demo"
    assert CORPUS_ENV not in os.environ  # set for the training run only
    assert metrics["stages"] == ["lm", "pt", "mtt", "ift"]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["heldout_vqa_per_question_type"]) == {"colour", "shape", "count", "position", "yesno"}
    overall, per_type = _exact_match_by_hand(out / "eval", out / "corpus")
    assert saved["heldout_vqa_exact_match"] == pytest.approx(overall)
    assert saved["heldout_vqa_per_question_type"] == pytest.approx(per_type)
    blank_overall, blank_per_type = _exact_match_by_hand(out / "eval_blank", out / "corpus_blank")
    assert saved["blank_images_vqa_exact_match"] == pytest.approx(blank_overall)
    assert saved["blank_images_per_question_type"] == pytest.approx(blank_per_type)
    assert saved["n_questions"] == len(json.loads((out / "corpus" / "llava" / "vqa_heldout.json").read_text()))
    assert "caption_cider" in saved
    assert (out / "final" / "config.json").exists()
    for stage in ("lm", "pt", "mtt", "ift"):
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
    report = (out / "report.html").read_text()
    assert "<svg" in report and report.count("<figure") >= 10 and "data:image/png;base64," in report


@pytest.mark.slow
def test_demo_command_runs_a_recipe_of_your_own(tmp_path, monkeypatch):
    """`interleaf demo --recipe`: the same corpus, tokenizer and evaluation around another recipe."""
    import shutil

    import yaml
    from typer.testing import CliRunner

    from interleaf.cli import app
    from interleaf.demo import _recipe_path

    recipe_dir = tmp_path / "recipe"
    shutil.copytree(_recipe_path().parent, recipe_dir)
    recipe = yaml.safe_load((recipe_dir / "recipe.yaml").read_text())
    recipe["stages"] = recipe["stages"][:2]  # lm -> pt only
    for stage in recipe["stages"]:
        stage["max_steps"] = 2
    (recipe_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "demo"
    monkeypatch.setenv(CORPUS_ENV, str(tmp_path / "the caller's corpus"))
    args = ["demo", "--out", str(out), "--recipe", str(recipe_dir / "recipe.yaml"),
            "--train-scenes", "100", "--heldout-scenes", "20"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] == ["lm", "pt"]
    assert not (out / "mtt").exists() and (out / "final" / "config.json").exists()
    assert os.environ[CORPUS_ENV] == str(tmp_path / "the caller's corpus")  # the run used its own, then restored this


@pytest.mark.slow
def test_demo_command_with_token_insertion_runs_its_own_recipe_and_writes_its_report(tmp_path, monkeypatch):
    """`interleaf demo --fusion token_insertion`: the packaged recipe of that family, at its smallest,
    through the same corpus, trainer, evaluation and report."""
    from typer.testing import CliRunner

    from interleaf.cli import app

    monkeypatch.delenv(CORPUS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the default output folder is relative to the working folder
    steps = [arg for i in range(4) for arg in ("--set", f"stages.{i}.max_steps=1")]
    args = ["demo", "--fusion", "token_insertion", "--train-scenes", "100", "--heldout-scenes", "20", *steps]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "demo_token_insertion"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] == ["lm", "pt", "mtt", "ift"] and metrics["fusion"] == "token_insertion"
    assert set(metrics["heldout_vqa_per_question_type"]) == {"colour", "shape", "count", "position", "yesno"}
    assert metrics["heldout_vqa_exact_match"] == pytest.approx(_exact_match_by_hand(out / "eval", out / "corpus")[0])
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["fusion"] == "token_insertion" and config["vision"]["kind"] == "builtin"
    assert config["projector"]["kind"] == "mlp2x_gelu" and config["insertion"]["placement"] == "expand"
    for stage in metrics["stages"]:
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
    report = (out / "report.html").read_text()
    assert "(token insertion)" in report and "<svg" in report and "data:image/png;base64," in report
    assert CORPUS_ENV not in os.environ
    assert not (tmp_path / "runs" / "demo").exists()


def test_the_fusion_chooses_the_packaged_recipe_of_its_family():
    from interleaf.demo import _recipe_path
    from interleaf.recipes import resolve

    assert _recipe_path() == _recipe_path(fusion="cross_attention") == resolve("demo")
    assert _recipe_path(fusion="token_insertion") == resolve("demo_token_insertion")


def test_an_unknown_fusion_or_a_fusion_with_a_recipe_fails_before_writing_anything(tmp_path):
    from interleaf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"field 'fusion': 'llava' is not a fusion family \(use one of "
                       r"\['cross_attention', 'token_insertion'\]\)"):
        run_demo(tmp_path / "demo", fusion="llava", progress=False)
    with pytest.raises(ConfigError, match=r"field 'fusion': is given with a recipe of your own.*pass either fusion"):
        run_demo(tmp_path / "demo", fusion="token_insertion", recipe="demo", progress=False)
    assert not (tmp_path / "demo").exists()


def test_demo_command_names_a_bad_fusion(tmp_path, capsys):
    from interleaf.cli import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "demo"), "--fusion", "gated"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'gated' is not a fusion family" in err and "token_insertion" in err
    assert not (tmp_path / "demo").exists()


def test_text_corpus_is_captions_and_reading_comprehension_of_training_scenes(tmp_path, synth_corpus):
    from interleaf.data.synth import CAPTION_PROMPT, Scene, caption, located_caption
    from interleaf.demo import TEXT_QA_TYPES, write_text_corpus

    corpus = synth_corpus.copy(tmp_path / "corpus", n_train_scenes=60, n_heldout_scenes=10)  # written into below
    entries = json.loads(write_text_corpus(corpus).read_text())
    scenes = {k: Scene.from_dict(v) for k, v in json.loads((corpus / "scenes.json").read_text()).items()}
    train_captions = {caption(s) for k, s in scenes.items() if k.startswith("train/")}
    vqa = {e["id"]: e for e in json.loads((corpus / "llava" / "vqa_train.json").read_text())}
    captions = [e for e in entries if e["id"].startswith("text-caption-")]
    assert {e["conversations"][1]["value"] for e in captions} == train_captions
    assert all(e["conversations"][0]["value"] == CAPTION_PROMPT for e in captions)
    questions = [e for e in entries if not e["id"].startswith("text-caption-")]
    assert len(questions) == sum(e["qtype"] in TEXT_QA_TYPES for e in vqa.values()) > 0
    assert "yesno" not in TEXT_QA_TYPES
    for e in questions:
        source = vqa[e["id"].removeprefix("text-")]
        asked = source["conversations"][0]["value"].removeprefix("<image>\n")
        # the question comes after a description of its own scene, and keeps its answer
        assert e["conversations"][0]["value"] == f"{located_caption(scenes[source['image']])} {asked}"
        assert e["conversations"][1]["value"] == source["conversations"][1]["value"]


def test_demo_with_a_missing_recipe_fails_before_writing_anything(tmp_path):
    from interleaf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"field 'recipe': '.*nope\.yaml' is not an existing file and not the name "
                       r"of a packaged recipe; packaged recipes: demo, .*\(pass one of these names.*or the path of your own"):
        run_demo(tmp_path / "demo", recipe=tmp_path / "nope.yaml", progress=False)
    assert not (tmp_path / "demo").exists()


def test_a_failing_training_run_restores_the_corpus_variable(tmp_path, monkeypatch):
    from interleaf.errors import ConfigError

    monkeypatch.setenv(CORPUS_ENV, "the caller's value")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stages:\n  - name: lm\n    model: {preset: tiny-random}\n    not_an_option: 1\n")
    with pytest.raises(ConfigError, match="not_an_option"):
        run_demo(tmp_path / "demo", recipe=recipe, train_scenes=10, heldout_scenes=4, progress=False)
    assert os.environ[CORPUS_ENV] == "the caller's value"
