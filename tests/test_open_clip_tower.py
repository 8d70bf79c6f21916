"""open_clip towers against a stand-in `open_clip` module (the real package needs torchvision, which breaks here).

The stand-in has the attribute structure of open_clip 3.x and only what the tower touches: `create_model`
(`local-dir:` / built-in name + `pretrained` file, `load_weights`, `require_pretrained`, `device`),
`get_model_config`, `get_model_preprocess_cfg`, and two `visual` classes: `TimmModel`-like (`trunk.blocks`,
`trunk.num_prefix_tokens = 0`: SigLIP) and `VisionTransformer`-like (class token, `transformer.resblocks`), each
with `forward_intermediates`. Expected features are computed by hand from the saved weight file.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.builder import build_vision_tower
from llava.model.multimodal_encoder.open_clip_encoder import (
    OpenCLIPVisionConfig,
    OpenCLIPVisionTower,
    describe_open_clip_tower,
)
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import mini_llava, save_mini_checkpoint, save_projector_only

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
WIDTH, LAYERS, IMAGE, PATCH = 24, 3, 16, 4  # N_v = 16 patches
VISION_CFG = {
    "timm": {"image_size": IMAGE, "timm_model_name": "vit_fake_siglip", "width": WIDTH, "layers": LAYERS},
    "native": {"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "layers": LAYERS},
}
PREPROCESS_CFG = {  # as in the hub's open_clip_config.json files of SigLIP and CLIP models
    "timm": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"},
    "native": {},  # open_clip's defaults: OpenAI mean/std, bicubic, shortest edge + center crop
}


# ---- the stand-in open_clip ------------------------------------------------------------------------------


class Block(nn.Module):
    """Stands for a transformer block: residual, shape-preserving."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def run_blocks(blocks, x, indices):
    take = [len(blocks) + i if i < 0 else i for i in indices]  # open_clip's feature_take_indices for a list
    out = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i in take:
            out.append(x)
    return out


class TimmModel(nn.Module):
    """open_clip's TimmModel around a timm ViT without class token (SigLIP)."""

    def __init__(self, image_size: int, width: int, layers: int, **_):
        super().__init__()
        grid = image_size // PATCH
        self.image_size = (image_size, image_size)
        self.trunk = nn.Module()
        self.trunk.patch_embed = nn.Module()
        self.trunk.patch_embed.proj = nn.Conv2d(3, width, PATCH, PATCH)
        self.trunk.patch_embed.patch_size = (PATCH, PATCH)
        self.trunk.pos_embed = nn.Parameter(torch.randn(1, grid * grid, width))
        self.trunk.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.trunk.num_prefix_tokens = 0
        self.trunk.embed_dim = width
        self.head = nn.Linear(width, 8)  # the contrastive projection: unused by LLaVA, still saved and loaded

    def forward_intermediates(self, x, indices=None, stop_early=False, normalize_intermediates=False,
                              intermediates_only=False, output_fmt="NCHW", output_extra_tokens=False):
        assert intermediates_only and output_fmt == "NLC" and not output_extra_tokens and not normalize_intermediates
        x = self.trunk.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.trunk.pos_embed
        return {"image_intermediates": run_blocks(self.trunk.blocks, x, indices)}


