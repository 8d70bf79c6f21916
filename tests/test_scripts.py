"""The shell entry points (`scripts/v1_5/*.sh`, `scripts/v1_5/eval/*.sh`), run with a stand-in python.

`PYTHON` points to a stub (in a folder whose name has a space, so an unquoted "$PYTHON" breaks) that logs
each call (argv, working directory, CUDA_VISIBLE_DEVICES) as a JSON line, prints the tiny preset's paths,
writes the `--answers-file` of an answering chunk, and fails the chunk named by STUB_FAIL_CHUNK: nothing is
trained or evaluated, so these tests take seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "v1_5"
EVAL_SCRIPTS = ["gqa", "mmbench", "mme", "pope", "sqa", "textvqa", "tiny"]

STUB = f"""#!{sys.executable}
import json, os, sys, time
from pathlib import Path

argv = sys.argv[1:]
record = {{"prog": Path(sys.argv[0]).name, "cwd": os.getcwd(), "argv": argv,
          "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if argv[:3] == ["-m", "llava.tiny.preset", "paths"]:  # the tiny preset's paths, under --root
    root, b = argv[argv.index("--root") + 1], argv[argv.index("--backbone") + 1]
    for name, rel in (("WORLD", "data"), ("IMAGES", "data/images"), ("STUDENT_BASE", f"base/student-{{b}}"),
                      ("TEACHER", f"teacher/{{b}}"), ("SIGLIP", "siglip")):
        print(f"TINY_{{name}}={{root}}/{{rel}}")
if "--chunk-idx" in argv:
    chunk = argv[argv.index("--chunk-idx") + 1]
    if chunk == os.environ.get("STUB_FAIL_CHUNK"):
        sys.exit(3)
    time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
    Path(argv[argv.index("--answers-file") + 1]).write_text(json.dumps({{"chunk": chunk}}) + "\\n")
"""


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    """The stand-in python, and `deepspeed` beside it (the launcher looks for it next to python)."""
    folder = tmp_path / "my bin"
    folder.mkdir()
    for name in ("python", "deepspeed"):
        (folder / name).write_text(STUB)
        (folder / name).chmod(0o755)
    return folder / "python"


def run(script: Path, cwd: Path, stub: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run `script` from `cwd` with the stub as PYTHON; its result and the stub's calls."""
    log = stub.parent / "calls.jsonl"
    log.unlink(missing_ok=True)
    full_env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(cwd)), "PYTHON": str(stub),
        "STUB_LOG": str(log), "NUM_GPUS": "0", **env,
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(script)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


REAL_SCALE = {"MODEL": "/models/student", "VISION_TOWER": "/models/siglip", "DATA_PATH": "/data/mix.json",
              "IMAGE_FOLDER": "/data/images", "PRETRAIN_DIR": "/ckpt/pretrain", "TEACHER": "/models/teacher"}  # fmt: skip


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize(
    "script, default",
    [("pretrain.sh", "llava-qwen-pretrain"), ("finetune.sh", "llava-qwen-sft"),
     ("distill_aligntI.sh", "llava-qwen-aligntI")],
)  # fmt: skip
def test_real_scale_scripts_default_their_output_dir(stub, tmp_path, script, default):
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **REAL_SCALE)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call["cwd"] == str(ROOT)  # the scripts run from the repository root...
    assert flag(call["argv"], "--output_dir") == f"./checkpoints/{default}"  # ...so the default is there
    assert "--use_cpu" in call["argv"]


