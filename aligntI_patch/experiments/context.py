"""What every cell of one out dir shares: the teacher, the student's pretrain stage, the world, the launcher.

By default all come from the tiny preset's cache (`llava/tiny/preset.py`, `scripts/v1_5/common.sh`'s
`tiny_paths`), built once with `bash scripts/v1_5/pretrain.sh` when absent: that script makes the world, the
teacher (both stages) and the student's pretrain stage, which is all a cell starts from (finetune.sh would
also train the main job's one-seed SFT student, which the grids train themselves). `--teacher`, `--pretrain`
and `--world` point elsewhere instead (the test suite's mini checkpoints, or a cluster's real models).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from llava.tiny.configs import LLM_SIZES
from llava.tiny.preset import is_complete, preset_paths, template_for

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = ("cpu", "deepspeed")


def student_pretrain_dir(root: Path, backbone: str) -> Path:
    """The student's pretrain stage of the preset (PRETRAIN_DIR of scripts/v1_5/finetune.sh and distill_aligntI.sh)."""
    return Path(root) / "student" / f"{backbone}-pretrain"


@dataclass(frozen=True)
class Setup:
    """Models, data and launcher of every cell of an out dir (recorded in DIR/setup.json)."""

    teacher: Path
    pretrain: Path  # a full LLaVA-Qwen checkpoint: the tiny preset's pretrain stage trains the LLM too
    world: Path  # holds finetune.json, images/, val_questions.jsonl, test_questions.jsonl
    vision_tower: Path | None  # None: the pretrain checkpoint's own
    version: str  # conversation template
    launcher: str = "cpu"  # cpu: python --use_cpu; deepspeed: the deepspeed launcher on num_gpus GPUs
    num_gpus: int = 0
    ds_config: Path = REPO / "scripts" / "zero2.json"
    test_split: str = "test"  # the world's split scored as "test" (e.g. test_large: llava.tiny.world --add-split)

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.launcher == "deepspeed" and self.num_gpus < 1:
            raise ValueError("--launcher deepspeed needs --num_gpus >= 1 (no GPU is visible)")

    @property
    def device(self) -> str:
        return "cuda" if self.launcher == "deepspeed" else "cpu"

    def identity(self) -> dict:
        """What must not change between runs into one out dir (the launcher may: rows record it)."""
        record = {k: str(v) if v is not None else None for k, v in asdict(self).items()}
        keys = ("teacher", "pretrain", "world", "vision_tower", "version")
        return {k: record[k] for k in keys} | ({"test_split": self.test_split} if self.test_split != "test" else {})

    def teacher_layers(self) -> int:
        """Decoder layers of the teacher (from its config.json; the preset's size before it is built)."""
        config = self.teacher / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["num_hidden_layers"])
        return LLM_SIZES["teacher"]["num_hidden_layers"]


def resolve_setup(root: str | Path, backbone: str, teacher: str | None = None, pretrain: str | None = None,
                  world: str | None = None, vision_tower: str | None = None, launcher: str = "cpu",
                  num_gpus: int | None = None, ds_config: str | None = None, test_split: str = "test") -> Setup:
    """The preset's paths under `root` for `backbone`, each replaced by the one given explicitly."""
    paths = preset_paths(root, backbone)
    own_pretrain = pretrain is None
    if num_gpus is None:
        num_gpus = _visible_gpus() if launcher == "deepspeed" else 0
    tower = vision_tower or (paths["siglip"] if own_pretrain else None)
    return Setup(
        teacher=Path(teacher or paths["teacher"]).resolve(),
        pretrain=Path(pretrain or student_pretrain_dir(root, backbone)).resolve(),
        world=Path(world or paths["world"]).resolve(),
        vision_tower=Path(tower).resolve() if tower else None,
        version=template_for(backbone), launcher=launcher, num_gpus=num_gpus,
        ds_config=Path(ds_config).resolve() if ds_config else REPO / "scripts" / "zero2.json",
        test_split=test_split,
    )


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def missing_parts(setup: Setup) -> list[str]:
    """The parts a cell needs that are not there yet (empty when the cells can run)."""
    checks = {"teacher": is_complete(setup.teacher), "pretrain": is_complete(setup.pretrain),
              "world": (setup.world / "test_questions.jsonl").is_file() and (setup.world / "finetune.json").is_file()}
    return [name for name, ok in checks.items() if not ok]


def build_command(root: str | Path, backbone: str, setup: Setup) -> tuple[list[str], dict[str, str]]:
    """`bash scripts/v1_5/pretrain.sh` and its environment: builds the preset's world, teacher and pretrain."""
    env = {**os.environ, "TINY_ROOT": str(Path(root).resolve()), "TINY_BACKBONE": backbone,
           "PYTHON": sys.executable, "NUM_GPUS": str(setup.num_gpus), "DS_CONFIG": str(setup.ds_config)}
    return ["bash", str(REPO / "scripts" / "v1_5" / "pretrain.sh")], env


def ensure_cache(setup: Setup, root: str | Path, backbone: str, uses_preset: bool) -> None:
    """Build the preset's cache if a part is missing; with explicit paths, say which one is missing."""
    missing = missing_parts(setup)
    if not missing:
        return
    if not uses_preset:
        raise FileNotFoundError(
            f"missing {', '.join(missing)}: --teacher and --pretrain must be complete LLaVA-Qwen checkpoints "
            f"(model.safetensors) and --world a tiny world (finetune.json, test_questions.jsonl); got {setup}")
    cmd, env = build_command(root, backbone, setup)
    logger.info("building the tiny preset's cache (%s): %s", ", ".join(missing), " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    still = missing_parts(setup)
    if still:
        raise RuntimeError(f"{' '.join(cmd)} ran but {', '.join(still)} is still missing under {root}")


def ensure_test_split(setup: Setup, n_questions: int | None) -> None:
    """The world's `setup.test_split` questions, added with `llava.tiny.world.add_eval_split` when missing and
    `n_questions` is given (the world's own files are untouched)."""
    if (setup.world / f"{setup.test_split}_questions.jsonl").is_file():
        return
    if n_questions is None:
        raise FileNotFoundError(f"{setup.world} has no {setup.test_split}_questions.jsonl: give "
                                f"--test-split {setup.test_split}=N to add N questions drawn like test")
    from llava.tiny.world import add_eval_split

    add_eval_split(setup.world, setup.test_split, n_questions, progress=True)
