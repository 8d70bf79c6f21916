"""Save -> load_pretrained_model -> identical logits, for every checkpoint layout we accept."""

import json
from pathlib import Path

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


def _save_lora(model, tokenizer, out, train_projector: bool = True):
    """Wrap `model` in LoRA, perturb its trainables (adapter, projector), save LLaVA's LoRA layout -> expected logits."""
    from llava.train.lora import apply_lora, save_lora

    model.requires_grad_(False)
    model.get_model().mm_projector.requires_grad_(train_projector)
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, bias="none").eval()
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # what training changes is what the checkpoint must carry
                p.add_(torch.randn_like(p) * 0.1)
    save_lora(peft_model, str(out))
    tokenizer.save_pretrained(out)
    return _logits(peft_model, tokenizer)


def test_lora_checkpoint_with_model_base(tmp_path, tokenizer):
    """LoRA output (adapter + non_lora_trainables.bin) merged onto its base gives the trained model's logits."""
    from llava.model.multimodal_encoder.siglip_encoder import load_image_processor

    model = mini_llava(tokenizer)
    base = save_mini_checkpoint(model, tokenizer, tmp_path / "base")
    siglip = tmp_path / "siglip"
    model.get_vision_tower().vision_tower.save_pretrained(siglip)
    model.config.mm_vision_tower = str(siglip)
    expected = _save_lora(model, tokenizer, tmp_path / "lora")
    load_image_processor(model.get_vision_tower().config).save_pretrained(tmp_path / "lora")
    _, loaded, _, _ = load_pretrained_model(str(tmp_path / "lora"), model_base=str(base), device="cpu")
    assert not torch.allclose(expected, _logits(mini_llava(tokenizer), tokenizer))
    torch.testing.assert_close(_logits(loaded, tokenizer), expected, atol=1e-5, rtol=1e-4)


def test_lora_on_full_llava_base_keeps_its_tower(tmp_path, tokenizer):
    """A base that holds the tower is used as is: `mm_vision_tower` is neither needed nor read over it."""
    model = mini_llava(tokenizer)
    base = save_mini_checkpoint(model, tokenizer, tmp_path / "base")
    other = tmp_path / "other_siglip"  # a different tower: loading it would silently change the logits
    mini_llava(tokenizer, seed=1).get_vision_tower().vision_tower.save_pretrained(other)
    for tower in ("mini-siglip", str(other)):  # not a directory / a directory with other weights
        model = mini_llava(tokenizer)
        model.config.mm_vision_tower = tower
        out = tmp_path / f"lora_{len(tower)}"
        expected = _save_lora(model, tokenizer, out, train_projector=False)
        _, loaded, _, _ = load_pretrained_model(out, model_base=base, device="cpu")
        torch.testing.assert_close(_logits(loaded, tokenizer), expected, atol=1e-5, rtol=1e-4)