@pytest.mark.parametrize("script", ["pretrain.sh", "finetune.sh", "distill_aligntI.sh"])
def test_relative_paths_are_taken_from_the_callers_directory(stub, tmp_path, script):
    caller = tmp_path / "work dir"
    (caller / "teacher").mkdir(parents=True)
    (caller / "siglip").mkdir()
    env = {
        "MODEL": "Qwen/Qwen2-0.5B",  # a hub id: no such folder here, passed unchanged
        "TEACHER": "teacher", "VISION_TOWER": "./siglip", "DATA_PATH": "my data/mix.json",
        "IMAGE_FOLDER": "imgs", "OUTPUT_DIR": "./out", "PRETRAIN_DIR": "../pre", "DS_CONFIG": "ds.json",
        "NUM_GPUS": "2",
    }  # fmt: skip
    proc, calls = run(SCRIPTS / script, caller, stub, **env)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    argv = call["argv"]
    assert call["prog"] == "deepspeed" and call["cwd"] == str(ROOT)
    assert argv[:2] == ["--num_gpus", "2"] and flag(argv, "--deepspeed") == f"{caller}/ds.json"
    assert flag(argv, "--model_name_or_path") == "Qwen/Qwen2-0.5B"
    assert flag(argv, "--vision_tower") == f"{caller}/siglip"
    assert flag(argv, "--data_path") == f"{caller}/my data/mix.json"
    assert flag(argv, "--image_folder") == f"{caller}/imgs"
    assert flag(argv, "--output_dir") == f"{caller}/out"
    if script != "pretrain.sh":
        assert flag(argv, "--pretrain_mm_mlp_adapter") == f"{caller}/../pre/mm_projector.safetensors"
    if script == "distill_aligntI.sh":
        assert flag(argv, "--teacher_model_path") == f"{caller}/teacher"


@pytest.mark.parametrize(
    "distill_args",
    [
        '--irs_path "/a b/irs.json" --w_tpa 0',
        "--note 'it is' --x \"q\\\"uote\" back\\ slash '' --last",
        "  --w_iva 0\t--divergence   rkl  ",
        "--note $(touch PWNED) `touch PWNED2` $HOME",  # nothing is expanded or executed
        "",
    ],
)
def test_distill_args_split_like_a_shell(stub, tmp_path, distill_args):
    proc, calls = run(SCRIPTS / "distill_aligntI.sh", tmp_path, stub, DISTILL_ARGS=distill_args, **REAL_SCALE)
    assert proc.returncode == 0, proc.stderr
    argv = calls[0]["argv"]
    tail = argv[argv.index("--group_by_modality_length") + 2 :]  # DISTILL_ARGS come last
    assert tail[:2] == ["--gradient_checkpointing", "True"]  # GRAD_CKPT's default at real scale, then them
    assert tail[2:] == shlex.split(distill_args)
    assert not list(ROOT.glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))


def test_distill_args_with_an_unmatched_quote_fail(stub, tmp_path):
    proc, calls = run(
        SCRIPTS / "distill_aligntI.sh", tmp_path, stub, DISTILL_ARGS='--irs_path "/a b', **REAL_SCALE
    )
    assert proc.returncode != 0 and "unmatched" in proc.stderr and not calls


