"""Training entry end to end on the mini world: finetune, interrupt + resume, two processes (ZeRO-2 and ZeRO-3,
gloo; ZeRO-3 resume), the vision tower in every multi-process step."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llava.model.builder import load_pretrained_model
from llava.tiny.fixtures import free_port, mini_llava, save_mini_checkpoint
from llava.train import arguments
from llava.train.arguments import ModelArguments, TrainingArguments, check_trainable_attention
from llava.train.train import build_model
from llava.train.zero3 import needs_blank_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def start_ckpt(mini_root, tokenizer):
    """A 1-layer mini LLaVA checkpoint and its SigLIP dir, as the finetune stage starts from."""
    model = mini_llava(tokenizer, num_layers=1)
    path = save_mini_checkpoint(model, tokenizer, mini_root / "train_start")
    model.get_vision_tower().vision_tower.save_pretrained(mini_root / "train_siglip")
    return path


def _args(start_ckpt, mini_world, out, *extra):
    return [
        "--model_name_or_path", str(start_ckpt), "--version", "qwen_2",
        "--data_path", str(mini_world / "finetune.json"), "--image_folder", str(mini_world / "images"),
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--model_max_length", "256", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "steps",
        "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--use_cpu", *extra,
    ]


def _env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_finetune_saves_full_checkpoint_that_loads(tmp_path, start_ckpt, mini_world):
    out = tmp_path / "ft"
    subprocess.run([sys.executable, "-m", "llava.train.train", *_args(start_ckpt, mini_world, out, "--max_steps", "3",
                    "--save_steps", "100")], check=True, env=_env(), cwd=REPO, capture_output=True)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json",
                 "skipped_samples.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["conv_template"] == "qwen_2"
    before, after = load_file(start_ckpt / "model.safetensors"), load_file(out / "model.safetensors")
    assert not (before["lm_head.weight"] == after["lm_head.weight"]).all()  # it trained
    assert (before["model.vision_tower.vision_tower.post_layernorm.weight"]
            == after["model.vision_tower.vision_tower.post_layernorm.weight"]).all()  # tower frozen


def test_pretrain_stage_saves_projector_only(tmp_path, start_ckpt, mini_root, mini_world):
    out = tmp_path / "pt"
    args = _args(start_ckpt, mini_world, out, "--max_steps", "2", "--save_steps", "100", "--tune_mm_mlp_adapter",
                 "True", "--vision_tower", str(mini_root / "train_siglip"))
    args[args.index("--version") + 1] = "plain"
    args[args.index("--data_path") + 1] = str(mini_world / "pretrain.json")
    subprocess.run([sys.executable, "-m", "llava.train.train", *args], check=True, env=_env(), cwd=REPO,
                   capture_output=True)
    state = load_file(out / "mm_projector.safetensors")
    assert state and all("mm_projector" in k for k in state)
    assert not (out / "model.safetensors").exists()


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, start_ckpt, mini_world):
    out = tmp_path / "resume"
    cmd = [sys.executable, "-m", "llava.train.train", *_args(start_ckpt, mini_world, out, "--max_steps", "1000",
           "--save_steps", "2")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-4" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "first run ended before checkpoint-4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert not (out / "model.safetensors").exists()
    run = subprocess.run(cmd[:-4] + ["--max_steps", str(done + 2), "--save_steps", "2"], env=_env(), cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert f"checkpoint-{done}" in run.stderr + run.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == done + 2
    steps_logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps_logged[-2:] == [done + 1, done + 2]


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path, start_ckpt, mini_world):
    """torchrun x2 + ZeRO-2 on CPU (gloo, --use_cpu): the data is split, so steps halve; one model results."""
    out = tmp_path / "ddp"
    n_records = len(json.loads((mini_world / "finetune.json").read_text()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           "-m", "llava.train.train",
           *_args(start_ckpt, mini_world, out, "--num_train_epochs", "1", "--save_steps", "1000",
                  "--deepspeed", str(REPO / "scripts" / "zero2.json"))]
    run = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    per_step = 2 * 2  # per-device batch x world size
    assert state["global_step"] == -(-n_records // per_step), "both processes must share one data stream"
    assert (out / "model.safetensors").is_file()


def test_text_only_batch_runs_the_vision_tower_in_a_multi_process_run(tokenizer):
    """Every rank calls the vision tower, projector and embedding in the image path's order, and the projector
    gets a zero gradient; the loss is unchanged. One process, or a batch with images: nothing changes."""
    model = mini_llava(tokenizer, num_layers=1).train()
    calls = []
    tower, inner = model.get_vision_tower(), model.get_model()
    for module in (tower, inner.mm_projector, inner.embed_tokens, inner):
        module.register_forward_pre_hook(lambda module, args: calls.append(module))
    ids = torch.tensor(tokenizer("a red cube <|im_end|>")["input_ids"])[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain = model(**batch).loss
    calls.clear()
    assert needs_blank_image(None, SimpleNamespace(world_size=2))
    loss = model(**batch, vision_in_step=True).loss
    assert calls == [tower, inner.mm_projector, inner.embed_tokens, inner]  # as prepare_inputs_labels_for_multimodal
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in inner.mm_projector.parameters())
    calls.clear()
    for images, world_size in ((torch.zeros(1, 3, 32, 32), 2), (None, 1)):
        model(**batch, vision_in_step=needs_blank_image(images, SimpleNamespace(world_size=world_size)))
    assert calls == [inner, inner.embed_tokens] * 2  # the text-only path, untouched


@pytest.fixture(scope="module")
def zero3_data(mini_root, mini_world):
    """Per stage, four samples = one global batch (the update does not depend on their order). Finetune's set has
    one text-only sample: at one sample per rank, some micro-step has an image on one rank only."""
    records = json.loads((mini_world / "finetune.json").read_text())
    images, text = [r for r in records if "image" in r], [r for r in records if "image" not in r]
    finetune, pretrain = mini_root / "z3_train_mixed.json", mini_root / "z3_train_captions.json"
    finetune.write_text(json.dumps(images[:3] + text[:1]))
    pretrain.write_text(json.dumps(json.loads((mini_world / "pretrain.json").read_text())[:4]))
    return {"finetune": finetune, "lora": finetune, "pretrain": pretrain}


ZERO3_STAGES = {
    "finetune": (),
    "pretrain": ("--version", "plain", "--tune_mm_mlp_adapter", "True"),
    "lora": ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"),
}


def _train_stage(out, stage, data, start_ckpt, mini_root, mini_world, n_proc, *extra) -> dict:
    """Two epochs of one step each (global batch 4 = the whole set), SGD, constant lr: deterministic updates."""
    args = ["--model_name_or_path", str(start_ckpt), "--version", "qwen_2", "--data_path", str(data),
            "--image_folder", str(mini_world / "images"), "--vision_tower", str(mini_root / "train_siglip"),
            "--output_dir", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", str(2 // n_proc),
            "--gradient_accumulation_steps", "2", "--learning_rate", "0.1", "--optim", "sgd",
            "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--model_max_length", "256",
            "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--dataloader_num_workers", "0",
            "--disable_tqdm", "True", "--use_cpu", *ZERO3_STAGES[stage], *extra]
    launch = [sys.executable]
    if n_proc > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(n_proc), "--master_port", free_port()]
    run = subprocess.run(launch + ["-m", "llava.train.train", *args], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "trainer_state.json").read_text())


def _loaded_weights(path, model_base) -> dict[str, torch.Tensor]:
    _, model, _, _ = load_pretrained_model(str(path), model_base=model_base and str(model_base), device="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(ZERO3_STAGES))
def test_zero3_two_processes_train_as_one(stage, tmp_path, start_ckpt, mini_root, mini_world, zero3_data):
    """torchrun x2 + ZeRO-3 on CPU (gradient checkpointing on, as the scripts run): the logged losses of one
    process on the same global batch, and a saved checkpoint that loads with the same weights.

    World size 2 shows in the step count (one process at this batch would take 2 steps per epoch)."""
    run = (start_ckpt, mini_root, mini_world)
    ref = _train_stage(tmp_path / "one", stage, zero3_data[stage], *run, 1)
    state = _train_stage(tmp_path / "zero3", stage, zero3_data[stage], *run, 2,
                         "--deepspeed", str(REPO / "scripts" / "zero3.json"), "--gradient_checkpointing", "True")
    assert state["global_step"] == 2, "two processes must split one data stream"
    logged = [e["loss"] for e in state["log_history"] if "loss" in e]
    expected = [e["loss"] for e in ref["log_history"] if "loss" in e]
    assert len(logged) == 2 and all(map(math.isfinite, logged))
    assert logged == pytest.approx(expected, rel=1e-4, abs=1e-4)
    saved = {"finetune": "model.safetensors", "pretrain": "mm_projector.safetensors",
             "lora": "adapter_model.safetensors"}[stage]
    assert (tmp_path / "zero3" / saved).is_file() and (tmp_path / "zero3" / "preprocessor_config.json").is_file()
    base = None if stage == "finetune" else start_ckpt  # projector-only and LoRA load onto their base
    weights, ref_weights = _loaded_weights(tmp_path / "zero3", base), _loaded_weights(tmp_path / "one", base)
    start = _loaded_weights(start_ckpt, None)
    assert max(float((ref_weights[k] - start[k]).abs().max()) for k in start) > 1e-3  # the steps moved
    assert weights.keys() == ref_weights.keys()
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.slow
def test_zero3_run_resumes_from_its_checkpoint(tmp_path, start_ckpt, mini_root, mini_world, zero3_data):
    """torchrun x2 + ZeRO-3 stopped after step 1, then resumed from its checkpoint (partitioned weights and AdamW
    moments): step 2's loss and the final weights are those of the same run left uninterrupted."""
    run, data = (start_ckpt, mini_root, mini_world), zero3_data["finetune"]
    z3 = ("--deepspeed", str(REPO / "scripts" / "zero3.json"), "--gradient_checkpointing", "True",
          "--save_strategy", "steps", "--save_steps", "1", "--optim", "adamw_torch", "--learning_rate", "1e-2")
    ref = _train_stage(tmp_path / "straight", "finetune", data, *run, 2, *z3)
    out = tmp_path / "resumed"
    first = _train_stage(out, "finetune", data, *run, 2, *z3, "--max_steps", "1")
    assert first["global_step"] == 1 and (out / "checkpoint-1" / "trainer_state.json").is_file()
    (out / "model.safetensors").unlink()  # as an interrupted run leaves it: a checkpoint, no final model
    # Mark step 1's logged loss: a resumed run keeps the checkpoint's history, a restarted one logs it anew.
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    next(e for e in state["log_history"] if "loss" in e)["loss"] = -1.0
    state_file.write_text(json.dumps(state))
    second = _train_stage(out, "finetune", data, *run, 2, *z3)
    assert second["global_step"] == 2
    logged = {e["step"]: e["loss"] for e in second["log_history"] if "loss" in e}
    expected = {e["step"]: e["loss"] for e in ref["log_history"] if "loss" in e}
    assert logged.keys() == expected.keys() == {1, 2}
    assert logged[1] == -1.0, "the second run did not resume from checkpoint-1"
    assert logged[2] == pytest.approx(expected[2], rel=1e-5, abs=1e-6)
    weights, ref_weights = _loaded_weights(out, None), _loaded_weights(tmp_path / "straight", None)
    start = _loaded_weights(start_ckpt, None)
    assert weights.keys() == ref_weights.keys()
    # Same ranks, same reduction order: bitwise equal. (Step 1's weights with fresh AdamW moments, i.e. a resume
    # that lost the optimizer state, end up to 0.017 away.)
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0, msg=k)
    assert max(float((ref_weights[k] - start[k]).abs().max()) for k in start) > 1e-3  # the steps moved


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flash_attention_2", "flex_attention"])
def test_attn_implementation_flag(impl):
    parser = transformers.HfArgumentParser(ModelArguments)
    (args,) = parser.parse_args_into_dataclasses(["--model_name_or_path", "m", "--attn_implementation", impl])
    assert args.attn_implementation == impl


