"""Fig. 7 over seeds: %ExAccErr (Eq. 11) of an out dir's SFT, KD, KD + TPA and Align-TI students.

    python -m aligntI_patch.experiments exposure --out DIR --epochs E [--seeds N] [--family describe]

Per seed, the students of the four cells at E epochs (run with `--keep-checkpoints`: the weights are needed)
go through `aligntI_patch.exposure_bias` against DIR's teacher on the same prompts: a seeded subset of the test
split's questions of one family (`describe` by default, the only family with long answers), the same for
every seed, so that seeds differ only in the students' training. Each seed's result is
DIR/exposure/<family>-L<L>-N<prompts>-ep<E>-seed<S>/exposure_bias.json, reused when present. Then, over
seeds: the mean %ExAccErr curve per student with its 95 % t band (DIR/exposure/fig7-<same name>.png),
%ExAccErr at l = L per student, and paired differences (same seed) for the paper's claim that TPA lowers
exposure-bias error (a `-` sign: it does).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aligntI_patch.experiments.grids import cell_id
from aligntI_patch.experiments.plots import band_plot
from aligntI_patch.experiments.stats import Estimate, mean_interval, paired_difference

logger = logging.getLogger(__name__)

FIG7_RECIPES = ("sft", "kd", "kd_tpa", "aligntI")
# (a, b, what a - b measures); the paper: TPA lowers %ExAccErr, so each difference should be negative
FIG7_CLAIMS = (("kd_tpa", "kd", "TPA added to vanilla KD"), ("aligntI", "kd", "Align-TI against vanilla KD"),
               ("aligntI", "sft", "Align-TI against SFT"))


def family_questions(world: Path, split: str, family: str, dest: Path) -> Path:
    """Write the `family` questions of the world's `split` to `dest` (question jsonl); an unknown family is an error."""
    from llava.generation import read_questions

    source = world / f"{split}_questions.jsonl"
    rows = read_questions(source)
    kept = [r for r in rows if r.get("family") == family]
    if not kept:
        families = sorted({r.get("family") for r in rows} - {None})
        raise ValueError(f"{source} has no {family!r} questions (its families: {families})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    return dest


def student_dir(out: Path, recipe: str, epochs: float, seed: int) -> Path:
    return out / "cells" / cell_id(recipe, {}, epochs, 1.0, seed) / "student"


def has_weights(student: Path) -> bool:
    return any(student.glob("model*.safetensors"))


def run_seed(out: Path, epochs: float, seed: int, recipes: tuple[str, ...], questions: Path, image_folder: Path,
             teacher: str, *, family: str, max_len: int, num_prompts: int, batch_size: int) -> Path | None:
    """exposure_bias.json of one seed's students (computed unless present); None when a student's weights are
    missing (the cell has not run, or ran without --keep-checkpoints)."""
    from aligntI_patch import exposure_bias

    dest = out / "exposure" / f"{family}-L{max_len}-N{num_prompts}-ep{epochs:g}-seed{seed}"
    if (dest / "exposure_bias.json").is_file():
        return dest
    students = {r: student_dir(out, r, epochs, seed) for r in recipes}
    missing = [str(p) for p in students.values() if not has_weights(p)]
    if missing:
        logger.warning("seed %d skipped: no weights in %s (finished cells run with --keep-checkpoints are needed)",
                       seed, ", ".join(missing))
        return None
    argv = ["--teacher-path", teacher, "--question-file", str(questions), "--image-folder", str(image_folder),
            "--max-len", str(max_len), "--num-prompts", str(num_prompts), "--batch-size", str(batch_size),
            "--output-dir", str(dest), "--seed", "0"]  # the same prompts and sampling seed for every student seed
    for recipe, path in students.items():
        argv += ["--student-path", str(path), "--name", recipe]
    exposure_bias.main(argv)
    return dest


def at_last_step(results: dict[int, dict]) -> dict[str, dict[int, float]]:
    """{student: {seed: %ExAccErr at l = L}} from {seed: exposure_bias.json content}."""
    values: dict[str, dict[int, float]] = {}
    for seed, result in results.items():
        for name, row in result["students"].items():
            values.setdefault(name, {})[seed] = row["ExAccErr"][-1]
    return values


def mean_curves(results: dict[int, dict]) -> dict[str, list[Estimate]]:
    """{student: [Estimate over seeds] per step l = 1..L}."""
    names = list(dict.fromkeys(n for r in results.values() for n in r["students"]))  # the recipes' order
    curves = {}
    for name in names:
        rows = [r["students"][name]["ExAccErr"] for r in results.values() if name in r["students"]]
        curves[name] = [mean_interval([row[t] for row in rows]) for t in range(min(map(len, rows)))]
    return curves


def write_plot(path: Path, curves: dict[str, list[Estimate]], title: str) -> None:
    def decorate(ax) -> None:
        ax.axhline(0.0, color="gray", linewidth=0.8)
        # steps where the teacher's own prefixes leave E(l) near 0 (a fixed opening) give ratios of thousands
        # of %: linear up to 100 %, logarithmic beyond, so that they do not flatten the rest
        ax.set_yscale("symlog", linthresh=100)

    band_plot(path, {f"{name} (n={curve[0].n})": (list(range(1, len(curve) + 1)), curve)
                     for name, curve in curves.items()},
              "generation step l", "%ExAccErr (Eq. 11)", title, decorate)


def summary(results: dict[int, dict], max_len: int) -> str:
    """Markdown: %ExAccErr at l = L per student (mean ± 95 % t over seeds) and the claims' paired differences."""
    values = at_last_step(results)
    lines = [f"%ExAccErr at l = {max_len}, mean ± 95 % t interval over seeds {sorted(results)}:", "",
             "| student | seeds | %ExAccErr |", "|---|---|---|"]
    lines += [f"| {name} | {len(v)} | {mean_interval(list(v.values())).format()} |" for name, v in values.items()]
    lines += ["", "Paired differences (same seed), a − b; the paper: TPA lowers it (sign `-`):", "",
              "| a − b | what | seeds | difference | sign |", "|---|---|---|---|---|"]
    for a, b, says in FIG7_CLAIMS:
        d = paired_difference(values.get(a, {}), values.get(b, {}))
        if d is not None:
            lines.append(f"| {a} − {b} | {says} | {d.n} | {d.format()} | {d.sign()} |")
    return "\n".join(lines) + "\n"


def exposure_over_seeds(out: str | Path, epochs: float, seeds: list[int], family: str = "describe",
                        recipes: tuple[str, ...] = FIG7_RECIPES, max_len: int = 48, num_prompts: int = 200,
                        batch_size: int = 16) -> str:
    """Run (or reuse) each seed's exposure analysis, write the plot and summary.md; return the markdown."""
    out = Path(out)
    setup = json.loads((out / "setup.json").read_text())
    world = Path(setup["world"])
    split = setup.get("test_split", "test")
    questions = family_questions(world, split, family, out / "exposure" / f"{split}_{family}_questions.jsonl")
    results = {}
    for seed in seeds:
        dest = run_seed(out, epochs, seed, recipes, questions, world / "images", setup["teacher"], family=family,
                        max_len=max_len, num_prompts=num_prompts, batch_size=batch_size)
        if dest is not None:
            results[seed] = json.loads((dest / "exposure_bias.json").read_text())
    if not results:
        raise FileNotFoundError(f"no seed of {seeds} has the weights of all of {list(recipes)} at {epochs:g} epochs "
                                f"in {out}/cells: run those cells with --keep-checkpoints first")
    name = f"{family}-L{max_len}-N{num_prompts}-ep{epochs:g}"
    plot = out / "exposure" / f"fig7-{name}.png"
    write_plot(plot, mean_curves(results), f"%ExAccErr, {family} prompts of {split}, ep{epochs:g}, "
                                           f"mean ± 95 % t over {len(results)} seeds")
    text = summary(results, max_len) + f"\n![Fig. 7 over seeds]({plot.name})\n"
    (out / "exposure" / f"summary-{name}.md").write_text(text)
    return text
