"""The batched tokenisation reproduces the original per-item calls of `TextImageArrowStream` (spec 7.1)."""

import pytest
import torch

from pipeline.text import DEFAULT_CAPTION, tokenize_clip, tokenize_t5
from pipeline.tiny_suite import write_tiny_suite

SAMPLES = [
    "一只橘色的猫坐在红色的沙发上",
    "A Photo of a CAT sitting on a wooden table",
    "一只猫 wearing sunglasses, 赛博朋克风格",
    "",
    DEFAULT_CAPTION,
    "  leading and trailing spaces  ",
    "城市夜景，高楼大厦灯火通明 city skyline at night, 4k " * 20,  # far over both limits
    "未见过的字：龘靐齉 and ünïcödé",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from transformers import AutoTokenizer, BertTokenizer

    root = write_tiny_suite(tmp_path_factory.mktemp("suite"), seed=0)
    # Loaded as the original loads them (train_deepspeed.py:342-367, text_encoder.py:18-41).
    bert = BertTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    mt5 = AutoTokenizer.from_pretrained(root / "mt5", local_files_only=True)
    return bert, mt5


def original_clip(tokenizer, text):
    # arrow_load_stream.py:227-240, one caption at a time
    enc = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return enc["input_ids"][0], enc["attention_mask"][0]


def original_t5(tokenizer, text, text_len=256, fill_number=1):
    # arrow_load_stream.py:242-269: unpadded, then filled by hand with id 1 and mask 0
    enc = tokenizer(
        text,
        max_length=text_len,
        truncation=True,
        return_attention_mask=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"][0], enc["attention_mask"][0]
    n = ids.shape[0]
    ids = torch.cat([ids, torch.full((text_len - n,), fill_number, dtype=ids.dtype)])
    mask = torch.cat([mask, torch.zeros(text_len - n, dtype=mask.dtype)])
    return ids, mask


@pytest.mark.exact
@pytest.mark.parametrize("encoder", ["clip", "t5"])
def test_matches_original_per_item_calls(tokenizers, encoder):
    bert, mt5 = tokenizers
    if encoder == "clip":
        tokenizer, batched, original, length = bert, tokenize_clip, original_clip, 77
    else:
        tokenizer, batched, original, length = mt5, tokenize_t5, original_t5, 256
    ids, mask = batched(tokenizer, SAMPLES, length)
    assert ids.shape == mask.shape == (len(SAMPLES), length)
    assert ids.dtype == mask.dtype == torch.long
    for row, text in enumerate(SAMPLES):
        ref_ids, ref_mask = original(tokenizer, text)
        assert torch.equal(ids[row], ref_ids), text
        assert torch.equal(mask[row], ref_mask), text


def test_clip_layout(tokenizers):
    bert, _ = tokenizers
    ids, mask = tokenize_clip(bert, SAMPLES, 77)
    cls, sep, pad = bert.cls_token_id, bert.sep_token_id, bert.pad_token_id
    for row, _text in enumerate(SAMPLES):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any(), "mask must be a prefix"
        assert ids[row, 0] == cls and ids[row, n - 1] == sep
        assert (ids[row, n:] == pad).all()
    empty = SAMPLES.index("")
    assert int(mask[empty].sum()) == 2  # [CLS] [SEP] [PAD]*75
    assert int(mask[SAMPLES.index(SAMPLES[6])].sum()) == 77  # truncated, [SEP] kept last
    # Chinese characters are single tokens, English is lower-cased as the Chinese BERT tokenizers do.
    zh = bert.convert_ids_to_tokens(ids[0, 1 : int(mask[0].sum()) - 1].tolist())
    assert zh == list(SAMPLES[0])
    en = bert.convert_ids_to_tokens(ids[1, 1:4].tolist())
    assert en == ["a", "photo", "of"]


def test_t5_layout(tokenizers):
    _, mt5 = tokenizers
    assert (mt5.pad_token_id, mt5.eos_token_id, mt5.unk_token_id) == (0, 1, 2)
    ids, mask = tokenize_t5(mt5, SAMPLES, 256)
    for row, _text in enumerate(SAMPLES):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert ids[row, n - 1] == 1, "the unpadded part ends with </s>"
        assert (ids[row, n:] == 1).all(), "padding is id 1 (the EOS id), not the tokenizer's pad id 0"
        assert not (ids[row, :n] == 0).any()
    empty = SAMPLES.index("")
    assert ids[empty].tolist() == [1] * 256 and int(mask[empty].sum()) == 1
    long_row = 6
    assert int(mask[long_row].sum()) == 256 and ids[long_row, -1] == 1  # truncated, </s> kept last
    # With the coverage text in the suite, ordinary Chinese needs no <unk>; unseen symbols may.
    assert not (ids[0] == mt5.unk_token_id).any()


def test_other_pad_id_and_lengths(tokenizers):
    bert, mt5 = tokenizers
    ids, mask = tokenize_t5(mt5, ["hello", ""], 8, pad_id=0)
    assert ids[1].tolist() == [1] + [0] * 7 and mask[1].tolist() == [1] + [0] * 7
    ids, mask = tokenize_clip(bert, ["一只猫坐在红色的沙发上"], 5)
    assert ids[0, -1] == bert.sep_token_id and mask[0].sum() == 5


@pytest.mark.exact
def test_batch_independence(tokenizers):
    bert, mt5 = tokenizers
    alone = [tokenize_t5(mt5, [t], 256)[0][0] for t in SAMPLES]
    batched = tokenize_t5(mt5, SAMPLES, 256)[0]
    assert all(torch.equal(a, b) for a, b in zip(alone, batched))
    ids, mask = tokenize_clip(bert, [], 77)
    assert ids.shape == (0, 77)


def test_bad_arguments(tokenizers):
    bert, mt5 = tokenizers
    with pytest.raises(ValueError, match="list of strings"):
        tokenize_clip(bert, "一只猫", 77)
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        tokenize_t5(mt5, ["ok", None], 256)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_t5(mt5, ["ok"], 0)
