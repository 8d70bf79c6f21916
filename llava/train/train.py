"""LLaVA training entry (pretrain and finetune stages): parse, build, wrap, train, save.

    python -m llava.train.train --model_name_or_path LLM --version qwen_2 --data_path D.json
        --image_folder IMGS --vision_tower SIGLIP [--tune_mm_mlp_adapter True] --output_dir OUT ...

The pretrain stage (`--tune_mm_mlp_adapter True`) saves the projector (`mm_projector.safetensors`), the
finetune stage a full checkpoint; both resume from the newest complete `checkpoint-N` in `output_dir` (or from
the checkpoint `--resume_from_checkpoint` names; `--resume_from_checkpoint False` starts afresh).
Under DeepSpeed ZeRO-3 the model loads whole and is partitioned when the trainer wraps it, as in distillation
(`llava.train.zero3`); every rank takes part in the final save, which gathers the weights rank 0 writes.
"""

from __future__ import annotations

import logging
import os

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from llava.hub import resolve_dir
from llava.model import llava_class_for
from llava.model.checkpoint import KEY_RENAMES
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.train.arguments import DataArguments, ModelArguments, TrainingArguments, check_trainable_attention
from llava.train.data import make_supervised_data_module
from llava.train.distributed import end_distributed_run
from llava.train.llava_trainer import (
    LLaVATrainer,
    atomic_save,
    parse_resume_flag,
    resume_checkpoint,
    set_aside_checkpoints,
)
from llava.train.lora import apply_lora, save_lora
from llava.train.zero3 import check_full_save, gathered, whole_weights

logger = logging.getLogger(__name__)


def training_dtype(args: TrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def build_model(model_args: ModelArguments, training_args: TrainingArguments):
    """LLM (or LLaVA-Qwen checkpoint) -> LLaVA-Qwen model with vision tower and projector attached."""
    check_trainable_attention(model_args.attn_implementation, training_args.device)
    path = resolve_dir(model_args.model_name_or_path, "--model_name_or_path")  # a local dir or a hub id
    cls = llava_class_for(AutoConfig.from_pretrained(path).model_type)
    model = cls.from_pretrained(
        path,
        dtype=training_dtype(training_args),
        attn_implementation=model_args.attn_implementation,
        key_mapping=KEY_RENAMES,
    )
    model.config.use_cache = False
    if model_args.vision_tower:
        model.get_model().initialize_vision_modules(model_args)
    elif model.get_vision_tower() is None:
        raise ValueError(f"{path} has no vision tower: pass --vision_tower (a SigLIP checkpoint dir or hub id)")
    return model


def set_trainable(model, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Pretrain: projector only. Finetune: LLM + projector. The vision tower stays frozen unless asked."""
    model.requires_grad_(not model_args.freeze_backbone)
    model.get_model().mm_projector.requires_grad_(not training_args.freeze_mm_mlp_adapter)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.get_model().mm_projector.requires_grad_(True)
    model.get_vision_tower().requires_grad_(model_args.tune_vision_tower)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()


def build_tokenizer(model_args: ModelArguments, training_args: TrainingArguments, model):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_dir(model_args.model_name_or_path, "--model_name_or_path"),
        model_max_length=training_args.model_max_length, padding_side="right",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(f"Tokenizer has {len(tokenizer)} tokens but {model_args.model_name_or_path} has {rows} rows")
    return tokenizer


def record_config(model, model_args, data_args, training_args) -> None:
    """What inference needs to rebuild the inputs exactly as in training."""
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = training_args.model_max_length
    model.config.conv_template = model_args.version if model_args.version != "plain" else None


def save_model(trainer: LLaVATrainer, model_args: ModelArguments, tokenizer, image_processor) -> None:
    """Pretrain stage: the projector (+config). Finetune: full checkpoint + tokenizer + image processor.
    LoRA: adapter + non-LoRA trainables + tokenizer. Every rank calls it: ZeRO-3 gathers collectively."""
    out = trainer.args.output_dir
    model = trainer.model

    def write(tmp: str) -> None:
        if trainer.args.lora_enable:
            save_lora(model, tmp)
            tokenizer.save_pretrained(tmp)
        elif model_args.tune_mm_mlp_adapter:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "mm_projector" in k}
            save_file(state, os.path.join(tmp, "mm_projector.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
        else:
            trainer.save_model(tmp)
            tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)

    if trainer.args.lora_enable or model_args.tune_mm_mlp_adapter:
        # rank 0 reads these weights directly: under ZeRO-3 every rank must join their gather first
        with gathered(*(p for p in model.parameters() if p.requires_grad)):
            if trainer.is_world_process_zero():
                atomic_save(write, out)
    elif trainer.is_world_process_zero():
        atomic_save(write, out)
    else:
        trainer.save_model(out)  # the other ranks' side of its ZeRO-3 gather; only rank 0 writes


def train_and_save(trainer, model_args: ModelArguments, tokenizer, image_processor) -> None:
    """Train, then save the result. `--resume_from_checkpoint`: unset = from the newest complete checkpoint of
    output_dir, if any; a path = from that checkpoint; False = a fresh run (output_dir's checkpoints set aside)."""
    args = trainer.args
    wanted = parse_resume_flag(args.resume_from_checkpoint)
    resume = resume_checkpoint(args.output_dir, wanted)
    if resume and wanted:
        logger.info("Resuming from %s (as asked)", resume)
    elif resume:
        logger.info("Resuming from %s (the newest complete checkpoint of output_dir; --resume_from_checkpoint False "
                    "starts afresh)", resume)
    elif wanted is False and args.should_save:
        moved = set_aside_checkpoints(args.output_dir)
        aside = f"; the checkpoints already in {args.output_dir} were moved to {moved} (not resumed, not rotated)"
        logger.warning("--resume_from_checkpoint False: a fresh run%s", aside if moved else "")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    save_model(trainer, model_args, tokenizer, image_processor)


def train() -> None:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    # fresh weights (a new projector, LoRA adapters) depend on --seed only, not on the launcher or process count
    transformers.set_seed(training_args.seed)

    # ZeRO-3: loaded whole (full shapes for the checks below), partitioned when the trainer wraps it. Loading
    # under transformers' zero.Init instead would, on CPU, build its DeepSpeed config before deepspeed.comm is
    # up (accelerate starts only torch.distributed there), see world size 1 and fail DeepSpeed's batch check.
    check_full_save(training_args, not (model_args.tune_mm_mlp_adapter or training_args.lora_enable))
    with whole_weights(training_args):
        model = build_model(model_args, training_args)
    set_trainable(model, model_args, training_args)
    if training_args.lora_enable:
        model = apply_lora(model, training_args.lora_r, training_args.lora_alpha, training_args.lora_dropout,
                           training_args.lora_bias)
    tokenizer = build_tokenizer(model_args, training_args, model)
    image_processor = load_image_processor(model_args.vision_tower or model.get_vision_tower().config)
    record_config(model, model_args, data_args, training_args)
    data_module = make_supervised_data_module(
        tokenizer, data_args, training_args, image_processor, model.num_image_tokens, model_args.version
    )
    trainer = LLaVATrainer(model=model, args=training_args, processing_class=tokenizer, **data_module)
    train_and_save(trainer, model_args, tokenizer, image_processor)


if __name__ == "__main__":
    train()
    end_distributed_run()
