"""Parquet and Arrow files (Hugging Face datasets' layouts) as training data: each layout reads as
the same samples as interleaf's own file of the same data, trains a step, counts its bad rows,
converts both ways with ``interleaf data convert``, and resumes mid-file."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from helpers import parquet as hp
from helpers.data import write_tar
from helpers.families import stage_model

import interleaf
from interleaf.cli import app
from interleaf.data import MixtureStream, load_mixture
from interleaf.data.conversion import convert
from interleaf.data.inspection import guess_format
from interleaf.data.stream import iter_source
from interleaf.errors import ConfigError, InputError
from interleaf.training import train

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def proc():
    return interleaf.build("tiny-random")[1]


def _source(path, fmt: str, name: str = "src", **kw) -> dict:
    return {"name": name, "format": fmt, "paths": str(path), **kw}


def _samples(path, fmt: str, proc, **kw) -> tuple[list[dict], dict[str, int]]:
    """Every sample of one source in file order, and its bad samples by reason."""
    cfg = load_mixture({"sources": [_source(path, fmt, **kw)]}).sources[0]
    good, bad = [], {}
    for sample, b in iter_source(cfg, proc, max_length=MAX_LENGTH):
        if b is not None:
            bad[b.reason] = bad.get(b.reason, 0) + 1
        else:
            good.append(sample)
    return good, bad


def _same(a: list[dict], b: list[dict]) -> None:
    """Two lists of samples hold the same tokens, labels and pixels (preference pairs: both rows)."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        rows = [(x[k], y[k]) for k in ("chosen", "rejected")] if "chosen" in x else [(x, y)]
        for r, s in rows:
            assert r["input_ids"] == s["input_ids"] and r["labels"] == s["labels"]
            assert len(r["images"]) == len(s["images"])
            for p, q in zip(r["images"], s["images"]):
                assert torch.equal(p, q)


@pytest.mark.parametrize("layout", list(hp.WRITERS))
def test_each_layout_reads_its_good_rows_and_counts_its_bad_ones(tmp_path, proc, layout):
    fmt, write = hp.WRITERS[layout]
    path, expected_bad = write(tmp_path / layout / "train-0.parquet")
    good, bad = _samples(path, fmt, proc)
    assert bad == expected_bad
    assert len(good) == pq.ParquetFile(path).metadata.num_rows - sum(expected_bad.values())
    assert all(len((s["chosen"] if fmt == "preference" else s)["images"]) >= 1 for s in good)


@pytest.mark.parametrize("layout", list(hp.WRITERS))
def test_data_inspect_knows_each_layout_by_its_columns(tmp_path, layout):
    fmt, write = hp.WRITERS[layout]
    path, expected_bad = write(tmp_path / "train-0.parquet")
    assert guess_format([str(path)]) == fmt
    result = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "*.parquet"), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert f"== {fmt} ({fmt}): {pq.ParquetFile(path).metadata.num_rows} samples in 1 file(s)" in result.output
    assert next(iter(expected_bad)) in result.output


def _llava_reference(root, rows: list[dict], key: str) -> list[dict]:
    """The rows' conversations as a LLaVA JSON entry each, written by hand (images as files)."""
    entries = []
    for i, row in enumerate(rows):
        names = []
        for j, image in enumerate(row["images"]):
            (root / f"{i}-{j}.png").write_bytes(image["bytes"])
            names.append(f"{i}-{j}.png")
        entries.append({"id": str(i), "image": names, "conversations": row[key]})
    return entries


