"""What every cell of one out dir shares: the teacher, the student's pretrain stage, the world, the launcher.

By default all come from the tiny preset's cache (`llava/tiny/preset.py`, `scripts/v1_5/common.sh`'s
`tiny_paths`), built once with `bash scripts/v1_5/pretrain.sh` when absent: that script makes the world, the
teacher (both stages) and the student's pretrain stage, which is all a cell starts from (finetune.sh would
also train the main job's one-seed SFT student, which the grids train themselves). `--teacher`, `--pretrain`
and `--world` point elsewhere instead (the test suite's mini checkpoints, or other tiny-world models).

At full scale (`--launcher script`) a cell is the main job itself, `scripts/v1_5/distill_aligntI.sh`, with its
real-scale environment: `--model` the student's LLM, `--pretrain` the output dir of pretrain.sh (LLaVA's stage 1:
mm_projector.safetensors), `--data` and `--image-folder` the finetune data, and the tasks of lmms-eval as the
scorer (`--tasks`, `--val-tasks`: `lmms_scorer.py`); the script's other variables (BATCH, GRAD_ACC, LR, MAX_LEN,
NUM_NODES, HOSTFILE, ...) pass through from the caller's environment.
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
from llava.tiny.preset import preset_paths, template_for

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LAUNCHERS = ("cpu", "deepspeed", "script")


def student_pretrain_dir(root: Path, backbone: str) -> Path:
    """The student's pretrain stage of the preset (PRETRAIN_DIR of scripts/v1_5/finetune.sh and distill_aligntI.sh)."""
    return Path(root) / "student" / f"{backbone}-pretrain"


@dataclass(frozen=True)
class Setup:
    """Models, data and launcher of every cell of an out dir (recorded in DIR/setup.json)."""

    teacher: Path
    pretrain: Path  # a full LLaVA-Qwen checkpoint (the tiny preset's pretrain stage trains the LLM too);
    # launcher "script": pretrain.sh's output dir (mm_projector.safetensors) for the LLM `model`
    world: Path  # holds finetune.json, images/, val_questions.jsonl, test_questions.jsonl
    vision_tower: Path | None  # None: the pretrain checkpoint's own; a hub id stays relative
    version: str  # conversation template
    launcher: str = "cpu"  # cpu: python --use_cpu; deepspeed: the deepspeed launcher on num_gpus GPUs;
    # script: scripts/v1_5/distill_aligntI.sh at full scale (NUM_GPUS=num_gpus)
    num_gpus: int = 0
    ds_config: Path = REPO / "scripts" / "zero2.json"
    test_split: str = "test"  # the world's split scored as "test" (e.g. test_large: llava.tiny.world --add-split)
    val_split: str = "val"  # the world's split scored as "val" (the budget grid chooses on it)
    model: str | None = None  # launcher "script": the student's LLM (a dir or a hub id)
    data: Path | None = None  # finetune data (LLaVA's json); None: the world's finetune.json
    image_folder: Path | None = None  # None: the world's images/
    tasks: tuple[str, ...] = ()  # lmms-eval tasks scored as "test" (lmms_scorer.TaskSpec); () = the world's
    val_tasks: tuple[str, ...] = ()  # lmms-eval tasks scored as "val"
    include_path: Path | None = None  # lmms-eval --include_path (tasks of your own)
    lmms_args: tuple[str, ...] = ()  # more lmms-eval flags (e.g. --limit 100: then part of every number)

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.launcher == "deepspeed" and self.num_gpus < 1:
            raise ValueError("--launcher deepspeed needs --num_gpus >= 1 (no GPU is visible)")
        if (self.launcher == "script") != (self.model is not None):
            raise ValueError("--launcher script and --model go together: the script trains the LLM --model from "
                             "the projector of --pretrain (pretrain.sh's output)")
        if self.launcher == "script" and self.vision_tower is None:
            raise ValueError("--launcher script needs --vision-tower (the teacher's SigLIP: N_v must match)")
        if self.val_tasks and not self.tasks:
            raise ValueError("--val-tasks needs --tasks (the tasks scored as test)")

    @property
    def device(self) -> str:
        return "cuda" if self.launcher != "cpu" and self.num_gpus > 0 else "cpu"

    @property
    def finetune_data(self) -> Path:
        return self.data or self.world / "finetune.json"

    @property
    def images(self) -> Path:
        return self.image_folder or self.world / "images"

    def identity(self) -> dict:
        """What must not change between runs into one out dir (the launcher may: rows record it). Fields at
        their defaults are left out, so out dirs recorded before a field existed keep their identity."""
        record = {k: str(v) if v is not None else None for k, v in asdict(self).items()}
        record |= {"tasks": list(self.tasks), "val_tasks": list(self.val_tasks), "lmms_args": list(self.lmms_args)}
        keys = ("teacher", "pretrain", "world", "vision_tower", "version")
        optional = {"test_split": "test", "val_split": "val", "model": None, "data": None, "image_folder": None, "tasks": [],
                    "val_tasks": [], "include_path": None, "lmms_args": []}
        return {k: record[k] for k in keys} | {k: record[k] for k, default in optional.items()
                                               if record[k] != default}

    def teacher_layers(self) -> int:
        """Decoder layers of the teacher (from its config.json; the preset's size before it is built)."""
        config = self.teacher / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["num_hidden_layers"])
        return LLM_SIZES["teacher"]["num_hidden_layers"]


