"""`python -m llava.data.convert`: each converter on samples written here, bad records skipped and counted,
image paths made relative to --image_folder, merge counts exact and deterministic under a seed. Whatever a
converter writes must pass training's own record checks (`llava.train.data.check_record`)."""

import csv
import json
from pathlib import Path

import pytest

from llava.data.convert import main
from llava.data.converters.mix import parse_source, target_count
from llava.data.converters.tables import pick_answer
from llava.train.data import check_record, load_records


@pytest.fixture
def images(tmp_path):
    """An image folder with a few files (stat is all the converters check, so any bytes do)."""
    root = tmp_path / "images"
    for rel in ["coco/train2017/000000000009.jpg", "coco/train2017/000000000025.jpg", "gqa/images/n1.jpg",
                "gqa/images/n2.jpg", "textvqa/train_images/abc.jpg", "LLaVA-Pretrain/images/00000/000000001.jpg",
                "sam/images/sa_1.jpg", "sbu/0001.jpg", "sbu/0002.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not decoded")
    return root


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, lines) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return str(path)


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def assert_trainable(records, image_folder):
    for r in records:
        check_record(r, str(image_folder))  # raises BadSample if training would skip it


def skipped_kinds(path):
    return sorted(json.loads(line)["kind"] for line in Path(path).read_text().splitlines())


def test_llava_normaliser_fixes_tags_roles_and_paths(tmp_path, images, capsys):
    src = write_json(tmp_path / "in.json", [
        {"id": "a", "image": "coco/train2017/000000000009.jpg", "conversations": turns("What is it?\n<image>", "A cat.")},
        {"id": "b", "image": ["coco/train2017/000000000025.jpg"],
         "conversations": turns("Hi", "Hello", "<image>\nAnd this?", "A dog.")},
        {"id": "c", "image": str(images / "gqa/images/n1.jpg"), "conversations": turns("Describe.", "Grass.")},
        {"image": "gqa/images/n2.jpg", "model": "",
         "conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "Color?"},
                           {"from": "assistant", "value": "Green."}, {"from": "user", "value": "unanswered"}]},
        {"id": "t", "conversations": turns("Text only <image> here", "Fine.")},
        {"id": "null-image", "image": None, "conversations": turns("Q", "A")},
    ])
    out = tmp_path / "out.json"
    assert main(["llava", src, "-o", str(out), "--image_folder", str(images)]) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    by_id = {r["id"]: r for r in records}
    assert by_id["a"]["conversations"][0]["value"] == "<image>\nWhat is it?"
    assert by_id["b"]["image"] == "coco/train2017/000000000025.jpg"  # one-element list -> its string
    assert by_id["b"]["conversations"][0]["value"] == "<image>\nHi"  # tag moved from the second question
    assert "<image>" not in by_id["b"]["conversations"][2]["value"]
    assert by_id["c"]["image"] == "gqa/images/n1.jpg"  # absolute path inside the folder -> relative
    added = by_id["in-3"]  # missing id -> <stem>-<index>
    assert [t["from"] for t in added["conversations"]] == ["human", "gpt"]  # system dropped, user/assistant mapped
    assert added["conversations"][0]["value"] == "<image>\nColor?" and added["model"] == ""
    assert by_id["t"]["conversations"][0]["value"] == "Text only  here" and "image" not in by_id["t"]
    assert "image" not in by_id["null-image"]
    summary = capsys.readouterr().err
    assert "6 records read, 6 written" in summary
    assert "fixed (dropped a leading system turn): 1" in summary
    assert "fixed (moved <image> to the front of the first turn): 1" in summary


