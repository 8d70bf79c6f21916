"""The lmms-eval plugin (`llava_aligntI`) and the local `tiny_world` tasks, offline on CPU.

Fast tests call the model class in-process; the slow one runs `python -m lmms_eval` end to end on the mini
checkpoint and checks that its answers are exactly those of `generate_answers`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.conversation import get_conv_template, tokenize_conversation
from llava.eval.lmms_tasks.tiny_world.prepare import task_rows, write_task_jsonl
from llava.tiny.score import summarize

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "llava" / "eval" / "lmms_tasks"
TASK_JSONL = Path("playground/tiny/data/lmms_eval/test.jsonl")  # what the task YAMLs read (relative to cwd)

if os.environ.get("CI", "").lower() not in ("", "0", "false"):
    import lmms_eval  # noqa: F401  (in CI a missing lmms-eval is a failure, not a skip)
else:
    pytest.importorskip(
        "lmms_eval", reason="lmms-eval is not installed (bash scripts/bootstrap.sh dev,demo,eval)"
    )


def _utils():
    """The task's utils module, loaded by path as lmms-eval does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_world_utils", TASKS / "tiny_world" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_point_registers_the_model():
    points = importlib.metadata.entry_points(group="lmms_eval.models")
    assert "llava_aligntI" in {p.name for p in points}
    from lmms_eval.models import get_model

    from llava.eval.lmms_eval_plugin import LlavaAlignTI

    assert get_model("llava_aligntI") is LlavaAlignTI


@pytest.mark.parametrize("first", ["plugin", "lmms_eval.models"])
def test_registration_does_not_depend_on_the_import_order(first):
    """A fresh interpreter importing the plugin before or after lmms_eval.models finds the model."""
    imports = ["import llava.eval.lmms_eval_plugin", "import lmms_eval.models"]
    code = "\n".join([
        *(imports if first == "plugin" else imports[::-1]),
        "from lmms_eval.models import get_model",
        "from llava.eval.lmms_eval_plugin import MANIFEST, LlavaAlignTI",
        "assert get_model('llava_aligntI') is LlavaAlignTI, get_model('llava_aligntI')",
        "assert MANIFEST.model_id == 'llava_aligntI'",
    ])  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_task_rows_and_scoring_functions(mini_world):
    rows = task_rows(mini_world)
    records = json.loads((Path(mini_world) / "test.json").read_text())
    assert len(rows) == len(records) and all(Path(r["image_path"]).is_file() for r in rows)
    assert all(DEFAULT_IMAGE_TOKEN not in r["question"] for r in rows)
    utils = _utils()
    for row in rows:
        assert utils.doc_to_visual(row)[0].mode == "RGB"
        score = utils.process_results(row, [row["answer"]])
        assert score == {"overall": 1.0, row["family"]: 1.0}  # the reference answer scores 1
        if row["family"] in ("existence", "choice"):
            assert utils.doc_to_choice(row)[utils.doc_to_target_index(row)] == row["answer"]
            assert (row["options"] is not None) == (row["family"] == "choice")


@pytest.fixture(scope="module")
def lmm(mini_checkpoint):
    from llava.eval.lmms_eval_plugin import LlavaAlignTI

    return LlavaAlignTI(pretrained=str(mini_checkpoint), device="cpu", batch_size=3)


def _instance(request_type: str, args: tuple, doc_id: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type, args, 0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def _choice_requests(lmm, rows: list[dict], continuations: tuple[str, ...]) -> list:
    """One loglikelihood request per (row, continuation), the row's image as lmms-eval passes it."""
    lmm.task_dict = {"t": {"test": rows}}
    visual = _utils().doc_to_visual
    return [
        _instance("loglikelihood", (r["question"], cont, visual, i, "t", "test"), i)
        for i, r in enumerate(rows)
        for cont in continuations
    ]


def test_loglikelihood_equals_the_unbatched_loss(lmm, mini_world):
    rows = task_rows(mini_world)[:4]
    utils = _utils()
    requests = _choice_requests(lmm, rows, ("yes", "no, it is the red circle"))
    requests += [_instance("loglikelihood", ("", "yes"))]  # the unconditional (text-only) form
    pairs = lmm.loglikelihood(requests)
    model, tokenizer = lmm.model, lmm.tokenizer
    for request, (nll, greedy) in zip(requests, pairs):
        context, continuation = request.args[:2]
        image = utils.doc_to_visual(rows[request.args[3]])[0] if len(request.args) == 6 else None
        conv = get_conv_template(lmm.conv_template)
        conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{context}" if image else context)
        conv.append_message(conv.roles[1], None)
        prompt = tokenize_conversation(conv, tokenizer)[0]
        target = torch.tensor(tokenizer(continuation, add_special_tokens=False).input_ids)
        input_ids = torch.cat([prompt, target])[None]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[0, len(prompt) :] = target
        pixels = lmm._image_processor(images=[image], return_tensors="pt")["pixel_values"] if image else None
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=labels, images=pixels)
        assert nll == pytest.approx(out.loss.item(), rel=1e-4, abs=1e-5)
        shifted = out.logits[0, -len(target) - 1 : -1].argmax(-1)
        assert greedy == bool((shifted == target).all())