class VisionTransformer(nn.Module):
    """open_clip's native ViT: one class token, `transformer.resblocks`."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int):
        super().__init__()
        grid = image_size // patch_size
        self.image_size, self.patch_size, self.grid_size = (image_size,) * 2, (patch_size,) * 2, (grid, grid)
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.width = width
        self.transformer.resblocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 8))

    def forward_intermediates(self, x, indices=None, stop_early=False, normalize_intermediates=False,
                              intermediates_only=False, output_fmt="NCHW", output_extra_tokens=False):
        assert intermediates_only and output_fmt == "NLC" and not normalize_intermediates
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        intermediates = run_blocks(self.transformer.resblocks, self.ln_pre(x), indices)
        out = {"image_intermediates": [y[:, 1:] for y in intermediates]}
        if output_extra_tokens:
            out["image_intermediates_prefix"] = [y[:, :1] for y in intermediates]
        return out


class CLIP(nn.Module):
    def __init__(self, vision_cfg: dict):
        super().__init__()
        self.visual = TimmModel(**vision_cfg) if "timm_model_name" in vision_cfg else VisionTransformer(**vision_cfg)
        self.text = nn.Linear(4, 4)  # the text tower, dropped by LLaVA
        self.logit_scale = nn.Parameter(torch.ones([]))


def fake_open_clip() -> types.ModuleType:
    builtin = {"fake-vit": {"embed_dim": 8, "vision_cfg": VISION_CFG["native"], "text_cfg": {}}}

    def get_model_config(model_name):
        if model_name.startswith("local-dir:"):
            cfg = json.loads((Path(model_name.removeprefix("local-dir:")) / "open_clip_config.json").read_text())
            return cfg["model_cfg"]
        return copy.deepcopy(builtin[model_name])

    def create_model(model_name, pretrained=None, load_weights=True, require_pretrained=False,
                     pretrained_text=True, device="cpu"):
        assert not pretrained_text, "the tower must never ask for text-tower weights"
        preprocess = {"size": 224, "mode": "RGB", "mean": OPENAI_MEAN, "std": OPENAI_STD,
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
        checkpoint = pretrained
        if model_name.startswith("local-dir:"):
            folder = Path(model_name.removeprefix("local-dir:"))
            preprocess.update(json.loads((folder / "open_clip_config.json").read_text()).get("preprocess_cfg", {}))
            checkpoint = next((str(p) for p in sorted(folder.glob("*.safetensors"))), None)
        model = CLIP(get_model_config(model_name)["vision_cfg"]).to(device=device)
        if load_weights and checkpoint:
            model.load_state_dict(load_file(checkpoint), strict=True)
        elif require_pretrained:
            raise RuntimeError(f"Required pretrained weights ({model_name}) could not be loaded.")
        model.visual.preprocess_cfg = {**preprocess, "size": model.visual.image_size}
        return model

    module = types.ModuleType("open_clip")
    module.create_model = create_model
    module.get_model_config = get_model_config
    module.get_model_preprocess_cfg = lambda model: model.visual.preprocess_cfg
    return module


@pytest.fixture(autouse=True)
def open_clip(monkeypatch):
    module = fake_open_clip()
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return module


def open_clip_dir(root: Path, kind: str, seed: int = 0) -> Path:
    """A local directory in open_clip's hub layout: open_clip_config.json + open_clip_model.safetensors."""
    torch.manual_seed(seed)
    folder = root / f"open_clip_{kind}"
    folder.mkdir()
    cfg = {"model_cfg": {"embed_dim": 8, "vision_cfg": VISION_CFG[kind], "text_cfg": {}},
           "preprocess_cfg": PREPROCESS_CFG[kind]}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file(CLIP(VISION_CFG[kind]).state_dict(), folder / "open_clip_model.safetensors")
    return folder


def tower_for(folder: Path, select_layer: int = -2, select_feature: str = "patch") -> OpenCLIPVisionTower:
    name = f"open_clip:{folder}"
    tower = OpenCLIPVisionTower(describe_open_clip_tower(name), select_layer, select_feature)
    tower.load_pretrained(name)
    return tower


