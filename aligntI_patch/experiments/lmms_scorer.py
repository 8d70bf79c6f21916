"""Scoring checkpoints with lmms-eval tasks instead of the tiny world's questions (the paper's benchmarks).

    python -m aligntI_patch.experiments run ... --tasks gqa,pope,mme:mme_perception_score*0.05 --val-tasks ...

Design choices
- A task item is `TASK[:METRIC[:FILTER]][*SCALE]`. Its column in the report is the item without SCALE; its
  value is lmms-eval's aggregate `METRIC,FILTER` (default: the task's first metric; filter `none`) times
  SCALE, 100 by default (most tasks report a fraction; the report reads percentages). Tasks on another scale
  say so: MME's perception score (0-2000) with `*0.05`, MMBench's `gpt_eval_score` (already in %) with `*1`.
- `overall` is the mean of the task columns (the paper's "Avg." over benchmarks), its `n` their summed samples.
- Per-question scores (the report's paired bootstrap) come from `--log_samples`: each sample's METRIC value
  times SCALE / 100, keyed `column/doc_id`, where it is a number; tasks whose samples hold structured values
  (MME, MMBench's judge) or several filters give none, and the claims keep their t intervals over seeds. The
  bootstrap pools questions (each weighs the same), while `overall` weighs tasks the same.
- One lmms-eval process per checkpoint and split (`python -m lmms_eval --model llava_aligntI`, the plugin of
  llava/eval/lmms_eval_plugin.py), or `accelerate launch --num_processes N` on N > 1 GPUs; it runs in the
  runner's working directory (task YAMLs may read paths relative to it). lmms-eval exits 0 even when a task
  fails, so a missing results file is the error, with the tail of its log.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SPEC = re.compile(r"^(?P<task>[^:*,\s]+)(?::(?P<metric>[^:*,\s]+)(?::(?P<filter>[^:*,\s]+))?)?"
                  r"(?:\*(?P<scale>[^:*,\s]+))?$")


@dataclass(frozen=True)
class TaskSpec:
    """One item of --tasks / --val-tasks: the task, the metric read from lmms-eval's results, its scale to %."""

    task: str
    metric: str | None = None  # None: the task's first metric
    filter: str = "none"
    scale: float = 100.0

    @property
    def column(self) -> str:
        """The report's column: TASK, with its metric and filter when given (one task may give several)."""
        return ":".join(p for p in (self.task, self.metric, None if self.filter == "none" else self.filter) if p)

    @classmethod
    def parse(cls, text: str) -> TaskSpec:
        match = SPEC.match(text.strip())
        try:
            scale = float(match["scale"] or 100) if match else math.nan
        except ValueError:
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"bad task {text!r}: expected TASK[:METRIC[:FILTER]][*SCALE], e.g. gqa, "
                             "pope:pope_accuracy or mme:mme_perception_score*0.05")
        return cls(match["task"], match["metric"], match["filter"] or "none", scale)


def parse_tasks(text: str) -> tuple[str, ...]:
    """The comma-separated items of --tasks / --val-tasks, each checked (ValueError names a bad one)."""
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    for item in items:
        TaskSpec.parse(item)
    return items


def metric_key(results: dict, spec: TaskSpec) -> str:
    """The `METRIC,FILTER` key of `spec` in lmms-eval's results of its task."""
    keys = [k for k in results if "," in k and not k.split(",")[0].endswith("_stderr")]
    if spec.metric is None:
        if not keys:
            raise ValueError(f"lmms-eval reported no metric for task {spec.task}: {sorted(results)}")
        return keys[0]
    key = f"{spec.metric},{spec.filter}"
    if key not in results:
        raise ValueError(f"task {spec.task} has no metric {key!r} in lmms-eval's results; it has {keys}")
    return key


def read_results(output_path: Path, specs: list[TaskSpec]) -> tuple[dict[str, dict], dict[str, float]]:
    """(summary {task: {"accuracy", "n"}, "overall": ...} as `evaluate_tiny` gives it, accuracy a fraction of
    100 %; per-question scores {"column/doc_id": score}) of an lmms-eval `--output_path` with `--log_samples`."""
    found = sorted(output_path.rglob("*_results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *_results.json under {output_path}")
    report = json.loads(found[-1].read_text())
    summary, per_question = {}, {}
    for spec in specs:
        results = report["results"].get(spec.task)
        if results is None:
            raise ValueError(f"lmms-eval's results in {found[-1]} have no task {spec.task!r}: "
                             f"{sorted(report['results'])}")
        key = metric_key(results, spec)
        scores = sample_scores(found[-1].parent, spec, key.split(",")[0])
        n = len(scores) or int(report.get("n-samples", {}).get(spec.task, {}).get("effective", 0))
        summary[spec.column] = {"accuracy": float(results[key]) * spec.scale / 100, "n": n}
        per_question |= scores
    summary["overall"] = {"accuracy": sum(v["accuracy"] for v in summary.values()) / len(specs),
                          "n": sum(v["n"] for v in summary.values())}
    return summary, per_question


def sample_scores(folder: Path, spec: TaskSpec, metric: str) -> dict[str, float]:
    """{"column/doc_id": METRIC * SCALE / 100} from `*_samples_<task>.jsonl` (samples without METRIC do not
    count for it, as in lmms-eval's aggregate); {} when one holds a non-number or a doc comes twice."""
    scores: dict[str, float] = {}
    for path in folder.glob(f"*_samples_{spec.task}.jsonl"):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            sample = json.loads(line)
            value, key = sample.get(metric), f"{spec.column}/{sample.get('doc_id')}"
            if value is None:
                continue
            if not isinstance(value, (int, float)) or key in scores:  # bool counts: 1 / 0
                return {}
            scores[key] = float(value) * spec.scale / 100
    return scores


def lmms_command(checkpoint: Path, specs: list[TaskSpec], output_path: Path, num_gpus: int, batch_size: int,
                 include_path: Path | None, extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m lmms_eval` on the plugin's model, or under `accelerate launch` on several GPUs."""
    launcher = [sys.executable, "-m"]
    if num_gpus > 1:
        launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(num_gpus),
                    "-m"]
    cmd = [*launcher, "lmms_eval", "--model", "llava_aligntI", "--model_args", f"pretrained={checkpoint}",
           "--tasks", ",".join(dict.fromkeys(s.task for s in specs)), "--batch_size", str(batch_size),
           "--output_path", str(output_path), "--log_samples"]
    if include_path is not None:
        cmd += ["--include_path", str(include_path)]
    return cmd + list(extra)


def score_with_lmms_eval(checkpoint: Path, tasks: tuple[str, ...], output_path: Path, num_gpus: int,
                         batch_size: int, include_path: Path | None,
                         extra: tuple[str, ...] = ()) -> tuple[dict[str, dict], dict[str, float]]:
    """Run lmms-eval on `checkpoint` for `tasks` into `output_path` (its log: output_path/lmms_eval.log) and
    read the results (`read_results`)."""
    specs = [TaskSpec.parse(t) for t in dict.fromkeys(tasks)]
    output_path.mkdir(parents=True, exist_ok=True)
    for old in output_path.rglob("*_results.json"):  # an interrupted earlier scoring must not be read
        old.unlink()
    cmd = lmms_command(checkpoint, specs, output_path, num_gpus, batch_size, include_path, extra)
    log = output_path / "lmms_eval.log"
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    try:
        return read_results(output_path, specs)
    except (FileNotFoundError, ValueError) as e:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"lmms-eval on {checkpoint} (exit {rc}) gave no usable results: {e}\n"
                           f"the end of {log}:\n{tail}") from None
