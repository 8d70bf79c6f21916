"""Constants shared by the whole codebase (LLaVA's names, plus the token-type map Align-TI reads)."""

from enum import IntEnum

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"


class TokenType(IntEnum):
    """Role of every sequence position, decided while tokenizing and carried through splicing.

    Align-TI's losses index the sequence by role: IVA reads instruction->visual attention and aligns
    visual positions (Eq. 3); KD and TPA align response positions (Eq. 2, 7).
    """

    PAD = 0
    TEMPLATE = 1  # system prompt, role headers, separators
    VISUAL = 2  # one per visual embedding after splicing (one per image before it)
    INSTRUCTION = 3  # the user's words
    RESPONSE = 4  # assistant tokens (the supervised ones, plus the turn's end token)
