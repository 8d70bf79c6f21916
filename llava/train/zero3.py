"""DeepSpeed ZeRO-3 and multi-process helpers of LLaVA training: whole-model loading, gathered weights, the
compute routed through the engine, and the same module calls on every rank. Every helper is a no-op in a
single process; the last two serve every multi-process run (DDP, ZeRO-2, ZeRO-3).

Design choices (DeepSpeed 0.19, transformers 5):
- Models load whole (`whole_weights` turns transformers' `zero.Init` off while they load) and are partitioned
  when DeepSpeed wraps them: `zero.Init(module=...)` moves one parameter at a time to the device and keeps its
  shard, so GPU memory never holds a whole model; each process holds one CPU copy while loading. Loading code
  then reads full shapes (tokenizer rows, projector and SigLIP weights) unchanged. Loading under transformers'
  zero.Init instead would, on CPU, build its DeepSpeed config before deepspeed.comm is up (accelerate starts
  only torch.distributed there), see world size 1 and fail DeepSpeed's batch check.
- A trainer that calls submodules (prepare, decoder, extra passes) rather than `model(**inputs)` runs that
  compute as the model's forward called through its engine (`through_wrapper`), so the engine's forward
  bookkeeping (ZeRO-3's micro-step counter for gradient accumulation, its backward hooks; DDP's
  gradient-sync preparation) runs as for `model(**inputs)`.
- Every ZeRO-3 module call and gather is a collective: all ranks must make the same calls in the same order
  (DeepSpeed also checks that the recorded module trace is equal on all ranks). Data-dependent counts are
  therefore avoided: a micro-batch without images encodes one blank image (`needs_blank_image`, which ZeRO-2
  needs too: its gradient reduction aborts when one rank has no projector gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from transformers import TrainingArguments

T = TypeVar("T")

def zero3_enabled(args: TrainingArguments) -> bool:
    return bool(args.deepspeed) and args.hf_deepspeed_config.is_zero3()


def check_full_save(args: TrainingArguments, full_checkpoint: bool) -> None:
    """Fail before training when a ZeRO-3 run could not write its full checkpoint as safetensors: without
    `stage3_gather_16bit_weights_on_model_save` transformers writes DeepSpeed shards instead, hours later."""
    if not (full_checkpoint and zero3_enabled(args)):
        return
    zero = args.hf_deepspeed_config.config.get("zero_optimization", {})
    if not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise ValueError(
            f"DeepSpeed config {args.deepspeed}: a ZeRO-3 run that saves a full checkpoint needs "
            '"zero_optimization": {"stage3_gather_16bit_weights_on_model_save": true} (scripts/zero3.json sets it)'
        )


@contextmanager
def whole_weights(args: TrainingArguments) -> Iterator[None]:
    """Inside, `from_pretrained` builds whole models even under ZeRO-3 (see the module docstring)."""
    if not zero3_enabled(args):
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # what `is_deepspeed_zero3_enabled()` reads in from_pretrained
    try:
        yield
    finally:
        set_hf_deepspeed_config(args.hf_deepspeed_config)


@contextmanager
def gathered(*params: torch.Tensor | None) -> Iterator[None]:
    """Full tensors for direct reads of ZeRO-3 partitioned parameters (read-only); a no-op for others.

    Only parameters not already available are gathered: one that DeepSpeed's hooks hold for a running
    module stays theirs (`GatheredParameters` partitions everything it gathered on exit).
    """
    zero = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not zero:
        yield
        return
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [p for p in zero if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(missing, enabled=bool(missing)):
        yield


def through_wrapper(wrapper: nn.Module, module: nn.Module, fn: Callable[..., T], *args) -> T:
    """`fn(*args)` run as `module`'s forward, called through `wrapper` (a DeepSpeed engine or DDP).

    The trainer calls submodules (prepare, decoder, candidate pass) rather than `module(**inputs)`; going
    through the wrapper's forward keeps its bookkeeping (module docstring). `module.forward` is restored
    after. Lightning's and TRL's "forward redirection".
    """
    if wrapper is module:
        return fn(*args)
    own = vars(module).get("forward")  # accelerate may have patched the instance's forward
    module.forward = fn
    try:
        return wrapper(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def needs_blank_image(images: torch.Tensor | None, args: TrainingArguments) -> bool:
    """Whether a micro-batch must run the vision path on one blank image (`vision_in_step=True` of
    `prepare_inputs_labels_for_multimodal`): a text-only micro-batch in a multi-process run.

    Every rank then calls the vision tower, projector and embedding in the same order (ZeRO-3: each call is a
    collective, and DeepSpeed checks the module trace across ranks) and the projector gets a zero gradient
    (ZeRO-2 and DDP reduce the same parameters on every rank: a rank without one aborts the reduction).
    """
    return images is None and args.world_size > 1
