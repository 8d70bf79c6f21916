"""Distillation arguments: LLaVA's training arguments plus Align-TI's (Eq. 8 weights, divergence, IVA, TPA)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from aligntI_patch.chunked_losses import DEFAULT_CHUNK_ELEMENTS
from aligntI_patch.divergences import DIVERGENCES, check_divergence_args
from aligntI_patch.irs import PAIRINGS, PAPER_NUM_PAIRS
from aligntI_patch.iva import IVA_SOURCES
from aligntI_patch.recipes import ALIGNTI, RECIPES, resolve_recipe
from llava.train.arguments import ATTN_IMPLEMENTATIONS, TrainingArguments

# token_divergence's keywords as flags, for its error messages
_DIVERGENCE_FLAGS = "temperature is --kd_temperature, beta --jsd_beta, alpha --skew_alpha"


@dataclass
class DistillArguments(TrainingArguments):
    teacher_model_path: str | None = field(
        default=None,
        metadata={"help": "LLaVA-Qwen teacher checkpoint (local dir or hub id org/name[@rev]); needed (and loaded) only when --w_kd, --w_iva or "
                          "--w_tpa is on"},
    )
    teacher_attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Teacher LLM attention: sdpa, eager, flash_attention_2 or flex_attention (default: sdpa; "
                          "the last two on CUDA only)."},
    )
    recipe: str = field(
        default="aligntI",
        metadata={"help": f"One row of the paper: {', '.join(RECIPES)} (aligntI_patch/recipes.py, README). It "
                          "sets the loss weights, divergence, IVA weight source and on-policy share that it names; "
                          "a flag given explicitly overrides it"},
    )
    w_sft: float | None = field(default=None, metadata={"help": "Weight of L_sft (0 disables it; default: recipe)"})
    w_kd: float | None = field(default=None,
                               metadata={"help": "Weight of L_kd, Eq. 2 (0 disables it; default: recipe)"})
    w_iva: float | None = field(default=None,
                                metadata={"help": "Weight of L_iva, Eq. 3 (0 disables it; default: recipe)"})
    w_tpa: float | None = field(default=None,
                                metadata={"help": "Weight of L_tpa, Eq. 7 (0 disables it; default: recipe)"})
    divergence: str | None = field(
        default=None, metadata={"help": f"One of {DIVERGENCES}; fkl = KL(T||S), the paper's (default: recipe)"})
    jsd_beta: float = field(default=0.5, metadata={"help": "beta of the generalized JSD, in (0, 1)"})
    skew_alpha: float = field(default=0.1, metadata={"help": "alpha of the skew KL (sfkl / srkl), in [0, 1)"})
    kd_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of every divergence"})
    iva_layer: str = field(
        default="auto",
        metadata={"help": "'auto' (highest IRS, Eq. 4) or a layer index, of the --iva_weight_source model"},
    )
    iva_weight_source: str | None = field(
        default=None,
        metadata={"help": "teacher | student | uniform (Tables 8, 9): whose attention gives alpha (and IRS); "
                          "default: recipe"},
    )
    iva_normalize: bool = field(default=False, metadata={"help": "Rescale alpha to mean 1 per sample"})
    irs_path: str | None = field(
        default=None,
        metadata={"help": "An existing irs.json from `python -m aligntI_patch.irs` on the --iva_weight_source "
                          "model, read by --iva_layer auto. Default: irs.json in that model's directory when "
                          "present, else IRS is computed on --irs_num_pairs pairs at start and written to "
                          "OUTPUT_DIR/irs.json"},
    )
    irs_num_pairs: int = field(
        default=PAPER_NUM_PAIRS,
        metadata={"help": "Pairs used when --iva_layer auto computes IRS (the paper's 1000; fewer if the data has "
                          "fewer images)"})
    irs_pairs: str = field(
        default="iid", metadata={"help": "IRS pairs: iid (Eq. 4's random pairs of inputs) or same_image (one image, "
                                         "two instructions)"})
    tpa_num_samples: int = field(default=4, metadata={"help": "d, candidates per response position"})
    tpa_sampling: str = field(default="nucleus", metadata={"help": "nucleus | greedy (top-d), Fig. 6"})
    tpa_top_p: float = field(default=0.9, metadata={"help": "Nucleus mass (the paper does not state it)"})
    tpa_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the candidates"})
    tpa_dedupe: bool = field(default=True, metadata={"help": "Evaluate equal candidates once (exact)"})
    on_policy_prob: float | None = field(
        default=None,
        metadata={"help": "GKD's lambda: the share of batches whose replies the student samples (first assistant "
                          "turn only: a multi-turn sample keeps its first exchange); default: recipe (gkd: 0.5)"},
    )
    on_policy_max_new_tokens: int = field(
        default=64, metadata={"help": "Length cap of on-policy replies; a reply cut there stays cut (no end token "
                                      "added, nothing supervised past it)"})
    on_policy_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of on-policy sampling (full distribution: no top-k / top-p)"})
    on_policy_sft: bool = field(
        default=False, metadata={"help": "Also train L_sft on the student's own replies (GKD: off)"})
    loss_chunk_size: int = field(
        default=1024, metadata={"help": "Positions per lm_head chunk in the losses (and in TPA's sampling) at most; "
                                        "a chunk also holds at most --loss_chunk_elements logits elements"})
    loss_chunk_elements: int = field(
        default=DEFAULT_CHUNK_ELEMENTS,
        metadata={"help": "Logits elements per lm_head chunk at most: rows per chunk = min(--loss_chunk_size, "
                          "max(1, this // vocabulary)); the default 16777216 is a 64 MB fp32 [rows, V] block "
                          "(110 rows at Qwen's V = 151936)"})

    def __post_init__(self):
        super().__post_init__()
        names = ALIGNTI.keys()
        for name, value in resolve_recipe(self.recipe, {k: getattr(self, k) for k in names}).items():
            setattr(self, name, value)
        if not self.teacher_model_path and self.needs_teacher:
            raise ValueError("--teacher_model_path is required unless only --w_sft is used")
        impl = self.teacher_attn_implementation
        if impl is not None and impl not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--teacher_attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {impl!r}")
        for name in ("w_sft", "w_kd", "w_iva", "w_tpa"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"--divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        try:  # the loss's own checks, here rather than at the first step
            check_divergence_args(self.divergence, **self.divergence_kwargs)
        except ValueError as err:
            raise ValueError(f"--divergence {self.divergence}: {err} ({_DIVERGENCE_FLAGS})") from err
        if self.iva_weight_source not in IVA_SOURCES:
            raise ValueError(f"--iva_weight_source must be one of {IVA_SOURCES}, got {self.iva_weight_source!r}")
        if self.iva_layer != "auto" and not self.iva_layer.lstrip("-").isdigit():
            raise ValueError(f"--iva_layer must be 'auto' or an integer, got {self.iva_layer!r}")
        if self.irs_path is not None and not os.path.isfile(self.irs_path):
            raise FileNotFoundError(
                f"--irs_path {self.irs_path!r} is not a file: give an irs.json written by "
                "`python -m aligntI_patch.irs`, or leave --irs_path out to compute IRS at start"
            )
        if self.irs_pairs not in PAIRINGS:
            raise ValueError(f"--irs_pairs must be one of {PAIRINGS}, got {self.irs_pairs!r}")
        if self.irs_num_pairs < 1:
            raise ValueError(f"--irs_num_pairs must be >= 1, got {self.irs_num_pairs}")
        if self.tpa_num_samples < 1:
            raise ValueError(f"--tpa_num_samples (d) must be >= 1, got {self.tpa_num_samples}")
        if self.tpa_sampling not in ("nucleus", "greedy"):
            raise ValueError(f"--tpa_sampling must be nucleus or greedy, got {self.tpa_sampling!r}")
        if not 0 < self.tpa_top_p <= 1:
            raise ValueError(f"--tpa_top_p must lie in (0, 1], got {self.tpa_top_p}")
        if self.tpa_temperature <= 0 or self.kd_temperature <= 0:
            raise ValueError("--tpa_temperature and --kd_temperature must be > 0")
        if not (self.w_sft or self.needs_teacher):
            raise ValueError("All of --w_sft, --w_kd, --w_iva, --w_tpa are 0: there is no loss to train on")
        if self.on_policy_temperature <= 0:
            raise ValueError(f"--on_policy_temperature must be > 0, got {self.on_policy_temperature}")
        if not 0 <= self.on_policy_prob <= 1:
            raise ValueError(f"--on_policy_prob must lie in [0, 1], got {self.on_policy_prob}")
        if self.on_policy_prob and not self.needs_teacher:
            # generation needs only the student, but SFT on the student's own samples has zero expected gradient
            raise ValueError("--on_policy_prob needs a teacher term (--w_kd, --w_iva or --w_tpa > 0): with "
                             "--w_sft alone the student would be trained on its own samples")
        if self.loss_chunk_size < 1:
            raise ValueError(f"--loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.loss_chunk_elements < 1:
            raise ValueError(f"--loss_chunk_elements must be >= 1, got {self.loss_chunk_elements}")

    @property
    def needs_teacher(self) -> bool:
        """A term that reads the teacher is on (SFT alone, the student's own pass, needs none)."""
        return bool(self.w_kd or self.w_iva or self.w_tpa)

    @property
    def resolved_recipe(self) -> dict:
        """The recipe's name and paper row with every setting it resolved to (written to OUTPUT_DIR/recipe.json)."""
        recipe = RECIPES[self.recipe]
        return {"recipe": self.recipe, "paper": recipe.paper, "note": recipe.note,
                "settings": {k: getattr(self, k) for k in ALIGNTI}}

    @property
    def divergence_kwargs(self) -> dict:
        return {"temperature": self.kd_temperature, "beta": self.jsd_beta, "alpha": self.skew_alpha}
