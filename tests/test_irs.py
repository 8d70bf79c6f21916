"""The Instruction-Relevance Score (Eq. 4): against a plain reference, the pairings, the layer selection and the
`python -m aligntI_patch.irs` CLI. The tiny models, batches and the eager reference come from
tests/test_iva_irs.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from test_iva_irs import LAYOUT, TM, N, R, V, eager_alphas, make_batch, tiny_model

from aligntI_patch.irs import (
    instruction_relevance_score,
    irs_per_layer,
    pair_samples,
    select_iva_layer,
    single_turn_records,
    write_irs,
)
from aligntI_patch.iva import importance_per_layer


def reference_irs(alpha_a: torch.Tensor, alpha_b: torch.Tensor) -> float:
    """Eq. 4 as loops: 1 - the mean over pairs of cos = sum_k a_k b_k / (|a| |b|), |a| = sqrt(sum_k a_k^2)."""
    cosines = []
    for a, b in zip(alpha_a.tolist(), alpha_b.tolist()):
        dot = sum(x * y for x, y in zip(a, b))
        cosines.append(dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))))
    return 1.0 - sum(cosines) / len(cosines)


def reference_irs_per_layer(model: torch.nn.Module, batches_a: list, batches_b: list, num_layers: int):
    """`reference_irs` of each layer; row r of batches_a[i] pairs with row r of batches_b[i]."""
    layers = list(range(num_layers))
    alphas_a = [eager_alphas(model, batch, layers) for batch in batches_a]
    alphas_b = [eager_alphas(model, batch, layers) for batch in batches_b]
    return [reference_irs(torch.cat([a[layer] for a in alphas_a]), torch.cat([b[layer] for b in alphas_b]))
            for layer in layers]  # fmt: skip


# ---------------------------------------------------------------- IRS (Eq. 4)


def test_irs_identical_orthogonal_and_hand_case() -> None:
    alpha = torch.rand(5, 7)
    assert instruction_relevance_score(alpha, alpha.clone()) == pytest.approx(0.0, abs=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    assert instruction_relevance_score(a, b) == pytest.approx(1.0)
    a, b = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert instruction_relevance_score(a, b) == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2)
    # A pair with an all-zero alpha (no instruction) is skipped.
    a0, b0 = torch.cat([a, torch.zeros(1, 2)]), torch.cat([b, torch.ones(1, 2)])
    assert instruction_relevance_score(a0, b0) == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ValueError, match="no pair"):
        instruction_relevance_score(torch.zeros(2, 3), torch.ones(2, 3))


def test_irs_per_layer_equals_eager_reference() -> None:
    """IRS(l) over four pairs (right- and left-padded batches) against Eq. 4 written as loops on alpha from
    eager attention row by row (`reference_irs_per_layer`), for every layer of a Qwen3."""
    model = tiny_model("qwen3", layers=3, init=0.3)
    rows_a = [LAYOUT, [TM, V, V, V, V, N, N, TM, R]]
    rows_b = [[TM, V, V, V, V, N, N, N, N, TM, R], LAYOUT]
    batches_a = [make_batch(rows_a, seed=1), make_batch(rows_a, seed=2, pad_left=True)]
    batches_b = [make_batch(rows_b, seed=3), make_batch(rows_b, seed=4, pad_left=True)]
    scores = irs_per_layer(model, batches_a, batches_b)
    expected = reference_irs_per_layer(model, batches_a, batches_b, 3)
    assert min(expected) > 0.02 and max(expected) - min(expected) > 0.03  # far from 0, different per layer
    assert scores == pytest.approx(expected, abs=1e-5)
    assert irs_per_layer(model, batches_a, batches_b, layers=[2]) == pytest.approx(expected[2:], abs=1e-5)
    per_layer = importance_per_layer(model, batches_a[1], [0, 2])
    expected_alpha = eager_alphas(model, batches_a[1], [0, 2])
    for layer in (0, 2):
        torch.testing.assert_close(per_layer[layer], expected_alpha[layer], atol=1e-6, rtol=0)


def record(image: str | None, question: str, rid: int) -> dict:
    conv = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "x"}]
    return {"id": rid, "conversations": conv, **({"image": image} if image else {})}


def test_pair_samples_prefers_same_image_different_instruction() -> None:
    records = [
        record("a.png", "What color is the circle?", 0),
        record("b.png", "How many squares?", 1),
        record("a.png", "Is there a cross?", 2),
        record("a.png", "What color is the circle?", 3),  # same instruction as 0: never paired with it
        record(None, "Tell me a joke.", 4),
        record("b.png", "What is on the left?", 5),
    ]
    pairs = pair_samples(records, seed=0, pairing="same_image")
    assert sorted(tuple(sorted(p)) for p in pairs) in ([(0, 2), (1, 5)], [(1, 5), (2, 3)])
    for i, j in pairs:
        assert records[i]["image"] == records[j]["image"]
        assert records[i]["conversations"][0] != records[j]["conversations"][0]
    assert pair_samples(records, seed=0, pairing="same_image") == pairs  # deterministic
    assert len(pair_samples(records, num_pairs=1, seed=0, pairing="same_image")) == 1


def test_pair_samples_falls_back_to_random_different_images() -> None:
    records = [record(f"{i % 5}.png", f"q{i}", i) for i in range(5)] + [record(None, "text", 5)]
    pairs = pair_samples(records, seed=1, pairing="same_image")
    assert len(pairs) == 2
    used = [i for p in pairs for i in p]
    assert len(set(used)) == 4 and 5 not in used
    assert all(records[i]["image"] != records[j]["image"] for i, j in pairs)
    assert pair_samples(records, seed=1, pairing="same_image") == pairs
    assert len(pair_samples(records, num_pairs=1, seed=1, pairing="same_image")) == 1


def test_iid_pairs_are_random_disjoint_pairs_of_image_samples() -> None:
    """Eq. 4's expectation over i.i.d. inputs: any two image samples may pair (same image or not)."""
    records = [record(f"{i % 3}.png", f"q{i}", i) for i in range(40)] + [record(None, "text", 40)]
    pairs = pair_samples(records, seed=0)
    assert len(pairs) == 20 and len({i for p in pairs for i in p}) == 40  # disjoint, every image sample once
    same = sum(records[i]["image"] == records[j]["image"] for i, j in pairs)
    assert 0 < same < 20  # neither forced nor excluded
    assert pair_samples(records, seed=0) == pairs and pair_samples(records, seed=1) != pairs
    assert pair_samples(records, num_pairs=5, seed=0) == pairs[:5]
    with pytest.raises(ValueError, match="pairing must be one of"):
        pair_samples(records, pairing="same")


