"""lmms-eval model `llava_aligntI`: LLaVA-Qwen checkpoints (ours or the released Align-TI layout) in lmms-eval.

    python -m lmms_eval --model llava_aligntI --model_args pretrained=CKPT[,conv_template=qwen_2,dtype=bfloat16] \\
        --tasks gqa --batch_size 8

Design choices
- Registration: lmms-eval 0.7 reads `ModelManifest`s from the `lmms_eval.models` entry-point group
  (pyproject: `llava_aligntI = "llava.eval.lmms_eval_plugin:MANIFEST"`); `@register_model` alone is not
  seen by its registry. `MANIFEST` is built on first access (module `__getattr__`): `ModelManifest` lives in
  `lmms_eval.models.registry_v2`, whose package `__init__` loads every entry point, this one included, so
  importing it at the top would make the import order matter (this module imported first = half-initialised
  when the registry asks it for `MANIFEST`). Heavy imports (the model code) wait for the constructor, since
  lmms-eval loads this module for every run whatever model it evaluates.
- `generate_until` is `generate_answers` (the loop of every other evaluation here: typed conversation
  template, left padding, greedy = batched equals unbatched). Requests are grouped by task, split and
  generation settings, kept in order, and cut at the task's `until` strings afterwards.
- `loglikelihood` returns, per request, lmms-eval's (mean negative log-likelihood of the continuation tokens,
  whether greedy decoding gives them), the continuation placed right after the assistant's generation prompt.
  A loss, not a log-probability: lmms-eval's `multiple_choice` scoring takes the argmin, as its own LLaVA
  wrapper returns `outputs.loss`; equal to the `loss` of an unbatched forward with the continuation as
  labels (tested). Only continuation positions go through the lm_head (no [tokens x vocab] tensor).
  lmms-eval 0.7.3's evaluator passes every model output, and every `--use_cache` hit (a JSON list), through
  `unwrap_generation_output`, which turns any pair whose first item is not a string into `str(pair)`: so
  `multiple_choice` scoring fails for every model. The constructor wraps that function in
  `lmms_eval.evaluator` to pass (number, bool) pairs through as tuples; the wrapper is installed only when
  the installed lmms-eval shows that behaviour, and changes nothing else.
- Model args: `pretrained` (checkpoint folder), `model_base` (LoRA / projector-only), `conv_template`
  (default: the checkpoint's `config.conv_template`), `device` (default: the accelerator's device, so
  `accelerate launch --cpu` stays on CPU), `dtype` (`auto` = bfloat16 on CUDA, float32 elsewhere; or
  bf16/bfloat16, fp16/float16, fp32/float32), `batch_size` (an integer; `auto`/`auto:N` fall back to 1 with
  a warning), `max_new_tokens` (when a task sets none), `attn_implementation`. `batch_size` and `device`
  may be given both in `--model_args` and as lmms-eval's `--batch_size`/`--device`: `--model_args` wins.
  Under `accelerate launch` each process takes its own device and lmms-eval shards the requests.
- One image per sample (LLaVA-1.5 layout): extra images of a multi-image document are dropped with a
  warning.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lmms_eval.api.model import lmms

if TYPE_CHECKING:  # importing it for real would load every entry point (see the module docstring)
    from lmms_eval.models.registry_v2 import ModelManifest

logger = logging.getLogger(__name__)

MODEL_ID = "llava_aligntI"

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """`MANIFEST` (the entry point's payload), built on first access: see the module docstring."""
    if name == "MANIFEST":
        return _manifest()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _manifest() -> ModelManifest:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LlavaAlignTI")


def parse_batch_size(value: int | str | None) -> int:
    """An integer batch size; lmms-eval's `auto` / `auto:N` (no automatic search here) fall back to 1."""
    text = "1" if value is None else str(value).strip()
    if text == "auto" or text.startswith("auto:"):
        logger.warning(
            "%s has no automatic batch size (batch_size=%s): using 1; give an integer", MODEL_ID, text
        )
        return 1
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size must be an integer, 'auto' or 'auto:N', got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


def parse_dtype(dtype: str | None, device: str) -> torch.dtype:
    """`auto` (or None): bfloat16 on CUDA, float32 elsewhere; else one of `_DTYPES`' names."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _is_scored_pair(output: Any) -> bool:
    """A loglikelihood result: (number, bool), or the JSON list `--use_cache` stores it as."""
    return (
        isinstance(output, (tuple, list))
        and len(output) == 2
        and isinstance(output[0], (int, float))
        and not isinstance(output[0], bool)
        and isinstance(output[1], bool)
    )


def keep_loglikelihood_pairs() -> None:
    """Make lmms-eval's evaluator pass (number, bool) pairs through as tuples (see the module docstring).

    A no-op when the installed evaluator keeps them already (a fixed lmms-eval, or a second call)."""
    import lmms_eval.evaluator as evaluator

    unwrap: Callable[[Any], tuple[Any, Any]] = evaluator.unwrap_generation_output
    if not isinstance(unwrap((0.5, True))[0], str):
        return

    @functools.wraps(unwrap)
    def keep_pairs(output: Any) -> tuple[Any, Any]:
        if _is_scored_pair(output):
            return (float(output[0]), output[1]), None
        return unwrap(output)

    evaluator.unwrap_generation_output = keep_pairs


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any non-empty stop string (lmms-eval's `until`)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class LlavaAlignTI(lmms):
    """lmms-eval wrapper around `llava.model.builder.load_pretrained_model` and `generate_answers`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        model_base: str | None = None,
        conv_template: str | None = None,
        device: str | None = None,
        dtype: str | None = "auto",
        batch_size: int | str | None = 1,
        max_new_tokens: int | str = 128,
        attn_implementation: str | None = None,
        max_batch_size: int | str | None = None,  # passed by lmms-eval's CLI; batches are fixed-size here
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for {MODEL_ID}: {sorted(kwargs)}")
        from accelerate import Accelerator

        from llava.generation import default_conv_mode
        from llava.model.builder import load_pretrained_model

        keep_loglikelihood_pairs()
        batch_size_per_gpu = parse_batch_size(batch_size)  # checked before the (slow) load
        accelerator = Accelerator()
        # The accelerator's device by default: it honours `accelerate launch --cpu` and gives each process its GPU.
        device = str(device or accelerator.device)
        if accelerator.num_processes > 1:
            if device == "cuda":  # one GPU per process, not all on GPU 0
                device = f"cuda:{accelerator.local_process_index}"
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        torch_dtype = parse_dtype(dtype, device)
        self._tokenizer, self._model, self._image_processor, self._max_length = load_pretrained_model(
            pretrained,
            model_base,
            device=device,
            torch_dtype=torch_dtype,
            attn_implementation=attn_implementation,
        )
        self._model.eval()
        self.conv_template = conv_template or default_conv_mode(self._model)
        self.batch_size_per_gpu = batch_size_per_gpu
        self.max_new_tokens = int(max_new_tokens)
        logger.info(
            "%s: %s on %s (%s), template %s", MODEL_ID, pretrained, device, torch_dtype, self.conv_template
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LlavaAlignTI:
        """As lmms-eval's, but a key both in `--model_args` and from the CLI (`batch_size`, `device`: its
        `--batch_size` is always passed, default 1) takes the `--model_args` value instead of a TypeError."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key not in args:
                args[key] = value
            elif str(args[key]) != str(value):
                logger.warning("%s: %s=%s from --model_args, not %s", MODEL_ID, key, args[key], value)
        return cls(**args)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def max_length(self) -> int:
        return self._max_length

    # -------------------------------------------------------------------------------- requests
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual, task: str, split: str, doc_id: int):
        """The document's image (PIL, RGB) or None."""
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else None
        visuals = [v for v in (visuals or []) if v is not None]
        if len(visuals) > 1:
            logger.warning(
                "%s doc %s has %d images; the model takes one, using the first", task, doc_id, len(visuals)
            )
        if not visuals:
            return None
        if not hasattr(visuals[0], "convert"):
            raise TypeError(f"{task} doc {doc_id}: expected a PIL image, got {type(visuals[0]).__name__}")
        return visuals[0].convert("RGB")

    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, as the task asks) answers through `generate_answers`, in request order."""
        from llava.generation import generate_answers

        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, split = request.args
            groups[json.dumps([task, split, gen_kwargs], sort_keys=True, default=str)].append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature") or 0.0)
            if not gen_kwargs.get("do_sample", temperature > 0):
                temperature = 0.0
            questions = []
            for i in indices:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                questions.append({"text": context, "image": self._image(doc_to_visual, task, split, doc_id)})
            answers = generate_answers(
                self._model,
                self._tokenizer,
                self._image_processor,
                questions,
                conv_mode=self.conv_template,
                temperature=temperature,
                top_p=gen_kwargs.get("top_p"),
                num_beams=int(gen_kwargs.get("num_beams") or 1),
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                batch_size=self.batch_size,
                progress=self.rank == 0,
            )
            for i, answer in zip(indices, answers):
                results[i] = cut_at_stop(answer, until)
                self.cache_hook.add_partial(
                    "generate_until", (requests[i].args[0], requests[i].args[1]), results[i]
                )
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean NLL of the continuation given the context, is it greedy) for each request, batched."""
        items = []
        for request in requests:
            args = request.args
            if len(args) == 2:  # unconditional request (acc_mutual_info): text only, empty context
                context, continuation, image = args[0], args[1], None
            else:
                context, continuation, doc_to_visual, doc_id, task, split = args
                if callable(continuation):
                    continuation = continuation(self._doc(task, split, doc_id))
                image = self._image(doc_to_visual, task, split, doc_id)
            items.append((context, str(continuation), image))
        results = []
        for start in range(0, len(items), self.batch_size):
            results += self._loglikelihood_batch(items[start : start + self.batch_size])
        return results

    @torch.inference_mode()
    def _loglikelihood_batch(self, items: Sequence[tuple[str, str, Any]]) -> list[tuple[float, bool]]:
        from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
        from llava.conversation import get_conv_template, tokenize_conversation
        from llava.mm_utils import process_images

        model, tokenizer = self._model, self._tokenizer
        rows, images = [], []
        for context, continuation, image in items:
            conv = get_conv_template(self.conv_template)
            text = (
                context
                if image is None or DEFAULT_IMAGE_TOKEN in context
                else f"{DEFAULT_IMAGE_TOKEN}\n{context}"
            )
            conv.append_message(conv.roles[0], text)
            conv.append_message(conv.roles[1], None)  # generation prompt: the continuation follows it
            prompt = tokenize_conversation(conv, tokenizer)[0]
            target = torch.tensor(
                tokenizer(continuation, add_special_tokens=False).input_ids, dtype=torch.long
            )
            if len(target) == 0:
                raise ValueError(f"empty continuation {continuation!r} after tokenization")
            rows.append((prompt, target))
            if image is not None:
                aspect = getattr(model.config, "image_aspect_ratio", None) or "pad"
                images.append(process_images([image], self._image_processor, aspect)[0])
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # right padded
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        attention_mask = torch.zeros_like(input_ids)
        for b, (prompt, target) in enumerate(rows):
            n = len(prompt) + len(target)
            input_ids[b, :n] = torch.cat([prompt, target])
            labels[b, len(prompt) : n] = target
            attention_mask[b, :n] = 1
        device = self.device
        pixels = torch.stack(images).to(device, model.dtype) if images else None
        mm = model.prepare_inputs_labels_for_multimodal(
            input_ids.to(device), None, attention_mask.to(device), None, labels.to(device), pixels
        )
        hidden = model.get_model()(
            inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids
        ).last_hidden_state  # (B, T', H)
        targets = mm.labels[:, 1:]  # (B, T'-1): position j predicts token j + 1
        scored = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][scored]).float()  # (N_cont, V)
        wanted = targets[scored]
        token_nll = torch.nn.functional.cross_entropy(logits, wanted, reduction="none")  # (N_cont,)
        greedy = logits.argmax(dim=-1) == wanted
        row_of = scored.nonzero()[:, 0]  # sample index of every scored position
        out = []
        for b in range(len(rows)):
            mine = row_of == b
            out.append((float(token_nll[mine].mean()), bool(greedy[mine].all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID} does not implement multi-round generation")