def resolve_setup(root: str | Path, backbone: str, teacher: str | None = None, pretrain: str | None = None,
                  world: str | None = None, vision_tower: str | None = None, launcher: str = "cpu",
                  num_gpus: int | None = None, ds_config: str | None = None, test_split: str = "test",
                  val_split: str = "val", model: str | None = None, data: str | None = None, image_folder: str | None = None,
                  tasks: tuple[str, ...] = (), val_tasks: tuple[str, ...] = (),
                  include_path: str | None = None, lmms_args: tuple[str, ...] = ()) -> Setup:
    """The preset's paths under `root` for `backbone`, each replaced by the one given explicitly."""
    paths = preset_paths(root, backbone)
    own_pretrain = pretrain is None
    if num_gpus is None:
        num_gpus = _visible_gpus() if launcher in ("deepspeed", "script") else 0
    tower = vision_tower or (paths["siglip"] if own_pretrain else None)
    return Setup(
        teacher=Path(teacher or paths["teacher"]).resolve(),
        pretrain=Path(pretrain or student_pretrain_dir(root, backbone)).resolve(),
        world=Path(world or paths["world"]).resolve(),
        vision_tower=_local_or_hub(tower) if tower else None,
        version=template_for(backbone), launcher=launcher, num_gpus=num_gpus,
        ds_config=Path(ds_config).resolve() if ds_config else REPO / "scripts" / "zero2.json",
        test_split=test_split, val_split=val_split, model=str(_local_or_hub(model)) if model else None,
        data=_absolute(data), image_folder=_absolute(image_folder), tasks=tuple(tasks), val_tasks=tuple(val_tasks),
        include_path=_absolute(include_path), lmms_args=tuple(lmms_args),
    )


def _absolute(path: str | None) -> Path | None:
    return Path(path).resolve() if path else None


def setup_from_record(record: dict, **changes) -> Setup:
    """The Setup that an out dir's setup.json records, with `changes` (e.g. val_split=...); it scores on the GPUs
    visible (CPU when none) and trains nothing."""
    paths = ("teacher", "pretrain", "world", "data", "image_folder", "include_path")
    fields = {k: (Path(v) if k in paths and v is not None else v) for k, v in record.items() if k != "rescoring"}
    fields |= {k: tuple(fields[k]) for k in ("tasks", "val_tasks", "lmms_args") if k in fields}
    if fields.get("vision_tower") is not None:
        fields["vision_tower"] = Path(fields["vision_tower"])
    gpus = _visible_gpus()
    launcher = "script" if fields.get("model") else "deepspeed" if gpus else "cpu"
    return Setup(**{"vision_tower": None, **fields, **changes}, launcher=launcher, num_gpus=gpus)


