"""Align-TI trainer: normalisation under accumulation, every term goes down, errors before training, runs."""

import functools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aligntI_patch.arguments import DistillArguments
from aligntI_patch.distill import check_pair, choose_iva_layer, load_teacher
from aligntI_patch.trainer import AlignTITrainer
from llava.tiny.fixtures import free_port, mini_llava, save_mini_checkpoint
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(mini_root, tokenizer):
    """Saved mini student (1 layer) and teacher (3 layers, wider, 64 more lm_head rows), one SigLIP."""
    student = mini_llava(tokenizer, num_layers=1, seed=1)
    teacher = mini_llava(tokenizer, num_layers=3, hidden=48, role="teacher", seed=2)
    teacher.get_model().vision_tower.load_state_dict(student.get_model().vision_tower.state_dict())
    s = save_mini_checkpoint(student, tokenizer, mini_root / "d_student")
    t = save_mini_checkpoint(teacher, tokenizer, mini_root / "d_teacher")
    return s, t


def _args(tmp_path, teacher, **kw):
    base = dict(output_dir=str(tmp_path / "out"), teacher_model_path=str(teacher) if teacher else None, use_cpu=True, report_to="none",
                save_strategy="no", max_steps=1, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                per_device_train_batch_size=4, gradient_accumulation_steps=1, tpa_sampling="greedy",
                iva_layer="1", model_max_length=256, dataloader_num_workers=0, seed=0, max_grad_norm=0.0,
                disable_tqdm=True, logging_steps=1)
    base.update(kw)
    return DistillArguments(**base)


def _trainer(args, student_path, tokenizer, mini_world, data_path=None):
    from llava.model.builder import load_pretrained_model

    _, student, processor, _ = load_pretrained_model(str(student_path), device="cpu")
    student.train()
    teacher = load_teacher(args, torch.device("cpu"))[1] if args.needs_teacher else None
    data = LazySupervisedDataset(str(data_path or mini_world / "finetune.json"), tokenizer, processor,
                                 str(mini_world / "images"), "qwen_2", 256, student.num_image_tokens)
    return AlignTITrainer(model=student, args=args, processing_class=tokenizer, teacher=teacher, iva_layer=1,
                          vocab_size=len(tokenizer), train_dataset=data,
                          data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id))


def test_accumulation_gives_the_same_update_as_one_batch(tmp_path, pair, tokenizer, mini_world):
    """Golden check: 1 x 4 and 2 x 2 (micro-batch x accumulation) make the same optimizer step."""
    student_path, teacher_path = pair
    results = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        args = _args(tmp_path / f"{bs}x{ga}", teacher_path, per_device_train_batch_size=bs,
                     gradient_accumulation_steps=ga)
        trainer = _trainer(args, student_path, tokenizer, mini_world)
        trainer.train()
        results.append({k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad})
    start = _trainer(_args(tmp_path / "s", teacher_path), student_path, tokenizer, mini_world).model
    moved = max(float((results[0][k] - p.detach()).abs().max()) for k, p in start.named_parameters() if k in results[0])
    assert moved > 1e-4  # the step did something
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(other[k], results[0][k], atol=2e-6, rtol=1e-4, msg=k)


def test_a_few_steps_lower_every_term(tmp_path, pair, tokenizer, mini_world):
    """Training on a fixed batch lowers each enabled term. The mini teacher is untrained, so its targets and
    the ground truth disagree: the teacher terms (KD, IVA, TPA) are trained together, SFT on its own."""
    student_path, teacher_path = pair
    for enabled in ({"kd", "iva", "tpa"}, {"sft"}):
        weights = {f"w_{k}": float(k in enabled) for k in ("sft", "kd", "iva", "tpa")}
        trainer = _trainer(_args(tmp_path, teacher_path, **weights), student_path, tokenizer, mini_world)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        batch.pop("skipped", None)
        student = trainer.model
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-3)
        first = None
        for _ in range(8):
            sums = trainer.term_sums(student, batch)
            assert set(sums) == enabled
            first = first or {k: float(v) for k, v in sums.items()}
            opt.zero_grad()
            sum(sums.values()).backward()
            opt.step()
        last = {k: float(v) for k, v in trainer.term_sums(student, batch).items()}
        for k in first:
            assert last[k] < 0.9 * first[k], (k, first[k], last[k])


