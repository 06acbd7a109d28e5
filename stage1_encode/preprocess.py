"""Pure preprocessing functions of stage 1, reproducing the original data loader (spec 7.1, 7.3, 8.3).

Nothing here touches Ray, the filesystem or global random state: each function is a function of its arguments, so
the same input gives the same cache on any cluster size, and stage 2's online-equivalence test can reuse them.

Original code paths reproduced:
  * decode: `Image.open(bytes).convert("RGB")` (`indexer.py:484-499`). The original substitutes a white 256x256
    image for an undecodable one; we reject it instead (a silent substitute would be trained on).
  * buckets: `ResolutionGroup(base, step)._calc_by_step` (`bucket.py:144-172`), nearest `h / w` by `np.argmin`
    (`bucket.py:945-947`), images with a side `< min_size` skipped.
  * single resolution: `TextImageArrowStream.random_crop_image` (short side to R with LANCZOS, crop along the long
    side).
  * multi resolution: `ArrowIndexV2.resize_and_crop(image, (tw, th), LANCZOS, "random")` (cover-resize with
    `int(round(...))`, `crop_top` drawn before `crop_left`).
  * `image_meta_size = (orig_W, orig_H, target_W, target_H, crop_left, crop_top)`; flip after the meta tuple, crop
    coordinates not mirrored; `ToTensor()` + `Normalize([0.5], [0.5])` in float32.
  * captions: `str(text).strip()`, empty -> "随机生成一张图片"; tokenisation via `pipeline.text`.

Deliberate differences (all recorded as rejects, never silent): undecodable images, images over the pixel limit,
below `min_size` (also in single-resolution mode), beyond `max_aspect_ratio`, and non-string captions are rejected,
where the original would train on a white square or on `str(value)` (e.g. "None" or "b'...'"). Captions given as
bytes are accepted when they are valid UTF-8 (an Arrow `binary` caption column); other bytes are rejected.
The random crop offset comes from an RNG seeded by (sample key, seed) instead of the global `random` state, which
makes the cache independent of worker count and order; the flip is not drawn at all: both views are kept.
"""

from __future__ import annotations

import hashlib
import io
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from shared.schema import PreprocessedImage

if TYPE_CHECKING:  # annotations only: stage1_encode.config imports torch (via pipeline.text); this stays torch-free
    from stage1_encode.config import ImageConfig

VIEW_NAMES = ("plain", "flip")


# What a null (missing) caption becomes; see clean_caption. The original trains on the text "None" ("original").
NULL_CAPTION_RULES = ("default", "reject", "original")


class Reject(Exception):
    """A sample that cannot be encoded. `reason` is a short machine word, `detail` a human explanation."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------------------------
# Decoding


def open_image(data: Any, max_pixels: int) -> Image.Image:
    """Open encoded image bytes lazily (header only) and check the pixel limit before anything is decoded.

    Raises Reject("decode_error") for missing, empty, unknown or corrupt data and Reject("pixel_limit") when
    width * height exceeds `max_pixels` (a decompression bomb is caught here, before its pixels are allocated).
    """
    if data is None:
        raise Reject("decode_error", "no image bytes (null)")
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise Reject("decode_error", f"image is a {type(data).__name__}, not bytes")
    if len(data) == 0:
        raise Reject("decode_error", "empty image bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS; our own limit below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as err:  # PIL's hard cap (2x MAX_IMAGE_PIXELS) is still an upper bound
        raise Reject("pixel_limit", str(err)) from None
    except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError, ...: all mean "not an image we read"
        raise Reject("decode_error", f"{type(err).__name__}: {err}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise Reject("decode_error", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise Reject("pixel_limit", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def decode_image(data: Any, max_pixels: int) -> Image.Image:
    """Decode image bytes to an RGB PIL image exactly as the original: `Image.open(bytes).convert("RGB")`.

    CMYK, palette, greyscale, 16-bit and alpha images are converted by PIL's `.convert("RGB")` (alpha dropped, not
    composited, 16-bit clipped), as in the original. Raises Reject("decode_error" | "pixel_limit").
    """
    return to_rgb(open_image(data, max_pixels))


def to_rgb(img: Image.Image) -> Image.Image:
    """An image from open_image (checked, not yet decoded) -> decoded RGB. Raises Reject("decode_error")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = img.convert("RGB")  # loads the pixels: a truncated file fails here
    except Exception as err:
        raise Reject("decode_error", f"{type(err).__name__}: {err}") from None
    return rgb


