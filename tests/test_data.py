"""Bad input never stops a run: each kind is skipped, counted and named; the collator keeps the layout."""

import json
import logging
import shutil

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import MINI_VISION
from llava.train.data import BadSample, DataCollatorForSupervisedDataset, LazySupervisedDataset, load_records


def _dataset(tmp_path, mini_world, tokenizer, records, max_len=256, folder=None, num_image_tokens=16):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    from transformers import SiglipVisionConfig

    processor = load_image_processor(SiglipVisionConfig(**MINI_VISION))
    return LazySupervisedDataset(str(path), tokenizer, processor, str(folder or mini_world / "images"), "qwen_2",
                                 model_max_length=max_len, num_image_tokens=num_image_tokens)


def _good(mini_world):
    return json.loads((mini_world / "finetune.json").read_text())[0]


def _text_only(mini_world):
    return next(r for r in json.loads((mini_world / "finetune.json").read_text()) if "image" not in r)


REASONS = {"missing": "image file not found", "corrupt": "unreadable image", "escape": "escapes the image folder",
           "truncated_labels": "no supervised token left", "visual_cut": "visual tokens would be cut"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_bad_sample_is_skipped_counted_and_named(tmp_path, mini_world, tokenizer, caplog, kind):
    good = _good(mini_world)
    bad = dict(good, id="bad-one")
    max_len, num_image_tokens = 256, 16
    if kind == "missing":
        bad["image"] = "does_not_exist.png"
    elif kind == "corrupt":
        (mini_world / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        bad["image"] = "corrupt.png"
    elif kind == "escape":
        bad["image"] = "../../etc/passwd"
    elif kind == "truncated_labels":
        bad["conversations"] = [{"from": "human", "value": "<image>\n" + "word " * 300},
                                {"from": "gpt", "value": "red"}]
    elif kind == "visual_cut":  # the image comes first, so only N_v past the limit can cut it
        good, max_len, num_image_tokens = _text_only(mini_world), 80, 64
    data = _dataset(tmp_path, mini_world, tokenizer, [bad, good], max_len=max_len, num_image_tokens=num_image_tokens)
    with caplog.at_level(logging.WARNING):
        item = data[0]
    assert item["skipped"] and item["skipped"][0]["index"] == 0 and item["skipped"][0]["id"] == "bad-one"
    assert REASONS[kind] in item["skipped"][0]["reason"]
    assert "bad-one" in caplog.text and "Skipping sample 0" in caplog.text
    torch.testing.assert_close(item["input_ids"], data[1]["input_ids"])  # replaced by the good sample
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([item, data[1]])
    assert len(batch["skipped"]) == 1


def test_collator_pads_and_stacks_only_real_images(tmp_path, mini_world, tokenizer):
    records = json.loads((mini_world / "finetune.json").read_text())
    text_only = next(r for r in records if "image" not in r)
    with_image = [r for r in records if "image" in r][:2]
    data = _dataset(tmp_path, mini_world, tokenizer, [with_image[0], text_only, with_image[1]])
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([data[i] for i in range(3)])
    assert batch["images"].shape == (2, 3, 32, 32)
    assert int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 2
    pad = batch["attention_mask"] == 0
    assert (batch["token_types"][pad] == TokenType.PAD).all() and (batch["labels"][pad] == IGNORE_INDEX).all()
    assert "skipped" not in batch


def test_unknown_data_path_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        LazySupervisedDataset(str(tmp_path / "nope.json"), tokenizer)


def test_modality_grouped_sampler_keeps_batches_single_modality():
    from llava.train.llava_trainer import ModalityGroupedSampler

    lengths = [5, -3, 7, -2, 9, 4, -8, 6, -1, 3]  # negative = text-only (LLaVA's convention)
    sampler = ModalityGroupedSampler(lengths, batch_size=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    chunks = [order[i : i + 2] for i in range(0, len(order), 2)]
    mixed = [c for c in chunks if len({lengths[i] > 0 for i in c}) > 1]
    assert len(mixed) <= 1  # only a leftover partial batch of one modality can sit next to the other
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled every epoch
    assert list(sampler) == list(sampler)  # the order is a function of (seed, epoch): no hidden counter
    resumed = ModalityGroupedSampler(lengths, batch_size=2, seed=0)
    resumed.set_epoch(1)  # what HF/accelerate call when a run resumes in epoch 1
    assert list(resumed) == list(sampler)


def test_symlinks_inside_the_image_folder_are_followed_but_escapes_are_not(tmp_path, mini_world, tokenizer):
    """LLaVA's layout: playground/data/coco -> another disk. Escapes are judged on the lexical path."""
    good = _good(mini_world)
    real = tmp_path / "other_disk" / "coco"
    real.mkdir(parents=True)
    shutil.copy(mini_world / "images" / good["image"], real / good["image"])
    folder = tmp_path / "playground" / "data"
    folder.mkdir(parents=True)
    (folder / "coco").symlink_to(real)
    outside = str(real / good["image"])  # a real image, but named by a path outside the folder
    names = [f"coco/{good['image']}", f"coco/../../../other_disk/coco/{good['image']}", outside,
             f"../../other_disk/coco/{good['image']}"]
    data = _dataset(tmp_path, mini_world, tokenizer, [dict(good, image=n) for n in names], folder=folder)
    assert data[0]["skipped"] == []
    for i in (1, 2, 3):
        with pytest.raises(BadSample, match="escapes the image folder"):
            data.load(i)


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.mark.parametrize("variant, reason", [
    ({"image": ["a.png", "b.png"]}, "multi-image samples are not supported"),
    ({"image": 5}, "'image' must be a non-empty path string"),
    ({"image": ""}, "'image' must be a non-empty path string"),
    ({"conversations": _turns("<image>\nq", None)}, "turn 1 'value' must be a string, got NoneType"),
    ({"conversations": _turns("<image>\nq", 4)}, "turn 1 'value' must be a string, got int"),
    ({"conversations": [{"from": "human", "value": "<image>\nq"}, "a"]}, "turn 1 is a str, not a JSON object"),
    ({"conversations": {"from": "human"}}, "'conversations' must be a list"),
    (None, "record is a NoneType, not a JSON object"),
    ([], "record is a list, not a JSON object"),
])
def test_schema_variants_are_skipped_with_a_reason(tmp_path, mini_world, tokenizer, variant, reason):
    good = _good(mini_world)
    bad = dict(good, **variant) if isinstance(variant, dict) else variant
    data = _dataset(tmp_path, mini_world, tokenizer, [good, bad, good])
    assert len(data.modality_lengths) == 3  # the sampler's look at the records does not trip on them either
    item = data[1]
    assert len(item["skipped"]) == 1 and item["skipped"][0]["index"] == 1
    assert reason in item["skipped"][0]["reason"]
    torch.testing.assert_close(item["input_ids"], data[0]["input_ids"])


def test_image_null_or_empty_is_text_only_and_a_one_element_list_is_that_image(tmp_path, mini_world, tokenizer):
    good, text = _good(mini_world), _text_only(mini_world)
    records = [good, dict(good, image=[good["image"]]), text, dict(text, image=None), dict(text, image=[])]
    data = _dataset(tmp_path, mini_world, tokenizer, records)
    items = [data[i] for i in range(len(records))]
    assert all(item["skipped"] == [] for item in items)
    torch.testing.assert_close(items[1]["input_ids"], items[0]["input_ids"])
    torch.testing.assert_close(items[1]["image"], items[0]["image"])
    for item in items[3:]:
        assert item["image"] is None
        torch.testing.assert_close(item["input_ids"], items[2]["input_ids"])
    assert [n > 0 for n in data.modality_lengths] == [True, True, False, False, False]


@pytest.mark.parametrize("question", ["What is this?\n<image>", "What is <image> this?", "  What is this? <image>  "])
def test_image_tag_moves_to_the_front_of_the_first_turn(tmp_path, mini_world, tokenizer, question):
    """LLaVA's preprocess_multimodal: the image first, as in eval and the CLI; the user's words stay instruction."""
    good = _good(mini_world)
    words = question.replace("<image>", "").strip()
    front = dict(good, conversations=_turns("<image>\n" + words, "A cross."))
    moved = dict(good, conversations=_turns(question, "A cross."))
    data = _dataset(tmp_path, mini_world, tokenizer, [front, moved])
    a, b = data[0], data[1]
    torch.testing.assert_close(b["input_ids"], a["input_ids"])
    torch.testing.assert_close(b["token_types"], a["token_types"])
    ids, types = b["input_ids"], b["token_types"]
    image_pos = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    instruction = (types == TokenType.INSTRUCTION).nonzero().flatten()
    assert image_pos < int(instruction.min())  # instruction after vision: IVA's attention has something to see
    assert tokenizer.decode(ids[instruction]) == words


def test_a_block_of_bad_samples_never_stops_the_run_and_each_is_reported_once(tmp_path, mini_world, tokenizer):
    records = json.loads((mini_world / "finetune.json").read_text())
    goods = [r for r in records if "image" in r][:3]
    block = [dict(goods[0], id=f"ocr{i}", image=f"ocr_vqa/{i}.jpg") for i in range(60)]  # one missing source
    data = _dataset(tmp_path, mini_world, tokenizer, goods[:1] + block + goods[1:])
    items = [data[i] for i in range(len(data))]
    reported = [s["index"] for item in items for s in item["skipped"]]
    assert sorted(reported) == list(range(1, 61))  # each bad sample once, however often replacement passes it
    good_ids = [data.load(i)["input_ids"].tolist() for i in (0, 61, 62)]
    replacements = [items[i]["input_ids"].tolist() for i in range(1, 61)]
    assert all(r in good_ids for r in replacements)
    assert len({tuple(r) for r in replacements}) > 1  # not one neighbour repeated 60 times
    # the same index gives the same sample in another process (a fresh dataset) and after a resume
    fresh = _dataset(tmp_path, mini_world, tokenizer, goods[:1] + block + goods[1:])
    for i in (5, 30, 59):
        assert fresh[i]["input_ids"].tolist() == replacements[i - 1]


def test_replacement_finds_a_lone_good_sample_and_all_bad_is_a_clear_error(tmp_path, mini_world, tokenizer):
    good = _good(mini_world)
    block = [dict(good, image=f"gone/{i}.jpg") for i in range(40)]
    data = _dataset(tmp_path, mini_world, tokenizer, block + [good] + block)
    expected = data.load(40)["input_ids"]
    for i in (0, 39, 41, 80):  # random draws may miss it: the scan of the whole file does not
        torch.testing.assert_close(data[i]["input_ids"], expected)
    data = _dataset(tmp_path, mini_world, tokenizer, block)
    with pytest.raises(RuntimeError, match=r"data.json: none of its 40 samples is usable \(e.g. sample 0: image file"):
        data[0]


@pytest.mark.parametrize("name, text", [
    ("d.jsonl", '{"a": 1}\n\n{"a": 2}\n'),
    ("d.JSONL", '{"a": 1}\n{"a": 2}'),
    ("d.json", '{"a": 1}\n{"a": 2}\n'),  # JSON Lines under a .json name
    ("d.JSON", '[{"a": 1}, {"a": 2}]'),
    ("bom.json", '\ufeff[{"a": 1}, {"a": 2}]'),
    ("bom.jsonl", '\ufeff{"a": 1}\n{"a": 2}'),
    ("sep.jsonl", '{"a": 1}\n{"a": 2, "s": "x\u2028y"}'),  # U+2028 is legal inside a JSON string
])
def test_load_records_reads_json_and_json_lines(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert [r["a"] for r in load_records(str(path))] == [1, 2]


@pytest.mark.parametrize("name, text, error, match", [
    ("d.jsonl", '{"a": 1}\n\n{"a": 2,}\n', ValueError, r"d.jsonl, line 3: not valid JSON"),
    ("d.json", '{"a": 1}\n{"a": 2,}\n', ValueError, r"d.json, line 2: not valid JSON"),
    ("d.json", '[{"a": 1},\n {"a": 2,}]', ValueError, r"d.json: not valid JSON \(.* at line 2"),
    ("d.json", '{"a": 1}', ValueError, r"d.json: expected a JSON list .* name the file .jsonl"),
    ("latin1.json", None, ValueError, r"latin1.json: not UTF-8"),
    ("folder.json", None, IsADirectoryError, r"folder.json' is a directory"),
])
def test_load_records_errors_name_the_file(tmp_path, name, text, error, match):
    path = tmp_path / name
    if name == "folder.json":
        path.mkdir()
    elif text is None:
        path.write_bytes('[{"a": "caf\xe9"}]'.encode("latin-1"))
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(error, match=match):
        load_records(str(path))