def test_response_cache_stores_and_returns_loglikelihood_pairs(lmm, mini_world, tmp_path):
    """`--use_cache`: a miss stores the pairs, a hit returns them, and the evaluator keeps both as pairs."""
    import lmms_eval.evaluator as evaluator
    from lmms_eval.caching.response_cache import ResponseCache

    rows = task_rows(mini_world)[:3]
    requests = _choice_requests(lmm, rows, ("yes", "no"))
    for i, request in enumerate(requests):
        request.idx = i  # one cache key per choice, as lmms-eval numbers a document's choices
    expected = lmm.loglikelihood(requests)
    calls = []

    class Counting:
        def loglikelihood(self, reqs):
            calls.append(len(reqs))
            return lmm.loglikelihood(reqs)

    for run in ("miss", "hit"):
        cache = ResponseCache.create(
            str(tmp_path / "cache"), model="llava_aligntI", model_args="pretrained=mini"
        )
        responses = cache.execute(Counting(), "loglikelihood", requests)
        cache.finalize(success=True)
        unwrapped = [evaluator.unwrap_generation_output(r)[0] for r in responses]
        assert [tuple(u) for u in unwrapped] == expected, run
        assert all(isinstance(nll, float) and isinstance(greedy, bool) for nll, greedy in unwrapped), run
    assert calls == [len(requests)]  # the second run came from the cache


def test_model_args_batch_size_dtype_and_cli_collisions(lmm, mini_checkpoint, caplog):
    from llava.eval.lmms_eval_plugin import LlavaAlignTI, parse_batch_size, parse_dtype

    assert parse_batch_size("4") == 4 and parse_batch_size(2) == 2 and parse_batch_size(None) == 1
    for auto in ("auto", "auto:4"):
        with caplog.at_level("WARNING"):
            assert parse_batch_size(auto) == 1
        assert "automatic batch size" in caplog.text
    for bad in ("four", "0"):
        with pytest.raises(ValueError, match="batch_size"):
            parse_batch_size(bad)
    assert parse_dtype("auto", "cpu") == parse_dtype(None, "cpu") == torch.float32
    assert parse_dtype("auto", "cuda:1") == torch.bfloat16
    for names, dtype in ((("bf16", "bfloat16"), torch.bfloat16), (("fp16", "float16"), torch.float16),
                         (("fp32", "float32"), torch.float32)):  # fmt: skip
        assert all(parse_dtype(name, "cpu") == dtype for name in names)
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("half", "cpu")
    # lmms-eval's CLI always passes its --batch_size (default 1): model_args' value wins, no TypeError.
    built = LlavaAlignTI.create_from_arg_string(
        f"pretrained={mini_checkpoint},device=cpu,batch_size=2,dtype=fp32",
        {"batch_size": 1, "max_batch_size": None, "device": "cpu"},
    )
    assert built.batch_size == 2 and built.model.dtype == torch.float32


def test_device_follows_the_accelerator(lmm, monkeypatch):
    """Under `accelerate launch` each process takes the accelerator's device (CPU with --cpu), or device=."""
    import accelerate

    import llava.model.builder
    from llava.eval.lmms_eval_plugin import LlavaAlignTI

    class FakeAccelerator:
        num_processes, process_index, local_process_index = 2, 1, 1

        def __init__(self, device: str) -> None:
            self.device = torch.device(device)

    loaded = []

    def fake_load(path, base, device, torch_dtype, attn_implementation):
        loaded.append((device, torch_dtype))
        return lmm.tokenizer, lmm.model, lmm._image_processor, lmm.max_length

    monkeypatch.setattr(llava.model.builder, "load_pretrained_model", fake_load)
    for accelerator_device, device, expected in (
        ("cpu", None, ("cpu", torch.float32)),  # accelerate launch --cpu: no CUDA forced
        ("cuda:1", None, ("cuda:1", torch.bfloat16)),
        ("cuda:1", "cuda", ("cuda:1", torch.bfloat16)),  # one GPU per process
        ("cuda:1", "cpu", ("cpu", torch.float32)),  # device= is respected
    ):
        monkeypatch.setattr(accelerate, "Accelerator", lambda d=accelerator_device: FakeAccelerator(d))
        built = LlavaAlignTI(pretrained="unused", device=device)
        assert loaded[-1] == expected
        assert (built.rank, built.world_size) == (1, 2)


