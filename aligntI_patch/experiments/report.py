"""The report of an out dir: per grid, accuracy over seeds, the gap recovered, the paper's claims, a plot.

    python -m aligntI_patch.experiments report --out DIR      # writes DIR/report.md and DIR/<grid>.png

Design choices
- Everything comes from DIR's files (runner.py): grids/<grid>.json says which cells a grid holds and what the
  paper claims, results.jsonl gives their rows, teacher.json the teacher's. Nothing is recomputed.
- A grid reads one split: test, except `budget`, which reads val (the split that may choose a budget).
- A row is a variant at one setting (epochs, data fraction, extra flags); a variant run at several settings
  gets the setting in its label. Claims pair rows of the same setting, seed by seed.
- The SFT reference of the gap recovered is the `sft` cell of the same setting and seeds, whichever grid
  ran it; families where the teacher leads it by less than 10 points are listed instead, with the lead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from aligntI_patch.experiments.grids import cell_id
from aligntI_patch.experiments.runner import read_rows
from aligntI_patch.experiments.stats import (
    MIN_TEACHER_LEAD,
    Estimate,
    gap_recovered,
    mean_interval,
    paired_bootstrap,
    paired_difference,
)
from llava.tiny.questions import FAMILIES

Setting = tuple  # (epochs, data_fraction, extra_args)


@dataclass
class Group:
    """One row of a grid's table: a variant at one setting, its values per column and seed."""

    variant: str
    recipe: str
    setting: Setting
    series: str | None = None
    x: float | None = None
    label: str = ""
    values: dict[str, dict[int, float]] = field(default_factory=dict)  # column -> seed -> accuracy %
    cells: dict[int, str] = field(default_factory=dict)  # seed -> cell id of the finished cells

    def estimate(self, column: str) -> Estimate | None:
        seeds = self.values.get(column, {})
        return mean_interval([seeds[s] for s in sorted(seeds)]) if seeds else None


def _setting(entry: dict) -> Setting:
    return entry["epochs"], entry["data_fraction"], tuple(entry.get("extra_args", ()))


def _setting_label(setting: Setting) -> str:
    epochs, fraction, extra = setting
    return ", ".join([f"ep{epochs:g}", *([f"{100 * fraction:g}% data"] if fraction != 1 else []),
                      *([" ".join(extra)] if extra else [])])


def build_groups(manifest: dict, rows: dict[str, dict]) -> list[Group]:
    """The grid's rows in variant order then setting, with the values of its split (finished cells only)."""
    groups: dict[tuple, Group] = {}
    for e in manifest["cells"]:
        key = (e["variant"], _setting(e))
        group = groups.setdefault(key, Group(e["variant"], e["recipe"], key[1], e.get("series"), e.get("x")))
        row = rows.get(e["cell"])
        if row is not None:
            group.cells[e["seed"]] = e["cell"]
        for column, value in (row or {}).get(manifest["split"], {}).items():
            group.values.setdefault(column, {})[e["seed"]] = value
    settings_of: dict[str, set] = {}
    for variant, setting in groups:
        settings_of.setdefault(variant, set()).add(setting)
    for (variant, setting), g in groups.items():
        g.label = variant if len(settings_of[variant]) == 1 else f"{variant} ({_setting_label(setting)})"
    order = {v: i for i, v in enumerate(manifest["variants"])}
    return sorted(groups.values(), key=lambda g: (order.get(g.variant, len(order)), g.setting))


def columns_of(groups: list[Group], teacher: dict) -> list[str]:
    present = set(teacher) | {c for g in groups for c in g.values}
    present.discard("overall")
    return [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES)) + ["overall"]


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def results_table(groups: list[Group], teacher: dict, columns: list[str], paper: dict[str, str] | None = None) -> str:
    """Mean ± interval per row and column; with `paper` ({variant: the paper's average}) a column of those
    beside the row's label (comparable in ordering, not in level: six real benchmarks)."""
    paper_col = [["-"]] if paper else [[]]
    lines = [["teacher", *paper_col[0], "-", *(f"{teacher[c]:.1f}" if c in teacher else "-" for c in columns)]]
    for g in groups:
        n = max((len(v) for v in g.values.values()), default=0)
        own = [paper.get(g.variant, "-")] if paper else []
        lines.append([g.label, *own, str(n), *(e.format() if (e := g.estimate(c)) else "-" for c in columns)])
    return markdown_table(["model", *(["paper avg"] if paper else []), "seeds", *columns], lines)


