"""The dataset doctor (`python -m llava.data.check`) and the training pre-flight: each kind of bad sample is
counted and named exactly as the training dataset skips it; the pre-flight stops a run above
--max_bad_fraction and lets it run at or below; the skipped count is in every training log."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, SiglipVisionConfig

from llava.constants import IMAGE_TOKEN_INDEX, TokenType
from llava.conversation import tokenize_conversation
from llava.data.check import PreflightError, main
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import MINI_VISION, mini_llava
from llava.train.arguments import DataArguments, TrainingArguments
from llava.train.data import (
    BadSample,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    build_conversation,
    make_supervised_data_module,
)
from llava.train.llava_trainer import LLaVATrainer, SkippedSamples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def world(tmp_path, mini_world):
    """A private copy of the mini world's images (corrupt files go there) and its records."""
    images = tmp_path / "images"
    shutil.copytree(mini_world / "images", images)
    records = json.loads((mini_world / "finetune.json").read_text())
    return images, records


def _write(tmp_path, records, name="data.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def _check(capsys, tmp_path, data, images, *extra) -> tuple[int, dict, str]:
    """Runs the CLI in-process -> (exit code, JSON report, stdout)."""
    report = tmp_path / "report.json"
    code = main(["--data_path", data, "--image_folder", str(images), "--json", str(report), *extra])
    return code, json.loads(report.read_text()), capsys.readouterr().out


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_clean_set_reports_no_bad_sample(tmp_path, capsys, world, mini_checkpoint):
    images, records = world
    data = _write(tmp_path, records)
    code, report, out = _check(capsys, tmp_path, data, images, "--model-path", str(mini_checkpoint))
    assert code == 0 and report["passed"] and report["bad"] == 0 and report["bad_by_kind"] == {}
    n_image = sum("image" in r for r in records)
    assert (report["records"], report["with_image"], report["text_only"]) == (len(records), n_image,
                                                                              len(records) - n_image)
    assert report["num_image_tokens"] == 16 and report["template"] == "qwen_2"  # the checkpoint's configs
    assert report["images_decoded"] == n_image  # the default sample (1000) covers them all
    assert report["tokens"]["count"] == len(records) and report["tokens"]["min"] > 16
    assert report["turns"]["min"] == 1 and report["bad_indices"] == [] and report["notes"] == []
    assert f"{len(records)} records, {n_image} (" in out and "Bad samples: 0 (0.00 %)" in out


def test_without_a_model_token_stats_are_skipped_and_said(tmp_path, capsys, world):
    images, records = world
    code, report, out = _check(capsys, tmp_path, _write(tmp_path, records[:5]), images)
    assert code == 0 and report["tokens"] is None and report["num_image_tokens"] is None
    assert "no --model-path: token lengths and visual-token truncation not checked" in out


def test_n_v_of_a_plain_llm_comes_from_the_vision_tower_flag(tmp_path, capsys, world, tokenizer):
    """The finetune stage's student is a plain LLM plus --vision_tower: N_v from the tower's config."""
    images, records = world
    base = tmp_path / "plain"  # configs and tokenizer are all the doctor reads: no weights needed
    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(base)
    tokenizer.save_pretrained(base)
    SiglipVisionConfig(**MINI_VISION).save_pretrained(tmp_path / "siglip")
    data = _write(tmp_path, records[:5])
    code, report, out = _check(capsys, tmp_path, data, images, "--model-path", str(base))
    assert report["num_image_tokens"] is None and "N_v unknown" in out and report["tokens"] is not None
    _, report, _ = _check(capsys, tmp_path, data, images, "--model-path", str(base), "--vision_tower",
                          str(tmp_path / "siglip"))
    assert report["num_image_tokens"] == 16 == mini_llava(tokenizer).num_image_tokens and report["notes"] == []


def _faulty_set(images: Path, records: list, outside: Path) -> tuple[list, dict]:
    """A good image record, a good text-only one, and one record of each fault -> (records, index -> kind).

    `outside`: a real image file outside `images`, named by its absolute path."""
    good = next(r for r in records if "image" in r)
    text = next(r for r in records if "image" not in r)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    faults = [
        (dict(good, id="missing", image="nope.png"), "missing_image"),
        (dict(good, id="dotdot", image="../x.png"), "escaping_image"),
        (dict(good, id="absolute", image=str(outside)), "escaping_image"),
        (dict(good, id="corrupt", image="corrupt.png"), "unreadable_image"),
        (dict(good, id="two", image=["a.png", "b.png"]), "multi_image"),
        (dict(good, id="no-turns", conversations=None), "malformed"),
        (dict(good, id="roles", conversations=_turns("a", "b")[::-1]),
         "malformed"),
        (dict(good, id="int-value", conversations=_turns("<image>\nq", 4)), "malformed"),
        ([good], "malformed"),
    ]
    return [good, text] + [r for r, _ in faults], {i + 2: kind for i, (_, kind) in enumerate(faults)}


def test_each_fault_is_counted_and_named_as_training_skips_it(tmp_path, capsys, world, mini_world,
                                                             mini_checkpoint, tokenizer):
    images, records = world
    data, expected = _faulty_set(images, records, mini_world / "images" / records[0]["image"])
    path = _write(tmp_path, data)
    code, report, out = _check(capsys, tmp_path, path, images, "--model-path", str(mini_checkpoint),
                               "--decode", "all", "--max_bad_fraction", "0.5")
    assert report["bad_indices"] == sorted(expected) and report["bad"] == len(expected)
    assert {o["index"]: o["kind"] for o in report["offenders"]} == expected
    assert report["bad_by_kind"] == {"malformed": 4, "multi_image": 1, "missing_image": 1,
                                     "escaping_image": 2, "unreadable_image": 1}
    assert code == 1 and not report["passed"]  # 9 of 11 > 0.5
    for o in report["offenders"]:  # named: index, id, image and reason on stdout
        assert f"sample {o['index']} (id={o['id']}, image={o['image']}): {o['reason']}" in out
    # one definition of bad: the training dataset skips the same samples with the same kind and reason
    dataset = LazySupervisedDataset(path, tokenizer, load_image_processor(SiglipVisionConfig(**MINI_VISION)),
                                    str(images), "qwen_2", num_image_tokens=16)
    for o in report["offenders"]:
        with pytest.raises(BadSample) as err:
            dataset.load(o["index"])
        assert (err.value.kind, str(err.value)) == (o["kind"], o["reason"])
    dataset.load(0), dataset.load(1)


def test_corrupt_images_need_a_decode(tmp_path, capsys, world):
    images, records = world
    (images / "corrupt.png").write_bytes(b"not an image")
    data = _write(tmp_path, [dict(records[0], image="corrupt.png")] + records[1:20])
    assert _check(capsys, tmp_path, data, images, "--decode", "none")[1]["bad"] == 0  # stat alone: fine
    code, report, out = _check(capsys, tmp_path, data, images, "--decode", "sample", "--decode_samples", "99")
    assert code == 1 and report["bad_by_kind"] == {"unreadable_image": 1} and "unreadable image" in out


def test_visual_tokens_cut_by_a_short_max_length(tmp_path, capsys, world, mini_checkpoint, tokenizer):
    images, records = world
    good = next(r for r in records if "image" in r)
    ids, _, _ = tokenize_conversation(build_conversation(good, "qwen_2", True), tokenizer)
    start = int((ids == IMAGE_TOKEN_INDEX).nonzero())  # the image's first position; N_v = 16 positions follow
    code, report, out = _check(capsys, tmp_path, _write(tmp_path, [good]), images, "--model-path",
                               str(mini_checkpoint), "--model_max_length", str(start + 8))
    assert code == 1 and report["bad_by_kind"] == {"visual_truncated": 1}
    assert f"visual tokens would be cut by model_max_length={start + 8}" in out
    assert _check(capsys, tmp_path, _write(tmp_path, [good]), images, "--model-path", str(mini_checkpoint),
                  "--model_max_length", str(start + 16 + 40))[1]["bad"] == 0


def test_exit_codes(tmp_path, capsys, world):
    images, records = world
    data = _write(tmp_path, [dict(records[0], image="gone.png")] + records[1:100])  # 1 bad in 100
    assert _check(capsys, tmp_path, data, images)[0] == 0  # 0.01 <= 0.01
    assert _check(capsys, tmp_path, data, images, "--max_bad_fraction", "0.005")[0] == 1
    assert main(["--data_path", str(tmp_path / "nope.json")]) == 2
    assert "nope.json' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--data_path", data, "--max_bad_fraction", "2"])
    assert exit_.value.code == 2


