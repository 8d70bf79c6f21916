"""Exposure-bias analysis (Appendix B.4): accumulated errors (Eq. 9-13), %ExAccErr (Eq. 11) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from aligntI_patch.exposure_bias import (
    accumulate,
    accumulated_errors,
    excess_accumulated_error,
    load_questions,
    main,
    reference_prefixes,
    sample_prefixes,
    step_divergences,
)
from llava.generation import QuestionDataset
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import mini_llava, save_mini_checkpoint


@pytest.fixture(scope="module")
def pair(tokenizer):
    """(teacher, student, image processor): different weights, depths and lm_head rows (512 vs 448)."""
    teacher = mini_llava(tokenizer, role="teacher", seed=1, num_layers=2, hidden=64)
    student = mini_llava(tokenizer, seed=2, num_layers=1, hidden=32)
    return teacher, student, load_image_processor(student.get_vision_tower().config)


@pytest.fixture(scope="module")
def questions(mini_world):
    return load_questions(mini_world / "val_questions.jsonl", num_prompts=5)


def test_same_model_gives_zero(tokenizer, mini_world, pair, questions):
    teacher, _, proc = pair
    for source in ("student", "teacher", "data"):
        errors = accumulated_errors(teacher, teacher, tokenizer, proc, questions, mini_world / "images",
                                    max_len=6, batch_size=3, prefix_source=source)
        assert errors.shape == (6,) and torch.equal(errors, torch.zeros(6))
    assert torch.equal(excess_accumulated_error(torch.zeros(6), torch.zeros(6)), torch.zeros(6))


def test_excess_accumulated_error_on_hand_numbers():
    """Eq. 11 on numbers worked out by hand: (3-2)/2 = +50 %, (6-4)/4 = +50 %, (2-4)/4 = -50 %, E = 0 -> 0."""
    R, E = torch.tensor([3.0, 6.0, 2.0, 0.5]), torch.tensor([2.0, 4.0, 4.0, 0.0])
    assert torch.equal(excess_accumulated_error(R, E), torch.tensor([50.0, 50.0, -50.0, 0.0]))


def kl_reference(logits_t: torch.Tensor, logits_s: torch.Tensor) -> torch.Tensor:
    """KL(P_T || P_S) of one next-token distribution, written out from log-softmax."""
    log_t, log_s = logits_t.double().log_softmax(-1), logits_s.double().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum()


def reference_accumulated_error(teacher, student, tokenizer, proc, questions, image_folder, prefixes,
                                max_len):  # fmt: skip
    """Eq. 9/10/12/13 as loops: step t of prompt i is one plain forward of teacher and student on prompt +
    y_<t; E(l) sums over t <= l the mean over the prompts whose prefix reaches step t (none: adds 0)."""
    per_step = [[] for _ in range(max_len)]  # step t -> KL of the prompts alive at t
    for q, prefix in zip(questions, prefixes):
        prompt, pixels = QuestionDataset([q], image_folder, tokenizer, proc, "qwen_2")[0]
        images = None if pixels is None else pixels[None]
        for t in range(min(len(prefix), max_len)):
            ids = torch.cat([prompt, prefix[:t]])[None]
            with torch.no_grad():
                logits_t = teacher(input_ids=ids, images=images).logits[0, -1, : len(tokenizer)]
                logits_s = student(input_ids=ids, images=images).logits[0, -1, : len(tokenizer)]
            per_step[t].append(kl_reference(logits_t, logits_s))
    total, out = 0.0, []
    for kls in per_step:
        if kls:
            total += sum(kls) / len(kls)
        out.append(float(total))
    return torch.tensor(out, dtype=torch.float64)


# answers of 13, 4, 5 and 4 tokens (turn end included): prompts drop out at different steps
ANSWERED = [
    {"text": "What is in the image?", "image": "val_000000.png",
     "answer": "A red circle on the left of a blue square."},
    {"text": "What color is the sky?", "answer": "Blue."},
    {"text": "How many shapes are there?", "image": "val_000001.png", "answer": "Two."},
    {"text": "Describe the image.", "image": "val_000002.png", "answer": "Blue."},
]


def test_train_time_error_equals_step_by_step_reference(tokenizer, mini_world, pair):
    """E_train (Eq. 9) on ground-truth prefixes of different lengths, image and text-only prompts, batches of
    three, and a last step no prompt reaches, against `reference_accumulated_error`."""
    teacher, student, proc = pair
    prefixes = reference_prefixes(ANSWERED, tokenizer, "qwen_2", max_len=100)
    assert [len(p) for p in prefixes] == [13, 4, 5, 4]
    errors = accumulated_errors(teacher, student, tokenizer, proc, ANSWERED, mini_world / "images",
                                max_len=14, batch_size=3, prefix_source="data")
    expected = reference_accumulated_error(teacher, student, tokenizer, proc, ANSWERED, mini_world / "images",
                                           prefixes, max_len=14)
    torch.testing.assert_close(errors.double(), expected, rtol=1e-4, atol=1e-6)
    assert expected[-1] == expected[-2]  # step 14: no prompt left


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_sampled_prefix_errors_equal_step_by_step_reference(tokenizer, mini_world, pair, source):
    """R (Eq. 12, student prefixes) and E (Eq. 13, teacher prefixes) against `reference_accumulated_error`
    on the prefixes the named model samples (same seed and batch size); the other model's prefixes differ."""
    teacher, student, proc = pair
    kwargs = dict(max_len=5, batch_size=3, seed=0)
    errors = accumulated_errors(teacher, student, tokenizer, proc, ANSWERED, mini_world / "images",
                                prefix_source=source, **kwargs)
    sampler, other = (student, teacher) if source == "student" else (teacher, student)
    prefixes = sample_prefixes(sampler, tokenizer, proc, ANSWERED, mini_world / "images", "qwen_2", **kwargs)
    others = sample_prefixes(other, tokenizer, proc, ANSWERED, mini_world / "images", "qwen_2", **kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(prefixes, others))
    expected = reference_accumulated_error(teacher, student, tokenizer, proc, ANSWERED, mini_world / "images",
                                           prefixes, max_len=5)
    torch.testing.assert_close(errors.double(), expected, rtol=1e-4, atol=1e-6)