def sft_reference(setting: Setting, seeds: set[int], rows: dict[str, dict], split: str) -> dict[str, dict[int, float]]:
    """The `sft` cells' values at `setting` for `seeds` (column -> seed -> accuracy), from any grid."""
    epochs, fraction, extra = setting
    values: dict[str, dict[int, float]] = {}
    for seed in seeds:
        row = rows.get(cell_id("sft", {}, epochs, fraction, seed, extra))
        for column, value in (row or {}).get(split, {}).items():
            values.setdefault(column, {})[seed] = value
    return values


def _mean(values: dict[int, float], seeds: set[int]) -> float:
    return sum(values[s] for s in seeds) / len(seeds)


def gap_section(groups: list[Group], rows: dict[str, dict], teacher: dict, columns: list[str], split: str) -> str:
    """Gap recovered per family (teacher lead >= 10 points over SFT) and the families left out, per setting."""
    parts = []
    for setting in sorted({g.setting for g in groups}):
        members = [g for g in groups if g.setting == setting and g.recipe != "sft" and g.values]
        if not members:  # no student to compare at this setting yet
            continue
        seeds = {s for g in members for v in g.values.values() for s in v}
        sft = sft_reference(setting, seeds, rows, split)
        if not sft:
            parts.append(f"Gap recovered ({_setting_label(setting)}): no `sft` cell at this setting in this out dir "
                         "(run `--only sft` of any grid with the same --epochs / --data-fraction).")
            continue
        lead = {c: teacher[c] - _mean(sft[c], set(sft[c])) for c in columns if c in teacher and c in sft}
        kept = [c for c in columns if c in lead and lead[c] >= MIN_TEACHER_LEAD]
        lines = []
        for g in members:
            cells = []
            for c in kept:
                common = set(g.values.get(c, {})) & set(sft[c])
                gap = gap_recovered(_mean(g.values[c], common), _mean(sft[c], common), teacher[c]) if common else None
                cells.append("-" if gap is None else f"{round(100 * gap)} %")  # round: no "-0 %"
            lines.append([g.label, *cells])
        left_out = ", ".join(f"{c} (lead {lead[c]:+.1f})" for c in columns if c in lead and c not in kept)
        text = f"Gap recovered, (student - SFT) / (teacher - SFT), {_setting_label(setting)}:\n\n"
        text += (markdown_table(["model", *kept], lines) if kept
                 else "no family where the teacher leads SFT by 10 points.")
        if left_out:
            text += f"\n\nLeft out (the teacher leads SFT by less than {MIN_TEACHER_LEAD:g} points: no signal): {left_out}."
        parts.append(text)
    return "\n\n".join(parts)


def question_scores(out: Path, group: Group, split: str) -> dict[int, dict[str, float]]:
    """{seed: {question_id: score}} of a group's cells that saved per-question scores (cell.py)."""
    scores = {}
    for seed, cell in group.cells.items():
        path = out / "cells" / cell / f"scores_{split}.json"
        if path.is_file():
            scores[seed] = json.loads(path.read_text())
    return scores


VERDICTS = {"+": "holds", "-": "does not hold", "?": "inconclusive"}  # by the overall difference's t interval


def verdict(overall: Estimate) -> str:
    """The claim's verdict (docs/reproduction.md): holds when the paired difference's 95 % interval over seeds
    lies above 0, does not hold below 0, inconclusive when it spans 0; none from a single seed."""
    return VERDICTS.get(overall.sign(), "none (one seed)")


def claims_section(manifest: dict, groups: list[Group], columns: list[str], out: Path | None = None) -> str:
    """Paired differences a - b (same seed) for each claim at each setting where both rows exist; with the cells'
    per-question scores also a paired bootstrap of overall over seeds and questions."""
    by_key = {(g.variant, g.setting): g for g in groups}
    lines = []
    for claim in manifest["claims"]:
        for setting in sorted({g.setting for g in groups}):
            a, b = by_key.get((claim["a"], setting)), by_key.get((claim["b"], setting))
            if a is None or b is None:
                continue
            diffs = [paired_difference(a.values.get(c, {}), b.values.get(c, {})) for c in columns]
            overall = diffs[-1]
            if overall is None:
                continue
            where = f" ({_setting_label(setting)})" if len({g.setting for g in groups}) > 1 else ""
            boot = None
            if out is not None:
                split = manifest["split"]
                boot = paired_bootstrap(question_scores(out, a, split), question_scores(out, b, split))
            boot_cells = [boot.format(), boot.sign(), f"{boot.n_seeds} x {boot.n_questions}"] if boot else ["-"] * 3
            lines.append([f"{claim['a']} − {claim['b']}{where}", claim["says"], str(overall.n), overall.sign(),
                          verdict(overall), *(d.format() if d else "-" for d in diffs), *boot_cells])
    if not lines:
        return "Paired differences: no claim has both of its rows finished yet."
    header = ["difference", "the paper", "seeds", "sign", "verdict", *columns, "overall, bootstrap 95 %", "sign",
              "seeds x questions"]
    return ("Paired differences (same seed), mean ± 95 % t interval over seeds; sign: + / - when the interval "
            "excludes 0, ? when it spans 0; the verdict reads the overall column's sign. The bootstrap column "
            "resamples seeds and questions together (paired): with one seed it holds the test set's noise only, "
            "not the training run's.\n\n"
            + markdown_table(header, lines))