def test_a_wrong_image_folder_is_named(tmp_path, capsys, world):
    images, records = world
    data = _write(tmp_path, records)
    code, report, out = _check(capsys, tmp_path, data, tmp_path / "nowhere")
    assert code == 1 and f"--image_folder {tmp_path / 'nowhere'} is not a directory" in out
    (tmp_path / "empty").mkdir()
    code, report, out = _check(capsys, tmp_path, data, tmp_path / "empty")
    n_image = sum("image" in r for r in records)
    assert report["bad_by_kind"] == {"missing_image": n_image}
    assert f"none of the {n_image} image files was found under --image_folder {tmp_path / 'empty'}" in out


def _data_module(data_path, images, tokenizer, tmp_path, max_bad_fraction=0.01):
    data_args = DataArguments(data_path=data_path, image_folder=str(images),
                              max_bad_fraction=max_bad_fraction)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    processor = load_image_processor(SiglipVisionConfig(**MINI_VISION))
    return make_supervised_data_module(tokenizer, data_args, args, processor, 16)


def test_preflight_stops_above_max_bad_fraction_and_runs_at_it(tmp_path, world, tokenizer, caplog):
    images, records = world
    bad = [dict(records[i], id=f"bad{i}", image=f"gone/{i}.png") for i in range(2)]
    data = _write(tmp_path, bad + records[2:100])  # 2 of 100 bad
    with pytest.raises(PreflightError) as err:
        _data_module(data, images, tokenizer, tmp_path)
    message = str(err.value)
    assert "2 of 100 samples (2.00 %) bad" in message and "more than --max_bad_fraction 0.01" in message
    assert "missing_image: 2" in message
    assert "sample 0 (id=bad0, image=gone/0.png): image file not found" in message
    with caplog.at_level(logging.WARNING):
        module = _data_module(data, images, tokenizer, tmp_path, max_bad_fraction=0.02)  # 0.02 <= 0.02: runs
    assert len(module["train_dataset"]) == 100 and "2 of 100 samples (2.00 %) bad" in caplog.text
    with pytest.raises(ValueError, match="--max_bad_fraction must lie in"):
        DataArguments(data_path=data, max_bad_fraction=1.5)