def test_vsft_and_cauldron_rows_are_the_samples_of_the_same_llava_json(tmp_path, proc):
    vsft, _ = hp.vsft(tmp_path / "vsft.parquet")
    cauldron, _ = hp.cauldron(tmp_path / "cauldron.parquet")
    names = list(hp.COLOURS)
    # llava-instruct-mix-vsft: an image part before the question; the_cauldron: images before the first user text
    by_vsft = [{"images": [hp.image(names[i % 4])], "conv": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": names[i % 4]}]}
        for i in range(6)]
    by_cauldron = [{"images": [hp.image(names[i % 4])], "conv": [
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": names[i % 4]},
        {"from": "human", "value": "Is it square?"}, {"from": "gpt", "value": "yes"}]} for i in range(6)]
    for parquet, rows, name in ((vsft, by_vsft, "v"), (cauldron, by_cauldron, "c")):
        root = tmp_path / name
        root.mkdir()
        (root / "ref.json").write_text(json.dumps(_llava_reference(root, rows, "conv")))
        _same(_samples(parquet, "llava", proc)[0], _samples(root / "ref.json", "llava", proc)[0])


def test_obelics_rows_are_the_samples_of_the_same_webdataset_documents(tmp_path, proc):
    path, _ = hp.obelics(tmp_path / "obelics" / "train-0.parquet")
    names = list(hp.COLOURS)
    members = []
    for i in range(6):
        doc = {"texts": ["A picture.", None, f"It is {names[i % 4]}.", None, "The end."],
               "images": [None, f"d{i}.0.png", None, f"d{i}.1.png", None]}
        members += [(f"d{i}.json", json.dumps(doc).encode()), (f"d{i}.0.png", hp.png(names[i % 4])),
                    (f"d{i}.1.png", hp.png(names[(i + 1) % 4]))]
    shard = write_tar(tmp_path / "docs.tar", members)
    _same(_samples(path, "interleaved", proc)[0], _samples(shard, "interleaved", proc)[0])


def test_rlaif_rows_are_the_pairs_of_the_same_preference_json(tmp_path, proc):
    path, _ = hp.rlaif(tmp_path / "rlaif.parquet")
    names = list(hp.COLOURS)
    for c in names:
        (tmp_path / f"{c}.png").write_bytes(hp.png(c))
    entries = [{"id": str(i), "image": f"{names[i % 4]}.png", "prompt": "What colour is the image?",
                "chosen": names[i % 4], "rejected": names[(i + 1) % 4]} for i in range(8)]
    (tmp_path / "prefs.json").write_text(json.dumps(entries))
    _same(_samples(path, "preference", proc)[0], _samples(tmp_path / "prefs.json", "preference", proc)[0])


@pytest.mark.parametrize("layout", list(hp.WRITERS))
def test_one_training_step_from_each_layout(tmp_path, layout):
    fmt, write = hp.WRITERS[layout]
    path, expected_bad = write(tmp_path / "data" / "train-0.parquet")
    rows = pq.ParquetFile(path).metadata.num_rows  # a batch of as many samples reads every row, the bad one too
    stage = {
        "model": stage_model("cross_attention"), "freeze": "all_trainable",
        "data": {"sources": [_source(path, fmt, name=layout, samples=rows)], "max_bad_fraction": 0.5},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
        "batch_size": rows, "max_steps": 1, "max_length": MAX_LENGTH, "log_every": 1,
        "out": str(tmp_path / "run"),
    }
    if fmt == "preference":
        stage.update(objective="dpo", dpo={"beta": 0.5, "reference": "cached"})  # scored from the parquet rows
    train(stage, progress=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # every row is read, the bad one at least once (a second pass may meet it again)
    assert summary["steps"] == 1 and list(summary["bad_samples"]) == [layout]
    assert set(summary["bad_samples"][layout]) == set(expected_bad)
    [record] = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(record["loss"]))


@pytest.mark.parametrize("layout", list(hp.WRITERS))
def test_data_convert_round_trips_through_interleaf_files(tmp_path, proc, layout):
    fmt, write = hp.WRITERS[layout]
    path, expected_bad = write(tmp_path / "hub" / "train-0.parquet")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert", str(path), str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert f"{next(iter(expected_bad))}" in result.output  # the bad row is reported, not written
    [written] = [p for p in (tmp_path / "mine").iterdir() if p.suffix in (".jsonl", ".tar")]
    result = runner.invoke(app, ["data", "convert", str(written), str(tmp_path / "back"), "--per-file", "4"])
    assert result.exit_code == 0, result.output
    hub, _ = _samples(path, fmt, proc)
    mine, bad = _samples(written, fmt, proc)
    back, bad_back = _samples(tmp_path / "back" / "*.parquet", fmt, proc)
    assert bad == bad_back == {} and len(sorted((tmp_path / "back").glob("*.parquet"))) == -(-len(hub) // 4)
    _same(hub, mine)
    _same(hub, back)


def test_converted_parquet_loads_in_datasets_with_images(tmp_path):
    import datasets
    path, _ = hp.vsft(tmp_path / "hub.parquet")
    convert(load_mixture({"sources": [_source(path, "llava")]}).sources[0], tmp_path / "mine")
    convert(load_mixture({"sources": [_source(tmp_path / "mine" / "llava.jsonl", "llava")]}).sources[0],
            tmp_path / "back")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "back" / "*.parquet"), split="train")
    assert len(ds) == 6 and ds[0]["images"][0].size == (16, 16)
    assert ds[0]["messages"][0]["content"][0]["type"] == "image"


