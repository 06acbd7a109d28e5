"""Batches for the DiT from a stage-1 cache: bucket-pure, rank-disjoint, and every random draw reproducible.

Every draw a training sample needs (which view, text dropout per encoder, the VAE posterior sample, the timestep and
the diffusion noise) comes from one torch.Generator seeded from (seed, micro_step, slot, key), see `draw_sample`.
Nothing depends on worker count, process, or what ran before, so (a) a resumed run makes the same draws as an
uninterrupted one and (b) a run that encodes online (stage2_train.online) makes exactly the draws the cached run
makes. The cache's workers send compact stored rows and the scalar draws; the step's side expands them and makes the
tensor draws on its device (see "Compact rows" below for what is identical on which device).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import math
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.diffusion import add_offset_noise
from pipeline.encoders import LOGVAR_RANGE
from shared.cache import CacheReader, group_by_bucket, open_cache
from shared.manifest import check_manifest
from shared.storage import StorageConfig
from shared.verify import check_structure, verify_cache
from stage2_train.batch_buffers import BatchBuffers, aligned, carve, keep_freed_memory
from stage2_train.config import CACHE_GEOMETRY, DataSection
from stage2_train.metrics import logger
from stage2_train.parallel import any_rank

# ----------------------------------------------------------------------------------------------------------------------
# Per-sample random draws


def sample_seed(seed: int, micro_step: int, slot: int, key: str) -> int:
    """63-bit seed from (run seed, global micro-step, position in the global batch, sample key)."""
    digest = hashlib.blake2b(f"{seed}/{micro_step}/{slot}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class SampleDraws:
    view: int  # index into the sample's views ("plain" = 0, "flip" = 1)
    drop_clip: bool  # use the empty caption's BERT encoding
    drop_t5: bool  # use the empty caption's mT5 encoding (independent of drop_clip)
    t: int  # diffusion timestep in [0, num_timesteps)
    latent_eps: torch.Tensor  # (C, h, w) fp32: standard normal for the VAE posterior sample
    noise: torch.Tensor  # (C, h, w) fp32: the diffusion noise (offset noise included)


def scalar_draws(
    g: torch.Generator, *, num_views: int, random_flip: bool, uncond_p: float, uncond_p_t5: float, num_timesteps: int
) -> tuple[int, bool, bool, int]:
    """(view, drop_clip, drop_t5, t): the first draws of a sample's stream (CPU generator), in this order."""
    u_view, u_clip, u_t5 = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    view = int(u_view < 0.5) if (random_flip and num_views > 1) else 0
    t = int(torch.randint(0, num_timesteps, (1,), generator=g).item())
    return view, u_clip < uncond_p, u_t5 < uncond_p_t5, t


