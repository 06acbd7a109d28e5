"""The VAE sees what the original feeds it: contiguous NCHW float32, wherever stage 1 or the online path calls it.

The original builds its VAE batch with torchvision `to_tensor` + `Normalize` and `torch.stack`: contiguous NCHW.
Torch's CPU GroupNorm in channels_last loses precision on near-constant groups (a flat sky, a solid background, a
grayscale scan): with the tiny VAE, a solid-colour image came out 2e-2 relative off a float64 run of the same VAE
when the batch was channels_last, 4e-6 in NCHW. So these tests hand stage 1's real code flat images and compare the
cached moments with a float64 run of the same weights on the same pixels.

Tolerance 1e-5 relative (max |diff| over max |reference|, per tensor): the fp32 NCHW path differs from float64 only
by float32 rounding through ~20 layers (measured 1.7e-6 to 3.9e-6 on these images, AVX2 and SSE4.1 kernels alike);
the channels_last path is 500x to 5000x above it, so the test cannot pass with the wrong layout.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.encoders import EncoderDtypes, load_encoders
from stage1_encode import job as job_mod
from stage1_encode import preprocess as pp
from stage1_encode.config import ImageConfig

REL_TOL = 1e-5

pytestmark = pytest.mark.exact


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from pipeline.tiny_suite import write_tiny_suite

    suite = write_tiny_suite(tmp_path_factory.mktemp("vae_suite") / "t2i", seed=0)
    return load_encoders(suite, EncoderDtypes(vae="float32", clip="float32", t5="float32"), clip_len=8, t5_len=12)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def flat_images() -> dict[str, bytes]:
    """Encoded bytes of near-constant images, as a corpus holds them."""
    solid = Image.new("RGB", (256, 256), (137, 180, 221))  # a clear sky
    # 16-bit grayscale with a gentle vertical ramp (a scanned page, a studio backdrop): mode I;16 in the PNG
    ramp = (np.linspace(24000, 24400, 256)[:, None] * np.ones((1, 192))).astype(np.uint16)
    gray16 = Image.fromarray(ramp)
    assert gray16.mode in ("I;16", "I")
    return {"solid": _png(solid), "gray16": _png(gray16)}


def _reference_moments(vae, pixels_hwc: np.ndarray) -> torch.Tensor:
    """float64 VAE on the original's tensor: to_tensor (HWC uint8 -> CHW / 255) and Normalize(0.5, 0.5)."""
    x = torch.from_numpy(pixels_hwc).permute(2, 0, 1).contiguous().double() / 255.0
    x = ((x - 0.5) / 0.5)[None]
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    return torch.cat([post.mean, post.logvar], dim=1)[0]


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


class _LayoutSpy:
    """Records whether every tensor that enters the given modules (positional or keyword) is contiguous."""

    def __init__(self, *modules):
        self.seen: list[bool] = []

        def hook(_m, args, kwargs):
            self.seen.extend(t.is_contiguous() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

        self.handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]

    def close(self):
        for h in self.handles:
            h.remove()


def test_stage1_flat_images_get_float64_accurate_moments(encoders):
    """Stage 1's own functions (decode, crop, the encoder actor's chunk encoding) on solid and 16-bit gray images."""
    cfg = ImageConfig(multireso=False, resolution=128, random_flip=True)
    actor = object.__new__(job_mod.EncoderActor)
    actor.enc, actor.views = encoders, pp.image_views(cfg)
    vae64 = copy.deepcopy(encoders.vae).double()
    spy = _LayoutSpy(encoders.vae.encoder, encoders.clip, encoders.t5)  # the text encoders' ids and masks too
    try:
        for name, data in flat_images().items():
            cropped = pp.resize_and_crop(pp.decode_image(data, 10**8), f"k-{name}", cfg)
            arrays = {
                "pixels": torch.from_numpy(cropped.pixels[None].copy()),
                "image_meta_size": torch.from_numpy(cropped.image_meta_size[None]),
            }
            tok = encoders.tokenize(["一张图片"])
            arrays.update({k: v for k, v in tok.items()})
            meta = {
                "bucket": list(cropped.bucket),
                "keys": [name],
                "captions": ["一张图片"],
                "sources": ["s"],
                "rows": [0],
                "substituted": [False],
                "null": [False],
            }
            payload, _ = actor.encode_chunk(arrays, meta)
            moments = job_mod.unpack(payload)["moments"][0]  # (V, 2C, h, w)
            for v, px in enumerate((cropped.pixels, np.ascontiguousarray(cropped.pixels[:, ::-1]))):
                rel = _rel(moments[v], _reference_moments(vae64, px))
                assert rel < REL_TOL, f"{name} view {v}: moments {rel:.3g} relative off the float64 VAE"
    finally:
        spy.close()
    assert len(spy.seen) >= 6 and all(spy.seen), "an encoder got a non-contiguous input (e.g. a channels_last batch)"


def test_views_are_contiguous_nchw():
    px = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    views = pp.make_views(px, ("plain", "flip"))
    assert views.shape == (2, 3, 16, 24) and views.flags.c_contiguous
    batch = np.stack([views, views])  # the actor's (B, V, 3, H, W) stack keeps the inputs' layout
    assert batch.flags.c_contiguous
    assert torch.from_numpy(batch.reshape(4, 3, 16, 24)).is_contiguous()


def test_encode_images_makes_any_layout_contiguous(encoders):
    """A caller's channels_last batch is encoded as its NCHW copy: same values, same kernels, bit for bit."""
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    spy = _LayoutSpy(encoders.vae.encoder)
    try:
        a, b = encoders.encode_images(x), encoders.encode_images(cl)
    finally:
        spy.close()
    assert spy.seen == [True, True]
    assert torch.equal(a, b)


def test_online_source_feeds_the_vae_contiguous_batches(encoders):
    """The online path (encoders in the step, as the original) stacks chosen views: also contiguous NCHW."""
    from stage2_train.data import BucketBatchPlan, DrawSettings
    from stage2_train.online import OnlineBatchSource, RawSample

    cfg = ImageConfig(multireso=False, resolution=64, random_flip=True)
    datas = list(flat_images().values())
    samples = [RawSample(key=f"k{i}", image=datas[i % 2], caption="图片") for i in range(4)]

    def preprocess(s):
        return pp.preprocess_image(pp.decode_image(s.image, 10**8), s.key, cfg)

    buckets = [(64, 64)] * 4
    plan = BucketBatchPlan(buckets, batch_size=2, world_size=1, seed=0)
    settings = DrawSettings(
        seed=0,
        random_flip=True,
        uncond_p=0.0,
        uncond_p_t5=0.0,
        num_timesteps=1000,
        noise_offset=0.0,
        scaling_factor=encoders.scaling_factor,
    )
    src = OnlineBatchSource(samples, buckets, preprocess, encoders, plan, settings)
    spy = _LayoutSpy(encoders.vae.encoder, encoders.clip, encoders.t5)
    try:
        next(iter(src.batches(0, 1)))
    finally:
        spy.close()
    assert spy.seen and all(spy.seen)
