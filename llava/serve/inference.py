"""The demo's chat logic, free of gradio: upload checks, the conversation, streamed replies and focus maps.

Design choices
- An upload is accepted only if it is at most `max_bytes` on disk, PIL decodes it fully, and it has at most
  `MAX_IMAGE_PIXELS` pixels (checked from the header before decoding, against decompression bombs); it is
  then converted to RGB. Anything else raises `UploadError`, whose message is meant for the page.
- The image belongs to the first user turn (`<image>\\n` + question), as in the CLI and in training; the
  whole conversation is re-tokenized every turn with `tokenize_conversation`, so later turns see it all.
- Replies stream through `TextIteratorStreamer` from a generation thread. An exception in that thread ends
  the stream and is re-raised in the caller, so a model error reaches the page instead of hanging it.
  Closing the stream early (the page cancelled it, the client went away, the conversation was cleared)
  sets an event that a stopping criterion checks after every token, so the thread stops too.
- A `ChatState` is reset in place (`reset`), never replaced, and counts its conversations: gradio hands every
  event of a session the same object, so a reply still streaming for an older conversation sees the new
  count and must not write its answer into the new one.
- One `ChatModel` per checkpoint (student, optional teacher): the teacher only contributes a focus map
  (its own tokenizer, template and layer), as in the paper's Fig. 8; the student answers.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event, Thread

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import Conversation, get_conv_template, tokenize_conversation
from llava.generation import default_conv_mode, generation_kwargs
from llava.mm_utils import process_images
from llava.serve.focus import FocusReader, focus_batch, focus_heatmap, load_focus_reader

__all__ = [
    "MAX_UPLOAD_BYTES",
    "ChatModel",
    "ChatState",
    "UploadError",
    "build_conversation",
    "load_upload",
    "stream_reply",
    "tiny_world_examples",
]

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # about 6300 x 6300; PIL's own bomb check only starts at ~89 M
STREAM_TIMEOUT_S = 600.0  # seconds without a new token before the stream gives up


class UploadError(ValueError):
    """A rejected upload; the message is shown to the user as it is."""


def load_upload(
    path: str | os.PathLike, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """The uploaded file as an RGB PIL image, or `UploadError` saying why not."""
    name = Path(path).name
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadError(
            f"'{name}' is {size / 2**20:.1f} MB: images up to {max_bytes / 2**20:.0f} MB are accepted."
        )
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise UploadError(
                    f"'{name}' is {image.width} x {image.height} pixels: at most {max_pixels:,} pixels are accepted."
                )
            image.load()  # decode now: a truncated or corrupt file fails here, not in the model
            return image.convert("RGB")
    except UploadError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own check, at open, far above max_pixels
        raise UploadError(f"'{name}' has too many pixels: at most {max_pixels:,} are accepted.") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UploadError(
            f"'{name}' is not an image file that can be read (PNG, JPEG, WebP, GIF...)."
        ) from err


@dataclass
class ChatModel:
    """A loaded checkpoint with what the demo needs to prompt it and to read its focus."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    conv_mode: str
    focus: FocusReader | None  # the visual-focus plugin (None: no focus maps)
    focus_layer: int | None
    name: str = "student"

    @classmethod
    def load(
        cls, model_path: str, model_base: str | None = None, device: str = "cpu",
        iva_layer: str | int = "auto", name: str = "student", conv_mode: str | None = None,
    ) -> ChatModel:  # fmt: skip
        from llava.model.builder import load_pretrained_model

        tokenizer, model, image_processor, _ = load_pretrained_model(model_path, model_base, device=device)
        focus = load_focus_reader()
        layer = focus.resolve_layer(iva_layer, model, model_path) if focus is not None else None
        return cls(model, tokenizer, image_processor, conv_mode or default_conv_mode(model), focus, layer, name)

    @property
    def image_aspect_ratio(self) -> str:
        return getattr(self.model.config, "image_aspect_ratio", None) or "pad"

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) pixels as this model's image processor makes them."""
        return process_images([image], self.image_processor, self.image_aspect_ratio)[0]

    def focus_map(self, state: ChatState) -> Image.Image:
        """The last question's instruction->vision attention (Eq. 3) drawn over the image."""
        if state.image is None:
            raise ValueError("no image: upload one first")
        if self.focus is None:
            raise ValueError("no visual-focus plugin is installed (entry point group llava.visual_focus; "
                             "`pip install -e .` installs Align-TI's)")
        conv = build_conversation(self.conv_mode, state.history, has_image=True, generation_prompt=True)
        batch = focus_batch(self.model, self.tokenizer, conv, self.pixels(state.image))
        alpha = self.focus.alpha(self.model, batch, self.focus_layer)[0].float().cpu()  # (N_v,)
        background = tuple(int(x * 255) for x in self.image_processor.image_mean)
        return focus_heatmap(state.image, alpha, self.image_aspect_ratio, background)


