"""One cell: train a student with `python -m aligntI_patch.distill`, score it on the val and test splits.

Design choices
- Hyperparameters are the main job's for its Align-TI student (`scripts/v1_5/distill_aligntI.sh` on the tiny
  preset): the preset's student finetune stage (`llava.tiny.preset.STUDENT_STAGES`) and its shared stage
  flags (`common_train_args`); a test checks them against the script's defaults. Only the recipe, its flags,
  the epochs, the data and `--seed` change from cell to cell. At full scale (launcher `script`) the cell runs
  that script itself with its real-scale variables (`script_env`): its defaults, or the caller's BATCH,
  GRAD_ACC, LR, MAX_LEN, ... (one place holds the real-scale hyperparameters: the script).
- Scoring: the world's val and test questions (`evaluate_tiny`), or lmms-eval tasks (`lmms_scorer.py`).
- Training runs in a subprocess (a fresh process per cell, as the main job; the deepspeed launcher needs one
  anyway); its output goes to CELL/train.log. Tiny-world scoring runs in this process (`evaluate_tiny`),
  lmms-eval in its own.
- A data fraction below 1 trains on CELL/finetune_subset.json: the first round(f * n) records of a
  permutation drawn from the seed, kept in the original order, so the 25 % subset is inside the 50 % one.
- An interrupted cell resumes from the newest complete trainer checkpoint its student left (`--save_steps` of
  the main job: every 200 steps), as the main job would; resuming is bitwise exact (tests/test_distill.py),
  so only the steps after that checkpoint are trained again. Its log goes on in the same train.log.
- After scoring, the student's trainer checkpoints (resume state) are deleted, and its weights too unless
  `keep_checkpoints`; the log, recipe.json, irs.json, config and trainer_state.json stay.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligntI_patch.experiments.context import REPO, Setup
from aligntI_patch.experiments.grids import Cell, canonical_options
from aligntI_patch.experiments.lmms_scorer import score_with_lmms_eval
from llava.tiny.preset import STUDENT_STAGES, common_train_args

SPLITS = ("test", "val")
DISTILL_SCRIPT = REPO / "scripts" / "v1_5" / "distill_aligntI.sh"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Outcome:
    """A trained cell's scores ({split: evaluate_tiny summary}) and timings in seconds."""

    scores: dict[str, dict]
    timings: dict[str, float] = field(default_factory=dict)


class CellFailed(RuntimeError):
    """Training a cell ended with an error; the message holds the tail of its log."""


def _replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