def test_accumulate_averages_over_alive_prompts():
    kl = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]])
    alive = torch.tensor([[True, True, False], [True, False, False]])
    # step 1: mean(1, 3) = 2; step 2: only prompt 0 alive -> 2; step 3: none alive -> adds 0
    assert torch.equal(accumulate(kl, alive), torch.tensor([2.0, 4.0, 4.0]))


def test_one_forward_equals_step_by_step_loop(tokenizer, mini_world, pair):
    """Batched prompt + prefix forwards (image and text-only rows, different lengths) equal one plain forward
    of prompt + prefix[:t] per step."""
    teacher, student, proc = pair
    qs = [{"text": "Describe the image in detail.", "image": "val_000000.png"},
          {"text": "What is the color of the sky on a clear day?"}]
    g = torch.Generator().manual_seed(0)
    prefixes = [torch.randint(3, len(tokenizer), (n,), generator=g) for n in (5, 3)]
    kl, alive = step_divergences(teacher, student, tokenizer, proc, qs, mini_world / "images", "qwen_2",
                                 prefixes, batch_size=2, max_len=6)
    assert alive.tolist() == [[True] * 5 + [False], [True] * 3 + [False] * 3]
    assert bool((kl[~alive] == 0).all())
    for i, (q, prefix) in enumerate(zip(qs, prefixes)):
        prompt, pixels = QuestionDataset([q], mini_world / "images", tokenizer, proc, "qwen_2")[0]
        images = None if pixels is None else pixels[None]
        for t in range(len(prefix)):
            ids = torch.cat([prompt, prefix[:t]])[None]
            with torch.no_grad():
                logits_t = teacher(input_ids=ids, images=images).logits[0, -1, : len(tokenizer)]
                logits_s = student(input_ids=ids, images=images).logits[0, -1, : len(tokenizer)]
            expected = kl_reference(logits_t, logits_s)
            torch.testing.assert_close(kl[i, t].double(), expected, rtol=1e-4, atol=1e-6)


