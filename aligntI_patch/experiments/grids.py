"""The grids of the miniature reproduction: one per table or figure of the paper, plus the training budget.

A grid is a list of variants (a recipe of `aligntI_patch/recipes.py` plus distillation flags) and the claims
the paper makes about them, each a paired difference "a - b > 0". Expanding a grid over seeds gives cells.

Design choices
- A cell's id names what it trains, not the grid that asked for it: recipe, the flags that differ from the
  recipe's own values, student epochs, data fraction and seed (`kd-ep1-seed0`). Grids that share a cell
  (Table 3's FKL row is Table 16's vanilla KD; Fig. 6's nucleus d=4 is Align-TI itself) train it once.
- Flags equal to the recipe's value or to the entry's default are dropped from the id, so the same training
  run always gets the same id however a grid spells it.
- `iva_layer` takes Table 7's five equidistant depths (0, 1/4, 2/4, 3/4, 4/4 of the teacher's layers; the
  paper's 0, 7, 14, 21, 27 of 28) and the IRS-chosen layer (`--iva_layer auto`, Eq. 4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from aligntI_patch.recipes import RECIPES, resolve_recipe

GRID_NAMES = ("loss_terms", "divergences", "iva_layer", "iva_weights", "tpa_sampling", "budget", "data_fraction")
BUDGET_EPOCHS = (1, 2, 3, 4, 6, 8)
DATA_FRACTIONS = (0.25, 0.5, 1.0)
TPA_SAMPLES = (1, 2, 4, 8)
AUTO_LAYER = "IRS (auto)"


@dataclass(frozen=True)
class Variant:
    """One row of a grid: a recipe, the distillation flags it adds, and (budget, data) overrides."""

    name: str  # the row's label, unique in its grid
    recipe: str
    options: dict = field(default_factory=dict)  # DistillArguments field -> value, e.g. {"tpa_num_samples": 2}
    epochs: float | None = None  # None: the run's --epochs
    data_fraction: float | None = None  # None: the run's --data-fraction
    series: str | None = None  # line plots: the curve this row belongs to ...
    x: float | None = None  # ... and its abscissa
    paper: str | None = None  # the paper's average over its six benchmarks for this row (None: not reported)


@dataclass(frozen=True)
class Claim:
    """The paper says `a` beats `b` (paired difference a - b, same seed); `says` is where and how much."""

    a: str
    b: str
    says: str


@dataclass(frozen=True)
class Grid:
    name: str
    paper: str
    variants: tuple[Variant, ...]
    claims: tuple[Claim, ...]
    split: str = "test"  # the split the report reads (budget: val, the split that may choose a budget)
    x_label: str | None = None  # set when the variants lie on curves (series, x)


@dataclass(frozen=True)
class Cell:
    """One training run: a variant of a grid at resolved epochs / data fraction, for one seed."""

    grid: str
    variant: str
    recipe: str
    options: dict
    epochs: float
    data_fraction: float
    seed: int
    extra_args: tuple[str, ...] = ()  # distill flags given to the whole run (--extra-args)

    @property
    def id(self) -> str:
        return cell_id(self.recipe, self.options, self.epochs, self.data_fraction, self.seed, self.extra_args)


def _num(value: float) -> str:
    return f"{value:g}"


def _same_value(a, b) -> bool:
    """Equal as the entry would parse them: 1 == 1.0 == "1", "auto" == "auto"."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def canonical_options(recipe: str, options: dict) -> dict:
    """`options` without the flags that equal the recipe's value or the entry's default (same run, same id)."""
    from dataclasses import fields

    from aligntI_patch.arguments import DistillArguments

    defaults = {f.name: f.default for f in fields(DistillArguments)}
    defaults.update(resolve_recipe(recipe, {}))
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown distillation options {unknown} (fields of aligntI_patch/arguments.py)")
    return {k: options[k] for k in sorted(options) if not _same_value(options[k], defaults[k])}


