"""A Qwen-style byte-level BPE tokenizer trained on the tiny world's text (no hub download needed).

Design choices
- Same shape as Qwen2's tokenizer at a tiny vocabulary: Qwen2's pre-tokenizer regex (digits split one by
  one, so "13" is "1" "3") followed by byte-level mapping, BPE over all 256 bytes (any string round-trips),
  the ByteLevel decoder, and Qwen's special tokens ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>``
  (eos), each a single id; no normalizer, so ``decode(encode(x)) == x`` exactly.
- ChatML chat template, as Qwen2-Instruct: default system prompt "You are a helpful assistant.",
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, generation prompt ``<|im_start|>assistant\\n``.
- The BPE is trained on role and content strings separately, never on rendered templates, so the special
  tokens never enter the merges. ``<image>`` is not a token (the data pipeline splits on it) and is
  removed from the training text.
- Idempotent: ``build_info.json`` (written last) records a hash of the inputs; a folder built from the same
  inputs is loaded instead of retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

TOKENIZER_VERSION = 1
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2's pre-tokenization pattern (tokenizer.json of Qwen/Qwen2-0.5B).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2-Instruct's template (tool calls left out).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nSYSTEM<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORLD_FILES = ("pretrain.json", "finetune.json", "val.json", "test.json")
ROLES = {"human": "user", "gpt": "assistant"}


def chat_template(system: str = DEFAULT_SYSTEM) -> str:
    """Qwen2's ChatML template with `system` as the default system prompt."""
    assert "'" not in system and "\\" not in system, "system prompt must not contain quotes or backslashes"
    return CHAT_TEMPLATE.replace("SYSTEM", system)


def _input_hash(texts: list[str], vocab_size: int, model_max_length: int, system: str) -> str:
    digest = hashlib.sha256(json.dumps([TOKENIZER_VERSION, vocab_size, model_max_length, system]).encode())
    for t in texts:
        digest.update(t.encode() + b"\0")
    return digest.hexdigest()


def train_tokenizer(
    texts: Iterable[str],
    out_dir: Path | str,
    vocab_size: int = 1024,
    model_max_length: int = 2048,
    system: str = DEFAULT_SYSTEM,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, save it to `out_dir` and return it as loaded by AutoTokenizer."""
    texts = list(texts)
    assert vocab_size >= 256 + len(SPECIAL_TOKENS), (
        "vocab_size must cover the 256 bytes and the special tokens"
    )
    out_dir = Path(out_dir)
    info_path = out_dir / "build_info.json"
    input_hash = _input_hash(texts, vocab_size, model_max_length, system)
    if info_path.is_file() and json.loads(info_path.read_text())["input_hash"] == input_hash:
        logger.info("tokenizer already built at %s", out_dir)
        return AutoTokenizer.from_pretrained(out_dir)
    info_path.unlink(missing_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        add_prefix_space=False,
    )
    fast.chat_template = chat_template(system)
    fast.save_pretrained(out_dir)
    tmp = info_path.with_name(info_path.name + ".tmp")
    tmp.write_text(
        json.dumps({"input_hash": input_hash, "vocab_size": len(fast), "n_texts": len(texts)}, indent=1)
    )
    os.replace(tmp, info_path)
    logger.info("trained a %d-token tokenizer on %d texts into %s", len(fast), len(texts), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def world_texts(world_dir: Path | str, system: str = DEFAULT_SYSTEM) -> list[str]:
    """Every role header and conversation turn of the world's JSON files, ``<image>`` removed."""
    world_dir = Path(world_dir)
    texts = [f"system\n{system}", "user\n", "assistant\n"]
    for name in WORLD_FILES:
        for record in json.loads((world_dir / name).read_text(encoding="utf-8")):
            for turn in record["conversations"]:
                texts.append(turn["value"].replace("<image>\n", "").replace("<image>", ""))
    return texts


def build_tiny_tokenizer(
    world_dir: Path | str, out_dir: Path | str, vocab_size: int = 1024, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train (or load, if already built from the same text) the tiny tokenizer for a generated world."""
    return train_tokenizer(
        world_texts(world_dir), out_dir, vocab_size=vocab_size, model_max_length=model_max_length
    )
