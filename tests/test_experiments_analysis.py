"""The experiment runner's analysis: statistics and the budget choice against hand-computed numbers, and Fig. 7
over seeds (aligntI_patch/experiments/exposure.py), on hand-made curves and on mini checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aligntI_patch.experiments.__main__ import main
from aligntI_patch.experiments.stats import (
    gap_recovered,
    mean_interval,
    paired_bootstrap,
    paired_difference,
    t_quantile_975,
)


# ------------------------------------------------------------------------------------------ statistics
def test_statistics_against_hand_computed_numbers():
    assert t_quantile_975(2) == 4.3027 and t_quantile_975(30) == 2.0423
    for df, t in ((40, 2.0211), (60, 2.0003), (120, 1.9799)):  # beyond the table: Cornish-Fisher
        assert t_quantile_975(df) == pytest.approx(t, abs=1e-3)
    e = mean_interval([30.0, 33.0, 36.0])  # sd 3, se sqrt(3): half = 4.3027 * 3 / sqrt(3)
    assert e.mean == 33.0 and e.half == pytest.approx(7.4525, abs=1e-4) and e.format() == "33.0 ± 7.5"
    one = mean_interval([42.0])
    assert one.half is None and one.format() == "42.0 (n=1)" and one.sign() == "n=1"
    d = paired_difference({0: 60.0, 1: 70.0, 2: 65.0, 3: 1.0}, {0: 50.0, 1: 52.0, 2: 60.0})  # seed 3 unpaired
    # differences 10, 18, 5: mean 11, sd sqrt(43), half 4.3027 * sqrt(43 / 3)
    assert d.n == 3 and d.mean == 11.0 and d.half == pytest.approx(16.290, abs=1e-3) and d.sign() == "?"
    assert mean_interval([3.0, 4.0, 5.0]).sign() == "+" and paired_difference({0: 1.0}, {1: 1.0}) is None
    assert gap_recovered(54.0, 45.0, 80.0) == pytest.approx(9 / 35)
    assert gap_recovered(49.0, 47.0, 50.0) is None  # the teacher leads by 3 < 10 points: no signal
    assert gap_recovered(50.0, 40.0, 50.0) == 1.0  # a lead of exactly 10 counts
    # paired bootstrap over seeds x questions: a constant difference has a zero-width interval; unshared seeds
    # and questions are dropped; a difference on half the questions of one seed stays inside [0, 100]
    a = {0: {"q1": 1.0, "q2": 1.0, "q3": 0.5}, 1: {"q1": 1.0, "q2": 0.0, "q3": 1.0}, 2: {"q1": 1.0}}
    b = {0: {"q1": 0.0, "q2": 0.0, "q3": -0.5, "q9": 1.0}, 1: {"q1": 0.0, "q2": -1.0, "q3": 0.0}}
    boot = paired_bootstrap(a, b, n_boot=200)
    assert (boot.mean, boot.low, boot.high, boot.n_seeds, boot.n_questions) == (100.0, 100.0, 100.0, 2, 3)
    assert boot.sign() == "+" and boot.format() == "100.0 [100.0, 100.0]"
    half = paired_bootstrap({0: {"q1": 1.0, "q2": 0.0}}, {0: {"q1": 0.0, "q2": 0.0}}, n_boot=500)
    assert half.mean == 50.0 and half.low == 0.0 and half.high == 100.0 and half.sign() == "?"
    assert paired_bootstrap({0: {"q1": 1.0}}, {1: {"q1": 1.0}}) is None



def test_budget_choice_and_where_the_gain_comes_from():
    """Hand-computed: means over recipes at the budgets all three finished (ep1-4; aligntI's ep6 alone does
    not count) 30.67, 36.67, 40.07, 40.67: the highest is ep4, ep3 lies within 1 point of it."""
    from aligntI_patch.experiments.report import choose_budget, gain_source

    sft = {1: 30.0, 2: 35.0, 3: 38.0, 4: 38.5}
    kd = {1: 31.0, 2: 36.0, 3: 38.2, 4: 39.0}
    aligntI = {1: 31.0, 2: 39.0, 3: 44.0, 4: 44.5, 6: 45.0}
    assert choose_budget({"sft": sft, "kd": kd, "aligntI": aligntI}) == (3, 4)
    assert choose_budget({"sft": sft, "kd": kd, "aligntI": aligntI}, tolerance=0.5) == (4, 4)
    assert choose_budget({"sft": {1: 30.0}, "kd": {2: 31.0}}) is None  # no budget both finished
    assert choose_budget({"sft": sft, "kd": {}}) is None  # a recipe with no finished cell yet
    assert gain_source(aligntI, sft) == ("peak 44.5 at ep4 against SFT's 38.5 at ep4 (+6.0); reaches it at ep2: "
                                         "**both sooner and higher**")
    assert gain_source(kd, sft).endswith("(+0.5); reaches it at ep4: **neither sooner nor higher**")
    assert gain_source({1: 38.5, 2: 38.6, 3: 38.0, 4: 38.0}, sft).endswith("reaches it at ep1: **sooner**")
    assert gain_source({1: 31.0, 2: 33.0, 3: 36.0, 4: 39.5}, sft).endswith("reaches it at ep4: **higher**")
    assert gain_source({1: 20.0, 2: 20.0}, sft).endswith("never reaches it: **neither sooner nor higher**")


# ------------------------------------------------------------------------------------------ Fig. 7 over seeds
def _exposure_result(curves: dict[str, list[float]], max_len: int = 3) -> dict:
    return {"max_len": max_len, "students": {n: {"ExAccErr": c} for n, c in curves.items()}}


def test_exposure_summary_against_hand_computed_numbers(tmp_path):
    from aligntI_patch.experiments.exposure import family_questions, mean_curves, summary

    results = {0: _exposure_result({"kd": [0.0, 10.0, 40.0], "kd_tpa": [0.0, 5.0, 20.0]}),
               1: _exposure_result({"kd": [0.0, 20.0, 50.0], "kd_tpa": [0.0, 5.0, 26.0]}),
               2: _exposure_result({"kd": [0.0, 30.0, 60.0], "kd_tpa": [0.0, 5.0, 32.0]})}
    curves = mean_curves(results)
    assert list(curves) == ["kd", "kd_tpa"] and [e.mean for e in curves["kd"]] == [0.0, 20.0, 50.0]
    assert curves["kd"][1].half == pytest.approx(4.3027 * 10 / 3 ** 0.5, abs=1e-3)  # sd 10 over 3 seeds
    text = summary(results, max_len=3)
    assert "| kd | 3 | 50.0 ± 24.8 |" in text and "| kd_tpa | 3 | 26.0 ± 14.9 |" in text
    # paired differences -20, -24, -28: mean -24, sd 4 -> half 4.3027 * 4 / sqrt(3) = 9.94
    assert "| kd_tpa − kd | TPA added to vanilla KD | 3 | -24.0 ± 9.9 | - |" in text
    assert "aligntI −" not in text  # claims whose students are absent are left out
    world = tmp_path / "world"
    world.mkdir()
    (world / "test_questions.jsonl").write_text(json.dumps({"text": "q", "family": "counting"}) + "\n")
    with pytest.raises(ValueError, match="no 'describe' questions .*'counting'"):
        family_questions(world, "test", "describe", tmp_path / "q.jsonl")


def test_exposure_over_seeds_on_mini_checkpoints(tmp_path, mini_world, mini_checkpoint, mini_teacher, capsys):
    """Cells faked by copies of one mini checkpoint (two recipes, two seeds): the real exposure analysis runs per
    seed, identical students give a paired difference of exactly 0, a missing seed is skipped and reused
    results are not recomputed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "setup.json").write_text(json.dumps({"teacher": str(mini_teacher), "world": str(mini_world)}))
    for recipe in ("kd", "aligntI"):
        for seed in (0, 1):
            shutil.copytree(mini_checkpoint, out / "cells" / f"{recipe}-ep1-seed{seed}" / "student")
    shutil.copytree(mini_checkpoint, out / "cells" / "kd-ep1-seed2" / "student")  # seed 2 lacks aligntI
    argv = ["exposure", "--out", str(out), "--epochs", "1", "--seeds", "3", "--recipes", "kd,aligntI",
            "--num-prompts", "4", "--max-len", "5", "--batch-size", "4"]
    main(argv)
    text = capsys.readouterr().out
    assert "| aligntI − kd | Align-TI against vanilla KD | 2 | 0.0 ± 0.0 | ? |" in text
    runs = sorted(p.name for p in (out / "exposure").glob("describe-L5-N4-ep1-seed*"))
    assert runs == ["describe-L5-N4-ep1-seed0", "describe-L5-N4-ep1-seed1"]
    seed0 = json.loads((out / "exposure" / runs[0] / "exposure_bias.json").read_text())
    lines = (Path(mini_world) / "test_questions.jsonl").read_text().splitlines()
    n_describe = sum(json.loads(line)["family"] == "describe" for line in lines)
    assert seed0["num_prompts"] == min(4, n_describe) > 0 and len(seed0["students"]["kd"]["ExAccErr"]) == 5
    last = seed0["students"]["kd"]["ExAccErr"][-1]
    assert f"| kd | 2 | {last:.1f} ± 0.0 |" in text
    assert (out / "exposure" / "fig7-describe-L5-N4-ep1.png").stat().st_size > 1000
    stamp = (out / "exposure" / runs[0] / "exposure_bias.json").stat().st_mtime_ns
    main(argv)  # reused, not recomputed
    assert (out / "exposure" / runs[0] / "exposure_bias.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------ Fig. 4 over seeds
def test_irs_summary_against_hand_computed_numbers():
    from aligntI_patch.experiments.irs_seeds import markdown, summarize

    def result(iid, same):
        return {"pairing": "iid", "irs": iid, "curves": {"iid": {"irs": iid}, "same_image": {"irs": same}}}

    results = {0: result([0.1, 0.30, 0.26], [0.01, 0.07, 0.09]),
               1: result([0.1, 0.28, 0.26], [0.01, 0.08, 0.07]),
               2: result([0.1, 0.26, 0.25], [0.01, 0.06, 0.08])}
    s = summarize(results)
    iid, same = s["iid"], s["same_image"]
    assert [round(e.mean, 4) for e in iid["mean"]] == [0.1, 0.28, 0.2567]
    assert iid["mean"][1].half == pytest.approx(4.3027 * 0.02 / 3 ** 0.5, abs=1e-6)  # sd 0.02 over 3 seeds
    assert iid["peaks"] == {0: 1, 1: 1, 2: 1} and (iid["top"], iid["runner_up"]) == (1, 2)
    # layer 1 − layer 2 per seed: 0.04, 0.02, 0.01 -> mean 0.0233, sd 0.01528, half 4.3027 * 0.01528 / sqrt(3)
    assert iid["gap"].mean == pytest.approx(0.07 / 3) and iid["gap"].half == pytest.approx(0.03795, abs=1e-4)
    assert same["peaks"] == {0: 2, 1: 1, 2: 2} and (same["top"], same["runner_up"]) == (2, 1)
    text = markdown(s, [0, 1, 2])
    assert "| pairing | layer 0 (0.00) | layer 1 (0.50) | layer 2 (1.00) |" in text
    assert "| iid | 0.100 ± 0.000 | 0.280 ± 0.050 | 0.257 ± 0.014 | 1, 1, 1 | layer 1 − 2: 0.023 ± 0.038 (?) |" in text


def test_irs_over_seeds_on_the_mini_teacher(tmp_path, mini_world, mini_teacher):
    """Two pairing seeds of the real IRS pass: each seed's curves are those of `python -m aligntI_patch.irs` with
    that seed (same data, same pairs), the summary and figure are written, and results are reused."""
    from aligntI_patch import irs

    out = tmp_path / "out"
    out.mkdir()
    (out / "setup.json").write_text(json.dumps({"teacher": str(mini_teacher), "world": str(mini_world)}))
    argv = ["irs", "--out", str(out), "--seeds", "2", "--num-pairs", "4", "--batch-size", "4"]
    main(argv)
    cli = tmp_path / "cli"
    irs.main(["--model-path", str(mini_teacher), "--data-path", str(Path(mini_world) / "finetune.json"),
              "--image-folder", str(Path(mini_world) / "images"), "--num-pairs", "4", "--batch-size", "4",
              "--seed", "1", "--output-dir", str(cli)])
    seed1 = json.loads((out / "irs" / "seed1" / "irs.json").read_text())
    assert seed1["curves"] == json.loads((cli / "irs.json").read_text())["curves"]
    assert set(seed1["curves"]) == {"iid", "same_image"} and len(seed1["irs"]) == 3  # the mini teacher's layers
    text = (out / "irs" / "summary.md").read_text()
    assert "| iid |" in text and "| same_image |" in text and (out / "irs" / "fig4.png").stat().st_size > 1000
    stamp = (out / "irs" / "seed0" / "irs.json").stat().st_mtime_ns
    main(argv)  # reused, not recomputed
    assert (out / "irs" / "seed0" / "irs.json").stat().st_mtime_ns == stamp
