"""Named recipes: each is its paper row's loss (checked against Table 16's terms), explicit flags override
them, the README lists them as the code defines them, and every recipe trains a step on the mini world."""

import json
import math
from pathlib import Path

import pytest
from test_distill import _args, _trainer, pair  # noqa: F401  (pair is a fixture)

from aligntI_patch.distill import write_recipe
from aligntI_patch.recipes import RECIPES, recipes_table

REPO = Path(__file__).resolve().parents[1]

# Table 16's rows as the terms they switch on (written from the paper, independently of recipes.py)
TABLE_16 = {"sft": {"sft"}, "sft_iva": {"sft", "iva"}, "kd": {"sft", "kd"}, "kd_iva": {"sft", "iva", "kd"},
            "kd_tpa": {"sft", "kd", "tpa"}, "tpa_iva": {"sft", "tpa", "iva"}, "aligntI": {"sft", "iva", "kd", "tpa"},
            # Tables 8-9 vary the IVA of the SFT + IVA row; Table 3 varies the KD term
            "uniform_iva": {"sft", "iva"}, "student_iva": {"sft", "iva"}, "rkl": {"sft", "kd"},
            "jsd": {"sft", "kd"}, "skew_kl": {"sft", "kd"}, "gkd": {"sft", "kd"}}


def _terms(args) -> set[str]:
    return {t for t in ("sft", "kd", "iva", "tpa") if getattr(args, f"w_{t}") > 0}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_its_paper_row(tmp_path, name):
    args = _args(tmp_path, "teacher-dir", recipe=name, iva_layer="auto")
    assert _terms(args) == TABLE_16[name]
    expected = {"rkl": "rkl", "jsd": "jsd", "skew_kl": "sfkl", "gkd": "jsd"}.get(name, "fkl")
    assert args.divergence == expected
    assert args.iva_weight_source == {"uniform_iva": "uniform", "student_iva": "student"}.get(name, "teacher")
    assert args.on_policy_prob == (0.5 if name == "gkd" else 0.0)
    assert args.needs_teacher == (name != "sft")


def test_explicit_flags_override_the_recipe(tmp_path):
    args = _args(tmp_path, "teacher-dir", recipe="kd", w_tpa=0.5, divergence="rkl")
    assert (args.w_kd, args.w_iva, args.w_tpa, args.divergence) == (1.0, 0.0, 0.5, "rkl")
    with pytest.raises(ValueError, match="--recipe must be one of .*aligntI"):
        _args(tmp_path, "teacher-dir", recipe="minillm")


def test_recipe_json_records_the_resolved_settings(tmp_path):
    args = _args(tmp_path, "teacher-dir", recipe="student_iva", w_sft=0.5)
    write_recipe(args)
    saved = json.loads((Path(args.output_dir) / "recipe.json").read_text())
    assert saved["recipe"] == "student_iva" and "Table 8" in saved["paper"]
    assert saved["settings"] == {"w_sft": 0.5, "w_kd": 0.0, "w_iva": 1.0, "w_tpa": 0.0, "divergence": "fkl",
                                 "iva_weight_source": "student", "on_policy_prob": 0.0}


def test_readme_lists_the_recipes_as_defined():
    assert recipes_table() in (REPO / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_trains_a_step(tmp_path, pair, tokenizer, mini_world, name):  # noqa: F811
    student_path, teacher_path = pair
    args = _args(tmp_path, teacher_path, recipe=name, on_policy_max_new_tokens=4)
    trainer = _trainer(args, student_path, tokenizer, mini_world)
    if name == "student_iva":
        trainer.iva_layer = 0  # the mini student has one layer (the teacher three: _trainer's layer 1)
    trainer.train()
    log = trainer.state.log_history[0]
    assert {k for k in log if k.startswith("loss_")} == {f"loss_{t}" for t in TABLE_16[name]}
    assert all(math.isfinite(log[f"loss_{t}"]) for t in TABLE_16[name])