def hand_features(folder: Path, kind: str, images: torch.Tensor, num_blocks: int, keep_cls: bool = False):
    """Output of the first `num_blocks` blocks, from the weight file with functional ops."""
    w = {k.removeprefix("visual."): v for k, v in load_file(folder / "open_clip_model.safetensors").items()}
    if kind == "timm":
        x = F.conv2d(images, w["trunk.patch_embed.proj.weight"], w["trunk.patch_embed.proj.bias"], stride=PATCH)
        x, blocks = x.flatten(2).transpose(1, 2) + w["trunk.pos_embed"], "trunk.blocks"
    else:
        x = F.conv2d(images, w["conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
        x = torch.cat([w["class_embedding"].expand(len(images), 1, -1), x], dim=1) + w["positional_embedding"]
        x, blocks = F.layer_norm(x, (WIDTH,), w["ln_pre.weight"], w["ln_pre.bias"]), "transformer.resblocks"
    for i in range(num_blocks):
        x = x + torch.tanh(F.linear(x, w[f"{blocks}.{i}.fc.weight"], w[f"{blocks}.{i}.fc.bias"]))
    return x if kind == "timm" or keep_cls else x[:, 1:]


# ---- the tower -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["timm", "native"])
@pytest.mark.parametrize("select_layer, num_blocks", [(-2, LAYERS - 1), (-1, LAYERS), (1, 1), (LAYERS, LAYERS)])
def test_features_are_the_selected_block_patch_tokens(tmp_path, kind, select_layer, num_blocks):
    """LLaVA's hidden-state indexing (-2 = penultimate block, k = block k), patch tokens only, loaded weights."""
    folder = open_clip_dir(tmp_path, kind)
    tower = tower_for(folder, select_layer)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        features = tower(images)
    assert features.shape == (2, tower.num_patches, tower.hidden_size) == (2, 16, WIDTH)
    torch.testing.assert_close(features, hand_features(folder, kind, images, num_blocks))


def test_cls_patch_keeps_the_class_token_first(tmp_path):
    folder = open_clip_dir(tmp_path, "native")
    tower = tower_for(folder, -2, "cls_patch")
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        features = tower(images)
    assert tower.num_patches == 17 and features.shape == (2, 17, WIDTH)
    torch.testing.assert_close(features, hand_features(folder, "native", images, LAYERS - 1, keep_cls=True))
    assert tower_for(open_clip_dir(tmp_path, "timm"), -2, "cls_patch").num_patches == 16  # SigLIP: no prefix


def test_tower_is_frozen_eval_and_holds_only_the_visual_weights(tmp_path):
    tower = tower_for(open_clip_dir(tmp_path, "timm"))
    tower.train()
    assert not tower.vision_tower.training and not any(p.requires_grad for p in tower.parameters())
    file_keys = load_file(tmp_path / "open_clip_timm" / "open_clip_model.safetensors")
    assert {f"visual.{k}" for k in tower.vision_tower.state_dict()} == {k for k in file_keys if k.startswith("visual.")}
    config = tower.config
    assert (config.hidden_size, config.image_size, config.patch_size, config.num_hidden_layers) == (WIDTH, 16, 4, 3)
    with pytest.raises(ValueError, match="0, the embeddings"):
        OpenCLIPVisionTower(config, select_layer=0)
    with pytest.raises(ValueError, match="out of range"):
        OpenCLIPVisionTower(config, select_layer=-LAYERS - 1)


def test_model_name_with_local_weights_file(tmp_path):
    weights = open_clip_dir(tmp_path, "native") / "open_clip_model.safetensors"
    tower = tower_for(Path(f"fake-vit:{weights}"))
    images = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), hand_features(weights.parent, "native", images, LAYERS - 1))
    with pytest.raises(FileNotFoundError, match="Pretrained tags download weights"):
        describe_open_clip_tower("open_clip:fake-vit:laion2b_s34b_b88k")


def test_missing_extra_is_a_clear_import_error(monkeypatch, tmp_path):
    """From a tower name (training) and from a checkpoint's embedded config (loading)."""
    embedded = describe_open_clip_tower(f"open_clip:{open_clip_dir(tmp_path, 'timm')}").to_dict()
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    for name, vision_config in ((f"open_clip:{tmp_path / 'other'}", None), ("open_clip:ckpt", embedded)):
        config = SimpleNamespace(mm_vision_tower=name, mm_vision_config=vision_config,
                                 mm_vision_select_layer=-2, mm_vision_select_feature="patch")
        with pytest.raises(ImportError, match=r"pip install 'align-ti\[openclip\]'"):
            build_vision_tower(config)


def test_hf_hub_names_resolve_from_the_local_cache_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # online, hf-hub: names download
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*open_clip:<local dir>"):
        describe_open_clip_tower("hf-hub:timm/ViT-B-16-SigLIP")
    repo = tmp_path / "hub" / "models--timm--ViT-B-16-SigLIP"  # huggingface_hub's cache layout
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    snapshot = open_clip_dir(tmp_path, "timm").rename(repo / "snapshots" / "abc123")
    tower = OpenCLIPVisionTower(describe_open_clip_tower("hf-hub:timm/ViT-B-16-SigLIP"))
    tower.load_pretrained("hf-hub:timm/ViT-B-16-SigLIP")
    images = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), hand_features(snapshot, "timm", images, LAYERS - 1))


# ---- images ----------------------------------------------------------------------------------------------


