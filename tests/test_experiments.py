"""The experiment runner (aligntI_patch/experiments): grids, the main job's hyperparameters, resumable cells
(with a fake backend: no training), the report's statistics against hand-computed numbers, and one real
1-seed, 2-cell smoke on the mini world (slow)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from aligntI_patch.experiments.__main__ import main
from aligntI_patch.experiments.cell import Outcome, distill_command, student_args, write_subset
from aligntI_patch.experiments.context import PARTS, Setup
from aligntI_patch.experiments.grids import GRID_NAMES, build_grid, cell_id, expand, table7_layers
from aligntI_patch.experiments.report import verdict, write_report
from aligntI_patch.experiments.runner import read_rows, run_grid
from aligntI_patch.experiments.stats import mean_interval
from llava.eval.eval_tiny import evaluate_tiny

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ grids
def test_grid_expansion_names_each_run_once():
    grid = build_grid("loss_terms", teacher_layers=4)
    cells = expand(grid, [0, 1], epochs=1)
    assert len(cells) == 14 and [c.seed for c in cells] == [0] * 7 + [1] * 7  # seed-major: whole seeds first
    assert [c.id for c in cells[:3]] == ["sft-ep1-seed0", "kd-ep1-seed0", "sft_iva-ep1-seed0"]
    # a flag equal to the recipe's value or the default is not part of the id: Fig. 6's nucleus d=4 is Align-TI
    tpa = {c.variant: c.id for c in expand(build_grid("tpa_sampling", 4), [0], epochs=3)}
    assert tpa["nucleus d=4"] == "aligntI-ep3-seed0"
    assert tpa["greedy d=2"] == "aligntI-tpa_num_samples=2-tpa_sampling=greedy-ep3-seed0"
    assert cell_id("kd", {"divergence": "fkl"}, 1, 1.0, 0) == "kd-ep1-seed0"
    assert cell_id("kd", {"w_kd": 1, "tpa_num_samples": "4"}, 1.0, 1.0, 0) == "kd-ep1-seed0"
    assert cell_id("kd", {}, 1, 0.25, 2) == "kd-ep1-frac0.25-seed2"
    assert cell_id("kd", {}, 1, 1.0, 0, ("--irs_num_pairs", "8")).startswith("kd-ep1-x")
    # budget and data_fraction set their own axis; --only keeps recipes
    budget = expand(build_grid("budget", 4), [0], epochs=1, only=("kd",))
    assert [c.id for c in budget] == [f"kd-ep{e}-seed0" for e in (1, 2, 3, 4, 6, 8)]
    every = [c.id for c in expand(build_grid("budget", 4), [0], epochs=1)]  # cheapest budget first, all recipes
    assert every[:4] == ["sft-ep1-seed0", "kd-ep1-seed0", "aligntI-ep1-seed0", "sft-ep2-seed0"]
    fractions = expand(build_grid("data_fraction", 4), [5], epochs=2, only=("sft",))
    assert [c.id for c in fractions] == ["sft-ep2-frac0.25-seed5", "sft-ep2-frac0.5-seed5", "sft-ep2-seed5"]
    # Table 7's depths: 0, 7, 14, 21, 27 of the paper's 28 layers; the tiny teacher's 4 give 0..3, plus auto
    assert table7_layers(28) == [0, 7, 14, 21, 27] and table7_layers(4) == [0, 1, 2, 3]
    # the paper's Table 7 beside each layer: at 28 layers one depth each; at 4, layer 3 is both 3/4 and 4/4 deep
    assert [v.paper for v in build_grid("iva_layer", 28).variants][:5] == ["63.7", "58.8", "63.9", "65.1", "64.6"]
    assert [v.paper for v in build_grid("iva_layer", 4).variants][:4] == ["63.7", "58.8", "63.9", "65.1 / 64.6"]
    layer = expand(build_grid("iva_layer", 4), [0], epochs=1)
    assert [c.id for c in layer] == [*(f"sft_iva-iva_layer={k}-ep1-seed0" for k in range(4)), "sft_iva-ep1-seed0"]
    assert {c.recipe for c in expand(build_grid("iva_weights", 4), [0], 1)} == {"sft_iva", "student_iva",
                                                                                "uniform_iva"}
    with pytest.raises(ValueError, match="--only .*'rkl'.*not in grid loss_terms"):
        expand(grid, [0], 1, only=("rkl",))
    with pytest.raises(ValueError, match="unknown grid"):
        build_grid("nope", 4)
    for name in GRID_NAMES:  # every claim names rows of its grid
        g = build_grid(name, 28)
        assert {c.a for c in g.claims} | {c.b for c in g.claims} <= {v.name for v in g.variants}



def test_grids_command_lists_rows_flags_and_the_papers_numbers(capsys):
    main(["grids"])
    text = capsys.readouterr().out
    assert "loss_terms (Tables 4 and 16; test split)" in text and "budget (student epochs, not in the paper; val" in text
    assert "  sft: --recipe sft; the paper's avg: 64.3\n" in text
    assert "  layer 3: --recipe sft_iva --iva_layer 3; the paper's avg: 65.1 / 64.6\n" in text
    assert "  greedy d=2: --recipe aligntI --tpa_sampling greedy --tpa_num_samples 2; the paper's avg: figure only" in text

def _script_hyperparameters() -> dict[str, str]:
    """The flags the main job passes to the distillation entry on the tiny preset (distill_aligntI.sh)."""
    text = (ROOT / "scripts" / "v1_5" / "distill_aligntI.sh").read_text()
    tiny = text[text.index('if [ -z "${MODEL:-}" ]'):text.index("else")]
    defaults = {k: v for k, v in re.findall(r'(\w+)="\$\{\1:-([^}]*)\}"', tiny) if "$" not in v}
    stage = re.search(r"STAGE_ARGS=\(([^)]*)\)", tiny).group(1)
    start = text.index("launch aligntI_patch.distill")  # the body of the script's distill(): flags up to "$@"
    launch = text[start:text.index('"$@"', start)].replace("\\\n", " ")
    launch = re.sub(r'"\$\{(\w+):-([^}]*)\}"', lambda m: defaults.get(m.group(1), m.group(2)), launch)
    words = shlex.split(launch.replace('"${STAGE_ARGS[@]}"', stage))[2:]
    pairs = dict(zip(words[::2], words[1::2]))
    return {k: v for k, v in pairs.items() if not v.startswith("$")}  # paths differ, values must not


def _same(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def test_cells_use_the_main_jobs_hyperparameters(tmp_path):
    setup = Setup(teacher=tmp_path / "t", pretrain=tmp_path / "p", world=tmp_path / "w", vision_tower=None,
                  version="qwen_2")
    cell = expand(build_grid("tpa_sampling", 4), [3], epochs=1)[0]
    args = student_args(setup, cell, tmp_path / "out", tmp_path / "w" / "finetune.json")
    flags = dict(zip(args[::2], args[1::2]))
    expected = _script_hyperparameters()
    assert {"--per_device_train_batch_size", "--learning_rate", "--num_train_epochs", "--model_max_length",
            "--warmup_ratio"} <= set(expected)
    assert {k: flags.get(k) for k in expected if not _same(flags.get(k, ""), expected[k])} == {}
    assert flags["--seed"] == "3" and flags["--recipe"] == "aligntI" and flags["--tpa_sampling"] == "greedy"
    assert flags["--tpa_num_samples"] == "1" and "--use_cpu" not in args
    cpu = distill_command(setup, args)
    assert cpu[1:3] == ["-m", "aligntI_patch.distill"] and cpu[-1] == "--use_cpu"
    gpu = distill_command(Setup(**{**setup.__dict__, "launcher": "deepspeed", "num_gpus": 2}), args, "29555")
    assert Path(gpu[0]).name == "deepspeed" and gpu[1:9] == ["--num_gpus", "2", "--master_port", "29555", "--module",
                                                             "aligntI_patch.distill", "--deepspeed",
                                                             str(ROOT / "scripts" / "zero2.json")]
    assert "--use_cpu" not in gpu


def test_data_subsets_are_seeded_and_nested(tmp_path):
    data = tmp_path / "finetune.json"
    data.write_text(json.dumps([{"id": i} for i in range(40)]))
    quarter = json.loads(write_subset(data, 0.25, 0, tmp_path / "a.json").read_text())
    half = json.loads(write_subset(data, 0.5, 0, tmp_path / "b.json").read_text())
    again = json.loads(write_subset(data, 0.25, 0, tmp_path / "c.json").read_text())
    other = json.loads(write_subset(data, 0.25, 1, tmp_path / "d.json").read_text())
    assert len(quarter) == 10 and len(half) == 20 and quarter == again and quarter != other
    assert all(r in half for r in quarter) and quarter == sorted(quarter, key=lambda r: r["id"])


# ------------------------------------------------------------------------------------------ runner
TEACHER = {"attribute": 0.80, "counting": 0.50, "overall": 0.65}
SCORES = {  # recipe -> per seed (attribute, counting, overall)
    "sft": [(0.40, 0.48, 0.44), (0.50, 0.46, 0.48), (0.45, 0.47, 0.46)],
    "kd": [(0.50, 0.48, 0.49), (0.52, 0.47, 0.50), (0.60, 0.49, 0.545)],
    "aligntI": [(0.60, 0.50, 0.55), (0.70, 0.48, 0.59), (0.65, 0.49, 0.57)],
}


def _summary(acc: dict) -> dict:
    return {k: {"n": 10, "accuracy": v} for k, v in acc.items()}


class FakeBackend:
    """Scores from SCORES (val = test - 1 point); records what it trained; `fail` cells write a file and raise."""

    def __init__(self, fail: tuple[str, ...] = (), teacher: str = "fake-teacher"):
        self.trained: list[str] = []
        self.teacher_scored = 0
        self.fail, self.teacher = fail, teacher

    def identity(self) -> dict:
        return {"teacher": self.teacher}

    def describe(self, cell, cell_dir) -> str:
        return f"train {cell.id}"

    def resume_point(self, cell, cell_dir) -> Path | None:  # a file "checkpoint" stands for a trainer checkpoint
        return cell_dir / "checkpoint" if (cell_dir / "checkpoint").is_file() else None

    def evaluate_teacher(self) -> dict:
        self.teacher_scored += 1
        return {"test": _summary(TEACHER), "val": _summary(TEACHER)}

    def train_and_evaluate(self, cell, cell_dir: Path) -> Outcome:
        (cell_dir / "train.log").write_text("partial")
        if cell.id in self.fail:
            raise KeyboardInterrupt  # an interrupted run leaves the cell dir without result.json
        self.trained.append(cell.id)
        test = dict(zip(("attribute", "counting", "overall"), SCORES[cell.recipe][cell.seed]))
        val = {k: v - 0.01 for k, v in test.items()}
        timings = {"train_s": 1.0} if self.resume_point(cell, cell_dir) is None else {"train_s": 101.0,
                                                                                        "earlier_s": 100.0}
        return Outcome({"test": _summary(test), "val": _summary(val)}, timings)


def _run(out: Path, backend: FakeBackend, grid: str = "loss_terms", seeds=(0, 1, 2), **kw) -> list[dict]:
    g = build_grid(grid, 4)
    return run_grid(g, expand(g, list(seeds), 1, only=("sft", "kd", "aligntI"), **kw), out, backend)


def test_finished_cells_are_skipped_and_interrupted_ones_rerun_cleanly(tmp_path):
    out = tmp_path / "out"
    first = FakeBackend(fail=("kd-ep1-seed1",))
    with pytest.raises(KeyboardInterrupt):
        _run(out, first)
    assert first.trained == ["sft-ep1-seed0", "kd-ep1-seed0", "aligntI-ep1-seed0", "sft-ep1-seed1"]
    partial = out / "cells" / "kd-ep1-seed1"
    assert (partial / "train.log").is_file() and not (partial / "result.json").exists()
    (partial / "stray").write_text("left by the interrupted run")
    (out / "cells" / "kd-ep1-seed2").mkdir()  # started by a runner that died before writing anything
    second = FakeBackend()
    rows = _run(out, second)  # started cells first, then the grid's order
    assert second.trained == ["kd-ep1-seed1", "kd-ep1-seed2", "aligntI-ep1-seed1", "sft-ep1-seed2",
                              "aligntI-ep1-seed2"]
    assert not (partial / "stray").exists() and (partial / "result.json").is_file()
    assert first.teacher_scored == 1 and second.teacher_scored == 0  # the teacher once per out dir
    row = rows[0]
    assert row["cell"] == "kd-ep1-seed1" and row["grid"] == "loss_terms" and row["recipe"] == "kd"
    assert row["seed"] == 1 and row["epochs"] == 1 and row["test"]["attribute"] == pytest.approx(52.0)
    assert row["val"]["overall"] == pytest.approx(49.0) and row["n"]["test"]["counting"] == 10
    assert {"wall_s", "train_s", "commit", "host", "finished"} <= set(row)
    assert len(read_rows(out)) == 9 == len((out / "results.jsonl").read_text().splitlines())
    third = FakeBackend()  # everything done: nothing trains; a row cut by a crash is restored from result.json
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text[:-40])
    assert len(read_rows(out)) == 8
    assert _run(out, third) == [] and third.trained == [] and len(read_rows(out)) == 9
    # a grid sharing cells trains only what it lacks (budget's ep1 cells are loss_terms')
    fourth = FakeBackend()
    g = build_grid("budget", 4)
    run_grid(g, [c for c in expand(g, [0], 1) if c.epochs == 1], out, fourth)
    assert fourth.trained == []
    with pytest.raises(ValueError, match="another setup"):
        _run(out, FakeBackend(teacher="another-teacher"))


def test_an_interrupted_cell_with_a_checkpoint_resumes(tmp_path):
    """The same cell (cell.json) with a checkpoint keeps its dir and resumes (its wall time adds the earlier
    runs'); a checkpoint of a cell recorded otherwise, or no checkpoint, restarts from an empty dir."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(out, FakeBackend(fail=("sft-ep1-seed0", )), seeds=(0,))
    with_checkpoint = out / "cells" / "sft-ep1-seed0"
    (with_checkpoint / "checkpoint").write_text("step 200")
    for seed in (1, 2):
        with pytest.raises(KeyboardInterrupt):
            _run(out, FakeBackend(fail=(f"sft-ep1-seed{seed}", )), seeds=(seed,))
    other = out / "cells" / "sft-ep1-seed1"
    (other / "checkpoint").write_text("step 200")
    recorded = json.loads((other / "cell.json").read_text())
    (other / "cell.json").write_text(json.dumps({**recorded, "options": {"w_kd": 1.0}}))
    without = out / "cells" / "sft-ep1-seed2"
    backend = FakeBackend()
    rows = {r["cell"]: r for r in _run(out, backend)}
    assert (with_checkpoint / "checkpoint").is_file() and (with_checkpoint / "train.log").is_file()
    assert not (other / "checkpoint").exists() and (other / "result.json").is_file()
    assert (without / "result.json").is_file()
    assert rows["sft-ep1-seed0"]["wall_s"] >= 100.0 and rows["sft-ep1-seed0"]["earlier_s"] == 100.0
    assert rows["sft-ep1-seed1"]["wall_s"] < 100.0 and "earlier_s" not in rows["sft-ep1-seed2"]


def test_runners_sharing_an_out_dir_train_each_cell_once(tmp_path):
    """Two runners on one out dir (threads: flock locks of separate open() calls exclude each other as
    processes' do) split the cells; a cell held by a third runner is passed by, neither deleted nor trained."""
    import fcntl
    import threading
    import time

    from aligntI_patch.experiments import runner

    both_training = threading.Barrier(2, timeout=60)  # each runner's first cell waits for the other's

    class SlowBackend(FakeBackend):
        def evaluate_teacher(self) -> dict:
            time.sleep(0.2)  # the other runner must wait for the teacher, not score it again
            return super().evaluate_teacher()

        def train_and_evaluate(self, cell, cell_dir: Path) -> Outcome:
            if not self.trained:
                both_training.wait()
            return super().train_and_evaluate(cell, cell_dir)

    out = tmp_path / "out"
    held = out / "cells" / "kd-ep1-seed2"
    held.mkdir(parents=True)
    (held / "train.log").write_text("being written by a third runner")
    (out / "locks").mkdir()
    backends, outputs = [SlowBackend(), SlowBackend()], [[], []]
    with open(out / "locks" / "kd-ep1-seed2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        g = build_grid("loss_terms", 4)
        cells = expand(g, [0, 1, 2], 1, only=("sft", "kd", "aligntI"))
        threads = [threading.Thread(target=runner.run_grid, args=(g, cells, out, b), kwargs={"write": o.append})
                   for b, o in zip(backends, outputs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    trained = backends[0].trained + backends[1].trained
    assert sorted(trained) == sorted(c.id for c in cells if c.id != "kd-ep1-seed2")  # each once, split
    assert backends[0].teacher_scored + backends[1].teacher_scored == 1
    assert (held / "train.log").read_text() == "being written by a third runner"
    assert all(any("kd-ep1-seed2: running in another runner" in line for line in o) for o in outputs)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8 == len(read_rows(out))
    # the third runner gone, the cell is an interrupted one: the next run trains it
    last = FakeBackend()
    _run(out, last)
    assert last.trained == ["kd-ep1-seed2"] and len(read_rows(out)) == 9


def test_status_counts_cells_and_estimates_the_time_left(tmp_path, capsys):
    """Hand-computed: the fake trains 60 s per epoch (aligntI 120 s) and scores in 10 s; loss_terms' 3 recipes x
    3 seeds at 1 epoch are done, so budget's 15 unfinished cells of seed 0 (sft, kd at 2, 3, 4, 6, 8 epochs:
    23 epochs each; aligntI the same at twice the rate) take (23 * 60 * 2 + 23 * 120) + 15 * 10 = 5670 s."""

    class Timed(FakeBackend):
        def train_and_evaluate(self, cell, cell_dir: Path) -> Outcome:
            outcome = super().train_and_evaluate(cell, cell_dir)
            rate = 120.0 if cell.recipe == "aligntI" else 60.0
            return Outcome(outcome.scores, {"train_s": rate * cell.epochs, "eval_s": 10.0})

    from aligntI_patch.experiments.runner import record_grid
    from aligntI_patch.experiments.status import cell_seconds, done_share

    out = tmp_path / "out"
    _run(out, Timed())
    g = build_grid("budget", 4)
    record_grid(out, g, expand(g, [0], 1))
    started = out / "cells" / "kd-ep2-seed0"  # started: running or interrupted
    (started / "student" / "checkpoint-400").mkdir(parents=True)
    (started / "student" / "checkpoint-400" / "trainer_state.json").write_text('{"global_step": 400, "max_steps": 800}')
    (started / "student" / "checkpoint-600").mkdir()  # a save cut short: no trainer_state.json
    (started / "train.log").write_text("{'loss': '0.9', 'epoch': '0.5'}\n{'loss': '0.8', 'epoch': '1.25'}\n")
    (out / "cells" / "sft-ep3-seed0").mkdir()  # started, nothing written yet
    main(["status", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| kd-ep2-seed0 | 1.25 of 2 | step 400 | 0 min ago |" in text
    # half of its training is checkpointed: 60 s x 2 epochs x 0.5 left, plus 10 s of scoring
    assert done_share(started) == 0.5 and cell_seconds({"recipe": "kd", "epochs": 2, "data_fraction": 1.0},
                                                       {"kd": 60.0}, 10.0, done_share(started)) == 70.0
    assert "| sft-ep3-seed0 | - of 3 | the start | no log |" in text
    (out / "cells" / "sft-ep3-seed0").rmdir()
    main(["status", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| budget | 18 | 3 | 1 | 14 |" in text and "| 1.6 h |" in text  # 5670 s
    assert "| loss_terms | 9 | 9 | 0 | 0 | 0 min | 0 min |" in text  # spent: the fake takes no time
    assert "| all (a shared cell once) | 24 | 9 |" in text  # budget's ep1 seed-0 cells are loss_terms'
    assert "aligntI 120 s, kd 60 s, sft 60 s; scoring 10 s" in text
    manifest = json.loads((out / "grids" / "budget.json").read_text())
    assert all(e["options"] == {} for e in manifest["cells"])


def test_a_scored_student_loses_its_resume_state_and_keeps_weights_on_request(tmp_path):
    from aligntI_patch.experiments.cell import prune_student

    for keep in (True, False):
        student = tmp_path / f"student-{keep}"
        (student / "checkpoint-500").mkdir(parents=True)
        (student / "checkpoint-500" / "optimizer.pt").write_bytes(b"x")
        for name in ("model.safetensors", "config.json", "recipe.json"):
            (student / name).write_text("{}")
        prune_student(student, keep_weights=keep)
        left = sorted(p.name for p in student.iterdir())
        assert left == (["config.json", "model.safetensors", "recipe.json"] if keep else ["config.json", "recipe.json"])


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    main(["run", "--grid", "iva_weights", "--seeds", "2", "--out", str(out), "--teacher", str(tmp_path / "t"),
          "--pretrain", str(tmp_path / "p"), "--world", str(tmp_path / "w"), "--dry-run"])
    text = capsys.readouterr().out
    assert "score the teacher" in text and text.count("aligntI_patch.distill") == 6
    assert "--recipe student_iva" in text and "--seed 1" in text and not out.exists()
    # an empty preset root: the dry run names the build; explicit paths that are missing are an error
    main(["run", "--grid", "divergences", "--out", str(out), "--root", str(tmp_path / "tiny"), "--dry-run"])
    text = capsys.readouterr().out
    assert f"TINY_ROOT={tmp_path / 'tiny'} TINY_BACKBONE=qwen2" in text and "scripts/v1_5/pretrain.sh" in text
    assert "EPOCHS=1 bash" in text  # the preset's pretrain stage, whatever the caller's EPOCHS
    assert f"--vision_tower {tmp_path / 'tiny' / 'siglip'}" in text and not out.exists()
    with pytest.raises(FileNotFoundError) as missing:
        main(["run", "--grid", "divergences", "--out", str(out), "--teacher", str(tmp_path / "t"),
              "--pretrain", str(tmp_path / "p"), "--world", str(tmp_path / "w")])
    assert all(f"- {PARTS[part]}" in str(missing.value) for part in ("teacher", "data", "pretrain", "questions"))
    with pytest.raises(SystemExit):
        main(["run", "--grid", "divergences", "--out", str(out), "--seeds", "0", "--dry-run"])


# ------------------------------------------------------------------------------------------ report
def test_report_says_when_the_budget_rests_on_fewer_seeds(tmp_path):
    """Budget means over fewer seeds than the others carry their n, and the choice is called interim."""
    out, g = tmp_path / "out", build_grid("budget", 4)
    cells = expand(g, [0, 1], 1) + [c for c in expand(g, [2], 1) if c.epochs == 1]
    run_grid(g, cells, out, FakeBackend())
    text = write_report(out)
    sft = next(line for line in text.splitlines() if line.startswith("| sft | 45.0 |"))
    assert sft.count("45.0 (n=2)") == 5  # val = test - 1: seeds 0, 1 give 43 and 47; seed 2 adds 45 at ep1 only
    assert "**Interim**: some means rest on fewer seeds than the 3 of the others" in text
    run_grid(g, expand(g, [2], 1), out, FakeBackend())
    final = write_report(out)
    assert "(n=2)" not in final and "**Interim**" not in final and "| sft | 45.0 | 45.0 |" in final


def test_report_tables_gap_and_claims(tmp_path):
    out = tmp_path / "out"
    _run(out, FakeBackend())
    text = write_report(out)
    assert (out / "report.md").read_text() == text and (out / "loss_terms.png").stat().st_size > 1000
    assert "9 of 9 cells finished" in text and "Test split" in text
    assert "| model | paper avg | seeds | attribute | counting | overall |" in text  # the paper's row beside ours
    assert "| teacher | - | - | 80.0 | 50.0 | 65.0 |" in text
    assert "| sft | 64.3 | 3 | 45.0 ± 12.4 | 47.0 ± 2.5 | 46.0 ± 5.0 |" in text  # attribute 40/50/45: sd 5
    assert "| aligntI | 66.7 | 3 |" in text
    # gap: attribute (teacher leads SFT by 35) and overall (19); counting (lead 3) left out, with its lead
    assert "| kd | 26 % | 27 % |" in text and "| aligntI | 57 % | 58 % |" in text
    assert "counting (lead +3.0)" in text
    # aligntI - kd on attribute: differences 10, 18, 5 -> 11.0 ± 16.3
    line = next(x for x in text.splitlines() if x.startswith("| aligntI − kd |"))
    assert "| 3 |" in line and "11.0 ± 16.3" in line
    assert "| ? | inconclusive |" in line  # overall differences 6, 9, 2.5: mean 5.8 ± 8.1 spans 0
    assert "| + | holds |" in next(x for x in text.splitlines() if x.startswith("| aligntI − sft |"))  # 11, 11, 11
    assert verdict(mean_interval([-3.0, -4.0, -5.0])) == "does not hold"
    assert verdict(mean_interval([2.0])) == "none (one seed)"
    g = build_grid("budget", 4)  # the budget grid reads the val split
    run_grid(g, expand(g, [0, 1], 1, only=("sft", "kd")), out, FakeBackend())
    budget = write_report(out).split("## budget")[1]
    assert "Val split" in budget and "Chosen budget: **1 epochs**" in budget and (out / "budget.png").is_file()
    assert "| sft | 45.0 | 45.0 | 45.0 | 45.0 | 45.0 | 45.0 |" in budget and "- kd: peak" in budget
    assert "paper avg" not in budget.split("\n## ")[0]  # not a table of the paper


# ------------------------------------------------------------------------------------------ smoke
@pytest.mark.slow
def test_runner_and_report_end_to_end_on_the_mini_world(tmp_path, mini_world, mini_checkpoint, mini_teacher,
                                                        capsys):
    """1 seed, 2 cells (sft and kd on half the data), real distillation and scoring on an added test split (its
    per-question scores saved), then the report with its paired bootstrap; then the kept students rescored on
    an added val split."""
    out, world = tmp_path / "out", tmp_path / "world"
    shutil.copytree(mini_world, world)  # the session's world stays as it is
    run = ["run", "--grid", "loss_terms", "--seeds", "1", "--only", "sft", "--only", "kd", "--data-fraction", "0.5",
           "--out", str(out), "--teacher", str(mini_teacher), "--pretrain", str(mini_checkpoint),
           "--world", str(world), "--test-split", "test_more=14", "--keep-checkpoints"]
    main(run)
    assert (world / "test_more_questions.jsonl").is_file()
    rows = read_rows(out)
    assert sorted(rows) == ["kd-ep1-frac0.5-seed0", "sft-ep1-frac0.5-seed0"]
    for cell, row in rows.items():
        assert set(row["test"]) >= {"attribute", "describe", "overall"} and "overall" in row["val"]
        assert row["n"]["test"]["overall"] == 14
        scores = json.loads((out / "cells" / cell / "scores_test.json").read_text())
        assert len(scores) == 14 and 100 * sum(scores.values()) / 14 == pytest.approx(row["test"]["overall"])
        student = out / "cells" / cell / "student"
        assert (student / "recipe.json").is_file() and (out / "cells" / cell / "train.log").is_file()
        assert (student / "model.safetensors").is_file() and not list(student.glob("checkpoint-*"))
        assert len(json.loads((out / "cells" / cell / "finetune_subset.json").read_text())) > 0
    assert json.loads((out / "cells" / "kd-ep1-frac0.5-seed0" / "student" / "recipe.json").read_text())[
        "recipe"] == "kd"
    capsys.readouterr()
    main(["report", "--out", str(out)])
    text = capsys.readouterr().out
    assert "## loss_terms" in text and "2 of 2 cells finished" in text and (out / "loss_terms.png").is_file()
    assert "scored on the world's splits test_more (test), val (val)" in text
    line = next(x for x in text.splitlines() if x.startswith("| kd − sft |"))
    assert "| 1 x 14 |" in line  # the bootstrap over the one seed and the 14 questions
    # rescore on a new val split: the rows' val is what evaluate_tiny gives on it, test as it was
    main(["rescore", "--out", str(out), "--val-split", "val_more=21"])
    assert json.loads((out / "setup.json").read_text())["val_split"] == "val_more"
    again = read_rows(out)
    student = out / "cells" / "kd-ep1-frac0.5-seed0" / "student"
    reference = evaluate_tiny(str(student), world, split="val_more")
    row = again["kd-ep1-frac0.5-seed0"]
    assert row["val"]["overall"] == pytest.approx(100 * reference["overall"]["accuracy"])
    assert row["n"]["val"]["overall"] == 21 and row["splits"] == {"val": "val_more"}
    assert row["test"] == rows["kd-ep1-frac0.5-seed0"]["test"]
    teacher = json.loads((out / "teacher.json").read_text())
    assert teacher["val"]["overall"] == pytest.approx(
        100 * evaluate_tiny(str(mini_teacher), world, split="val_more")["overall"]["accuracy"])
    with pytest.raises(ValueError, match="another setup"):  # the val split is the out dir's now
        main(run)
    main([*run, "--val-split", "val_more"])  # everything done on the same setup: nothing reruns
