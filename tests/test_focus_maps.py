"""Focus maps (Fig. 8): alpha equals eager attention (Eq. 3), agreement measures, the grid and the CLI's errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from test_iva_irs import eager_alpha
from transformers import SiglipVisionConfig

from aligntI_patch.focus_maps import (
    DPI,
    PANEL_INCHES,
    agreement,
    average_ranks,
    cosine_similarity,
    focus_grid,
    main,
    spearman_correlation,
)
from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template, tokenize_conversation
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava.tiny.fixtures import MINI_VISION, mini_llava, save_mini_checkpoint

NUM_IMAGES = 3


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """name -> checkpoint: the reference, a copy of it, another model (its irs.json picks layer 0) and one
    whose tower makes N_v = 4 instead of 16. Weights drawn at std 0.3, not 0.02: peaked attention, so alphas
    (and layers) differ by far more than the tolerance of the eager comparison."""
    root = tmp_path_factory.mktemp("focus_maps")
    teacher = save_mini_checkpoint(mini_llava(tokenizer, seed=5, initializer_range=0.3), tokenizer, root / "teacher")
    same = shutil.copytree(teacher, root / "same")
    other = save_mini_checkpoint(mini_llava(tokenizer, seed=3, initializer_range=0.3), tokenizer, root / "other")
    (other / "irs.json").write_text(json.dumps({"layers": [0, 1], "best_layer": 0}))
    vision = SiglipVisionConfig(**{**MINI_VISION, "image_size": 16})  # 2 x 2 patches of 8 px
    small = save_mini_checkpoint(mini_llava(tokenizer, seed=4, mm_vision_config=vision.to_dict()), tokenizer,
                                 root / "small")
    return {"teacher": teacher, "same": same, "other": other, "small": small}


@pytest.fixture(scope="module")
def run(checkpoints, mini_world, tmp_path_factory):
    """One CLI run over all four models: (focus_maps.json as a dict, output dir)."""
    out = tmp_path_factory.mktemp("fig8")
    main([*(f"--model={name}={path}" for name, path in checkpoints.items()),
          "--question-file", str(mini_world / "test_questions.jsonl"), "--image-folder", str(mini_world / "images"),
          "--num-images", str(NUM_IMAGES), "--device", "cpu", "--output-dir", str(out)])
    return json.loads((out / "focus_maps.json").read_text()), out


def test_alpha_equals_eager_attention_at_each_models_layer(run, checkpoints, mini_world):
    """alpha in the JSON = eager `output_attentions` rows of the instruction tokens to the visual tokens at the
    model's layer, mean over heads and instruction tokens (Eq. 3); 'auto' read irs.json where there is one."""
    result, _ = run
    assert [result["models"][n]["layer"] for n in ("teacher", "other")] == [1, 0]  # 3/4 of 2 layers; irs.json
    for name in ("teacher", "other"):
        tokenizer, model, processor, _ = load_pretrained_model(str(checkpoints[name]), device="cpu")
        entry = result["models"][name]
        for question, row in zip(result["questions"], entry["questions"]):
            conv = get_conv_template(entry["conv_mode"])
            conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question['text']}")
            conv.append_message(conv.roles[1], None)
            input_ids, _, types = tokenize_conversation(conv, tokenizer)
            image = Image.open(mini_world / "images" / question["image"]).convert("RGB")
            batch = {"input_ids": input_ids[None], "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
                     "token_types": types[None], "images": process_images([image], processor, "pad")}
            expected = eager_alpha(model, batch, row["layer"])[0]  # (N_v,)
            torch.testing.assert_close(torch.tensor(row["alpha"]), expected, rtol=0, atol=1e-5)
            other_layer = eager_alpha(model, batch, 1 - row["layer"])[0]  # the comparison tells layers apart
            assert (other_layer - expected).abs().max() > 1e-3


def test_agreement_with_the_reference(run):
    result, _ = run
    models = result["models"]
    assert result["reference"] == "teacher" and len(result["questions"]) == NUM_IMAGES
    assert all(q["image"] for q in result["questions"])
    for name in ("teacher", "same"):  # the reference against itself, and a copy of it at the same layer
        assert models[name]["mean_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert models[name]["mean_spearman"] == pytest.approx(1.0, abs=1e-12)
    assert models["other"]["mean_cosine"] < 1.0 and models["other"]["mean_spearman"] < 1.0
    assert [len(row["alpha"]) for row in models["other"]["questions"]] == [16] * NUM_IMAGES
    small = models["small"]
    assert small["num_visual_tokens"] == 4 and small["mean_cosine"] is None and small["mean_spearman"] is None
    assert all(row["cosine"] is None and "N_v differs" in row["reason"] for row in small["questions"])


def test_png_has_one_row_per_image_and_one_column_per_model(run):
    _, out = run
    cols = 1 + 4  # the image, then four models
    expected = (round(PANEL_INCHES * DPI * cols), round(PANEL_INCHES * DPI * NUM_IMAGES))
    assert Image.open(out / "focus_maps.png").size == expected


def test_grid_axes():
    image = Image.new("RGB", (8, 8))
    fig = focus_grid([image] * 2, [("a", [image] * 2), ("b", [image] * 2), ("c", [image] * 2)], ["q1", "q2"])
    assert len(fig.axes) == 2 * (1 + 3)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "a", "b", "c"]


def test_spearman_and_cosine_on_hand_numbers():
    """No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)) with ranks (1, 4, 2, 3), (2, 1, 4, 3): 1 - 6 * 14 / 60 = -0.4.
    Ties share their average rank: (1, 2.5, 2.5, 4) vs (1, 2, 3, 4) -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)."""
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    a, b = torch.tensor([0.1, 0.4, 0.2, 0.3]), torch.tensor([0.2, 0.1, 0.4, 0.3])
    assert spearman_correlation(a, b) == pytest.approx(-0.4, abs=1e-12)
    assert spearman_correlation(torch.tensor([1.0, 2, 2, 3]), torch.arange(4.0)) == pytest.approx(3 / math.sqrt(10))
    assert spearman_correlation(a, a.exp()) == pytest.approx(1.0)  # ranks only: any increasing map gives 1
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    flat = agreement(torch.zeros(4), a)  # no direction, no ranking: null with a reason, never NaN
    assert flat["cosine"] is None and flat["spearman"] is None and "constant" in flat["reason"]


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_name_the_argument(capsys, mini_checkpoint, mini_world, tmp_path):
    common = ["--question-file", str(mini_world / "test_questions.jsonl"), "--output-dir", str(tmp_path / "out")]
    err = _fails(capsys, ["--model", str(mini_checkpoint), *common])
    assert "--model" in err and "NAME=PATH" in err
    err = _fails(capsys, ["--model", f"teacher={mini_checkpoint}", "--model", f"student={tmp_path}/nope", *common])
    assert "--model student" in err and "does not exist" in err
    err = _fails(capsys, ["--model", f"a={mini_checkpoint}", "--model", f"a={mini_checkpoint}", *common])
    assert "distinct" in err
    err = _fails(capsys, ["--model", f"a={mini_checkpoint}", "--layer", "0", "--layer", "1", *common])
    assert "--layer" in err
    text_only = tmp_path / "text.jsonl"
    text_only.write_text(json.dumps({"question_id": 0, "text": "What is two plus two?"}) + "\n")
    err = _fails(capsys, ["--model", f"a={mini_checkpoint}", "--question-file", str(text_only),
                          "--output-dir", str(tmp_path / "out")])
    assert "no question with an image" in err
    assert not (tmp_path / "out").exists()