def test_files_written_by_datasets_read_as_training_data(tmp_path, proc):
    import datasets
    from PIL import Image

    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.List(
            {"index": datasets.Value("int64"), "text": datasets.Value("string"), "type": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()),
    })
    rows = {"messages": [[hp._user("What colour is it?"), hp._assistant(c)] for c in hp.COLOURS],
            "images": [[Image.new("RGB", (16, 16), rgb)] for rgb in hp.COLOURS.values()]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    [arrow] = sorted((tmp_path / "saved").glob("*.arrow"))
    from_parquet, bad = _samples(tmp_path / "train.parquet", "llava", proc)
    from_arrow, bad_arrow = _samples(arrow, "llava", proc)
    assert bad == bad_arrow == {} and len(from_parquet) == 4
    _same(from_parquet, from_arrow)


def test_a_stream_resumes_mid_file_and_ranks_share_the_rows(tmp_path, proc):
    names = list(hp.COLOURS)
    rows = [{"image": hp.image(names[i % 4]), "caption": f"sample {i} is {names[i % 4]}."} for i in range(14)]
    path = hp.write(tmp_path / "pairs.parquet", rows, pa.schema([("image", hp.IMAGE), ("caption", pa.string())]), 3)
    mix = load_mixture({"sources": [_source(path, "pairs")], "shuffle_buffer": 4, "max_length": MAX_LENGTH})
    whole = MixtureStream(mix, proc, seed=3).take(20)
    first = MixtureStream(mix, proc, seed=3)
    head = first.take(6)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = MixtureStream(mix, proc, seed=3)
    resumed.load_state_dict(state)
    assert [s["key"] for s in head + resumed.take(14)] == [s["key"] for s in whole]
    shares = [MixtureStream(mix, proc, seed=3, rank=r, world_size=2) for r in (0, 1)]
    keys = [{s["key"] for s in share.take(share.epoch_length())} for share in shares]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {f"pairs-{i}" for i in range(14)}


def test_url_images_are_fetched_only_by_the_explicit_download_step(tmp_path, proc, monkeypatch, no_network):
    path, _ = hp.obelics(tmp_path / "hub" / "train-0.parquet")
    fetched = []

    def fake_download(url, where):
        fetched.append(url)
        return hp.png("red")

    monkeypatch.setattr("interleaf.data.conversion.download_image", fake_download)
    cfg = load_mixture({"sources": [_source(path, "interleaved")]}).sources[0]
    assert convert(cfg, tmp_path / "plain").bad.to_dict()["bad"] == {"src": {"remote_image": 1}} and not fetched
    report = convert(cfg, tmp_path / "fetched", download_images=True)
    assert fetched == ["https://example.com/red.png"] and report.written == 7 and report.bad.to_dict()["bad"] == {}

    def failing(url, where):
        raise InputError(f"{where}: could not fetch image URL {url!r}")

    monkeypatch.setattr("interleaf.data.conversion.download_image", failing)
    report = convert(cfg, tmp_path / "failed", download_images=True)
    assert report.written == 6 and report.bad.to_dict()["bad"] == {"src": {"remote_image": 1}}
    assert "the download failed" in report.bad.examples[("src", "remote_image")][0]


def test_bad_files_and_settings_are_named(tmp_path, proc):
    path, _ = hp.rlaif(tmp_path / "rlaif.parquet")
    with pytest.raises(InputError, match=r"format 'llava'.*holds preference rows.*set format: preference"):
        _samples(path, "llava", proc)
    odd = hp.write(tmp_path / "odd.parquet", [{"a": 1}], pa.schema([("a", pa.int64())]))
    with pytest.raises(InputError, match=r"odd.parquet: its columns \['a'\] fit none.*messages \+ images"):
        _samples(odd, "llava", proc)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert _samples(tmp_path / "broken.parquet", "llava", proc) == ([], {"corrupt_shard": 1})
    with pytest.raises(ConfigError, match=r"paths\[1\].*mixes parquet / Arrow files.*a source of their own"):
        load_mixture({"sources": [{"name": "x", "format": "llava", "paths": [str(path), "x.json"]}]}, check_files=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    cfg = load_mixture({"sources": [_source(path, "preference")]}).sources[0]
    with pytest.raises(InputError, match=r"is not an empty folder"):
        convert(cfg, tmp_path / "full")
    (tmp_path / "j.json").write_text("[]")
    with pytest.raises(InputError, match=r"--download-images applies to parquet"):
        convert(load_mixture({"sources": [_source(tmp_path / "j.json", "llava")]}).sources[0], tmp_path / "o",
                download_images=True)


def _mmmu_rows() -> list[dict]:
    """Two MMMU questions as the hub's parquet holds them: ``options`` a list's repr, images as structs."""
    none = {f"image_{k}": None for k in range(1, 8)}
    return [
        {**none, "id": "validation_Art_1", "question": "Compare <image 2> with <image 1>.",
         "options": "['left', 'right']", "answer": "B", "image_1": hp.image("red"), "image_2": hp.image("blue"),
         "subfield": "Painting", "question_type": "multiple-choice"},
        {**none, "id": "validation_Math_1", "question": "<image 1> How many sides?", "options": "['3', '4']",
         "answer": "B", "image_1": hp.image("green"), "subfield": "Geometry", "question_type": "multiple-choice"},
    ]


def test_mmmu_reads_from_its_parquet_files_as_from_its_json_export(tmp_path):
    from interleaf.evaluation.tasks import get_task, load_examples

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
                        ("answer", pa.string()), *[(f"image_{k}", image) for k in range(1, 8)],
                        ("subfield", pa.string()), ("question_type", pa.string())])
    rows = _mmmu_rows()
    for row, subject in zip(rows, ("Art", "Math")):  # one folder per subject, as the hub has it
        hp.write(tmp_path / "hub" / subject / "validation-00000-of-00001.parquet", [row], schema)
    export = [{**r, **{k: "data:image/png;base64," + base64.b64encode(v["bytes"]).decode()
                       for k, v in r.items() if k.startswith("image_") and v}} for r in rows]
    (tmp_path / "mmmu_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in export))
    read: dict = {}
    from_parquet = load_examples(get_task("mmmu-parquet"), "validation", data_dir=tmp_path / "hub", read=read)
    from_json = load_examples(get_task("mmmu"), "validation", data_dir=tmp_path)
    assert [(e.id, e.fields, e.answers, e.group, e.meta) for e in from_parquet] == \
        [(e.id, e.fields, e.answers, e.group, e.meta) for e in from_json]
    assert [e.images for e in from_parquet] == [[hp.png("blue"), hp.png("red")], [hp.png("green")]]
    assert sorted(read) == ["validation", "validation[1]"] and read["validation"].parent.name == "Art"
    with pytest.raises(InputError, match=r"'\*/dev-\*.parquet' \(dev\) matches no file.*parquet files there"):
        load_examples(get_task("mmmu-parquet"), "dev", data_dir=tmp_path / "hub")
    (tmp_path / "hub" / "Art" / "dev-0.parquet").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"dev-0.parquet: not a readable parquet file"):
        load_examples(get_task("mmmu-parquet"), "dev", data_dir=tmp_path / "hub")


