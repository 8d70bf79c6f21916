"""Save -> load_pretrained_model -> identical logits, for every checkpoint layout we accept."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import load_pretrained_model
from llava.tiny.fixtures import mini_llava, save_mini_checkpoint, save_projector_only


def _logits(model, tokenizer):
    ids = torch.tensor([[1] + tokenizer("Hello").input_ids + [IMAGE_TOKEN_INDEX] + tokenizer("red?").input_ids])
    torch.manual_seed(0)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        return model(input_ids=ids, images=images).logits


@pytest.mark.parametrize("backbone", ["qwen2", "qwen3"])
def test_full_checkpoint_roundtrip(tmp_path, tokenizer, backbone):
    model = mini_llava(tokenizer, backbone)
    save_mini_checkpoint(model, tokenizer, tmp_path / "ckpt")
    tok, loaded, processor, context_len = load_pretrained_model(str(tmp_path / "ckpt"), device="cpu")
    assert type(loaded) is type(model) and len(tok) == len(tokenizer) and context_len == 256
    assert processor.size["height"] == 32
    torch.testing.assert_close(_logits(model, tokenizer), _logits(loaded, tokenizer), rtol=0, atol=0)


def test_aligntI_layout_loads(tmp_path, tokenizer):
    """The released Align-TI layout: model.image_tower.vision_tower.vision_model.*, image_spatial_proj."""
    model = mini_llava(tokenizer)
    ours = save_mini_checkpoint(model, tokenizer, tmp_path / "ours")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    state = load_file(ours / "model.safetensors")
    renamed = {}
    for k, v in state.items():
        k = k.replace("model.vision_tower.vision_tower.", "model.image_tower.vision_tower.vision_model.")
        renamed[k.replace("model.mm_projector.", "model.mm_projector.image_spatial_proj.")] = v
    save_file(renamed, theirs / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((ours / "config.json").read_text())
    config["mm_image_tower"] = config.pop("mm_vision_tower")
    config["image_projector_type"] = config.pop("mm_projector_type")
    config["mm_video_tower"] = None
    (theirs / "config.json").write_text(json.dumps(config))
    for f in ours.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "preprocessor")):
            (theirs / f.name).write_bytes(f.read_bytes())
    _, loaded, _, _ = load_pretrained_model(str(theirs), device="cpu")
    torch.testing.assert_close(_logits(model, tokenizer), _logits(loaded, tokenizer), rtol=0, atol=0)

    # a key that maps nowhere is an error naming it
    renamed["model.mystery_module.weight"] = torch.zeros(2)
    save_file(renamed, theirs / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="mystery_module"):
        load_pretrained_model(str(theirs), device="cpu")


def test_projector_only_checkpoint_with_model_base(tmp_path, tokenizer):
    """Pretrain-stage output (config + mm_projector) on top of a base LLM and a SigLIP dir."""
    model = mini_llava(tokenizer)
    siglip = tmp_path / "siglip"
    model.get_vision_tower().vision_tower.save_pretrained(siglip)
    model.config.mm_vision_tower = str(siglip)
    base, proj = save_projector_only(model, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="model-base"):
        load_pretrained_model(str(proj), device="cpu")
    _, loaded, _, _ = load_pretrained_model(str(proj), model_base=str(base), device="cpu")
    torch.testing.assert_close(_logits(model, tokenizer), _logits(loaded, tokenizer), rtol=0, atol=0)


def test_missing_path_and_vocab_mismatch(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        load_pretrained_model(str(tmp_path / "nowhere"), device="cpu")
    model = mini_llava(tokenizer, vocab_size=64)
    save_mini_checkpoint(model, tokenizer, tmp_path / "small")
    with pytest.raises(ValueError, match="embedding has 64 rows"):
        load_pretrained_model(str(tmp_path / "small"), device="cpu")


def test_lora_checkpoint_with_model_base(tmp_path, tokenizer):
    """LoRA output (adapter + non_lora_trainables.bin) merged onto its base gives the trained model's logits."""
    from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
    from llava.train.lora import apply_lora, save_lora

    model = mini_llava(tokenizer)
    base = save_mini_checkpoint(model, tokenizer, tmp_path / "base")
    siglip = tmp_path / "siglip"
    model.get_vision_tower().vision_tower.save_pretrained(siglip)
    model.config.mm_vision_tower = str(siglip)
    model.requires_grad_(False)
    model.get_model().mm_projector.requires_grad_(True)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, bias="none").eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "mm_projector" in name:
                p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "lora"
    save_lora(peft_model, str(out))
    tokenizer.save_pretrained(out)
    load_image_processor(model.get_vision_tower().config).save_pretrained(out)
    expected = _logits(peft_model, tokenizer)
    _, loaded, _, _ = load_pretrained_model(str(out), model_base=str(base), device="cpu")
    assert not torch.allclose(expected, _logits(mini_llava(tokenizer), tokenizer))
    torch.testing.assert_close(_logits(loaded, tokenizer), expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_flex_attention_load_equals_sdpa(mini_checkpoint, tokenizer):
    """A flex_attention load (forward only, so CPU is fine: the teacher / inference case) gives sdpa's logits
    on a left-padded batch with images; the LLM runs FlexAttention, the SigLIP tower keeps its own default."""
    _, flex, _, _ = load_pretrained_model(str(mini_checkpoint), device="cpu", attn_implementation="flex_attention")
    _, sdpa, _, _ = load_pretrained_model(str(mini_checkpoint), device="cpu", attn_implementation="sdpa")
    assert flex.config._attn_implementation == "flex_attention"
    ids = torch.tensor([[1] + tokenizer("Hello").input_ids + [IMAGE_TOKEN_INDEX] + tokenizer("red?").input_ids] * 2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    got, ref = (m(input_ids=ids, attention_mask=mask, images=images).logits for m in (flex, sdpa))
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, 2:], ref[1, 2:], rtol=0, atol=1e-5)  # padding rows differ (flex: zeros)
