"""Inference entry points on the mini world: model_vqa_loader (batched == unbatched), chunking, ScienceQA and
MMBench question building, eval_tiny / evaluate_tiny, and the interactive CLI driven through stdin."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from llava import generation
from llava.eval import eval_tiny, model_vqa_loader, model_vqa_mmbench, model_vqa_science
from llava.eval.model_vqa_loader import get_chunk, split_list
from llava.generation import generate_answers, read_questions

LLAVA_ANSWER_FIELDS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def questions(mini_world, tmp_path_factory):
    """Seven test questions of mixed prompt lengths (describe, choice, short) plus two text-only questions, one
    longer in tokens than any image question (it has no padding in its batch, yet expands to fewer positions)."""
    rows = read_questions(mini_world / "test_questions.jsonl")[:7]
    rows.insert(3, {"question_id": "text_only", "text": "What color is the sky?"})
    long_text = "Describe, in detail and in order, every small and large red, blue, green or yellow shape. " * 3
    rows.insert(1, {"question_id": "long_text_only", "text": long_text.strip()})
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


@pytest.fixture(scope="module")
def loaded(mini_checkpoint):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(str(mini_checkpoint), device="cpu")
    return tokenizer, model, image_processor


def run_loader(checkpoint, world, questions_path, answers_path, *extra: str) -> list[dict]:
    model_vqa_loader.main(
        [
            "--model-path",
            str(checkpoint),
            "--image-folder",
            str(world / "images"),
            "--question-file",
            str(questions_path),
            "--answers-file",
            str(answers_path),
            "--temperature",
            "0",
            "--max_new_tokens",
            str(MAX_NEW),
            "--device",
            "cpu",
            *extra,
        ]
    )
    return read_questions(answers_path)


def test_model_vqa_loader_batched_equals_unbatched(mini_checkpoint, mini_world, questions, tmp_path):
    path, rows = questions
    batched = run_loader(
        mini_checkpoint, mini_world, path, tmp_path / "new" / "b4.jsonl", "--batch-size", "4"
    )
    single = run_loader(mini_checkpoint, mini_world, path, tmp_path / "b1.jsonl", "--batch-size", "1")
    assert [list(a) for a in batched] == [LLAVA_ANSWER_FIELDS] * len(rows)
    assert [a["question_id"] for a in batched] == [q["question_id"] for q in rows]
    assert [a["prompt"] for a in batched] == [q["text"] for q in rows]
    assert {a["model_id"] for a in batched} == {mini_checkpoint.name}
    assert len({a["answer_id"] for a in batched}) == len(rows)
    # Left padding: every row's greedy answer is the same whatever its batch-mates.
    assert [a["text"] for a in batched] == [a["text"] for a in single]
    assert not list((tmp_path / "new").glob("*.tmp"))


def test_generate_answers_text_only_batch_returns_new_tokens_only(loaded, questions):
    tokenizer, model, image_processor = loaded
    text_only = [{"text": "Say hi."}, {"text": "What color is a small red circle?"}]
    together = generate_answers(
        model, tokenizer, image_processor, text_only, max_new_tokens=MAX_NEW, batch_size=2, progress=False
    )
    alone = [
        generate_answers(model, tokenizer, image_processor, [q], max_new_tokens=MAX_NEW, progress=False)[0]
        for q in text_only
    ]
    assert together == alone
    assert not any("Say hi" in a or "system" in a for a in together)
    assert model.training is False


def test_chunks_cover_every_question_once(mini_checkpoint, mini_world, questions, tmp_path):
    for n_items in range(0, 9):
        for n_chunks in range(1, 5):
            items = list(range(n_items))
            chunks = [get_chunk(items, n_chunks, k) for k in range(n_chunks)]
            assert [x for c in chunks for x in c] == items
    assert len(split_list(list(range(14)), 3)) == 3
    with pytest.raises(ValueError):
        get_chunk([1, 2], 2, 2)

    path, rows = questions
    merged = []
    for idx in range(3):
        merged += run_loader(
            mini_checkpoint,
            mini_world,
            path,
            tmp_path / f"3_{idx}.jsonl",
            "--num-chunks",
            "3",
            "--chunk-idx",
            str(idx),
            "--batch-size",
            "2",
        )
    assert [a["question_id"] for a in merged] == [q["question_id"] for q in rows]


def test_science_questions_follow_llava():
    records = [
        {
            "id": "1",
            "image": "1.png",
            "conversations": [{"from": "human", "value": "<image>\nWhich is hot?\nA. ice"}],
        },
        {"id": "2", "conversations": [{"from": "human", "value": "Pick one.\nA. x\nB. y"}]},
    ]
    q1, q2 = model_vqa_science.science_questions(records, single_pred_prompt=True)
    suffix = "\n" + model_vqa_science.SINGLE_PRED_PROMPT
    assert q1 == {
        "question_id": "1",
        "image": "1.png",
        "text": "Which is hot?\nA. ice" + suffix,
        "prompt": "<image>\nWhich is hot?\nA. ice" + suffix,
    }
    assert "image" not in q2 and q2["prompt"] == q2["text"] == "Pick one.\nA. x\nB. y" + suffix


def _mmbench_tsv(path, image_path) -> None:
    image = base64.b64encode(image_path.read_bytes()).decode()
    rows = [
        {
            "index": "7",
            "question": "What color?",
            "hint": "nan",
            "A": "red",
            "B": "blue",
            "C": "green",
            "D": "nan",
            "answer": "B",
            "category": "color",
            "image": image,
        },
        {
            "index": "9",
            "question": "How many?",
            "hint": "Count.",
            "A": "1",
            "B": "2",
            "C": "",
            "D": "",
            "answer": "A",
            "category": "count",
            "image": image,
        },
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def test_mmbench_all_rounds_end_to_end(mini_checkpoint, mini_world, tmp_path):
    tsv = tmp_path / "mmbench.tsv"
    _mmbench_tsv(tsv, mini_world / "images" / "test_000000.png")
    questions = model_vqa_mmbench.mmbench_questions(model_vqa_mmbench.read_tsv(tsv), True, True)
    assert [(q["question_id"], q["round_id"]) for q in questions] == [(7, 0), (7, 1), (7, 2), (9, 0), (9, 1)]
    assert questions[1]["prompt"] == "What color?\nA. blue\nB. green\nC. red"
    assert questions[1]["option_char"] == ["B", "C", "A"]
    assert questions[3]["prompt"] == "Count.\nHow many?\nA. 1\nB. 2"
    assert questions[3]["text"].endswith("\n" + model_vqa_mmbench.SINGLE_PRED_PROMPT["en"])
    assert isinstance(Image.open(io.BytesIO(questions[0]["image"])), Image.Image)

    answers = tmp_path / "mmbench_answers.jsonl"
    model_vqa_mmbench.main(
        [
            "--model-path",
            str(mini_checkpoint),
            "--question-file",
            str(tsv),
            "--answers-file",
            str(answers),
            "--all-rounds",
            "--single-pred-prompt",
            "--temperature",
            "0",
            "--max_new_tokens",
            "3",
            "--device",
            "cpu",
        ]
    )
    rows = read_questions(answers)
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(7, 0), (7, 1), (7, 2), (9, 0), (9, 1)]
    assert rows[2]["options"] == ["green", "red", "blue"] and rows[2]["option_char"] == ["C", "A", "B"]


def test_eval_tiny_on_hand_made_answers(mini_world, tmp_path):
    questions_path = mini_world / "test_questions.jsonl"
    questions = read_questions(questions_path)
    wrong = {"counting", "describe"}  # answer these families wrongly, the rest with the reference answer
    answers = [
        {"question_id": q["question_id"], "text": "zzz" if q["family"] in wrong else q["answer"]}
        for q in questions
    ]
    answers_path = tmp_path / "answers.jsonl"
    answers_path.write_text("".join(json.dumps(a) + "\n" for a in answers), encoding="utf-8")
    out_json, out_md = tmp_path / "out" / "r.json", tmp_path / "out" / "r.md"
    summary = eval_tiny.main(
        [
            "--question-file",
            str(questions_path),
            "--answers-file",
            str(answers_path),
            "--name",
            "hand",
            "--output-json",
            str(out_json),
            "--output-md",
            str(out_md),
        ]
    )
    for family, row in summary.items():
        if family != "overall":
            assert row["accuracy"] == (0.0 if family in wrong else 1.0), family
    n_wrong = sum(q["family"] in wrong for q in questions)
    assert summary["overall"]["n"] == len(questions)
    assert summary["overall"]["accuracy"] == pytest.approx(1 - n_wrong / len(questions))
    assert json.loads(out_json.read_text()) == {"hand": summary}
    assert out_md.read_text().splitlines()[2].startswith("| hand | ")

    with pytest.raises(ValueError, match="no answer"):
        eval_tiny.score_answers(questions, answers[1:])


def test_evaluate_tiny_model_or_path(loaded, mini_checkpoint, mini_world, tmp_path):
    tokenizer, model, image_processor = loaded
    summary = eval_tiny.evaluate_tiny(
        model,
        mini_world,
        tokenizer,
        image_processor,
        limit=4,
        max_new_tokens=MAX_NEW,
        answers_file=tmp_path / "a.jsonl",
    )
    assert summary["overall"]["n"] == 4 and 0.0 <= summary["overall"]["accuracy"] <= 1.0
    assert len(read_questions(tmp_path / "a.jsonl")) == 4
    assert (
        eval_tiny.evaluate_tiny(str(mini_checkpoint), mini_world, limit=4, max_new_tokens=MAX_NEW) == summary
    )
    with pytest.raises(ValueError, match="tokenizer"):
        eval_tiny.evaluate_tiny(model, mini_world)


def test_cli_chat_through_stdin(mini_checkpoint, mini_world):
    command = [
        sys.executable,
        "-m",
        "llava.serve.cli",
        "--model-path",
        str(mini_checkpoint),
        "--image-file",
        str(mini_world / "images" / "test_000000.png"),
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        command, input="what color?\n\n", capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "user: assistant: " in done.stdout
    reply = done.stdout.split("assistant: ", 1)[1].split("user: ", 1)[0]
    assert reply.strip(), done.stdout
    assert done.stdout.rstrip().endswith("exit...")


def test_cli_text_only_chat_keeps_its_replies(mini_checkpoint):
    """Without an image, each reply goes into the conversation history that the next turn's prompt shows."""
    command = [sys.executable, "-m", "llava.serve.cli", "--model-path", str(mini_checkpoint), "--temperature", "0",
               "--max-new-tokens", "4", "--device", "cpu", "--debug"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, input="hello there\nand then?\n\n", capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    debug = [eval(line.strip()) for line in done.stdout.splitlines() if line.strip().startswith("{'prompt'")]
    assert len(debug) == 2, done.stdout
    first_reply = debug[0]["outputs"]
    assert first_reply, done.stdout
    assert first_reply in debug[1]["prompt"].split("and then?")[0]


def test_default_conv_mode_follows_the_checkpoint_then_its_llm_family():
    from types import SimpleNamespace

    def model(**config):
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert generation.default_conv_mode(model(model_type="llava_qwen3", conv_template="plain")) == "plain"
    assert generation.default_conv_mode(model(model_type="llava_qwen3", conv_template=None)) == "qwen_3"
    assert generation.default_conv_mode(model(model_type="llava_qwen2")) == "qwen_2"