# ----------------------------------------------------------------------------------------------------------------------
# Buckets and target sizes


def resolution_buckets(base_size: int = 1024, step: int = 64, align: int = 16) -> list[tuple[int, int]]:
    """The original's `ResolutionGroup(base_size, step, align)._calc_by_step()`: (h, w) buckets sorted by h / w.

    From (base/2, 2*base) to (2*base, base/2): one side grows by `step` while the other shrinks by `step`, each
    clamped to [base/2, 2*base]. 33 buckets for (1024, 64). `align` is only checked (as the original does): the
    step walk does not use it.
    """
    for name, value in (("base_size", base_size), ("step", step), ("align", align)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if base_size % align:
        raise ValueError(f"base_size {base_size} is not divisible by align {align}")
    if step > base_size // 2:
        raise ValueError(f"step must be at most base_size // 2 = {base_size // 2}, got {step}")
    lo, hi = base_size // 2, base_size * 2
    out = [(base_size, base_size)]
    h, w = base_size, base_size
    while not (h >= hi and w <= lo):
        h, w = min(h + step, hi), max(w - step, lo)
        out.append((h, w))
    h, w = base_size, base_size
    while not (h <= lo and w >= hi):
        h, w = max(h - step, lo), min(w + step, hi)
        out.append((h, w))
    return sorted(out, key=lambda hw: hw[0] / hw[1])  # stable, as the original's sorted(key=ratio)


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Nearest aspect ratio: `np.argmin(np.abs(ratios - h / w))`, ties to the first (lowest h / w) bucket."""
    ratios = np.array([bh / bw for bh, bw in buckets])
    return tuple(buckets[int(np.argmin(np.abs(ratios - height / width)))])


def check_size(width: int, height: int, min_size: int, max_aspect_ratio: float) -> None:
    """Raise Reject("too_small") if a side is below `min_size` (the original's multireso `min_size` skip) and
    Reject("aspect_ratio") if long side / short side exceeds `max_aspect_ratio` (0 disables)."""
    if width < min_size or height < min_size:
        raise Reject("too_small", f"{width}x{height} has a side < min_size {min_size}")
    if max_aspect_ratio and max(width, height) / min(width, height) > max_aspect_ratio:
        raise Reject(
            "aspect_ratio",
            f"{width}x{height}: aspect {max(width, height) / min(width, height):.3g} > {max_aspect_ratio}",
        )


def target_size(width: int, height: int, cfg: ImageConfig) -> tuple[int, int]:
    """(H, W) the image is encoded at: its bucket (multi-resolution) or (R, R)."""
    if cfg.multireso:
        return assign_bucket(width, height, _buckets(cfg.resolution, cfg.reso_step, cfg.align))
    return (cfg.resolution, cfg.resolution)


_BUCKET_CACHE: dict[tuple[int, int, int], list[tuple[int, int]]] = {}


def _buckets(base: int, step: int, align: int) -> list[tuple[int, int]]:
    key = (base, step, align)
    if key not in _BUCKET_CACHE:
        _BUCKET_CACHE[key] = resolution_buckets(base, step, align)
    return _BUCKET_CACHE[key]


# ----------------------------------------------------------------------------------------------------------------------
# Resize and crop


def crop_rng(key: str, seed: int) -> random.Random:
    """A `random.Random` seeded by (sample key, seed): the same crop for a sample on every run and cluster size."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def resize_crop_single(
    img: Image.Image, resolution: int, rng: random.Random, crop: str = "random"
) -> tuple[Image.Image, tuple[int, int]]:
    """`random_crop_image`: short side to R with LANCZOS (`int()` of the long side), crop along the long side only.

    Returns the R x R crop and `(x_start, y_start)`.
    """
    w, h = img.size
    aspect = float(w) / float(h)
    if w < h:
        new_w, new_h = resolution, int(resolution / aspect)
    else:
        new_h, new_w = resolution, int(resolution * aspect)
    img = img.resize((new_w, new_h), Image.LANCZOS)
    if new_w > resolution:
        x = rng.randint(0, new_w - resolution) if crop == "random" else int(round((new_w - resolution) / 2.0))
        y = 0
    else:
        x = 0
        y = rng.randint(0, new_h - resolution) if crop == "random" else int(round((new_h - resolution) / 2.0))
    return img.crop((x, y, x + resolution, y + resolution)), (x, y)


def resize_crop_multi(
    img: Image.Image, size_hw: tuple[int, int], rng: random.Random, crop: str = "random"
) -> tuple[Image.Image, tuple[int, int]]:
    """`ArrowIndexV2.resize_and_crop(image, (tw, th), LANCZOS, crop)`: cover-resize, then crop.

    Returns the th x tw crop and `(crop_left, crop_top)`; the random draws are top first, then left, as the original.
    """
    th, tw = size_hw
    w, h = img.size
    if h / w < th / tw:
        rh, rw = th, int(round(th / h * w))
    else:
        rw, rh = tw, int(round(tw / w * h))
    img = img.resize((rw, rh), resample=Image.LANCZOS)
    if crop == "random":
        top = rng.randint(0, rh - th)
        left = rng.randint(0, rw - tw)
    elif crop == "center":
        top = int(round((rh - th) / 2.0))
        left = int(round((rw - tw) / 2.0))
    else:
        raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
    return img.crop((left, top, left + tw, top + th)), (left, top)


@dataclass
class CroppedImage:
    """The resized and cropped image (uint8 (H, W, 3)) and its conditioning, before normalisation."""

    pixels: np.ndarray
    image_meta_size: np.ndarray  # (6,) int32 (orig_W, orig_H, target_W, target_H, crop_left, crop_top)
    bucket: tuple[int, int]  # (H, W)


def resize_and_crop(img: Image.Image, key: str, cfg: ImageConfig) -> CroppedImage:
    """Size checks, target size, resize and crop of a decoded RGB image (the crop RNG seeded by key and cfg.seed)."""
    w, h = img.size
    check_size(w, h, cfg.min_size, cfg.max_aspect_ratio)
    return crop_to_target(img, key, cfg, target_size(w, h, cfg))


def crop_to_target(img: Image.Image, key: str, cfg: ImageConfig, target: tuple[int, int]) -> CroppedImage:
    """Resize and crop a decoded RGB image already checked by check_size to its `target_size` (H, W)."""
    w, h = img.size
    th, tw = target
    rng = crop_rng(key, cfg.seed)
    if cfg.multireso:
        out, (left, top) = resize_crop_multi(img, (th, tw), rng, cfg.crop)
    else:
        out, (left, top) = resize_crop_single(img, cfg.resolution, rng, cfg.crop)
    pixels = np.asarray(out, dtype=np.uint8)  # (H, W, 3)
    assert pixels.shape == (th, tw, 3), (pixels.shape, th, tw)
    meta = np.array([w, h, tw, th, left, top], dtype=np.int32)
    return CroppedImage(pixels=pixels, image_meta_size=meta, bucket=(th, tw))


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """`ToTensor()` then `Normalize([0.5], [0.5])`: uint8 (H, W, 3) -> float32 (3, H, W), bit-identical to torch.

    The result is C-contiguous (3, H, W), the memory layout `to_tensor` gives the original's VAE. `transpose` alone
    would keep the HWC strides, `np.stack` keeps the inputs' stride order, and `torch.from_numpy` hands the VAE a
    channels_last tensor: torch's CPU GroupNorm in channels_last loses precision on near-constant groups (flat
    skies, solid backgrounds), up to 0.2 relative on a 16-bit grayscale image against 4e-6 in NCHW.
    """
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, (pixels.dtype, pixels.shape)
    x = np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)  # (3, H, W)
    return (x - np.float32(0.5)) / np.float32(0.5)


