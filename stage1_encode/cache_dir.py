"""The cache folder of a stage-1 run: config identity, the lock, fresh/resume/complete, leftovers, remote staging.

A re-run with an equal config (runtime sections `ray`/`log`/`storage` and the locations `output.root`/`encoders.root`
may differ: a copied cache resumes) skips completed shards; a finished cache (manifest.json present) is left alone.
`.tmp-*` leftovers of a killed run are removed before a resume encodes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import yaml

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from shared.config import config_to_dict, from_dict, save_config
from shared.fsutil import remove_tmp_leftovers
from shared.manifest import (
    EMPTY_CAPTION_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    ShardInfo,
    read_shard_info,
    shard_index_path,
)
from shared.remote_cache import remote_completed
from shared.storage import RemoteStore, default_dir
from stage1_encode.config import LOCATION_FIELDS, RUNTIME_SECTIONS, EncodeConfig

CONFIG_NAME = "encode_config.yaml"
LOG_NAME = "encode.log"
ENCODERS_NAME = "encoders.json"
LOCK_NAME = "encode.lock"  # flock: one job per cache (see CacheLock)
PARTS_DIR = "partitions"  # per-partition notes: rejects, substituted captions


class CacheConflictError(ValueError):
    """The output folder holds a cache made with a different config (or something that is not a cache)."""


# ----------------------------------------------------------------------------------------------------------------------
# Config identity and the output folder


def _content_part(d: dict) -> dict:
    """`d` (a config as a dict) without the runtime sections and the location fields."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in RUNTIME_SECTIONS}
    for section, key in LOCATION_FIELDS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def identity(cfg: EncodeConfig) -> dict:
    """The part of the config that defines the cache's content: not the runtime sections, not where the cache and
    the encoders are stored (a copied cache resumes in its new place; the encoders are checked by fingerprint)."""
    return _content_part(config_to_dict(cfg))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def config_diff(old: dict, new: dict) -> list[str]:
    """Human lines `key: old -> new` for every dotted key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def _load_saved_identity(root: Path) -> dict:
    return _saved_identity(yaml.safe_load((root / CONFIG_NAME).read_text(encoding="utf-8")) or {})


def _saved_identity(data: dict) -> dict:
    """The identity part of a saved encode_config.yaml."""
    try:  # keys added to the config since this cache was made compare as their defaults
        data = config_to_dict(from_dict(EncodeConfig, data))
    except (ValueError, TypeError):  # no longer a valid config (ConfigError is a ValueError): compared as written
        pass
    return _content_part(data)


_CACHE_ENTRIES = (
    CONFIG_NAME,
    MANIFEST_NAME,
    EMPTY_CAPTION_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    PARTS_DIR,
    ENCODERS_NAME,
    LOG_NAME,
)
# What may be in a folder without a config that is still ours (a fresh run killed before it wrote its config).
_OURS_WITHOUT_CONFIG = (LOG_NAME, LOCK_NAME)


class CacheLock:
    """An exclusive flock on `<root>/encode.lock`, held for the whole run.

    Two jobs never write one cache, so a job may delete the `.tmp-*` leftovers it finds: no live writer owns them.
    The kernel drops the lock when the process ends, SIGKILL included; the empty file stays (copying it is harmless).
    """

    def __init__(self, root: Path) -> None:
        self.fd: int | None = None
        if fcntl is None:  # pragma: no cover - no flock (Windows): one job per cache is then the user's to keep
            return
        try:
            fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return  # a folder nobody may write needs no lock (a finished cache on read-only storage)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CacheConflictError(
                f"{root}: another stage-1 job is writing this cache (it holds {LOCK_NAME}); wait for it to end or "
                "choose another output.root"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def _refuse_foreign(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise CacheConflictError(f"output.root {root} exists and is not a folder")
    if (
        root.is_dir()
        and not (root / CONFIG_NAME).is_file()
        and any(p.name not in _OURS_WITHOUT_CONFIG for p in root.iterdir())
    ):
        raise CacheConflictError(
            f"output.root {root} is not empty and is not a stage-1 cache (no {CONFIG_NAME}); refusing to write "
            "into it. Choose an empty or new folder."
        )


def prepare_output(root: Path, cfg: EncodeConfig, overwrite: bool) -> tuple[str, CacheLock]:
    """Decide what to do with the output folder: "fresh", "resume" or "complete", under the cache's lock (returned,
    held: release it when the run ends). Raises CacheConflictError."""
    _refuse_foreign(root)  # before anything is created in it, not even the lock file
    root.mkdir(parents=True, exist_ok=True)
    lock = CacheLock(root)
    try:
        return _prepare_locked(root, cfg, overwrite), lock
    except BaseException:
        lock.release()
        raise


def _prepare_locked(root: Path, cfg: EncodeConfig, overwrite: bool) -> str:
    _refuse_foreign(root)  # again: the folder may have changed before the lock was ours
    if (root / CONFIG_NAME).is_file():
        diff = config_diff(_load_saved_identity(root), identity(cfg))
        if not diff:
            return "complete" if (root / MANIFEST_NAME).is_file() else "resume"
        if not overwrite:
            raise CacheConflictError(
                f"{root} holds a cache made with a different config; changed:\n  "
                + "\n  ".join(diff)
                + "\nRe-run with the original config to resume, choose another output.root, or pass --overwrite "
                "to delete that cache and start over."
            )
    for name in _CACHE_ENTRIES:  # only what this job writes; never an unknown file
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.is_symlink() or p.exists():
            p.unlink()
    save_config(cfg, root / CONFIG_NAME)
    return "fresh"


def remove_leftovers(root: Path) -> list[Path]:
    """Delete the temp files and folders that writes killed mid-way left in the cache (caller holds the lock).

    Only this job's own temp names (`.tmp-<name>-<pid>-<hex>` from shared.fsutil, the config's
    `.encode_config.yaml.tmp`), only directly in the cache folder, shards/ and partitions/; symlinks are unlinked,
    never followed.
    """
    removed = []
    for folder in (root, root / SHARDS_DIR, root / PARTS_DIR):
        removed += remove_tmp_leftovers(folder)
    config_tmp = root / f".{CONFIG_NAME}.tmp"  # save_config's temp name
    if config_tmp.is_symlink() or config_tmp.is_file():
        config_tmp.unlink()
        removed.append(config_tmp)
    return removed


def staging_root(cfg: EncodeConfig) -> Path:
    """The local staging folder of a remote output.root: one per URL and machine (so that a staging_dir on a shared
    filesystem still gives each node its own folder, whose writers' pids can be checked); scratch, cleared by the
    driver at every start on its node, and of dead writers' temp files by every writer on the others."""
    digest = hashlib.sha256(cfg.output.root.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return default_dir(cfg.storage.staging_dir, "HYDIT_STAGING", "staging") / f"{digest}-{socket.gethostname()}"


def prepare_remote_output(store: RemoteStore, staging: Path, cfg: EncodeConfig, overwrite: bool) -> str:
    """prepare_output for an object-storage root: the same decisions from the remote listing.

    The staging folder is rebuilt from the remote state: the saved config, the encoders' fingerprint, and the
    sidecar and partition note of every completed shard (what the final manifest and rejects are built from)."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    names = set(store.listdir(""))
    state = "fresh"
    if CONFIG_NAME in names:
        saved = yaml.safe_load(store.read_bytes(CONFIG_NAME).decode("utf-8")) or {}
        diff = config_diff(_saved_identity(saved), identity(cfg))
        if not diff:
            state = "complete" if MANIFEST_NAME in names else "resume"
        elif not overwrite:
            raise CacheConflictError(
                f"{store.url} holds a cache made with a different config; changed:\n  "
                + "\n  ".join(diff)
                + "\nRe-run with the original config to resume, choose another output.root, or pass --overwrite "
                "to delete that cache and start over."
            )
    elif names - {LOG_NAME}:
        raise CacheConflictError(
            f"output.root {store.url} is not empty and is not a stage-1 cache (no "
            f"{CONFIG_NAME}); refusing to write into it. Choose an empty or new prefix."
        )
    save_config(cfg, staging / CONFIG_NAME)
    if state != "fresh" and LOG_NAME in names:  # the log is appended to, as in a local cache
        store.download_file(LOG_NAME, staging / LOG_NAME)
    if state == "fresh":
        for name in _CACHE_ENTRIES:  # only what this job writes; never an unknown object
            if name in names:
                store.remove(name)
        store.upload_file(staging / CONFIG_NAME, CONFIG_NAME)
    elif state == "complete":
        store.download_file(MANIFEST_NAME, staging / MANIFEST_NAME)
    else:
        if ENCODERS_NAME in names:
            store.download_file(ENCODERS_NAME, staging / ENCODERS_NAME)
        for name in remote_completed(store, cfg.output.format):
            _stage_shard_meta(store, staging, name)
            store.download_file(f"{PARTS_DIR}/{name}.json", staging / PARTS_DIR / f"{name}.json")
    return state


def _remote_done(store: RemoteStore, staging: Path, fmt: str) -> dict[str, ShardInfo]:
    """The shards complete on the store, described by their sidecars (staged locally when published or resumed)."""
    out = {}
    for name in remote_completed(store, fmt):
        if not (staging / SHARDS_DIR / f"{name}.json").exists():
            _stage_shard_meta(store, staging, name)
        out[name] = read_shard_info(staging, name)
    return out


def _stage_shard_meta(store: RemoteStore, staging: Path, name: str) -> None:
    """A completed remote shard's small files into the staging folder: its index file (the manifest is checked
    against every shard's keys) and its sidecar, sidecar last as on the store."""
    index = shard_index_path(staging, name)
    store.download_file(f"{SHARDS_DIR}/{index.name}", index)
    store.download_file(f"{SHARDS_DIR}/{name}.json", staging / SHARDS_DIR / f"{name}.json")
