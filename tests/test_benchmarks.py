"""Smoke tests of the benchmark scripts' entry points (their measurements are not asserted)."""

from __future__ import annotations

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


def test_learnability_bench_names_bad_arguments(mini_root, tokenizer, tmp_path):
    out = _run("--tokenizer", str(mini_root / "tokenizer"), "--families", "existence,colour")
    assert out.returncode == 2 and "unknown families ['colour']" in out.stderr
    out = _run("--tokenizer", str(mini_root / "tokenizer"), "--curriculum", "spatial:10")
    assert out.returncode == 2 and "not all in --families" in out.stderr
    out = _run("--tokenizer", str(mini_root / "tokenizer"), "--max-objects", "5:10")
    assert out.returncode == 2 and "must be 1-4" in out.stderr
    out = _run("--tokenizer", str(mini_root / "tokenizer"), "--max-objects", "1-300")
    assert out.returncode == 2 and "expected VALUE:STEPS" in out.stderr
    out = _run("--tokenizer", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no tokenizer at" in out.stderr and "llava.tiny.preset prepare" in out.stderr


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