def test_llava_bad_records_are_skipped_counted_and_named(tmp_path, images, capsys):
    good = {"id": "ok", "image": "coco/train2017/000000000009.jpg", "conversations": turns("<image>\nQ", "A")}
    src = write_jsonl(tmp_path / "in.jsonl", [
        good,
        "{not json",
        {"id": "missing", "image": "coco/train2017/nope.jpg", "conversations": turns("Q", "A")},
        {"id": "escape", "image": "../outside.jpg", "conversations": turns("Q", "A")},
        {"id": "multi", "image": ["a.jpg", "b.jpg"], "conversations": turns("Q", "A")},
        {"id": "two-tags", "image": "gqa/images/n1.jpg", "conversations": turns("<image><image> Q", "A")},
        {"id": "roles", "conversations": turns("Q", "A") + [{"from": "gpt", "value": "again"}]},
        {"id": "bad-role", "conversations": [{"from": "bot", "value": "x"}]},
        {"id": "value", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "A"}]},
        ["not", "a", "record"],
    ])
    out, skipped = tmp_path / "out.jsonl", tmp_path / "skipped.jsonl"
    assert main(["llava", src, "-o", str(out), "--image_folder", str(images), "--skipped", str(skipped)]) == 0
    assert [r["id"] for r in load_records(str(out))] == ["ok"]
    assert skipped_kinds(skipped) == sorted(["invalid_json", "missing_image", "escaping_image", "multi_image"]
                                            + ["malformed"] * 5)
    first = json.loads(Path(skipped).read_text().splitlines()[0])
    assert (first["index"], first["line"]) == (1, 2)
    err = capsys.readouterr().err
    assert "10 records read, 1 written" in err and "skipped malformed: 5" in err
    assert f"{src}, record 2, line 3: image file not found" in err  # file, record index and line named
    # --keep_missing keeps the record with a missing image (counted); --strict stops at the first bad record
    assert main(["llava", src, "-o", str(out), "--image_folder", str(images), "--keep_missing"]) == 0
    assert "missing" in [r["id"] for r in load_records(str(out))]
    strict_out = tmp_path / "strict.json"
    assert main(["llava", src, "-o", str(strict_out), "--image_folder", str(images), "--strict"]) == 1
    assert not strict_out.exists() and not Path(str(strict_out) + ".tmp").exists()
    assert "record 1, line 2: not valid JSON" in capsys.readouterr().err


def test_input_root_and_map_relativise_paths(tmp_path, images):
    # paths relative to the COCO folder, written relative to the whole image folder
    src = write_json(tmp_path / "in.json", [{"id": "a", "image": "train2017/000000000009.jpg",
                                             "conversations": turns("Q", "A")}])
    out = tmp_path / "out.json"
    assert main(["llava", src, "-o", str(out), "--image_folder", str(images),
                 "--input_root", str(images / "coco")]) == 0
    assert load_records(str(out))[0]["image"] == "coco/train2017/000000000009.jpg"
    # without --image_folder paths pass unchanged (normalised), unchecked
    assert main(["llava", src, "-o", str(out)]) == 0
    assert load_records(str(out))[0]["image"] == "train2017/000000000009.jpg"
    # an input root outside the image folder escapes it
    assert main(["llava", src, "-o", str(out), "--image_folder", str(images / "gqa"),
                 "--input_root", str(images / "coco")]) == 1


def test_sharegpt4v_maps_its_folders_and_counts_them(tmp_path, images, capsys):
    src = write_json(tmp_path / "share-captioner.json", [
        {"id": "1", "image": "llava/llava_pretrain/images/00000/000000001.jpg",
         "conversations": turns("What do you see?\n<image>", "A long caption.")},
        {"id": "2", "image": "coco/train2017/000000000009.jpg", "conversations": turns("<image>\nDescribe.", "X")},
        {"id": "3", "image": "sam/images/sa_1.jpg", "conversations": turns("<image>\nDescribe.", "Y")},
        {"id": "4", "image": "sam/images/sa_2.jpg", "conversations": turns("<image>\nDescribe.", "Z")},
        {"id": "5", "image": "elsewhere/x.jpg", "conversations": turns("<image>\nDescribe.", "W")},
    ])
    out = tmp_path / "out.json"
    assert main(["sharegpt4v", src, "-o", str(out), "--image_folder", str(images),
                 "--map", "llava/llava_pretrain/images=LLaVA-Pretrain/images"]) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    assert [r["image"] for r in records] == ["LLaVA-Pretrain/images/00000/000000001.jpg",
                                             "coco/train2017/000000000009.jpg", "sam/images/sa_1.jpg"]
    err = capsys.readouterr().err
    assert "llava/llava_pretrain/images: ok 1" in err
    assert "sam/images: missing_image 1, ok 1" in err
    assert "elsewhere/ (unknown): missing_image 1" in err


