"""Tiny preset pieces: per-cell targets of the tiny SigLIP pretraining, the stage cache."""

import pytest
import torch

from llava.tiny.preset import is_complete, preset_paths
from llava.tiny.vision_pretrain import HEADS, cell_targets, pretrain_vision_tower


def test_cell_targets_follow_the_scene():
    scene = {"objects": [{"shape": "circle", "color": "red", "size": "large", "row": 2, "col": 1}],
             "text": "cat", "text_cell": [0, 2]}
    t = cell_targets(scene)
    assert int(t["color"][7]) == HEADS["color"].index("red") and int(t["shape"][7]) == HEADS["shape"].index("circle")
    assert int(t["size"][7]) == HEADS["size"].index("large")
    assert int(t["text"][2]) == HEADS["text"].index("cat")
    assert int(sum(int((v != 0).sum()) for v in t.values())) == 4  # everything else is "none"


def test_tower_must_see_the_scene_grid(tmp_path, mini_world):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
    from llava.tiny.fixtures import MINI_VISION

    config = SiglipVisionConfig(**MINI_VISION)  # 32 px / 8 px patches = 4x4: not the 3x3 scene grid
    torch.manual_seed(0)
    SiglipVisionModel(config).save_pretrained(tmp_path / "init")
    load_image_processor(config).save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="3x3"):
        pretrain_vision_tower(mini_world, tmp_path / "init", tmp_path / "out", epochs=1)


def test_preset_paths_and_completion(tmp_path):
    p = preset_paths(tmp_path, "qwen3")
    assert p["teacher"].name == "qwen3" and p["student_base"].name == "student-qwen3"
    assert not is_complete(tmp_path)
    (tmp_path / "mm_projector.safetensors").write_bytes(b"x")
    assert is_complete(tmp_path)
