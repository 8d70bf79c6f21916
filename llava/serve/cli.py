"""LLaVA's interactive CLI: chat about one image with a LLaVA-Qwen checkpoint, replies streamed.

    python -m llava.serve.cli --model-path CKPT --image-file photo.png [--conv-mode qwen_2] \\
        [--temperature 0.2] [--max-new-tokens 512] [--device cpu]

The image is attached to the first user turn (`<image>\\n` + message) and the whole conversation is
re-tokenized with `tokenize_conversation` every turn, so later turns see it and all earlier replies.
An empty line or end of input ends the chat. Without `--image-file` the chat is text-only.
"""

from __future__ import annotations

import argparse
import logging

import torch
from PIL import Image
from transformers import TextStreamer

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template, tokenize_conversation
from llava.generation import default_conv_mode, generation_kwargs
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model


def main(args: argparse.Namespace) -> None:
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, args.model_base, device=args.device
    )
    conv = get_conv_template(args.conv_mode or default_conv_mode(model))
    image_tensor = None
    if args.image_file:
        image = Image.open(args.image_file).convert("RGB")
        aspect = getattr(model.config, "image_aspect_ratio", None) or "pad"
        image_tensor = process_images([image], image_processor, aspect).to(model.device, dtype=model.dtype)
    gen_kwargs = generation_kwargs(model, tokenizer, args.temperature, None, 1, args.max_new_tokens)
    user, assistant = conv.roles

    while True:
        try:
            message = input(f"{user}: ")
        except EOFError:
            message = ""
        if not message:
            print("exit...")
            break
        message = message.replace(DEFAULT_IMAGE_TOKEN, "")  # the image is attached below, never typed
        if image_tensor is not None and not conv.messages:  # the image goes with the first turn only
            message = DEFAULT_IMAGE_TOKEN + "\n" + message
        conv.append_message(user, message)
        conv.append_message(assistant, None)
        input_ids = tokenize_conversation(conv, tokenizer)[0].unsqueeze(0).to(model.device)  # (1, T)
        print(f"{assistant}: ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            output_ids = model.generate(input_ids, images=image_tensor, streamer=streamer, **gen_kwargs)
        reply = tokenizer.decode(output_ids[0], skip_special_tokens=True).strip()
        conv.messages[-1][-1] = reply
        if args.debug:
            print("\n", {"prompt": conv.get_prompt(), "outputs": reply}, "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="checkpoint folder or hub id (org/name[@rev])")
    parser.add_argument("--model-base", default=None, help="base LLM for projector-only or LoRA checkpoints")
    parser.add_argument("--image-file", default=None, help="local image to chat about (omit for text only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--debug", action="store_true", help="print the prompt and reply after each turn")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(parse_args())
