"""A deterministic evaluation loss: the training loss over fixed cached samples, fixed timesteps and fixed noise.

The per-step training loss is dominated by its random timestep draw (a batch at t ~ 900 and one at t ~ 50 differ by
far more than a short fine-tune moves the model), so "the loss went down" read off training curves needs hundreds of
steps and is still noisy. `eval_loss` removes every random draw instead: the same samples (full captions, plain
view, VAE posterior mean), a stratified grid of timesteps covering [0, T), and noise from a generator seeded by
(seed, sample key, timestep slot). Two calls on the same weights give the same number bit for bit, so a before/after
difference is the weights' doing.

It draws only from its own generators (the global RNG and the training draws are untouched) and runs under
no_grad in eval mode, restoring the mode after. Cost: samples x timesteps forward passes, no backward.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def eval_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps at the centres of `count` equal strata of [0, num_timesteps)."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"timesteps={count}: allowed 1..{num_timesteps} (the schedule's length)")
    return [int((k + 0.5) * num_timesteps / count) for k in range(count)]


def eval_indices(num_samples_in_cache: int, count: int) -> list[int]:
    """`count` sample indices spread evenly over the cache (all of them if it holds fewer)."""
    if count < 1:
        raise ValueError(f"num_samples={count}: must be >= 1")
    if num_samples_in_cache <= count:
        return list(range(num_samples_in_cache))
    return sorted({round(float(x)) for x in np.linspace(0, num_samples_in_cache - 1, count)})


def _noise_seed(seed: int, key: str, slot: int) -> int:
    digest = hashlib.blake2b(f"eval-loss/{seed}/{slot}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def eval_loss(
    trainer: Any,
    reader: Any = None,
    *,
    indices: Sequence[int] | None = None,
    num_samples: int = 32,
    timesteps: int = 16,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Mean training loss (mse + vb, as the trainer's) of `trainer`'s current weights over a fixed evaluation set.

    `reader`: an open cache (shared.cache.open_cache); default: the trainer's data.cache. `indices`: the samples
    (default `num_samples` spread evenly over the cache). Every (sample, timestep) pair of the grid is one row; rows
    are batched per bucket. Under FSDP2 every rank must call it (the forward is collective); elsewhere any rank may.
    Returns {"loss", "mse", "vb", "per_timestep": [(t, loss)], "samples", "timesteps"}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if reader is None:
        from shared.cache import open_cache

        reader = open_cache(trainer.cfg.data.cache, storage=trainer.cfg.storage)
    if indices is None:
        indices = eval_indices(len(reader), num_samples)
    ts = eval_timesteps(trainer.diffusion.num_timesteps, timesteps)
    scaling_factor = float(reader.manifest.vae_scaling_factor)
    device, mcfg = trainer.device, trainer.model_config

    by_bucket: dict[tuple[int, int], list[dict[str, torch.Tensor]]] = {}
    for i in indices:
        s = reader.to_torch(reader[int(i)])
        moments = s["moments"][0].float()  # plain view, (2C, h, w)
        by_bucket.setdefault(tuple(int(v) for v in s["bucket"].tolist()), []).append(
            {
                "key": str(s["key"]),
                "x_start": moments[: moments.shape[0] // 2] * scaling_factor,  # the posterior mean, scaled
                "encoder_hidden_states": s["clip_states"].float(),
                "text_embedding_mask": s["clip_mask"].bool(),
                "encoder_hidden_states_t5": s["t5_states"].float(),
                "text_embedding_mask_t5": s["t5_mask"].bool(),
                "image_meta_size": s["image_meta_size"].float(),
            }
        )

    model = trainer.model
    was_training = model.training
    model.eval()
    call = trainer._model_call()
    rows: list[tuple[int, float, float]] = []  # (t, mse, vb) per (sample, timestep)
    try:
        with torch.no_grad():
            for (height, width), items in sorted(by_bucket.items()):
                cos, sin = trainer.rope.get(height, width, device)
                pairs = [(it, slot, t) for it in items for slot, t in enumerate(ts)]
                for start in range(0, len(pairs), batch_size):
                    chunk = pairs[start : start + batch_size]
                    x_start = torch.stack([it["x_start"] for it, _, _ in chunk]).to(device)
                    noise = torch.stack(
                        [
                            torch.randn(
                                it["x_start"].shape,
                                dtype=torch.float32,
                                generator=torch.Generator().manual_seed(_noise_seed(seed, it["key"], slot)),
                            )
                            for it, slot, _ in chunk
                        ]
                    ).to(device)
                    t = torch.tensor([t for _, _, t in chunk], dtype=torch.long, device=device)
                    kwargs = {
                        k: torch.stack([it[k] for it, _, _ in chunk]).to(device)
                        for k in (
                            "encoder_hidden_states",
                            "text_embedding_mask",
                            "encoder_hidden_states_t5",
                            "text_embedding_mask_t5",
                        )
                    }
                    kwargs.update(cos_cis_img=cos, sin_cis_img=sin)
                    if mcfg.size_cond:
                        kwargs["image_meta_size"] = torch.stack([it["image_meta_size"] for it, _, _ in chunk]).to(
                            device
                        )
                    if mcfg.use_style_cond:
                        kwargs["style"] = torch.zeros(len(chunk), dtype=torch.long, device=device)
                    terms = trainer.diffusion.training_losses(call, x_start, kwargs, t=t, noise=noise)
                    rows += zip(t.tolist(), terms["mse"].tolist(), terms["vb"].tolist())
    finally:
        model.train(was_training)

    arr = np.array(rows, dtype=np.float64)  # (rows, 3)
    per_t = [(t, float(arr[arr[:, 0] == t, 1:].sum(1).mean())) for t in ts]
    return {
        "loss": float(arr[:, 1:].sum(1).mean()),
        "mse": float(arr[:, 1].mean()),
        "vb": float(arr[:, 2].mean()),
        "per_timestep": per_t,
        "samples": len(indices),
        "timesteps": ts,
    }
