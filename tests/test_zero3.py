"""DeepSpeed ZeRO-3 distillation: the helpers' single-process no-op paths, the same module calls on every
rank, and two processes (ZeRO-3, ZeRO-2) training exactly as one process does."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from aligntI_patch import candidates, tpa
from aligntI_patch.zero3 import hold_lm_head, prepare_teacher, teacher_ds_config
from llava.tiny.fixtures import free_port, mini_llava, save_mini_checkpoint
from llava.train.zero3 import check_full_save, gathered, needs_blank_image, through_wrapper, whole_weights

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- single process: no-ops


def test_helpers_are_no_ops_in_a_single_process(tokenizer):
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    model = mini_llava(tokenizer)
    weight = model.get_output_embeddings().weight
    before = weight.detach().clone()
    with whole_weights(args), gathered(weight, None):
        assert torch.equal(weight, before)
    assert prepare_teacher(model, args) == (model, None)
    hold_lm_head(model, args)
    assert not hasattr(model, "_external_params")
    assert not needs_blank_image(None, args)  # one process: nothing to keep in step


def test_teacher_ds_config_is_the_training_config_for_inference():
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": 100}
    train = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"},
             "scheduler": {"type": "WarmupLR"}, "zero_optimization": zero}
    assert teacher_ds_config(train, hidden_size=10, stage=0)["zero_optimization"] == {"stage": 0}
    config = teacher_ds_config(train, hidden_size=10, stage=3)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 100,
                                           "stage3_prefetch_bucket_size": 90,
                                           "stage3_param_persistence_threshold": 100}
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["bf16"] == {"enabled": True}
    assert train["optimizer"] and train["zero_optimization"]["reduce_bucket_size"] == "auto"  # not mutated


class _Wrapper(nn.Module):
    """Stands for a DeepSpeed engine / DDP: its forward calls the wrapped module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return self.module(*args)


def test_through_wrapper_runs_the_function_as_the_wrapped_forward():
    inner = nn.Linear(2, 2)
    wrapper = _Wrapper(inner)
    seen = []
    inner.register_forward_pre_hook(lambda module, args: seen.append(args))
    assert through_wrapper(wrapper, inner, lambda x: x * 3, 2) == 6
    assert wrapper.calls == 1 and seen == [(2,)]  # the wrapper's forward and the module's hooks ran
    assert "forward" not in vars(inner)  # the class's forward is back
    assert through_wrapper(inner, inner, lambda x: x + 1, 1) == 2 and wrapper.calls == 1  # unwrapped: plain

    patched = inner.forward  # an instance-level forward (accelerate's autocast wrapper) is restored too
    inner.forward = patched
    with pytest.raises(ZeroDivisionError):
        through_wrapper(wrapper, inner, lambda x: x / 0, 1)
    assert vars(inner)["forward"] is patched


