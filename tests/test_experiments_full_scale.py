"""The runner at full scale: cells through scripts/v1_5/distill_aligntI.sh (`--launcher script`) and scoring by
lmms-eval tasks (`--tasks`, aligntI_patch/experiments/lmms_scorer.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligntI_patch.experiments.__main__ import main
from aligntI_patch.experiments.cell import DistillBackend
from aligntI_patch.experiments.context import Setup
from aligntI_patch.experiments.grids import build_grid, expand
from aligntI_patch.experiments.lmms_scorer import TaskSpec, parse_tasks, read_results

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ task specs
def test_task_items_parse_and_bad_ones_are_named(tmp_path, capsys):
    assert TaskSpec.parse("gqa") == TaskSpec("gqa", None, "none", 100.0)
    assert TaskSpec.parse("mme:mme_perception_score*0.05") == TaskSpec("mme", "mme_perception_score", "none", 0.05)
    spec = TaskSpec.parse("gsm:exact_match:flexible-extract*1")
    assert (spec.metric, spec.filter, spec.scale, spec.column) == ("exact_match", "flexible-extract", 1.0,
                                                                  "gsm:exact_match:flexible-extract")
    assert parse_tasks(" gqa, pope:pope_accuracy ,") == ("gqa", "pope:pope_accuracy")
    for bad in ("a:b:c:d", "mme*x", "mme*0", "mme*-1", "a b"):
        with pytest.raises(ValueError, match="expected TASK"):
            TaskSpec.parse(bad)
    with pytest.raises(SystemExit):
        main(["run", "--grid", "divergences", "--out", str(tmp_path), "--tasks", "gqa,mme*big", "--dry-run"])
    assert "bad task 'mme*big'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the budget grid chooses on val, never on the test tasks
        main(["run", "--grid", "budget", "--out", str(tmp_path), "--tasks", "gqa", "--dry-run"])
    assert "give --val-tasks" in capsys.readouterr().err


def _lmms_output(folder: Path, results: dict, n: dict, samples: dict[str, list[dict]]) -> Path:
    """An --output_path as lmms-eval 0.7 writes it: <model>/<date>_results.json and _samples_<task>.jsonl."""
    run = folder / "ckpt__student"
    run.mkdir(parents=True)
    (run / "20261207_results.json").write_text(json.dumps(
        {"results": results, "n-samples": {t: {"original": k, "effective": k} for t, k in n.items()}}))
    for task, rows in samples.items():
        (run / f"20261207_samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_lmms_results_are_read_as_percentages(tmp_path):
    out = _lmms_output(
        tmp_path / "a",
        results={"pope": {"alias": "pope", "pope_accuracy,none": 0.75, "pope_accuracy_stderr,none": 0.1,
                          "pope_f1_score,none": 0.5},
                 "mme": {"alias": "mme", "mme_perception_score,none": 1400.0}},
        n={"pope": 4, "mme": 2},
        samples={"pope": [{"doc_id": i, "pope_accuracy": s, "pope_f1_score": {"x": 1}} for i, s in
                          enumerate([1.0, 1.0, 0.0, 1.0])],
                 "mme": [{"doc_id": 0, "mme_perception_score": {"question_id": "a", "score": 1}}]})
    specs = [TaskSpec.parse("pope"), TaskSpec.parse("mme:mme_perception_score*0.05")]
    summary, per_question = read_results(out, specs)
    # pope: its first metric (not its stderr), a fraction -> x100; mme: 1400 x 0.05 = 70 %
    assert summary["pope"] == {"accuracy": 0.75, "n": 4}
    assert summary["mme:mme_perception_score"] == {"accuracy": pytest.approx(0.70), "n": 2}
    assert summary["overall"] == {"accuracy": pytest.approx((0.75 + 0.70) / 2), "n": 6}
    # per question: pope's numbers; mme's structured samples give none
    assert per_question == {"pope/0": 1.0, "pope/1": 1.0, "pope/2": 0.0, "pope/3": 1.0}
    with pytest.raises(ValueError, match="no metric 'pope_f1,none'.*pope_accuracy,none"):
        read_results(out, [TaskSpec.parse("pope:pope_f1")])
    with pytest.raises(ValueError, match="no task 'gqa'"):
        read_results(out, [TaskSpec.parse("gqa")])
    with pytest.raises(FileNotFoundError, match="no \\*_results.json"):
        read_results(tmp_path / "empty", specs)
    # a family metric: only the samples that carry it count (as in lmms-eval's aggregate)
    out = _lmms_output(tmp_path / "b", results={"tiny_world": {"overall,none": 0.5, "describe,none": 0.25}},
                       n={"tiny_world": 3},
                       samples={"tiny_world": [{"doc_id": 0, "overall": 1, "counting": 1},
                                               {"doc_id": 1, "overall": 0.25, "describe": 0.25},
                                               {"doc_id": 2, "overall": 0.25, "describe": 0.25}]})
    summary, per_question = read_results(out, [TaskSpec.parse("tiny_world:describe*50")])
    assert summary["tiny_world:describe"] == {"accuracy": 0.125, "n": 2}
    assert per_question == {"tiny_world:describe/1": 0.125, "tiny_world:describe/2": 0.125}


def test_lmms_scoring_runs_the_splits_asked_for(tmp_path, monkeypatch):
    """One lmms-eval run per split asked for, with that split's tasks; a split without tasks is left out."""
    import aligntI_patch.experiments.cell as cell_module

    calls = []

    def fake(checkpoint, tasks, output_path, num_gpus, batch_size, include_path, extra):
        calls.append((output_path.name, tasks))
        return {"overall": {"accuracy": 0.5, "n": 2}}, {}

    monkeypatch.setattr(cell_module, "score_with_lmms_eval", fake)
    backend = DistillBackend(_script_setup(tmp_path, val_tasks=("gqa_val",)))
    assert set(backend.evaluate(tmp_path / "ckpt", tmp_path, splits=("val",))) == {"val"}
    assert set(backend.evaluate_teacher()) == {"test", "val"}
    assert calls == [("lmms_val", ("gqa_val",)), ("lmms_test", ("gqa",)), ("lmms_val", ("gqa_val",))]
    assert set(DistillBackend(_script_setup(tmp_path)).evaluate(tmp_path / "ckpt", tmp_path)) == {"test"}


