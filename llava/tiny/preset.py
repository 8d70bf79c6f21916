"""The built-in tiny preset: world, tokenizer, base LLMs, and the teacher's two stages, cached under a root.

    python -m llava.tiny.preset prepare  [--root playground/tiny] [--backbone qwen2]   # world + bases
    python -m llava.tiny.preset teacher  [--root ...] [--backbone ...]                 # + trained teacher
    python -m llava.tiny.preset teacher  --teacher-epochs 12                            # opt-in: a longer stage 2
    python -m llava.tiny.preset paths    [--root ...] [--backbone ...]                 # shell-friendly paths

No pretrained model exists offline, so the tiny world grows its own: a tiny SigLIP is pretrained on the
world's scene annotations (`vision_pretrain.py`), then frozen and shared by teacher and student, as the
paper shares a frozen SigLIP. Random-init LLMs also mean that every pretrain stage here trains the LLM
with the projector (a real run trains the projector only: `--tune_mm_mlp_adapter`).
Every stage is skipped when its output is complete, so later runs reuse the cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from llava.tiny.configs import write_base_llm, write_base_siglip
from llava.tiny.tokenizer import build_tiny_tokenizer
from llava.tiny.vision_pretrain import pretrain_vision_tower
from llava.tiny.world import generate_world

logger = logging.getLogger(__name__)

# Per-stage hyperparameters of the tiny preset (CPU, fp32).
TEACHER_STAGES = {
    "stage1": {"data": "pretrain.json", "version": "plain", "epochs": 1, "lr": 2e-3, "batch": 16},
    "stage2": {"data": "finetune.json", "version": None, "epochs": 4, "lr": 1e-3, "batch": 16},
}
STUDENT_STAGES = {
    "pretrain": {"data": "pretrain.json", "version": "plain", "epochs": 1, "lr": 2e-3, "batch": 16},
    "finetune": {"data": "finetune.json", "version": None, "epochs": 1, "lr": 1e-3, "batch": 16},
}


def template_for(backbone: str) -> str:
    return {"qwen2": "qwen_2", "qwen3": "qwen_3"}[backbone]


def preset_paths(root: Path | str = "playground/tiny", backbone: str = "qwen2") -> dict[str, Path]:
    root = Path(root)
    return {
        "root": root,
        "world": root / "data",
        "images": root / "data" / "images",
        "tokenizer": root / "tokenizer",
        "teacher_base": root / "base" / f"teacher-{backbone}",
        "student_base": root / "base" / f"student-{backbone}",
        "siglip_init": root / "base" / "siglip-init",
        "teacher_stage1": root / "teacher" / f"{backbone}-stage1",
        "teacher": root / "teacher" / f"{backbone}",
        "siglip": root / "siglip",
    }


def prepare(root: Path | str = "playground/tiny", backbone: str = "qwen2") -> dict[str, Path]:
    """World, tokenizer, randomly initialised teacher/student LLMs, the pretrained tiny SigLIP (all cached)."""
    p = preset_paths(root, backbone)
    generate_world(p["world"], progress=True)
    build_tiny_tokenizer(p["world"], p["tokenizer"])
    write_base_llm(p["teacher_base"], "teacher", backbone, p["tokenizer"], seed=1)
    write_base_llm(p["student_base"], "student", backbone, p["tokenizer"], seed=2)
    write_base_siglip(p["siglip_init"], seed=3)
    pretrain_vision_tower(p["world"], p["siglip_init"], p["siglip"])
    return p


def is_complete(out_dir: Path) -> bool:
    return any((Path(out_dir) / f).is_file() for f in ("model.safetensors", "mm_projector.safetensors"))


def common_train_args(output_dir: Path, data: Path, images: Path, version: str, epochs: float, lr: float,
                      batch: int) -> list[str]:
    """Arguments shared by every tiny stage (CPU-friendly; bf16 and DeepSpeed belong to real runs)."""
    args = [
        "--data_path", str(data), "--image_folder", str(images), "--version", version,
        "--output_dir", str(output_dir), "--num_train_epochs", str(epochs), "--learning_rate", str(lr),
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--weight_decay", "0.0",
        "--model_max_length", "256", "--logging_steps", "20", "--save_strategy", "steps", "--save_steps", "200",
        "--save_total_limit", "1", "--report_to", "none", "--dataloader_num_workers", "1", "--seed", "0",
        "--disable_tqdm", "False",
    ]
    if not torch.cuda.is_available():
        args.append("--use_cpu")
    return args


def run_stage(module: str, args: list[str], output_dir: Path) -> Path:
    """Run one training stage in a subprocess unless its output is already complete."""
    if is_complete(output_dir):
        logger.info("reusing %s", output_dir)
        return output_dir
    cmd = [sys.executable, "-m", module, *args]
    logger.info("running %s", shlex.join(cmd))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, env=env)
    return output_dir


def long_teacher_dir(root: Path | str, backbone: str, stage2_epochs: float) -> Path:
    """Where an opt-in teacher with `stage2_epochs` of stage 2 is cached (beside the preset's, never over it)."""
    return Path(root) / "teacher" / f"{backbone}-stage2-ep{stage2_epochs:g}"


def teacher_stages(p: dict[str, Path], backbone: str, stage2_epochs: float | None = None
                   ) -> list[tuple[str, list[str], Path]]:
    """(module, arguments, output dir) of the teacher's stage 1 (captions) and stage 2 (instruction mix), with the
    frozen pretrained tiny SigLIP. `stage2_epochs` other than the preset's gives an opt-in teacher: the same
    stage 1, that many stage-2 epochs, output at `long_teacher_dir` (the preset's teacher is left as it is)."""
    s1, s2 = TEACHER_STAGES["stage1"], dict(TEACHER_STAGES["stage2"])
    out = p["teacher"]
    if stage2_epochs is not None and stage2_epochs != s2["epochs"]:
        if stage2_epochs <= 0:
            raise ValueError(f"--teacher-epochs must be > 0, got {stage2_epochs}")
        s2["epochs"] = stage2_epochs
        out = long_teacher_dir(p["root"], backbone, stage2_epochs)
    stage1 = ["--model_name_or_path", str(p["teacher_base"]), "--vision_tower", str(p["siglip"]),
              *common_train_args(p["teacher_stage1"], p["world"] / s1["data"], p["images"], s1["version"],
                                 s1["epochs"], s1["lr"], s1["batch"])]
    stage2 = ["--model_name_or_path", str(p["teacher_stage1"]),
              *common_train_args(out, p["world"] / s2["data"], p["images"], template_for(backbone), s2["epochs"],
                                 s2["lr"], s2["batch"])]
    return [("llava.train.train", stage1, p["teacher_stage1"]), ("llava.train.train", stage2, out)]


def train_teacher(root: Path | str = "playground/tiny", backbone: str = "qwen2",
                  stage2_epochs: float | None = None) -> dict[str, Path]:
    """The preset's paths after building the teacher (`teacher_stages`); "teacher" is the one built."""
    p = prepare(root, backbone)
    stages = teacher_stages(p, backbone, stage2_epochs)
    for module, args, out in stages:
        run_stage(module, args, out)
    return {**p, "teacher": stages[-1][2]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "teacher", "paths"])
    parser.add_argument("--root", default="playground/tiny", help="cache root of the tiny preset")
    parser.add_argument("--backbone", default="qwen2", choices=["qwen2", "qwen3"], help="LLM family")
    parser.add_argument("--teacher-epochs", type=float, default=None,
                        help=f"teacher: stage-2 epochs of an opt-in longer teacher (the preset's: "
                             f"{TEACHER_STAGES['stage2']['epochs']}), cached at ROOT/teacher/<backbone>-stage2-epN")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tiny-preset] %(message)s")
    if args.command == "prepare":
        prepare(args.root, args.backbone)
    elif args.command == "teacher":
        sys.stdout.write(f"teacher: {train_teacher(args.root, args.backbone, args.teacher_epochs)['teacher']}\n")
    else:
        for key, value in preset_paths(args.root, args.backbone).items():
            sys.stdout.write(f"TINY_{key.upper()}={shlex.quote(str(value))}\n")


if __name__ == "__main__":
    main()
