"""Command line of the experiment runner (see the package docstring and docs/reproduction.md).

    python -m aligntI_patch.experiments run --grid NAME --seeds N --out DIR [--epochs E] [--only RECIPE] [--dry-run]
    python -m aligntI_patch.experiments report --out DIR
    python -m aligntI_patch.experiments exposure --out DIR --epochs E [--seeds N] [--family describe]
    python -m aligntI_patch.experiments irs --out DIR [--seeds N] [--num-pairs 1000]
    python -m aligntI_patch.experiments rescore --out DIR [--val-split NAME[=N]] [--test-split NAME[=N]]
    python -m aligntI_patch.experiments status --out DIR
    python -m aligntI_patch.experiments grids
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from aligntI_patch.experiments.cell import DistillBackend
from aligntI_patch.experiments.context import (
    LAUNCHERS,
    REPO,
    build_command,
    ensure_cache,
    ensure_splits,
    missing_parts,
    resolve_setup,
    setup_from_record,
)
from aligntI_patch.experiments.exposure import FIG7_RECIPES, exposure_over_seeds
from aligntI_patch.experiments.grids import GRID_NAMES, build_grid, expand
from aligntI_patch.experiments.irs_seeds import irs_over_seeds
from aligntI_patch.experiments.lmms_scorer import parse_tasks
from aligntI_patch.experiments.report import write_report
from aligntI_patch.experiments.rescore import rescore
from aligntI_patch.experiments.runner import dry_run, run_grid
from aligntI_patch.experiments.status import status
from llava.tiny.preset import STUDENT_STAGES


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _split(text: str, parser: argparse.ArgumentParser) -> tuple[str, int | None]:
    """--test-split / --val-split NAME[=N] -> (NAME, N or None)."""
    name, _, n = text.partition("=")
    if not name or (n and not (n.isdigit() and int(n) > 0)):
        parser.error(f"split {text!r}: expected NAME or NAME=N with N >= 1")
    return name, int(n) if n else None


def _task_list(text: str) -> tuple[str, ...]:
    try:
        return parse_tasks(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train and score the cells of a grid (finished cells are skipped)")
    p.add_argument("--grid", required=True, choices=GRID_NAMES, help="the grid to run")
    p.add_argument("--out", required=True, help="out dir: cells/, results.jsonl, report.md (shared by grids)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    seeds.add_argument("--seed-list", type=_seed_list, help="explicit seeds, e.g. 3,4 (instead of --seeds)")
    p.add_argument("--epochs", type=float, default=STUDENT_STAGES["finetune"]["epochs"],
                   help="student epochs of every cell (default: the main job's, %(default)g; the budget grid sets "
                        "its own)")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="share of finetune.json each student sees (default 1; the data_fraction grid sets its own)")
    p.add_argument("--only", action="append", default=[], metavar="RECIPE", help="keep the rows of these recipes")
    p.add_argument("--dry-run", action="store_true", help="print the commands; train nothing, write nothing")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each student's final weights (default: "
                   "deleted after scoring; trainer checkpoints always are; logs and recipe.json stay)")
    p.add_argument("--keep-going", action="store_true", help="after a failed cell, run the others (then fail)")
    p.add_argument("--root", default=str(REPO / "playground" / "tiny"),
                   help="tiny preset cache, built there when missing (default: the repository's playground/tiny)")
    p.add_argument("--backbone", default="qwen2", choices=["qwen2", "qwen3"], help="LLM family of the preset (default qwen2)")
    p.add_argument("--teacher", help="teacher checkpoint dir instead of the preset's")
    p.add_argument("--pretrain", help="student pretrain-stage checkpoint dir (full LLaVA-Qwen) instead of the preset's")
    p.add_argument("--world", help="tiny-world dir (finetune.json, images/, val/test questions) instead of the preset's")
    p.add_argument("--vision-tower", help="SigLIP dir (default: the preset's with its pretrain, else the checkpoint's)")
    p.add_argument("--model", help="--launcher script: the student's LLM (dir or hub id); --pretrain is then "
                   "pretrain.sh's output dir (mm_projector.safetensors)")
    p.add_argument("--data", help="finetune data, LLaVA's json (default: the world's finetune.json)")
    p.add_argument("--image-folder", help="images of --data (default: the world's images/)")
    p.add_argument("--tasks", type=_task_list, default=(), metavar="TASK[:METRIC[:FILTER]][*SCALE],...",
                   help="score with these lmms-eval tasks as the test split instead of the world's questions "
                        "(the value x SCALE, default 100, is the %% in the report; e.g. gqa,pope,"
                        "mme:mme_perception_score*0.05)")
    p.add_argument("--val-tasks", type=_task_list, default=(), metavar="TASKS",
                   help="lmms-eval tasks scored as the val split (the budget grid chooses on them)")
    p.add_argument("--include-path", help="lmms-eval --include_path: a folder of task YAMLs of your own")
    p.add_argument("--lmms-args", default="", help="more lmms-eval flags, split as a shell would (e.g. '--limit "
                   "200'; part of the setup: every number of the out dir is scored alike)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="cpu",
                   help="cpu (default): python --use_cpu; deepspeed: the deepspeed launcher on --num_gpus GPUs; "
                        "script: scripts/v1_5/distill_aligntI.sh at full scale (needs --model, --pretrain, --teacher, "
                        "--vision-tower, --data, --image-folder; BATCH, GRAD_ACC, LR, ... from your environment)")
    p.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                   help="GPUs for --launcher deepspeed/script and lmms-eval (default: all visible)")
    p.add_argument("--ds-config", help="DeepSpeed config for --launcher deepspeed (default scripts/zero2.json)")
    p.add_argument("--extra-args", default="", help="more distill flags for every cell, split as a shell would "
                   "(they enter the cell ids)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="batch of the val/test scoring (default 32)")
    p.add_argument("--test-split", default="test", metavar="NAME[=N]",
                   help="the world's split scored as test (default test, 86 questions per family); NAME=N adds it "
                        "when missing, drawn like test (e.g. test_large=4200: 600 per family); fixed per out dir")
    p.add_argument("--val-split", default="val", metavar="NAME[=N]",
                   help="the world's split scored as val (default val, 43 questions per family), as --test-split "
                        "(e.g. val_large=4200); fixed per out dir (`rescore` changes it for the finished cells)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m aligntI_patch.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    rep = sub.add_parser("report", help="write DIR/report.md and DIR/<grid>.png from an out dir, print the markdown")
    rep.add_argument("--out", required=True, help="the out dir of `run`")
    exp = sub.add_parser("exposure", help="Fig. 7 over seeds: %%ExAccErr of the sft, kd, kd_tpa and aligntI cells "
                         "(kept checkpoints) -> DIR/exposure/")
    exp.add_argument("--out", required=True, help="the out dir of `run`")
    exp.add_argument("--epochs", type=float, required=True, help="the cells' student epochs (the chosen budget)")
    seeds = exp.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    seeds.add_argument("--seed-list", type=_seed_list, help="explicit seeds, e.g. 3,4 (instead of --seeds)")
    exp.add_argument("--family", default="describe", help="question family of the prompts (default describe, the "
                     "one with long answers)")
    exp.add_argument("--recipes", default=",".join(FIG7_RECIPES), help="the students' recipes, comma-separated "
                     "(default %(default)s)")
    exp.add_argument("--max-len", type=int, default=48, help="generation steps L (default 48)")
    exp.add_argument("--num-prompts", type=int, default=200, help="prompts, a seeded subset (default 200)")
    exp.add_argument("--batch-size", type=int, default=16)
    irs = sub.add_parser("irs", help="Fig. 4 over seeds: the teacher's IRS per layer, both pairings, for several "
                         "pairing seeds -> DIR/irs/")
    irs.add_argument("--out", required=True, help="the out dir of `run` (its setup.json names teacher and world)")
    seeds = irs.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=5, help="pairing seeds 0..N-1 (default 5)")
    seeds.add_argument("--seed-list", type=_seed_list, help="explicit seeds, e.g. 3,4 (instead of --seeds)")
    irs.add_argument("--num-pairs", type=int, default=1000, help="pairs per pairing and seed (default: the "
                     "paper's 1000)")
    irs.add_argument("--batch-size", type=int, default=8)
    rs = sub.add_parser("rescore", help="score the teacher and the finished cells (kept weights) on other splits "
                        "of the world, e.g. a larger val; stop the runners first")
    rs.add_argument("--out", required=True, help="the out dir of `run`")
    rs.add_argument("--val-split", metavar="NAME[=N]", help="the new split scored as val (NAME=N adds it when "
                    "missing, e.g. val_large=4200)")
    rs.add_argument("--test-split", metavar="NAME[=N]", help="the new split scored as test")
    rs.add_argument("--eval-batch-size", type=int, default=32)
    st = sub.add_parser("status", help="per grid: cells finished / started / waiting, time spent and left")
    st.add_argument("--out", required=True, help="the out dir of `run`")
    sub.add_parser("grids", help="list the grids, their rows and claims (iva_layer for a 4-layer teacher)")
    return parser


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if not seeds:
        parser.error("no seeds: give --seeds N (N >= 1) or --seed-list")
    if not 0 < args.data_fraction <= 1 or args.epochs <= 0:
        parser.error("--data-fraction must lie in (0, 1] and --epochs be > 0")
    own_world = args.world or (args.data and args.image_folder and args.tasks)  # nothing read from a world
    explicit = (args.teacher, args.pretrain, own_world)
    (test_split, n_test), (val_split, n_val) = _split(args.test_split, parser), _split(args.val_split, parser)
    if args.launcher == "script" and not all((args.model, *explicit, args.vision_tower)):
        parser.error("--launcher script needs --model, --pretrain, --teacher, --vision-tower and the data: --data "
                     "with --image-folder and lmms-eval --tasks (or a tiny --world)")
    if args.grid == "budget" and args.tasks and not args.val_tasks:
        parser.error("the budget grid chooses on the val split: give --val-tasks (never the test tasks)")
    try:
        setup = resolve_setup(args.root, args.backbone, args.teacher, args.pretrain, args.world,
                              vision_tower=args.vision_tower, launcher=args.launcher, num_gpus=args.num_gpus,
                              ds_config=args.ds_config, test_split=test_split, val_split=val_split,
                              model=args.model, data=args.data, image_folder=args.image_folder, tasks=args.tasks,
                              val_tasks=args.val_tasks, include_path=args.include_path,
                              lmms_args=tuple(shlex.split(args.lmms_args)))
    except ValueError as e:
        parser.error(str(e))
    grid = build_grid(args.grid, setup.teacher_layers())
    cells = expand(grid, seeds, args.epochs, args.data_fraction, tuple(args.only), tuple(shlex.split(args.extra_args)))
    backend = DistillBackend(setup, keep_checkpoints=args.keep_checkpoints, eval_batch_size=args.eval_batch_size)
    uses_preset = not all(explicit)
    if args.dry_run:
        if missing_parts(setup) and uses_preset:
            cmd, env = build_command(args.root, args.backbone, setup)
            sys.stdout.write(f"# build the preset's cache\nTINY_ROOT={env['TINY_ROOT']} TINY_BACKBONE="
                             f"{args.backbone} NUM_GPUS={env['NUM_GPUS']} EPOCHS={env['EPOCHS']} {shlex.join(cmd)}\n")
        dry_run(grid, cells, Path(args.out), backend, sys.stdout.write)
        return
    ensure_cache(setup, args.root, args.backbone, uses_preset)
    ensure_splits(setup, {"test": n_test, "val": n_val})
    run_grid(grid, cells, args.out, backend, keep_going=args.keep_going, write=sys.stdout.write)
    sys.stdout.write(f"done; the report: python -m aligntI_patch.experiments report --out {args.out}\n")


def run_rescore(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    record = Path(args.out) / "setup.json"
    if not record.is_file():
        parser.error(f"{record} not found: rescore works on the out dir of `run`")
    saved = json.loads(record.read_text())
    if saved.get("tasks"):
        parser.error("the cells of this out dir are scored by lmms-eval tasks: rescore changes the world's splits")
    changes, sizes = {}, {}
    for split, text in (("test", args.test_split), ("val", args.val_split)):
        if text:
            changes[f"{split}_split"], sizes[split] = _split(text, parser)
    if not changes:
        parser.error("give --val-split and/or --test-split: the new splits")
    setup = setup_from_record(saved.get("rescoring") or saved, **changes)
    ensure_splits(setup, sizes)
    rescore(args.out, DistillBackend(setup, eval_batch_size=args.eval_batch_size), sys.stdout.write)


def list_grids() -> None:
    for name in GRID_NAMES:
        grid = build_grid(name, teacher_layers=4)
        sys.stdout.write(f"{name} ({grid.paper}; {grid.split} split)\n")
        for v in grid.variants:
            sys.stdout.write(f"  {v.name}: --recipe {v.recipe}"
                             + "".join(f" --{k} {val}" for k, val in v.options.items())
                             + (f" (epochs {v.epochs:g})" if v.epochs else "")
                             + (f" (data {v.data_fraction:g})" if v.data_fraction is not None else "")
                             + (f"; the paper's avg: {v.paper}" if v.paper else "") + "\n")
        for c in grid.claims:
            sys.stdout.write(f"  claim {c.a} > {c.b}: {c.says}\n")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[experiments] %(message)s")
    if args.command == "run":
        run(args, parser)
    elif args.command == "report":
        sys.stdout.write(write_report(args.out))
    elif args.command == "rescore":
        run_rescore(args, parser)
    elif args.command == "status":
        sys.stdout.write(status(args.out))
    elif args.command == "exposure":
        seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
        recipes = tuple(r for r in args.recipes.split(",") if r)
        if not seeds or not recipes or args.max_len < 1:
            parser.error("exposure needs seeds, --recipes and --max-len >= 1")
        sys.stdout.write(exposure_over_seeds(args.out, args.epochs, seeds, args.family, recipes, args.max_len,
                                             args.num_prompts, args.batch_size))
    elif args.command == "irs":
        seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
        if not seeds or args.num_pairs < 1:
            parser.error("irs needs seeds and --num-pairs >= 1")
        sys.stdout.write(irs_over_seeds(args.out, seeds, args.num_pairs, args.batch_size))
    else:
        list_grids()


if __name__ == "__main__":
    main()