def tensor_draws(
    g: torch.Generator, latent_shape: Sequence[int], noise_offset: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent_eps, noise): the tensor draws that follow `scalar_draws` in a sample's stream, on g's device."""
    shape = tuple(latent_shape)
    latent_eps = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
    noise = torch.randn(shape, generator=g, dtype=torch.float32, device=device)
    offset = torch.randn((shape[0], 1, 1), generator=g, dtype=torch.float32, device=device)
    return latent_eps, add_offset_noise(noise, offset, noise_offset)


def draw_sample(
    seed: int,
    micro_step: int,
    slot: int,
    key: str,
    *,
    num_views: int,
    latent_shape: Sequence[int],
    random_flip: bool,
    uncond_p: float,
    uncond_p_t5: float,
    num_timesteps: int,
    noise_offset: float = 0.0,
) -> SampleDraws:
    """All random draws of one training sample, always in this order and always all of them (CPU generator)."""
    g = torch.Generator().manual_seed(sample_seed(seed, micro_step, slot, key))
    view, drop_clip, drop_t5, t = scalar_draws(
        g,
        num_views=num_views,
        random_flip=random_flip,
        uncond_p=uncond_p,
        uncond_p_t5=uncond_p_t5,
        num_timesteps=num_timesteps,
    )
    latent_eps, noise = tensor_draws(g, latent_shape, noise_offset)
    return SampleDraws(view, drop_clip, drop_t5, t, latent_eps, noise)


def sample_latent(moments: torch.Tensor, eps: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """(2C, h, w) VAE posterior [mean, logvar] -> scaled latent (C, h, w) fp32, as `latent_dist.sample() * sf`.

    diffusers' DiagonalGaussianDistribution clamps the log-variance to LOGVAR_RANGE before sampling (the original
    calls latent_dist.sample()); stage 1 stores that clamped logvar, and the clamp is repeated here so that moments
    from anywhere else sample the same way."""
    mean, logvar = moments.float().chunk(2, dim=0)  # (C, h, w) each
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    return (mean + std * eps) * scaling_factor


# ----------------------------------------------------------------------------------------------------------------------
# Which samples each rank reads at each micro-step


class BucketBatchPlan:
    """Deterministic epoch plans of bucket-pure global batches, split into disjoint per-rank slices.

    Per epoch (seeded by (seed, epoch)): shuffle each bucket's sample indices, repeat them up to a multiple of the
    global batch (as the original's MultiResolutionBucketIndexV2 does), cut global batches, shuffle the batch order.
    Rank r reads slots [r*B, (r+1)*B) of every global batch. The position is just the global micro-step, so resuming
    needs nothing but the step count.

    Built in numpy (an (N, 2) bucket array in, no per-sample Python objects); only the current epoch's plan is held,
    as two arrays. The random draws and their order are those of the original per-sample loop (kept in
    tests/test_stage2_data.py as the reference), so existing runs resume to the same batches.
    """

    def __init__(self, buckets: Any, *, batch_size: int, world_size: int, seed: int) -> None:
        b = np.asarray(buckets, dtype=np.int64).reshape(-1, 2) if len(buckets) else np.zeros((0, 2), np.int64)
        if b.shape[0] == 0:
            raise ValueError("the cache holds no samples: run stage 1 on a non-empty corpus (see its rejects.jsonl)")
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.global_batch = batch_size * world_size
        uniq, self.members = group_by_bucket(b)
        self.buckets = [(int(h), int(w)) for h, w in uniq.tolist()]
        self.batches_per_epoch = sum(math.ceil(len(m) / self.global_batch) for m in self.members)
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """((batches,) bucket ids, (batches, global_batch) sample indices, int32 below 2**31 samples) for one epoch,
        in batch order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1], self._epoch_cache[2]
        self._epoch_cache = None  # free the previous epoch's plan before building this one
        rng = np.random.default_rng([self.seed, epoch])
        # The draws of the original loop, in its order: one permutation per bucket, then one of the batch order.
        # Each bucket's batches are written straight to their shuffled rows, so the epoch is built in one array.
        orders = []
        for members in self.members:
            orders.append(rng.permutation(members))  # int32 or int64 members: the same draws, the same values
        perm = rng.permutation(self.batches_per_epoch)
        dest = np.empty_like(perm)
        dest[perm] = np.arange(perm.size)  # row of the shuffled plan that unshuffled batch j goes to
        # int32 while positions fit (4 bytes per sample per epoch); callers get int64 rows, as before
        dt = np.int32 if sum(len(m) for m in self.members) < 1 << 31 else np.int64
        indices = np.empty((self.batches_per_epoch, self.global_batch), dtype=dt)
        bucket_ids = np.empty(self.batches_per_epoch, dtype=np.int64)
        first = 0
        for bucket_id, order in enumerate(orders):
            n = math.ceil(len(order) / self.global_batch) * self.global_batch
            k = n // self.global_batch
            indices[dest[first : first + k]] = np.resize(order, n).reshape(
                k, self.global_batch
            )  # repeats from the start
            bucket_ids[dest[first : first + k]] = bucket_id
            first += k
        self._epoch_cache = (epoch, bucket_ids, indices)
        return bucket_ids, indices

    def epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """[(bucket id, (global_batch,) sample indices)] for one epoch (a list view of `epoch_arrays`)."""
        bucket_ids, indices = self.epoch_arrays(epoch)
        return [(int(b), row.astype(np.int64)) for b, row in zip(bucket_ids.tolist(), indices)]

    def global_batch_at(self, micro_step: int) -> tuple[tuple[int, int], np.ndarray]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        bucket_ids, indices = self.epoch_arrays(epoch)
        return self.buckets[int(bucket_ids[position])], indices[position].astype(np.int64)

    def rank_items(self, micro_step: int, rank: int) -> list[tuple[int, int, int]]:
        """[(micro_step, slot in the global batch, sample index)] that `rank` reads at `micro_step`."""
        _, indices = self.global_batch_at(micro_step)
        start = rank * self.batch_size
        return [(micro_step, slot, int(indices[slot])) for slot in range(start, start + self.batch_size)]


class PlanSampler(torch.utils.data.Sampler):
    """Batch sampler over a BucketBatchPlan for one rank, from `start_step` to `end_step` (exclusive)."""

    def __init__(self, plan: BucketBatchPlan, *, rank: int, start_step: int, end_step: int) -> None:
        self.plan, self.rank, self.start_step, self.end_step = plan, rank, start_step, end_step

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for micro_step in range(self.start_step, self.end_step):
            yield self.plan.rank_items(micro_step, self.rank)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


# ----------------------------------------------------------------------------------------------------------------------
# From stored samples to model inputs


