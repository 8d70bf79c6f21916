"""Distillation with `--gradient_checkpointing True` (the scripts' GRAD_CKPT=1): HF drops the KV cache under
activation checkpointing, so TPA rebuilds the student's cache from its layers' inputs (`tpa.ground_truth_pass`) and
runs the candidate rows as one checkpointed segment; the run ends with the weights of the same run without
checkpointing."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from aligntI_patch import distill, tpa
from llava.tiny.fixtures import mini_llava, save_mini_checkpoint


@pytest.fixture(scope="module")
def pair(mini_root, tokenizer):
    """A 2-layer mini student and a 3-layer teacher sharing one SigLIP."""
    student = mini_llava(tokenizer, num_layers=2, seed=1)
    teacher = mini_llava(tokenizer, num_layers=3, hidden=48, role="teacher", seed=2)
    teacher.get_model().vision_tower.load_state_dict(student.get_model().vision_tower.state_dict())
    return (save_mini_checkpoint(student, tokenizer, mini_root / "gc_student"),
            save_mini_checkpoint(teacher, tokenizer, mini_root / "gc_teacher"))


def _distill(out, pair, mini_world, monkeypatch, *extra) -> list[bool]:
    """Two steps of `python -m aligntI_patch.distill` (every term on, greedy TPA); what cache_available said
    of the student."""
    student, teacher = pair
    said = []

    def spy(lm):
        available = cache_available(lm)
        if lm.training:  # the student (the frozen teacher is asked too, in eval mode)
            said.append(available)
        return available

    cache_available = tpa.cache_available
    monkeypatch.setattr(tpa, "cache_available", spy)
    monkeypatch.setattr(sys, "argv", [
        "distill", "--model_name_or_path", str(student), "--teacher_model_path", str(teacher), "--version", "qwen_2",
        "--data_path", str(mini_world / "finetune.json"), "--image_folder", str(mini_world / "images"),
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--optim", "sgd",
        "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--model_max_length", "256", "--max_steps", "2",
        "--save_strategy", "no", "--report_to", "none", "--iva_layer", "1", "--tpa_sampling", "greedy",
        "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--use_cpu", "True", *extra,
    ])  # fmt: skip
    distill.main()
    monkeypatch.setattr(tpa, "cache_available", cache_available)
    return said


def test_gradient_checkpointing_rebuilds_the_tpa_cache_and_trains_the_same(tmp_path, pair, mini_world, monkeypatch):
    plain = _distill(tmp_path / "plain", pair, mini_world, monkeypatch)
    ckpt = _distill(tmp_path / "ckpt", pair, mini_world, monkeypatch, "--gradient_checkpointing", "True")
    assert plain and all(plain)  # the cached pass
    assert ckpt and not any(ckpt)  # HF dropped the cache (so it was rebuilt), at every step
    start = load_file(pair[0] / "model.safetensors")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ckpt" / "model.safetensors")
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4  # the steps did something
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-4, msg=k)