def test_module_calls_do_not_depend_on_the_data():
    """ZeRO-3 needs every rank to call the same modules: the candidate pass runs without candidate rows, and
    the sampler applies lm_head through its weight however many chunks it needs."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    calls = Counter()
    for name in ("model", "lm_head"):
        getattr(model, name).register_forward_pre_hook(lambda module, args, name=name: calls.update([name]))
    mask = torch.ones(2, 6, dtype=torch.long)
    position_ids = torch.arange(6).expand(2, 6)
    embeds = model.get_input_embeddings()(torch.randint(0, 50, (2, 6)))
    with torch.no_grad():
        hidden, cache = tpa.ground_truth_pass(model, embeds, mask, position_ids)
        empty = torch.zeros(2, 0, dtype=torch.long)
        out = tpa.candidate_pass(model, cache, mask, position_ids, empty, empty)
    assert out.shape == (2, 0, 16) and calls["model"] == 2
    cand_pos = torch.tensor([[3, 4, 5], [2, 3, -1]])
    for chunk_size in (1, 100):
        candidates.sample_candidates_from_hidden(model, hidden, cand_pos, 2, "greedy", chunk_size=chunk_size)
    assert calls["lm_head"] == 0


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def tied_pair(mini_root, tokenizer):
    """A 1-layer student with tied embeddings (as Qwen2-0.5B) and a wider 3-layer teacher, one SigLIP."""
    student = mini_llava(tokenizer, num_layers=1, seed=3, tie_word_embeddings=True)
    teacher = mini_llava(tokenizer, num_layers=3, hidden=48, role="teacher", seed=2)
    teacher.get_model().vision_tower.load_state_dict(student.get_model().vision_tower.state_dict())
    return (save_mini_checkpoint(student, tokenizer, mini_root / "z3_student"),
            save_mini_checkpoint(teacher, tokenizer, mini_root / "z3_teacher"))


@pytest.fixture(scope="module")
def mixed_data(mini_root, mini_world):
    """Three image samples and one text-only one: at one sample per rank, some micro-step has an image on one
    rank only. Every optimizer step covers the whole set: the update does not depend on the sample order."""
    records = json.loads((mini_world / "finetune.json").read_text())
    images, text = [r for r in records if "image" in r], [r for r in records if "image" not in r]
    path = mini_root / "z3_mixed.json"
    path.write_text(json.dumps(images[:3] + text[:1]))
    return path


def _distill(out: Path, pair, data: Path, mini_world, n_proc: int, *extra: str) -> dict:
    """Two epochs of one step each (global batch 4 = the whole set), SGD, greedy TPA (deterministic)."""
    student, teacher = pair
    args = ["-m", "aligntI_patch.distill", "--model_name_or_path", str(student),
            "--teacher_model_path", str(teacher), "--version", "qwen_2", "--data_path", str(data),
            "--image_folder", str(mini_world / "images"), "--output_dir", str(out), "--num_train_epochs", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "0.1", "--optim", "sgd",
            "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--iva_layer", "1",
            "--tpa_sampling", "greedy", "--tpa_num_samples", "2", "--model_max_length", "256",
            "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--use_cpu", *extra]
    launch = [sys.executable]
    if n_proc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(n_proc), "--master_port", free_port()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(launch + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tied_pair, mixed_data, mini_world):
    out = tmp_path_factory.mktemp("z3") / "one"
    return out, _distill(out, tied_pair, mixed_data, mini_world, 1, "--per_device_train_batch_size", "2")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero3", "zero2", "zero3-grad-ckpt"])
def test_two_processes_train_as_one(config, tmp_path, tied_pair, mixed_data, mini_world, one_process):
    """torchrun x2 on CPU, all terms: the logged losses and weights of one process on the same global batch.

    World size 2 shows in the step count (one process at this batch would take 2 steps per epoch). With
    gradient checkpointing (the scripts' GRAD_CKPT=1) TPA rebuilds the student's cache from its layers' inputs,
    outside the layers' forwards (ZeRO-3 gathers those modules' shards there too): still the same run."""
    ref_out, ref = one_process
    out = tmp_path / config
    stage, _, grad_ckpt = config.partition("-")
    state = _distill(out, tied_pair, mixed_data, mini_world, 2, "--per_device_train_batch_size", "1",
                     "--deepspeed", str(REPO / "scripts" / f"{stage}.json"),
                     *(["--gradient_checkpointing", "True"] if grad_ckpt else []))
    assert state["global_step"] == 2, "two processes must split one data stream"
    logged = [e for e in state["log_history"] if "loss" in e]
    expected = [e for e in ref["log_history"] if "loss" in e]
    assert len(logged) == len(expected) == 2
    for got, want in zip(logged, expected):
        for key in ("loss", "loss_sft", "loss_kd", "loss_iva", "loss_tpa"):
            assert math.isfinite(got[key]) and got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key
    weights, ref_weights = load_file(out / "model.safetensors"), load_file(ref_out / "model.safetensors")
    start = load_file(tied_pair[0] / "model.safetensors")
    assert max(float((ref_weights[k] - start[k]).abs().max()) for k in start) > 1e-3  # the steps moved
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_zero3_full_save_needs_16bit_gather():
    """A ZeRO-3 config that would save DeepSpeed shards instead of a loadable checkpoint fails before training."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    zero = {"stage": 3}
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero}
    try:  # TrainingArguments(deepspeed=...) turns ZeRO-3 on process-wide for from_pretrained: undo it after
        args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", deepspeed=config)
        check_full_save(args, full_checkpoint=False)  # projector-only and LoRA saves gather their own weights
        with pytest.raises(ValueError, match="stage3_gather_16bit_weights_on_model_save"):
            check_full_save(args, full_checkpoint=True)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", deepspeed=config)
        check_full_save(args, full_checkpoint=True)
    finally:
        unset_hf_deepspeed_config()


@pytest.mark.slow
def test_on_policy_under_zero3_two_processes(tmp_path, tied_pair, mixed_data, mini_world):
    """GKD baseline under ZeRO-3: both ranks sample (the image on one rank only in some micro-steps) and train."""
    state = _distill(tmp_path / "gkd", tied_pair, mixed_data, mini_world, 2, "--per_device_train_batch_size", "1",
                     "--deepspeed", str(REPO / "scripts" / "zero3.json"), "--on_policy_prob", "1",
                     "--on_policy_max_new_tokens", "6")
    logged = [e for e in state["log_history"] if "loss" in e]
    assert state["global_step"] == 2 and len(logged) == 2
    assert all(math.isfinite(e[k]) for e in logged for k in ("loss", "loss_sft", "loss_kd", "loss_iva", "loss_tpa"))
