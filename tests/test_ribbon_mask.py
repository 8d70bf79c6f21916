"""Ribbon masks against dense masks written by hand (paper Fig. 5, appended layout); BlockMasks against both."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask

from aligntI_patch.ribbon_block_mask import candidate_rows_block_mask, ribbon_block_mask
from aligntI_patch.ribbon_mask import (
    candidate_position_ids,
    candidate_rows_mask,
    ground_truth_mask,
    ribbon_mask,
    to_additive,
)


def dense(rows: list[str]) -> torch.Tensor:
    """'10 01' -> bool rows; spaces separate the ground-truth columns from the candidate columns."""
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


def test_left_padding_d1():
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1]])
    cand_pos = torch.tensor([[3, 5]])
    expected = dense(
        [
            "100000 00",  # padding query: itself only
            "010000 00",
            "011000 00",
            "011100 00",
            "011110 00",
            "011111 00",
            "011000 10",  # candidate at k=3: valid columns < 3, and itself
            "011110 01",  # candidate at k=5
        ]
    )
    mask = ribbon_mask(attention_mask, cand_pos, d=1)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


def test_left_and_right_padding_d2():
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    cand_pos = torch.tensor([[2, 4], [5, -1]])
    right = dense(
        [
            "1000000 0000",
            "1100000 0000",
            "1110000 0000",
            "1111000 0000",
            "1111100 0000",
            "1111110 0000",  # right padding queries: valid prefix and themselves (never used)
            "1111101 0000",
            "1100000 1000",  # k=2, u=0
            "1100000 0100",  # k=2, u=1: not its sibling
            "1111000 0010",  # k=4, u=0
            "1111000 0001",  # k=4, u=1
        ]
    )
    left = dense(
        [
            "1000000 0000",
            "0100000 0000",
            "0010000 0000",
            "0011000 0000",
            "0011100 0000",
            "0011110 0000",
            "0011111 0000",
            "0011100 1000",  # k=5, u=0
            "0011100 0100",  # k=5, u=1
            "0000000 0010",  # padding group: itself only
            "0000000 0001",
        ]
    )
    mask = ribbon_mask(attention_mask, cand_pos, d=2)
    assert mask.shape == (2, 1, 11, 11)
    assert torch.equal(mask[0, 0], right)
    assert torch.equal(mask[1, 0], left)
    rows = candidate_rows_mask(attention_mask, cand_pos, d=2)
    assert rows.shape == (2, 1, 4, 11)
    assert torch.equal(rows, mask[:, :, 7:])


def test_ground_truth_block_is_causal_and_padding_on_valid_rows():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    gt = ground_truth_mask(attention_mask)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    valid = attention_mask.bool()
    expected = causal & valid[:, None, :]
    assert torch.equal(gt[valid], expected[valid])


def test_candidate_position_ids():
    position_ids = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 4]])
    cand_pos = torch.tensor([[4, 5], [2, -1]])
    assert torch.equal(candidate_position_ids(position_ids, cand_pos, d=1), torch.tensor([[2, 3], [2, 0]]))
    assert torch.equal(
        candidate_position_ids(position_ids, cand_pos, d=2), torch.tensor([[2, 2, 3, 3], [2, 2, 0, 0]])
    )
    # broadcast position ids [1, T]
    shared = torch.arange(6)[None]
    assert torch.equal(candidate_position_ids(shared, cand_pos, d=1), torch.tensor([[4, 5], [2, 0]]))


def test_to_additive():
    mask = torch.tensor([[True, False], [True, True]])
    add = to_additive(mask, torch.float32)
    assert add.dtype == torch.float32
    assert torch.equal(add, torch.tensor([[0.0, torch.finfo(torch.float32).min], [0.0, 0.0]]))
    assert to_additive(mask, torch.bfloat16)[0, 1] == torch.finfo(torch.bfloat16).min


def test_errors():
    attention_mask = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="d"):
        ribbon_mask(attention_mask, torch.tensor([[2]]), d=0)
    with pytest.raises(ValueError, match="positions"):
        ribbon_mask(attention_mask, torch.tensor([[4]]), d=1)
    with pytest.raises(ValueError, match="B, T"):
        ribbon_mask(attention_mask, torch.tensor([2]), d=1)


# ----------------------------------------------------------------------------- FlexAttention BlockMasks


def grid(block_mask: BlockMask) -> torch.Tensor:
    """The BlockMask's mask_mod evaluated at every (b, q, kv): bool ``[B, 1, Q, KV]``."""
    B, _, Q, KV = block_mask.shape
    return create_mask(block_mask.mask_mod, B, 1, Q, KV, device="cpu")


PADDED = [
    (torch.tensor([[0, 1, 1, 1, 1, 1]]), torch.tensor([[3, 5]])),  # left padding
    (torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]]), torch.tensor([[2, 4], [5, -1]])),  # both, -1 group
]


@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("case", range(len(PADDED)))
def test_block_masks_equal_dense_masks(case, d):
    attention_mask, cand_pos = PADDED[case]
    B, T = attention_mask.shape
    M = cand_pos.shape[1] * d
    appended = ribbon_block_mask(attention_mask, cand_pos, d)
    assert appended.shape == (B, 1, T + M, T + M)
    assert torch.equal(grid(appended), ribbon_mask(attention_mask, cand_pos, d))
    rows = candidate_rows_block_mask(attention_mask, cand_pos, d)
    assert rows.shape == (B, 1, M, T + M)  # KV length T + M: the T cached ground-truth keys, then the rows' own
    assert torch.equal(grid(rows), candidate_rows_mask(attention_mask, cand_pos, d))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_block_mask_blocks_match_dense_mask(padding):
    """At several 128-blocks per axis, the kept blocks are exactly those where the dense mask has a True."""
    T, R, d = 260, 40, 4  # T + M = 420: 4 blocks per axis, ground-truth x candidate blocks empty
    attention_mask = torch.ones(2, T, dtype=torch.long)
    if padding == "left":
        attention_mask[1, :30] = 0
    else:
        attention_mask[1, T - 30 :] = 0
    cand_pos = torch.arange(T - R - 30, T - 30).expand(2, R).clone()
    cand_pos[1, -5:] = -1
    for block_mask, dense in [
        (ribbon_block_mask(attention_mask, cand_pos, d), ribbon_mask(attention_mask, cand_pos, d)),
        (candidate_rows_block_mask(attention_mask, cand_pos, d), candidate_rows_mask(attention_mask, cand_pos, d)),
    ]:
        Q, KV = dense.shape[-2:]
        padded = F.pad(dense, (0, -KV % 128, 0, -Q % 128))  # (B, 1, Q', KV') whole blocks
        blocks = padded.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).any(dim=-1).any(dim=-2)  # (B, 1, nq, nk)
        assert torch.equal(block_mask.to_dense().bool(), blocks)
        assert not blocks.all()  # some blocks are skipped


def test_block_mask_errors():
    attention_mask = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="positions"):
        ribbon_block_mask(attention_mask, torch.tensor([[4]]), d=1)
    with pytest.raises(ValueError, match="d"):
        candidate_rows_block_mask(attention_mask, torch.tensor([[2]]), d=0)