def test_single_turn_records_split_multi_turn_conversations() -> None:
    multi = {
        "id": "m",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat color?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "How many?"},
            {"from": "gpt", "value": "Two."},
        ],
    }
    out = single_turn_records([multi, record(None, "text", 1)])
    assert [r["id"] for r in out] == ["m_turn0", "m_turn1", 1]
    assert out[1]["conversations"] == [
        {"from": "human", "value": "<image>\nHow many?"},
        {"from": "gpt", "value": "Two."},
    ]
    assert pair_samples(out, pairing="same_image") in ([(0, 1)], [(1, 0)])


# ---------------------------------------------------------------- layer selection


def test_select_iva_layer(tmp_path) -> None:
    model = tiny_model(layers=3)
    assert select_iva_layer(2, model) == 2 and select_iva_layer("1", model) == 1
    for bad in (3, -1, "7"):
        with pytest.raises(ValueError, match=r"out of range: the model has layers 0\.\.2"):
            select_iva_layer(bad, model)
    with pytest.raises(ValueError, match="'auto' or a layer index"):
        select_iva_layer("best", model)
    with pytest.raises(ValueError, match="needs an irs.json"):
        select_iva_layer("auto", model, irs_path=tmp_path / "missing.json")
    best = write_irs(tmp_path, [0, 1, 2], [0.1, 0.4, 0.2], num_pairs=8)
    assert best == 1 and (tmp_path / "irs.png").stat().st_size > 0
    saved = json.loads((tmp_path / "irs.json").read_text())
    assert saved == {"layers": [0, 1, 2], "irs": [0.1, 0.4, 0.2], "best_layer": 1, "num_pairs": 8, "pairing": "iid"}
    both = write_irs(tmp_path / "both", [0, 1, 2], [0.3, 0.1, 0.2], 8, "iid", {"same_image": ([0.1, 0.2, 0.5], 6)})
    curves = json.loads((tmp_path / "both" / "irs.json").read_text())["curves"]
    assert both == 0 and curves == {"iid": {"irs": [0.3, 0.1, 0.2], "num_pairs": 8},
                                    "same_image": {"irs": [0.1, 0.2, 0.5], "num_pairs": 6}}
    assert select_iva_layer("auto", model, irs_path=tmp_path / "irs.json") == 1
    (tmp_path / "bad.json").write_text(json.dumps({**saved, "best_layer": 9}))
    with pytest.raises(ValueError, match="best_layer 9 out of range for the teacher, which has 3 layers"):
        select_iva_layer("auto", model, irs_path=tmp_path / "bad.json", name="the teacher")
    # IRS of a deeper model (a teacher's irs.json for the student): caught even where best_layer fits
    (tmp_path / "deeper.json").write_text(json.dumps({**saved, "layers": [0, 1, 2, 3, 4], "best_layer": 1}))
    with pytest.raises(ValueError, match="scores layers up to 4 but the student has 3: .*another model"):
        select_iva_layer("auto", model, irs_path=tmp_path / "deeper.json", name="the student")
    # Without a file: computed on the given pairs; the layer of the highest IRS from eager attention (Eq. 4 as
    # loops), here the middle one by a clear margin
    sharp = tiny_model(layers=3, seed=5, init=0.3)
    batches_a = [make_batch([LAYOUT, LAYOUT], seed=1)]
    batches_b = [make_batch([[TM, V, V, V, V, N, TM, R], LAYOUT], seed=2)]
    irs = reference_irs_per_layer(sharp, batches_a, batches_b, 3)
    assert irs[1] > max(irs[0], irs[2]) + 0.1
    assert select_iva_layer("auto", sharp, paired_batches=(batches_a, batches_b)) == 1




