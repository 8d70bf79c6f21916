"""Document and scoring functions of the `tiny_world` lmms-eval tasks (rows written by `prepare.py`).

lmms-eval loads this file by path (`!function utils.NAME`), so it imports only absolute modules.
"""

from __future__ import annotations

from PIL import Image

from llava.tiny.score import score_answer

LETTERS = "ABCDE"


def doc_to_visual(doc: dict) -> list[Image.Image]:
    """The question's image, RGB (the jsonl holds absolute paths)."""
    with Image.open(doc["image_path"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict) -> str:
    """The question as the model was trained on it (suffix included, `<image>` added by the model)."""
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The reply's score (llava.tiny.score) under "overall" and under the question's family."""
    score = score_answer(doc["family"], results[0].strip(), doc)
    return {"overall": score, doc["family"]: score}


def closed_form_docs(dataset):
    """Only the questions with a closed answer set: existence (yes/no) and choice (option letters)."""
    return dataset.filter(lambda doc: doc["family"] in ("existence", "choice"))


def doc_to_choice(doc: dict) -> list[str]:
    if doc["family"] == "choice":
        return list(LETTERS[: len(doc["options"])])
    return ["yes", "no"]


def doc_to_target_index(doc: dict) -> int:
    return doc_to_choice(doc).index(doc["answer"].strip())