TRAIN_SCRIPTS = ["pretrain.sh", "finetune.sh", "distill_aligntI.sh"]
ENTRY = {"pretrain.sh": "llava.train.train", "finetune.sh": "llava.train.train",
         "distill_aligntI.sh": "aligntI_patch.distill"}  # fmt: skip


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_extra_args_come_last_split_like_a_shell(stub, tmp_path, script):
    extra = "--save_steps 500 --run_name 'my run' --note $(touch PWNED) --resume_from_checkpoint False"
    env = {**REAL_SCALE, "EXTRA_ARGS": extra}
    if script == "distill_aligntI.sh":
        env["DISTILL_ARGS"] = "--recipe kd"  # DISTILL_ARGS keep working, EXTRA_ARGS come after them
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **env)
    assert proc.returncode == 0, proc.stderr
    want = (["--recipe", "kd"] if "DISTILL_ARGS" in env else []) + shlex.split(extra)
    assert calls[0]["argv"][-len(want):] == want
    assert not list(ROOT.glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **REAL_SCALE, EXTRA_ARGS="--note 'open")
    assert proc.returncode != 0 and "unmatched" in proc.stderr and not calls


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_report_to_defaults_to_none(stub, tmp_path, script):
    for value, expected in ((None, "none"), ("wandb", "wandb"), ("tensorboard", "tensorboard")):
        env = {**REAL_SCALE, **({"REPORT_TO": value} if value else {})}
        proc, calls = run(SCRIPTS / script, tmp_path, stub, **env)
        assert proc.returncode == 0, proc.stderr
        assert flag(calls[0]["argv"], "--report_to") == expected and calls[0]["argv"].count("--report_to") == 1


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_real_scale_variables_without_model_are_an_error(stub, tmp_path, script):
    no_model = {k: v for k, v in REAL_SCALE.items() if k != "MODEL"}
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **no_model)
    assert proc.returncode == 2 and not calls  # before the tiny preset builds anything
    assert "TEACHER PRETRAIN_DIR VISION_TOWER DATA_PATH IMAGE_FOLDER set but MODEL is not" in proc.stderr
    proc, calls = run(SCRIPTS / script, tmp_path, stub, DATA_PATH="/data/mix.json", OUTPUT_DIR="out")
    assert proc.returncode == 2 and not calls
    assert "error: DATA_PATH set but MODEL is not" in proc.stderr and "OUTPUT_DIR" not in proc.stderr


def test_tiny_preset_runs_every_stage_with_extra_args_for_the_called_one_only(stub, tmp_path):
    """The variables the README's tiny runs use (OUTPUT_DIR, EPOCHS, DISTILL_ARGS, TINY_ROOT) select no real-scale
    run; the preset's earlier stages run without the called script's EXTRA_ARGS / DISTILL_ARGS."""
    env = {"TINY_ROOT": "tiny", "OUTPUT_DIR": "kd", "EPOCHS": "2", "DISTILL_ARGS": "--recipe kd",
           "EXTRA_ARGS": "--max_steps 3", "REPORT_TO": "tensorboard", "GRAD_CKPT": "1"}  # fmt: skip
    proc, calls = run(SCRIPTS / "distill_aligntI.sh", tmp_path, stub, **env)
    assert proc.returncode == 0, proc.stderr
    entries = [c["argv"] for c in calls if c["argv"][1] in ("llava.train.train", "aligntI_patch.distill")]
    pretrain, sft, aligntI, kd = entries
    assert flag(pretrain, "--output_dir") == f"{tmp_path}/tiny/student/qwen2-pretrain"
    assert flag(sft, "--output_dir") == f"{tmp_path}/tiny/student/qwen2-sft"
    assert flag(aligntI, "--output_dir") == f"{tmp_path}/kd" and aligntI[1] == "aligntI_patch.distill"
    # the vanilla-KD baseline of the table: --recipe kd, none of the called run's own flags
    assert flag(kd, "--output_dir") == f"{tmp_path}/tiny/student/qwen2-kd" and kd[-2:] == ["--recipe", "kd"]
    for argv in entries:  # the other variables reach every stage, as before; EPOCHS is the students' budget
        assert flag(argv, "--num_train_epochs") == ("1" if argv is pretrain else "2")
        assert flag(argv, "--report_to") == "tensorboard" and flag(argv, "--gradient_checkpointing") == "True"
    assert aligntI[-4:] == ["--recipe", "kd", "--max_steps", "3"]
    assert "--max_steps" not in pretrain + sft + kd and "--recipe" not in pretrain + sft
    report = calls[-1]["argv"]
    assert report[:2] == ["-m", "aligntI_patch.report"]
    assert [report[i + 1].split("=")[0] for i, a in enumerate(report) if a == "--model"] == [
        "teacher", "sft-student", "kd-student", "align-ti-student"]


def _finished(out: Path, epochs: int, weights: str = "model.safetensors") -> None:
    """A finished stage as the trainer leaves it: weights and trainer_state.json (its epochs)."""
    out.mkdir(parents=True)
    (out / weights).write_text("")
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 10, "num_train_epochs": epochs}, indent=2))


