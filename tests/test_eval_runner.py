"""The runner: results files, resume without recomputation, 1 vs 2 processes, zero-shot trick, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers.families import FAMILIES, build_family

import interleaf
from interleaf.cli import app
from interleaf.evaluation.metrics import caption_scores
from interleaf.evaluation.runner import evaluate, evaluate_synthetic, shard_indices


@pytest.fixture(scope="module")
def corpus(synth_corpus):
    return synth_corpus.get(n_train_scenes=30, n_heldout_scenes=6)


def tiny(family: str = "cross_attention"):
    return build_family(family, seed=0)


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_results_files_groups_and_demo_logging(corpus, tmp_path, family):
    model, processor = tiny(family)
    res = evaluate(model, processor, "synth-vqa", shots=[0, 2], trials=2, limit=10, data_dir=corpus,
                   out_dir=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["results"]["synth-vqa"]["shots"].keys() == {"0", "2"}
    agg = on_disk["results"]["synth-vqa"]["shots"]["2"]
    assert agg["n_trials"] == 2 and len(agg["trials"]) == 2 and "std" in agg and "mean" in agg
    assert set(agg["groups"]) <= {"colour", "shape", "count", "position", "yesno"} and agg["groups"]
    assert on_disk["versions"]["torch"] == torch.__version__
    files = on_disk["data_files"]["synth-vqa"]
    assert len(files["test"]["sha256"]) == 64 and "train" in files
    assert on_disk["config"]["shots"] == [0, 2] and on_disk["config"]["tasks"][0]["name"] == "synth-vqa"
    rows = read_jsonl(tmp_path / "samples" / "synth-vqa" / "2shot-trial0.jsonl")
    assert [r["index"] for r in rows] == list(range(10))
    for r in rows:
        assert len(r["demo_ids"]) == 2 and r["id"] not in r["demo_ids"]
        assert r["prompt"].count("<image>") == 3 and {"raw", "pred", "score"} <= set(r)
    trial1 = read_jsonl(tmp_path / "samples" / "synth-vqa" / "2shot-trial1.jsonl")
    assert [r["demo_ids"] for r in rows] != [r["demo_ids"] for r in trial1]  # another trial, other demos
    assert res["results"] == on_disk["results"]


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_skips_finished_samples(corpus, tmp_path, family):
    model, processor = tiny(family)
    kwargs = dict(shots=[1], limit=8, data_dir=corpus, out_dir=tmp_path, progress=False, batch_size=2)
    calls, handle = count_forwards(model)
    first = evaluate(model, processor, "synth-fewshot", task_options={"episodes": 8}, **kwargs)
    full_calls = len(calls)
    assert full_calls == 16  # rank task: context + candidates, one forward each, per example
    cache = next((tmp_path / "cache" / "synth-fewshot").glob("*/rank0.jsonl"))
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2])  # interrupted mid-write
    calls.clear()
    again = evaluate(model, processor, "synth-fewshot", task_options={"episodes": 8}, **kwargs)
    assert len(calls) == 3 * 2  # only the 3 unfinished examples ran
    assert again["results"] == first["results"]
    calls.clear()
    evaluate(model, processor, "synth-fewshot", task_options={"episodes": 8}, **kwargs)
    assert calls == []  # everything finished: no model call at all
    # a different setting (here: the trial seed) never reuses the cached samples
    evaluate(model, processor, "synth-fewshot", task_options={"episodes": 8}, seed=1, **kwargs)
    assert len(calls) == full_calls
    handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_tasks_resume_too(corpus, tmp_path, family):
    model, processor = tiny(family)
    kwargs = dict(shots=[0], limit=6, data_dir=corpus, out_dir=tmp_path, progress=False, batch_size=3)
    evaluate(model, processor, "synth-vqa", **kwargs)
    calls, handle = count_forwards(model)
    evaluate(model, processor, "synth-vqa", **kwargs)
    handle.remove()
    assert calls == []


def test_progress_off_a_terminal_is_one_plain_line_per_run(corpus, tmp_path, capsys):
    """stderr under capsys is no terminal: no bar fragments (carriage returns), one line per trial."""
    model, processor = tiny(FAMILIES[0])
    evaluate(model, processor, "synth-vqa", shots=[0], limit=4, data_dir=corpus, out_dir=tmp_path, progress=True,
             batch_size=2)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "synth-vqa 0-shot trial 0: 4 examples (0 from the cache)" in err.splitlines()


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_shot_trick(corpus, tmp_path, family):
    model, processor = tiny(family)
    off = evaluate(model, processor, "synth-vqa", shots=[0], limit=4, data_dir=corpus, out_dir=tmp_path / "off",
                   progress=False)
    assert off["config"]["zero_shot_trick"] is False
    rows = read_jsonl(tmp_path / "off" / "samples" / "synth-vqa" / "0shot-trial0.jsonl")
    assert all(r["demo_ids"] == [] and r["prompt"].count("<image>") == 1 for r in rows)
    evaluate(model, processor, "synth-vqa", shots=[0], limit=4, data_dir=corpus, out_dir=tmp_path / "on",
             zero_shot_trick=True, progress=False)
    rows = read_jsonl(tmp_path / "on" / "samples" / "synth-vqa" / "0shot-trial0.jsonl")
    for r in rows:
        assert len(r["demo_ids"]) == 2
        assert r["prompt"].count("<image>") == 1 and r["prompt"].startswith("Question:")  # demo images dropped
        assert r["prompt"].count("Short answer:") == 3


def test_shards_cover_every_index_once():
    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            parts = [shard_indices(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_one_and_two_processes_agree(corpus, tmp_path, family):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(interleaf.__file__).parents[1])}
    model = {"cross_attention": "tiny-random", "expand": "tiny-llava"}.get(family)
    if model is None:  # a family without a preset of its own: saved, then loaded by each process
        model = str(tmp_path / "model")
        interleaf.save(*tiny(family), model)
    common = ["--model", model, "--task", "synth-vqa", "--task", "synth-fewshot", "--option", "episodes=6",
              "--data", str(corpus), "--limit", "5", "--shots", "1", "--batch-size", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "interleaf", "eval", *common, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_proc = CliRunner().invoke(app, ["eval", *common, "--out", str(tmp_path / "one")])  # in this process
    assert one_proc.exit_code == 0, one_proc.output
    assert "synth-vqa" in one_proc.output and "mean" in one_proc.output  # the results table
    for task in ("synth-vqa", "synth-fewshot"):
        one = read_jsonl(tmp_path / "one" / "samples" / task / "1shot-trial0.jsonl")
        two = read_jsonl(tmp_path / "two" / "samples" / task / "1shot-trial0.jsonl")
        assert [r["index"] for r in two] == list(range(5))  # none dropped, none duplicated
        keys = ("id", "demo_ids", "raw", "pred", "prompt")
        assert [{k: r[k] for k in keys} for r in one] == [{k: r[k] for k in keys} for r in two]
        if task == "synth-fewshot":
            for a, b in zip(one, two):
                assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)
    # the two processes each wrote their own cache file
    assert len(list((tmp_path / "two" / "cache" / "synth-vqa").glob("*/rank*.jsonl"))) == 2
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert b["config"]["world_size"] == 2
    assert a["results"]["synth-vqa"]["shots"]["1"]["mean"] == b["results"]["synth-vqa"]["shots"]["1"]["mean"]


def test_compare_prints_side_by_side(tmp_path):
    def results(score):
        trial = {"score": score, "groups": {"colour": score / 2}, "n": 10, "metrics": {}}
        return {"results": {"synth-vqa": {"metric": "exact_match", "shots": {
            "0": {"mean": score, "std": 0.0, "n_trials": 1, "groups": {"colour": score / 2}, "trials": [trial]}}}}}

    (tmp_path / "a.json").write_text(json.dumps(results(0.25)))
    (tmp_path / "b.json").write_text(json.dumps(results(0.75)))
    out = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert out.exit_code == 0, out.output
    line = next(row for row in out.output.splitlines() if row.startswith("synth-vqa "))
    assert line.split()[-3:] == ["0.2500", "0.7500", "0.5000"]
    assert any(row.startswith("synth-vqa/colour") and row.split()[-1] == "0.2500" for row in out.output.splitlines())
    bad = CliRunner().invoke(app, ["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "none.json")])
    assert bad.exit_code != 0


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_synthetic_reports_exact_match_per_qtype_and_cider(corpus, tmp_path, family):
    import shutil

    from interleaf.evaluation.metrics.vqa import exact_match, vqa_normalize

    model, processor = tiny(family)
    first = evaluate_synthetic(model, processor, corpus, limit=10, out_dir=tmp_path / "first")
    rows = read_jsonl(tmp_path / "first" / "samples" / "synth-vqa" / "0shot-trial0.jsonl")
    assert first["vqa"]["n"] == len(rows) == 10
    entries = json.loads((corpus / "llava" / "vqa_heldout.json").read_text())
    answer = {e["id"]: e["conversations"][1]["value"] for e in entries}
    by_hand = {r["id"]: exact_match(r["pred"], answer[r["source_id"]]) for r in rows}
    assert first["vqa"]["exact_match"] == pytest.approx(sum(by_hand.values()) / 10)
    # A copy of the corpus whose answers to three wrongly answered questions are what the model said:
    # those now score 1, the other seven as before, whatever the random model says.
    right = [r for r in rows if vqa_normalize(r["pred"]) and by_hand[r["id"]] == 0.0][:3]
    assert len(right) == 3
    shutil.copytree(corpus, tmp_path / "corpus")
    path = tmp_path / "corpus" / "llava" / "vqa_heldout.json"
    said = {r["source_id"]: r["pred"] for r in right}
    for e in entries:
        if e["id"] in said:
            e["conversations"][1]["value"] = said[e["id"]]
    path.write_text(json.dumps(entries))
    out = evaluate_synthetic(model, processor, tmp_path / "corpus", limit=10)
    hits = {r["id"]: 1.0 if r["source_id"] in said else by_hand[r["id"]] for r in rows}
    assert out["vqa"]["n"] == 10 and out["vqa"]["exact_match"] == pytest.approx(sum(hits.values()) / 10)
    qtype = {e["id"]: e["qtype"] for e in entries}
    for group in {qtype[r["source_id"]] for r in rows}:
        mine = [hits[r["id"]] for r in rows if qtype[r["source_id"]] == group]
        assert out["vqa"]["per_qtype"][group] == pytest.approx(sum(mine) / len(mine)), group
    assert set(out["vqa"]["per_qtype"]) <= {"colour", "shape", "count", "position", "yesno"}
    captions = read_jsonl(tmp_path / "first" / "samples" / "synth-caption" / "0shot-trial0.jsonl")
    by_scorer = caption_scores({r["id"]: r["pred"] for r in captions}, {r["id"]: r["answers"] for r in captions})
    assert first["caption"]["n"] == len(captions) == 6
    assert first["caption"]["CIDEr"] == pytest.approx(by_scorer["CIDEr"])  # the scorer itself: tests/test_metrics.py


@pytest.mark.parametrize("family", FAMILIES)
def test_benchmark_tasks_end_to_end(tmp_path, family):
    """MMBench (CircularEval), Hateful Memes (ROC-AUC), MME and an image-folder task through the runner."""
    import base64
    import io

    from PIL import Image

    def png(c):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (c, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    b64 = base64.b64encode(png(9)).decode()
    (tmp_path / "mmbench_dev_20230712.tsv").write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
        + "".join(f"{i}\tWhich?\tnan\tred\tblue\t\t\tA\tcat{i % 2}\t{b64}\n" for i in range(3)))
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(40 * i))
        rows.append({"id": i, "img": f"img/{i}.png", "label": i % 2, "text": f"meme {i}"})
    (tmp_path / "dev_seen.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, rows)))
    sub = tmp_path / "MME_Benchmark" / "color"
    sub.mkdir(parents=True)
    (sub / "1.png").write_bytes(png(200))
    (sub / "1.txt").write_text("Is it red?\tYes\nIs it blue?\tNo\n")
    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        (tmp_path / "val" / cls / "0.png").write_bytes(png(100 if cls == "a" else 250))
    model, processor = tiny(family)
    res = evaluate(model, processor, ["mmbench", "hateful_memes", "mme", "imagenet"], shots=[0], data_dir=tmp_path,
                   out_dir=tmp_path / "out", progress=False, max_new_tokens=2)["results"]
    mmb = res["mmbench"]["shots"]["0"]["trials"][0]
    assert mmb["n"] == 6 and mmb["metrics"]["n_questions"] == 3  # two rotations of each question
    assert mmb["metrics"]["circular_accuracy"] <= mmb["metrics"]["vanilla_accuracy"]
    hm = res["hateful_memes"]["shots"]["0"]["trials"][0]
    samples = read_jsonl(tmp_path / "out" / "samples" / "hateful_memes" / "0shot-trial0.jsonl")
    # ROC-AUC by hand: the share of (hateful, not hateful) pairs ranked the right way round, ties half
    pos = [r["positive_prob"] for r in samples if r["label"] == 1]
    neg = [r["positive_prob"] for r in samples if r["label"] == 0]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    assert len(pairs) == 4 and hm["metrics"]["roc_auc"] == pytest.approx(sum(pairs) / 4)
    assert all(0.0 < r["positive_prob"] < 1.0 and len(r["logprobs"]) == 2 for r in samples)
    mme = res["mme"]["shots"]["0"]["trials"][0]
    assert "color" in mme["metrics"]["subtasks"] and mme["score"] == mme["metrics"]["perception"]
    inet = res["imagenet"]["shots"]["0"]["trials"][0]
    ranked = read_jsonl(tmp_path / "out" / "samples" / "imagenet" / "0shot-trial0.jsonl")
    assert inet["n"] == len(ranked) == 2
    assert inet["score"] == pytest.approx(sum(r["pred_index"] == r["label"] for r in ranked) / 2)
