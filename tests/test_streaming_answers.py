"""Streaming answers files (issue 15): model_vqa_* append each batch as it is generated and, rerun on the same
file, skip the questions already answered. A crash is simulated by injecting an `answer_batches` that yields k
batches of the real `iter_answers` on the mini checkpoint and then raises."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from llava.eval import model_vqa_loader, model_vqa_mmbench, model_vqa_science
from llava.eval.model_vqa_loader import read_answered
from llava.generation import iter_answers, read_questions

MAX_NEW = 4
LLAVA_FIELDS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


class Crash(RuntimeError):
    pass


def crash_after(k: int, calls: list | None = None):
    """An `answer_batches` that yields the first k batches of `iter_answers`, then raises `Crash`."""

    def answer_batches(*args, **kwargs):
        if calls is not None:
            calls.append(len(args[3]))  # questions asked
        batches = iter_answers(*args, **kwargs)
        try:
            for _ in range(k):
                yield next(batches)
        finally:
            batches.close()
        raise Crash(f"stopped after {k} batches")

    return answer_batches


def counting(calls: list):
    """`iter_answers`, recording how many questions each call was asked."""

    def answer_batches(*args, **kwargs):
        calls.append(len(args[3]))
        yield from iter_answers(*args, **kwargs)

    return answer_batches


def same_answers(rows: list[dict]) -> list[tuple]:
    """What must not depend on interruptions (answer_id is a fresh uuid per line, as in LLaVA)."""
    return [(r["question_id"], r["prompt"], r["text"], r["model_id"]) for r in rows]


@pytest.fixture(scope="module")
def questions(mini_world, tmp_path_factory):
    rows = read_questions(mini_world / "test_questions.jsonl")[:7]
    path = tmp_path_factory.mktemp("stream") / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def loader_args(checkpoint, world, questions_path, answers_path, *extra: str) -> list[str]:
    return [
        "--model-path", str(checkpoint), "--image-folder", str(world / "images"),
        "--question-file", str(questions_path), "--answers-file", str(answers_path),
        "--temperature", "0", "--max_new_tokens", str(MAX_NEW), "--device", "cpu", "--batch-size", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(mini_checkpoint, mini_world, questions, tmp_path_factory):
    path, _ = questions
    answers = tmp_path_factory.mktemp("full") / "answers.jsonl"
    model_vqa_loader.main(loader_args(mini_checkpoint, mini_world, path, answers))
    return read_questions(answers)


def test_crash_keeps_finished_batches_and_rerun_completes(
    mini_checkpoint, mini_world, questions, uninterrupted, tmp_path, caplog
):
    path, rows = questions
    answers = tmp_path / "answers.jsonl"
    argv = loader_args(mini_checkpoint, mini_world, path, answers)
    with pytest.raises(Crash):
        model_vqa_loader.main(argv, answer_batches=crash_after(2))
    on_disk = read_questions(answers)
    assert [list(r) for r in on_disk] == [LLAVA_FIELDS] * 4  # k = 2 batches of 2, complete LLaVA lines
    assert same_answers(on_disk) == same_answers(uninterrupted[:4])

    calls = []
    with caplog.at_level(logging.INFO, logger="llava.eval.model_vqa_loader"):
        model_vqa_loader.main(argv, answer_batches=counting(calls))
    assert calls == [3]  # only the 3 unanswered questions were generated
    assert "skipping 4 of 7 questions already answered there; 3 to answer" in caplog.text
    final = read_questions(answers)
    assert [r["question_id"] for r in final] == [q["question_id"] for q in rows]  # order kept, no duplicates
    assert same_answers(final) == same_answers(uninterrupted)
    assert final[:4] == on_disk  # the lines written before the crash are kept as they were

    calls.clear()  # a finished file: nothing to generate
    model_vqa_loader.main(argv, answer_batches=counting(calls))
    assert calls == [] and read_questions(answers) == final


def test_partial_last_line_is_dropped_and_answered_again(
    mini_checkpoint, mini_world, questions, uninterrupted, tmp_path, caplog
):
    path, rows = questions
    answers = tmp_path / "answers.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in uninterrupted[:3])
    answers.write_text(text + json.dumps(uninterrupted[3])[:25], encoding="utf-8")  # a crash mid-write

    assert read_answered(answers) == uninterrupted[:3]
    assert answers.read_text(encoding="utf-8") == text  # cut back to the last complete line
    answers.write_text(text + json.dumps(uninterrupted[3])[:25], encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="llava.eval.model_vqa_loader"):
        model_vqa_loader.main(loader_args(mini_checkpoint, mini_world, path, answers))
    assert "dropping a partial last line" in caplog.text and "skipping 3 of 7" in caplog.text
    assert same_answers(read_questions(answers)) == same_answers(uninterrupted)


def test_read_answered_edge_cases(tmp_path):
    path = tmp_path / "a.jsonl"
    assert read_answered(path) == [] and not path.exists()
    path.write_text('{"question_id": 1}\n\n{"question_id": 2}\n', encoding="utf-8")
    assert read_answered(path) == [{"question_id": 1}, {"question_id": 2}]
    path.write_text('{"question_id": 1', encoding="utf-8")  # only a partial line
    assert read_answered(path) == [] and path.read_bytes() == b""
    path.write_text('{"question_id": 1}\nnot json\n{"question_id": 2}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not a JSON answer line"):
        read_answered(path)


def test_file_of_another_run_is_refused(mini_checkpoint, mini_world, questions, uninterrupted, tmp_path):
    path, _ = questions
    answers = tmp_path / "answers.jsonl"
    argv = loader_args(mini_checkpoint, mini_world, path, answers)
    for bad, match in [
        ({**uninterrupted[0], "model_id": "other-model"}, "answers of model_id 'other-model'"),
        ({**uninterrupted[0], "prompt": "another prompt"}, "1 answers to questions this run does not ask"),
        ({**uninterrupted[0], "question_id": "not-a-question"}, "1 answers to questions this run does not ask"),
    ]:
        answers.write_text(json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            model_vqa_loader.main(argv, answer_batches=crash_after(0))
    # A chunk's file holds only that chunk's questions: answers of chunk 0 do not resume chunk 1.
    answers.write_text(json.dumps(uninterrupted[0]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="this run does not ask"):
        model_vqa_loader.main(argv + ["--num-chunks", "2", "--chunk-idx", "1"], answer_batches=crash_after(0))


def test_shared_question_ids_resume_by_prompt(mini_checkpoint, mini_world, tmp_path):
    """MME asks two questions per image under one question_id (the image path); a question asked twice needs
    two answer lines."""
    image = read_questions(mini_world / "test_questions.jsonl")[0]["image"]
    rows = [{"question_id": image, "image": image, "text": "Is there a circle?"},
            {"question_id": image, "image": image, "text": "Is there a square?"},
            {"question_id": "same", "text": "Say yes."}, {"question_id": "same", "text": "Say yes."}]  # fmt: skip
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    argv = loader_args(mini_checkpoint, mini_world, path, answers, "--batch-size", "1")
    with pytest.raises(Crash):
        model_vqa_loader.main(argv, answer_batches=crash_after(3))
    calls = []
    model_vqa_loader.main(argv, answer_batches=counting(calls))
    assert calls == [1]
    assert [(r["question_id"], r["prompt"]) for r in read_questions(answers)] == [
        (q["question_id"], q["text"]) for q in rows
    ]


def test_chunks_resume_independently(mini_checkpoint, mini_world, questions, uninterrupted, tmp_path):
    path, _ = questions
    merged = []
    for idx in range(2):
        answers = tmp_path / f"2_{idx}.jsonl"
        argv = loader_args(mini_checkpoint, mini_world, path, answers, "--num-chunks", "2", "--chunk-idx", str(idx))
        with pytest.raises(Crash):
            model_vqa_loader.main(argv, answer_batches=crash_after(1))
        model_vqa_loader.main(argv)
        merged += read_questions(answers)
    assert same_answers(merged) == same_answers(uninterrupted)


def test_mmbench_rounds_resume_by_question_and_round(mini_checkpoint, mini_world, tmp_path):
    image = base64.b64encode((mini_world / "images" / "test_000000.png").read_bytes()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    tsv = tmp_path / "mmbench.tsv"
    tsv.write_text(
        header + f"7\tWhat color?\tnan\tred\tblue\tgreen\tnan\tB\tcolor\t{image}\n"
        + f"9\tHow many?\tCount.\t1\t2\t\t\tA\tcount\t{image}\n",
        encoding="utf-8",
    )
    argv = [
        "--model-path", str(mini_checkpoint), "--question-file", str(tsv), "--all-rounds", "--single-pred-prompt",
        "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu", "--batch-size", "2",
    ]  # fmt: skip
    model_vqa_mmbench.main(argv + ["--answers-file", str(tmp_path / "full.jsonl")])
    answers = tmp_path / "resumed.jsonl"
    with pytest.raises(Crash):
        model_vqa_mmbench.main(argv + ["--answers-file", str(answers)], answer_batches=crash_after(1))
    assert [(r["question_id"], r["round_id"]) for r in read_questions(answers)] == [(7, 0), (7, 1)]
    calls = []
    model_vqa_mmbench.main(argv + ["--answers-file", str(answers)], answer_batches=counting(calls))
    assert calls == [3]
    resumed, full = read_questions(answers), read_questions(tmp_path / "full.jsonl")
    assert [(r["question_id"], r["round_id"]) for r in resumed] == [(7, 0), (7, 1), (7, 2), (9, 0), (9, 1)]
    strip = [{k: v for k, v in r.items() if k != "answer_id"} for r in resumed]
    assert strip == [{k: v for k, v in r.items() if k != "answer_id"} for r in full]


def test_science_resumes(mini_checkpoint, mini_world, tmp_path):
    records = [
        {"id": str(i), "image": "test_000000.png", "conversations": [{"from": "human", "value": f"<image>\nQ{i}?"}]}
        for i in range(3)
    ] + [{"id": "text", "conversations": [{"from": "human", "value": "Pick one.\nA. x\nB. y"}]}]
    question_file = tmp_path / "science.json"
    question_file.write_text(json.dumps(records), encoding="utf-8")
    answers = tmp_path / "answers.jsonl"
    argv = [
        "--model-path", str(mini_checkpoint), "--question-file", str(question_file), "--answers-file", str(answers),
        "--image-folder", str(mini_world / "images"), "--single-pred-prompt", "--temperature", "0",
        "--max_new_tokens", "3", "--device", "cpu", "--batch-size", "2",
    ]  # fmt: skip
    with pytest.raises(Crash):
        model_vqa_science.main(argv, answer_batches=crash_after(1))
    assert [r["question_id"] for r in read_questions(answers)] == ["0", "1"]
    calls = []
    model_vqa_science.main(argv, answer_batches=counting(calls))
    assert calls == [2]
    rows = read_questions(answers)
    assert [r["question_id"] for r in rows] == ["0", "1", "2", "text"]
    assert rows[0]["prompt"].startswith("<image>\nQ0?") and "image" not in records[3]