@pytest.mark.parametrize("script, weights", [("pretrain.sh", "mm_projector.safetensors"),
                                             ("finetune.sh", "model.safetensors.index.json"),
                                             ("distill_aligntI.sh", "model.safetensors")])  # fmt: skip
def test_a_finished_stage_of_other_epochs_is_an_error(stub, tmp_path, script, weights):
    _finished(tmp_path / "out", 1, weights)
    for epochs, extra in (("1", ""), ("", ""), ("0.5", ""), ("8", "--max_steps 40"), ("8", "--num_train_epochs=2")):
        proc, calls = run(SCRIPTS / script, tmp_path, stub, **REAL_SCALE, OUTPUT_DIR="out", EPOCHS=epochs,
                          EXTRA_ARGS=extra)
        assert proc.returncode == 0 and "is complete" in proc.stdout and not calls, (epochs, proc.stderr)
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **REAL_SCALE, OUTPUT_DIR="out", EPOCHS="8")
    assert proc.returncode == 2 and not calls
    assert (f"error: {tmp_path}/out holds a finished stage trained for 1 epoch(s), but EPOCHS=8: delete it to "
            "train again, or set EPOCHS=1 to reuse it") in proc.stderr


def test_tiny_preset_refuses_a_cached_student_of_another_budget(stub, tmp_path):
    """EPOCHS=8 on a cache of 1-epoch students stops before training anything (the table would mix budgets);
    the preset's 1-epoch pretrain stage is reused whatever EPOCHS says."""
    _finished(tmp_path / "tiny/student/qwen2-pretrain", 1)
    _finished(tmp_path / "tiny/student/qwen2-sft", 1)
    proc, calls = run(SCRIPTS / "distill_aligntI.sh", tmp_path, stub, TINY_ROOT="tiny", EPOCHS="8")
    assert proc.returncode == 2, proc.stderr
    assert f"{tmp_path}/tiny/student/qwen2-sft holds a finished stage trained for 1 epoch(s)" in proc.stderr
    assert not [c for c in calls if c["argv"][1] in ("llava.train.train", "aligntI_patch.distill")]
    proc, calls = run(SCRIPTS / "distill_aligntI.sh", tmp_path, stub, TINY_ROOT="tiny", EPOCHS="1")
    assert proc.returncode == 0, proc.stderr
    trained = [flag(c["argv"], "--output_dir") for c in calls if c["argv"][1] == "aligntI_patch.distill"]
    assert trained == [f"{tmp_path}/tiny/student/qwen2-aligntI", f"{tmp_path}/tiny/student/qwen2-kd"]


@pytest.mark.parametrize("script, default", [("pretrain.sh", True), ("finetune.sh", True),
                                             ("distill_aligntI.sh", True)])  # fmt: skip
