"""Align-TI distillation entry: parse, build student and teacher, check them, pick the IVA layer, train, save.

    python -m aligntI_patch.distill --model_name_or_path STUDENT_LLM --teacher_model_path TEACHER
        --vision_tower SIGLIP --pretrain_mm_mlp_adapter PROJ --data_path D.json --image_folder IMGS
        --version qwen_2 --output_dir OUT [--w_kd 1 --w_iva 1 --w_tpa 1 --divergence fkl ...]

Baselines and ablations are named recipes of the same entry, one row of the paper each (`--recipe sft`, `kd`,
`rkl`, `jsd`, `skew_kl`, `gkd`, `sft_iva`, `kd_iva`, `kd_tpa`, `tpa_iva`, `aligntI` (default), `uniform_iva`,
`student_iva`; `aligntI_patch/recipes.py`); explicit flags override the recipe. The run writes the recipe and
its resolved settings to OUTPUT_DIR/recipe.json.

Resuming (the newest complete checkpoint-N of OUTPUT_DIR) reuses the run's OUTPUT_DIR/irs.json for
`--iva_layer auto` rather than recomputing IRS.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import transformers
from transformers import AutoConfig

from aligntI_patch.arguments import DistillArguments
from aligntI_patch.attention_hook import decoder_layers
from aligntI_patch.irs import irs_per_layer, load_paired_batches, select_iva_layer, write_irs
from aligntI_patch.iva import source_model
from aligntI_patch.recipes import RECIPES
from aligntI_patch.tpa import check_sliding_window
from aligntI_patch.trainer import AlignTITrainer
from aligntI_patch.zero3 import prepare_teacher
from llava.hub import resolve_dir, resolve_file
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.train.arguments import DataArguments, ModelArguments
from llava.train.data import make_supervised_data_module
from llava.train.distributed import end_distributed_run
from llava.train.llava_trainer import resume_checkpoint
from llava.train.lora import apply_lora
from llava.train.train import (
    build_model,
    build_tokenizer,
    record_config,
    set_trainable,
    train_and_save,
    training_dtype,
)
from llava.train.zero3 import check_full_save, whole_weights, zero3_enabled

logger = logging.getLogger(__name__)


TEMPLATE_FAMILY = {"qwen_2": "qwen2", "qwen_3": "qwen3"}


def _family(model_type: str) -> str:
    return "qwen3" if model_type.endswith("qwen3") else "qwen2" if model_type.endswith("qwen2") else model_type


def _read_config(name: str, arg: str):
    """config.json of a local directory or a hub id (that file alone): a missing one is an error naming `arg`."""
    return AutoConfig.from_pretrained(os.path.dirname(resolve_file(name, "config.json", arg)))


def check_configs(args: DistillArguments, model_args: ModelArguments) -> None:
    """Errors that config.json files show, before any weight is loaded: a student or teacher that is neither a
    local directory nor a resolvable hub id, a teacher without a vision tower, a conversation template of another
    Qwen family than the models, a teacher trained with another template."""
    version = model_args.version
    student = _read_config(model_args.model_name_or_path, "--model_name_or_path")
    family = TEMPLATE_FAMILY.get(version)
    if family and _family(student.model_type) != family:
        raise ValueError(f"--version {version} is the {family} template, but the student "
                         f"({model_args.model_name_or_path}) is a {student.model_type} model: use --version "
                         f"{'qwen_3' if _family(student.model_type) == 'qwen3' else 'qwen_2'}")
    if not (getattr(student, "mm_vision_tower", None) or getattr(student, "mm_image_tower", None)
            or model_args.pretrain_mm_mlp_adapter):
        logger.warning("The student (%s) is a plain LLM and no --pretrain_mm_mlp_adapter is given: its projector "
                       "starts from random weights (pass pretrain.sh's mm_projector.safetensors)",
                       model_args.model_name_or_path)
    if not args.needs_teacher:
        return
    teacher = _read_config(args.teacher_model_path, "--teacher_model_path")
    if not (getattr(teacher, "mm_vision_tower", None) or getattr(teacher, "mm_image_tower", None)):
        raise ValueError(
            f"--teacher_model_path {args.teacher_model_path} is a {teacher.model_type} model without a vision "
            "tower (no mm_vision_tower in its config.json): the teacher must be a LLaVA-Qwen checkpoint that went "
            "through both LLaVA stages (pretrain.sh, then finetune.sh), or a released Align-TI/LLaVA teacher"
        )
    if family and _family(teacher.model_type) != family:
        raise ValueError(f"--version {version} is the {family} template, but the teacher "
                         f"({args.teacher_model_path}) is a {teacher.model_type} model")
    saved = getattr(teacher, "conv_template", None)
    if saved and saved != version:
        raise ValueError(f"The teacher ({args.teacher_model_path}) was trained with the {saved!r} template but "
                         f"--version is {version!r}: both models must see the same prompts (use --version {saved})")


def load_teacher(args: DistillArguments, device: torch.device):
    """The frozen teacher in the training dtype, eval mode, never seen by the optimizer. `--teacher_model_path` is
    a local directory or a hub id (its snapshot in the Hugging Face cache, see `llava/hub.py`)."""
    tokenizer, teacher, _, _ = load_pretrained_model(
        resolve_dir(args.teacher_model_path, "--teacher_model_path"), device=str(device),
        torch_dtype=training_dtype(args),
        attn_implementation=args.teacher_attn_implementation,
    )
    return tokenizer, teacher.eval().requires_grad_(False)


def check_pair(student, teacher, student_tok, teacher_tok, args: DistillArguments, student_path: str) -> int:
    """Errors before training: different tokenizers, N_v mismatch, a sliding window TPA cannot honour.
    Returns the shared vocab size.

    Reads full weight shapes: call it before DeepSpeed partitions the models."""
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            f"Teacher tokenizer ({args.teacher_model_path}, {len(teacher_tok)} tokens) differs from the student's "
            f"({student_path}, {len(student_tok)} tokens): logits can only be aligned on one shared vocabulary"
        )
    if student.num_image_tokens != teacher.num_image_tokens:
        raise ValueError(
            f"Teacher has {teacher.num_image_tokens} visual tokens per image, the student {student.num_image_tokens}: "
            "IVA and the shared layout need the same N_v (use the teacher's vision tower for the student)"
        )
    if args.w_tpa > 0:  # sequences reach --model_max_length tokens (counted after image expansion)
        for role, model, path in (("student", student, student_path), ("teacher", teacher, args.teacher_model_path)):
            check_sliding_window(model.config, args.model_max_length, f"the {role} ({path})")
    rows = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if len(student_tok) > rows:
        raise ValueError(f"Tokenizer has {len(student_tok)} tokens but an lm_head has only {rows} rows")
    return len(student_tok)


def choose_iva_layer(args: DistillArguments, data_args: DataArguments, model_args: ModelArguments, student, teacher,
                     tokenizer, image_processor) -> int:
    """`--iva_layer` as given, or the layer with the highest IRS (Eq. 4) from irs.json or a subset of the data.

    Both are layers of the model whose attention gives alpha (Eq. 3), `--iva_weight_source`: the teacher's
    (the paper's) or the student's (Tab. 8). IRS ranks that model's own layers, so it is computed on it and
    the layer is checked against its depth here, before any training step hooks it.
    """
    if args.w_iva == 0 or args.iva_weight_source == "uniform":
        return 0
    source = args.iva_weight_source
    model = source_model(source, teacher, student)
    model_dir = args.teacher_model_path if source == "teacher" else model_args.model_name_or_path
    name = f"the {source} ({model_dir})"
    num_layers = len(decoder_layers(model))
    if args.iva_layer != "auto":
        layer = int(args.iva_layer)
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"--iva_layer {layer} is out of range for --iva_weight_source {source}: {name} has {num_layers} "
                f"decoder layers (0..{num_layers - 1})"
            )
        return layer
    irs_path = args.irs_path or os.path.join(model_dir, "irs.json")  # --irs_path exists (DistillArguments)
    if os.path.isfile(irs_path):
        return select_iva_layer("auto", model, irs_path=irs_path, name=name)
    written = os.path.join(args.output_dir, "irs.json")
    resume = resume_checkpoint(args.output_dir, args.resume_from_checkpoint)  # the one train_and_save takes
    if resume and os.path.isfile(written):
        # IRS again could pick another layer on near-tie scores (nondeterministic GPU kernels): keep the run's own
        layer = select_iva_layer("auto", model, irs_path=written, name=name)
        logger.info("Resuming from %s: IVA layer %d from this run's %s (IRS not recomputed)", resume, layer,
                    written)
        return layer
    a, b, n = load_paired_batches(tokenizer, image_processor, model, data_args.data_path, data_args.image_folder,
                                  model_args.version, args.irs_num_pairs, batch_size=8, seed=args.seed,
                                  context_len=args.model_max_length, pairing=args.irs_pairs)
    scores = irs_per_layer(model, a, b)
    best = write_irs(args.output_dir, list(range(num_layers)), scores, n, args.irs_pairs)
    logger.info("IVA layer %d of %s (highest IRS over %d %s pairs; written to %s/irs.json)", best, name, n,
                args.irs_pairs, args.output_dir)
    return best


def write_recipe(args: DistillArguments) -> None:
    """OUTPUT_DIR/recipe.json: the recipe, the paper row it reproduces and every setting it resolved to."""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "recipe.json"), "w", encoding="utf-8") as f:
        json.dump(args.resolved_recipe, f, indent=1)
    logger.info("Recipe %s (%s): %s", args.recipe, RECIPES[args.recipe].paper, args.resolved_recipe["settings"])


def main() -> None:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, DistillArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    transformers.set_seed(args.seed)  # fresh weights (projector, LoRA) depend on --seed only, not the launcher

    # ZeRO-3: both load whole on the CPU; DeepSpeed moves them to the GPU one shard at a time when it wraps them
    check_full_save(args, not args.lora_enable)
    check_configs(args, model_args)
    if args.teacher_model_path and not args.needs_teacher:
        logger.warning("--teacher_model_path is not loaded: no teacher term is on (SFT only)")
    teacher = teacher_engine = None
    with whole_weights(args):
        student = build_model(model_args, args)
        if args.needs_teacher:
            teacher_tok, teacher = load_teacher(args, torch.device("cpu") if zero3_enabled(args) else args.device)
    set_trainable(student, model_args, args)
    if args.lora_enable:
        student = apply_lora(student, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_bias)
    tokenizer = build_tokenizer(model_args, args, student)
    image_processor = load_image_processor(model_args.vision_tower or student.get_vision_tower().config)
    record_config(student, model_args, data_args, args)
    if args.should_save:
        write_recipe(args)
    vocab_size = len(tokenizer)
    if teacher is not None:
        vocab_size = check_pair(student, teacher, tokenizer, teacher_tok, args, model_args.model_name_or_path)
        # DeepSpeed: the teacher in an inference engine (ZeRO-3: partitioned), which must live as long as training
        # (its __del__ removes the hooks that gather the weights); without DeepSpeed unchanged
        teacher, teacher_engine = prepare_teacher(teacher, args)
    # the data pre-flight runs here, before IRS reads the data (a wrong --image_folder gets its own message)
    data_module = make_supervised_data_module(
        tokenizer, data_args, args, image_processor, student.num_image_tokens, model_args.version
    )
    iva_layer = choose_iva_layer(args, data_args, model_args, student, teacher, tokenizer, image_processor)
    trainer = AlignTITrainer(model=student, args=args, processing_class=tokenizer, teacher=teacher,
                             iva_layer=iva_layer, vocab_size=vocab_size, **data_module)
    train_and_save(trainer, model_args, tokenizer, image_processor)


if __name__ == "__main__":
    main()
    end_distributed_run()
