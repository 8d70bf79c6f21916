"""`python -m llava.export`: the transformers-native LLaVA checkpoint gives our prompts, pixels, logits and greedy
replies, loaded with transformers' Auto classes alone (in a subprocess where `llava` and `aligntI_patch` cannot
be imported).

Cases: Qwen2 with tied embeddings and spare lm_head rows (Qwen2-0.5B's shape); Qwen3 with no spare row (the
image token grows the vocabulary by one row); a projector-only Qwen2 checkpoint on a plain-LLM base whose tower
is named by path in config.json (LLaVA's pretrain-stage layout).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from llava import export as llava_export
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_conv_template
from llava.generation import QuestionDataset, generation_kwargs
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import mini_llava, save_mini_checkpoint, save_projector_only

QUESTION = "What color is the circle?"
MAX_NEW = 8
CASES = ("qwen2", "qwen3", "tower_by_path")

# Runs in a fresh interpreter: transformers only. Our packages are made unimportable first.
THEIRS = r'''
import importlib.abc, json, sys
BLOCKED = ("llava", "aligntI_patch")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: the export must load without this project", name=name)

sys.meta_path.insert(0, Block())
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

spec = json.loads(sys.argv[1])
image = Image.open(spec["image"])
results = {}
for name, out in spec["exports"].items():
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    rows = {"class": type(model).__module__ + "." + type(model).__name__, "config": model.config.to_dict()}
    for kind, content in (("image", [{"type": "image"}, {"type": "text", "text": spec["question"]}]),
                          ("text", [{"type": "text", "text": spec["question"]}])):
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=prompt, images=image if kind == "image" else None, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]
            generated = model.generate(**inputs, max_new_tokens=spec["max_new"], do_sample=False)
        rows[kind] = {"prompt": prompt, "input_ids": inputs["input_ids"][0], "pixel_values": inputs.get("pixel_values"),
                      "logits": logits, "new_tokens": generated[0, inputs["input_ids"].shape[1]:]}
    results[name] = rows
results["loaded_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
torch.save(results, spec["results"])
'''


def _tower_by_path(tokenizer, root: Path) -> tuple[Path, Path]:
    """A projector-only checkpoint whose config names its SigLIP tower by directory (no embedded tower config)
    and a plain Qwen2 base; the tower's weights come from that directory only."""
    model = mini_llava(tokenizer, "qwen2", seed=2)
    tower_dir = root / "siglip"
    model.get_vision_tower().vision_tower.save_pretrained(tower_dir)
    load_image_processor(model.get_vision_tower().config).save_pretrained(tower_dir)
    model.config.mm_vision_tower, model.config.mm_vision_config = str(tower_dir), None
    base, proj = save_projector_only(model, tokenizer, root / "layout")
    return proj, base


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """{case: (checkpoint, base or None, export dir)}; the qwen2 case goes through the command line."""
    root = tmp_path_factory.mktemp("export")
    qwen2 = save_mini_checkpoint(mini_llava(tokenizer, "qwen2", tie_word_embeddings=True), tokenizer, root / "q2")
    qwen3 = save_mini_checkpoint(
        mini_llava(tokenizer, "qwen3", seed=1, vocab_size=len(tokenizer)), tokenizer, root / "q3"
    )
    sources = {"qwen2": (qwen2, None), "qwen3": (qwen3, None), "tower_by_path": _tower_by_path(tokenizer, root)}
    cases = {}
    for name, (ckpt, base) in sources.items():
        out = root / f"{name}_hf"
        if name == "qwen2":
            llava_export.main(["--model-path", str(ckpt), "--output-dir", str(out)])
        else:
            llava_export.export(ckpt, out, model_base=base)
        cases[name] = (ckpt, base, out)
    return cases


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    """A non-square image, so `image_aspect_ratio=pad` matters."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("image") / "wide.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def theirs(exported, image_path, tmp_path_factory) -> dict:
    """Prompts, inputs, logits and greedy replies from the exports, computed by transformers alone."""
    results = tmp_path_factory.mktemp("theirs") / "results.pt"
    spec = {"exports": {name: str(out) for name, (_, _, out) in exported.items()}, "image": str(image_path),
            "question": QUESTION, "max_new": MAX_NEW, "results": str(results)}
    proc = subprocess.run([sys.executable, "-c", THEIRS, json.dumps(spec)], cwd=results.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(results, weights_only=False)


def _ours(ckpt: Path, base: Path | None, image: Image.Image | None):
    """Our evaluation path: load_pretrained_model, QuestionDataset's prompt and pixels, forward and generate."""
    tokenizer, model, image_processor, _ = load_pretrained_model(str(ckpt), None if base is None else str(base),
                                                                 device="cpu")
    question = {"text": QUESTION} if image is None else {"text": QUESTION, "image": image}
    conv_mode = model.config.conv_template
    input_ids, pixels = QuestionDataset([question], "", tokenizer, image_processor, conv_mode)[0]
    input_ids = input_ids[None]
    images = None if pixels is None else pixels[None]
    with torch.no_grad():
        logits = model(input_ids=input_ids, images=images).logits[0]
        new_tokens = model.generate(input_ids, images=images, attention_mask=torch.ones_like(input_ids),
                                    **generation_kwargs(model, tokenizer, max_new_tokens=MAX_NEW))[0]
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], QUESTION if image is None else "<image>\n" + QUESTION)
    conv.append_message(conv.roles[1], None)
    return {"prompt": conv.get_prompt(), "input_ids": input_ids[0], "pixel_values": images, "logits": logits,
            "new_tokens": new_tokens}


