"""Shard index sidecars (ShardInfo), the cache manifest, and the compatibility check stage 2 runs.

manifest.json is written LAST and atomically: its presence means the cache is complete. Before that, the sidecars
shards/<name>.json (each written after its shard was renamed into place) say which shards are complete, so a
restarted job resumes by completed shard (`completed_shards`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fsutil import atomic_write_json, is_tmp_name
from .schema import SCHEMA_VERSION, CacheSpec
from .shard_index import INDEX_SUFFIX, ShardIndex

MANIFEST_NAME = "manifest.json"
EMPTY_CAPTION_NAME = "empty_caption.safetensors"
REJECTS_NAME = "rejects.jsonl"
SHARDS_DIR = "shards"
SHARD_SUFFIX = {"zarr": ".zarr", "webdataset": ".tar"}


def shard_data_path(root: str | Path, name: str, fmt: str) -> Path:
    return Path(root) / SHARDS_DIR / f"{name}{SHARD_SUFFIX[fmt]}"


def shard_sidecar_path(root: str | Path, name: str) -> Path:
    return Path(root) / SHARDS_DIR / f"{name}.json"


LEGACY_INDEX_FIX = (
    "it was written by an older version with per-sample JSON sidecars; convert it in place (the "
    "shards stay as they are) with `python -m shared.cli upgrade-index CACHE`"
)


class LegacyIndexError(ValueError):
    """A sidecar of the old layout (per-sample lists in JSON, no columnar index file)."""


def shard_index_path(root: str | Path, name: str) -> Path:
    return Path(root) / SHARDS_DIR / f"{name}{INDEX_SUFFIX}"


@dataclass
class ShardInfo:
    """One completed shard: what shards/<name>.json holds. Per-shard facts only: the per-sample columns (keys,
    buckets, token lengths, member offsets) are in shards/<name>.index (see shared.shard_index), described by
    `index`."""

    name: str
    format: str
    n_samples: int
    bytes: int
    sha256: str
    field_bytes: dict[str, int] = field(default_factory=dict)  # raw stored bytes per field, summed over samples
    index: dict[str, Any] = field(default_factory=dict)  # {"file", "bytes", "sha256", "version"}
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        if "keys" in d and not d.get("index"):
            raise LegacyIndexError(f"shard {d.get('name')!r}: {LEGACY_INDEX_FIX}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def entry(self) -> dict:
        """The manifest's short line for this shard."""
        return {
            "name": self.name,
            "n_samples": self.n_samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "index_sha256": self.index.get("sha256"),
        }


def read_shard_info(root: str | Path, name: str) -> ShardInfo:
    p = shard_sidecar_path(root, name)
    try:
        return ShardInfo.from_dict(json.loads(p.read_text("utf-8")))
    except FileNotFoundError:
        raise FileNotFoundError(f"shard index {p} is missing: shard {name!r} was never completed") from None
    except LegacyIndexError as e:
        raise LegacyIndexError(f"{p}: {e}") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"shard index {p} is unreadable ({e}); delete the shard and its .json to re-encode it") from e


def completed_shards(root: str | Path) -> dict[str, ShardInfo]:
    """Shards whose data, index file and sidecar all exist (temp `.tmp-*` leftovers are ignored), by name, sorted.

    Stage 1 skips partitions whose shard name is in here when it resumes. A sidecar of the old layout raises
    LegacyIndexError (naming the upgrade command) rather than being silently re-encoded or ignored.
    """
    d = Path(root) / SHARDS_DIR
    out: dict[str, ShardInfo] = {}
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        if is_tmp_name(p.name):
            continue
        try:
            info = ShardInfo.from_dict(json.loads(p.read_text("utf-8")))
        except LegacyIndexError as e:
            raise LegacyIndexError(f"{p}: {e}") from None
        except (json.JSONDecodeError, TypeError, OSError):
            continue
        if info.name != p.stem or info.format not in SHARD_SUFFIX:
            continue
        if shard_data_path(root, info.name, info.format).exists() and shard_index_path(root, info.name).exists():
            out[info.name] = info
    return out


def count_rejects(root: str | Path) -> dict[str, int]:
    """Rejected inputs by reason, from rejects.jsonl (one JSON object per line with a "reason")."""
    p = Path(root) / REJECTS_NAME
    out: dict[str, int] = {}
    if not p.exists():
        return out
    for line in p.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        try:
            reason = str(json.loads(line).get("reason", "unknown"))
        except (json.JSONDecodeError, AttributeError):
            reason = "unreadable_reject_line"
        out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items()))


