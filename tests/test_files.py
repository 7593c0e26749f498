"""The JSON readers' options for callers whose files are not user data or must not stop at a bad
line, and the callers that use them: checkpoints, the evaluation cache, LLaVA files, the demo log."""

from __future__ import annotations

import json

import pytest

from interleaf.data.formats import load_llava
from interleaf.demo.report import read_jsonl as read_demo_log
from interleaf.errors import CheckpointError, ConfigError, InputError
from interleaf.evaluation.runner import _read_records
from interleaf.files import iter_jsonl, read_json, read_jsonl, skip_bad_line
from interleaf.training import checkpoint as ckpt


def test_error_picks_the_exception_and_every_message_names_the_file_and_the_fix(tmp_path):
    js = tmp_path / "state.json"
    js.write_text('{"step": 4,}')
    with pytest.raises(CheckpointError) as e:
        read_json(js, "checkpoint 'x'", error=CheckpointError)
    assert str(e.value) == (f"checkpoint 'x': {str(js)!r} is not valid JSON, line 1, column 12: Expecting property "
                            "name enclosed in double quotes (fix the JSON syntax there)")
    with pytest.raises(CheckpointError, match=r"^weights: file .*none\.json' does not exist \(check the path\)$"):
        read_json(tmp_path / "none.json", "weights", error=CheckpointError)
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(CheckpointError, match=r"latin\.json' is not UTF-8 text .*\(save the JSON file as UTF-8\)"):
        read_json(tmp_path / "latin.json", "weights", error=CheckpointError)
    with pytest.raises(CheckpointError, match=r"^log: .*line 1 is not valid JSON"):
        read_jsonl(js, "log", error=CheckpointError)
    # a config field still wins: the error is then a ConfigError naming it
    with pytest.raises(ConfigError, match=r"^config field 'files\.test': "):
        read_json(js, field="files.test", error=CheckpointError)


def test_on_bad_line_hands_over_each_bad_line_and_reading_goes_on(tmp_path):
    jl = tmp_path / "log.jsonl"
    jl.write_text('{"a": 1}\n{broken\n\n' + "[" * 100_000 + '\n{"a": 2}\n{"a": 3, "b"')  # a torn last line
    bad = []
    rows = list(iter_jsonl(jl, on_bad_line=lambda n, e: bad.append((n, type(e).__name__))))
    assert rows == [(1, {"a": 1}), (5, {"a": 2})]
    assert bad == [(2, "JSONDecodeError"), (4, "RecursionError"), (6, "JSONDecodeError")]
    assert read_jsonl(jl, on_bad_line=skip_bad_line) == [{"a": 1}, {"a": 2}]
    with pytest.raises(InputError, match=r"line 2 is not valid JSON"):
        read_jsonl(jl)  # without on_bad_line the first bad line is an error
    with pytest.raises(InputError, match="does not exist"):  # a missing file is an error either way
        read_jsonl(tmp_path / "none.jsonl", on_bad_line=skip_bad_line)


def test_the_evaluation_cache_skips_a_torn_write(tmp_path):
    recs = [{"id": f"q{i}", "pred": "red"} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "rank0.jsonl").write_text(text + json.dumps({"id": "q3", "pred": "blue"})[:9])
    (tmp_path / "rank1.jsonl").write_text(json.dumps({"id": "q9"}) + "\n")
    assert sorted(_read_records(tmp_path)) == ["q0", "q1", "q2", "q9"]
    assert _read_records(tmp_path / "none") == {}


def test_a_checkpoint_with_a_broken_manifest_or_state_is_a_checkpoint_error(tmp_path):
    step = tmp_path / "step-00000004"
    step.mkdir()
    for name in ckpt.REQUIRED:
        (step / name).write_text("{}")
    (step / ckpt.MANIFEST).write_text('{"files": ')
    problem = ckpt.verify_checkpoint(step)
    assert "manifest.json' is not valid JSON, line 1, column 11" in problem and str(step) in problem
    (step / ckpt.MANIFEST).write_text('{"format": 1}')
    assert ckpt.verify_checkpoint(step) == "manifest.json cannot be read ('files')"
    (step / "trainer_state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError) as e:
        ckpt.read_trainer_state(step)
    assert str(e.value).startswith(f"checkpoint {str(step)!r}: {str(step / 'trainer_state.json')!r} is not valid JSON")
    assert str(e.value).endswith("(fix the JSON syntax there)")


def test_llava_files_are_read_by_their_first_character(tmp_path):
    entry = {"id": "a", "conversations": []}
    listed = tmp_path / "list.json"
    listed.write_text("\n \t" + json.dumps([entry, 3]))
    assert [(r.data, r.where, r.error) for r in load_llava(listed)] == [
        (entry, f"{listed}[0]", None), (None, f"{listed}[1]", "entry is a int, not an object")]
    listed.write_text("[" + json.dumps(entry) + ",")
    with pytest.raises(InputError, match=r"^LLaVA file .*list\.json' is not valid JSON, line 1.*\(fix the JSON"):
        load_llava(listed)
    lines = tmp_path / "lines.jsonl"
    lines.write_text(json.dumps(entry) + "\n{nope\n")
    records = load_llava(lines)
    assert [(r.where, r.error is None) for r in records] == [(f"{lines}:1", True), (f"{lines}:2", False)]
    assert records[1].error.startswith("line does not parse as JSON (Expecting property name")
    (tmp_path / "empty.jsonl").write_text("  \n")
    assert load_llava(tmp_path / "empty.jsonl") == []
    with pytest.raises(InputError, match=r"LLaVA file .*none\.json' does not exist; check the source's paths"):
        load_llava(tmp_path / "none.json")


def test_the_demo_log_is_empty_when_missing_and_skips_a_torn_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert read_demo_log(log) == []
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_demo_log(log) == [{"step": 1, "loss": 2.0}]
