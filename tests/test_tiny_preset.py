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


def test_an_opt_in_longer_teacher_shares_stage_1_and_leaves_the_presets_teacher(tmp_path):
    from llava.tiny.preset import TEACHER_STAGES, long_teacher_dir, teacher_stages

    p = preset_paths(tmp_path, "qwen2")

    def epochs_and_out(stage) -> tuple[str, str]:
        args = stage[1]
        return args[args.index("--num_train_epochs") + 1], args[args.index("--output_dir") + 1]

    default = teacher_stages(p, "qwen2")
    assert [s[2] for s in default] == [p["teacher_stage1"], p["teacher"]]
    assert epochs_and_out(default[1]) == (str(TEACHER_STAGES["stage2"]["epochs"]), str(p["teacher"]))
    assert teacher_stages(p, "qwen2", TEACHER_STAGES["stage2"]["epochs"]) == default
    longer = teacher_stages(p, "qwen2", 8)
    assert longer[0] == default[0]  # the same cached stage 1
    assert longer[1][2] == long_teacher_dir(tmp_path, "qwen2", 8) == tmp_path / "teacher" / "qwen2-stage2-ep8"
    assert epochs_and_out(longer[1]) == ("8", str(tmp_path / "teacher" / "qwen2-stage2-ep8"))
    assert longer[1][1][:2] == ["--model_name_or_path", str(p["teacher_stage1"])]
    with pytest.raises(ValueError, match="--teacher-epochs must be > 0"):
        teacher_stages(p, "qwen2", 0)