def test_training_with_a_wrong_image_folder_stops_before_step_one(tmp_path, mini_world, mini_checkpoint):
    out = tmp_path / "run"
    args = ["--model_name_or_path", str(mini_checkpoint), "--version", "qwen_2",
            "--data_path", str(mini_world / "finetune.json"), "--image_folder", str(tmp_path / "imgs"),
            "--output_dir", str(out), "--max_steps", "1", "--report_to", "none", "--use_cpu",
            "--dataloader_num_workers", "0", "--disable_tqdm", "True"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "llava.train.train", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "PreflightError: Data pre-flight of" in run.stderr
    assert f"Hint: --image_folder {tmp_path / 'imgs'} is not a directory." in run.stderr
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))


class _ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, input_ids, **kwargs):
        return {"loss": (self.w * input_ids.float().mean()).pow(2).sum()}


class _ToyData(torch.utils.data.Dataset):
    """Item i reports bad sample i and bad sample 999 (the latter again and again)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor([i + 1, 2])
        types = torch.tensor([int(TokenType.INSTRUCTION), int(TokenType.RESPONSE)])
        skips = [{"index": j, "id": None, "image": f"{j}.png", "kind": "missing_image", "reason": "not found"}
                 for j in (i, 999)]
        return {"input_ids": ids, "labels": ids, "token_types": types, "image": None, "skipped": skips}


def test_skipped_count_is_in_every_training_log(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = LLaVATrainer(model=_ToyModel(), args=args, train_dataset=_ToyData(),
                           data_collator=DataCollatorForSupervisedDataset(pad_token_id=0))
    trainer.train()
    counts = [h["skipped_samples"] for h in trainer.state.log_history if "loss" in h]
    assert counts == [3, 5, 7]  # cumulative and unique: 2 new items a step, sample 999 once


def test_skipped_count_sends_only_new_records_to_the_other_processes(monkeypatch):
    dist = torch.distributed
    sent = []
    other = [{"index": 7, "image": "b.png", "reason": "missing"}]

    def all_gather_object(parts, mine):
        sent.append(list(mine))
        parts[:] = [mine, other]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    skipped = SkippedSamples()
    skipped.add([{"index": 1, "image": "a.png", "reason": "missing"}] * 2)
    assert skipped.count() == 2 and skipped.count() == 2
    assert sent == [[{"index": 1, "image": "a.png", "reason": "missing"}], []]  # the second time: nothing new


def test_preflight_of_a_multi_process_run_scans_on_rank_zero_and_stops_every_rank(tmp_path, world, tokenizer,
                                                                                  monkeypatch):
    """Rank 1 does not scan: it takes rank 0's summary from the broadcast and raises the same error."""
    import llava.data.check as check

    images, records = world
    data = _write(tmp_path, records[:10])  # all good here: rank 1 must not judge by its own scan
    rank0 = {"records": 10, "with_image": 10, "bad": 10, "bad_by_kind": {"missing_image": 10},
             "seconds": 0.01,
             "first": [{"index": 0, "id": "a", "image": "a.png", "kind": "missing_image", "reason": "gone"}],
             "hint": "--image_folder /x is not a directory"}
    monkeypatch.setattr(check, "is_multi_process", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list",
                        lambda box, src: box.__setitem__(0, ("ok", rank0)))
    monkeypatch.setattr(check, "scan", lambda *a: pytest.fail("rank 1 scanned"))
    with pytest.raises(PreflightError, match=r"10 of 10 samples \(100.00 %\) bad(.|\n)*Hint: --image_folder"):
        _data_module(data, images, tokenizer, tmp_path)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list",
                        lambda box, src: box.__setitem__(0, ("error", "OSError: stale file handle")))
    with pytest.raises(RuntimeError, match="Data pre-flight failed on rank 0: OSError: stale file handle"):
        _data_module(data, images, tokenizer, tmp_path)
