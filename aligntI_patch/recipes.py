"""Named recipes: one row of the paper each, as loss weights and options of the distillation entry.

    python -m aligntI_patch.distill --recipe kd_tpa ...      # Table 4 "TPA only" = Table 16 SFT+KD+TPA

A recipe sets only the fields it names; a flag given explicitly overrides it (the fields below default to None,
meaning "the recipe's value, else Align-TI's"). Table 4's and Tables 7-9's rows are read from Table 16:
Table 4's "IVA only" is SFT + IVA (65.1, no KD term), its "TPA only" SFT + KD + TPA (66.4), and Tables 7-9
vary the IVA of that SFT + IVA row, so `uniform_iva`, `student_iva` and the layer sweep carry no KD or TPA term.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    paper: str  # the table and row it reproduces
    settings: dict = field(default_factory=dict)  # DistillArguments field -> value
    note: str = ""


# Align-TI itself (Eq. 8): every term, FKL, IVA weights from the teacher's highest-IRS layer, off-policy data.
ALIGNTI = {"w_sft": 1.0, "w_kd": 1.0, "w_iva": 1.0, "w_tpa": 1.0, "divergence": "fkl",
           "iva_weight_source": "teacher", "on_policy_prob": 0.0}
_KD = {"w_iva": 0.0, "w_tpa": 0.0}
_SFT_IVA = {"w_kd": 0.0, "w_tpa": 0.0}

RECIPES: dict[str, Recipe] = {
    "sft": Recipe("Table 4 row 1 = Table 16 row 1 (L_sft, 64.3)", {"w_kd": 0.0, "w_iva": 0.0, "w_tpa": 0.0},
                  "no teacher is loaded"),
    "kd": Recipe("Table 16 row 3 (L_sft + L_kd, 65.0) = Table 3 FKL", {**_KD, "divergence": "fkl"},
                 "vanilla KD: Eq. 2, the forward KL of the student from the teacher"),
    "rkl": Recipe("Table 3 'MiniLLM' (64.5)", {**_KD, "divergence": "rkl"},
                  "MiniLLM's divergence (reverse KL) in the vanilla-KD loss; not MiniLLM's policy-gradient "
                  "training"),
    "jsd": Recipe("Table 3 JSD (63.7)", {**_KD, "divergence": "jsd"}, "symmetric JSD (--jsd_beta 0.5)"),
    "skew_kl": Recipe("not a row of the paper: DistiLLM's skew KL (its related work)",
                      {**_KD, "divergence": "sfkl"}, "KL of a*T + (1-a)*S from T, --skew_alpha 0.1"),
    "gkd": Recipe("Table 3 GKD (62.7)", {**_KD, "divergence": "jsd", "on_policy_prob": 0.5},
                  "Agarwal et al. 2024: half the batches' replies sampled from the student (full distribution over "
                  "the tokenizer's vocabulary, temperature 1), generalized JSD (beta 0.5) on every batch, L_sft "
                  "on the ground-truth batches only"),
    "sft_iva": Recipe("Table 4 'IVA only' = Table 16 row 2 (L_sft + L_iva, 65.1) = Table 7 layer 21, Table 8 "
                      "Teacher, Table 9 Ours", dict(_SFT_IVA)),
    "kd_iva": Recipe("Table 16 row 4 (L_sft + L_iva + L_kd, 65.6)", {"w_tpa": 0.0}),
    "kd_tpa": Recipe("Table 4 'TPA only' = Table 16 row 5 (L_sft + L_kd + L_tpa, 66.4)", {"w_iva": 0.0}),
    "tpa_iva": Recipe("Table 16 row 6 (L_sft + L_tpa + L_iva, 66.6)", {"w_kd": 0.0}),
    "aligntI": Recipe("Table 4 row 4 = Table 16 row 7 = Table 3 Align-TI (66.7)", {}),
    "uniform_iva": Recipe("Table 9 Uniform (64.5): SFT + IVA with equal weights (LLaVA-KD's alignment)",
                          {**_SFT_IVA, "iva_weight_source": "uniform"}),
    "student_iva": Recipe("Table 8 Student (64.7): SFT + IVA with the student's attention",
                          {**_SFT_IVA, "iva_weight_source": "student"}),
}


def resolve_recipe(name: str, given: dict) -> dict:
    """The settings of recipe `name` for every field of ALIGNTI and the recipe, with `given` (the fields set
    explicitly, not None) taking precedence."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(RECIPES)}, got {name!r}")
    resolved = {**ALIGNTI, **RECIPES[name].settings}
    resolved.update({k: v for k, v in given.items() if v is not None})
    return resolved


def recipes_table() -> str:
    """Markdown table of the recipes (README)."""
    rows = ["| recipe | paper row | sets |", "|---|---|---|"]
    for name, r in RECIPES.items():
        sets = " ".join(f"--{k} {v:g}" if isinstance(v, float) else f"--{k} {v}" for k, v in r.settings.items())
        rows.append(f"| `{name}` | {r.paper}{'; ' + r.note if r.note else ''} | {sets or '(the defaults)'} |")
    return "\n".join(rows)