def test_vqa_csv_with_own_column_names(tmp_path, images, capsys):
    src = tmp_path / "vqa.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["qid", "q", "a", "img"])
        w.writerows([["1", "What animal?", "cat", "9"], ["2", "", "x", "9"], ["3", "How many?", "2", "25"],
                     ["4", "Where?", "park", "404"]])
    out = tmp_path / "out.jsonl"
    assert main(["vqa", str(src), "-o", str(out), "--image_folder", str(images), "--question_key", "q",
                 "--answer_key", "a", "--image_key", "img", "--id_key", "qid",
                 "--image_format", "coco/train2017/{:012d}.jpg", "--short_answer"]) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    assert [r["id"] for r in records] == ["1", "3"]
    assert records[0]["image"] == "coco/train2017/000000000009.jpg"
    assert records[0]["conversations"] == turns(
        "<image>\nWhat animal?\nAnswer the question using a single word or phrase.", "cat")
    err = capsys.readouterr().err
    assert "skipped empty_text: 1" in err and "skipped missing_image: 1" in err
    assert f"{src}, record 1, line 3: question 'q' is empty" in err


def test_vqa_gqa_and_textvqa_layouts(tmp_path, images):
    gqa = write_json(tmp_path / "train_balanced_questions.json", {
        "q1": {"imageId": "n1", "question": "Is it green?", "answer": "yes"},
        "q2": {"imageId": "n2", "question": "What is it?", "answer": "grass"},
        "q3": {"imageId": "n1", "question": "Is it blue?", "answer": "no"},
        "q4": {"imageId": "n1", "question": "Is it red?", "answer": "no"},
    })
    out = tmp_path / "gqa.json"
    assert main(["vqa", gqa, "-o", str(out), "--image_folder", str(images), "--image_key", "imageId",
                 "--image_format", "gqa/images/{}.jpg", "--max_turns", "2"]) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    # question ids become ids; two questions per conversation on one image, the rest flushed at the end
    assert [(r["id"], r["image"], len(r["conversations"])) for r in records] == [
        ("q1", "gqa/images/n1.jpg", 4), ("q2", "gqa/images/n2.jpg", 2), ("q4", "gqa/images/n1.jpg", 2)]
    assert records[0]["conversations"][2]["value"] == "Is it blue?"
    textvqa = write_json(tmp_path / "TextVQA_0.5.1_train.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 7, "image_id": "abc", "question": "What brand?", "answers": ["nokia"] * 3 + ["sony"] * 3},
    ]})
    out = tmp_path / "textvqa.json"
    assert main(["vqa", textvqa, "-o", str(out), "--image_folder", str(images), "--records_key", "data",
                 "--answer_key", "answers", "--image_key", "image_id", "--id_key", "question_id",
                 "--image_format", "textvqa/train_images/{}.jpg"]) == 0
    (record,) = load_records(str(out))
    assert record["id"] == "7" and record["conversations"][1]["value"] == "nokia"  # tie -> the earliest


def test_pick_answer():
    assert pick_answer(["a", "b", "b"]) == "b"
    assert pick_answer([{"answer": "x"}, {"answer": "y"}, {"answer": "y"}]) == "y"
    assert pick_answer(3) == "3"


def test_captions_table_and_coco(tmp_path, images):
    src = tmp_path / "sbu.tsv"
    src.write_text("path\ttext\nsbu/0001.jpg\ta dog on a beach\nsbu/0002.jpg\t \nsbu/0003.jpg\ta cat\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe the image briefly.\nWrite a short caption.\nSummarise the picture.\n")
    out = tmp_path / "sbu.jsonl"
    args = ["captions", str(src), "-o", str(out), "--image_folder", str(images), "--image_key", "path",
            "--caption_key", "text", "--prompts_file", str(prompts), "--seed", "3"]
    assert main(args) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    assert [r["id"] for r in records] == ["sbu-0"]  # empty caption and missing image skipped
    first = records[0]["conversations"]
    assert first[0]["value"].startswith("<image>\n") and first[1]["value"] == "a dog on a beach"
    before = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == before  # prompt draw is seeded
    coco = write_json(tmp_path / "captions_train2017.json", {
        "info": {}, "licenses": [],
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
        "annotations": [{"id": 1, "image_id": 9, "caption": "A plate of food."},
                        {"id": 2, "image_id": 9, "caption": "Broccoli and meat."},
                        {"id": 3, "image_id": 25, "caption": "A giraffe."},
                        {"id": 4, "image_id": 77, "caption": "No such image."}]})
    out = tmp_path / "coco.json"
    assert main(["captions", coco, "-o", str(out), "--image_folder", str(images),
                 "--image_format", "coco/train2017/{}", "--prompt", "Caption this."]) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    assert [(r["id"], r["image"]) for r in records] == [("1", "coco/train2017/000000000009.jpg"),
                                                        ("2", "coco/train2017/000000000009.jpg"),
                                                        ("3", "coco/train2017/000000000025.jpg")]
    assert records[2]["conversations"] == turns("<image>\nCaption this.", "A giraffe.")


