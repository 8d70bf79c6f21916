"""Tiny world: determinism, idempotence, hold-out, answers re-derived from the scenes, tokenizer, scorer."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llava.tiny.questions import FAMILIES, PLURALS, SHORT_SUFFIX
from llava.tiny.scenes import HELDOUT_COMBOS, POSITIONS, Scene
from llava.tiny.score import description_facts, format_table, normalize, score_answer, summarize
from llava.tiny.world import add_eval_split, generate_world, load_scenes

SMALL = {"n_train": 40, "n_val": 21, "n_test": 42}
CELLS = {phrase: cell for cell, phrase in POSITIONS.items()}
SHAPE_OF_PLURAL = {p: s for s, p in PLURALS.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=0, **SMALL)
    return out


def _load(world: Path, name: str):
    return json.loads((world / name).read_text())


def _the_one(objects: list, what: str):
    """The single object in `objects`; a question naming zero or several would be ambiguous."""
    assert len(objects) == 1, f"ambiguous or absent referent: {what}"
    return objects[0]


def oracle(question: str, scene: Scene) -> str:
    """Answer a world question from scene metadata alone, by parsing its text (independent of world.py)."""
    objs = scene.objects

    def by_pair(color: str, shape: str):
        return _the_one([o for o in objs if (o.color, o.shape) == (color, shape)], f"{color} {shape}")

    if m := re.fullmatch(r"What color is the object (.+)\?", question):
        return _the_one([o for o in objs if (o.row, o.col) == CELLS[m[1]]], m[1]).color
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return _the_one([o for o in objs if o.shape == m[1]], m[1]).color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return _the_one([o for o in objs if o.color == m[1]], m[1]).shape
    if m := re.fullmatch(r"What size is the (\w+) (\w+)\?", question):
        return by_pair(m[1], m[2]).size
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"Is there an? (\w+) in the image\?", question):
        return "yes" if any(o.shape == m[1] for o in objs) else "no"
    if question == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o.color == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o.shape == SHAPE_OF_PLURAL[m[1]] for o in objs))
    if m := re.fullmatch(
        r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?", question
    ):
        a, b = by_pair(m[1], m[2]), by_pair(m[4], m[5])
        axis = "col" if "left" in m[3] or "right" in m[3] else "row"
        delta = getattr(a, axis) - getattr(b, axis)
        assert delta != 0, "relation asked along an axis where both objects share the cell line"
        return "yes" if (delta < 0) == (m[3] in ("to the left of", "above")) else "no"
    if m := re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", question):
        a, b = by_pair(m[1], m[2]), by_pair(m[3], m[4])
        dr, dc = a.row - b.row, a.col - b.col
        assert (dr == 0) != (dc == 0), "'where' needs exactly one differing axis"
        return ("above" if dr < 0 else "below") if dr else ("left" if dc < 0 else "right")
    if re.fullmatch(r"What (word |number )?is written in the image\?", question):
        assert scene.text is not None
        if "number" in question:
            assert scene.text.isdigit()
        return scene.text
    raise AssertionError(f"unknown question form: {question!r}")


def scene_facts(scene: Scene, with_positions: bool = True) -> set:
    facts = {("text", scene.text)}
    for o in scene.objects:
        facts |= {("object", o.color, o.shape), ("size", o.color, o.shape, o.size)}
        if with_positions:
            facts.add(("position", o.color, o.shape, POSITIONS[o.row, o.col]))
    return facts


def check_turn(question: str, answer: str, family: str, scene: Scene) -> None:
    if family == "describe":
        assert description_facts(answer) == scene_facts(scene)
        assert 20 <= len(answer.split()) <= 60
    elif family == "choice":
        head, *options, suffix = question.split("\n")
        assert suffix.startswith("Answer with the option's letter")
        letters = [line[0] for line in options]
        values = [line[3:] for line in options]
        assert letters == list("ABCD") and len(set(values)) == 4
        assert values[letters.index(answer)] == oracle(head, scene)
    else:
        assert question.endswith(SHORT_SUFFIX)
        assert oracle(question.removesuffix(SHORT_SUFFIX), scene) == answer


def test_deterministic_bytes(tmp_path):
    params = {"n_train": 12, "n_val": 7, "n_test": 14}
    a, b = generate_world(tmp_path / "a", seed=3, **params), generate_world(tmp_path / "b", seed=3, **params)
    assert a["content_hash"] == b["content_hash"]
    for f in a["files"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert generate_world(tmp_path / "c", seed=4, **params)["content_hash"] != a["content_hash"]


def test_idempotent_and_regenerates_on_new_params(tmp_path):
    first = generate_world(tmp_path, n_train=10, n_val=7, n_test=7)
    stamp = (
        (tmp_path / "manifest.json").stat().st_mtime_ns,
        (tmp_path / "images/train_000000.png").stat().st_mtime_ns,
    )
    assert generate_world(tmp_path, n_train=10, n_val=7, n_test=7) == first
    assert (
        (tmp_path / "manifest.json").stat().st_mtime_ns,
        (tmp_path / "images/train_000000.png").stat().st_mtime_ns,
    ) == stamp
    smaller = generate_world(tmp_path, n_train=5, n_val=7, n_test=7)
    assert smaller["params"]["n_train"] == 5
    assert not (tmp_path / "images/train_000009.png").exists()  # stale images of the old world are gone
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        f[7:] for f in smaller["files"] if f.startswith("images/")
    )


def test_layout(world):
    manifest = _load(world, "manifest.json")
    for f in manifest["files"]:
        assert (world / f).is_file()
    img = Image.open(world / "images/train_000000.png")
    assert img.mode == "RGB" and img.size == (64, 64)
    pretrain, finetune = _load(world, "pretrain.json"), _load(world, "finetune.json")
    assert len(pretrain) == SMALL["n_train"]
    for rec in pretrain + finetune:
        humans = [t["value"] for t in rec["conversations"][::2]]
        assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"] * len(humans)
        if "image" in rec:
            assert (world / "images" / rec["image"]).is_file()
            assert humans[0].startswith("<image>\n") and all("<image>" not in h for h in humans[1:])
        else:
            assert rec["family"] == "text" and all("<image>" not in h for h in humans)
    families = Counter(r["family"] for r in finetune)
    assert families["multi"] > 0 and families["text"] > 0 and set(FAMILIES) <= set(families)
    for split, n in (("val", SMALL["n_val"]), ("test", SMALL["n_test"])):
        records = _load(world, f"{split}.json")
        lines = [json.loads(x) for x in (world / f"{split}_questions.jsonl").read_text().splitlines()]
        assert len(records) == len(lines) == n
        for rec, line in zip(records, lines):
            assert set(line) == {"question_id", "image", "text", "family", "answer"}
            assert (line["question_id"], line["image"], line["family"], line["answer"]) == (
                rec["id"],
                rec["image"],
                rec["family"],
                rec["answer"],
            )
            assert "<image>\n" + line["text"] == rec["conversations"][0]["value"]
            assert rec["conversations"][1]["value"] == rec["answer"]


def test_heldout_combinations(world):
    scenes = load_scenes(world)
    held = set(HELDOUT_COMBOS)
    for name, scene in scenes.items():
        if name.startswith("train_"):
            assert not {(o.color, o.shape) for o in scene.objects} & held, name
    train_text = (world / "pretrain.json").read_text() + (world / "finetune.json").read_text()
    for color, shape in HELDOUT_COMBOS:
        assert f"{color} {shape}" not in train_text
    test = _load(world, "test.json")
    assert any(r["heldout"] for r in test)
    for r in test:
        assert r["heldout"] == scenes[r["image"]].heldout


def test_every_answer_follows_from_the_scene(world):
    scenes = load_scenes(world)
    for name in ("val.json", "test.json", "finetune.json"):
        for rec in _load(world, name):
            if "image" not in rec:
                continue
            families = rec.get("families", [rec["family"]])
            conv = rec["conversations"]
            for k, family in enumerate(families):
                question = conv[2 * k]["value"].removeprefix("<image>\n")
                check_turn(question, conv[2 * k + 1]["value"], family, scenes[rec["image"]])
    for rec in _load(world, "pretrain.json"):
        facts = description_facts(rec["conversations"][1]["value"])
        scene = scenes[rec["image"]]
        expected = scene_facts(scene, with_positions=False) - {("text", None)}
        assert facts == expected


def test_balance(world):
    for split in ("val", "test"):
        records = _load(world, f"{split}.json")
        counts = Counter(r["family"] for r in records)
        assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
        yes_no = Counter(r["answer"] for r in records if r["family"] == "existence")
        assert set(yes_no) == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) <= 1
        per_image: dict[str, list] = {}
        for r in records:
            per_image.setdefault(r["image"], []).append(r["family"])
        assert all(len(f) == len(set(f)) for f in per_image.values())
        assert sum(len(f) >= 2 for f in per_image.values()) >= len(per_image) - 1


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
    from llava.tiny.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(world, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_tokenizer_round_trip_and_specials(world, tokenizer):
    from llava.tiny.tokenizer import world_texts

    texts = world_texts(world)
    for text in texts[::7] + ["Ünïcode ✓ and\ttabs  ", "<|im_start|>user\nWhat?<|im_end|>"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert len(set(ids)) == 3
    for token, i in zip(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), ids):
        assert tokenizer.encode(token) == [i]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>")[0] == ids[1]
    assert tokenizer.pad_token_id == ids[0] and tokenizer.eos_token_id == ids[2]
    assert tokenizer.encode("13") == tokenizer.encode("1") + tokenizer.encode("3")  # Qwen splits digits
    assert len(tokenizer) <= 400


def test_tokenizer_chat_template_and_reload(tokenizer, tmp_path, world):
    from transformers import AutoTokenizer

    from llava.tiny.tokenizer import build_tiny_tokenizer

    messages = [
        {"role": "user", "content": "What color is the circle?"},
        {"role": "assistant", "content": "red"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat color is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    out = tmp_path / "tok"
    built = build_tiny_tokenizer(world, out, vocab_size=400)
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    again = build_tiny_tokenizer(world, out, vocab_size=400)  # idempotent: loads, does not retrain
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    # Training is deterministic: the fixture's separate build has the same bytes.
    assert (out / "tokenizer.json").read_bytes() == (Path(tokenizer.name_or_path) / "tokenizer.json").read_bytes()
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "Is the red circle above the blue square?"
    assert reloaded.encode(text) == built.encode(text) == again.encode(text) == tokenizer.encode(text)


def test_score_by_hand():
    assert normalize("  The Two. ") == "2"
    assert score_answer("counting", "Two", {"answer": "2"}) == 1.0
    assert score_answer("existence", "Yes.", {"answer": "yes"}) == 1.0
    assert score_answer("existence", "yes, there is", {"answer": "yes"}) == 0.0
    assert score_answer("spatial", "The left", {"answer": "left"}) == 1.0
    record = {"answer": "C", "options": ["red", "blue", "green", "yellow"]}
    for reply, score in (
        ("C", 1),
        ("C.", 1),
        ("C. green", 1),
        ("(C)", 1),
        ("B", 0),
        ("green", 1),
        ("blue", 0),
    ):
        assert score_answer("choice", reply, record) == score, reply
    reference = (
        "The image shows two objects on a plain light background. There is a large red circle at the top "
        'left and a small blue square in the center. The word "cat" is written at the bottom.'
    )
    # Reference facts: 2 objects x (object, size, position) + text = 7.
    assert score_answer("describe", reference, {"answer": reference}) == 1.0
    # Prediction: red circle with a wrong size and no position (1 of 2 facts right), blue square all right.
    pred = "A small red circle and a small blue square in the center. There is no text."
    # facts: object red circle (ok), size red circle small (wrong), object/size/position blue square (ok x3),
    # text none (wrong): precision 4/6, recall 4/7 -> F1 = 2 * (4/6) * (4/7) / (4/6 + 4/7) = 8/13.
    assert score_answer("describe", pred, {"answer": reference}) == pytest.approx(8 / 13)
    assert score_answer("describe", "I cannot tell.", {"answer": reference}) == 0.0


def test_summarize_and_table():
    results = [
        {"family": "existence", "score": 1.0},
        {"family": "existence", "score": 0.0},
        {"family": "choice", "prediction": "A", "answer": "A"},
        {"family": "text", "score": 1.0},
    ]
    summary = summarize(results)
    assert list(summary) == ["existence", "choice", "text", "overall"]
    assert summary["existence"] == {"n": 2, "accuracy": 0.5}
    assert summary["overall"] == {"n": 4, "accuracy": 0.75}
    table = format_table(
        {
            "student": summary,
            "teacher": {"existence": {"n": 2, "accuracy": 1.0}, "overall": {"n": 2, "accuracy": 1.0}},
        }
    )
    assert table.splitlines() == [
        "| model | existence | choice | text | overall |",
        "|---|---|---|---|---|",
        "| student | 50.0 | 100.0 | 100.0 | 75.0 |",
        "| teacher | 100.0 | - | - | 100.0 |",
    ]


def test_added_eval_split(tmp_path):
    """A larger evaluation split drawn like test: balanced, answers follow from its scenes, new images, and the
    world's own files untouched (checkpoints trained on it stay valid); idempotent; bad names refused."""
    world = generate_world(tmp_path, seed=0, **SMALL)
    before = {f: (tmp_path / f).read_bytes() for f in ("manifest.json", "test.json", "scenes.json")}
    split = add_eval_split(tmp_path, "test_large", 50)
    records = _load(tmp_path, "test_large.json")
    assert len(records) == 50 and split["families"] == dict(Counter(r["family"] for r in records))
    counts = Counter(r["family"] for r in records)
    assert set(counts) == set(FAMILIES) and max(counts.values()) - min(counts.values()) <= 1
    scenes = {k: Scene.from_dict(v) for k, v in _load(tmp_path, "test_large_scenes.json").items()}
    for rec in records:
        assert rec["image"].startswith("test_large_") and (tmp_path / "images" / rec["image"]).is_file()
        question = rec["conversations"][0]["value"].removeprefix("<image>\n")
        check_turn(question, rec["answer"], rec["family"], scenes[rec["image"]])
    questions = [json.loads(line) for line in (tmp_path / "test_large_questions.jsonl").read_text().splitlines()]
    assert [q["question_id"] for q in questions] == [r["id"] for r in records]
    test_questions = {r["conversations"][0]["value"] + r["image"] for r in _load(tmp_path, "test.json")}
    assert not test_questions & {r["conversations"][0]["value"] + r["image"] for r in records}
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    stamp = (tmp_path / "test_large_manifest.json").stat().st_mtime_ns
    assert add_eval_split(tmp_path, "test_large", 50) == split
    assert (tmp_path / "test_large_manifest.json").stat().st_mtime_ns == stamp
    assert generate_world(tmp_path, seed=0, **SMALL) == world  # still complete; the split's images survive
    assert all((tmp_path / f).is_file() for f in split["files"])
    for bad in ("test", "Large", "../x"):
        with pytest.raises(ValueError, match="split name"):
            add_eval_split(tmp_path, bad, 5)