def test_sample_prefixes_cut_after_stop_token(tokenizer, mini_world, questions):
    model = mini_llava(tokenizer, seed=3)
    proc = load_image_processor(model.get_vision_tower().config)
    stops = list(range(len(tokenizer) // 2))  # half the vocabulary stops: most prefixes end early
    model.generation_config.eos_token_id = stops
    prefixes = sample_prefixes(model, tokenizer, proc, questions, mini_world / "images", "qwen_2", 8,
                               batch_size=5)
    assert len(prefixes) == len(questions)
    for p in prefixes:
        assert 1 <= len(p) <= 8 and bool((p < len(tokenizer)).all())  # padded lm_head rows are never sampled
        inside = torch.isin(p[:-1], torch.tensor(stops))
        assert not bool(inside.any())  # no stop token before the end
        assert len(p) == 8 or int(p[-1]) in stops
    assert any(len(p) < 8 for p in prefixes)


def test_sample_prefixes_of_text_only_questions(tokenizer, mini_world):
    """Generation returns new tokens only, with or without an image: no prefix is lost or holds the prompt."""
    model = mini_llava(tokenizer, seed=3)
    proc = load_image_processor(model.get_vision_tower().config)
    text_only = [{"question_id": i, "text": t} for i, t in enumerate(["Say hi.", "What color is a red circle?"])]
    prefixes = sample_prefixes(model, tokenizer, proc, text_only, mini_world / "images", "qwen_2", 6, batch_size=2)
    assert len(prefixes) == 2 and all(1 <= len(p) <= 6 for p in prefixes)


def test_reference_prefixes_are_the_training_response(tokenizer, questions):
    prefixes = reference_prefixes(questions, tokenizer, "qwen_2", max_len=100)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for q, p in zip(questions, prefixes):
        assert int(p[-1]) == end and tokenizer.decode(p[:-1]) == q["answer"]
    with pytest.raises(ValueError, match="no answer"):
        reference_prefixes([{"text": "hi"}], tokenizer, "qwen_2", max_len=4)


def test_cli_end_to_end(tmp_path, tokenizer, mini_world, pair, capsys):
    teacher, student, _ = pair
    t_dir = save_mini_checkpoint(teacher, tokenizer, tmp_path / "teacher")
    s_dir = save_mini_checkpoint(student, tokenizer, tmp_path / "student")
    out = tmp_path / "out"
    main(["--teacher-path", str(t_dir), "--student-path", str(s_dir), "--student-path", str(t_dir),
          "--name", "kd", "--name", "self", "--question-file", str(mini_world / "val.json"),
          "--image-folder", str(mini_world / "images"), "--max-len", "5", "--num-prompts", "4",
          "--batch-size", "2", "--output-dir", str(out), "--device", "cpu"])
    result = json.loads((out / "exposure_bias.json").read_text())
    assert result["num_prompts"] == 4 and set(result["students"]) == {"kd", "self"}
    kd, self_ = result["students"]["kd"], result["students"]["self"]
    for key in ("R", "E", "ExAccErr", "E_train", "alive_R", "alive_E"):
        assert len(kd[key]) == 5
    assert all(v > 0 for v in kd["R"] + kd["E"] + kd["E_train"])
    assert self_["R"] == self_["E"] == self_["ExAccErr"] == [0.0] * 5
    assert (out / "exposure_bias.png").stat().st_size > 0
    assert "%ExAccErr at l=5" in capsys.readouterr().out


def test_cli_rejects_different_tokenizers(tmp_path, tokenizer, mini_world, mini_checkpoint):
    other = tmp_path / "other"
    odd = AutoTokenizer.from_pretrained(mini_checkpoint)
    odd.add_tokens(["<odd_token>"])
    odd.save_pretrained(other)
    with pytest.raises(ValueError, match=f"{mini_checkpoint}.*{other}.*different tokenizers"):
        main(["--teacher-path", str(mini_checkpoint), "--student-path", str(other),
              "--question-file", str(mini_world / "val_questions.jsonl"), "--output-dir", str(tmp_path)])