def make_source(tmp_path, name, n, image="coco/train2017/000000000009.jpg", bad=0):
    records = [{"id": f"{name}-{i}", "image": image, "conversations": turns("<image>\nQ", f"{name} {i}")}
               for i in range(n)]
    records += [{"id": f"{name}-bad-{i}", "conversations": []} for i in range(bad)]
    return write_json(tmp_path / f"{name}.json", records)


def test_merge_counts_manifest_and_seed(tmp_path, images):
    a = make_source(tmp_path, "a", 10, bad=2)
    b = make_source(tmp_path, "b", 4)
    c = make_source(tmp_path, "c", 20)
    out = tmp_path / "mix.json"
    args = ["merge", f"{a}:3", f"bee={b}:2x", f"{c}:25%", "-o", str(out), "--image_folder", str(images),
            "--seed", "1"]
    assert main(args) == 0
    records = load_records(str(out))
    assert_trainable(records, images)
    counts = {p: sum(r["id"].startswith(p + "-") for r in records) for p in "abc"}
    assert counts == {"a": 3, "b": 8, "c": 5}
    manifest = json.loads((tmp_path / "mix.manifest.json").read_text())
    rows = {s["name"]: s for s in manifest["sources"]}
    assert manifest["total"] == 16 and manifest["seed"] == 1
    assert (rows["a"]["read"], rows["a"]["valid"], rows["a"]["skipped"], rows["a"]["taken"]) == (
        12, 10, {"malformed": 2}, 3)
    assert rows["bee"]["taken"] == 8 and rows["bee"]["repeats"] == 2.0
    before = out.read_bytes()
    assert main(args) == 0 and out.read_bytes() == before  # same seed, same file byte for byte
    assert main(args[:-1] + ["2"]) == 0 and out.read_bytes() != before
    # a source's picks depend on (seed, its name) only: adding a source leaves them as they were
    assert main(["merge", f"{a}:3", "-o", str(out), "--seed", "1", "--no_shuffle"]) == 0
    alone = [r["id"] for r in load_records(str(out))]
    assert main(["merge", f"{c}:4", f"{a}:3", "-o", str(out), "--seed", "1", "--no_shuffle"]) == 0
    assert [r["id"] for r in load_records(str(out))][4:] == alone


def test_merge_source_specs():
    assert parse_source("/d/vsr.json:13000").spec == "13000"
    assert (parse_source("coco=/d/x:y.json").name, parse_source("coco=/d/x:y.json").path) == ("coco", "/d/x:y.json")
    assert parse_source("/d/a=b/c.json").name == "c"  # '=' inside a path is not a name
    assert [target_count(s, 10) for s in ("all", "3", "0.25", "25%", "2x", "1.5", "30")] == [10, 3, 2, 2, 20, 15, 30]


def test_errors_name_the_file(tmp_path, capsys):
    assert main(["llava", str(tmp_path / "absent.json"), "-o", str(tmp_path / "o.json")]) == 2
    assert "absent.json: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": 1,]')
    assert main(["llava", str(broken), "-o", str(tmp_path / "o.json")]) == 2
    assert "broken.json: not valid JSON" in capsys.readouterr().err
    ok = write_json(tmp_path / "ok.json", [{"conversations": turns("Q", "A")}] * 3)
    assert main(["llava", ok, "--dry_run"]) == 0 and not list(tmp_path.glob("*.tmp"))
    assert main(["llava", ok, "-o", str(tmp_path / "two.jsonl"), "--limit", "2"]) == 0
    assert len(load_records(str(tmp_path / "two.jsonl"))) == 2
    gone = write_json(tmp_path / "gone.json", [{"image": "x.jpg", "conversations": turns("Q", "A")}])
    assert main(["llava", gone, "-o", str(tmp_path / "o.json"), "--image_folder", str(tmp_path)]) == 1
    assert "no record of" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["llava", "sharegpt4v", "vqa", "captions", "merge"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "--image_folder" in capsys.readouterr().out
