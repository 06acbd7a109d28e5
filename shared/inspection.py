"""For people, notebooks, tests and benches: the cache summary, decoding samples to PIL images (and a captioned
grid, with a CJK font search), and the one synthetic-cache writer.

    print(open_cache(root).summary())          # CacheReader.summary / decode / grid call into this module
    write_synthetic_cache(root, spec, n_samples=16)                       # random features (cache tests, benches)
    write_synthetic_cache(root, spec, n_samples=12, latents="structured")  # learnable latents (stage-2 runs)

Nothing here is on the training path; PIL, torch and diffusers are imported only by the functions that need them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .cache import _EMPTY_FIELDS, CacheReader, group_by_bucket, open_shard_writer, write_empty_caption
from .manifest import Manifest, manifest_from_shards, write_manifest
from .schema import CacheSpec, synthetic_sample

# ---------------------------------------------------------------------------------------------------------------
# the summary


class CacheSummary(dict):
    """A dict of summary numbers that prints as a readable table."""

    def __str__(self) -> str:
        lines = [
            f"cache {self['root']}  ({self['format']}, schema v{self['schema_version']})",
            f"  samples {self['samples']}  shards {self['shards']}  "
            f"on disk {self['bytes_on_disk'] / 2**20:.1f} MiB"
            f"  ({self['bytes_per_sample_on_disk'] / 1024:.1f} KiB/sample)",
            f"  views {self['views']}  dtypes {self['dtypes']}  scaling_factor {self['scaling_factor']}",
        ]
        lines.append("  buckets (H x W: samples):")
        for b, n in self["buckets"].items():
            lines.append(f"    {b:>11}: {n}")
        lines.append("  token lengths (masked-in):   min   p50  mean   p90   max")
        for name in ("clip_len", "t5_len", "t5_unique_rows"):
            d = self["tokens"][name]
            lines.append(f"    {name:<24} {d['min']:>5} {d['p50']:>5} {d['mean']:>5.1f} {d['p90']:>5} {d['max']:>5}")
        lines.append("  stored bytes per sample by field (raw, before compression):")
        for f, b in self["bytes_per_sample_by_field"].items():
            lines.append(f"    {f:<18} {b / 1024:>9.2f} KiB")
        rej = self["rejects"]
        lines.append("  rejects: " + (", ".join(f"{k}={v}" for k, v in rej.items()) if rej else "none"))
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # IPython display
        p.text(str(self))


def _stats(x: np.ndarray) -> dict:
    if x.size == 0:
        return {"min": 0, "p50": 0, "mean": 0.0, "p90": 0, "max": 0}
    return {
        "min": int(x.min()),
        "p50": int(np.percentile(x, 50)),
        "mean": float(x.mean()),
        "p90": int(np.percentile(x, 90)),
        "max": int(x.max()),
    }


def summarize(reader: CacheReader) -> CacheSummary:
    """The numbers a person looks at first; O(samples) numpy over the index columns, no sample is read."""
    m, spec = reader.manifest, reader.spec
    shards_in_view = np.unique(reader.locate(reader._view())[0])
    on_disk = sum(info.bytes for info in reader.infos)
    n_all = max(1, reader.n_total)
    fb: Counter = Counter()
    for info in reader.infos:
        fb.update(info.field_bytes)
    uniq, members = group_by_bucket(reader.buckets())
    buckets = {f"{h}x{w}": len(mm) for (h, w), mm in zip(uniq.tolist(), members)}
    col = reader._view_column
    return CacheSummary(
        root=getattr(reader, "url", None) or str(reader.root),
        format=spec.format,
        schema_version=m.schema_version,
        samples=len(reader),
        shards=int(shards_in_view.size),
        bytes_on_disk=on_disk,
        bytes_per_sample_on_disk=on_disk / n_all,
        views=list(spec.views),
        dtypes={"vae": spec.vae_dtype, "clip": spec.clip_dtype, "t5": spec.t5_dtype},
        scaling_factor=m.vae_scaling_factor,
        buckets=dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        tokens={
            "clip_len": _stats(col("clip_len")),
            "t5_len": _stats(col("t5_len")),
            "t5_unique_rows": _stats(col("t5_unique")),
        },
        bytes_per_sample_by_field={k: v / n_all for k, v in sorted(fb.items(), key=lambda kv: -kv[1])},
        rejects=dict(m.rejects),
    )


# ---------------------------------------------------------------------------------------------------------------
# decoding for people


def load_vae(reader: CacheReader, vae_path: str | Path | None = None):
    """The reader's VAE (an AutoencoderKL, or a folder loaded now and kept on the reader)."""
    if vae_path is not None:
        reader._vae = vae_path
    vae = reader._vae
    if vae is None:
        raise ValueError(
            "decode needs a VAE: open_cache(root, vae=PATH_OR_MODEL) or decode(i, vae_path=PATH) "
            "(the sdxl-vae-fp16-fix folder of ckpts/t2i)"
        )
    if isinstance(vae, (str, Path)):
        from diffusers import AutoencoderKL  # lazy: diffusers costs seconds to import; only decoding pays for it

        vae = AutoencoderKL.from_pretrained(str(vae)).eval()
        reader._vae = vae
    return vae