@dataclass
class DrawSettings:
    seed: int
    random_flip: bool
    uncond_p: float
    uncond_p_t5: float
    num_timesteps: int
    scaling_factor: float
    noise_offset: float = 0.0


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def build_item(
    sample: dict[str, Any], empty: dict[str, torch.Tensor], settings: DrawSettings, micro_step: int, slot: int
) -> dict[str, Any]:
    """One logical sample (torch tensors, bf16 already viewed back; see shared.schema.to_torch) -> one training item.

    `empty` holds the empty caption's clip_states/clip_mask/t5_states/t5_mask, substituted on text dropout: the
    original tokenises and encodes "" at that point, which is exactly what stage 1 stored. Text states keep the
    cache's dtype (half the bytes of fp32 through workers, pinned memory and the copy to the device); the trainer
    widens them to fp32 on the device, which is exact.
    """
    moments = _tensor(sample["moments"])  # (V, 2C, h, w)
    num_views, two_c, h, w = moments.shape
    key = str(sample["key"])
    d = draw_sample(
        settings.seed,
        micro_step,
        slot,
        key,
        num_views=num_views,
        latent_shape=(two_c // 2, h, w),
        random_flip=settings.random_flip,
        uncond_p=settings.uncond_p,
        uncond_p_t5=settings.uncond_p_t5,
        num_timesteps=settings.num_timesteps,
        noise_offset=settings.noise_offset,
    )
    return training_item(
        key,
        _tensor(sample["bucket"]).tolist(),
        d,
        sample_latent(moments[d.view], d.latent_eps, settings.scaling_factor),
        empty if d.drop_clip else sample,
        empty if d.drop_t5 else sample,
        sample["image_meta_size"],
    )


def training_item(
    key: str, bucket: Sequence[int], d: SampleDraws, x_start: torch.Tensor, clip: Any, t5: Any, image_meta_size: Any
) -> dict[str, Any]:
    """The item `collate` stacks, for the cache (build_item) and for online encoding (stage2_train.online) alike.
    `clip` / `t5`: mappings with clip_states + clip_mask / t5_states + t5_mask (the sample's, or the empty
    caption's on text dropout)."""
    return {
        "key": key,
        "bucket": tuple(int(v) for v in bucket),
        "view": d.view,
        "drop_clip": d.drop_clip,
        "drop_t5": d.drop_t5,
        "x_start": x_start,
        "t": d.t,
        "noise": d.noise,
        "encoder_hidden_states": _tensor(clip["clip_states"]),
        "text_embedding_mask": _tensor(clip["clip_mask"]).bool(),
        "encoder_hidden_states_t5": _tensor(t5["t5_states"]),
        "text_embedding_mask_t5": _tensor(t5["t5_mask"]).bool(),
        "image_meta_size": _tensor(image_meta_size).float(),
    }


# The dense batch's per-sample tensors, stacked by `collate` (besides t and style); the step moves these to the device.
STACKED_TENSORS = (
    "x_start",
    "noise",
    "encoder_hidden_states",
    "text_embedding_mask",
    "encoder_hidden_states_t5",
    "text_embedding_mask_t5",
    "image_meta_size",
)
BATCH_TENSORS = ("x_start", "t", *STACKED_TENSORS[1:], "style")


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    buckets = {it["bucket"] for it in items}
    assert len(buckets) == 1, f"a batch mixed buckets {buckets}"
    batch: dict[str, Any] = {"bucket": items[0]["bucket"]}
    for name in ("key", "view", "drop_clip", "drop_t5"):
        batch[name] = [it[name] for it in items]
    batch["t"] = torch.tensor([it["t"] for it in items], dtype=torch.long)
    for name in STACKED_TENSORS:
        batch[name] = torch.stack([it[name] for it in items])
    batch["style"] = torch.zeros(len(items), dtype=torch.long)  # the original only ever uses style 0
    batch["corrupt"] = [c for it in items for c in it.get("corrupt", ())]
    return batch


# ----------------------------------------------------------------------------------------------------------------------
# Compact rows: what the cache's DataLoader workers send, and the dense batch the step builds from them
#
# A worker reads the stored sample, makes the sample's scalar draws (view, text dropout, t: a few bytes that decide
# what to send) and sends the stored rows as they are: the chosen view's moments, the masked-in BERT rows and the
# distinct mT5 rows, with gather indices. The step side (`expand_batch`, on the step's device) pads the text by one
# gather, samples the latent and draws the noise. Through IPC and pinned memory go ~0.5 MB per 1024^2 sample instead
# of ~1.7 MB of dense fp32 latents, noise and padded text.
#
# Reproducibility contract. On a CPU step the tensor draws replay each sample's CPU stream (the same generator, the
# same seed, the same order, the same per-sample shapes and kernels as build_item), so every value is bit-identical
# to the dense path (tests/test_stage2_data.py). On a CUDA step the scalar draws still come from the CPU stream
# (so view, dropout and t are the same on every device), while latent_eps and noise come from a CUDA generator
# seeded with the same per-sample seed: reproducible for the same seeds on the same GPU model and torch version
# (torch's CUDA normal kernel spreads a Philox stream over a grid sized by the SM count), but not equal to the CPU
# values, as no CUDA generator reproduces CPU mt19937 streams.


def item_draws(settings: DrawSettings, micro_step: int, slot: int, key: str, num_views: int) -> tuple:
    """(seed, view, drop_clip, drop_t5, t): a sample's seed and scalar draws, which decide what a worker reads of it
    (only the drawn view's moments, no text rows of a dropped caption)."""
    seed = sample_seed(settings.seed, micro_step, slot, key)
    view, drop_clip, drop_t5, t = scalar_draws(
        torch.Generator().manual_seed(seed),
        num_views=num_views,
        random_flip=settings.random_flip,
        uncond_p=settings.uncond_p,
        uncond_p_t5=settings.uncond_p_t5,
        num_timesteps=settings.num_timesteps,
    )
    return seed, view, drop_clip, drop_t5, t


def compact_item(
    stored: dict[str, Any],
    empty: dict[str, np.ndarray],
    settings: DrawSettings,
    micro_step: int,
    slot: int,
    bf16_moments: bool,
    num_views: int | None = None,
    draws: tuple | None = None,
) -> dict[str, Any]:
    """One stored sample (numpy, as the reader returns it; bf16 as uint16) -> the compact item a worker sends.
    `stored`: a whole stored sample ("moments" (V, 2C, h, w)) or a part read (CacheReader.read_parts: "moments_view"
    of the drawn view, text rows only where the caption is kept; then `num_views` and its `draws` (item_draws) are
    given). `empty`: the empty caption's clip_mask and t5_mask, and clip_rows/t5_rows with no rows (`empty_rows`)."""
    key = str(stored["key"])
    if "moments_view" not in stored:
        num_views = stored["moments"].shape[0]
    assert num_views is not None
    seed, view, drop_clip, drop_t5, t = (
        draws if draws is not None else item_draws(settings, micro_step, slot, key, num_views)
    )
    if "moments_view" in stored:
        assert int(stored["view"]) == view, "a part read of another view than the sample's draw"
        moments = stored["moments_view"]
    else:
        moments = stored["moments"][view]
    mom = torch.from_numpy(np.ascontiguousarray(moments))
    if bf16_moments:
        mom = mom.view(torch.int16).view(torch.bfloat16)
    return {
        "key": key,
        "bucket": (int(stored["bucket"][0]), int(stored["bucket"][1])),
        "num_views": num_views,
        "seed": seed,
        "view": view,
        "drop_clip": drop_clip,
        "drop_t5": drop_t5,
        "t": t,
        "moments": mom,
        # a dropped caption sends no rows: the step gathers the empty caption's (kept on its device)
        "clip_rows": empty["clip_rows"] if drop_clip else stored["clip_rows"],
        "clip_mask": empty["clip_mask"] if drop_clip else stored["clip_mask"],
        "t5_rows": empty["t5_rows"] if drop_t5 else stored["t5_rows"],
        "t5_index": stored["t5_index"],
        "t5_mask": empty["t5_mask"] if drop_t5 else stored["t5_mask"],
        "image_meta_size": stored["image_meta_size"],
    }


def _torch_dtype(a: np.ndarray) -> torch.dtype:
    return torch.from_numpy(a[:0] if a.ndim else a.reshape(1)[:0]).dtype


class CompactCollate:
    """`collate_compact` with the batch written into storage from `buffers` (a BatchBuffers: a worker's reused
    shared memory); picklable, for DataLoader workers."""

    def __init__(self, buffers: BatchBuffers | None = None) -> None:
        self.buffers = buffers

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_compact(items, self.buffers)


def collate_compact(items: list[dict[str, Any]], buffers: BatchBuffers | None = None) -> dict[str, Any]:
    """Compact items -> one compact batch of four tensors: the stacked moments, per encoder the batch's rows back to
    back, and `small`, (B, 8 + 2 Lc + 2 Lt) int64 columns [t, seed, image_meta_size (6), clip gather (Lc), clip mask
    (Lc), t5 gather (Lt), t5 mask (Lt)]. A gather index points into [empty caption's L rows, (BERT only) one zero
    row, the batch's rows]. All four lie in ONE storage (one shared-memory mapping for the receiving process): from
    `buffers` if given (reused shared memory, see stage2_train/batch_buffers.py), else fresh shared memory in a
    DataLoader worker (as default_collate allocates its batches: the batch then reaches the main process without
    another copy), else plain memory."""
    buckets = {it["bucket"] for it in items}
    assert len(buckets) == 1, f"a batch mixed buckets {buckets}"
    B = len(items)
    Lc, Lt = items[0]["clip_mask"].shape[0], items[0]["t5_mask"].shape[0]
    batch: dict[str, Any] = {
        "compact": True,
        "micro_step": items[0].get("micro_step", -1),
        "bucket": items[0]["bucket"],
        "num_views": items[0]["num_views"],
        "text_lens": (Lc, Lt),
    }
    for name in ("key", "view", "drop_clip", "drop_t5"):
        batch[name] = [it[name] for it in items]
    # one storage, four tensors: where each lies
    mom0 = items[0]["moments"]
    clip_parts = [it["clip_rows"] for it in items]
    t5_parts = [it["t5_rows"] for it in items]
    shapes = {
        "moments": ((B, *mom0.shape), mom0.dtype),
        "small": ((B, 8 + 2 * Lc + 2 * Lt), torch.int64),
        "clip_rows": ((sum(p.shape[0] for p in clip_parts), clip_parts[0].shape[1]), _torch_dtype(clip_parts[0])),
        "t5_rows": ((sum(p.shape[0] for p in t5_parts), t5_parts[0].shape[1]), _torch_dtype(t5_parts[0])),
    }
    offsets, nbytes = {}, 0
    for name, (shape, dtype) in shapes.items():
        offsets[name] = nbytes
        nbytes += aligned(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    if buffers is not None:
        storage = buffers.storage(int(batch["micro_step"]), nbytes)
    elif torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(max(1, nbytes))
    else:
        storage = torch.UntypedStorage(max(1, nbytes))
    out = {name: carve(storage, offsets[name], shape, dtype) for name, (shape, dtype) in shapes.items()}

    small = out["small"].numpy()
    small[:, 0] = [it["t"] for it in items]
    small[:, 1] = [it["seed"] for it in items]
    small[:, 2:8] = [it["image_meta_size"] for it in items]
    col = 8
    for enc, L, first, parts in (("clip", Lc, 1, clip_parts), ("t5", Lt, 0, t5_parts)):
        gather, mask = small[:, col : col + L], small[:, col + L : col + 2 * L]
        col += 2 * L
        start = L + first  # BERT: row L of the table is the zero row of padded positions
        for b, it in enumerate(items):
            rows = parts[b]
            mask[b] = it[f"{enc}_mask"]
            if it[f"drop_{enc}"]:
                gather[b] = np.arange(L)
                continue
            if enc == "clip":
                gather[b] = L
                gather[b, it["clip_mask"]] = start + np.arange(rows.shape[0])
            else:
                gather[b] = it["t5_index"].astype(np.int64) + start  # int64 first: uint16 + start overflows
            start += rows.shape[0]
        # the rows back to back, one copy; bf16 stays uint16 (viewed on the step)
        np.concatenate(parts, out=out[f"{enc}_rows"].numpy())
        batch[f"{enc}_rows"] = out[f"{enc}_rows"]
    batch["small"] = out["small"]
    torch.stack([it["moments"] for it in items], out=out["moments"])
    batch["moments"] = out["moments"]
    batch["corrupt"] = [c for it in items for c in it.get("corrupt", ())]
    return batch


def batch_capacity(spec: Any, buckets: Any, batch_size: int) -> int:
    """The largest compact batch (bytes, as collate_compact lays it out) of `batch_size` samples over `buckets`:
    every text row kept, the largest bucket."""

    def itemsize(encoder: str) -> int:
        return np.dtype(spec.storage_dtype(encoder)).itemsize

    moments = max(2 * spec.latent_channels * (h // spec.downsample) * (w // spec.downsample) for h, w in buckets)
    return (
        aligned(batch_size * moments * itemsize("vae"))
        + aligned(batch_size * (8 + 2 * spec.clip_len + 2 * spec.t5_len) * 8)
        + aligned(batch_size * spec.clip_len * spec.clip_dim * itemsize("clip"))
        + aligned(batch_size * spec.t5_len * spec.t5_dim * itemsize("t5"))
    )


def empty_table(empty: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The rows `collate_compact`'s gather indices start with, on the step's device: the empty caption's dense
    states (cache dtype) and, for BERT, one zero row for the padded positions (stored BERT rows are masked-in only,
    and padded positions read back as zeros, as shared.schema.decode_sample gives them)."""
    clip = empty["clip_states"]
    return {
        "clip": torch.cat([clip, clip.new_zeros((1, clip.shape[1]))]).to(device),
        "t5": empty["t5_states"].to(device),
    }


def expand_batch(
    batch: dict[str, Any], table: dict[str, torch.Tensor], settings: DrawSettings, device: torch.device | str
) -> dict[str, Any]:
    """A compact batch -> the dense batch `collate` makes (every tensor on `device`): text padded by one gather per
    encoder, the latent sampled from the moments and the noise drawn, per sample from its seed (see the contract
    above). On CPU the values are bit-identical to build_item's; nothing here waits for the device."""
    device = torch.device(device)
    nb = device.type == "cuda"  # from pinned memory: the copies overlap the previous step's kernels
    out: dict[str, Any] = {k: batch[k] for k in ("bucket", "key", "view", "drop_clip", "drop_t5", "corrupt")}
    Lc, Lt = batch["text_lens"]
    small = batch["small"].to(device, non_blocking=nb)
    col = 8
    for enc, L, states, mask in (
        ("clip", Lc, "encoder_hidden_states", "text_embedding_mask"),
        ("t5", Lt, "encoder_hidden_states_t5", "text_embedding_mask_t5"),
    ):
        rows = batch[f"{enc}_rows"]
        if table[enc].dtype == torch.bfloat16:
            rows = rows.view(torch.bfloat16)  # stored as the uint16 bit pattern
        rows = rows.to(device, non_blocking=nb)
        out[states] = torch.cat([table[enc], rows])[small[:, col : col + L]]
        out[mask] = small[:, col + L : col + 2 * L].bool()
        col += 2 * L
    out["t"] = small[:, 0].clone()  # never a view of the compact batch: its memory is reused once released
    out["image_meta_size"] = small[:, 2:8].float()  # small integers: exact
    out["style"] = torch.zeros(small.shape[0], dtype=torch.long, device=device)  # the original only uses style 0
    seeds, t_cpu = batch["small"][:, 1].tolist(), batch["small"][:, 0].tolist()
    moments = batch["moments"].to(device, non_blocking=nb)
    _, two_c, h, w = moments.shape
    latent_shape = (two_c // 2, h, w)
    x_start, noise = [], []
    for b, seed in enumerate(seeds):
        if device.type == "cpu":  # replay the sample's CPU stream: its scalar draws come first
            g = torch.Generator().manual_seed(seed)
            again = scalar_draws(
                g,
                num_views=batch["num_views"],
                random_flip=settings.random_flip,
                uncond_p=settings.uncond_p,
                uncond_p_t5=settings.uncond_p_t5,
                num_timesteps=settings.num_timesteps,
            )
            assert again == (batch["view"][b], batch["drop_clip"][b], batch["drop_t5"][b], t_cpu[b]), (
                "the step's replay of a sample's draws disagrees with its worker's"
            )
        else:
            g = torch.Generator(device=device).manual_seed(seed)
        eps, n = tensor_draws(g, latent_shape, settings.noise_offset, device)
        x_start.append(sample_latent(moments[b], eps, settings.scaling_factor))
        noise.append(n)
    out["x_start"], out["noise"] = torch.stack(x_start), torch.stack(noise)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The cache as a batch source


def open_train_cache(data: DataSection, storage: StorageConfig) -> CacheReader:
    """data.cache opened (a local folder, or s3:// mirrored through `storage`); a missing cache names the key."""
    try:
        return open_cache(data.cache, storage=storage)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.cache={data.cache!r}: {err}") from None


def check_cache_against_model(manifest: Any, model_config: Any, cache_path: str, encoders_hash: str = "") -> float:
    """Fail fast, saying how to fix it, if the cache cannot feed this model; returns the VAE scaling factor."""
    expected: dict[str, Any] = {name: getattr(model_config, f) for name, f in CACHE_GEOMETRY.items()}
    if encoders_hash:
        expected["encoders_hash"] = encoders_hash
    try:
        check_manifest(manifest, expected)
    except ValueError as err:
        raise ValueError(
            f"data.cache={cache_path!r} does not fit the model: {err}\n"
            "Fix: leave model.clip_len / t5_len / clip_dim / t5_dim / latent_channels unset (the cache's manifest "
            "supplies them) or point data.cache at a cache encoded for this model."
        ) from None
    if manifest.vae_scaling_factor is None:
        raise ValueError(
            f"data.cache={cache_path!r}: the manifest has no vae_scaling_factor; re-run stage 1 "
            "(the factor must come from the VAE that encoded the cache, never from a constant)"
        )
    return float(manifest.vae_scaling_factor)


def check_cache_integrity(reader: Any, mode: str, cache_path: str, info: Any) -> None:
    """data.verify at start-up: "structure" (every rank, seconds), "full" (rank 0 re-reads every byte first, every
    rank gets the verdict), "none". Raises ValueError listing the damaged files."""
    if mode == "none":
        return
    rep = check_structure(reader)
    if mode == "full" and rep.ok:
        ok = True
        if info.is_main:
            rep = verify_cache(reader.root, progress=False)
            ok = rep.ok
        if any_rank(not ok, info) and not info.is_main:
            raise ValueError(f"data.cache={cache_path!r} failed `verify` on rank 0 (see its message)")
    if not rep.ok:
        raise ValueError(
            f"data.cache={cache_path!r} is damaged (data.verify={mode}):\n  "
            + "\n  ".join(rep.errors[:20])
            + f"\nRun `python -m shared.cli verify {cache_path}` for the full report; re-encode the named shards "
            "with stage 1 (resume re-encodes what is missing)"
        )


class CorruptCacheError(RuntimeError):
    """More corrupt samples met during training than data.max_corrupt_samples allows."""


# What reading one stored sample may raise when its bytes are damaged: the schema's CorruptSampleError (crc, shape,
# dtype), the codecs' errors on garbage (zstd raises RuntimeError), truncated or missing files (OSError, EOFError),
# bad offsets (IndexError, KeyError). Only the read is guarded: an error in the training code itself still raises.
_READ_ERRORS = (ValueError, RuntimeError, OSError, EOFError, IndexError, KeyError)


class CacheDataset(torch.utils.data.Dataset):
    """Map-style over (micro_step, slot, index) triples from PlanSampler; picklable for DataLoader workers. Items are
    compact (`compact_item`); `collate_compact` batches them and the step expands them (`expand_batch`).

    A sample that cannot be read is replaced by a substitute from the same bucket (see `_substitute`) and reported
    in the item's "corrupt" list; CacheBatchSource counts them against data.max_corrupt_samples.
    """

    def __init__(self, reader: Any, settings: DrawSettings, plan: BucketBatchPlan | None = None) -> None:
        self.reader, self.settings, self.plan = reader, settings, plan
        self._empty: dict[str, torch.Tensor] | None = None
        self._empty_rows: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.reader)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_empty": None, "_empty_rows": None}  # each worker reads the small file itself

    def empty_caption(self) -> dict[str, torch.Tensor]:
        """The empty caption's dense encodings (torch, cache dtype), for the step's gather table."""
        if self._empty is None:
            self._empty = self.reader.to_torch(self.reader.empty_caption())
        return self._empty

    def empty_rows(self) -> dict[str, np.ndarray]:
        """What a dropped caption sends: the empty caption's masks and no rows (the step holds its states)."""
        if self._empty_rows is None:
            e = self.reader.empty_caption()
            self._empty_rows = {
                "clip_mask": e["clip_mask"],
                "t5_mask": e["t5_mask"],
                "clip_rows": e["clip_states"][:0],
                "t5_rows": e["t5_states"][:0],
            }
        return self._empty_rows

    def _read(self, index: int, micro_step: int, slot: int) -> tuple[dict[str, Any], tuple]:
        """(the parts of the stored sample its draws need, crc checked by the reader; its draws). Rows are not
        decoded: they travel compact. The draws come first (from the key in the shard's index): they say which view
        to read."""
        n_views = self.reader.spec.n_views
        draws = item_draws(self.settings, micro_step, slot, self.reader.key(index), n_views)
        # The text rows are read and checked even when the caption is dropped (~10% more text decoding): damage
        # there is then caught on the sample's first read, as before the part reads; only the view not drawn is
        # left unread (verify checks it).
        return self.reader.read_parts(index, draws[1], clip=True, t5=True), draws

    def _substitute(self, micro_step: int, slot: int, index: int, bad: set[int]) -> Iterator[int]:
        """Candidates replacing unreadable sample `index`: the other members of its bucket, walked from a start that
        depends only on (seed, micro_step, slot).

        Substituting (rather than dropping the sample) keeps every batch bucket-pure and of the configured size on
        every rank, so all ranks run the same shapes and the same collectives, the loss keeps its normalisation, and
        the choice is a pure function of the plan position and of which samples are damaged: a resumed run picks the
        same substitutes.
        """
        if self.plan is None:
            return
        bucket = tuple(int(v) for v in self.reader.bucket_of(index))
        members = self.plan.members[self.plan.buckets.index(bucket)]
        start = sample_seed(self.settings.seed, micro_step, slot, "substitute") % len(members)
        for k in range(len(members)):
            candidate = int(members[(start + k) % len(members)])
            if candidate != index and candidate not in bad:
                yield candidate

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        micro_step, slot, index = item
        corrupt: list[tuple[str, str, str]] = []
        try:
            sample, draws = self._read(index, micro_step, slot)
        except _READ_ERRORS as err:
            shard, key = self.reader.origin(index)
            corrupt.append((shard, key, f"{type(err).__name__}: {err}"))
            sample, bad = None, {index}
            for candidate in self._substitute(micro_step, slot, index, bad):
                try:
                    sample, draws = self._read(candidate, micro_step, slot)
                    break
                except _READ_ERRORS as err2:
                    bad.add(candidate)
                    shard, key = self.reader.origin(candidate)
                    corrupt.append((shard, key, f"{type(err2).__name__}: {err2}"))
            if sample is None:
                raise CorruptCacheError(
                    f"no readable sample left in bucket {tuple(self.reader.bucket_of(index))}: "
                    + "; ".join(f"shard {s!r} sample {k!r}: {r}" for s, k, r in corrupt[:5])
                    + f". Check the cache with `python -m shared.cli verify {self.reader.root}`"
                ) from None
        out = compact_item(
            sample,
            self.empty_rows(),
            self.settings,
            micro_step,
            slot,
            self.reader.spec.vae_dtype == "bfloat16",
            num_views=self.reader.spec.n_views,
            draws=draws,
        )
        out["corrupt"] = corrupt
        out["micro_step"] = micro_step  # which batch it belongs to (its buffer's release, see batch_buffers.py)
        return out


def _worker_init(release: Any, worker_id: int) -> None:
    """SIGTERM in a loader worker: ignored while the training process runs, fatal once it has released its workers.

    torchrun's (and schedulers') SIGTERM reaches the whole process group: the training process decides when to stop
    (after saving a checkpoint) and shuts its workers down itself, so a worker must not die first. But once the
    training process is exiting, on success or on an error, it sets `release`: multiprocessing's exit handler then
    SIGTERMs and joins daemonic children with no timeout, and a worker still ignoring SIGTERM would hang the exit
    forever.
    """

    def on_sigterm(signum: int, frame: Any) -> None:
        if release.value:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    keep_freed_memory()  # the worker's per-sample buffers reuse their pages (see batch_buffers.py)


def _set_flag(flag: Any) -> None:
    flag.value = 1


class _Batches:
    """The batch iterator of one CacheBatchSource.batches() call: counts corrupt samples, expands each compact batch
    on the step's device, closes its workers."""

    def __init__(
        self,
        loader: torch.utils.data.DataLoader,
        release: Any,
        max_corrupt: int,
        cache: str,
        after_batch: Callable[[], None] | None = None,
        expand: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        release_batch: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._it: Any = iter(loader)
        self._expand, self._release_batch = expand, release_batch
        self._release, self.max_corrupt, self.cache = release, max_corrupt, cache
        self._after_batch = after_batch  # remote caches: queue the shards of the coming steps for download
        self.corrupt_seen = 0

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        if self._after_batch is not None:
            self._after_batch()
        for shard, key, reason in batch.get("corrupt", ()):
            self.corrupt_seen += 1
            logger.warning(
                "corrupt sample %r in shard %r (%s): replaced by another sample of its bucket "
                "(%d of at most data.max_corrupt_samples=%d)",
                key,
                shard,
                reason,
                self.corrupt_seen,
                self.max_corrupt,
            )
            if self.corrupt_seen > self.max_corrupt:
                raise CorruptCacheError(
                    f"data.cache={self.cache!r}: shard {shard!r} sample {key!r} is corrupt ({reason}); "
                    f"{self.corrupt_seen} corrupt samples so far, more than data.max_corrupt_samples="
                    f"{self.max_corrupt}. Check the cache with `python -m shared.cli verify {self.cache}` and "
                    "re-encode the bad shards (or raise data.max_corrupt_samples)"
                )
        if self._expand is None:
            return batch
        dense = self._expand(batch)
        if self._release_batch is not None:
            self._release_batch(batch)
        return dense

    def close(self) -> None:
        """Stop the loader workers now (also on an error path, where the iterator may outlive the loop)."""
        self._release.value = 1
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's own orderly shutdown of its worker processes
        if shutdown is not None:
            shutdown()


class CacheBatchSource:
    """Batches of one rank read from a stage-1 cache through a DataLoader (workers prefetch ahead of the step)."""

    def __init__(
        self,
        reader: Any,
        plan: BucketBatchPlan,
        settings: DrawSettings,
        *,
        rank: int,
        num_workers: int,
        prefetch_factor: int,
        pin_memory: bool,
        max_corrupt_samples: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.reader, self.plan, self.settings, self.rank = reader, plan, settings, rank
        self.device = torch.device(device)  # where the step runs: compact batches are expanded there
        self._table: dict[str, torch.Tensor] | None = None
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.max_corrupt_samples = max_corrupt_samples
        self.dataset = CacheDataset(reader, settings, plan)
        # each worker's reused shared memory for its batches: prefetch_factor in flight, one being expanded, one spare
        self.buffers = BatchBuffers(
            batch_capacity(reader.spec, plan.buckets, plan.batch_size), per_worker=prefetch_factor + 2
        )
        self.collate = CompactCollate(self.buffers)
        # Shared with the workers (see _worker_init); set at interpreter exit at the latest. atexit runs handlers
        # last-in first-out, so this one runs before multiprocessing's, which terminates and joins the workers.
        self._release = multiprocessing.RawValue("b", 0)
        atexit.register(_set_flag, self._release)

    @classmethod
    def from_config(
        cls,
        data: DataSection,
        *,
        reader: CacheReader,
        model_config: Any,
        info: Any,
        seed: int,
        batch_size: int,
        num_timesteps: int,
        noise_offset: float,
        device: torch.device,
    ) -> CacheBatchSource:
        """The data section and what it needs from the run: the opened cache (`open_train_cache`), the model config
        it must fit, the rank layout, the run seed, the per-rank batch size, the diffusion's step count and offset
        noise, and the step's device (pinned memory on CUDA only)."""
        scaling_factor = check_cache_against_model(reader.manifest, model_config, data.cache, data.encoders_hash)
        check_cache_integrity(reader, data.verify, data.cache, info)
        if data.random_flip and "flip" not in reader.spec.views:
            logger.warning(
                "data.random_flip is set but the cache holds only the plain view: no flips will happen "
                "(encode with flip views in stage 1 to get them)"
            )
        # one pass over the cache-wide bucket column (8 bytes per sample, freed once the plan is built)
        plan = BucketBatchPlan(reader.buckets(), batch_size=batch_size, world_size=info.world_size, seed=seed)
        step = reader.spec.downsample * model_config.patch_size
        for height, width in plan.buckets:
            if height % step or width % step:
                raise ValueError(
                    f"data.cache={data.cache!r} has bucket {height}x{width}, which is not a multiple of "
                    f"VAE downsample x patch size = {step} in both sides; re-encode with buckets aligned to {step} "
                    "(stage 1's align / reso_step)"
                )
        settings = DrawSettings(
            seed=seed,
            random_flip=data.random_flip,
            uncond_p=data.uncond_p,
            uncond_p_t5=data.uncond_p_t5,
            num_timesteps=num_timesteps,
            scaling_factor=scaling_factor,
            noise_offset=noise_offset,
        )
        source = cls(
            reader,
            plan,
            settings,
            rank=info.rank,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            pin_memory=data.pin_memory and device.type == "cuda",
            max_corrupt_samples=data.max_corrupt_samples,
            device=device,
        )
        source.encoders_hash = reader.manifest.encoders_hash
        return source

    def batches(self, start_micro_step: int, end_micro_step: int) -> Iterator[dict[str, Any]]:
        sampler = PlanSampler(self.plan, rank=self.rank, start_step=start_micro_step, end_step=end_micro_step)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            worker_init_fn=functools.partial(_worker_init, self._release),
        )
        self._release.value = 0
        self.buffers.reset(start_micro_step)
        return _Batches(
            loader,
            self._release,
            self.max_corrupt_samples,
            str(self.reader.root),
            self._shard_prefetch(start_micro_step, end_micro_step),
            self.expand,
            self.release,
        )

    def expand(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A compact batch from the loader -> the dense batch on the step's device (`expand_batch`)."""
        if self._table is None:
            self._table = empty_table(self.dataset.empty_caption(), self.device)
        return expand_batch(batch, self._table, self.settings, self.device)

    def release(self, batch: dict[str, Any]) -> None:
        """The compact batch is expanded and no longer read: its worker may write a later batch into its memory.
        (The dense batch shares no memory with it: expand_batch copies or computes every tensor it returns; on a
        CUDA step with pinned memory the pinning thread copied it before, and a non-pinned copy reads the host
        memory before returning.)"""
        self.buffers.release(int(batch.get("micro_step", -1)))

    def _shard_prefetch(self, start: int, end: int) -> Callable[[], None] | None:
        """A cache on object storage: the plan says which shards this rank reads in the coming micro-steps; they are
        queued for download (into the node's shared shard cache) ahead of the DataLoader workers that read them.
        Returns what to call after each batch (None for a local cache)."""
        source = getattr(self.reader, "_source", None)
        if source is None:
            return None
        reader, ahead = self.reader, max(1, self.num_workers) * self.prefetch_factor + 1
        state = {"queued": start, "step": start}

        def queue_until(step: int) -> None:
            names: list[str] = []
            for m in range(state["queued"], min(step, end)):
                for _, _, index in self.plan.rank_items(m, self.rank):
                    s, _ = reader.locate(reader._global(int(index)))
                    name = reader.infos[int(s)].name
                    if name not in names:
                        names.append(name)
            state["queued"] = max(state["queued"], min(step, end))
            if names:
                source.prefetch(names)

        def after_batch() -> None:
            queue_until(state["step"] + 1 + ahead)
            state["step"] += 1

        queue_until(start + ahead)
        return after_batch