@dataclass
class ChatState:
    """One browser session: its image and its turns ([question, answer]; the answer of the turn being
    answered is None). `retry` is a question whose answer failed (Regenerate asks it again); `conversation`
    counts `reset`s."""

    image: Image.Image | None = None
    history: list[list[str | None]] = field(default_factory=list)
    retry: str | None = None
    conversation: int = 0

    def reset(self, image: Image.Image | None = None) -> None:
        """Start a new conversation (on `image`) in this same object: see the module docstring."""
        self.image, self.history, self.retry = image, [], None
        self.conversation += 1

    def messages(self) -> list[dict[str, str]]:
        """The turns as chat messages ({"role", "content"}), the pending answer left out."""
        out = []
        for question, answer in self.history:
            out.append({"role": "user", "content": question})
            if answer is not None:
                out.append({"role": "assistant", "content": answer})
        return out


def build_conversation(
    conv_mode: str, history: list[list[str | None]], has_image: bool, generation_prompt: bool = True
) -> Conversation:
    """The conversation of `history`, the image token in the first user turn; with `generation_prompt` the
    last turn's answer is left open for the model. A literal `<image>` typed by the user is dropped: the page
    attaches the image, and an extra placeholder would ask for an image that is not there."""
    conv = get_conv_template(conv_mode)
    for i, (question, answer) in enumerate(history):
        question = question.replace(DEFAULT_IMAGE_TOKEN, "")
        conv.append_message(
            conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}" if has_image and i == 0 else question
        )
        last = i == len(history) - 1
        conv.append_message(conv.roles[1], None if last and generation_prompt else answer or "")
    return conv


class _StopOnEvent(StoppingCriteria):
    """Ends `generate` after the current token once `event` is set."""

    def __init__(self, event: Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def stream_reply(
    chat: ChatModel, state: ChatState, temperature: float = 0.2, top_p: float | None = 0.7,
    max_new_tokens: int = 256,
) -> Iterator[str]:  # fmt: skip
    """Yield the growing reply to the last question of `state` (the text so far, each time). Closing the
    iterator early stops the generation thread within a token."""
    model, tokenizer = chat.model, chat.tokenizer
    conv = build_conversation(chat.conv_mode, state.history, state.image is not None, generation_prompt=True)
    input_ids = tokenize_conversation(conv, tokenizer)[0][None].to(model.device)  # (1, T)
    images = None
    if state.image is not None:
        images = chat.pixels(state.image)[None].to(model.device, model.dtype)  # (1, 3, H, W)
    kwargs = generation_kwargs(
        model, tokenizer, temperature, top_p if temperature > 0 else None, 1, max_new_tokens
    )
    streamer = TextIteratorStreamer(
        tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S
    )
    stop = Event()
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids,
                    images=images,
                    attention_mask=torch.ones_like(input_ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                    **kwargs,
                )
        except Exception as err:  # handed to the caller below: the page must hear of it
            errors.append(err)
            streamer.end()

    thread = Thread(target=generate, name="demo-generate", daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:  # also when the reader closes this iterator early: the thread ends after its current token
        stop.set()  # (not joined here: gradio closes iterators on its event loop, which must not wait)
    thread.join()
    if errors:
        raise errors[0]


def tiny_world_examples(world_dir: str | os.PathLike, limit: int = 4) -> list[tuple[str, str]]:
    """(image path, question) pairs from a generated tiny world's test split, one per question family;
    empty when `world_dir` holds no world."""
    path = Path(world_dir) / "test.json"
    if not path.is_file():
        return []
    examples: dict[str, tuple[str, str]] = {}
    for record in json.loads(path.read_text(encoding="utf-8")):
        family = record.get("family")
        image = Path(world_dir) / "images" / record.get("image", "")
        if family in examples or not image.is_file() or family == "choice":
            continue
        question = record["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        examples[family] = (str(image.resolve()), question)
        if len(examples) == limit:
            break
    return list(examples.values())
