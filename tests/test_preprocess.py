"""Parity of stage-1 preprocessing with the original data loader (spec 7.1, 7.3, 8.3). No Ray here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.text import DEFAULT_CAPTION
from stage1_encode import preprocess as pp
from stage1_encode.config import ImageConfig

# The 33 buckets of ResolutionGroup(1024, step=64)._calc_by_step, sorted by h / w (spec 8.3), written out.
BUCKETS_1024 = (
    [(512, w) for w in range(2048, 1535, -64)]
    + [
        (576, 1472),
        (640, 1408),
        (704, 1344),
        (768, 1280),
        (832, 1216),
        (896, 1152),
        (960, 1088),
        (1024, 1024),
        (1088, 960),
        (1152, 896),
        (1216, 832),
        (1280, 768),
        (1344, 704),
        (1408, 640),
        (1472, 576),
    ]
    + [(h, 512) for h in range(1536, 2049, 64)]
)


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------------------------
# buckets


def test_bucket_list_is_the_originals_33():
    buckets = pp.resolution_buckets(1024, 64, 16)
    assert len(BUCKETS_1024) == 33
    assert buckets == BUCKETS_1024
    assert buckets[0] == (512, 2048) and buckets[16] == (1024, 1024) and buckets[-1] == (2048, 512)


def test_bucket_list_small_base_and_bad_args():
    assert pp.resolution_buckets(256, 64) == [
        (128, 512),
        (128, 448),
        (128, 384),
        (192, 320),
        (256, 256),
        (320, 192),
        (384, 128),
        (448, 128),
        (512, 128),
    ]
    with pytest.raises(ValueError, match="step"):
        pp.resolution_buckets(256, 200)
    with pytest.raises(ValueError, match="align"):
        pp.resolution_buckets(1000, 64, 16)


@pytest.mark.parametrize(
    "w, h, bucket",
    [
        (1920, 1080, (768, 1280)),  # 0.5625: |0.6 - r| = .0375 beats |0.5238 - r| = .0387
        (1080, 1920, (1280, 768)),
        (1000, 3000, (1536, 512)),  # exactly 3.0
        (1023, 1025, (1024, 1024)),
        (777, 333, (640, 1408)),  # 0.4286 -> 0.4545 (not 0.3913)
        (5000, 100, (512, 2048)),  # beyond the range: the extreme bucket
        (1, 1, (1024, 1024)),
    ],
)
def test_bucket_assignment_nearest_ratio(w, h, bucket):
    assert pp.assign_bucket(w, h, BUCKETS_1024) == bucket


# ----------------------------------------------------------------------------------------------------------------------
# resize / crop / meta


@pytest.mark.parametrize(
    "w, h, resized, crop_axis",
    [
        # (W, H) -> (new_w, new_h) from `random_crop_image`: W < H: new_w = R, new_h = int(R / (W / H)),
        # else new_h = R, new_w = int(R * W / H); crop only along the long side.
        (300, 200, (384, 256), "x"),
        (200, 300, (256, 384), "y"),
        (257, 255, (258, 256), "x"),  # int(256 * 257 / 255) = int(258.0078)
        (255, 257, (256, 258), "y"),  # int(256 / (255 / 257)) = int(258.0078)
        (100, 100, (256, 256), "y"),  # square: y = randint(0, 0)
        (333, 1000, (256, 768), "y"),  # int(256 / 0.333) = int(768.768...)
        (999, 7, (36534, 256), "x"),  # int(256 * 142.714...) = 36534
    ],
)
def test_single_resolution_crop_matches_original_formula(w, h, resized, crop_axis):
    img = _noise(w, h, seed=w * 7 + h)
    cfg = ImageConfig(multireso=False, resolution=256, max_aspect_ratio=0)
    out = pp.resize_and_crop(img, "src-00000001-abc", cfg)
    x, y = int(out.image_meta_size[4]), int(out.image_meta_size[5])
    new_w, new_h = resized
    assert out.pixels.shape == (256, 256, 3) and out.bucket == (256, 256)
    assert list(out.image_meta_size[:4]) == [w, h, 256, 256]
    if crop_axis == "x":
        assert y == 0 and 0 <= x <= new_w - 256
    else:
        assert x == 0 and 0 <= y <= new_h - 256
    # The crop is exactly PIL LANCZOS to (new_w, new_h) then the crop box at the reported offset.
    ref = img.resize((new_w, new_h), Image.LANCZOS).crop((x, y, x + 256, y + 256))
    np.testing.assert_array_equal(out.pixels, np.asarray(ref))


@pytest.mark.parametrize(
    "w, h, bucket, resized",
    [
        # ArrowIndexV2.resize_and_crop: r = h / w < th / tw -> (round(th / h * w), th), else (tw, round(tw / w * h))
        (1920, 1080, (768, 1280), (1365, 768)),  # round(1365.33)
        (1000, 3000, (1536, 512), (512, 1536)),
        (1023, 1025, (1024, 1024), (1024, 1026)),  # round(1026.0019)
        (777, 333, (640, 1408), (1493, 640)),  # round(1493.33)
        (301, 299, (1024, 1024), (1031, 1024)),  # round(1030.85)
    ],
)
def test_multi_resolution_crop_matches_original_formula(w, h, bucket, resized):
    img = _noise(w, h, seed=w + h)
    cfg = ImageConfig(multireso=True, resolution=1024, reso_step=64, max_aspect_ratio=0)
    out = pp.resize_and_crop(img, "k-00000002-def", cfg)
    th, tw = bucket
    rw, rh = resized
    left, top = int(out.image_meta_size[4]), int(out.image_meta_size[5])
    assert out.bucket == bucket and out.pixels.shape == (th, tw, 3)
    assert list(out.image_meta_size[:4]) == [w, h, tw, th]  # (orig_W, orig_H, target_W, target_H)
    assert 0 <= left <= rw - tw and 0 <= top <= rh - th
    ref = img.resize((rw, rh), resample=Image.LANCZOS).crop((left, top, left + tw, top + th))
    np.testing.assert_array_equal(out.pixels, np.asarray(ref))


def test_crop_rng_draw_order_and_determinism():
    # The original draws crop_top, then crop_left, from one RNG; ours is seeded by (key, seed).
    img = _noise(400, 100)  # cover-resize into (512, 2048) at base 1024 gives room on both axes? no: on x only
    cfg = ImageConfig(multireso=True, resolution=1024)
    a = pp.resize_and_crop(img, "key-a", cfg)
    assert pp.resize_and_crop(img, "key-a", cfg).image_meta_size.tolist() == a.image_meta_size.tolist()
    rng = pp.crop_rng("key-a", 0)
    rw, rh = 2048, int(round(2048 / 400 * 100))  # r = 0.25 == tr -> width-fit
    top, left = rng.randint(0, rh - 512), rng.randint(0, rw - 2048)
    assert (a.image_meta_size[4], a.image_meta_size[5]) == (left, top)
    # A different key or seed gives (almost surely) a different offset on a wide image.
    wide = _noise(3000, 300)
    single = ImageConfig(multireso=False, resolution=64)
    offsets = {int(pp.resize_and_crop(wide, f"k{i}", single).image_meta_size[4]) for i in range(8)}
    assert len(offsets) > 1
    s1 = ImageConfig(multireso=False, resolution=64, seed=1)
    assert [pp.resize_and_crop(wide, f"k{i}", s1).image_meta_size[4] for i in range(8)] != [
        pp.resize_and_crop(wide, f"k{i}", single).image_meta_size[4] for i in range(8)
    ]


@pytest.mark.exact
def test_normalise_is_totensor_normalize_bit_exact():
    px = np.random.default_rng(3).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    ours = pp.to_unit_range(px)
    # ToTensor: HWC uint8 -> CHW float / 255; Normalize([0.5], [0.5]): (x - 0.5) / 0.5, float32 throughout.
    ref = torch.from_numpy(px).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    ref = ref.sub_(torch.as_tensor([0.5])[:, None, None]).div_(torch.as_tensor([0.5])[:, None, None])
    assert ours.dtype == np.float32 and ours.shape == (3, 17, 23)
    assert np.array_equal(ours.view(np.uint32), ref.numpy().view(np.uint32))
    assert ours.min() >= -1 and ours.max() <= 1


def test_flip_view_after_meta_and_not_mirrored():
    img = _noise(300, 200)
    cfg = ImageConfig(multireso=False, resolution=128, random_flip=True)
    out = pp.preprocess_image(img, "abc", cfg)
    assert out.views.shape == (2, 3, 128, 128) and out.views.dtype == np.float32
    np.testing.assert_array_equal(out.views[1], out.views[0][:, :, ::-1])
    flipped = np.asarray(Image.fromarray(pp.resize_and_crop(img, "abc", cfg).pixels).transpose(Image.FLIP_LEFT_RIGHT))
    np.testing.assert_array_equal(out.views[1], pp.to_unit_range(flipped))
    assert out.image_meta_size.tolist() == pp.resize_and_crop(img, "abc", cfg).image_meta_size.tolist()
    assert pp.preprocess_image(img, "abc", ImageConfig(multireso=False, resolution=128)).views.shape[0] == 1


def test_size_filters():
    cfg = ImageConfig(multireso=False, resolution=64, min_size=32, max_aspect_ratio=4.0)
    with pytest.raises(pp.Reject) as e:
        pp.resize_and_crop(_noise(31, 100), "k", cfg)
    assert e.value.reason == "too_small"
    with pytest.raises(pp.Reject) as e:
        pp.resize_and_crop(_noise(401, 100), "k", cfg)
    assert e.value.reason == "aspect_ratio"
    pp.resize_and_crop(_noise(400, 100), "k", cfg)  # exactly 4:1 is allowed


@pytest.mark.parametrize("preset", ["demo", "hunyuandit-v1.2"])
def test_presets_refuse_tiny_images(preset):
    """A 16x16 image would be upscaled to a bucket and trained on: every encode preset sets a minimum size, and the
    demo's still keeps most of the demo corpus (whose multi-resolution index uses the same minimum)."""
    from pathlib import Path

    from shared.config import load_config
    from stage1_encode.config import EncodeConfig
    from stage1_encode.demo_corpus import demo_row

    im = load_config(EncodeConfig, Path(__file__).resolve().parents[1] / f"configs/encode/{preset}.yaml").image
    with pytest.raises(pp.Reject) as e:
        pp.check_size(16, 16, im.min_size, im.max_aspect_ratio)
    assert e.value.reason == "too_small"
    if preset == "demo":
        kept = sum(min(demo_row(i, 0).width, demo_row(i, 0).height) >= im.min_size for i in range(300))
        assert kept >= 240, kept


