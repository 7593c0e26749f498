"""`interleaf data synth` and `interleaf data inspect`: counts, rendered samples with trained tokens, bad samples."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import yaml
from helpers.families import FAMILIES, build_family
from typer.testing import CliRunner

import interleaf
from interleaf.cli import app
from interleaf.errors import ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "corpus"
    result = runner.invoke(app, ["data", "synth", str(root), "--train-scenes", "20", "--heldout-scenes", "5",
                                 "--image-size", "32", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "pairs" in result.output and "20" in result.output
    return root


def test_synth_writes_the_corpus(corpus):
    manifest = json.loads((corpus / "corpus.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"]["pairs"] == 20 and manifest["counts"]["heldout_scenes"] == 5


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_a_pairs_shard_shows_trained_tokens(corpus, tmp_path, family):
    model = {"cross_attention": [], "expand": ["-m", "tiny-llava"]}.get(family)
    if model is None:  # a family without a preset of its own: a saved model directory
        interleaf.save(*build_family(family), tmp_path / "model")
        model = ["-m", str(tmp_path / "model")]
    result = runner.invoke(app, ["data", "inspect", str(corpus / "pairs" / "train-000000.tar"), "-n", "2", *model])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "== pairs (pairs): 20 samples in 1 file(s)" in out
    with tarfile.open(corpus / "pairs" / "train-000000.tar") as tar:
        first_caption = tar.extractfile("train-000000.txt").read().decode()
    expected = {  # each family's spelling of a captioned image (LLaVA's 16 image tokens shown with their count)
        "cross_attention": f"<s><image>[[{first_caption}<|endofchunk|></s>]]",
        "expand": f"<s><image>*16[[{first_caption}</s>]]",
        "replace": f"<s><image>[[{first_caption}</s>]]",
    }
    assert expected[family] in out
    assert ("prompt format 'llava'" in out) == (family != "cross_attention")
    assert out.count("-- sample") == 2 and "scanned 20: 20 good, 0 bad" in out


def test_inspect_llava_and_documents(corpus):
    result = runner.invoke(app, ["data", "inspect", str(corpus / "llava" / "vqa_train.json"), "-n", "1", "--scan", "10"])
    assert "scanned 10: 10 good, 0 bad" in result.output  # a synth corpus's images/ is found without --images-root
    assert result.exit_code == 0, result.output
    assert "== llava (llava): 100 samples" in result.output
    assert "<|assistant|>\n[[" in result.output and "<|endofchunk|><image>" in result.output
    result = runner.invoke(app, ["data", "inspect", str(corpus / "interleaved" / "*.tar"), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "(interleaved)" in result.output and "<|endofchunk|>]]<image>[[" in result.output


def test_inspect_a_mixture_reports_bad_samples(corpus, tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in [("x1.png", b"garbage"), ("x1.txt", b"a broken image."), ("x2.txt", b"no image.")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    mix = {"max_length": 48, "sources": [
        {"name": "good", "format": "pairs", "paths": str(corpus / "pairs" / "*.tar"), "samples": 10, "loss_weight": 0.2},
        {"name": "broken", "format": "pairs", "paths": "bad.tar", "samples": 2},
    ]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "mix.yaml"), "-n", "1"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "2 source(s); max_length 48" in out and "10 per epoch; loss weight 0.2" in out
    assert "broken  missing_file" in out and "broken  unreadable_image" in out
    assert "broken: unreadable_image: " in out and "bad.tar:x1" in out
    assert "scanned 2: 0 good, 2 bad" in out


def test_inspect_errors_name_the_problem(corpus, tmp_path):
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "nothing.tar")])
    assert result.exit_code != 0 and "matches no file" in str(result.exception)
    result = runner.invoke(app, ["data", "inspect", str(corpus / "pairs" / "train-000000.tar"), "--format", "pics"])
    assert isinstance(result.exception, ConfigError) and "sources[0].format" in str(result.exception)


@pytest.mark.parametrize("model, expected", [
    ("runs/never-written", "'runs/never-written' is not a directory"),  # a path: must exist
    ("no-such-preset", "neither a local directory nor a preset name"),  # a bare name: must be a preset
])
def test_model_option_names_a_directory_or_a_preset_by_the_training_rule(corpus, tmp_path, monkeypatch, model, expected):
    from interleaf.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["data", "inspect", str(corpus / "pairs" / "train-000000.tar"), "-m", model])
    assert isinstance(result.exception, CheckpointError), result.output
    assert expected in str(result.exception) and "interleaf presets" in str(result.exception)