def test_irs_cli_end_to_end(tmp_path) -> None:
    """python -m aligntI_patch.irs on a tiny saved LLaVA checkpoint and a LLaVA JSON with multi-turn records;
    both curves equal `reference_irs_per_layer` on the pairs the CLI reads."""
    pytest.importorskip("llava.train.data")
    from PIL import Image

    from aligntI_patch.irs import load_paired_batches, main
    from llava.model.builder import load_pretrained_model
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM
    from llava.tiny.tokenizer import train_tokenizer

    questions = [
        "What color is the circle?",
        "How many squares?",
        "Is there a cross?",
        "What is on the left?",
    ]
    records = []
    for k in range(3):
        Image.new("RGB", (16, 16), (40 * k, 90, 200)).save(tmp_path / f"{k}.png")
        turns = [{"from": "human" if t % 2 == 0 else "gpt", "value": questions[t // 2] if t % 2 == 0 else "Red."}
                 for t in range(8)]  # fmt: skip
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append({"id": k, "image": f"{k}.png", "conversations": turns})
    (tmp_path / "data.json").write_text(json.dumps(records))
    tokenizer = train_tokenizer(
        questions + ["Red.", "user\n", "assistant\n"], tmp_path / "ckpt", vocab_size=300
    )
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    cfg = LlavaQwenConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, mm_vision_tower="tiny",
                          mm_vision_config=vision.to_dict(), mm_hidden_size=16,
                          pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)  # fmt: skip
    torch.manual_seed(0)
    LlavaQwenForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    main(["--model-path", str(tmp_path / "ckpt"), "--data-path", str(tmp_path / "data.json"),
          "--image-folder", str(tmp_path), "--num-pairs", "5", "--batch-size", "2",
          "--output-dir", str(tmp_path / "out")])  # fmt: skip
    result = json.loads((tmp_path / "out" / "irs.json").read_text())
    # 12 single turns: 6 disjoint iid pairs >= 5; same-image: 3 images x 2 disjoint turn pairs >= 5
    assert result["layers"] == [0, 1, 2] and result["num_pairs"] == 5 and result["pairing"] == "iid"
    assert {k: v["num_pairs"] for k, v in result["curves"].items()} == {"iid": 5, "same_image": 5}
    assert result["curves"]["iid"]["irs"] == result["irs"]
    tokenizer, model, processor, context_len = load_pretrained_model(str(tmp_path / "ckpt"))
    for pairing, curve in result["curves"].items():
        batches_a, batches_b, _ = load_paired_batches(
            tokenizer, processor, model.eval(), str(tmp_path / "data.json"), str(tmp_path), "qwen_2",
            num_pairs=5, batch_size=2, seed=0, context_len=context_len, pairing=pairing,
        )  # the pairs the CLI reads
        expected = reference_irs_per_layer(model, batches_a, batches_b, 3)
        assert curve["irs"] == pytest.approx(expected, abs=1e-5)
        if pairing == "iid":  # the layer of the highest reference IRS, by a margin the tolerance cannot flip
            best = max(range(3), key=expected.__getitem__)
            assert result["best_layer"] == best and expected[best] > sorted(expected)[-2] + 1e-3
    assert (tmp_path / "out" / "irs.png").stat().st_size > 0