BUDGET_TOLERANCE = 1.0  # val points: the chosen budget is the fewest epochs within this of the highest mean


def budget_curves(groups: list[Group]) -> dict[str, dict[float, float]]:
    """{recipe: {epochs: mean val overall over the finished seeds}} of the budget grid (every recipe of the
    grid, with an empty curve before its first cell finishes)."""
    curves: dict[str, dict[float, float]] = {}
    for g in groups:
        seeds = g.values.get("overall")
        curve = curves.setdefault(g.recipe, {})
        if seeds:
            curve[g.setting[0]] = sum(seeds.values()) / len(seeds)
    return curves


def choose_budget(curves: dict[str, dict[float, float]],
                  tolerance: float = BUDGET_TOLERANCE) -> tuple[float, float] | None:
    """(chosen, highest) epochs on the val curves: over the budgets every recipe finished, the mean over recipes
    (each recipe weighs the same), the highest, and the fewest epochs within `tolerance` points of it (more
    epochs cost time in every cell and in the main job for less than the val split can tell apart)."""
    complete = set.intersection(*(set(c) for c in curves.values())) if curves else set()
    if not complete:
        return None
    means = {e: sum(c[e] for c in curves.values()) / len(curves) for e in sorted(complete)}
    highest = max(means, key=means.get)  # a tie goes to the fewer epochs
    return min(e for e in complete if means[e] >= means[highest] - tolerance), highest


def gain_source(curve: dict[float, float], sft: dict[float, float], tolerance: float = BUDGET_TOLERANCE) -> str:
    """Where a recipe's gain over SFT comes from on the val curves: *sooner* (it reaches SFT's peak at fewer
    epochs than SFT), *higher* (its peak exceeds SFT's by `tolerance` points or more), both, or neither."""
    shared = sorted(set(curve) & set(sft))
    if not shared:
        return "no budget shared with `sft`"
    sft_at = max(shared, key=lambda e: sft[e])
    own_at = max(shared, key=lambda e: curve[e])
    reach = next((e for e in shared if curve[e] >= sft[sft_at]), None)
    sooner = reach is not None and reach < sft_at
    higher = curve[own_at] - sft[sft_at] >= tolerance
    verdict = {(True, True): "both sooner and higher", (True, False): "sooner", (False, True): "higher",
               (False, False): "neither sooner nor higher"}[sooner, higher]
    reached = f"reaches it at ep{reach:g}" if reach is not None else "never reaches it"
    return (f"peak {curve[own_at]:.1f} at ep{own_at:g} against SFT's {sft[sft_at]:.1f} at ep{sft_at:g} "
            f"({curve[own_at] - sft[sft_at]:+.1f}); {reached}: **{verdict}**")


