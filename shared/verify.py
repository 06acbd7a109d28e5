"""Re-read a whole cache: shard checksums, every sample's crc and schema, the empty caption, stray files."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .cache import _open_shard_reader, read_empty_caption
from .formats import shard_format
from .fsutil import file_sha256, is_tmp_name, tree_bytes, tree_sha256
from .manifest import (
    EMPTY_CAPTION_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    LegacyIndexError,
    completed_shards,
    read_manifest,
    read_shard_info,
    shard_data_path,
)
from .schema import CorruptSampleError, check_stored
from .shard_index import INDEX_SUFFIX, ShardIndex
from .storage import is_remote

MAX_SAMPLE_ERRORS_PER_SHARD = 20


@dataclass
class VerifyReport:
    root: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards_checked: int = 0
    samples_checked: int = 0
    bad_shards: list[str] = field(default_factory=list)
    bad_samples: list[tuple[str, str]] = field(default_factory=list)  # (shard, key)

    @property
    def ok(self) -> bool:
        return not self.errors

    def __str__(self) -> str:
        head = (
            f"verify {self.root}: {'OK' if self.ok else 'FAILED'} - {self.shards_checked} shards, "
            f"{self.samples_checked} samples, {len(self.errors)} errors, {len(self.warnings)} warnings"
        )
        return "\n".join([head] + [f"  ERROR {e}" for e in self.errors] + [f"  warning {w}" for w in self.warnings])


def _bad_shard(rep: VerifyReport, name: str, msg: str) -> None:
    rep.errors.append(f"shard {name!r}: {msg}")
    if name not in rep.bad_shards:
        rep.bad_shards.append(name)


def scaling_factor_problem(m) -> str | None:
    """The manifest's vae_scaling_factor against the VAE config its encoder fingerprint records (None = agree or
    nothing recorded). The factor multiplies every latent in training, so an edited one trains on wrong scales."""
    recorded = ((m.encoders or {}).get("vae") or {}).get("config", {}).get("scaling_factor")
    if recorded is None:
        return None
    have = m.vae_scaling_factor
    if have is None or not math.isclose(float(have), float(recorded), rel_tol=1e-6, abs_tol=0.0):
        return (
            f"{MANIFEST_NAME}: vae_scaling_factor={have!r} but the VAE config recorded in encoders.vae.config says "
            f"scaling_factor={recorded!r} (manifest edited?)"
        )
    return None


def _index_problem(shard, data_nbytes: int) -> str | None:
    """What is wrong with a shard's index file, from its size and header (a stat and one small read), and what its
    format checks of its columns (webdataset: every member inside the tar)."""
    path = shard.index_path
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if shard.index_nbytes_expected >= 0 and size != shard.index_nbytes_expected:
        return (
            f"{path} has {size} bytes, its sidecar says {shard.index_nbytes_expected} (truncated, grown or "
            "swapped with another shard's)"
        )
    try:
        _ = shard.mapped.columns  # maps the file and parses its header: a damaged one raises here
        return shard_format(shard.format).index_problem(shard, data_nbytes)
    except (CorruptSampleError, KeyError) as e:
        return f"{path}: {e}"
    return None


def _empty_caption_problems(root: Path, m, spec) -> list[str]:
    """The empty caption against its recorded sha256 and the spec (a wrong checksum is reported, then the file is
    still read so that what is wrong inside it is named too)."""
    ec = root / EMPTY_CAPTION_NAME
    if not ec.is_file():
        return [f"{ec} is missing (needed for CFG text dropout)"]
    out = []
    if m.empty_caption_sha256 and file_sha256(ec) != m.empty_caption_sha256:
        out.append(f"{ec}: sha256 differs from the manifest's empty_caption.sha256 (corrupt or replaced)")
    try:
        read_empty_caption(root, spec)
    except Exception as e:  # safetensors-level garbage raises several types
        out.append(f"{ec}: {e}")
    return out


def check_structure(reader) -> VerifyReport:
    """What stage 2 checks at start-up, in seconds whatever the cache size: every listed shard exists with the byte
    count the manifest records (webdataset: every member inside the file), the empty caption matches its recorded
    sha256 and the spec, the scaling factor matches the VAE config, and the first sample reads back (catches a
    manifest spec edit: dtypes and views apply to every shard). Sample bytes are checked as they are read (crc)."""
    root, m, spec = reader.root, reader.manifest, reader.spec
    rep = VerifyReport(str(root))
    problem = scaling_factor_problem(m)
    if problem:
        rep.errors.append(problem)
    rep.errors += _empty_caption_problems(root, m, spec)
    remote = getattr(reader, "_source", None) is not None  # shard data is fetched on first use, not local yet
    for entry, shard in zip(m.shards, reader.shards):
        rep.shards_checked += 1
        if remote:  # the mirror's index files against the recorded sizes; sample bytes are checked as read (crc)
            problem = _index_problem(shard, int(entry["bytes"]))
            if problem:
                _bad_shard(rep, entry["name"], problem)
            continue
        path = shard_data_path(root, entry["name"], spec.format)
        if not path.exists():
            _bad_shard(rep, entry["name"], f"{path} is missing")
            continue
        nbytes = tree_bytes(path)
        if nbytes != entry["bytes"]:
            _bad_shard(
                rep,
                entry["name"],
                f"{path} has {nbytes} bytes, the manifest says {entry['bytes']} "
                "(truncated, grown or swapped with another shard)",
            )
            continue
        problem = _index_problem(shard, nbytes)
        if problem:
            _bad_shard(rep, entry["name"], problem)
    if rep.ok and len(reader) > 0:
        name, key = reader.origin(0)
        try:
            check_stored(reader.read_stored(0), spec, f"shard {name!r}")
        except Exception as e:  # any failure to read the very first sample
            rep.errors.append(
                f"shard {name!r}: first sample {key!r} does not read back with the manifest's spec "
                f"({type(e).__name__}: {e})"
            )
    return rep


def _verify_remote(url: str, progress: bool, check_samples: bool) -> VerifyReport:
    """A remote cache is verified from a full temporary download (every object, so stray objects are seen too)."""
    from .remote_cache import download_cache  # object storage only

    tmp = Path(tempfile.mkdtemp(prefix="hydit-verify-"))
    try:
        rep = verify_cache(download_cache(url, tmp / "cache"), progress=progress, check_samples=check_samples)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rep.root = url
    return rep


def verify_cache(root: str | Path, progress: bool = True, check_samples: bool = True) -> VerifyReport:
    """Check everything; never raises for a problem in the cache (it is reported), only for a bad argument."""
    if is_remote(root):
        return _verify_remote(str(root), progress, check_samples)
    root = Path(root)
    rep = VerifyReport(str(root))
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    shards_dir = root / SHARDS_DIR
    for p in sorted(list(shards_dir.glob(".tmp-*")) + list(root.glob(".tmp-*"))):
        rep.warnings.append(
            f"leftover temp file {p.relative_to(root)} from an interrupted write: ignored by readers, safe to delete"
        )
    try:
        m = read_manifest(root)
    except (FileNotFoundError, ValueError) as e:
        rep.errors.append(str(e))
        return rep
    spec = m.spec
    listed = {s["name"] for s in m.shards}
    try:
        complete = completed_shards(root)
    except LegacyIndexError as e:
        rep.errors.append(str(e))
        return rep
    for name in complete:
        if name not in listed:
            rep.warnings.append(f"shard {name!r} is complete on disk but not in {MANIFEST_NAME}: readers ignore it")
    if shards_dir.is_dir():
        for p in sorted(shards_dir.iterdir()):
            if is_tmp_name(p.name) or p.suffix in (".json", INDEX_SUFFIX):
                continue
            if p.stem not in listed and p.stem not in complete:
                rep.warnings.append(f"{p.relative_to(root)} has no shard index (never completed): ignored by readers")

    problem = scaling_factor_problem(m)
    if problem:
        rep.errors.append(problem)
    rep.errors += _empty_caption_problems(root, m, spec)

    total = sum(int(s["n_samples"]) for s in m.shards)
    bar = None
    if progress and check_samples:
        bar = tqdm(total=total, desc="verify", unit="sample")
    for entry in m.shards:
        name = entry["name"]
        rep.shards_checked += 1
        path = shard_data_path(root, name, spec.format)
        if not path.exists():
            _bad_shard(rep, name, f"{path.relative_to(root)} is missing")
            continue
        try:
            info = read_shard_info(root, name)
        except (FileNotFoundError, ValueError) as e:
            _bad_shard(rep, name, str(e))
            continue
        nbytes = tree_bytes(path)
        if nbytes != entry["bytes"]:
            _bad_shard(rep, name, f"{nbytes} bytes on disk, the manifest says {entry['bytes']} (truncated or grown)")
        sha = tree_sha256(path)
        if sha != entry["sha256"]:
            _bad_shard(
                rep,
                name,
                f"sha256 {sha[:12]}... differs from the manifest's {entry['sha256'][:12]}... "
                "(corrupt or rewritten); checking its samples",
            )
        if info.entry() != {k: entry.get(k) for k in info.entry()}:
            _bad_shard(rep, name, "its sidecar (shards/<name>.json) disagrees with the manifest")
        shard = ShardIndex(root, info)
        ipath = shard.index_path
        if not ipath.exists():
            _bad_shard(rep, name, f"{ipath.relative_to(root)} (its index file) is missing")
            continue
        if file_sha256(ipath) != info.index.get("sha256"):
            _bad_shard(
                rep, name, f"{ipath.relative_to(root)}: sha256 differs from its sidecar's (corrupt or rewritten)"
            )
            continue
        try:
            keys = shard.keys()
        except CorruptSampleError as e:
            _bad_shard(rep, name, str(e))
            continue
        if not check_samples:
            continue
        fmt = shard_format(spec.format)
        problem, readable = fmt.layout_problem(path, keys)
        if problem:
            _bad_shard(rep, name, problem)
        if not readable:
            continue
        rd = _open_shard_reader(root, spec, shard)
        n_err = 0
        for i in range(info.n_samples):
            try:
                check_stored(rd.read_stored(i), spec, f"shard {name!r}")
            except CorruptSampleError as e:
                n_err += 1
                rep.bad_samples.append((name, keys[i]))
                if name not in rep.bad_shards:
                    rep.bad_shards.append(name)
                if n_err <= MAX_SAMPLE_ERRORS_PER_SHARD:
                    rep.errors.append(str(e))
            rep.samples_checked += 1
            if bar is not None:
                bar.update(1)
        if n_err > MAX_SAMPLE_ERRORS_PER_SHARD:
            rep.errors.append(f"shard {name!r}: {n_err - MAX_SAMPLE_ERRORS_PER_SHARD} more bad samples not listed")
        if n_err == 0:
            problem = fmt.sequential_problem(path, spec, keys)
            if problem:
                _bad_shard(rep, name, problem)
    if bar is not None:
        bar.close()
    return rep


def report_json(rep: VerifyReport) -> str:
    return json.dumps({"ok": rep.ok, **rep.__dict__}, indent=1)
