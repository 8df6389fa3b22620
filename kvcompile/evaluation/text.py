"""Real English text that ships with Python: the help topics of `pydoc_data.topics`.

The topics (about 460K characters of language reference prose and grammar) are split by sorted
key, alternately, into a calibration part and an evaluation part. The parts share no topic, so a
plan is never scored on text it was calibrated on.
"""

from __future__ import annotations

import torch
from pydoc_data.topics import topics
from transformers import PreTrainedTokenizerBase

CALIBRATION_TOPICS = tuple(sorted(topics)[0::2])
EVALUATION_TOPICS = tuple(sorted(topics)[1::2])


def calibration_text() -> str:
    return _join_topics(CALIBRATION_TOPICS)


def evaluation_text() -> str:
    return _join_topics(EVALUATION_TOPICS)


def _join_topics(keys: tuple[str, ...]) -> str:
    return "\n\n".join(topics[key] for key in keys)


def token_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, *, length: int, count: int, seed: int = 0
) -> torch.Tensor:
    """`count` non-overlapping windows of `length` consecutive tokens of `text`, (count, length).

    The windows are a seeded random choice among the text's consecutive `length`-token slots,
    returned in text order, so every part of the text can be drawn but a seed always draws the same.
    """
    if length < 1 or count < 1:
        raise ValueError(f"length and count must be >= 1, got length={length}, count={count}")
    # The text is far longer than the model's context; nothing here feeds it to the model whole.
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    slots = ids.numel() // length
    if slots < count:
        raise ValueError(f"text has {ids.numel()} tokens: room for {slots} windows of {length}, asked for {count}")
    chosen = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return ids[: slots * length].view(slots, length)[chosen]