def test_errors_before_training(tmp_path, pair, tokenizer, mini_root):
    student_path, teacher_path = pair
    with pytest.raises(ValueError, match="tpa_num_samples"):
        _args(tmp_path, teacher_path, tpa_num_samples=0)
    with pytest.raises(ValueError, match="divergence"):
        _args(tmp_path, teacher_path, divergence="wasserstein")
    with pytest.raises(ValueError, match="teacher_model_path is required"):
        _args(tmp_path, None)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_teacher(_args(tmp_path, tmp_path / "nowhere"), torch.device("cpu"))
    # an --irs_path that is not there is a typo, not a request to recompute IRS
    with pytest.raises(FileNotFoundError, match="--irs_path .*missing/irs.json"):
        _args(tmp_path, teacher_path, irs_path=str(tmp_path / "missing" / "irs.json"))
    # end points where the divergence is identically 0 (the skew one failed only at the first step)
    with pytest.raises(ValueError, match="--divergence sfkl: alpha must be in \\[0, 1\\).*--skew_alpha"):
        _args(tmp_path, teacher_path, divergence="sfkl", skew_alpha=1.0)
    with pytest.raises(ValueError, match="--divergence jsd: beta must be in \\(0, 1\\).*--jsd_beta"):
        _args(tmp_path, teacher_path, divergence="jsd", jsd_beta=0.0)
    student = mini_llava(tokenizer, num_layers=1)
    args = _args(tmp_path, teacher_path)
    other_tok = type(tokenizer).from_pretrained(str(teacher_path))
    other_tok.add_tokens(["<extra_token>"])
    with pytest.raises(ValueError, match="differs from the student"):
        check_pair(student, student, tokenizer, other_tok, args, str(student_path))
    from transformers import SiglipVisionConfig

    from llava.tiny.fixtures import MINI_VISION

    wide = mini_llava(tokenizer, mm_vision_config=SiglipVisionConfig(**{**MINI_VISION, "patch_size": 4}).to_dict())
    with pytest.raises(ValueError, match="visual tokens per image"):
        check_pair(student, wide, tokenizer, tokenizer, args, str(student_path))
    # TPA's ribbon is full causal: a sliding window shorter than --model_max_length (256) is refused up front
    sliding = mini_llava(tokenizer, num_layers=1, use_sliding_window=True, sliding_window=128, max_window_layers=0)
    with pytest.raises(ValueError, match="the teacher .*sliding_window=128 on layers \\[0\\].*256 tokens"):
        check_pair(student, sliding, tokenizer, tokenizer, args, str(student_path))
    check_pair(student, sliding, tokenizer, tokenizer, _args(tmp_path, teacher_path, w_tpa=0.0), str(student_path))


def test_iva_layer_is_chosen_and_checked_on_the_source_model(tmp_path, pair, tokenizer, mini_world):
    """--iva_weight_source student: IRS (Eq. 4) ranks the student's layers and --iva_layer is checked against the
    student's depth before training (a teacher layer used to reach the 1-layer student's hook at the first step)."""
    from llava.model.builder import load_pretrained_model
    from llava.train.arguments import DataArguments, ModelArguments

    student_path, teacher_path = pair
    _, student, processor, _ = load_pretrained_model(str(student_path), device="cpu")
    _, teacher = load_teacher(_args(tmp_path, teacher_path), torch.device("cpu"))
    data_args = DataArguments(data_path=str(mini_world / "finetune.json"), image_folder=str(mini_world / "images"))
    model_args = ModelArguments(model_name_or_path=str(student_path), version="qwen_2")

    def choose(**kw) -> int:
        args = _args(tmp_path, teacher_path, irs_num_pairs=4, **kw)
        return choose_iva_layer(args, data_args, model_args, student, teacher, tokenizer, processor)

    assert choose(iva_layer="2") == 2  # a teacher layer for the teacher's attention
    with pytest.raises(ValueError, match=r"--iva_layer 2 .*--iva_weight_source student: the student \(.*d_student\) "
                                         r"has 1 decoder layers \(0\.\.0\)"):
        choose(iva_layer="2", iva_weight_source="student")
    assert choose(iva_layer="auto", iva_weight_source="student") == 0
    assert json.loads((tmp_path / "out" / "irs.json").read_text())["layers"] == [0]  # the student's layers
    assert choose(iva_layer="auto") in (0, 1, 2)
    assert json.loads((tmp_path / "out" / "irs.json").read_text())["layers"] == [0, 1, 2]  # the teacher's
    # the teacher's irs.json handed to the student is caught, not applied to the student
    with pytest.raises(ValueError, match="scores layers up to 2 but the student .* has 1"):
        choose(iva_layer="auto", iva_weight_source="student", irs_path=str(tmp_path / "out" / "irs.json"))