def test_missing_weights_are_errors(tmp_path, tokenizer):
    """A parameter that no file fills is an error naming the checkpoint and the weights, never a random layer."""
    model = mini_llava(tokenizer)  # untied: lm_head.weight is its own weight
    full = save_mini_checkpoint(model, tokenizer, tmp_path / "no_lm_head")
    state = load_file(full / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, full / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no_lm_head lacks 1 weights.*lm_head\.weight"):
        load_pretrained_model(full, device="cpu")

    # a LoRA checkpoint without non_lora_trainables.bin on a plain LLM base: the projector is nowhere
    siglip = tmp_path / "siglip"
    model.get_vision_tower().vision_tower.save_pretrained(siglip)
    model.config.mm_vision_tower = str(siglip)
    base, _ = save_projector_only(model, tokenizer, tmp_path)
    _save_lora(model, tokenizer, tmp_path / "lora")
    (tmp_path / "lora" / "non_lora_trainables.bin").unlink()
    with pytest.raises(ValueError, match=r"lacks 4 weights.*mm_projector\.0\.bias.*non_lora_trainables"):
        load_pretrained_model(tmp_path / "lora", model_base=base, device="cpu")

    # a projector-only checkpoint on the wrong base (1 layer where its config says 2)
    one_layer_base, _ = save_projector_only(mini_llava(tokenizer, num_layers=1), tokenizer, tmp_path / "one")
    two_layers = mini_llava(tokenizer)
    two_layers.config.mm_vision_tower = str(siglip)
    _, proj = save_projector_only(two_layers, tokenizer, tmp_path / "two")
    with pytest.raises(ValueError, match=r"one/base \(the base of .*lacks \d+ weights.*model\.layers\.1\."):
        load_pretrained_model(proj, model_base=one_layer_base, device="cpu")


@pytest.mark.parametrize("embedded_config", [True, False])
def test_relative_tower_path_next_to_checkpoint(tmp_path, tokenizer, monkeypatch, embedded_config):
    """A relative `mm_vision_tower` not found from the current directory is looked up from the checkpoint
    directory, then from `model_base`, before the usual error."""
    model = mini_llava(tokenizer)
    model.config.mm_vision_tower = "siglip"
    if not embedded_config:  # then the tower's config, too, is read from that directory
        model.config.mm_vision_config = None
    base, proj = save_projector_only(model, tokenizer, tmp_path)
    model.get_vision_tower().vision_tower.save_pretrained(proj / "siglip")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _, loaded, _, _ = load_pretrained_model(proj, model_base=base, device="cpu")
    torch.testing.assert_close(_logits(model, tokenizer), _logits(loaded, tokenizer), rtol=0, atol=0)

    (proj / "siglip").rename(base / "siglip")
    _, loaded, _, _ = load_pretrained_model(proj, model_base=base, device="cpu")
    torch.testing.assert_close(_logits(model, tokenizer), _logits(loaded, tokenizer), rtol=0, atol=0)

    (base / "siglip").rename(tmp_path / "siglip_moved")
    with pytest.raises(FileNotFoundError, match="'siglip' is not a local directory"):
        load_pretrained_model(proj, model_base=base, device="cpu")


def test_path_like_arguments(mini_checkpoint):
    """`os.PathLike` paths work wherever a str does (the image processor is read from the checkpoint)."""
    _, _, processor, context_len = load_pretrained_model(Path(mini_checkpoint), device="cpu")
    assert processor.size["height"] == 32 and context_len == 256


def _load_kwargs(monkeypatch, path, **kwargs) -> dict:
    """The keywords `load_pretrained_model` gives `from_pretrained`, as on a CUDA host (this one may have none)."""
    from llava.model import builder

    class Stop(Exception):
        pass

    seen = {}

    def fake_from_pretrained(path, *args, **load_kwargs):
        seen.update(load_kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(builder, "_from_pretrained", fake_from_pretrained)
    with pytest.raises(Stop):
        load_pretrained_model(path, **kwargs)
    return seen


def test_any_cuda_device_defaults_to_bf16(monkeypatch, mini_checkpoint):
    for device in ("cuda", "cuda:0", torch.device("cuda", 1)):
        assert _load_kwargs(monkeypatch, mini_checkpoint, device=device)["dtype"] == torch.bfloat16
    assert _load_kwargs(monkeypatch, mini_checkpoint, device="cuda")["device_map"] == "auto"
    assert _load_kwargs(monkeypatch, mini_checkpoint, device="cuda:1")["device_map"] == {"": torch.device("cuda", 1)}
    assert _load_kwargs(monkeypatch, mini_checkpoint, device="cpu")["dtype"] == torch.float32


def test_use_flash_attn_keyword(monkeypatch, mini_checkpoint):
    """LLaVA's `use_flash_attn=True` is flash_attention_2, refused up front where it cannot run."""
    _, model, _, _ = load_pretrained_model(mini_checkpoint, None, "llava-qwen", device="cpu", use_flash_attn=False)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="flash-attn package .* CUDA device, got device 'cpu'"):
        load_pretrained_model(mini_checkpoint, device="cpu", use_flash_attn=True)
    with pytest.raises(ValueError, match="contradicts attn_implementation='sdpa'"):
        load_pretrained_model(mini_checkpoint, device="cpu", use_flash_attn=True, attn_implementation="sdpa")
    from llava.model import builder

    monkeypatch.setattr(builder, "is_flash_attn_2_available", lambda: True)
    kwargs = _load_kwargs(monkeypatch, mini_checkpoint, device="cuda", use_flash_attn=True)
    assert kwargs["attn_implementation"] == "flash_attention_2" and "use_flash_attn" not in kwargs


def test_flex_attention_is_refused_off_cuda(mini_checkpoint):
    """torch's compiled CPU FlexAttention kernel returned wrong values (head_dim 8/16) and failed to compile dynamic
    shapes on an AVX2 CPU: a CPU flex load fails before reading weights, naming the way out."""
    with pytest.raises(ValueError, match="flex_attention needs a CUDA device.*use sdpa"):
        load_pretrained_model(str(mini_checkpoint), device="cpu", attn_implementation="flex_attention")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex_attention runs on CUDA only")
@torch.no_grad()
def test_flex_attention_load_equals_sdpa(mini_checkpoint, tokenizer):
    """A flex_attention load (forward only: the teacher / inference case) gives sdpa's logits on a left-padded
    batch with images; the LLM runs FlexAttention, the SigLIP tower keeps its own default."""
    kw = dict(device="cuda:0", torch_dtype=torch.float32)
    _, flex, _, _ = load_pretrained_model(str(mini_checkpoint), attn_implementation="flex_attention", **kw)
    _, sdpa, _, _ = load_pretrained_model(str(mini_checkpoint), attn_implementation="sdpa", **kw)
    assert flex.config._attn_implementation == "flex_attention"
    ids = torch.tensor([[1] + tokenizer("Hello").input_ids + [IMAGE_TOKEN_INDEX] + tokenizer("red?").input_ids] * 2)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    ids, mask, images = ids.cuda(), mask.cuda(), images.cuda()
    got, ref = (m(input_ids=ids, attention_mask=mask, images=images).logits for m in (flex, sdpa))
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, 2:], ref[1, 2:], rtol=0, atol=1e-5)  # padding rows differ (flex: zeros)
