"""Online encoding inside the step, as the original trainer does (VAE, BERT and mT5 run on every batch).

Not the way to train (that is what the cache is for); it exists to prove the cache loses nothing and to measure what
it saves: `OnlineBatchSource` makes exactly the draws `CacheBatchSource` makes (same plan, same per-sample generator,
see stage2_train.data), but encodes the chosen view and the (possibly dropped) captions in the step.

The image preprocessing is passed in (stage 1's pure functions in the tests and bench), so this module does not
depend on stage 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.schema import PreprocessedImage
from stage2_train.data import BucketBatchPlan, DrawSettings, collate, draw_sample, sample_latent, training_item


@dataclass
class RawSample:
    key: str
    image: Any  # whatever `preprocess` takes (encoded bytes, a PIL image)
    caption: str  # already cleaned (stripped, default caption substituted), as stage 1 encodes it


class OnlineBatchSource:
    """Batches of one rank, preprocessed and encoded on the fly.

    `per_sample=False` (the original's trainer): one VAE call on the step's chosen views, one BERT and one mT5 call
    on its (possibly dropped) captions. `per_sample=True`: each sample's views and caption are encoded on their own,
    and a dropped caption is "" encoded alone; these are the call shapes of stage 1 with `encoders.batch_size: 1` and
    of the empty-caption file. CPU kernels, and so the last bits of every encoder output, depend on the batch shape;
    with the same shapes the encoders compute bit-identical values, which is what lets a test compare cache and
    online training exactly instead of within a tolerance.
    """

    def __init__(
        self,
        samples: Sequence[RawSample],
        buckets: Sequence[tuple[int, int]],
        preprocess: Callable[[RawSample], PreprocessedImage],
        encoders: Any,
        plan: BucketBatchPlan,
        settings: DrawSettings,
        *,
        rank: int = 0,
        per_sample: bool = False,
    ) -> None:
        if len(samples) != len(buckets):
            raise ValueError(f"{len(samples)} samples but {len(buckets)} buckets")
        self.samples, self.buckets, self.preprocess = list(samples), list(buckets), preprocess
        self.encoders, self.plan, self.settings, self.rank = encoders, plan, settings, rank
        self.per_sample = per_sample

    def _encode_images(self, pre: list[PreprocessedImage], draws: list) -> torch.Tensor:
        """The chosen view of each sample -> (B, 2C, h, w) moments."""
        enc = self.encoders
        if self.per_sample:  # all of a sample's views in one call, as stage 1 encodes them
            return torch.stack([enc.encode_images(torch.from_numpy(p.views)).cpu()[d.view] for p, d in zip(pre, draws)])
        pixels = torch.from_numpy(np.stack([p.views[d.view] for p, d in zip(pre, draws)]))  # (B, 3, H, W)
        return enc.encode_images(pixels).cpu()

    def _encode_texts(self, texts: list[str], encoder: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Token ids/masks of `texts` and their states: (B, Lc, Dc) for encoder "clip", (B, Lt, Dt) for "t5"."""
        enc = self.encoders
        encode = enc.encode_clip if encoder == "clip" else enc.encode_t5
        toks, states = [], []
        for part in [[t] for t in texts] if self.per_sample else [texts]:
            tok = enc.tokenize(part)
            toks.append(tok)
            states.append(encode(tok[f"{encoder}_ids"], tok[f"{encoder}_mask"]).cpu())
        return {k: torch.cat([t[k] for t in toks]) for k in toks[0]}, torch.cat(states)

    def batch(self, micro_step: int) -> dict[str, Any]:
        s, enc = self.settings, self.encoders
        items = self.plan.rank_items(micro_step, self.rank)
        pre, draws = [], []
        for _, slot, index in items:
            sample = self.samples[index]
            p = self.preprocess(sample)
            num_views, _, height, width = p.views.shape
            f = enc.vae_downsample
            d = draw_sample(
                s.seed,
                micro_step,
                slot,
                sample.key,
                num_views=num_views,
                latent_shape=(enc.latent_channels, height // f, width // f),
                random_flip=s.random_flip,
                uncond_p=s.uncond_p,
                uncond_p_t5=s.uncond_p_t5,
                num_timesteps=s.num_timesteps,
                noise_offset=s.noise_offset,
            )
            pre.append(p)
            draws.append(d)
        moments = self._encode_images(pre, draws)  # (B, 2C, h, w)
        clip_texts = ["" if d.drop_clip else self.samples[i].caption for (_, _, i), d in zip(items, draws)]
        t5_texts = ["" if d.drop_t5 else self.samples[i].caption for (_, _, i), d in zip(items, draws)]
        clip_tok, clip_states = self._encode_texts(clip_texts, "clip")  # (B, Lc, Dc)
        t5_tok, t5_states = self._encode_texts(t5_texts, "t5")  # (B, Lt, Dt)
        out = []
        for b, ((_, _, index), p, d) in enumerate(zip(items, pre, draws)):
            out.append(
                training_item(
                    self.samples[index].key,
                    p.bucket,
                    d,
                    sample_latent(moments[b], d.latent_eps, s.scaling_factor),
                    {"clip_states": clip_states[b], "clip_mask": clip_tok["clip_mask"][b]},
                    {"t5_states": t5_states[b], "t5_mask": t5_tok["t5_mask"][b]},
                    np.asarray(p.image_meta_size),
                )
            )
        return collate(out)

    def batches(self, start_micro_step: int, end_micro_step: int) -> Iterator[dict[str, Any]]:
        for micro_step in range(start_micro_step, end_micro_step):
            yield self.batch(micro_step)