# ----------------------------------------------------------------------------------------------------------------------
# decoding


def _bomb_png(side: int) -> bytes:
    return _png(Image.new("L", (side, side), 0), optimize=True)  # tiny file, side*side pixels


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "decode_error"),
        (b"", "decode_error"),
        (b"definitely not an image", "decode_error"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "decode_error"),  # corrupt header
        ("a string", "decode_error"),
    ],
)
def test_decode_rejects_bad_bytes(data, reason):
    with pytest.raises(pp.Reject) as e:
        pp.decode_image(data, 10_000_000)
    assert e.value.reason == reason


def test_decode_rejects_truncated_and_bombs():
    good = _jpeg(_noise(64, 48))
    with pytest.raises(pp.Reject) as e:
        pp.decode_image(good[: len(good) // 2], 10_000_000)
    assert e.value.reason == "decode_error"
    bomb = _bomb_png(3000)
    assert len(bomb) < 100_000
    with pytest.raises(pp.Reject) as e:
        pp.open_image(bomb, max_pixels=1_000_000)
    assert e.value.reason == "pixel_limit"
    assert pp.open_image(bomb, max_pixels=9_000_000).size == (3000, 3000)


@pytest.mark.parametrize("mode", ["CMYK", "P", "I;16", "RGBA", "LA", "L", "1"])
def test_decode_converts_modes_like_the_original(mode):
    base = _noise(40, 30, seed=5)
    if mode == "CMYK":
        img, data = base.convert("CMYK"), None
        data = _jpeg(img)
    elif mode == "I;16":
        img = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
        data = _png(img)
    elif mode == "P":
        img = base.convert("P", palette=Image.ADAPTIVE)
        data = _png(img)
    elif mode in ("RGBA", "LA"):
        img = base.convert(mode)
        arr = np.asarray(img).copy()
        arr[..., -1] = 7  # mostly transparent: the original drops alpha, it does not composite
        img = Image.fromarray(arr, mode)
        data = _png(img)
    else:
        img = base.convert(mode)
        data = _png(img)
    out = pp.decode_image(data, 10_000_000)
    assert out.mode == "RGB" and out.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


# ----------------------------------------------------------------------------------------------------------------------
# captions and tokenisation


@pytest.mark.parametrize(
    "value, expected, substituted",
    [
        ("  一只猫  \n", "一只猫", False),
        ("a cat", "a cat", False),
        ("", DEFAULT_CAPTION, True),
        ("\u3000 \t", DEFAULT_CAPTION, True),  # str.strip() removes the ideographic space, as the original
        (None, DEFAULT_CAPTION, True),
        ("一只猫".encode(), "一只猫", False),
    ],
)
def test_clean_caption(value, expected, substituted):
    assert pp.clean_caption(value, DEFAULT_CAPTION) == (expected, substituted)


@pytest.mark.parametrize("value", [3, 2.5, ["a"], {"a": 1}, b"\xff\xfe\xfa", True, "bad \ud800 surrogate"])
def test_clean_caption_rejects_non_strings(value):
    with pytest.raises(pp.Reject) as e:
        pp.clean_caption(value, DEFAULT_CAPTION)
    assert e.value.reason == "bad_caption"


def test_clean_caption_reject_mode():
    with pytest.raises(pp.Reject) as e:
        pp.clean_caption("  ", None)
    assert e.value.reason == "empty_caption"


def test_null_caption_rules():
    assert pp.clean_caption(None, DEFAULT_CAPTION, "default") == (DEFAULT_CAPTION, True)
    assert pp.clean_caption(None, DEFAULT_CAPTION, "original") == ("None", False)  # str(None).strip()
    with pytest.raises(pp.Reject) as e:
        pp.clean_caption(None, DEFAULT_CAPTION, "reject")
    assert e.value.reason == "null_caption"
    with pytest.raises(pp.Reject) as e:  # "default" follows the empty-caption rule, here a reject
        pp.clean_caption(None, None, "default")
    assert e.value.reason == "empty_caption"
    assert pp.clean_caption("", DEFAULT_CAPTION, "original") == (DEFAULT_CAPTION, True)  # only null is "None"
    with pytest.raises(ValueError, match="null_caption = 'none'; allowed: default, reject, original"):
        pp.clean_caption(None, DEFAULT_CAPTION, "none")


@pytest.fixture(scope="module")
def tiny_tokenizers(tmp_path_factory):
    # the same session folder as tests/test_stage1_job.py's suite: written once per session
    root = tmp_path_factory.getbasetemp() / "stage1_tiny_suite" / "t2i"
    if not (root.parent / "done").exists():
        from pipeline.tiny_suite import write_tiny_suite

        write_tiny_suite(root, seed=0, overwrite=True)
        (root.parent / "done").write_text("ok")
    return pp.load_tokenizers(str(root))


TEXTS = [
    "一只橘色的猫坐在红色的沙发上",
    "a photo of a cat sitting on a wooden table",
    "一只猫 wearing sunglasses, 赛博朋克风格",
    "",
    "山水画，云雾缭绕的高山和小桥流水" * 40,  # longer than both 77 and 256 tokens
]


def test_tokenisation_matches_original_rules(tiny_tokenizers):
    clip_tok, t5_tok = tiny_tokenizers
    out = pp.tokenize(clip_tok, t5_tok, TEXTS, 77, 256)
    assert out["clip_ids"].shape == (5, 77) and out["t5_ids"].shape == (5, 256)
    assert out["clip_ids"].dtype == np.int32 and out["clip_mask"].dtype == np.bool_
    for i, text in enumerate(TEXTS):
        # arrow_load_stream.get_text_info_with_encoder / _t5, one caption at a time, exactly as the original calls
        ref = clip_tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        np.testing.assert_array_equal(out["clip_ids"][i], ref.input_ids[0].numpy())
        np.testing.assert_array_equal(out["clip_mask"][i], ref.attention_mask[0].bool().numpy())
        r5 = t5_tok(
            text,
            max_length=256,
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        n = r5["input_ids"].shape[1]
        ids = torch.cat([r5["input_ids"], torch.ones(1, 256 - n)], dim=1).long()[0]
        mask = torch.cat([r5["attention_mask"], torch.zeros(1, 256 - n)], dim=1).bool()[0]
        np.testing.assert_array_equal(out["t5_ids"][i], ids.numpy())
        np.testing.assert_array_equal(out["t5_mask"][i], mask.numpy())
    # "" -> [CLS][SEP][PAD]*75 (mask 2) and [</s>] + 255 x id 1 (mask 1)
    assert out["clip_mask"][3].sum() == 2 and out["clip_ids"][3][0] == clip_tok.cls_token_id
    assert out["t5_mask"][3].sum() == 1 and out["t5_ids"][3][0] == 1 and (out["t5_ids"][3][1:] == 1).all()
    # over-long: all 77 / 256 positions masked in, the last being [SEP] / </s>
    assert out["clip_mask"][4].all() and out["clip_ids"][4][-1] == clip_tok.sep_token_id
    assert out["t5_mask"][4].all() and out["t5_ids"][4][-1] == 1