# ------------------------------------------------------------------------------------------ script launcher
STUB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
"""


def _script_setup(tmp_path: Path, **changes) -> Setup:
    fields = dict(teacher=tmp_path / "teacher", pretrain=tmp_path / "pre", world=tmp_path / "unused",
                  vision_tower=tmp_path / "siglip", version="qwen_3", launcher="script", model="Qwen/Qwen3-0.6B",
                  data=tmp_path / "mix.json", image_folder=tmp_path / "images", tasks=("gqa",))
    return Setup(**{**fields, **changes})


def test_script_cells_run_the_main_job_with_the_callers_variables(tmp_path):
    """A cell's command and variables, run by the real script with a stand-in python: the main job's real-scale
    flags, the cell's recipe, options, seed, epochs, data subset and resume point, and BATCH from the caller."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir()
    stub.write_text(STUB)
    stub.chmod(0o755)
    setup = _script_setup(tmp_path)
    cell = next(c for c in expand(build_grid("tpa_sampling", 4), [3], epochs=2.5) if c.options)
    backend = DistillBackend(setup)
    cell_dir = tmp_path / "cells" / cell.id
    resume = cell_dir / "student" / "checkpoint-400"
    cmd, variables = backend.command(cell, cell_dir, resume, port="29601")
    assert cmd == ["bash", str(ROOT / "scripts" / "v1_5" / "distill_aligntI.sh")]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **variables, "PYTHON": str(stub),
           "STUB_LOG": str(tmp_path / "calls.jsonl"), "BATCH": "7", "EXTRA_ARGS": "--save_steps 50"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (call,) = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    argv = call["argv"]
    flags = {k: argv[i + 1] for i, k in enumerate(argv[:-1]) if k.startswith("--")}
    assert argv[:2] == ["-m", "aligntI_patch.distill"] and "--use_cpu" in argv  # NUM_GPUS=0 here
    assert flags["--model_name_or_path"] == "Qwen/Qwen3-0.6B" and flags["--version"] == "qwen_3"
    assert flags["--teacher_model_path"] == str(tmp_path / "teacher")
    assert flags["--pretrain_mm_mlp_adapter"] == str(tmp_path / "pre" / "mm_projector.safetensors")
    assert flags["--data_path"] == str(tmp_path / "mix.json") and flags["--image_folder"] == str(tmp_path / "images")
    assert flags["--output_dir"] == str(cell_dir / "student") and flags["--num_train_epochs"] == "2.5"
    assert flags["--learning_rate"] == "2e-5" and flags["--bf16"] == "True"  # the script's real-scale defaults
    assert flags["--per_device_train_batch_size"] == "7" and flags["--save_steps"] == "50"  # the caller's
    assert flags["--recipe"] == cell.recipe and flags["--seed"] == "3"
    assert all(flags[f"--{k}"] == str(v) for k, v in cell.options.items())
    assert flags["--resume_from_checkpoint"] == str(resume)
    assert variables["MASTER_PORT"] == "29601"
    # a data fraction trains on the cell's subset of --data
    half = next(c for c in expand(build_grid("data_fraction", 4), [0], epochs=1) if c.data_fraction == 0.5)
    assert backend.command(half, cell_dir, None)[1]["DATA_PATH"] == str(cell_dir / "finetune_subset.json")


