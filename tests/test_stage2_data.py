"""Stage-2 data: bucket-pure, rank-disjoint, deterministic plans and reproducible per-sample draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage2_train.data import BucketBatchPlan, build_item, collate, draw_sample, sample_latent, sample_seed


def _plan(world=2, batch=2, seed=0):
    buckets = [(32, 32)] * 9 + [(32, 48)] * 6 + [(48, 32)] * 5
    return buckets, BucketBatchPlan(buckets, batch_size=batch, world_size=world, seed=seed)


def test_plan_is_bucket_pure_rank_disjoint_and_covers_the_epoch():
    buckets, plan = _plan()
    assert plan.batches_per_epoch == 3 + 2 + 2  # ceil(9/4) + ceil(6/4) + ceil(5/4)
    seen = set()
    for step in range(plan.batches_per_epoch):
        r0 = [i for _, _, i in plan.rank_items(step, 0)]
        r1 = [i for _, _, i in plan.rank_items(step, 1)]
        assert len({buckets[i] for i in r0 + r1}) == 1, "a global batch mixed buckets"
        assert not set(r0) & set(r1), "two ranks read the same sample in one step"
        seen |= set(r0) | set(r1)
    assert seen == set(range(len(buckets))), "an epoch must visit every sample"


def test_plan_is_deterministic_and_reshuffles_per_epoch():
    _, a = _plan(seed=5)
    _, b = _plan(seed=5)
    _, c = _plan(seed=6)
    n = a.batches_per_epoch
    first = [a.rank_items(s, 0) for s in range(n)]
    assert first == [b.rank_items(s, 0) for s in range(n)]
    assert first != [c.rank_items(s, 0) for s in range(n)]
    second = [[i for _, _, i in a.rank_items(s, 0)] for s in range(n, 2 * n)]
    assert [[i for _, _, i in f] for f in first] != second


def _reference_epoch_batches(buckets, global_batch, seed, epoch):
    """The per-sample Python loop BucketBatchPlan used before it was vectorised, kept verbatim as the reference:
    runs resume by step count, so the numpy plan must give these exact batches forever."""
    import math

    by_bucket = {}
    for index, bucket in enumerate(buckets):
        by_bucket.setdefault((int(bucket[0]), int(bucket[1])), []).append(index)
    members = [np.asarray(by_bucket[b], dtype=np.int64) for b in sorted(by_bucket)]
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for bucket_id, m in enumerate(members):
        order = rng.permutation(m)
        n = math.ceil(len(order) / global_batch) * global_batch
        order = np.resize(order, n)
        batches.extend((bucket_id, chunk) for chunk in order.reshape(-1, global_batch))
    return sorted(by_bucket), [batches[i] for i in rng.permutation(len(batches))]


@pytest.mark.parametrize("trial", range(6))
def test_numpy_plan_equals_the_reference_loop(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 3000))
    shapes = rng.choice([256, 512, 768, 1024, 1280], size=(int(rng.integers(1, 9)), 2))
    buckets = shapes[rng.integers(0, len(shapes), size=n)].astype(np.int32)  # (N, 2), as CacheReader.buckets()
    batch, world, seed = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 2**31))
    plan = BucketBatchPlan(buckets, batch_size=batch, world_size=world, seed=seed)
    ref_buckets, _ = _reference_epoch_batches(buckets.tolist(), batch * world, seed, 0)
    assert plan.buckets == ref_buckets
    for epoch in (0, 1, 7):
        _, want = _reference_epoch_batches([tuple(b) for b in buckets.tolist()], batch * world, seed, epoch)
        got = plan.epoch_batches(epoch)
        assert len(got) == len(want) == plan.batches_per_epoch
        for (gb, gi), (wb, wi) in zip(got, want):
            assert gb == wb and gi.dtype == wi.dtype and np.array_equal(gi, wi)
        for step in (0, plan.batches_per_epoch - 1):
            bucket, idx = plan.global_batch_at(epoch * plan.batches_per_epoch + step)
            assert bucket == ref_buckets[want[step][0]] and np.array_equal(idx, want[step][1])
    # a list of tuples (what callers passed before) gives the same plan as the array
    again = BucketBatchPlan([tuple(b) for b in buckets.tolist()], batch_size=batch, world_size=world, seed=seed)
    assert again.rank_items(3, world - 1) == plan.rank_items(3, world - 1)


def test_empty_cache_is_a_clear_error():
    with pytest.raises(ValueError, match="no samples"):
        BucketBatchPlan([], batch_size=1, world_size=1, seed=0)


def test_draws_depend_only_on_seed_step_slot_key():
    kw = dict(num_views=2, latent_shape=(4, 3, 5), random_flip=True, uncond_p=0.3, uncond_p_t5=0.3, num_timesteps=1000)
    a = draw_sample(1, 7, 2, "k", **kw)
    b = draw_sample(1, 7, 2, "k", **kw)
    assert (a.view, a.drop_clip, a.drop_t5, a.t) == (b.view, b.drop_clip, b.drop_t5, b.t)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.latent_eps, b.latent_eps)
    assert not torch.equal(a.noise, draw_sample(1, 8, 2, "k", **kw).noise)
    assert not torch.equal(a.noise, draw_sample(1, 7, 3, "k", **kw).noise)
    assert not torch.equal(a.noise, draw_sample(1, 7, 2, "j", **kw).noise)
    assert sample_seed(1, 7, 2, "k") != sample_seed(2, 7, 2, "k")


def test_draw_frequencies_views_dropout_and_timesteps():
    kw = dict(num_views=2, latent_shape=(1, 1, 1), random_flip=True, uncond_p=0.2, uncond_p_t5=0.5, num_timesteps=1000)
    draws = [draw_sample(0, s, 0, "key", **kw) for s in range(4000)]
    views = np.mean([d.view for d in draws])
    clip = np.mean([d.drop_clip for d in draws])
    t5 = np.mean([d.drop_t5 for d in draws])
    both = np.mean([d.drop_clip and d.drop_t5 for d in draws])
    ts = np.array([d.t for d in draws])
    assert abs(views - 0.5) < 0.03 and abs(clip - 0.2) < 0.03 and abs(t5 - 0.5) < 0.03
    assert abs(both - 0.1) < 0.02, "the two dropouts must be independent"
    assert ts.min() >= 0 and ts.max() <= 999 and abs(ts.mean() - 499.5) < 20
    no_flip = [draw_sample(0, s, 0, "key", **{**kw, "num_views": 1}).view for s in range(100)]
    assert set(no_flip) == {0}


def test_sample_latent_matches_diffusers_posterior_sample():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(8, 3, 5)
    moments[4:] = moments[4:] * 3 - 2
    moments[5, 0, 0] = -100.0  # below the clamp
    eps = torch.randn(4, 3, 5)
    dist = DiagonalGaussianDistribution(moments[None])
    want = (dist.mean + dist.std * eps[None])[0] * 0.13025
    torch.testing.assert_close(sample_latent(moments, eps, 0.13025), want, rtol=0, atol=0)


def test_build_item_substitutes_the_empty_caption_per_encoder():
    from stage2_train.data import DrawSettings

    sample = {
        "key": "a",
        "bucket": np.array([16, 16], np.int32),
        "image_meta_size": np.arange(6, dtype=np.int32),
        "moments": np.zeros((2, 8, 2, 2), np.float32),
        "clip_states": np.ones((8, 32), np.float32),
        "clip_mask": np.ones(8, bool),
        "t5_states": np.ones((12, 48), np.float16),
        "t5_mask": np.ones(12, bool),
    }
    empty = {
        "clip_states": torch.zeros(8, 32),
        "clip_mask": torch.zeros(8, dtype=torch.bool),
        "t5_states": torch.zeros(12, 48, dtype=torch.float16),
        "t5_mask": torch.zeros(12, dtype=torch.bool),
    }
    s = DrawSettings(seed=0, random_flip=True, uncond_p=0.5, uncond_p_t5=0.5, num_timesteps=1000, scaling_factor=1.0)
    outcomes = set()
    for step in range(40):
        item = build_item(sample, empty, s, step, 0)
        assert item["encoder_hidden_states"].sum().item() == (0 if item["drop_clip"] else 8 * 32)
        assert item["encoder_hidden_states_t5"].sum().item() == (0 if item["drop_t5"] else 12 * 48)
        assert item["encoder_hidden_states_t5"].dtype == torch.float16  # the stored dtype; widened on the device
        outcomes.add((item["drop_clip"], item["drop_t5"]))
    assert len(outcomes) == 4
    batch = collate([build_item(sample, empty, s, 0, i) for i in range(3)])
    assert batch["x_start"].shape == (3, 4, 2, 2) and batch["t"].dtype == torch.long and batch["bucket"] == (16, 16)


def test_ema_and_lr_schedule():
    import math

    from stage2_train.config import EMASection, ScheduleSection
    from stage2_train.optim import EMA, LRSchedule

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    for dtype in ("float32", "float16"):
        ema = EMA(model, EMASection(enable=True, decay=0.9, dtype=dtype))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        sd = ema.state_dict()
        assert sd["weight"].dtype == (torch.float16 if dtype == "float16" else torch.float32)
        # fp32: the EMA computes e + (1 - 0.9) * (w - e) (lerp), this test 0.9 * e + 0.1 * w: three roundings each,
        # every one at most half an ulp of a term no larger than |e| + |w|, so they differ by at most
        # 3 * eps * max(|e| + |w|) in absolute terms. Relative to the result, which can be near 0, they need not be
        # close at all: an rtol of 1e-6 failed for 2.5% of random inits. fp16 storage: the
        # shadow starts as fp16(e) and the average is rounded once to fp16: half an fp16 ulp each (2^-11 relative).
        w_scale = float((start["weight"].abs() + model.weight.detach().abs()).max())
        torch.testing.assert_close(
            sd["weight"].float(),
            (0.9 * start["weight"] + 0.1 * model.weight).float(),
            rtol=1e-3 if dtype == "float16" else 0,
            atol=1e-3 if dtype == "float16" else 3 * torch.finfo(torch.float32).eps * w_scale,
        )
        torch.testing.assert_close(sd["bias"].float(), start["bias"], rtol=1e-3, atol=1e-3)
        ema.load_state_dict({k: v * 0 for k, v in sd.items()})
        assert all(v.abs().sum() == 0 for v in ema.state_dict().values())

    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    cos = LRSchedule(
        opt,
        ScheduleSection(kind="cosine", warmup_steps=2, warmup_kind="linear", min_lr=0.1),
        base_lr=1.0,
        total_steps=12,
    )
    assert [round(cos.lr_at(s), 6) for s in (0, 1, 2, 7, 12)] == [0.5, 1.0, 1.0, round(0.1 + 0.9 * 0.5, 6), 0.1]
    log = LRSchedule(
        opt, ScheduleSection(warmup_steps=10, warmup_kind="log", warmup_min_lr=1e-6), base_lr=1e-4, total_steps=100
    )
    assert log.lr_at(0) == 1e-6 and log.lr_at(10) == 1e-4
    assert math.isclose(log.lr_at(4), 1e-6 + (1e-4 - 1e-6) * math.log(5) / math.log(10))
    log.step()
    state = log.state_dict()
    log.step()
    log.load_state_dict(state)
    assert log.step_count == 1 and opt.param_groups[0]["lr"] == log.lr_at(1)


@pytest.mark.exact
@pytest.mark.parametrize(
    "fmt,dtypes,workers",
    [("webdataset", ("float32", "float16", "bfloat16"), 2), ("zarr", ("bfloat16", "bfloat16", "float32"), 0)],
)
def test_compact_rows_expand_to_the_dense_batch_bit_identically(tmp_path, fmt, dtypes, workers):
    """The cache's loader sends compact stored rows and the step expands them (stage2_train.data.expand_batch): every
    tensor equals the dense path's (build_item + collate on the decoded sample), bit for bit, with flips, text
    dropout and offset noise. Exact by construction: the same generator streams, per-sample shapes and kernels."""
    from shared.cache import open_cache
    from shared.inspection import write_synthetic_cache
    from shared.schema import CacheSpec
    from stage2_train.data import CacheBatchSource, DrawSettings

    vae, clip, t5 = dtypes
    spec = CacheSpec(
        format=fmt,
        views=("plain", "flip"),
        clip_len=8,
        clip_dim=16,
        t5_len=12,
        t5_dim=24,
        vae_dtype=vae,
        clip_dtype=clip,
        t5_dtype=t5,
    )
    write_synthetic_cache(tmp_path / "c", spec, n_samples=12, n_shards=2, buckets=((16, 16), (16, 32)))
    reader = open_cache(tmp_path / "c")
    plan = BucketBatchPlan(reader.buckets(), batch_size=3, world_size=2, seed=5)
    settings = DrawSettings(
        seed=5,
        random_flip=True,
        uncond_p=0.4,
        uncond_p_t5=0.4,
        num_timesteps=1000,
        scaling_factor=0.13025,
        noise_offset=0.1,
    )
    src = CacheBatchSource(reader, plan, settings, rank=1, num_workers=workers, prefetch_factor=2, pin_memory=False)
    empty = reader.to_torch(reader.empty_caption())
    batches = src.batches(0, 6)
    drops = set()
    try:
        for step, got in enumerate(batches):
            want = collate(
                [
                    build_item(reader.to_torch(reader[i]), empty, settings, m, slot)
                    for m, slot, i in plan.rank_items(step, 1)
                ]
            )
            assert set(got) == set(want)
            for k, v in want.items():
                if isinstance(v, torch.Tensor):
                    assert got[k].dtype == v.dtype and torch.equal(got[k], v), (step, k)
                else:
                    assert got[k] == v, (step, k)
            drops |= {(a, b) for a, b in zip(want["drop_clip"], want["drop_t5"])}
    finally:
        batches.close()
    assert len(drops) >= 3 and step == 5
