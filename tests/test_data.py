"""Bad input never stops a run: each kind is skipped, counted and named; the collator keeps the layout."""

import json
import logging

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, TokenType
from llava.model.multimodal_encoder.siglip_encoder import load_image_processor
from llava.tiny.fixtures import MINI_VISION
from llava.train.data import DataCollatorForSupervisedDataset, LazySupervisedDataset


def _dataset(tmp_path, mini_world, tokenizer, records, max_len=256):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    from transformers import SiglipVisionConfig

    processor = load_image_processor(SiglipVisionConfig(**MINI_VISION))
    return LazySupervisedDataset(str(path), tokenizer, processor, str(mini_world / "images"), "qwen_2",
                                 model_max_length=max_len, num_image_tokens=16)


def _good(mini_world):
    return json.loads((mini_world / "finetune.json").read_text())[0]


@pytest.mark.parametrize("kind", ["missing", "corrupt", "escape", "truncated_labels", "visual_cut"])
def test_bad_sample_is_skipped_counted_and_named(tmp_path, mini_world, tokenizer, caplog, kind):
    good = _good(mini_world)
    bad = dict(good, id="bad-one")
    max_len = 256
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
    elif kind == "visual_cut":
        bad["conversations"] = [{"from": "human", "value": "long " * 200 + "<image>"},
                                {"from": "gpt", "value": "red"}]
    data = _dataset(tmp_path, mini_world, tokenizer, [bad, good], max_len=max_len)
    with caplog.at_level(logging.WARNING):
        item = data[0]
    assert item["skipped"] and item["skipped"][0]["index"] == 0 and item["skipped"][0]["id"] == "bad-one"
    assert "bad-one" in caplog.text and "Skipping sample 0" in caplog.text
    torch.testing.assert_close(item["input_ids"], data[1]["input_ids"])  # replaced by the next good sample
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
    assert list(sampler) != order  # reshuffled every epoch