def encoders_hash(encoders: dict) -> str:
    """sha256 of the canonical JSON of an encoder-fingerprint dict (manifest.json's `encoders_hash`)."""
    return hashlib.sha256(json.dumps(encoders, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@dataclass
class Manifest:
    """Everything stage 2 must agree with stage 1 on, plus the shard list. See design.md "The cache contract"."""

    spec: CacheSpec
    shards: list[dict]  # ShardInfo.entry() per shard, in reading order
    encoders: dict = field(default_factory=dict)  # FrozenEncoders.fingerprint(): class, config, weights, dtype
    vae_scaling_factor: float | None = None
    buckets: list[list[int]] = field(default_factory=list)  # all resolution buckets the job could use, (H, W)
    preprocessing: dict = field(default_factory=dict)  # free dict from stage 1: resize filter, crop policy, seed...
    rejects: dict[str, int] = field(default_factory=dict)  # rejected inputs by reason
    empty_caption_sha256: str | None = None
    schema_version: int = SCHEMA_VERSION
    created_utc: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.spec.format

    @property
    def n_samples(self) -> int:
        return sum(int(s["n_samples"]) for s in self.shards)

    @property
    def encoders_hash(self) -> str:
        return encoders_hash(self.encoders)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "format": self.spec.format,
            "n_samples": self.n_samples,
            "spec": self.spec.to_dict(),
            "text": {
                "clip_len": self.spec.clip_len,
                "t5_len": self.spec.t5_len,
                "clip_pad_id": self.spec.clip_pad_id,
                "t5_pad_id": self.spec.t5_pad_id,
            },
            "latent": {
                "channels": self.spec.latent_channels,
                "downsample": self.spec.downsample,
                "scaling_factor": self.vae_scaling_factor,
                "stored": "posterior moments [mean, logvar], unscaled",
            },
            "dtypes": {"vae": self.spec.vae_dtype, "clip": self.spec.clip_dtype, "t5": self.spec.t5_dtype},
            "views": list(self.spec.views),
            "vae_scaling_factor": self.vae_scaling_factor,
            "encoders": self.encoders,
            "encoders_hash": self.encoders_hash,
            "buckets": [list(map(int, b)) for b in self.buckets],
            "preprocessing": self.preprocessing,
            "rejects": dict(self.rejects),
            "empty_caption": {"file": EMPTY_CAPTION_NAME, "sha256": self.empty_caption_sha256},
            "shards": self.shards,
            "created_utc": self.created_utc,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        ver = d.get("schema_version")
        if ver != SCHEMA_VERSION:
            raise ValueError(
                f"cache schema_version={ver!r} but this code reads version {SCHEMA_VERSION}; "
                "re-encode the cache or use a matching checkout"
            )
        try:
            return cls(
                spec=CacheSpec.from_dict(d["spec"]),
                shards=list(d["shards"]),
                encoders=d.get("encoders", {}),
                vae_scaling_factor=d.get("vae_scaling_factor"),
                buckets=d.get("buckets", []),
                preprocessing=d.get("preprocessing", {}),
                rejects=d.get("rejects", {}),
                empty_caption_sha256=(d.get("empty_caption") or {}).get("sha256"),
                schema_version=ver,
                created_utc=d.get("created_utc", ""),
                extra=d.get("extra", {}),
            )
        except KeyError as e:
            raise ValueError(f"manifest lacks the field {e}") from None

    # -- the check stage 2 runs ------------------------------------------------------------------------------
    def check_compatible(self, **expected: Any) -> None:
        check_manifest(self, expected)


def write_manifest(root: str | Path, manifest: Manifest, completed: dict[str, ShardInfo] | None = None) -> Path:
    """Write manifest.json atomically (call it last). Every listed shard must be complete on disk (or in
    `completed`: the shards already published to object storage, whose data is no longer staged locally)."""
    root = Path(root)
    done = completed_shards(root) if completed is None else completed
    for s in manifest.shards:
        info = done.get(s["name"])
        if info is None:
            raise ValueError(f"manifest lists shard {s['name']!r} but it is not complete under {root / SHARDS_DIR}")
        if info.entry() != {k: s.get(k) for k in info.entry()}:
            raise ValueError(f"manifest entry for shard {s['name']!r} disagrees with its sidecar")
    check_unique_keys(root, [done[s["name"]] for s in manifest.shards])
    if not manifest.created_utc:
        manifest.created_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = root / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


def check_unique_keys(root: str | Path, infos: list[ShardInfo]) -> None:
    """Raise ValueError if two shards hold the same key: sorts the 64-bit key hashes of the index files (8 bytes per
    sample, numpy) and compares the actual keys only where hashes collide."""
    shards = [ShardIndex(root, i) for i in infos]
    if not shards:
        return
    h = np.concatenate([s.column("key_hash") for s in shards])
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = np.flatnonzero(hs[1:] == hs[:-1])
    if same.size == 0:
        return
    starts = np.zeros(len(shards) + 1, dtype=np.int64)
    np.cumsum([s.n_samples for s in shards], out=starts[1:])

    def key(g: int) -> str:
        s = int(np.searchsorted(starts, g, side="right") - 1)
        return shards[s].key(g - int(starts[s]))

    groups: dict[int, set[int]] = {}
    for j in same.tolist():
        groups.setdefault(int(hs[j]), set()).update((int(order[j]), int(order[j + 1])))
    dup = []
    for members in groups.values():
        ks = [key(g) for g in sorted(members)]
        dup += sorted({k for k in ks if ks.count(k) > 1})
    if dup:
        raise ValueError(f"cache {root} has duplicate keys across shards, e.g. {dup[:5]}")


def read_manifest(root: str | Path) -> Manifest:
    root = Path(root)
    p = root / MANIFEST_NAME
    if not p.exists():
        n = len(completed_shards(root))
        raise FileNotFoundError(
            f"{p} does not exist: the cache is incomplete (stage 1 still running or died; "
            f"{n} completed shards). Re-run stage 1 to resume it."
        )
    try:
        d = json.loads(p.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from e
    return Manifest.from_dict(d)


def manifest_from_shards(root: str | Path, spec: CacheSpec, **kw: Any) -> Manifest:
    """A Manifest listing every completed shard under root in name order (stage 1's usual last step)."""
    shards = [info.entry() for info in completed_shards(root).values()]
    return Manifest(spec=spec, shards=shards, **kw)


# expected key (the cache's own name: a CacheSpec field or a manifest.json key) -> how to fix a mismatch
_SPEC_CHECKS = {
    **{k: f"model.{k}" for k in ("clip_len", "t5_len", "clip_dim", "t5_dim", "latent_channels")},
    "downsample": "the VAE",
    "views": "data.views / stage-1 flip setting",
    "format": "data.format",
    **{f"{e}_dtype": "the expected dtype" for e in ("vae", "clip", "t5")},
    **{f"{e}_pad_id": "the tokenizer settings" for e in ("clip", "t5")},
}
_CHECKS: dict[str, tuple[Any, str]] = {
    **{k: (lambda m, k=k: getattr(m.spec, k), fix) for k, fix in _SPEC_CHECKS.items()},
    "views": (lambda m: list(m.spec.views), _SPEC_CHECKS["views"]),
    "vae_scaling_factor": (lambda m: m.vae_scaling_factor, "the training config's scaling factor"),
    "encoders_hash": (lambda m: m.encoders_hash, "the encoder checkpoints (data.encoders_hash)"),
}


def check_manifest(manifest: Manifest, expected: dict) -> None:
    """Raise one ValueError naming every mismatch between the cache and what the consumer expects.

    Keys use the cache's names (clip_len, t5_len, clip_dim, t5_dim, latent_channels, downsample, encoders_hash, ...,
    as in CacheSpec and manifest.json); None values are skipped. `encoders` (a fingerprint dict) is compared encoder
    by encoder.
    """
    allowed = sorted(set(_CHECKS) | {"encoders"})
    unknown = sorted(set(expected) - set(allowed))
    if unknown:
        raise ValueError(f"check_manifest got unknown keys {unknown}; allowed: {allowed}")
    problems: list[str] = []
    for k, want in expected.items():
        if want is None:
            continue
        if k == "encoders":
            for enc in sorted(set(want) | set(manifest.encoders)):
                have_e, want_e = manifest.encoders.get(enc), want.get(enc)
                if encoders_hash(have_e) != encoders_hash(want_e):
                    diff = sorted(
                        kk
                        for kk in set(have_e or {}) | set(want_e or {})
                        if (have_e or {}).get(kk) != (want_e or {}).get(kk)
                    )
                    problems.append(
                        f"cache was encoded with a different {enc!r} encoder (differs in {diff}); "
                        "re-encode with the same checkpoints or point to the right cache"
                    )
            continue
        get, fix = _CHECKS[k]
        have = get(manifest)
        if isinstance(want, tuple):
            want = list(want)
        same = (
            (have is not None and math.isclose(float(have), float(want), rel_tol=1e-6, abs_tol=0.0))
            if k == "vae_scaling_factor"
            else have == want
        )
        if not same:
            problems.append(f"cache has {k}={have!r} but the model expects {k}={want!r}; re-encode or change {fix}")
    if problems:
        raise ValueError("cache is incompatible:\n  " + "\n  ".join(problems))