def _cmd(student_path, teacher_path, mini_world, out, *extra):
    return ["-m", "aligntI_patch.distill", "--model_name_or_path", str(student_path),
            "--teacher_model_path", str(teacher_path), "--version", "qwen_2",
            "--data_path", str(mini_world / "finetune.json"), "--image_folder", str(mini_world / "images"),
            "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--model_max_length", "256", "--report_to", "none", "--logging_steps", "1", "--iva_layer", "auto",
            "--irs_num_pairs", "8", "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--use_cpu", *extra]


def _env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_interrupted_distillation_resumes(tmp_path, pair, mini_world):
    student_path, teacher_path = pair
    out = tmp_path / "resume"
    cmd = [sys.executable, *_cmd(student_path, teacher_path, mini_world, out, "--max_steps", "1000",
                                 "--save_steps", "2")]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-2" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "first run ended before checkpoint-2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "irs.json").is_file()  # --iva_layer auto computed IRS on the teacher
    done = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    run = subprocess.run(cmd[:-4] + ["--max_steps", str(done + 2), "--save_steps", "2"], env=_env(), cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checkpoint-{done}" in run.stderr + run.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == done + 2
    logged = [e for e in state["log_history"] if "loss" in e]
    assert {"loss_sft", "loss_kd", "loss_iva", "loss_tpa", "tokens_response"} <= set(logged[-1])


@pytest.mark.slow
def test_two_process_distillation_zero2(tmp_path, pair, mini_world):
    """torchrun x2 + ZeRO-2 on CPU with a teacher: world size 2 asserted through the number of steps."""
    student_path, teacher_path = pair
    out = tmp_path / "ddp"
    n_records = len(json.loads((mini_world / "finetune.json").read_text()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
           *_cmd(student_path, teacher_path, mini_world, out, "--num_train_epochs", "1", "--save_steps", "1000",
                 "--deepspeed", str(REPO / "scripts" / "zero2.json"))]
    run = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == -(-n_records // 4), "two processes must split one data stream"
    assert (out / "model.safetensors").is_file()


def test_teacher_attention_implementation(tmp_path, pair):
    """--teacher_attn_implementation reaches the teacher's LLM; flex_attention is refused off CUDA before loading."""
    _, teacher_path = pair
    _, teacher = load_teacher(_args(tmp_path, teacher_path, teacher_attn_implementation="eager"), torch.device("cpu"))
    assert teacher.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="flex_attention needs a CUDA device"):
        load_teacher(_args(tmp_path, teacher_path, teacher_attn_implementation="flex_attention"), torch.device("cpu"))
    with pytest.raises(ValueError, match="teacher_attn_implementation"):
        _args(tmp_path, teacher_path, teacher_attn_implementation="flash")


def test_on_policy_tokens_are_counted_in_the_global_normaliser(tmp_path, pair, tokenizer, mini_world):
    """GKD baseline under accumulation: responses are replaced before the step's counts are taken, so every
    term divides by the tokens it actually sums over (not by the replaced ground truth's count)."""
    from aligntI_patch.losses import prediction_rows

    student_path, teacher_path = pair
    args = _args(tmp_path, teacher_path, on_policy_prob=1.0, on_policy_max_new_tokens=3)
    trainer = _trainer(args, student_path, tokenizer, mini_world)
    originals = [trainer.data_collator([trainer.train_dataset[i] for i in rows]) for rows in ((0, 1), (2, 3))]
    torch.manual_seed(0)
    batches, _ = trainer.get_batch_samples(iter(originals), 2, torch.device("cpu"))
    used = sum(int(prediction_rows(b["labels"])[0].sum()) for b in batches)
    before = sum(int(prediction_rows(b["labels"])[0].sum()) for b in originals)
    assert used != before  # 1-4 sampled tokens per reply: the counts differ from the ground truth's
    assert trainer.global_counts["response"] == used
    trainer.train()  # the whole step runs on the substituted batches
    assert trainer.state.global_step == 1 and all(math.isfinite(v) for v in trainer.state.log_history[0].values()
                                                  if isinstance(v, float))


def _trained_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("flags", [
    {"tpa_sampling": "nucleus"},  # TPA candidates drawn from the trainer's generator
    {"w_iva": 0.0, "w_tpa": 0.0, "on_policy_prob": 0.5, "on_policy_max_new_tokens": 8},  # on-policy draws
], ids=["nucleus", "on_policy"])
def test_resume_is_exact(tmp_path, pair, tokenizer, mini_world, flags):
    """A run resumed from checkpoint-2 logs the same steps and ends with the same weights, bitwise, as the run
    left uninterrupted: the sampling states travel in the checkpoint, and the first log after the resume
    averages over its own window (it divided by the global step, i.e. 3x too small at step 3)."""
    student_path, teacher_path = pair
    run = dict(max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2, **flags)
    straight = _trainer(_args(tmp_path / "a", teacher_path, **run), student_path, tokenizer, mini_world)
    straight.train()
    resumed = _trainer(_args(tmp_path / "b", teacher_path, **run), student_path, tokenizer, mini_world)
    checkpoint = Path(resumed.args.output_dir) / "checkpoint-2"
    shutil.copytree(Path(straight.args.output_dir) / "checkpoint-2", checkpoint)  # a run killed after its save
    assert (checkpoint / "sampling_state_0.pth").is_file()
    resumed.train(resume_from_checkpoint=str(checkpoint))

    def logged(trainer) -> dict[int, dict]:
        return {e["step"]: {k: v for k, v in e.items() if k.startswith(("loss", "tokens", "samples"))}
                for e in trainer.state.log_history if "loss" in e}

    assert logged(resumed) == logged(straight)
    assert set(logged(resumed)) == {1, 2, 3, 4}
    weights, expected = _trained_weights(resumed), _trained_weights(straight)
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0, msg=k)


def test_logs_are_window_means_and_count_zero_images(tmp_path, pair, tokenizer, mini_world):
    """--logging_steps 2: every logged value is a per-step mean over the window (the counts used to be the last
    step's), and a window without images logs samples_image 0 (it was floored at 1)."""
    student_path, _ = pair
    text_only = [r for r in json.loads((mini_world / "finetune.json").read_text()) if "image" not in r][:4]
    for r, n in zip(text_only, (12, 4)):  # two long replies: any two batches of two differ in response tokens
        r["conversations"][1]["value"] = " ".join(["cyan"] * n)
    data_path = tmp_path / "text.json"
    data_path.write_text(json.dumps(text_only))
    args = _args(tmp_path, None, w_kd=0.0, w_iva=0.0, w_tpa=0.0, max_steps=2, logging_steps=2,
                 per_device_train_batch_size=2)
    trainer = _trainer(args, student_path, tokenizer, mini_world, data_path)
    per_step = []
    fetch = trainer.get_batch_samples

    def counted(*a, **kw):
        out = fetch(*a, **kw)
        per_step.append(trainer.global_counts["response"])
        return out

    trainer.get_batch_samples = counted
    trainer.train()
    (log,) = [e for e in trainer.state.log_history if "loss" in e]
    assert len(per_step) == 2 and per_step[0] != per_step[1]  # the mean differs from either step's count
    assert log["tokens_response"] == pytest.approx(sum(per_step) / 2)
    assert log["samples_image"] == 0
    assert log["loss_sft"] == pytest.approx(log["loss"], abs=1e-4)  # SFT only: the term is HF's window mean


def test_sft_runs_without_a_teacher(tmp_path, pair, mini_world, monkeypatch):
    """SFT (every teacher term off) needs no --teacher_model_path and loads no teacher; on-policy alone is refused."""
    from aligntI_patch import distill

    student_path, teacher_path = pair
    assert not _args(tmp_path, None, w_kd=0.0, w_iva=0.0, w_tpa=0.0).needs_teacher
    with pytest.raises(ValueError, match="--on_policy_prob needs a teacher term"):
        _args(tmp_path, teacher_path, w_kd=0.0, w_iva=0.0, w_tpa=0.0, on_policy_prob=0.5)
    with pytest.raises(ValueError, match="no loss"):
        _args(tmp_path, teacher_path, w_sft=0.0, w_kd=0.0, w_iva=0.0, w_tpa=0.0)
    out = tmp_path / "sft"
    cmd = _cmd(student_path, teacher_path, mini_world, out, "--max_steps", "1", "--save_strategy", "no",
               "--w_kd", "0", "--w_iva", "0", "--w_tpa", "0")
    i = cmd.index("--teacher_model_path")
    monkeypatch.setattr(sys, "argv", ["distill", *cmd[2:i], *cmd[i + 2:]])
    distill.main()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and "loss_sft" in state["log_history"][0]
    assert (out / "model.safetensors").is_file()


def test_sampling_generator_lives_with_the_logits(tmp_path, pair, tokenizer, mini_world):
    """TPA's generator is made on the training device (multinomial on CUDA logits needs a CUDA generator), and
    its state round-trips through a checkpoint on any device (get_state is CPU bytes)."""
    from aligntI_patch.candidates import sample_from_logits
    from aligntI_patch.trainer import sampling_generator

    student_path, teacher_path = pair
    trainer = _trainer(_args(tmp_path, teacher_path), student_path, tokenizer, mini_world)
    assert trainer.generator.device == trainer.args.device == torch.device("cpu")
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for device in devices:
        trainer.generator = sampling_generator(torch.device(device), 0)
        logits = torch.randn(5, 40, device=device)
        sample_from_logits(logits, 4, "nucleus", generator=trainer.generator)
        trainer.save_resume_state(str(tmp_path))
        after_save = sample_from_logits(logits, 4, "nucleus", generator=trainer.generator)
        trainer.load_resume_state(str(tmp_path))
        assert torch.equal(sample_from_logits(logits, 4, "nucleus", generator=trainer.generator), after_save)


def test_iva_layer_auto_is_read_back_on_resume(tmp_path, pair, tokenizer, mini_world, caplog):
    """A resumed run takes the IVA layer from the irs.json it wrote, not from IRS recomputed (near ties on a GPU
    could pick another layer); without a checkpoint to resume, IRS is computed afresh."""
    from llava.model.builder import load_pretrained_model
    from llava.train.arguments import DataArguments, ModelArguments

    student_path, teacher_path = pair
    _, student, processor, _ = load_pretrained_model(str(student_path), device="cpu")
    args = _args(tmp_path, teacher_path, irs_num_pairs=4, iva_layer="auto")
    _, teacher = load_teacher(args, torch.device("cpu"))
    data_args = DataArguments(data_path=str(mini_world / "finetune.json"), image_folder=str(mini_world / "images"))
    model_args = ModelArguments(model_name_or_path=str(student_path), version="qwen_2")
    choose = functools.partial(choose_iva_layer, args, data_args, model_args, student, teacher, tokenizer, processor)
    computed = choose()
    out = Path(args.output_dir)
    written = json.loads((out / "irs.json").read_text())
    other = (computed + 1) % 3
    (out / "irs.json").write_text(json.dumps({**written, "best_layer": other}))
    assert choose() == computed  # no checkpoint: a fresh start computes IRS (and rewrites irs.json)
    (out / "irs.json").write_text(json.dumps({**written, "best_layer": other}))
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="aligntI_patch.distill"):
        assert choose() == other
    assert "IRS not recomputed" in caplog.text


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path, pair, mini_world):
    """torchrun x2 (DDP, gloo) with nucleus TPA and on-policy draws: resumed from checkpoint-2 (each rank's
    sampling state, the run's irs.json), the run logs and ends bitwise as the uninterrupted one."""
    from safetensors.torch import load_file

    student_path, teacher_path = pair

    def distill(out: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
               *_cmd(student_path, teacher_path, mini_world, out, "--max_steps", "4", "--save_steps", "2",
                     "--tpa_sampling", "nucleus", "--on_policy_prob", "0.5", "--on_policy_max_new_tokens", "6")]
        run = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        return run

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    distill(straight)
    assert {p.name for p in (straight / "checkpoint-2").glob("sampling_state_*")} == {
        "sampling_state_0.pth", "sampling_state_1.pth"}
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # a run killed after its save
    shutil.copy(straight / "irs.json", resumed / "irs.json")
    run = distill(resumed)
    assert "IRS not recomputed" in run.stderr + run.stdout

    def logged(out: Path) -> dict[int, dict]:
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return {e["step"]: {k: v for k, v in e.items() if k.startswith(("loss", "tokens", "samples"))}
                for e in history if "loss" in e}

    assert logged(resumed) == logged(straight) and set(logged(straight)) == {1, 2, 3, 4}
    weights, expected = load_file(resumed / "model.safetensors"), load_file(straight / "model.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(weights[k], v, atol=0, rtol=0, msg=k)