def manual_pixels(image: Image.Image, size: int, resample, mean, std, shortest: bool) -> torch.Tensor:
    """open_clip's eval transform written with PIL: resize (short edge, or squash) -> center crop -> normalize."""
    w, h = image.size
    if shortest:  # torchvision's Resize(int): the long edge is truncated
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    else:
        new = (size, size)
    image = image.resize(new, resample)
    left, top = round((new[0] - size) / 2), round((new[1] - size) / 2)  # torchvision's CenterCrop
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.mark.parametrize("kind", ["timm", "native"])
def test_image_processor_matches_open_clip_preprocessing(tmp_path, kind):
    folder = open_clip_dir(tmp_path, kind)
    processor = load_image_processor(f"open_clip:{folder}")  # the string form, as train.py passes it
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))  # overhang 24 - 16 = 8: even
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"][0]
    if kind == "timm":
        expected = manual_pixels(image, IMAGE, Image.BILINEAR, [0.5] * 3, [0.5] * 3, shortest=False)
    else:
        expected = manual_pixels(image, IMAGE, Image.BICUBIC, OPENAI_MEAN, OPENAI_STD, shortest=True)
    torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)
    assert load_image_processor(describe_open_clip_tower(f"open_clip:{folder}")).to_dict() == processor.to_dict()


# ---- in a LLaVA model ------------------------------------------------------------------------------------


def llava_with_open_clip(tokenizer, folder: Path):
    """The train.py path: an LLM-only model, then `initialize_vision_modules` with an open_clip tower."""
    model = mini_llava(tokenizer, mm_vision_tower=None, mm_vision_config=None, mm_hidden_size=None)
    model.get_model().initialize_vision_modules(SimpleNamespace(
        vision_tower=f"open_clip:{folder}", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu", pretrain_mm_mlp_adapter=None,
    ))
    return model.eval()


def _logits(model, tokenizer, images):
    ids = torch.tensor([[1] + tokenizer("Hello").input_ids + [IMAGE_TOKEN_INDEX] + tokenizer("red?").input_ids])
    with torch.no_grad():
        return model(input_ids=ids, images=images).logits


def test_llava_forward_and_checkpoint_roundtrip(tmp_path, tokenizer):
    folder = open_clip_dir(tmp_path, "timm")
    model = llava_with_open_clip(tokenizer, folder)
    assert model.config.mm_hidden_size == WIDTH and model.num_image_tokens == 16
    assert isinstance(model.get_vision_tower().config, OpenCLIPVisionConfig)
    images = torch.randn(1, 3, IMAGE, IMAGE)
    expected = _logits(model, tokenizer, images)
    tower_features = hand_features(folder, "timm", images, LAYERS - 1)
    torch.testing.assert_close(model.get_vision_tower()(images), tower_features)  # pretrained weights loaded

    save_mini_checkpoint(model, tokenizer, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert "model.vision_tower.vision_tower.trunk.blocks.0.fc.weight" in state
    assert not any(".text." in k for k in state)
    folder.rename(tmp_path / "moved")  # the checkpoint embeds the open_clip config: the original dir is not read
    _, loaded, processor, _ = load_pretrained_model(str(tmp_path / "ckpt"), device="cpu")
    assert isinstance(loaded.get_vision_tower(), OpenCLIPVisionTower)
    torch.testing.assert_close(_logits(loaded, tokenizer, images), expected, rtol=0, atol=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    saved = processor(images=[image], return_tensors="pt")["pixel_values"]
    expected_pixels = manual_pixels(image, IMAGE, Image.BILINEAR, [0.5] * 3, [0.5] * 3, shortest=False)
    torch.testing.assert_close(saved[0], expected_pixels, atol=1e-5, rtol=0)  # the saved processor round-trips


def test_projector_only_checkpoint_loads_the_open_clip_tower(tmp_path, tokenizer):
    """Pretrain-stage output (config + mm_projector) on a base LLM: the tower's weights come from its name."""
    model = llava_with_open_clip(tokenizer, open_clip_dir(tmp_path, "native"))
    base, proj = save_projector_only(model, tokenizer, tmp_path)
    _, loaded, _, _ = load_pretrained_model(str(proj), model_base=str(base), device="cpu")
    images = torch.randn(1, 3, IMAGE, IMAGE)
    torch.testing.assert_close(_logits(loaded, tokenizer, images), _logits(model, tokenizer, images), rtol=0, atol=0)
