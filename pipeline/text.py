"""The original HunyuanDiT training tokenisation rules (spec 7.1), batched.

`TextImageArrowStream` tokenises one caption at a time. The batched calls here give, row by row, exactly what those
per-item calls give: BERT pads to a fixed length anyway, and the mT5 side is tokenised unpadded and padded by hand,
so no row depends on the other texts of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# `arrow_load_stream.py:271-286`: a missing or empty `text_zh` becomes this caption before tokenisation.
DEFAULT_CAPTION = "随机生成一张图片"

# The original pads mT5 ids with the EOS id (`fill_number=1`), not with the tokenizer's pad id 0 (that is what
# inference does); padded positions therefore see token 1 and give different hidden states than inference.
T5_TRAIN_PAD_ID = 1


def _check_texts(texts: Sequence[str], max_length: int) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"texts must be a list of strings, got a single str {texts[:40]!r}; wrap it in a list")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}: {text!r}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2 (room for the special tokens), got {max_length!r}")
    return texts


def tokenize_clip(tokenizer, texts: Sequence[str], max_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT side: `tokenizer(text, padding="max_length", max_length=L, truncation=True)` per text.

    Returns ids and attention mask, both int64 (B, L): `[CLS] ... [SEP] [PAD]*`, mask 1 on the first two groups.
    """
    texts = _check_texts(texts, max_length)
    if not texts:
        return torch.zeros(0, max_length, dtype=torch.long), torch.zeros(0, max_length, dtype=torch.long)
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (B, L)
    mask = torch.tensor(enc["attention_mask"], dtype=torch.long)  # (B, L)
    assert ids.shape == (len(texts), max_length), ids.shape
    return ids, mask


def tokenize_t5(
    tokenizer, texts: Sequence[str], max_length: int = 256, pad_id: int = T5_TRAIN_PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """mT5 side: `tokenizer(text, max_length=L, truncation=True, add_special_tokens=True)` without padding
    (so each row ends with `</s>`, kept even when truncated), then padded by hand with `pad_id` and mask 0.

    Returns ids and attention mask, both int64 (B, L).
    """
    texts = _check_texts(texts, max_length)
    ids = torch.full((len(texts), max_length), pad_id, dtype=torch.long)  # (B, L)
    mask = torch.zeros(len(texts), max_length, dtype=torch.long)  # (B, L)
    if not texts:
        return ids, mask
    enc = tokenizer(texts, max_length=max_length, truncation=True, add_special_tokens=True, return_attention_mask=True)
    for row, (row_ids, row_mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
        n = len(row_ids)
        assert 0 < n <= max_length, (n, max_length)
        ids[row, :n] = torch.tensor(row_ids, dtype=torch.long)
        mask[row, :n] = torch.tensor(row_mask, dtype=torch.long)
    return ids, mask
