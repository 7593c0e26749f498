"""Model cards: every saved directory's README.md parses with huggingface_hub and carries the
hub's metadata; a user's README is kept; training and evaluation fill their sections; `push` is
refused offline and never reaches the network in tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.llava import save_reference
from huggingface_hub import ModelCard
from tiny import tiny_llava

import interleaf
from interleaf.cards import CARD_MARKER, hub_id, push, write_model_card
from interleaf.cli import main
from interleaf.convert import from_llava
from interleaf.errors import InputError
from interleaf.training import train


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, processor = interleaf.build("tiny-random")
    path = tmp_path_factory.mktemp("saved") / "model"
    interleaf.save(model, processor, path)
    return path


def _copy(saved: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in saved.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_save_writes_a_card_the_hub_library_parses(saved):
    card = ModelCard.load(saved / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "interleaf" and data["pipeline_tag"] == "image-text-to-text"
    assert {"interleaf", "cross-attention"} <= set(data["tags"])
    assert "license" not in data  # the owner's choice: a comment in the metadata, never a value
    text = (saved / "README.md").read_text()
    assert "\n# license:" in text.split("\n---\n")[0] and CARD_MARKER in card.text
    assert "interleaf.load" in card.text and "cross_attention" in card.text


def test_base_models_datasets_and_a_converted_source(saved, tmp_path):
    path = _copy(saved, tmp_path / "m")
    write_model_card(path, base_model="openai/clip-vit-large-patch14", datasets=["HuggingFaceM4/the_cauldron"],
                     converted_from="/cache/hub/models--llava-hf--llava-1.5-7b-hf/snapshots/abc123")
    data = ModelCard.load(path / "README.md").data
    assert data.base_model == ["openai/clip-vit-large-patch14", "llava-hf/llava-1.5-7b-hf"]
    assert data.datasets == ["HuggingFaceM4/the_cauldron"]
    assert "models--llava-hf--llava-1.5-7b-hf" in (path / "README.md").read_text()


def test_a_converters_output_names_its_source(tmp_path):
    reference, tok = tiny_llava()
    src = tmp_path / "hub" / "models--llava-hf--llava-tiny" / "snapshots" / "0123"  # a hub cache folder
    save_reference(reference, tok, src, "save_pretrained")
    from_llava(src, tmp_path / "out")
    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.base_model == ["llava-hf/llava-tiny"] and "token-insertion" in data.tags
    assert f"converted from `{src}`" in (tmp_path / "out" / "README.md").read_text()


def test_only_hub_ids_become_base_models(tmp_path):
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert hub_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert hub_id("/home/me/.cache/huggingface/hub/models--Salesforce--xgen-mm-phi3/snapshots/1/") \
        == "Salesforce/xgen-mm-phi3"
    assert hub_id(tmp_path / "owner" / "name") is None and hub_id("/abs/path") is None
    assert hub_id("") is None and hub_id(None) is None and hub_id("just-a-name") is None


def test_a_users_readme_is_kept_and_interleafs_keeps_the_licence(saved, tmp_path, caplog):
    mine = _copy(saved, tmp_path / "mine")
    own = "# My model\n\nWritten by hand.\n"
    (mine / "README.md").write_text(own)
    model, processor = interleaf.load(mine)
    with caplog.at_level("INFO", logger="interleaf.cards"):
        interleaf.save(model, processor, mine)
    assert (mine / "README.md").read_text() == own
    assert "kept" in caplog.text
    ours = _copy(saved, tmp_path / "ours")
    text = (ours / "README.md").read_text().replace("library_name: interleaf", "library_name: interleaf\nlicense: mit")
    (ours / "README.md").write_text(text)
    write_model_card(ours, datasets="a/b")
    data = ModelCard.load(ours / "README.md").data
    assert data.license == "mit" and data.datasets == ["a/b"]
    assert "# license:" not in (ours / "README.md").read_text()


def test_evaluation_results_become_the_model_index(saved, tmp_path):
    path = _copy(saved, tmp_path / "m")
    results = {"results": {"synth-vqa": {"metric": "vqa_accuracy", "n_examples": 8, "shots": {
        "0": {"mean": 0.25, "std": 0.0, "n_trials": 1, "groups": {}, "trials": []},
        "4": {"mean": 0.5, "std": 0.1, "n_trials": 1, "groups": {}, "trials": []}}}}}
    (path / "results.json").write_text(json.dumps(results))
    write_model_card(path)
    card = ModelCard.load(path / "README.md")
    got = {(r.dataset_name, r.metric_type, r.dataset_config): r.metric_value for r in card.data.eval_results}
    assert got == {("synth-vqa", "vqa_accuracy", "0-shot"): 0.25, ("synth-vqa", "vqa_accuracy", "4-shot"): 0.5}
    assert "| synth-vqa | vqa_accuracy | 4 | 0.5000 |" in card.text
    with pytest.raises(InputError, match="results.json"):
        write_model_card(path, evaluation=tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="not an interleaf results file"):
        write_model_card(path, evaluation=tmp_path / "bad.json")


def test_trainings_final_model_carries_every_stages_summary(tmp_path):
    good = '{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
    (tmp_path / "chat.jsonl").write_text("\n".join([good] * 4) + "\n")
    stage = {
        "freeze": "all_trainable", "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
        "data": {"sources": [{"name": "chat", "format": "llava", "paths": str(tmp_path / "chat.jsonl")}]},
        "batch_size": 2, "max_length": 32, "log_every": 1,
    }
    recipe = {**stage, "out": str(tmp_path / "run"), "stages": [
        {"name": "first", "model": {"preset": "tiny-random"}, "max_steps": 2},
        {"name": "second", "model": {"from_stage": "first"}, "max_steps": 3}]}
    first, second = train(recipe, progress=False)
    summaries = [json.loads((r.out / "summary.json").read_text()) for r in (first, second)]
    card = ModelCard.load(second.final / "README.md")
    assert card.data.library_name == "interleaf" and card.data.pipeline_tag == "image-text-to-text"
    assert card.text.index("### Stage `first`") < card.text.index("### Stage `second`")
    for summary in summaries:
        assert f"- steps: {summary['steps']} (batch size 2)" in card.text
        assert f"- final loss: {summary['final_loss']:.4f}" in card.text
    assert "- freeze: `all_trainable`" in card.text and "chat" in card.text
    assert "- started from: from_stage `first`" in card.text and "- started from: preset `tiny-random`" in card.text
    assert "\n# second\n" in card.text  # OUT/final is named after OUT
    model, processor = interleaf.load(second.final)  # the card does not disturb loading
    interleaf.save(model, processor, tmp_path / "again")  # a loaded model's card passes its stages on
    assert ModelCard.load(tmp_path / "again" / "README.md").text.count("### Stage `") == 2


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


def test_the_card_verb_adds_evaluation_and_keeps_what_the_card_records(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "m")
    results = {"results": {"synth-vqa": {"metric": "vqa_accuracy", "shots": {"0": {"mean": 0.75}}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert _cli("card", str(path), "--results", str(tmp_path / "results.json"), "--base-model", "a/b",
                "--dataset", "c/d", "--dataset", "e/f") == 0
    assert _cli("card", str(path)) == 0  # again, without options: everything stays
    data = ModelCard.load(path / "README.md").data
    assert data.base_model == ["a/b"] and data.datasets == ["c/d", "e/f"]
    assert [(r.dataset_name, r.dataset_config, r.metric_value) for r in data.eval_results] == [("synth-vqa", "0-shot", 0.75)]
    model, processor = interleaf.load(path)
    interleaf.save(model, processor, tmp_path / "copy")  # results belong to one set of weights: not passed on
    copied = ModelCard.load(tmp_path / "copy" / "README.md").data
    assert copied.base_model == ["a/b"] and copied.eval_results is None
    assert _cli("card", str(tmp_path / "nothing")) == 2 and "not a saved model directory" in capsys.readouterr().err


def test_push_uploads_with_the_hub_client(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    class FakeApi:  # stands in for HfApi: nothing here reaches the network
        def create_repo(self, repo, **kw):
            calls.append(("create_repo", repo, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    path = _copy(saved, tmp_path / "m")
    (path / "README.md").unlink()
    assert push(path, "me/model", private=True, api=FakeApi()) == "https://huggingface.co/me/model"
    assert [c[:2] for c in calls] == [("create_repo", "me/model"), ("upload_folder", "me/model")]
    assert calls[0][2]["private"] is True and calls[1][2]["folder_path"] == str(path)
    assert CARD_MARKER in (path / "README.md").read_text()  # a card is written before the upload


def test_push_is_refused_offline_and_for_bad_inputs(saved, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="HF_HUB_OFFLINE"):
        push(saved, "me/model", api=object())
    assert _cli("push", str(saved), "me/model") == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
    with pytest.raises(InputError, match="not a saved model directory"):
        push(tmp_path, "me/model", api=object())
    with pytest.raises(InputError, match="OWNER/NAME"):
        push(saved, "no-owner", api=object())