def student_args(setup: Setup, cell: Cell, output_dir: Path, data_path: Path) -> list[str]:
    """The arguments of `aligntI_patch.distill` for `cell` (no launcher flags)."""
    stage = STUDENT_STAGES["finetune"]
    shared = common_train_args(output_dir, data_path, setup.images, setup.version, cell.epochs,
                               stage["lr"], stage["batch"])
    shared = [a for a in shared if a != "--use_cpu"]  # the launcher decides
    shared = _replace_flag(_replace_flag(shared, "--seed", str(cell.seed)), "--disable_tqdm", "True")
    model = ["--model_name_or_path", str(setup.pretrain), "--teacher_model_path", str(setup.teacher)]
    if setup.vision_tower is not None:
        model += ["--vision_tower", str(setup.vision_tower)]
    model += ["--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "pad"]
    return [*model, *shared, *recipe_args(cell)]


def recipe_args(cell: Cell) -> list[str]:
    """--recipe, the cell's options and extra flags (what a cell changes beyond epochs, data and seed)."""
    options = [a for k, v in canonical_options(cell.recipe, cell.options).items() for a in (f"--{k}", str(v))]
    return ["--recipe", cell.recipe, *options, *cell.extra_args]


def script_env(setup: Setup, cell: Cell, output_dir: Path, data_path: Path, resume: Path | None,
               port: str | None = None) -> dict[str, str]:
    """The variables that make `bash scripts/v1_5/distill_aligntI.sh` (its real-scale branch) train `cell`; the
    caller's other variables (BATCH, GRAD_ACC, LR, MAX_LEN, EXTRA_ARGS, NUM_NODES, HOSTFILE, ...) pass through."""
    distill = [*recipe_args(cell), "--seed", str(cell.seed), "--disable_tqdm", "True"]
    if resume is not None:
        distill += ["--resume_from_checkpoint", str(resume)]
    env = {"MODEL": str(setup.model), "TEACHER": str(setup.teacher), "PRETRAIN_DIR": str(setup.pretrain),
           "VISION_TOWER": str(setup.vision_tower), "DATA_PATH": str(data_path), "IMAGE_FOLDER": str(setup.images),
           "VERSION": setup.version, "OUTPUT_DIR": str(output_dir), "EPOCHS": f"{cell.epochs:g}",
           "NUM_GPUS": str(setup.num_gpus), "DS_CONFIG": str(setup.ds_config), "PYTHON": sys.executable,
           "DISTILL_ARGS": shlex.join(distill)}
    if port and "MASTER_PORT" not in os.environ:  # runners sharing a node must not share a port
        env["MASTER_PORT"] = port
    return env


def distill_command(setup: Setup, args: list[str], port: str | None = None) -> list[str]:
    """`python -m aligntI_patch.distill ... --use_cpu`, or the deepspeed launcher with `--deepspeed` on GPUs."""
    if setup.launcher == "cpu":
        return [sys.executable, "-m", "aligntI_patch.distill", *args, "--use_cpu"]
    launcher = str(Path(sys.executable).parent / "deepspeed")
    port_args = ["--master_port", port] if port else []
    return [launcher, "--num_gpus", str(setup.num_gpus), *port_args, "--module", "aligntI_patch.distill",
            "--deepspeed", str(setup.ds_config), *args]


def shell_line(cmd: list[str], env: dict[str, str]) -> str:
    """`VAR=value ... cmd args`, quoted for a shell."""
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd)])


def write_subset(data_path: Path, fraction: float, seed: int, out: Path) -> Path:
    """The first round(fraction * n) records of a seeded permutation of `data_path`, in their original order."""
    from llava.train.data import load_records

    records = load_records(str(data_path))
    order = list(range(len(records)))
    random.Random(f"aligntI-experiments/data_fraction/{seed}").shuffle(order)
    keep = sorted(order[:max(1, round(fraction * len(records)))])
    out.write_text(json.dumps([records[i] for i in keep], ensure_ascii=False))
    return out


def question_scores(question_file: Path, answers_file: Path) -> dict[str, float]:
    """{question_id: score in [0, 1]} of an answers jsonl, scored as `evaluate_tiny` scores it."""
    from llava.eval.eval_utils import read_jsonl
    from llava.tiny.score import score_answer

    replies = {a["question_id"]: a["text"] for a in read_jsonl(answers_file)}
    return {q["question_id"]: float(score_answer(q["family"], replies[q["question_id"]], q))
            for q in read_jsonl(question_file) if q["question_id"] in replies}


def prune_student(output_dir: Path, keep_weights: bool) -> None:
    """Delete a scored student's trainer checkpoints (resume state, optimizer included: a finished cell never
    resumes) and, unless `keep_weights`, its weight files; logs, configs and recipe.json stay."""
    for path in output_dir.glob("checkpoint-*"):
        shutil.rmtree(path)
    if keep_weights:
        return
    for path in output_dir.iterdir():
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            path.unlink()


def global_step(trainer_state: Path) -> int:
    return int(json.loads(trainer_state.read_text())["global_step"])


ATTEMPTS = "attempts.jsonl"  # a line per training run of a cell: its start, the step it resumed, inherited time


