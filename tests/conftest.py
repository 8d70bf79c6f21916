"""Shared fixtures: a mini tiny-world, its tokenizer and untrained mini checkpoints (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def mini_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mini")


@pytest.fixture(scope="session")
def mini_world(mini_root):
    from llava.tiny.fixtures import mini_world as build

    return build(mini_root)


@pytest.fixture(scope="session")
def tokenizer(mini_root, mini_world):
    from llava.tiny.fixtures import mini_tokenizer

    return mini_tokenizer(mini_root)


@pytest.fixture(scope="session", params=["qwen2", "qwen3"])
def backbone(request):
    return request.param


@pytest.fixture(scope="session")
def mini_checkpoint(mini_root, tokenizer):
    """A saved, untrained full LLaVA-Qwen2 checkpoint (with tokenizer and image processor)."""
    from llava.tiny.fixtures import mini_llava, save_mini_checkpoint

    return save_mini_checkpoint(mini_llava(tokenizer), tokenizer, mini_root / "ckpt_qwen2")


@pytest.fixture(scope="session")
def mini_teacher(mini_root, tokenizer, mini_checkpoint):
    """A saved 3-layer mini teacher sharing the mini student's vision tower (N_v 16)."""
    from llava.model.builder import load_pretrained_model
    from llava.tiny.fixtures import mini_llava, save_mini_checkpoint

    _, student, _, _ = load_pretrained_model(str(mini_checkpoint), device="cpu")
    teacher = mini_llava(tokenizer, num_layers=3, hidden=48, role="teacher", seed=2)
    teacher.get_model().vision_tower.load_state_dict(student.get_model().vision_tower.state_dict())
    return save_mini_checkpoint(teacher, tokenizer, mini_root / "exp_teacher")
