"""Each dataset adapter on a tiny fixture written in the real file format; task registry and YAML."""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
from PIL import Image

from interleaf.errors import ConfigError, InputError
from interleaf.evaluation.tasks import get_task, load_examples, load_task_yaml


def png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_karpathy_coco_and_flickr(tmp_path):
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 7,
         "sentences": [{"raw": "A dog. "}, {"raw": "a brown dog"}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "restval", "cocoid": 8, "sentences": [{"raw": "cat"}]},
        {"filepath": "train2014", "filename": "c.jpg", "split": "train", "cocoid": 9, "sentences": [{"raw": "cow"}]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "val", "cocoid": 10, "sentences": [{"raw": "x"}]},
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    test = load_examples(get_task("coco"), "test", data_dir=tmp_path)
    assert [e.id for e in test] == ["7"]
    assert test[0].answers == ["A dog.", "a brown dog"] and test[0].fields["caption"] == "A dog."
    assert test[0].images[0] == tmp_path / "val2014" / "a.jpg"
    train = load_examples(get_task("coco"), "train", data_dir=tmp_path)
    assert sorted(e.id for e in train) == ["8", "9"]  # restval belongs to train
    flickr = [{"filename": "1.jpg", "split": "test", "imgid": 3, "sentences": [{"raw": "people"}]}]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": flickr}))
    ex = load_examples(get_task("flickr30k"), "test", data_dir=tmp_path, images_dir=tmp_path / "imgs")
    assert ex[0].id == "3" and ex[0].images[0] == tmp_path / "imgs" / "1.jpg"


def test_missing_file_says_which_and_where(tmp_path):
    with pytest.raises(InputError) as e:
        load_examples(get_task("vqav2"), "test", data_dir=tmp_path)
    msg = str(e.value)
    assert "v2_OpenEnded_mscoco_val2014_questions.json" in msg and str(tmp_path) in msg and "visualqa.org" in msg