def decode_image(reader: CacheReader, i: int | str, vae_path: str | Path | None = None, view: str = "plain"):
    """Decode sample i's posterior mean through the VAE decoder into a PIL image.

    The moments are unscaled (latent_dist parameters), so the mean goes to vae.decode as is: no scaling factor.
    """
    import torch  # lazy: `import shared.cache` / `shared.inspection` stay torch-free (summary, verify, synthetic)

    spec = reader.spec
    if view not in spec.views:
        raise ValueError(f"view {view!r} is not in this cache; it has {list(spec.views)}")
    vae = load_vae(reader, vae_path)
    s = reader.to_torch(reader[i])
    mom = s["moments"][spec.views.index(view)]  # (2C, h, w)
    mean = mom[: spec.latent_channels][None]  # (1, C, h, w)
    p = next(vae.parameters())
    with torch.inference_mode():
        img = vae.decode(mean.to(p.device, p.dtype)).sample[0]  # (3, H, W) in [-1, 1]
    arr = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def decode_grid(
    reader: CacheReader, indices: Sequence[int], vae_path: str | Path | None = None, cell: int = 256, cols: int = 4
):
    """A PIL grid of decoded samples with (the start of) their captions below each."""
    rows = (len(indices) + cols - 1) // cols
    cap_h = 28
    canvas = Image.new("RGB", (cols * cell, max(1, rows) * (cell + cap_h)), "white")
    draw = ImageDraw.Draw(canvas)
    font = cjk_font(14)  # None: captions that are not ASCII are labelled by their key instead of by boxes
    for n, i in enumerate(indices):
        im = decode_image(reader, i, vae_path=vae_path)
        im.thumbnail((cell, cell))
        x, y = (n % cols) * cell, (n // cols) * (cell + cap_h)
        canvas.paste(im, (x, y))
        s = reader[i]
        label = s["caption"] if font is not None or s["caption"].isascii() else s["key"]
        label = label if len(label) <= 40 else label[:39] + "..."
        draw.text((x + 2, y + cell + 2), label, fill="black", font=font)
    return canvas


_CJK_FONT_GLOBS = (
    "NotoSansCJK*",
    "NotoSerifCJK*",
    "wqy-*",
    "DroidSansFallback*",
    "SourceHanSans*",
    "simhei*",
    "msyh*",
    "PingFang*",
)


def cjk_font(size: int):
    """A TrueType font with CJK glyphs from the usual system folders, or None (PIL's own font has none)."""
    for folder in (
        "/usr/share/fonts",
        "/usr/local/share/fonts",
        str(Path.home() / ".fonts"),
        "/System/Library/Fonts",
        "C:/Windows/Fonts",
    ):
        if not os.path.isdir(folder):
            continue
        for pattern in _CJK_FONT_GLOBS:
            for path in sorted(Path(folder).rglob(pattern)):
                try:
                    return ImageFont.truetype(str(path), size)
                except OSError:
                    continue
    return None


# ---------------------------------------------------------------------------------------------------------------
# synthetic caches (tests, benches, smoke runs)


def _random_sample(spec: CacheSpec, i: int, bucket: tuple[int, int], rng: np.random.Generator) -> dict:
    return synthetic_sample(spec, f"synthetic-{i:08d}-{i:012x}", bucket, rng, caption=f"样本 {i}: a synthetic caption")


def _random_empty(spec: CacheSpec, bucket: tuple[int, int], rng: np.random.Generator) -> dict:
    return synthetic_sample(spec, "empty", bucket, rng, caption="", clip_len=2, t5_len=1)


def _structured_sample(spec: CacheSpec, i: int, bucket: tuple[int, int], rng: np.random.Generator) -> dict:
    """Latents a DiT can learn (smooth per-sample patterns, the flip view mirrored); text states random but fixed
    per sample; float32 VAE moments and BERT states, float16 mT5 states (the spec's storage casts them)."""
    h, wd = bucket
    lh, lw = h // spec.downsample, wd // spec.downsample
    yy, xx = np.meshgrid(np.linspace(-1, 1, lh), np.linspace(-1, 1, lw), indexing="ij")
    base = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy, xx - yy]).astype(np.float32)
    mean = np.stack([base, base[:, :, ::-1]])  # (V, C, h, w): flip view mirrored
    logvar = np.full_like(mean, -4.0)
    moments = np.concatenate([mean, logvar], axis=1)[: len(spec.views)]
    n_clip, n_t5 = 2 + i % 5, 1 + i % 7
    clip_mask = np.arange(spec.clip_len) < n_clip
    t5_mask = np.arange(spec.t5_len) < n_t5
    clip_states = rng.standard_normal((spec.clip_len, spec.clip_dim)).astype(np.float32) * clip_mask[:, None]
    t5_states = rng.standard_normal((spec.t5_len, spec.t5_dim)).astype(np.float16)
    return {
        "key": f"syn-{i:08d}-{i:012x}",
        "caption": f"caption {i}",
        "bucket": np.array([h, wd], np.int32),
        "image_meta_size": np.array([wd, h, wd, h, 0, 0], np.int32),
        "moments": moments.astype(np.float32),
        "clip_ids": np.where(clip_mask, 5 + i, 0).astype(np.int32),
        "clip_mask": clip_mask,
        "clip_states": clip_states,
        "t5_ids": np.where(t5_mask, 7 + i, 1).astype(np.int32),
        "t5_mask": t5_mask,
        "t5_states": t5_states,
    }


