"""Smoke tests of the benchmark scripts' entry points (their measurements are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tiny_learnability.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300)


MODES = {
    "text-first": ["--text-first", "1"], "caption-tied": ["--caption-steps", "1", "--tie"],
    "pretrain-align": ["--pretrain-steps", "1", "--align-steps", "1"],
}


@pytest.mark.parametrize("scene", ["visual", "text", "aligned", "text-first", "caption-tied", "pretrain-align"])
def test_learnability_bench_runs(mini_root, tokenizer, scene):
    mode = MODES.get(scene, ["--scene", scene])
    out = _run("--tokenizer", str(mini_root / "tokenizer"), "--families", "existence,attribute", *mode,
               "--steps", "2", "--eval-every", "1", "--val-size", "8", "--batch-size", "4", "--threads", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 3 and all("existence" in line for line in steps), out.stdout
    assert out.stdout.startswith("chance (majority answer):")


def test_learnability_bench_curricula(mini_root, tokenizer):
    out = _run("--tokenizer", str(mini_root / "tokenizer"), "--families", "existence,spatial",
               "--curriculum", "spatial:1;existence:1", "--max-objects", "1:2", "--steps", "3", "--eval-every", "3",
               "--val-size", "8", "--batch-size", "4", "--threads", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "spatial" in out.stdout.splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["--families", "existence,colour"], "unknown families ['colour']"),
    (["--curriculum", "spatial:10"], "not all in --families"),
    (["--max-objects", "5:10"], "must be 1-4"),
    (["--max-objects", "1-300"], "expected VALUE:STEPS"),
    (["--tokenizer", "MISSING"], "llava.tiny.preset prepare"),
])
def test_learnability_bench_names_bad_arguments(mini_root, tokenizer, tmp_path, monkeypatch, capsys, args, message):
    """The script's own parser, in-process (a subprocess per case only re-imports torch to fail on an argument)."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_tiny_learnability", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--tokenizer", str(mini_root / "tokenizer"), *args])
    with pytest.raises(SystemExit) as exit_:
        bench.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


STAGE0 = BENCH.with_name("bench_tiny_stage0.py")


def test_stage0_bench_runs_and_names_bad_turns(mini_root, tokenizer):
    base = [sys.executable, str(STAGE0), "--tokenizer", str(mini_root / "tokenizer"), "--threads", "1"]
    out = subprocess.run([*base, "--steps", "2", "--eval-every", "1", "--per-family", "2", "--batch-size", "4",
                          "--turns", "existence=3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2 and all("existence" in line and "describe" in line for line in steps), out.stdout
    out = subprocess.run([*base, "--turns", "colour=2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--turns item 'colour=2'" in out.stderr


STEP = BENCH.with_name("bench_step.py")


def test_step_bench_smoke_writes_ratios_to_kd(tmp_path):
    """bench_step.py at tiny shapes: every recipe measured, kd's ratios are 1 (timings themselves not asserted)."""
    out = tmp_path / "step.json"
    run = subprocess.run([sys.executable, str(STEP), "--smoke", "--json", str(out)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    recipes = report["recipes"]
    assert list(recipes) == ["sft", "kd", "kd_iva", "kd_tpa", "aligntI", "gkd"]
    for name, r in recipes.items():
        for key in ("ms", "time_ratio", "peak_mb", "memory_ratio", "flop_ratio", "total_mb", "student_tokens"):
            assert isinstance(r[key], float | int) and r[key] >= 0, (name, key, r[key])
        assert f"| {name} |" in run.stdout
    assert recipes["kd"]["time_ratio"] == recipes["kd"]["memory_ratio"] == recipes["kd"]["flop_ratio"] == 1.0
    # the passes each recipe runs: no teacher for SFT; TPA's candidate rows add a pass to both models; GKD
    # generates its replies with the student first
    assert recipes["sft"]["teacher_calls"] == 0 and recipes["kd"]["teacher_calls"] == 1
    assert recipes["aligntI"]["student_calls"] == recipes["aligntI"]["teacher_calls"] == 2
    assert recipes["aligntI"]["student_tokens"] > recipes["kd"]["student_tokens"]
    assert recipes["gkd"]["student_calls"] > 2
    assert report["config"]["visual"] == 16 and report["config"]["gkd_on_policy_prob"] == 1.0


def test_step_bench_refuses_real_sizes_without_cuda():
    run = subprocess.run([sys.executable, str(STEP), "--real"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--real needs --device cuda" in run.stderr


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    proc = subprocess.run(["bash", str(BENCH.parents[1] / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "no CUDA device visible" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_report_collects_every_part(tmp_path):
    """The JSON the GPU check writes, from the files its parts leave (a JUnit file, a bench JSON, a log)."""
    spec = importlib.util.spec_from_file_location("gpu_check_report", BENCH.with_name("gpu_check_report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    (tmp_path / "tests.rc").write_text("1\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_tpa" name="test_a"/><testcase classname="tests.test_tpa" name="test_b">'
        '<failure message="x"/></testcase><testcase classname="t" name="c"><skipped/></testcase>'
        "</testsuite></testsuites>")
    (tmp_path / "bench_step_sdpa.rc").write_text("0\n")
    (tmp_path / "bench_step_sdpa.json").write_text('{"recipes": {"kd": {"time_ratio": 1.0}}}')
    (tmp_path / "bench_tpa_flex.rc").write_text("124\n")
    (tmp_path / "bench_tpa_flex.log").write_text("line\n" * 30 + "last\n")
    parts = report.collect(tmp_path, "card")["parts"]
    assert parts["tests"] == {"exit_code": 1, "tests": 3, "failures": 1, "errors": 0, "skipped": 1,
                              "failed": ["tests.test_tpa::test_b"]}
    assert parts["bench_step_sdpa"] == {"exit_code": 0, "results": {"recipes": {"kd": {"time_ratio": 1.0}}}}
    assert parts["bench_tpa_flex"]["exit_code"] == 124 and parts["bench_tpa_flex"]["output_tail"][-1] == "last"


@pytest.mark.slow  # a fresh process per measurement: about 40 s
@pytest.mark.parametrize("loss", ["fkl", "ce"])
def test_chunked_losses_bench_runs(loss):
    """Every variant (plain, fused, fused_autograd, checkpoint) runs and prints its row."""
    script = BENCH.parent / "bench_chunked_losses.py"
    out = subprocess.run([sys.executable, str(script), "--n", "9", "--v", "40", "--hidden", "8", "--teacher-hidden",
                          "8", "--chunk-size", "4", "--loss", loss], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1].split()[0] for line in out.stdout.splitlines() if "|" in line][1:]
    assert rows == ["plain", "fused", "fused_autograd", "checkpoint"], out.stdout