def test_vqav2_pairs_by_question_id_not_position(tmp_path):
    questions = {"questions": [{"image_id": 1, "question": "what colour?", "question_id": 11},
                               {"image_id": 2, "question": "how many?", "question_id": 22}]}
    annotations = {"annotations": [  # deliberately in the other order
        {"question_id": 22, "image_id": 2, "answer_type": "number", "answers": [{"answer": "2"}] * 10},
        {"question_id": 11, "image_id": 1, "answer_type": "other",
         "answers": [{"answer": "red"}] * 7 + [{"answer": "pink"}] * 3},
    ]}
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    ex = {e.id: e for e in load_examples(get_task("vqav2"), "test", data_dir=tmp_path)}
    assert ex["11"].answers.count("red") == 7 and ex["11"].fields["answer"] == "red" and ex["11"].group == "other"
    assert ex["22"].answers == ["2"] * 10 and ex["22"].fields["question"] == "how many?"
    assert ex["11"].images[0] == tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    # OK-VQA uses the same format with its own file names
    (tmp_path / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    assert len(load_examples(get_task("okvqa"), "test", data_dir=tmp_path)) == 2


def test_textvqa_and_vizwiz_native_files(tmp_path):
    tv = {"data": [{"question_id": 5, "question": "what brand?", "image_id": "abc", "answers": ["nike"] * 10,
                    "answer_type": "other"}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(tv))
    e = load_examples(get_task("textvqa"), "test", data_dir=tmp_path)[0]
    assert e.id == "5" and e.answers == ["nike"] * 10 and e.images[0] == tmp_path / "train_images" / "abc.jpg"
    vw = [{"image": "VizWiz_val_00000001.jpg", "question": "what is this?", "answer_type": "other",
           "answers": [{"answer": "a can", "answer_confidence": "yes"}] * 10}]
    (tmp_path / "val.json").write_text(json.dumps(vw))
    e = load_examples(get_task("vizwiz"), "test", data_dir=tmp_path)[0]
    assert e.id == "VizWiz_val_00000001" and e.fields["answer"] == "a can"
    assert e.images[0] == tmp_path / "val" / "VizWiz_val_00000001.jpg"


def test_hateful_memes_jsonl(tmp_path):
    rows = [{"id": 42, "img": "img/42.png", "label": 1, "text": "some text"},
            {"id": 43, "img": "img/43.png", "label": 0, "text": "other"}]
    (tmp_path / "dev_seen.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ex = load_examples(get_task("hateful_memes"), "test", data_dir=tmp_path)
    assert [(e.id, e.label, e.fields["answer"]) for e in ex] == [("42", 1, "yes"), ("43", 0, "no")]
    assert ex[0].candidates == ["no", "yes"] and ex[0].fields["ocr"] == "some text"


def test_imagefolder_classes(tmp_path):
    for cls, n in (("n01", 2), ("n02", 1)):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "val" / cls / f"{i}.JPEG").write_bytes(png())
    (tmp_path / "names.json").write_text(json.dumps({"n01": "goldfish", "n02": "shark"}))
    task = load_task_yaml_text(tmp_path, "base: imagenet\nname: tiny-imagenet\nfiles: {test: val, class_names: names.json}\n")
    ex = load_examples(task, "test", data_dir=tmp_path)
    assert [e.label for e in ex] == [0, 0, 1] and ex[0].candidates == ["goldfish", "shark"]
    assert ex[2].fields["class_name"] == "shark" and task.rank_reduce == "mean"


def load_task_yaml_text(tmp_path, text):
    p = tmp_path / "task.yaml"
    p.write_text(text)
    return load_task_yaml(p)


def test_scienceqa_image_questions_only(tmp_path):
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["frog", "cat"], "answer": 1, "image": "image.png",
              "split": "test", "hint": "Look.", "subject": "natural science"},
        "2": {"question": "no image", "choices": ["a", "b"], "answer": 0, "image": None, "split": "test"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    ex = load_examples(get_task("scienceqa"), "test", data_dir=tmp_path, images_dir=tmp_path / "images")
    assert [e.id for e in ex] == ["1"]
    assert ex[0].fields["options"] == "A. frog\nB. cat" and ex[0].answers == ["B"] and ex[0].group == "natural science"
    assert ex[0].images[0] == tmp_path / "images" / "test" / "1" / "image.png"


def test_mmbench_tsv_base64_and_rotations(tmp_path):
    b64 = base64.b64encode(png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    rows = f"0\tWhat colour?\tnan\tred\tblue\tgreen\t\tA\tcolour\t{b64}\n"
    (tmp_path / "mmbench_dev_20230712.tsv").write_text(header + rows)
    ex = load_examples(get_task("mmbench"), "dev", data_dir=tmp_path)
    assert [e.id for e in ex] == ["0:r0", "0:r1", "0:r2"]
    assert [e.answers[0] for e in ex] == ["A", "C", "B"]  # the right option moves with each rotation
    assert ex[1].fields["options"] == "A. blue\nB. green\nC. red" and ex[0].fields["hint"] == ""
    assert ex[0].images[0] == png() and {e.meta["source_id"] for e in ex} == {"0"}


def test_mme_tree(tmp_path):
    sub = tmp_path / "MME_Benchmark" / "color"
    sub.mkdir(parents=True)
    (sub / "001.png").write_bytes(png())
    (sub / "001.txt").write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
    art = tmp_path / "MME_Benchmark" / "artwork"
    (art / "images").mkdir(parents=True)
    (art / "questions_answer_YES_NO").mkdir()
    (art / "images" / "x.jpg").write_bytes(png())
    (art / "questions_answer_YES_NO" / "x.txt").write_text("Is this by Monet?\tNo\n")
    ex = load_examples(get_task("mme"), "test", data_dir=tmp_path)
    assert [(e.group, e.answers[0]) for e in ex] == [("artwork", "No"), ("color", "Yes"), ("color", "No")]
    assert ex[1].meta["image_id"] == ex[2].meta["image_id"] == "color/001"


def test_mmmu_interleaved_images(tmp_path):
    b64 = base64.b64encode(png((0, 0, 255))).decode()
    (tmp_path / "pic.png").write_bytes(png())
    row = {"id": "validation_Art_Theory_1", "question": "Compare <image 2> with <image 1>.",
           "options": "['left', 'right']", "answer": "B", "image_1": "pic.png", "image_2": "data:image/png;base64," + b64}
    (tmp_path / "mmmu_validation.jsonl").write_text(json.dumps(row) + "\n")
    e = load_examples(get_task("mmmu"), "validation", data_dir=tmp_path)[0]
    assert e.fields["question"] == "Compare <image> with <image>." and e.fields["options"] == "A. left\nB. right"
    assert e.images == [png((0, 0, 255)), tmp_path / "pic.png"]  # order of appearance in the text
    assert e.group == "Art_Theory"
    prompt = get_task("mmmu").template("openflamingo").render(e, demo=False)
    assert prompt == ["Compare ", e.images[0], " with ", e.images[1], ".\nA. left\nB. right\nAnswer:"]


def test_llava_task_last_assistant_turn(tmp_path):
    data = [{"id": "q1", "image": "a.png", "qtype": "colour", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a ball"},
        {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red"}]}]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    task = get_task(f"llava:{path}")
    e = load_examples(task, "test", images_dir=tmp_path / "imgs")[0]
    assert e.answers == ["Red"] and e.fields["question"] == "What colour?" and e.group == "colour"
    assert e.fields["history"] == "Question:What is it? Short answer:a ball "
    assert e.images == [tmp_path / "imgs" / "a.png"] and task.metric == "exact_match"


def test_synth_tasks_read_the_corpus(tmp_path):
    from interleaf.data import write_corpus

    write_corpus(tmp_path, n_train_scenes=12, n_heldout_scenes=4)
    vqa = load_examples(get_task("synth-vqa"), "test", data_dir=tmp_path)
    assert {e.group for e in vqa} == {"colour", "shape", "count", "position", "yesno"}
    assert all(e.images[0].is_file() for e in vqa)
    caps = load_examples(get_task("synth-caption"), "test", data_dir=tmp_path)
    assert caps and all(e.images[0].is_file() and len(e.answers) == 3 for e in caps)
    train_caps = load_examples(get_task("synth-caption"), "train", data_dir=tmp_path)
    assert train_caps and all(e.images[0].is_file() for e in train_caps)
    eps = load_examples(get_task("synth-fewshot"), "test", options={"episodes": 5, "shots": 4})
    assert len(eps) == 5 and all(len(e.demos) == 4 and e.candidates[e.label] == e.answers[0] for e in eps)
    # each candidate name is defined by at least one demonstration of the episode
    assert all(set(e.candidates) == {d.fields["answer"] for d in e.demos} for e in eps)


def test_yaml_task_and_errors(tmp_path):
    t = load_task_yaml_text(tmp_path, """
name: my-vqa
adapter: llava
metric: exact_match
files: {test: data.json, train: data.json}
templates:
  openflamingo: {demo: "<image>Q: {question} A: {answer}<|endofchunk|>"}
""")
    assert t.template("openflamingo").query == "<image>Q: {question} A: "
    assert t.template("idefics") is t.template("openflamingo")  # a single template serves both formats
    with pytest.raises(ConfigError, match="metric"):
        load_task_yaml_text(tmp_path, "base: vqav2\nmetric: bleu\n")
    with pytest.raises(ConfigError, match="'shotz': unknown field"):  # the one unknown-key message of every config
        load_task_yaml_text(tmp_path, "base: vqav2\nshotz: 3\n")
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("no-such-task")


def test_demo_split_examples_are_shuffle_independent():
    # the synthetic episodes depend only on the seed option, not on global random state
    random.seed(123)
    a = load_examples(get_task("synth-fewshot"), "test", options={"episodes": 3})
    random.seed(456)
    b = load_examples(get_task("synth-fewshot"), "test", options={"episodes": 3})
    assert [e.answers for e in a] == [e.answers for e in b]