def earlier_seconds(cell_dir: Path, resumed: Path) -> float | None:
    """The earlier runs' training time up to checkpoint `resumed`, from CELL/attempts.jsonl: the run that saved it
    (the last one started before its trainer_state.json was written) ran from its start to that save, on top of
    the time it had inherited itself. None without a record of that run (or of what it inherited)."""
    path = cell_dir / ATTEMPTS
    if not path.is_file():
        return None
    saved = (resumed / "trainer_state.json").stat().st_mtime
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    writers = [r for r in runs if r["start"] <= saved]
    if not writers:
        return None
    writer = writers[-1]
    inherited = 0.0 if writer.get("resumed_from_step") is None else writer.get("earlier_s")
    return None if inherited is None else inherited + saved - writer["start"]


def resumed_timings(student: Path, start: int, train_s: float, earlier_s: float | None) -> dict:
    """Timings of a cell resumed at step `start` (read before the run: the trainer's rotation deletes that
    checkpoint once it saves a newer one): this run measured `train_s` for the steps after it; `earlier_s`
    (`earlier_seconds`) is the earlier runs' time up to it. Without a record it is estimated at this run's rate,
    and left unknown (None, train_s too) when this run trained no step to measure a rate on."""
    end = global_step(student / "trainer_state.json")
    if earlier_s is None and end > start:
        earlier_s = train_s * start / (end - start)
    total = None if earlier_s is None else round(train_s + earlier_s, 1)
    return {"resumed_from_step": start, "steps": end, "train_s_this_run": round(train_s, 1),
            "earlier_s": None if earlier_s is None else round(earlier_s, 1), "train_s": total}


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class DistillBackend:
    """The real backend of the runner: distill in a subprocess, then score on val and test (`evaluate`).

    The runner calls only `describe`, `identity`, `evaluate_teacher`, `resume_point` and `train_and_evaluate`;
    a test passes any object with these five methods instead (`run_grid(..., backend=...)`)."""

    setup: Setup
    keep_checkpoints: bool = False
    eval_batch_size: int = 32

    def identity(self) -> dict:
        return self.setup.identity()

    def paths(self, cell: Cell, cell_dir: Path) -> tuple[Path, Path]:
        """The student's output dir and the finetune data of `cell`."""
        data = self.setup.finetune_data
        if cell.data_fraction != 1.0:
            data = cell_dir / "finetune_subset.json"
        return cell_dir / "student", data

    def resume_point(self, cell: Cell, cell_dir: Path) -> Path | None:
        """The newest complete trainer checkpoint that an interrupted run of `cell` left (None: none, train from
        the start)."""
        from llava.train.llava_trainer import last_complete_checkpoint

        found = last_complete_checkpoint(str(self.paths(cell, cell_dir)[0]))
        return None if found is None else Path(found)

    def command(self, cell: Cell, cell_dir: Path, resume: Path | None,
                port: str | None = None) -> tuple[list[str], dict[str, str]]:
        """(command, the variables it adds to the environment) that trains `cell`, resuming from `resume`."""
        out, data = self.paths(cell, cell_dir)
        if self.setup.launcher == "script":
            return ["bash", str(DISTILL_SCRIPT)], script_env(self.setup, cell, out, data, resume, port)
        args = student_args(self.setup, cell, out, data)
        if resume is not None:
            args += ["--resume_from_checkpoint", str(resume)]
        return distill_command(self.setup, args, port), {}

    def describe(self, cell: Cell, cell_dir: Path) -> str:
        subset = ""
        if cell.data_fraction != 1.0:
            data = self.paths(cell, cell_dir)[1]
            subset = f"# writes {data}: {cell.data_fraction:g} of {self.setup.finetune_data} (seed {cell.seed})\n"
        cmd, env = self.command(cell, cell_dir, self.resume_point(cell, cell_dir))
        return subset + shell_line(cmd, env)

    def evaluate(self, checkpoint: Path, answers_dir: Path | None = None,
                 splits: tuple[str, ...] = SPLITS) -> dict[str, dict]:
        """{split: per-family summary} of `checkpoint` for `splits` (of test, val): the world's questions of
        `setup.test_split` / `setup.val_split`, or the lmms-eval tasks of `setup.tasks` ("test") and
        `setup.val_tasks` ("val"). With `answers_dir`: the answers (answers_{split}.jsonl, or lmms-eval's output
        in lmms_{split}/) and each question's score in scores_{split}.json ({question_id: score}, for the
        report's paired bootstrap)."""
        if self.setup.tasks:
            return self._evaluate_lmms(checkpoint, answers_dir, splits)
        import torch

        from llava.eval.eval_tiny import evaluate_tiny

        scores = {}
        for split in splits:
            source = self.setup.test_split if split == "test" else self.setup.val_split
            answers = None if answers_dir is None else answers_dir / f"answers_{split}.jsonl"
            scores[split] = evaluate_tiny(str(checkpoint), self.setup.world, split=source, answers_file=answers,
                                          batch_size=self.eval_batch_size, device=self.setup.device)
            if answers is not None:
                per_question = question_scores(self.setup.world / f"{source}_questions.jsonl", answers)
                (answers_dir / f"scores_{split}.json").write_text(json.dumps(per_question))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return scores

    def _evaluate_lmms(self, checkpoint: Path, answers_dir: Path | None, splits: tuple[str, ...]) -> dict[str, dict]:
        """`evaluate` with lmms-eval (the teacher's output goes to a temporary folder)."""
        tasks_of = {"test": self.setup.tasks, "val": self.setup.val_tasks}
        with tempfile.TemporaryDirectory(prefix="lmms-teacher-") as tmp:
            folder = Path(tmp) if answers_dir is None else answers_dir
            scores = {}
            for split in splits:
                tasks = tasks_of[split]
                if not tasks:
                    continue
                scores[split], per_question = score_with_lmms_eval(
                    checkpoint, tasks, folder / f"lmms_{split}", self.setup.num_gpus, self.eval_batch_size,
                    self.setup.include_path, self.setup.lmms_args)
                if answers_dir is not None and per_question:
                    (answers_dir / f"scores_{split}.json").write_text(json.dumps(per_question))
        return scores

    def evaluate_teacher(self, splits: tuple[str, ...] = SPLITS) -> dict[str, dict]:
        return self.evaluate(self.setup.teacher, splits=splits)

    def train_and_evaluate(self, cell: Cell, cell_dir: Path) -> Outcome:
        from llava.tiny.fixtures import free_port

        out, data = self.paths(cell, cell_dir)
        if cell.data_fraction != 1.0:
            write_subset(self.setup.finetune_data, cell.data_fraction, cell.seed, data)
        resume = self.resume_point(cell, cell_dir)
        earlier_s = None if resume is None else earlier_seconds(cell_dir, resume)
        resumed_step = None if resume is None else global_step(resume / "trainer_state.json")
        with open(cell_dir / ATTEMPTS, "a") as f:
            f.write(json.dumps({"start": time.time(), "earlier_s": earlier_s, "resumed_from_step": resumed_step})
                    + "\n")
        cmd, variables = self.command(cell, cell_dir, resume, free_port())
        log = cell_dir / "train.log"
        start = time.monotonic()
        with open(log, "w" if resume is None else "a") as f:
            if resume is not None:
                f.write(f"\n# resumed from {resume} (the interrupted run's log is above)\n")
            f.write(shell_line(cmd, variables) + "\n")
            f.flush()
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **variables}
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        train_s = time.monotonic() - start
        if rc != 0:
            raise CellFailed(f"cell {cell.id}: distill exited with {rc}; the end of {log}:\n{_tail(log)}")
        timings = {"train_s": round(train_s, 1)}
        if resume is not None:
            timings = resumed_timings(out, resumed_step, train_s, earlier_s)
        scores = self.evaluate(out, cell_dir)
        timings["eval_s"] = round(time.monotonic() - start - train_s, 1)
        prune_student(out, keep_weights=self.keep_checkpoints)
        return Outcome(scores, timings)