def budget_section(groups: list[Group]) -> str:
    """The val curves per recipe, the chosen budget and where each recipe's gain over SFT comes from."""
    curves = budget_curves(groups)
    if not any(curves.values()):
        return ""
    epochs = sorted({e for c in curves.values() for e in c})
    seeds = {(g.recipe, g.setting[0]): len(g.values.get("overall", {})) for g in groups}
    most = max(seeds.values(), default=0)

    def mean(recipe: str, e: float) -> str:  # a mean over fewer seeds than the others says so
        n = seeds[recipe, e]
        return f"{curves[recipe][e]:.1f}" + (f" (n={n})" if n < most else "")

    lines = [[recipe, *(mean(recipe, e) if e in c else "-" for e in epochs)] for recipe, c in curves.items()]
    text = "Mean val overall per budget (over the finished seeds):\n\n" + markdown_table(
        ["recipe", *(f"ep{e:g}" for e in epochs)], lines)
    choice = choose_budget(curves)
    if choice is None:
        text += "\n\nNo budget has a finished cell of every recipe yet: none is chosen."
    else:
        chosen, highest = choice
        text += (f"\n\nChosen budget: **{chosen:g} epochs**, the fewest whose mean over the recipes is within "
                 f"{BUDGET_TOLERANCE:g} point of the highest ({highest:g} epochs), among the budgets every recipe "
                 "finished (val split only; the test split never chooses).")
        if any(n < most for n in seeds.values()):
            text += (f" **Interim**: some means rest on fewer seeds than the {most} of the others (n=...), so "
                     "the choice may change as their cells finish.")
    others = [r for r, c in curves.items() if r != "sft" and c]
    if curves.get("sft") and others:
        text += "\n\nWhere the gain over SFT comes from (val):\n" + "".join(
            f"\n- {r}: {gain_source(curves[r], curves['sft'])}" for r in others)
    return text


def load_out(out: Path) -> tuple[list[dict], dict[str, dict], dict]:
    """(grid manifests, rows by cell id, teacher {split: {family: %}}) of an out dir."""
    manifests = [json.loads(p.read_text()) for p in sorted((out / "grids").glob("*.json"))]
    if not manifests:
        raise FileNotFoundError(f"{out} has no grids/*.json: run `python -m aligntI_patch.experiments run` first")
    teacher_path = out / "teacher.json"
    teacher = json.loads(teacher_path.read_text()) if teacher_path.is_file() else {}
    return manifests, read_rows(out), teacher


def grid_section(manifest: dict, rows: dict[str, dict], teacher_all: dict, out: Path) -> str:
    """The markdown of one grid (and its PNG written beside report.md)."""
    from aligntI_patch.experiments.plots import plot_grid

    split = manifest["split"]
    teacher = teacher_all.get(split, {})
    groups = build_groups(manifest, rows)
    columns = columns_of(groups, teacher)
    finished = [rows[e["cell"]] for e in manifest["cells"] if e["cell"] in rows]
    hours = sum(r.get("wall_s", 0) for r in finished) / 3600
    head = (f"## {manifest['grid']}: {manifest['paper']}\n\n{len(finished)} of {len(manifest['cells'])} cells "
            f"finished, {hours:.2f} h of training and scoring in all (shared cells counted in every grid). "
            f"{split.capitalize()} split, accuracy %, mean ± 95 % t interval over seeds (n=1: no interval).")
    parts = [head, results_table(groups, teacher, columns, manifest.get("paper_rows"))]
    if manifest["grid"] == "budget":
        parts.append(budget_section(groups))
    parts += [gap_section(groups, rows, teacher, columns, split), claims_section(manifest, groups, columns, out)]
    if plot_grid(manifest, groups, teacher, columns, out / f"{manifest['grid']}.png"):
        parts.append(f"![{manifest['grid']}]({manifest['grid']}.png)")
    return "\n\n".join(p for p in parts if p)


def _scored_on(setup: dict) -> str:
    """What the rows' test and val numbers are, from setup.json."""
    if setup.get("tasks"):
        return f"lmms-eval tasks {', '.join(setup['tasks'])} (test), {', '.join(setup.get('val_tasks', [])) or '-'} (val)"
    return f"the world's splits {setup.get('test_split', 'test')} (test), {setup.get('val_split', 'val')} (val)"


def write_report(out: str | Path) -> str:
    """DIR/report.md (and DIR/<grid>.png) from an out dir; returns the markdown."""
    out = Path(out)
    manifests, rows, teacher = load_out(out)
    setup = json.loads((out / "setup.json").read_text()) if (out / "setup.json").is_file() else {}
    commits = sorted({r.get("commit", "?") for r in rows.values()})
    hosts = sorted({r.get("host", "?") for r in rows.values()})
    student = f"student LLM `{setup['model']}`, " if setup.get("model") else "student "
    head = ("# Miniature reproduction: results\n\n"
            f"Teacher `{setup.get('teacher', '?')}`, {student}pretrain `{setup.get('pretrain', '?')}`, world "
            f"`{setup.get('world', '?')}`, scored on {_scored_on(setup)}; commits {', '.join(commits) or '-'}; "
            f"hosts {', '.join(hosts) or '-'}.")
    text = "\n\n".join([head, *(grid_section(m, rows, teacher, out) for m in manifests)]) + "\n"
    (out / "report.md").write_text(text)
    return text
