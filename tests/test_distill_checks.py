"""Mistakes that config.json files show are errors before any weight is loaded (`distill.check_configs`)."""

import logging

import pytest
from test_distill import _args, pair  # noqa: F401  (pair is a fixture)
from transformers import Qwen2Config

from aligntI_patch.distill import check_configs
from llava.train.arguments import ModelArguments


def _model_args(student, version="qwen_2", **kw):
    return ModelArguments(model_name_or_path=str(student), version=version, **kw)


def test_a_teacher_without_a_vision_tower_is_named(tmp_path, pair):  # noqa: F811
    student, _ = pair
    plain = tmp_path / "qwen2-7b"
    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=400).save_pretrained(plain)
    with pytest.raises(ValueError, match="qwen2-7b is a qwen2 model without a vision tower .*both LLaVA stages"):
        check_configs(_args(tmp_path, plain), _model_args(student))


def test_template_must_match_the_models(tmp_path, pair):  # noqa: F811
    student, teacher = pair  # Qwen2 models saved with conv_template qwen_2
    check_configs(_args(tmp_path, teacher), _model_args(student))
    with pytest.raises(ValueError, match="--version qwen_3 is the qwen3 template, but the student .* llava_qwen2"):
        check_configs(_args(tmp_path, teacher), _model_args(student, "qwen_3"))
    check_configs(_args(tmp_path, None, recipe="sft"), _model_args(student))  # SFT reads no teacher


def test_a_teacher_trained_with_another_template_is_refused(tmp_path, pair):  # noqa: F811
    import json
    import shutil

    student, teacher = pair
    other = tmp_path / "teacher"
    shutil.copytree(teacher, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "conv_template": "plain"}))
    with pytest.raises(ValueError, match="trained with the 'plain' template but --version is 'qwen_2'"):
        check_configs(_args(tmp_path, other), _model_args(student))


def test_a_random_projector_is_warned_about(tmp_path, pair, caplog):  # noqa: F811
    _, teacher = pair
    llm = tmp_path / "qwen2-llm"
    Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=400).save_pretrained(llm)
    with caplog.at_level(logging.WARNING):
        check_configs(_args(tmp_path, teacher), _model_args(llm))
    assert "projector starts from random weights" in caplog.text
    caplog.clear()
    projector = tmp_path / "mm_projector.safetensors"
    projector.write_bytes(b"")  # only its existence is checked before loading
    with caplog.at_level(logging.WARNING):
        check_configs(_args(tmp_path, teacher), _model_args(llm, pretrain_mm_mlp_adapter=str(projector)))
    assert "projector" not in caplog.text
    with pytest.raises(FileNotFoundError, match="mm_projector.safetensors that pretrain.sh wrote"):
        _model_args(llm, pretrain_mm_mlp_adapter=str(tmp_path / "missing" / "mm_projector.safetensors"))