def test_grad_ckpt_sets_gradient_checkpointing(stub, tmp_path, script, default):
    for value, expected in ((None, default), ("1", True), ("0", False)):
        env = {**REAL_SCALE, **({"GRAD_CKPT": value} if value else {})}
        proc, calls = run(SCRIPTS / script, tmp_path, stub, **env)
        assert proc.returncode == 0, proc.stderr
        argv = calls[0]["argv"]
        assert argv.count("--gradient_checkpointing") == expected
        if expected:
            assert flag(argv, "--gradient_checkpointing") == "True"
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **REAL_SCALE, GRAD_CKPT="yes")
    assert proc.returncode == 2 and "GRAD_CKPT must be 0 or 1, got 'yes'" in proc.stderr and not calls


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_multi_node_variables_reach_the_deepspeed_launcher(stub, tmp_path, script):
    (tmp_path / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **{**REAL_SCALE, "NUM_GPUS": "8"})
    assert proc.returncode == 0, proc.stderr
    assert calls[0]["argv"][:4] == ["--num_gpus", "8", "--module", ENTRY[script]]  # one node: as before
    env = {**REAL_SCALE, "NUM_GPUS": "8", "NUM_NODES": "2", "HOSTFILE": "hosts", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29600"}  # fmt: skip
    proc, calls = run(SCRIPTS / script, tmp_path, stub, **env)
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call["prog"] == "deepspeed" and call["argv"][:12] == [
        "--num_gpus", "8", "--num_nodes", "2", "--hostfile", f"{tmp_path}/hosts", "--master_addr", "10.0.0.1",
        "--master_port", "29600", "--module", ENTRY[script]]  # fmt: skip
    for bad, message in (({"NUM_NODES": "two"}, "NUM_NODES must be a positive integer, got 'two'"),
                         ({"HOSTFILE": "nope"}, f"HOSTFILE {tmp_path}/nope does not exist"),
                         ({"NUM_GPUS": "0"}, "NUM_NODES / HOSTFILE need the DeepSpeed launcher")):  # fmt: skip
        proc, calls = run(SCRIPTS / script, tmp_path, stub, **{**env, **bad})
        assert proc.returncode == 2 and message in proc.stderr and not calls


# ------------------------------------------------------------------------------------------ evaluation
def _eval_env(tmp_path: Path, script: str, gpus: str) -> dict[str, str]:
    if script == "tiny":
        world = tmp_path / "world"
        world.mkdir(exist_ok=True)
        (world / "test_questions.jsonl").write_text("{}\n")
        (tmp_path / "ckpt").mkdir(exist_ok=True)
        return {"CKPT": str(tmp_path / "ckpt"), "WORLD": str(world), "DEVICE": "cuda", "GPULIST": gpus}
    return {"MODEL_PATH": "/ckpt/my-model", "DATA_ROOT": str(tmp_path / "data"), "GPULIST": gpus}


@pytest.mark.parametrize("script", EVAL_SCRIPTS)
@pytest.mark.parametrize("conv_mode", [None, "qwen_3"])
def test_eval_scripts_use_the_checkpoints_template_unless_told(stub, tmp_path, script, conv_mode):
    env = _eval_env(tmp_path, script, "0,1")
    if conv_mode:
        env["CONV_MODE"] = conv_mode
    proc, calls = run(SCRIPTS / "eval" / f"{script}.sh", tmp_path, stub, **env)
    assert proc.returncode == 0, proc.stderr
    chunks = [c for c in calls if "--chunk-idx" in c["argv"]]
    assert sorted(c["cuda"] for c in chunks) == ["0", "1"]
    for call in chunks:
        assert ("--conv-mode" in call["argv"]) == bool(conv_mode)
        if conv_mode:
            assert flag(call["argv"], "--conv-mode") == conv_mode
    (score,) = [c for c in calls if "--chunk-idx" not in c["argv"]]
    assert score["argv"][1].startswith("llava.eval.eval_")
    merged = next(tmp_path.rglob("merge.jsonl")).read_text().splitlines()
    assert [json.loads(line)["chunk"] for line in merged] == ["0", "1"]


@pytest.mark.parametrize("script", ["gqa", "tiny"])
def test_a_failed_chunk_fails_the_script_after_the_others_finish(stub, tmp_path, script):
    env = {**_eval_env(tmp_path, script, "0,1,2"), "STUB_FAIL_CHUNK": "0", "STUB_SLEEP": "1"}
    proc, calls = run(SCRIPTS / "eval" / f"{script}.sh", tmp_path, stub, **env)
    assert proc.returncode != 0 and "chunk(s) 0 of 3 failed" in proc.stderr
    # The other chunks had finished (their answers were written a second later) when the script ended.
    assert sorted(p.name for p in tmp_path.rglob("3_*.jsonl")) == ["3_1.jsonl", "3_2.jsonl"]
    assert all("--chunk-idx" in c["argv"] for c in calls)  # no scorer
    assert not list(tmp_path.rglob("merge.jsonl"))
