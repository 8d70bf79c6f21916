"""Conversation templates (`qwen_2`, `qwen_3`, `plain`) and typed tokenization.

One function, `tokenize_conversation`, turns LLaVA conversation turns into `input_ids`, `labels` (only
assistant tokens supervised) and the token-type map, segment by segment, so roles are never re-derived
from strings later. `Conversation.get_prompt()` keeps LLaVA's string API for scripts that want it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType


@dataclass
class Conversation:
    """A chat template. `style` is `chatml` (Qwen) or `plain` (LLaVA's pretraining: image then caption)."""

    name: str
    system: str
    roles: tuple[str, str] = ("user", "assistant")
    style: str = "chatml"
    messages: list[list] = field(default_factory=list)

    def copy(self) -> Conversation:
        return copy.deepcopy(self)

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def segments(self) -> list[tuple[str, TokenType]]:
        """The prompt as (text, type) pieces; `<image>` pieces become VISUAL."""
        out: list[tuple[str, TokenType]] = []
        if self.style == "plain":
            for role, msg in self.messages:
                if role == self.roles[0]:
                    out += _split_image(msg or "", TokenType.TEMPLATE)
                elif msg is not None:
                    out.append((msg + "\n", TokenType.RESPONSE))
            return out
        if self.system:
            out.append((f"<|im_start|>system\n{self.system}<|im_end|>\n", TokenType.TEMPLATE))
        for role, msg in self.messages:
            out.append((f"<|im_start|>{role}\n", TokenType.TEMPLATE))
            if msg is None:  # generation prompt
                break
            if role == self.roles[0]:
                out += _split_image(msg, TokenType.INSTRUCTION)
                out.append(("<|im_end|>\n", TokenType.TEMPLATE))
            else:
                out.append((msg + "<|im_end|>", TokenType.RESPONSE))
                out.append(("\n", TokenType.TEMPLATE))
        return out

    def get_prompt(self) -> str:
        return "".join(DEFAULT_IMAGE_TOKEN if t == TokenType.VISUAL else s for s, t in self.segments())


def _split_image(text: str, kind: TokenType) -> list[tuple[str, TokenType]]:
    """Split on `<image>`; whitespace around the tag is template, the rest keeps `kind`."""
    pieces: list[tuple[str, TokenType]] = []
    parts = text.split(DEFAULT_IMAGE_TOKEN)
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append((DEFAULT_IMAGE_TOKEN, TokenType.VISUAL))
        stripped = part.strip() if len(parts) > 1 else part
        if not stripped:
            if part:
                pieces.append((part, TokenType.TEMPLATE))
            continue
        lead, trail = part[: len(part) - len(part.lstrip())], part[len(part.rstrip()) :]
        if len(parts) > 1 and lead:
            pieces.append((lead, TokenType.TEMPLATE))
        pieces.append((stripped, kind))
        if len(parts) > 1 and trail:
            pieces.append((trail, TokenType.TEMPLATE))
    return pieces


def tokenize_conversation(conv: Conversation, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (input_ids [T], labels [T], token_types [T]); one IMAGE_TOKEN_INDEX per `<image>`."""
    ids: list[int] = []
    types: list[int] = []
    for text, kind in conv.segments():
        piece = [IMAGE_TOKEN_INDEX] if kind == TokenType.VISUAL else tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        types += [int(kind)] * len(piece)
    input_ids = torch.tensor(ids, dtype=torch.long)
    token_types = torch.tensor(types, dtype=torch.long)
    labels = torch.where(token_types == TokenType.RESPONSE, input_ids, IGNORE_INDEX)
    return input_ids, labels, token_types


conv_qwen_2 = Conversation(name="qwen_2", system="You are a helpful assistant.")
conv_qwen_3 = Conversation(name="qwen_3", system="")
conv_plain = Conversation(name="plain", system="", style="plain")

conv_templates: dict[str, Conversation] = {"qwen_2": conv_qwen_2, "qwen_3": conv_qwen_3, "plain": conv_plain}
default_conversation = conv_qwen_2


def get_conv_template(name: str) -> Conversation:
    try:
        return conv_templates[name].copy()
    except KeyError:
        raise ValueError(f"Unknown conversation template {name!r}; known: {sorted(conv_templates)}") from None