def make_views(pixels: np.ndarray, views: Sequence[str]) -> np.ndarray:
    """The encoded views of a crop: "plain" and/or "flip" (horizontal, i.e. PIL FLIP_LEFT_RIGHT) -> (V, 3, H, W)."""
    out = []
    for view in views:
        if view == "plain":
            out.append(to_unit_range(pixels))
        elif view == "flip":
            out.append(to_unit_range(np.ascontiguousarray(pixels[:, ::-1])))  # (H, W, 3) mirrored along W
        else:
            raise ValueError(f"unknown view {view!r}; allowed: {', '.join(VIEW_NAMES)}")
    return np.stack(out)  # (V, 3, H, W)


def image_views(cfg: ImageConfig) -> tuple[str, ...]:
    """("plain",) or ("plain", "flip") when random_flip is on: both are cached, stage 2 draws one per step."""
    return ("plain", "flip") if cfg.random_flip else ("plain",)


def preprocess_image(img: Image.Image, key: str, cfg: ImageConfig) -> PreprocessedImage:
    """Decoded RGB image -> normalised views, image_meta_size and bucket. Raises Reject for filtered images."""
    cropped = resize_and_crop(img, key, cfg)
    return PreprocessedImage(
        views=make_views(cropped.pixels, image_views(cfg)),
        image_meta_size=cropped.image_meta_size,
        bucket=cropped.bucket,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Captions and tokenisation


def clean_caption(value: Any, default_caption: str | None, null_caption: str = "default") -> tuple[str, bool]:
    """The original's `str(text).strip()`, empty -> default caption. Returns (caption, substituted).

    Empty/whitespace strings become `default_caption` (substituted=True); with `default_caption=None` they raise
    Reject("empty_caption"). A null caption (None, a missing value) follows `null_caption`:
    - "default": treated as an empty caption (the default caption, or the empty-caption reject);
    - "reject": Reject("null_caption");
    - "original": the original trainer's `str(None).strip()`, i.e. the text "None" (substituted=False).
    UTF-8 bytes are decoded; anything else that is not a string raises Reject("bad_caption").
    """
    if null_caption not in NULL_CAPTION_RULES:
        raise ValueError(f"null_caption = {null_caption!r}; allowed: {', '.join(NULL_CAPTION_RULES)}")
    if value is None:
        if null_caption == "reject":
            raise Reject("null_caption", "caption is null (missing) and text.null_caption is 'reject'")
        if null_caption == "original":
            return "None", False
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise Reject("bad_caption", f"caption bytes are not UTF-8: {err}") from None
    if value is not None and not isinstance(value, str):
        raise Reject("bad_caption", f"caption is a {type(value).__name__} ({str(value)[:60]!r}), not a string")
    text = "" if value is None else value.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: no tokenizer can represent them
        raise Reject("bad_caption", f"caption is not valid unicode: {err}") from None
    if text == "":
        if default_caption is None:
            raise Reject("empty_caption", "caption is empty or missing and no default caption is configured")
        return default_caption, True
    return text, False


def load_tokenizers(encoder_root: str) -> tuple[Any, Any]:
    """The BERT and mT5 tokenizers of a ckpts/t2i folder, loaded with the same classes as `pipeline.encoders`."""
    # lazy: transformers and torch (pipeline.encoders) cost seconds; importers that never tokenize (the driver,
    # image-only code) stay free of them
    from transformers import AutoTokenizer, BertTokenizer

    from pipeline.encoders import resolve_encoder_paths

    paths = resolve_encoder_paths(encoder_root)
    clip_tok = BertTokenizer.from_pretrained(paths["clip_tokenizer"], local_files_only=True)
    t5_tok = AutoTokenizer.from_pretrained(paths["t5"], local_files_only=True)
    return clip_tok, t5_tok


def tokenize(
    clip_tokenizer: Any, t5_tokenizer: Any, texts: Sequence[str], clip_len: int, t5_len: int
) -> dict[str, np.ndarray]:
    """Both tokenisations of the original (BERT padded to `clip_len`; mT5 unpadded, then id 1 / mask 0 to `t5_len`).

    Returns clip_ids, t5_ids int32 and clip_mask, t5_mask bool, each (B, L).
    """
    from pipeline.text import tokenize_clip, tokenize_t5  # lazy: imports torch, see load_tokenizers

    clip_ids, clip_mask = tokenize_clip(clip_tokenizer, list(texts), clip_len)
    t5_ids, t5_mask = tokenize_t5(t5_tokenizer, list(texts), t5_len)
    return {
        "clip_ids": clip_ids.numpy().astype(np.int32),
        "clip_mask": clip_mask.numpy().astype(bool),
        "t5_ids": t5_ids.numpy().astype(np.int32),
        "t5_mask": t5_mask.numpy().astype(bool),
    }
