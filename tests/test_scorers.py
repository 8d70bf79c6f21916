"""Benchmark scorers on hand-made fixtures (tests/fixtures/eval), with expected values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava.eval import eval_gqa, eval_mmbench, eval_mme, eval_pope, eval_science_qa, eval_textvqa
from llava.eval.eval_utils import load_json, parse_choice_letter, read_jsonl
from llava.eval.m4c_evaluator import normalize_vqa_answer, vqa_accuracy

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


# ---------------------------------------------------------------- shared parsing


@pytest.mark.parametrize(
    ("reply", "num_choices", "expected"),
    [
        ("A", 4, "A"),
        ("A.", 4, "A"),
        ("(B)", 4, "B"),
        ("C. rock", 4, "C"),
        ("The answer is D", 4, "D"),  # LLaVA's own regex needs a character after the letter
        ("The answer is B.", 4, "B"),
        ("answer: c", 4, None),  # lowercase letters are not option letters
        ("E", 4, None),  # past the last choice
        ("A cat", 4, None),  # the article "A", not an option
        ("", 4, None),
        ("The answer is A. No, the answer is B.", 4, None),  # two different letters
    ],
)
def test_parse_choice_letter(reply: str, num_choices: int, expected: str | None) -> None:
    """The lenient parser (ScienceQA --lenient only)."""
    assert parse_choice_letter(reply, num_choices) == expected


@pytest.mark.parametrize(
    ("reply", "num_choices", "expected"),
    [
        # LLaVA's eval_science_qa.py reads only "A", "A. ..." and one "The answer is X." match.
        ("A", 3, "A"),
        ("A. x", 3, "A"),
        ("The answer is A.", 3, "A"),
        ("The answer is Apples.", 3, "A"),  # "." is any character
        ("A.", 3, None),
        ("(A)", 3, None),
        ("A)", 3, None),
        ("A: x", 3, None),
        ("(A) x", 3, None),
        ("Answer: A", 3, None),
        ("the answer is A.", 3, None),  # case-sensitive
        ("The answer is A", 3, None),  # nothing after the letter
        ("The answer is A. The answer is A.", 3, None),  # two matches
        (" A", 3, None),  # no trimming
        ("E", 4, None),  # past the choices
        ("E", 5, "E"),
        ("The answer is F.", 5, None),
        ("E. The answer is A.", 4, None),  # "E. " is read first (A-E), then it is past the choices
        ("F. The answer is A.", 4, "A"),  # "F" is no option letter, so the pattern decides
    ],
)
def test_parse_science_qa_reply_is_llavas(reply: str, num_choices: int, expected: str | None) -> None:
    assert eval_science_qa.parse_science_qa_reply(reply, num_choices) == expected


# ---------------------------------------------------------------- GQA


def test_gqa_accuracy_on_fixture() -> None:
    questions = load_json(FIXTURES / "gqa_questions.json")
    predictions = eval_gqa.load_gqa_predictions(FIXTURES / "gqa_answers.jsonl")
    m = eval_gqa.gqa_accuracy(predictions, questions)
    # No isBalanced key: all 7 scored. LLaVA's conversion is rstrip(".").lower():
    # q1 "Yes." -> yes (right), q2 "Left" (right), q3 woman != man, q4 "" != no,
    # q5 " white. " kept as is (not stripped: wrong), q6 "the table" != table, q7 missing.
    assert m["accuracy"] == pytest.approx(2 / 7)
    assert (m["correct"], m["total"], m["missing"], m["unbalanced"]) == (2, 7, 1, 0)
    # verify: q1 right, q4 wrong -> 1/2; query: q2 right, q3, q5, q7 wrong -> 1/4; choose: q6 wrong -> 0/1
    assert m["by_type"] == pytest.approx({"choose": 0.0, "query": 0.25, "verify": 0.5})


def test_gqa_accepts_converted_predictions(tmp_path: Path) -> None:
    converted = eval_gqa.convert_gqa_for_eval(read_jsonl(FIXTURES / "gqa_answers.jsonl"))
    assert converted[0] == {"questionId": "q1", "prediction": "yes"}
    assert converted[4] == {"questionId": "q5", "prediction": " white. "}
    path = tmp_path / "testdev_balanced_predictions.json"
    path.write_text(json.dumps(converted))
    m = eval_gqa.main(["--question-file", str(FIXTURES / "gqa_questions.json"), "--result-file", str(path)])
    assert m["accuracy"] == pytest.approx(2 / 7)


def test_gqa_scores_balanced_questions_against_the_raw_gold(tmp_path: Path) -> None:
    questions = {
        "q1": {"answer": "yes", "isBalanced": True},
        "q2": {"answer": "no", "isBalanced": False},
        "q3": {"answer": "cat", "isBalanced": True},
    }
    answers = tmp_path / "merge.jsonl"
    replies = {"q1": "Yes.", "q2": "no", "q3": "Cat "}
    answers.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in replies.items()))
    m = eval_gqa.gqa_accuracy(eval_gqa.load_gqa_predictions(answers), questions)
    # GQA's eval.py scores q1 and q3 only; "Cat " -> "cat " != "cat" (LLaVA does not strip): 1/2
    assert m["accuracy"] == pytest.approx(0.5)
    assert (m["correct"], m["total"], m["unbalanced"]) == (1, 2, 1)


def test_gqa_rejects_unknown_question() -> None:
    with pytest.raises(ValueError, match="no question"):
        eval_gqa.gqa_accuracy({"zzz": "yes"}, {"q1": {"answer": "yes"}})


# ---------------------------------------------------------------- TextVQA


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Yes.", "yes"),
        ("The Coca Cola!", "coca cola"),  # "!" -> space, article dropped
        ("coca-cola", "coca cola"),  # "-" touching no space -> space
        ("two", "2"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont", "don't"),  # contraction restored
        ("McDonald's", "mcdonald 's"),  # the possessive is split off
        ("a / b", "b"),  # "/" touches a space -> deleted, then the article "a" is dropped
        # The official contraction table verbatim: no "couldntve" key, "somebody'd" -> "somebodyd".
        ("couldntve", "couldntve"),
        ("couldnt've", "couldn't've"),
        ("somebody'd", "somebodyd"),
        ("yallll", "yallll"),
        # The official sub() gets re.UNICODE (32) as its count: only 32 periods go.
        ("yes" + "." * 40, "yes" + "." * 8),
    ],
)
def test_normalize_vqa_answer(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # Leave-one-out over 10 annotators, m of whom gave the answer: the m subsets without one of
        # them score min(1, (m-1)/3), the 10-m others min(1, m/3); the answer's score is their mean.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    gt = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", gt) == pytest.approx(expected)


def test_textvqa_on_fixture() -> None:
    annotations = load_json(FIXTURES / "textvqa_val.json")["data"]
    m = eval_textvqa.score_textvqa(read_jsonl(FIXTURES / "textvqa_answers.jsonl"), annotations)
    # 101 "Nokia" (LLaVA-style id = image id, matched by its question): 10/10 -> 1.0
    # 102 "stop" (same image, other question): 2 of 10 -> 0.6
    # 103 "2." -> "2"; gt "two" x3 and "2" x1 all normalise to "2": 4 of 10 -> 1.0
    # 104 "The Coca Cola!" -> "coca cola" = "coca-cola" x3 -> 0.9
    # 105 "don't" = "dont" x1 -> 0.3
    # 106 "" -> 0.0;  107 no prediction -> 0.0 (missing)
    # mean = (1.0 + 0.6 + 1.0 + 0.9 + 0.3 + 0.0 + 0.0) / 7 = 3.8 / 7
    assert m["accuracy"] == pytest.approx(3.8 / 7)
    assert (m["total"], m["missing"]) == (7, 1)


def test_textvqa_repeated_question_scores_every_result_against_the_last_annotation() -> None:
    annotations = [
        {"question_id": 3, "image_id": "img3", "question": "what is it?", "answers": ["cat"] * 10},
        {"question_id": 4, "image_id": "img3", "question": "what is it?", "answers": ["dog"] * 10},
    ]
    prompt = "what is it?\nReference OCR token: a\nAnswer the question using a single word or phrase."
    results = [{"question_id": "img3", "prompt": prompt, "text": t} for t in ("cat", "dog")]
    m = eval_textvqa.score_textvqa(results, annotations)
    # LLaVA's dict keeps annotation 4 for (img3, "what is it?"): "cat" 0, "dog" 1 -> 0.5
    assert m == {"accuracy": pytest.approx(0.5), "total": 2, "missing": 0}


def test_textvqa_prompt_question() -> None:
    prompt = "What is it?\nReference OCR token: A, B\nAnswer the question using a single word or phrase."
    assert eval_textvqa.extract_textvqa_question(prompt) == "what is it?"
    assert (
        eval_textvqa.extract_textvqa_question("Reference OCR token: A\nWhat is it?\nAnswer.") == "what is it?"
    )
    assert eval_textvqa.extract_textvqa_question("OCR tokens: a b Question: What? Short answer:") == "what?"


# ---------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Yes.", "yes"),
        ("No, there is not.", "no"),
        ("There is no cat in the image.", "no"),
        ("Yes. No wait.", "yes"),  # only the first sentence counts
        ("not sure", "no"),
        ("", "yes"),  # LLaVA: anything without no/No/not is a yes
        ("Nope", "yes"),  # "Nope" is not the word "no"
    ],
)
def test_pope_yes_no(reply: str, expected: str) -> None:
    assert eval_pope.pope_yes_no(reply) == expected


def test_pope_on_fixture() -> None:
    questions = {str(q["question_id"]): q for q in read_jsonl(FIXTURES / "pope" / "llava_pope_test.jsonl")}
    labels = eval_pope.load_pope_labels(FIXTURES / "pope" / "coco")
    m = eval_pope.score_pope(read_jsonl(FIXTURES / "pope" / "answers.jsonl"), labels, questions)
    # random (ids 1..5 on both sides, results shuffled -> matched by id):
    #   1 yes/"Yes." TP, 2 yes/"No, there is not." FN, 3 no/"" FP, 4 no/"There is no cat" TN, 5 no/"no" TN
    #   acc 3/5, precision 1/(1+1), recall 1/(1+1), F1 0.5, yes-ratio 2/5
    r = m["random"]
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (1, 1, 2, 1)
    assert [r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]] == pytest.approx(
        [0.6, 0.5, 0.5, 0.5, 0.4]
    )
    # popular (ids 201..204 vs labels 1..4 -> by order): yes/"Yes" TP, yes/"yes, there is a dog." TP,
    #   no/"Yes. No wait." FP, yes/"not sure" FN -> acc 2/4, P 2/3, R 2/3, F1 2/3, yes-ratio 3/4
    p = m["popular"]
    assert [p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]] == pytest.approx(
        [0.5, 2 / 3, 2 / 3, 2 / 3, 0.75]
    )
    # adversarial: no/"No." TN, no/"no" TN, yes/"No" FN -> acc 2/3; TP+FP = 0 -> precision, F1 = 0
    a = m["adversarial"]
    assert [a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]] == pytest.approx(
        [2 / 3, 0.0, 0.0, 0.0, 0.0]
    )
    # mean F1 = (0.5 + 2/3 + 0) / 3 = 7/18; mean accuracy = (0.6 + 0.5 + 2/3) / 3
    assert m["mean"]["f1"] == pytest.approx(7 / 18)
    assert m["mean"]["accuracy"] == pytest.approx((0.6 + 0.5 + 2 / 3) / 3)


def test_pope_count_mismatch_is_an_error() -> None:
    labels = {"random": [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}]}
    results = [{"question_id": 9, "text": "yes", "category": "random"}]
    with pytest.raises(ValueError, match="1 results but 2 labels"):
        eval_pope.score_pope(results, labels)


# ---------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("Yes", "yes"), ("no.", "no"), ("YES, it is", "yes"), ("nope", "no"), ("Not sure", "no"),
     ("The answer is yes", "other"), ("", "other")],
)  # fmt: skip
def test_mme_yes_no(reply: str, expected: str) -> None:
    assert eval_mme.mme_yes_no(reply) == expected


def _check_mme_fixture(m: dict) -> None:
    # existence: e1 (Yes/"Yes", No/"No") both right; e2 (Yes/"yes, there is" right, No/"Yes" wrong);
    #   e3 (Yes/"The answer is yes" -> other, wrong; No/"no." right)
    #   acc 4/6, acc+ 1/3 -> (2/3 + 1/3) * 100 = 100
    ex = m["subtasks"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == pytest.approx((4 / 6, 1 / 3, 100.0))
    # count: c1 ("Yes.", "No") and c2 ("Yes", "nope" -> no) all right: 100 + 100 = 200
    assert m["subtasks"]["count"]["score"] == pytest.approx(200.0)
    # code_reasoning: k1 (Yes/"" -> other wrong, No/"no" right): acc 1/2, acc+ 0 -> 50
    assert m["subtasks"]["code_reasoning"]["score"] == pytest.approx(50.0)
    # perception = existence + count = 300; cognition = code_reasoning = 50; 300 / 2000 * 100 = 15
    assert (m["perception"], m["cognition"], m["perception_pct"]) == pytest.approx((300.0, 50.0, 15.0))


def test_mme_results_dir_and_jsonl_agree() -> None:
    _check_mme_fixture(eval_mme.score_mme(eval_mme.load_mme_results_dir(FIXTURES / "mme" / "results")))
    _check_mme_fixture(eval_mme.score_mme(eval_mme.load_mme_answers(FIXTURES / "mme" / "answers.jsonl")))


def test_mme_llava_answers_with_release_ground_truth() -> None:
    m = eval_mme.main([
        "--answers-file", str(FIXTURES / "mme" / "llava_answers.jsonl"),
        "--mme-root", str(FIXTURES / "mme" / "release"),
    ])  # fmt: skip
    # existence e1: both right (its second gt line has LLaVA's double space) -> 100 + 100 = 200
    # artwork w1 (gt under questions_answers_YN/): Yes right, "Yes" for No wrong -> 50 + 0 = 50
    assert m["subtasks"]["existence"]["score"] == pytest.approx(200.0)
    assert m["subtasks"]["artwork"]["score"] == pytest.approx(50.0)
    assert (m["perception"], m["cognition"]) == pytest.approx((250.0, 0.0))


# ---------------------------------------------------------------- ScienceQA


def test_science_qa_on_fixture(tmp_path: Path) -> None:
    base = FIXTURES / "scienceqa"
    out = tmp_path / "graded.json"
    args = ["--base-dir", str(base), "--result-file", str(base / "answers.jsonl"), "--output-file", str(out)]
    m = eval_science_qa.main(args)
    # test split = 1,2,3,4,5,6,7,9 (8 is val, its reply is ignored). LLaVA's rule:
    # right: 1 "A", 3 "The answer is B."; wrong: 2 "C.", 4 "The answer is D" (no character after the
    # letter), 5 "C" (only 2 choices), 6 "", 7 no reply (missing), 9 "(A) cat" -> 2/8.
    # IMG subset (prompt has "<image>", as model_vqa_science writes it): 1, 2, 4, 5, 9 (7 has no reply) -> 1/5
    assert (m["correct"], m["total"], m["missing"], m["img_total"]) == (2, 8, 1, 5)
    assert m["img_accuracy"] == pytest.approx(1 / 5)
    assert m["accuracy"] == pytest.approx(2 / 8)
    graded = {g["question_id"]: g for g in json.loads(out.read_text())}
    assert graded["5"]["pred"] is None and graded["9"]["pred"] is None
    # --lenient also reads 2 "C.", 4 "The answer is D" and 9 "(A) cat" -> 5/8
    lenient = eval_science_qa.main([*args, "--lenient"])
    assert (lenient["correct"], lenient["lenient"]) == (5, True)
    assert json.loads(out.read_text())[-1]["pred"] == "A"


def test_science_qa_img_subset_is_decided_by_the_prompt(tmp_path: Path) -> None:
    problems = {
        "p1": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
        "p2": {"choices": ["x", "y"], "answer": 0, "image": "image.png"},
        "p3": {"choices": ["x", "y"], "answer": 1, "image": None},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["p1", "p2", "p3"]}))
    answers = [
        {"question_id": "p1", "prompt": "<image>\nQ", "text": "A"},
        {"question_id": "p3", "prompt": "Q", "text": "B"},
    ]  # p2 has no reply
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    m = eval_science_qa.main(["--base-dir", str(tmp_path), "--result-file", str(tmp_path / "answers.jsonl")])
    # overall 2/3 (p2 wrong); IMG: p2 gets LLaVA's prompt "Unknown" and drops out -> p1 only, 1/1
    assert (m["correct"], m["total"], m["missing"]) == (2, 3, 1)
    assert (m["img_correct"], m["img_total"], m["img_accuracy"]) == (1, 1, 1.0)


# ---------------------------------------------------------------- MMBench


def test_mmbench_circular_on_tsv() -> None:
    tsv = eval_mmbench.load_mmbench_tsv(FIXTURES / "mmbench_dev.tsv")
    assert tsv[1]["options"] == ["cat", "dog"]  # "nan" options are absent
    records = eval_mmbench.mmbench_records(read_jsonl(FIXTURES / "mmbench_answers.jsonl"), tsv)
    # groups (index % 1e6): 1 "A", "B." both right; 2 right, right, wrong ("B" for C); 3 "The answer is A"
    # unmatched ("A" among more than 3 words may be the article, and no option text occurs), "" unmatched;
    # 4 "dog" names option B by its text (right), "(A)" right; 5 single row, "A" for C wrong.
    m = eval_mmbench.score_mmbench(records, circular=True)
    # circular: groups 1, 4 right -> 2/5; ocr: 1 right, 2 wrong -> 1/2; counting: 4 right of 3, 4, 5 -> 1/3
    assert (m["correct"], m["total"], m["variants"]) == (2, 5, 10)
    assert m["accuracy"] == pytest.approx(0.4)
    assert m["by_category"] == pytest.approx({"counting": 1 / 3, "ocr": 0.5})
    # first variant only: 1, 2, 4 right, 3, 5 wrong -> 3/5; ocr 2/2, counting 1/3
    v = eval_mmbench.score_mmbench(records, circular=False)
    assert v["accuracy"] == pytest.approx(0.6)
    assert v["by_category"] == pytest.approx({"counting": 1 / 3, "ocr": 1.0})
    assert m["unmatched"] == 2


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("I choose B", "B"),
        ("Option B", "B"),
        ("B is correct", "B"),
        ("B, blue bus", "B"),  # "B," is one of can_infer_option's forms
        ("a blue bus", "B"),  # can_infer_text: only "blue bus" occurs in the reply
        ("The blue bus.", "B"),
        ("A dog is shown", "D"),  # "A" among more than 3 words is taken for the article
        ("(C)", "C"),
        ("E", "E"),  # letters run to E whatever the options; scored wrong
        ("The answer is A", None),  # same article rule, and no option text: GPT would be asked
        ("B or C", None),  # two letters
        ("a cat or a dog", None),  # two option texts
    ],
)
def test_mmbench_matching_is_mmbenchs(reply: str, expected: str | None) -> None:
    options = {"A": "red car", "B": "blue bus", "C": "cat", "D": "dog"}
    assert eval_mmbench.infer_mmbench_letter(reply, options) == expected


def test_mmbench_infers_letters_like_mmbench(tmp_path: Path) -> None:
    tsv = tmp_path / "dev.tsv"
    tsv.write_text(
        "index\tquestion\tA\tB\tC\tD\tanswer\tcategory\n"
        "1\tq?\tred car\tblue bus\tcat\tdog\tB\tc1\n"
        "1000001\tq?\tblue bus\tcat\tdog\tred car\tA\tc1\n"
    )
    results = [{"question_id": 1, "text": "I choose B"}, {"question_id": 1000001, "text": "a blue bus"}]
    m = eval_mmbench.score_mmbench(eval_mmbench.mmbench_records(results, eval_mmbench.load_mmbench_tsv(tsv)))
    # "I choose B" -> B (right); "a blue bus" -> the rotated option A "blue bus" (right) -> 1/1
    assert (m["correct"], m["total"]) == (1, 1)
    assert m["unmatched"] == 0


def test_mmbench_llava_all_rounds() -> None:
    m = eval_mmbench.main(["--result-file", str(FIXTURES / "mmbench_all_rounds.jsonl")])
    # q7 options red/blue/green, answer B (blue). Round 0 shows A red, B blue, C green: "B" -> blue, right.
    # Round 1 shows blue, green, red (option_char B, C, A): "A" -> B, right.
    # Round 2 shows green, red, blue (C, A, B): "B" -> original A (red), wrong -> q7 wrong.
    # q8 yes/no, answer A: round 0 "A" right; round 1 shows no, yes (B, A): "B" -> A, right -> q8 right.
    assert (m["correct"], m["total"], m["variants"]) == (1, 2, 5)
    v = eval_mmbench.score_mmbench(
        eval_mmbench.mmbench_records(read_jsonl(FIXTURES / "mmbench_all_rounds.jsonl")), circular=False
    )
    assert v["accuracy"] == pytest.approx(1.0)  # round 0 of both is right