def test_export_loads_without_this_project(theirs):
    assert theirs["loaded_modules"] == []
    for name in CASES:
        assert theirs[name]["class"] == "transformers.models.llava.modeling_llava.LlavaForConditionalGeneration"
        config = theirs[name]["config"]
        assert (config["model_type"], config["architectures"]) == ("llava", ["LlavaForConditionalGeneration"])
        assert config["vision_config"]["model_type"] == "siglip_vision_model"
        assert config["text_config"]["model_type"] == ("qwen3" if name == "qwen3" else "qwen2")
        assert config["vision_feature_select_strategy"] == "full" and config["image_seq_length"] == 16


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["image", "text"])
def test_export_matches_ours(exported, theirs, image_path, case, kind):
    """Same prompt text, same tokens (their N_v `<image>` ids = our one IMAGE_TOKEN_INDEX), same pixels, logits
    over our vocabulary within 1e-5 (fp32) at every position, same greedy reply."""
    ckpt, base, _ = exported[case]
    ours = _ours(ckpt, base, Image.open(image_path) if kind == "image" else None)
    got = theirs[case][kind]
    image_id = theirs[case]["config"]["image_token_index"]
    assert got["prompt"] == ours["prompt"]
    ids = got["input_ids"]
    is_image = ids == image_id
    assert int(is_image.sum()) == (16 if kind == "image" else 0)
    collapsed = ids[~is_image | (torch.cumsum(is_image.long(), 0) == 1)]  # one id per image, as ours
    assert collapsed.masked_fill(collapsed == image_id, IMAGE_TOKEN_INDEX).tolist() == ours["input_ids"].tolist()
    if kind == "image":
        torch.testing.assert_close(got["pixel_values"], ours["pixel_values"], rtol=0, atol=0)
    vocab = ours["logits"].shape[-1]
    assert got["logits"].shape[0] == ours["logits"].shape[0]
    diff = (got["logits"][:, :vocab] - ours["logits"]).abs().max().item()
    assert diff <= 1e-5, f"max |logit difference| {diff:.2e}"
    assert got["new_tokens"].tolist() == ours["new_tokens"].tolist()