def _structured_empty(spec: CacheSpec, bucket: tuple[int, int], rng: np.random.Generator) -> dict:
    em_clip = np.arange(spec.clip_len) < 2
    em_t5 = np.arange(spec.t5_len) < 1
    return {
        "clip_ids": np.where(em_clip, 3, 0).astype(np.int32),
        "clip_mask": em_clip,
        "clip_states": (rng.standard_normal((spec.clip_len, spec.clip_dim)) * em_clip[:, None]).astype(np.float32),
        "t5_ids": np.where(em_t5, 2, 1).astype(np.int32),
        "t5_mask": em_t5,
        "t5_states": rng.standard_normal((spec.t5_len, spec.t5_dim)).astype(np.float16),
    }


_SYNTHETIC = {"random": (_random_sample, _random_empty), "structured": (_structured_sample, _structured_empty)}


def write_synthetic_cache(
    root: str | Path,
    spec: CacheSpec,
    n_samples: int = 16,
    n_shards: int = 2,
    buckets: Sequence[tuple[int, int]] = ((64, 64), (64, 32)),
    seed: int = 0,
    scaling_factor: float = 0.13025,
    encoders: dict | None = None,
    latents: Literal["random", "structured"] = "random",
    shard_names: str = "part-{:06d}",
) -> Manifest:
    """A complete small cache (shards, empty caption, manifest) of synthetic samples, sample i in bucket
    buckets[i % len(buckets)], one seeded generator for everything. `latents`: "random" (synthetic_sample: random
    features of a real sample's structure, for cache tests and benches) or "structured" (latents a DiT can learn,
    for stage-2 runs). `encoders`: the fingerprint dict to record (None: {"synthetic": {"seed": seed}}). Not a
    substitute for real features."""
    if latents not in _SYNTHETIC:
        raise ValueError(f"latents={latents!r}: allowed {sorted(_SYNTHETIC)}")
    make_sample, make_empty = _SYNTHETIC[latents]
    rng = np.random.default_rng(seed)
    per = [n_samples // n_shards + (1 if s < n_samples % n_shards else 0) for s in range(n_shards)]
    i = 0
    for s, n in enumerate(per):
        with open_shard_writer(root, shard_names.format(s), spec) as w:
            for _ in range(n):
                w.add(make_sample(spec, i, tuple(buckets[i % len(buckets)]), rng))
                i += 1
    e = make_empty(spec, tuple(buckets[0]), rng)
    sha = write_empty_caption(root, spec, **{k: e[k] for k in _EMPTY_FIELDS})
    m = manifest_from_shards(
        root,
        spec,
        encoders=encoders if encoders is not None else {"synthetic": {"seed": seed}},
        vae_scaling_factor=scaling_factor,
        buckets=[list(b) for b in buckets],
        preprocessing={"synthetic": True, "seed": seed},
        empty_caption_sha256=sha,
    )
    write_manifest(root, m)
    return m