def test_attn_implementation_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="must be one of .*'flex_attention'.*got 'flex'"):
        ModelArguments(model_name_or_path="m", attn_implementation="flex")
    monkeypatch.setattr(arguments, "is_torch_flex_attn_available", lambda: False)
    with pytest.raises(ValueError, match="no FlexAttention"):
        ModelArguments(model_name_or_path="m", attn_implementation="flex_attention")
    monkeypatch.undo()
    # FlexAttention has no CPU backward: building a flex model to train on CPU fails before any weight loads
    # (the path does not exist); forward-only use (a teacher, inference) goes through load_pretrained_model instead.
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "absent"), attn_implementation="flex_attention")
    with pytest.raises(ValueError, match="cannot train on cpu: .* no FlexAttention backward"):
        build_model(model_args, TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    check_trainable_attention("flex_attention", torch.device("cuda"))
    check_trainable_attention("sdpa", torch.device("cpu"))


@pytest.mark.parametrize("flag", ["mm_use_im_start_end", "mm_use_im_patch_token"])
def test_image_delimiter_flags_are_refused(tokenizer, flag):
    """LLaVA's delimiter flags would change the prompt layout; refused up front, in training and at load."""
    with pytest.raises(ValueError, match="not supported"):
        ModelArguments(model_name_or_path="m", **{flag: True})
    config = mini_llava(tokenizer).config
    setattr(config, flag, True)
    with pytest.raises(ValueError, match="not supported"):
        type(mini_llava(tokenizer))(config)


def test_lora_run_resumes_with_its_projector(tmp_path, start_ckpt, mini_world):
    """LoRA: HF's checkpoint holds only the adapter, so the projector (a non-LoRA trainable) travels beside it in
    non_lora_trainables.bin; a run resumed from checkpoint-2 ends bitwise where the uninterrupted one does (the
    projector used to restart from its initial weights: 0.04 away)."""
    import shutil

    from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.lora import apply_lora
    from llava.train.train import set_trainable

    def trainer(out):
        args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=4, save_steps=2,
                                 save_strategy="steps", per_device_train_batch_size=2, learning_rate=1e-2,
                                 lora_enable=True, lora_r=4, lora_alpha=8, dataloader_num_workers=0,
                                 disable_tqdm=True, logging_steps=1, seed=0)
        tokenizer, model, processor, _ = load_pretrained_model(str(start_ckpt), device="cpu")
        set_trainable(model, ModelArguments(model_name_or_path=str(start_ckpt), version="qwen_2"), args)
        model = apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_bias)
        data = LazySupervisedDataset(str(mini_world / "finetune.json"), tokenizer, processor,
                                     str(mini_world / "images"), "qwen_2", 256, model.num_image_tokens)
        return LLaVATrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data,
                            data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id))

    def trained(t) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in t.model.named_parameters() if v.requires_grad}

    straight = trainer(tmp_path / "straight")
    start = trained(straight)
    straight.train()
    assert (tmp_path / "straight" / "checkpoint-2" / "non_lora_trainables.bin").is_file()
    resumed = trainer(tmp_path / "resumed")
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", checkpoint)  # a run killed after its save
    resumed.train(resume_from_checkpoint=str(checkpoint))
    weights, expected = trained(resumed), trained(straight)
    projector = [k for k in expected if "mm_projector" in k]
    assert projector and max(float((expected[k] - start[k]).abs().max()) for k in projector) > 1e-3  # it moved
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0, msg=k)