def test_each_kind_of_bad_row_is_skipped_counted_and_named(tmp_path, proc):
    texts = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string())]))
    cases = {  # file -> (format, schema, rows, {reason: count}, a piece of one message)
        "msgs": ("llava", pa.schema([("messages", pa.string()), ("images", pa.list_(hp.IMAGE))]),
                 [{"messages": "hello", "images": []}], {"malformed_json": 1}, "'messages' must be a non-empty list"),
        "struct": ("llava", pa.schema([("texts", texts), ("images", pa.list_(hp.IMAGE))]),
                   [{"texts": [{"user": "hi", "assistant": "yo"}], "images": [{"bytes": None, "path": None}]}],
                   {"malformed_json": 1}, "neither bytes nor path"),
        "missing": ("llava", pa.schema([("texts", texts), ("images", pa.list_(pa.string()))]),
                    [{"texts": [{"user": "hi", "assistant": "yo"}], "images": ["nowhere.png"]}],
                    {"missing_file": 1}, "nowhere.png' does not exist"),
        "noanswer": ("llava", pa.schema([("texts", texts), ("images", pa.list_(hp.IMAGE))]),
                     [{"texts": [{"user": "hi", "assistant": ""}], "images": [hp.image("red")]}],
                     {"empty_text": 1}, "no assistant answer"),
        "uneven": ("interleaved", pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(hp.IMAGE))]),
                   [{"texts": ["a", None], "images": [None]}], {"malformed_json": 1}, "two lists of equal length"),
        "nocaption": ("pairs", pa.schema([("image", hp.IMAGE), ("caption", pa.string())]),
                      [{"image": hp.image("red"), "caption": "  "}], {"empty_text": 1}, "no caption"),
        "norejected": ("preference", pa.schema([("question", pa.string()), ("chosen", pa.string()),
                                                ("rejected", pa.string()), ("image", hp.IMAGE)]),
                       [{"question": "Colour?", "chosen": "red", "rejected": None, "image": hp.image("red")}],
                       {"malformed_json": 1}, "no 'rejected' answer"),
    }
    for name, (fmt, schema, rows, expected, message) in cases.items():
        path = hp.write(tmp_path / f"{name}.parquet", rows, schema)
        cfg = load_mixture({"sources": [_source(path, fmt)]}).sources[0]
        bad = [b for _, b in iter_source(cfg, proc, max_length=MAX_LENGTH)]
        assert {b.reason: 1 for b in bad} == expected, name
        assert bad[0].where.startswith(f"{path}[0]") and message in bad[0].detail, (name, bad[0])


def test_convert_and_inspect_refuse_what_they_cannot_read(tmp_path):
    path, _ = hp.vsft(tmp_path / "a" / "vsft.parquet")
    mix = {"sources": [_source(path, "llava", name="a"), _source(path, "llava", name="b")]}
    (tmp_path / "mix.yaml").write_text(json.dumps(mix))
    result = CliRunner().invoke(app, ["data", "convert", str(tmp_path / "mix.yaml"), str(tmp_path / "out")])
    assert isinstance(result.exception, InputError) and "holds 2 sources; convert one source" in str(result.exception)
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"cannot read '.*garbage.parquet': not a readable parquet file"):
        guess_format([str(tmp_path / "garbage.parquet")])