def test_script_launcher_dry_run_and_what_it_needs(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["run", "--grid", "loss_terms", "--out", str(out), "--launcher", "script", "--num_gpus", "8",
            "--teacher", str(tmp_path / "t"), "--pretrain", str(tmp_path / "p"),
            "--vision-tower", "google/siglip-so400m-patch14-384",
            "--data", str(tmp_path / "mix.json"), "--image-folder", str(tmp_path / "img"), "--tasks", "gqa,pope"]
    main([*base, "--model", "Qwen/Qwen2-0.5B", "--dry-run"])
    text = capsys.readouterr().out
    assert text.count("distill_aligntI.sh") == 7 and "NUM_GPUS=8" in text and "MODEL=Qwen/Qwen2-0.5B" in text
    assert "DISTILL_ARGS='--recipe kd_tpa --seed 0 --disable_tqdm True'" in text and not out.exists()
    assert "VISION_TOWER=google/siglip-so400m-patch14-384 " in text  # a hub id passes unchanged
    with pytest.raises(SystemExit):
        main([*base, "--dry-run"])  # no --model
    assert "--launcher script needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --model belongs to the script launcher
        main([*base[:6], "cpu", *base[7:], "--model", "Qwen/Qwen2-0.5B", "--dry-run"])
    assert "--launcher script and --model go together" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError) as missing:  # nothing there: every part is named
        main([*base, "--model", "Qwen/Qwen2-0.5B"])
    assert "mm_projector.safetensors" in str(missing.value) and "--data / --image-folder" in str(missing.value)


def test_identity_of_an_out_dir_made_before_the_full_scale_fields(tmp_path):
    """Fields at their defaults stay out of setup.json, so an out dir recorded before they existed still runs."""
    tiny = Setup(teacher=tmp_path / "t", pretrain=tmp_path / "p", world=tmp_path / "w", vision_tower=None,
                 version="qwen_2", test_split="test_large")
    assert set(tiny.identity()) == {"teacher", "pretrain", "world", "vision_tower", "version", "test_split"}
    full = _script_setup(tmp_path, val_tasks=("gqa_val",), lmms_args=("--limit", "9"))
    assert {k: full.identity()[k] for k in ("model", "tasks", "val_tasks", "lmms_args")} == {
        "model": "Qwen/Qwen3-0.6B", "tasks": ["gqa"], "val_tasks": ["gqa_val"], "lmms_args": ["--limit", "9"]}


# ------------------------------------------------------------------------------------------ lmms-eval, for real
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lmms_scoring_through_the_backend(mini_checkpoint, mini_world, tmp_path, monkeypatch):
    """One real `python -m lmms_eval` run through the backend: tiny_world's numbers are `evaluate_tiny`'s on the
    same questions (the untrained mini checkpoint answers none right: 0 = 0, the counts are what tell), and
    tiny_world_mc's likelihood accuracy (not 0) arrives scaled, its n the closed-form questions of the world,
    its per-question scores averaging to it."""
    if os.environ.get("CI", "").lower() in ("", "0", "false"):  # in CI a missing lmms-eval fails the test
        pytest.importorskip("lmms_eval")
    from llava.eval.eval_tiny import evaluate_tiny
    from llava.eval.lmms_tasks.tiny_world.prepare import task_rows, write_task_jsonl

    monkeypatch.chdir(tmp_path)  # the task YAML reads its jsonl relative to the working directory
    write_task_jsonl(mini_world, Path("playground/tiny/data/lmms_eval/test.jsonl"))
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    setup = Setup(teacher=mini_checkpoint, pretrain=mini_checkpoint, world=mini_world, vision_tower=None,
                  version="qwen_2", tasks=("tiny_world:overall", "tiny_world:describe", "tiny_world_mc*50"),
                  include_path=ROOT / "llava" / "eval" / "lmms_tasks")
    answers = tmp_path / "cell"
    answers.mkdir()
    scores = DistillBackend(setup, eval_batch_size=8).evaluate(mini_checkpoint, answers)
    reference = evaluate_tiny(str(mini_checkpoint), mini_world, split="test", batch_size=8)
    assert set(scores) == {"test"}  # no --val-tasks: no val split
    test = scores["test"]
    assert test["tiny_world:overall"]["accuracy"] == pytest.approx(reference["overall"]["accuracy"])
    assert test["tiny_world:describe"]["accuracy"] == pytest.approx(reference["describe"]["accuracy"])
    assert test["tiny_world:describe"]["n"] == reference["describe"]["n"]
    per_question = json.loads((answers / "scores_test.json").read_text())
    overall = [v for k, v in per_question.items() if k.startswith("tiny_world:overall/")]
    assert len(overall) == reference["overall"]["n"]
    assert sum(overall) / len(overall) == pytest.approx(reference["overall"]["accuracy"])
    closed = sum(r["family"] in ("existence", "choice") for r in task_rows(mini_world))
    mc = [v for k, v in per_question.items() if k.startswith("tiny_world_mc/")]
    assert test["tiny_world_mc"]["n"] == closed == len(mc)
    assert 0 < test["tiny_world_mc"]["accuracy"] <= 0.5 and test["tiny_world_mc"]["accuracy"] == pytest.approx(
        sum(mc) / len(mc))  # x 50 / 100
    lmms = json.loads(next((answers / "lmms_test").rglob("*_results.json")).read_text())["results"]
    assert test["tiny_world_mc"]["accuracy"] == pytest.approx(lmms["tiny_world_mc"]["acc,none"] / 2)
    assert test["overall"]["accuracy"] == pytest.approx(
        (reference["overall"]["accuracy"] + reference["describe"]["accuracy"] + test["tiny_world_mc"]["accuracy"]) / 3)