def test_generate_until_equals_generate_answers_and_cuts_at_stops(lmm, mini_world):
    from llava.generation import generate_answers

    rows = task_rows(mini_world)[:5]
    lmm.task_dict = {"t": {"test": rows}}
    utils = _utils()
    kwargs = {"max_new_tokens": 10, "temperature": 0, "do_sample": False}
    requests = [
        _instance("generate_until", (r["question"], dict(kwargs), utils.doc_to_visual, i, "t", "test"), i)
        for i, r in enumerate(rows)
    ]
    questions = [{"text": r["question"], "image": utils.doc_to_visual(r)[0]} for r in rows]
    expected = generate_answers(lmm.model, lmm.tokenizer, lmm._image_processor, questions, max_new_tokens=10,
                                batch_size=2, progress=False)  # fmt: skip
    assert lmm.generate_until(requests) == expected  # another batch size, same greedy answers
    stop = next((a[2:4] for a in expected if len(a) > 4), "zzz")
    cut = [
        _instance("generate_until", (*r.args[:1], {**kwargs, "until": [stop]}, *r.args[2:])) for r in requests
    ]
    assert lmm.generate_until(cut) == [a.split(stop, 1)[0] for a in expected]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_lmms_eval_cli_end_to_end_offline(mini_checkpoint, mini_world, tmp_path, capsys):
    """`python -m lmms_eval --model llava_aligntI ... --tasks tiny_world,tiny_world_mc` from a fresh folder."""
    from llava.generation import generate_answers
    from llava.model.builder import load_pretrained_model

    write_task_jsonl(mini_world, tmp_path / TASK_JSONL)
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "llava_aligntI",
        "--model_args", f"pretrained={mini_checkpoint},device=cpu", "--tasks", "tiny_world,tiny_world_mc",
        "--include_path", str(TASKS), "--batch_size", "8", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    results_files = sorted(out.rglob("*_results.json"))
    # lmms-eval exits 0 even when evaluation fails: the results file is the proof of success.
    assert proc.returncode == 0 and results_files, log
    results = json.loads(results_files[-1].read_text())["results"]
    samples = [json.loads(line) for f in out.rglob("*_samples_tiny_world.jsonl") for line in f.open()]

    rows = task_rows(mini_world)
    tokenizer, model, image_processor, _ = load_pretrained_model(str(mini_checkpoint), device="cpu")
    questions = [{"text": r["question"], "image": Image.open(r["image_path"]).convert("RGB")} for r in rows]
    answers = generate_answers(
        model, tokenizer, image_processor, questions, max_new_tokens=128, progress=False
    )
    replies = {s["doc_id"]: s["filtered_resps"] for s in samples}  # doc_id: row index in the jsonl
    assert replies == dict(enumerate(answers))  # lmms-eval's answers are exactly generate_answers' ones

    summary = summarize([{**r, "prediction": a} for r, a in zip(rows, answers)])
    for family, stats in summary.items():
        assert results["tiny_world"][f"{family},none"] == pytest.approx(stats["accuracy"]), family
    n_closed = sum(r["family"] in ("existence", "choice") for r in rows)
    assert json.loads(results_files[-1].read_text())["n-samples"]["tiny_world_mc"]["effective"] == n_closed
    assert 0.0 <= results["tiny_world_mc"]["acc,none"] <= 1.0
    scores = {family: round(results["tiny_world"][f"{family},none"], 4) for family in summary}
    with capsys.disabled():  # shown in the normal pytest output too
        print(f"\nlmms-eval, mini checkpoint: tiny_world {scores}; "  # noqa: T201
              f"tiny_world_mc acc {results['tiny_world_mc']['acc,none']:.4f}")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lmms_eval_cli_use_cache_multiple_choice(mini_checkpoint, mini_world, tmp_path):
    """`--use_cache` on a multiple_choice task: the first run fills the cache, the second is served from it,
    and both score the same."""
    write_task_jsonl(mini_world, tmp_path / TASK_JSONL)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    scores = []
    for run in ("first", "second"):
        out = tmp_path / f"results_{run}"
        cmd = [
            sys.executable, "-m", "lmms_eval", "--model", "llava_aligntI",
            "--model_args", f"pretrained={mini_checkpoint},device=cpu", "--tasks", "tiny_world_mc",
            "--include_path", str(TASKS), "--batch_size", "4", "--limit", "4",
            "--use_cache", str(tmp_path / "cache"), "--output_path", str(out),
        ]  # fmt: skip
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
        log = proc.stdout + proc.stderr
        results_files = sorted(out.rglob("*_results.json"))
        assert proc.returncode == 0 and results_files, log[-6000:]
        scores.append(json.loads(results_files[-1].read_text())["results"]["tiny_world_mc"]["acc,none"])
    assert "cache hits" in log and "skipping model inference" in log, log[-6000:]
    assert scores[0] == scores[1]