def _local_or_hub(name: str | Path) -> Path:
    """An existing path made absolute; anything else (a hub id such as google/siglip-so400m-patch14-384) as is."""
    return Path(name).resolve() if Path(name).exists() else Path(name)


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PARTS = {  # what each part of a setup must be, for the error that names a missing one
    "teacher": "--teacher: a complete LLaVA-Qwen checkpoint (model.safetensors, or its shards' index)",
    "pretrain": "--pretrain: a complete LLaVA-Qwen checkpoint (model.safetensors, or its shards' index)",
    "projector": "--pretrain: the output dir of pretrain.sh, with mm_projector.safetensors",
    "data": "--data / --image-folder (or --world): a LLaVA finetune json and its image folder",
    "questions": "--world: a tiny world with test_questions.jsonl (or lmms-eval --tasks)",
}


def has_weights(checkpoint: Path) -> bool:
    """Whether a checkpoint dir holds a model's weights, in one file or sharded (a 7B teacher is)."""
    return any((checkpoint / name).is_file() for name in WEIGHTS)


def missing_parts(setup: Setup) -> list[str]:
    """The parts a cell needs that are not there yet (keys of PARTS; empty when the cells can run)."""
    checks = {"teacher": has_weights(setup.teacher),
              "data": setup.finetune_data.is_file() and setup.images.is_dir()}
    if setup.launcher == "script":
        checks["projector"] = (setup.pretrain / "mm_projector.safetensors").is_file()
    else:
        checks["pretrain"] = has_weights(setup.pretrain)
    if not setup.tasks:
        checks["questions"] = (setup.world / "test_questions.jsonl").is_file()
    return [name for name, ok in checks.items() if not ok]


def build_command(root: str | Path, backbone: str, setup: Setup) -> tuple[list[str], dict[str, str]]:
    """`bash scripts/v1_5/pretrain.sh` and its environment: builds the preset's world, teacher and pretrain."""
    env = {**os.environ, "TINY_ROOT": str(Path(root).resolve()), "TINY_BACKBONE": backbone,
           "PYTHON": sys.executable, "NUM_GPUS": str(setup.num_gpus), "DS_CONFIG": str(setup.ds_config),
           "EPOCHS": "1"}  # the preset's pretrain stage (as finetune.sh builds it), whatever the caller's EPOCHS
    return ["bash", str(REPO / "scripts" / "v1_5" / "pretrain.sh")], env


def ensure_cache(setup: Setup, root: str | Path, backbone: str, uses_preset: bool) -> None:
    """Build the preset's cache if a part is missing; with explicit paths, say which one is missing."""
    missing = missing_parts(setup)
    if not missing:
        return
    if not uses_preset:
        raise FileNotFoundError("missing parts of the setup:\n" + "\n".join(f"- {PARTS[m]}" for m in missing)
                                + f"\ngot {setup}")
    cmd, env = build_command(root, backbone, setup)
    logger.info("building the tiny preset's cache (%s): %s", ", ".join(missing), " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    still = missing_parts(setup)
    if still:
        raise RuntimeError(f"{' '.join(cmd)} ran but {', '.join(still)} is still missing under {root}")


def ensure_splits(setup: Setup, sizes: dict[str, int | None]) -> None:
    """The world's splits scored as test and val (`setup.test_split`, `setup.val_split`), each added with
    `llava.tiny.world.add_eval_split` when missing and its size is given in `sizes` ({"test": N, "val": N}; the
    world's own files are untouched). Nothing to do when lmms-eval tasks score the cells."""
    if setup.tasks:
        return
    from llava.tiny.world import add_eval_split

    for split, name in (("test", setup.test_split), ("val", setup.val_split)):
        if (setup.world / f"{name}_questions.jsonl").is_file():
            continue
        if sizes.get(split) is None:
            raise FileNotFoundError(f"{setup.world} has no {name}_questions.jsonl: give --{split}-split {name}=N to "
                                    f"add N questions drawn like {split}")
        add_eval_split(setup.world, name, sizes[split], progress=True)
