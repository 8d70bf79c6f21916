"""DeepSpeed for distillation: the frozen teacher's inference engine and the student's lm_head held gathered.
The helpers every LLaVA training run shares (whole-model loading, gathering, the engine-routed forward, blank
images) are `llava.train.zero3`.

Design choices (DeepSpeed 0.19, transformers 5):
- Teacher: `deepspeed.initialize` with the training config minus optimizer and scheduler (at ZeRO stage 0
  unless the student is at stage 3) gives DeepSpeed's inference path (`DeepSpeedZeRoOffload`, no optimizer
  state): module hooks all-gather a submodule's weights when it is called and free them after. Only its
  submodules are ever called, so DeepSpeed records no module trace for it and fetches on demand.
- Student: its lm_head weight is registered as an external parameter of the whole student: gathered for the
  whole forward and backward, so the chunked losses and the TPA sampler read `.weight`
  (`zero.register_external_parameter`, DeepSpeed's documented way to use a weight outside its module), and the
  fused loss's dW reaches ZeRO-3's gradient hook through the parameter's own AccumulateGrad.
- Every ZeRO-3 module call is a collective, so the TPA sampler applies lm_head through its weight (one chunk
  or many) and the candidate pass always runs: no data-dependent call counts.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import TrainingArguments

from llava.train.zero3 import zero3_enabled

# DeepSpeed config keys that transformers fills from the model's hidden size when they say "auto"
# (transformers/integrations/deepspeed.py, HfTrainerDeepSpeedConfig.trainer_config_finalize).
HIDDEN_SIZE_AUTO = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}



def teacher_ds_config(train_config: dict, hidden_size: int, stage: int) -> dict:
    """The training DeepSpeed config for an inference-only engine at ZeRO `stage` (3 beside a stage-3 student,
    else 0): no optimizer or scheduler; same dtype and batch; hidden-size "auto" values filled from the teacher
    as transformers fills the student's."""
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}  # nothing to shard without gradients or optimizer state
    zero = config.setdefault("zero_optimization", {})
    for key, fill in HIDDEN_SIZE_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = fill(hidden_size)
    return config


def prepare_teacher(teacher: nn.Module, args: TrainingArguments) -> tuple[nn.Module, object | None]:
    """(teacher module, engine): under DeepSpeed the frozen teacher in an inference-only engine (ZeRO stage 3
    beside a stage-3 student, partitioned; stage 0 otherwise: DeepSpeed's dtype and device placement, weights
    broadcast from rank 0), which the caller must keep (`DeepSpeedEngine.__del__` removes ZeRO-3's hooks);
    without DeepSpeed (teacher, None)."""
    if not args.deepspeed:
        return teacher, None
    import deepspeed

    stage = 3 if zero3_enabled(args) else 0
    config = teacher_ds_config(args.hf_deepspeed_config.config, teacher.config.hidden_size, stage)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return engine.module.eval(), engine


def hold_lm_head(student: nn.Module, args: TrainingArguments) -> None:
    """Under ZeRO-3, keep the student's lm_head weight gathered through each forward and backward of the
    student (the chunked losses and the TPA sampler read it directly); a no-op otherwise."""
    if zero3_enabled(args):
        import deepspeed

        deepspeed.zero.register_external_parameter(student, student.get_output_embeddings().weight)