def cell_id(recipe: str, options: dict, epochs: float, data_fraction: float, seed: int,
            extra_args: tuple[str, ...] = ()) -> str:
    """`recipe[-flag=value...]-epE[-fracF][-xHASH]-seedS`: a directory name that says what the cell trains."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: one of {sorted(RECIPES)}")
    parts = [recipe, *(f"{k}={v}" for k, v in canonical_options(recipe, options).items()), f"ep{_num(epochs)}"]
    if data_fraction != 1.0:
        parts.append(f"frac{_num(data_fraction)}")
    if extra_args:
        parts.append("x" + hashlib.sha1("\0".join(extra_args).encode()).hexdigest()[:8])
    return "-".join([*parts, f"seed{seed}"])


def table7_layers(num_layers: int) -> list[int]:
    """Table 7's equidistant depths 0, 1/4, 2/4, 3/4, 4/4 of a teacher with `num_layers` decoder layers."""
    return sorted({min(k * num_layers // 4, num_layers - 1) for k in range(5)})


def _recipes(names: tuple[str, ...], paper: dict[str, str]) -> tuple[Variant, ...]:
    return tuple(Variant(n, n, paper=paper.get(n)) for n in names)


# the paper's AVG column (GQA, SQA, TextVQA, POPE, MME, MMB) per row of its ablations (Tables 3, 7, 8, 9, 16)
TABLE16 = {"sft": "64.3", "kd": "65.0", "sft_iva": "65.1", "kd_iva": "65.6", "kd_tpa": "66.4", "tpa_iva": "66.6",
           "aligntI": "66.7"}
TABLE3 = {"kd": "65.0", "rkl": "64.5", "jsd": "63.7", "gkd": "62.7"}  # rkl: MiniLLM's row; skew KL not in it
TABLE7 = ("63.7", "58.8", "63.9", "65.1", "64.6")  # layers at depth 0, 1/4, 2/4, 3/4, 4/4 (0, 7, 14, 21, 27)


def _loss_terms() -> Grid:
    """Tables 4 and 16: every combination of the terms the paper reports, from SFT to Align-TI (Eq. 8)."""
    terms = ("sft", "kd", "sft_iva", "kd_iva", "kd_tpa", "tpa_iva", "aligntI")
    claims = (
        Claim("aligntI", "kd", "Align-TI > vanilla KD (Fig. 1, Table 15: +1.7)"),
        Claim("kd", "sft", "vanilla KD > SFT (Table 16 rows 3 vs 1: +0.7)"),
        Claim("aligntI", "sft", "Align-TI > SFT (Table 4: +2.4)"),
        Claim("sft_iva", "sft", "IVA adds to SFT (Table 4: +0.8)"),
        Claim("kd_iva", "kd", "IVA adds to KD (Table 16: +0.6)"),
        Claim("kd_tpa", "kd", "TPA adds to KD (Table 16: +1.4)"),
        Claim("aligntI", "kd_tpa", "IVA adds to KD + TPA (Table 16: +0.3)"),
        Claim("aligntI", "kd_iva", "TPA adds to KD + IVA (Table 16: +1.1)"),
        Claim("aligntI", "tpa_iva", "KD adds to TPA + IVA (Table 16: +0.1)"),
    )
    return Grid("loss_terms", "Tables 4 and 16", _recipes(terms, TABLE16), claims)


def _divergences() -> Grid:
    """Table 3: vanilla KD (Eq. 2) with FKL, reverse KL, JSD, DistiLLM's skew KL, and the GKD baseline."""
    names = ("kd", "rkl", "jsd", "skew_kl", "gkd")
    paper = {"rkl": "+0.5", "jsd": "+1.3", "skew_kl": "not in Table 3", "gkd": "+2.3"}
    claims = tuple(Claim("kd", n, f"FKL (kd) beats {n} (Table 3: {paper[n]})") for n in names[1:])
    return Grid("divergences", "Table 3", _recipes(names, TABLE3), claims)


def _iva_layer(num_layers: int) -> Grid:
    """Table 7: SFT + IVA (Eq. 3) with alpha from fixed depths of the teacher or its highest-IRS layer (Eq. 4)."""
    layers = table7_layers(num_layers)
    depths = {k: [TABLE7[q] for q in range(5) if min(q * num_layers // 4, num_layers - 1) == k] for k in layers}
    variants = (*(Variant(f"layer {k}", "sft_iva", {"iva_layer": str(k)}, paper=" / ".join(depths[k]))
                  for k in layers),
                Variant(AUTO_LAYER, "sft_iva", paper=f"{TABLE7[3]} (its IRS layer, 3/4 depth)"))
    claims = tuple(Claim(AUTO_LAYER, f"layer {k}", "the highest-IRS layer is best (Table 7: 3/4 depth)") for k in layers)
    return Grid("iva_layer", "Table 7", variants, claims)


def _iva_weights() -> Grid:
    """Tables 8 and 9: SFT + IVA with the teacher's, the student's or uniform weights."""
    variants = (Variant("teacher", "sft_iva", paper="65.1"), Variant("student", "student_iva", paper="64.7"),
                Variant("uniform", "uniform_iva", paper="64.5"))
    claims = (Claim("teacher", "student", "teacher attention beats the student's (Table 8: +0.4)"),
              Claim("teacher", "uniform", "teacher weights beat uniform ones (Table 9: +0.6)"))
    return Grid("iva_weights", "Tables 8 and 9", variants, claims)


def _tpa_sampling() -> Grid:
    """Figure 6: Align-TI with greedy (top-d) or nucleus candidates for TPA (Eq. 7), d in 1, 2, 4, 8."""
    variants = tuple(Variant(f"{s} d={d}", "aligntI", {"tpa_sampling": s, "tpa_num_samples": d}, series=s, x=d,
                             paper=TABLE16["aligntI"] if (s, d) == ("nucleus", 4) else "figure only")
                     for s in ("greedy", "nucleus") for d in TPA_SAMPLES)
    claims = (*(Claim(f"nucleus d={d}", f"greedy d={d}", "nucleus beats greedy at low d (Fig. 6)") for d in (1, 2)),
              *(Claim(f"{s} d=4", f"{s} d=1", "accuracy grows with d (Fig. 6)") for s in ("greedy", "nucleus")),
              *(Claim(f"{s} d=8", f"{s} d=4", "plateau from d=4 (Fig. 6: about 0)") for s in ("greedy", "nucleus")))
    return Grid("tpa_sampling", "Figure 6", variants, claims, x_label="d (TPA samples per position)")


def _over(axis: str, values: tuple[float, ...], label) -> tuple[tuple[Variant, ...], tuple[Claim, ...]]:
    """sft, kd and aligntI at each value of `axis` (epochs or data_fraction), and the headline claims at each."""
    variants = tuple(Variant(f"{r} {label(v)}", r, series=r, x=v, **{axis: v})  # value-major: a grid cut short
                     for v in values for r in ("sft", "kd", "aligntI"))         # still compares the recipes
    claims = tuple(Claim(f"{a} {label(v)}", f"{b} {label(v)}", f"{a} > {b} (Table 15 at full budget)")
                   for v in values for a, b in (("aligntI", "kd"), ("kd", "sft"), ("aligntI", "sft")))
    return variants, claims


def _budget() -> Grid:
    """Not in the paper: SFT, KD and Align-TI over student epochs, read on the val split (issue 14)."""
    variants, claims = _over("epochs", BUDGET_EPOCHS, lambda v: f"ep{v:g}")
    return Grid("budget", "student epochs, not in the paper", variants, claims, split="val",
                x_label="student epochs")


def _data_fraction() -> Grid:
    """Not in the paper: SFT, KD and Align-TI on 25, 50 and 100 % of the finetune data (issue 14)."""
    variants, claims = _over("data_fraction", DATA_FRACTIONS, lambda v: f"{100 * v:g}%")
    return Grid("data_fraction", "share of the finetune data, not in the paper", variants, claims,
                x_label="fraction of the finetune data")


def build_grid(name: str, teacher_layers: int) -> Grid:
    """The grid `name` (one of GRID_NAMES); `teacher_layers` places the iva_layer grid's depths."""
    builders = {"loss_terms": _loss_terms, "divergences": _divergences, "iva_layer": lambda: _iva_layer(teacher_layers),
                "iva_weights": _iva_weights, "tpa_sampling": _tpa_sampling, "budget": _budget,
                "data_fraction": _data_fraction}
    if name not in builders:
        raise ValueError(f"unknown grid {name!r}: one of {', '.join(GRID_NAMES)}")
    return builders[name]()


def expand(grid: Grid, seeds: list[int], epochs: float, data_fraction: float = 1.0,
           only: tuple[str, ...] = (), extra_args: tuple[str, ...] = ()) -> list[Cell]:
    """The grid's cells, seed-major (every variant of a seed before the next seed: a grid cut short, as a long
    campaign is at every stop, holds whole seeds, and a paired difference needs both of its rows in a seed);
    `only` keeps the variants of those recipes (all if empty)."""
    unknown = set(only) - {v.recipe for v in grid.variants}
    if unknown:
        raise ValueError(f"--only {sorted(unknown)}: not in grid {grid.name} "
                         f"(its recipes: {sorted({v.recipe for v in grid.variants})})")
    return [Cell(grid.name, v.name, v.recipe, v.options, v.epochs if v.epochs is not None else epochs,
                 v.data_fraction if v.data_fraction is not None else data_fraction, seed, tuple(extra_args))
            for seed in seeds for v in grid.variants if not only or v.recipe in only]