def test_export_files(exported):
    """safetensors, the source dtype, the image token grown only where the lm_head had no spare row."""
    for name, (_, _, out) in exported.items():
        assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
        with safe_open(str(out / "model.safetensors"), "pt") as f:  # the llava-hf layout of the hub
            prefixes = {k.split(".")[0] for k in f.keys()}
            tower = [k for k in f.keys() if k.startswith("vision_tower.")]
        assert prefixes == {"language_model", "multi_modal_projector", "vision_tower"}
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
        config = json.loads((out / "config.json").read_text())
        generation = json.loads((out / "generation_config.json").read_text())
        assert config["dtype"] == "float32"
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        assert "<image>" in json.dumps(tokenizer_config) or "<image>" in (out / "tokenizer.json").read_text()
        if name == "qwen3":  # vocab_size == len(tokenizer): one row added for <image>, never generated
            assert config["text_config"]["vocab_size"] == config["image_token_index"] + 1
            assert generation["suppress_tokens"] == [config["image_token_index"]]
        else:
            assert config["text_config"]["vocab_size"] > config["image_token_index"]
            assert "suppress_tokens" not in generation or not generation["suppress_tokens"]
    assert json.loads((exported["qwen2"][2] / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("mode", ["qwen_2", "qwen_3", "plain"])
def test_chat_template_renders_our_conversations(tokenizer, mode):
    """Multi-turn, a system message, inline `<image>`: the Jinja template gives `Conversation.get_prompt()`."""
    template = llava_export.chat_template(get_conv_template(mode))
    dialogues = [
        [("user", [{"type": "image"}, {"type": "text", "text": "Name the shape."}]), ("assistant", "A circle."),
         ("user", "And its color?")],
        [("user", "Left <image> right"), ("assistant", None)],
    ]
    for turns in dialogues:
        conv = get_conv_template(mode)
        messages = []
        for role, content in turns:
            text = content if isinstance(content, str) or content is None else "<image>\n" + content[1]["text"]
            conv.append_message(role, text)
            if content is not None:
                messages.append({"role": role, "content": content})
        if turns[-1][1] is not None:
            conv.append_message("assistant", None)
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        assert rendered == conv.get_prompt()
    if mode != "plain":
        conv = get_conv_template(mode)
        conv.system = "Be 'brief'.\nReally."
        conv.append_message("user", "Hi")
        conv.append_message("assistant", None)
        messages = [{"role": "system", "content": conv.system}, {"role": "user", "content": "Hi"}]
        assert tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True) == conv.get_prompt()
        quoted = get_conv_template(mode)
        quoted.system = "It's a \\ test.\nLine two."
        quoted.append_message("user", "Hi")
        quoted.append_message("assistant", None)
        assert tokenizer.apply_chat_template(messages[1:], chat_template=llava_export.chat_template(quoted),
                                             tokenize=False, add_generation_prompt=True) == quoted.get_prompt()


def _config_only(tokenizer, path: Path, **fields) -> Path:
    config = mini_llava(tokenizer, "qwen2").config
    for key, value in fields.items():
        setattr(config, key, value)
    config.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mm_vision_tower": None, "mm_vision_config": None}, "mm_vision_tower"),
        ({"mm_vision_tower": "open_clip:ViT-B-16-SigLIP", "mm_vision_config": None}, "mm_vision_tower"),
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ],
)
def test_unsupported_checkpoints_are_named(tokenizer, tmp_path, fields, field, capsys):
    """Refused from config.json alone (no weights written here), naming the checkpoint and the field."""
    path = _config_only(tokenizer, tmp_path / "ckpt", **fields)
    with pytest.raises(llava_export.ExportError, match=field) as err:
        llava_export.export(path, tmp_path / "out")
    assert str(path) in str(err.value)
    with pytest.raises(SystemExit, match=field):
        llava_export.main(["--model-path", str(path), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_export_keeps_source_dtype_and_template(tokenizer, tmp_path):
    """A bf16 checkpoint exports in bf16 (tensors and config); tokenizer and processor carry the same template."""
    from transformers import AutoTokenizer

    model = mini_llava(tokenizer, "qwen3", seed=3).to(torch.bfloat16)
    ckpt = save_mini_checkpoint(model, tokenizer, tmp_path / "bf16")
    out = llava_export.export(ckpt, tmp_path / "bf16_hf", conv_mode="qwen_2")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    template = llava_export.chat_template(get_conv_template("qwen_2"))  # --version wins over conv_template qwen_3
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    assert (out / "chat_template.jinja").read_text() == template
