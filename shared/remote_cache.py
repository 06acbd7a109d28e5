"""Reading a cache that lives on object storage: a local mirror of its small files plus a bounded shard cache.

    mirror = RemoteCacheMirror("s3://bucket/cache", storage_cfg)
    local_root = mirror.prepare()      # manifest, empty caption, every shard's small files (sidecar, index)
    mirror.ensure("part-000003")       # the shard's data as ONE whole object into the local cache (LRU, bounded)

The local mirror is an ordinary cache folder, so the normal local readers read it; only shard DATA is fetched on
demand. Which files belong to a shard is not interpreted here: every object named `shards/<name>.*` other than the
data object is a small file fetched at prepare time, so the index layout can change without touching this module.

Small files in one GET. Publishing writes `small_files.tar` just before the manifest: every shard's sidecar and
index, plus the sha256 of the manifest they belong to. `prepare` fetches that one object instead of two per shard
(a 64-sample shard otherwise costs 3 GETs, 0.047 per sample, for its sidecar, index and data); a bundle that does
not name the manifest just read (absent, or left by an earlier cache at this URL) is ignored and the files are
fetched one by one. Members are plain files named `shards/<shard>.<ext>` of shards the manifest lists; anything
else is refused, and nothing in it is unpickled.

A sequential reader need not wait for a whole shard: `follow(name)` has this process's prefetch thread fetch it
first and returns a file object that reads the bytes already written to the download's temp file (then the final
file), so the stream decodes a cold worker's first shard while the rest of it arrives. The reader gets exactly the
object's bytes in order; a failed download raises its storage error (naming the object) from the read.

Several processes on one node (DataLoader workers, ranks) share one mirror: a shard is downloaded under a temp name
and renamed into place while its file lock is held, so it is fetched once and never seen half-written. Eviction
(least recently used first, by the mtime every `ensure` refreshes) keeps the shard data under `cache_max_gb`; a
shard used in the last `min_idle_s` seconds is never evicted, so a reader in another process is not pulled out from
under (a reader that already holds a file open keeps reading it in any case: POSIX unlink semantics).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .fsutil import atomic_write_bytes, is_tmp_name, remove_path, tmp_path_for, tree_bytes
from .manifest import EMPTY_CAPTION_NAME, MANIFEST_NAME, SHARD_SUFFIX, SHARDS_DIR, shard_data_path
from .storage import MissingObjectError, RemoteStore, StorageConfig, default_dir

LOCKS_DIR = ".locks"
SMALL_FILES_NAME = "small_files.tar"
_BUNDLE_MANIFEST = "manifest.sha256"  # the first member: which manifest the bundle's files belong to


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RemoteCacheMirror:
    """See the module docstring. Picklable: DataLoader workers get their own store connection."""

    min_idle_s = 30.0

    def __init__(self, url: str, cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg or StorageConfig()
        self.store = RemoteStore(url, self.cfg)
        self.url = self.store.url
        digest = hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]
        self.root = default_dir(self.cfg.cache_dir, "HYDIT_SHARD_CACHE", "shards") / digest
        self.format: str | None = None
        self._prefetcher: _Prefetcher | None = None

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_prefetcher"] = None
        return d

    @property
    def max_bytes(self) -> int:
        return int(self.cfg.cache_max_gb * 1024**3)

    # -- metadata -------------------------------------------------------------------------------------------
    def prepare(self) -> Path:
        """Bring the manifest and every shard's small files to the local mirror; returns its root.

        One GET when nothing changed (the manifest is compared byte for byte); a new manifest (the cache was
        rewritten) clears the mirror first, so old shards can never be read against a new index."""
        self.root.mkdir(parents=True, exist_ok=True)
        raw = self.store.read_bytes(MANIFEST_NAME)
        try:
            manifest = json.loads(raw)
            fmt = manifest["format"]
            names = [s["name"] for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.store.url_of(MANIFEST_NAME)} is not a readable manifest ({e})") from e
        if fmt not in SHARD_SUFFIX:
            raise ValueError(f"{self.store.url_of(MANIFEST_NAME)}: unknown format {fmt!r}")
        self.format = fmt
        local_manifest = self.root / MANIFEST_NAME
        with file_lock(self.root / LOCKS_DIR / "meta.lock"):
            if local_manifest.is_file() and local_manifest.read_bytes() == raw:
                return self.root
            for p in list(self.root.iterdir()):  # another cache was written at this URL: start the mirror over
                if p.name != LOCKS_DIR:
                    remove_path(p)
            self.store.download_file(EMPTY_CAPTION_NAME, self.root / EMPTY_CAPTION_NAME)
            want = set(names)
            if not self._small_files_from_bundle(raw, want, fmt):
                for entry in self.store.listdir(SHARDS_DIR):
                    if _small_file_owner(entry, want, fmt) is not None:
                        self.store.download_file(f"{SHARDS_DIR}/{entry}", self.root / SHARDS_DIR / entry)
            missing = sorted(n for n in names if not (self.root / SHARDS_DIR / f"{n}.json").exists())
            if missing:
                raise MissingObjectError(
                    f"object {self.store.url_of(f'{SHARDS_DIR}/{missing[0]}.json')} does not "
                    f"exist: the manifest lists {len(missing)} shard(s) without an index"
                )
            atomic_write_bytes(local_manifest, raw)  # last: its presence means the mirror's metadata is complete
        return self.root

    def _small_files_from_bundle(self, manifest_raw: bytes, want: set[str], fmt: str) -> bool:
        """Extract small_files.tar into the mirror if it belongs to this manifest; False to fetch file by file."""
        tmp = tmp_path_for(self.root / SMALL_FILES_NAME)
        try:
            try:
                self.store.download_file(SMALL_FILES_NAME, tmp)
            except MissingObjectError:
                return False
            (self.root / SHARDS_DIR).mkdir(exist_ok=True)
            with tarfile.open(tmp, "r:") as tar:
                first = tar.next()
                if first is None or first.name != _BUNDLE_MANIFEST or not first.isfile():
                    raise ValueError(f"{self.store.url_of(SMALL_FILES_NAME)}: first member is not {_BUNDLE_MANIFEST}")
                if tar.extractfile(first).read().decode() != hashlib.sha256(manifest_raw).hexdigest():
                    return False  # written for another manifest: ignore it
                for m in tar:
                    if m.offset == first.offset:  # iteration starts over at the first member
                        continue
                    entry = m.name[len(SHARDS_DIR) + 1 :] if m.name.startswith(SHARDS_DIR + "/") else ""
                    if not m.isfile() or "/" in entry or _small_file_owner(entry, want, fmt) is None:
                        raise ValueError(f"{self.store.url_of(SMALL_FILES_NAME)}: unexpected member {m.name!r}")
                    atomic_write_bytes(self.root / SHARDS_DIR / entry, tar.extractfile(m).read())
            return True
        except tarfile.TarError as e:
            raise ValueError(f"{self.store.url_of(SMALL_FILES_NAME)} is not a readable tar file ({e})") from e
        finally:
            remove_path(tmp)

    # -- shard data -----------------------------------------------------------------------------------------
    def data_path(self, name: str) -> Path:
        assert self.format is not None, "prepare() first"
        return shard_data_path(self.root, name, self.format)

    def ensure(self, name: str, progress: _Download | None = None) -> Path:
        """The shard's data in the local cache (downloaded whole if absent); refreshes its LRU time. `progress`
        sees the download's bytes arrive (storage.RemoteStore.download_file)."""
        final = self.data_path(name)
        if final.exists():
            _touch(final)
            return final
        rel = f"{SHARDS_DIR}/{final.name}"
        with file_lock(self.root / LOCKS_DIR / f"{name}.lock"):
            if not final.exists():  # another process may have fetched it while we waited for the lock
                self.store.download(rel, final, is_dir=self.format == "zarr", progress=progress)
            _touch(final)
        self.evict(keep=final)
        return final

    def prefetch(self, names: Iterable[str]) -> None:
        """Fetch these shards in a background thread, in order (skips ones already local)."""
        names = [n for n in names if not self.data_path(n).exists()]
        if names:
            self._own_prefetcher().submit(names)

    def follow(self, name: str) -> BinaryIO | None:
        """The shard's data as a sequential file object that reads its bytes while they download: the shard is
        fetched by this process's prefetch thread, ahead of everything queued there (or followed where that
        thread already fetches it), so a reader decodes the start of a shard while the rest arrives instead of
        waiting for the whole object (a cold worker's first shard). None when the shard is already local (read
        data_path) or is a folder (zarr). A failed download raises its storage error from the file's read."""
        final = self.data_path(name)
        if self.format == "zarr" or final.exists():
            return None
        return io.BufferedReader(_Follower(self._own_prefetcher().first(name)), buffer_size=1 << 20)

    def _own_prefetcher(self) -> _Prefetcher:
        if self._prefetcher is None or self._prefetcher.pid != os.getpid():
            self._prefetcher = _Prefetcher(self)
        return self._prefetcher

    def local_shards(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every shard data entry in the local cache."""
        d = self.root / SHARDS_DIR
        if self.format is None or not d.is_dir():
            return []
        suffix = SHARD_SUFFIX[self.format]
        out = []
        for p in d.iterdir():
            if p.name.endswith(suffix) and not is_tmp_name(p.name):
                try:
                    out.append((p.stat().st_mtime, tree_bytes(p), p))
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
        return out

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used shard data until under the limit. Returns bytes freed."""
        with file_lock(self.root / LOCKS_DIR / "evict.lock"):
            entries = sorted(self.local_shards())
            total = sum(b for _, b, _ in entries)
            freed = 0
            now = time.time()
            for mtime, nbytes, path in entries:
                if total <= self.max_bytes:
                    break
                if path == keep or now - mtime < self.min_idle_s:
                    continue
                name = path.name[: -len(SHARD_SUFFIX[self.format])]
                with file_lock(self.root / LOCKS_DIR / f"{name}.lock"):
                    remove_path(path)
                total -= nbytes
                freed += nbytes
            return freed


def _small_file_owner(entry: str, want: set[str], fmt: str) -> str | None:
    """The shard (of `want`) whose small file `entry` (a name under shards/) is; None for data, temp files and
    files of other shards. Shard names may contain dots: the longest name followed by a '.' owns the file."""
    owners = [entry[:i] for i, c in enumerate(entry) if c == "." and entry[:i] in want]
    if not owners or is_tmp_name(entry) or entry == owners[-1] + SHARD_SUFFIX[fmt]:
        return None
    return owners[-1]


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


class _Download:
    """One shard download of this process's prefetch thread, as followers see it: which attempt's temp file holds
    how many bytes, and whether (and how) it ended. The thread reports each 512 KiB read (storage's `progress`)."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.cv = threading.Condition()
        self.tmp: Path | None = None
        self.attempt = 0  # attempts started (a retry writes a new temp file from byte 0)
        self.written = 0  # bytes in the current attempt's temp file
        self.done = False
        self.error: BaseException | None = None

    def started(self, tmp: Path) -> None:
        with self.cv:
            self.tmp, self.written, self.attempt = tmp, 0, self.attempt + 1
            self.cv.notify_all()

    def wrote(self, n: int) -> None:
        with self.cv:
            self.written = n
            self.cv.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cv:
            self.done, self.error = True, error
            self.cv.notify_all()


class _Follower(io.RawIOBase):
    """Reads a _Download's bytes in order as they arrive: from the current attempt's temp file up to what it
    holds, then (once done) from the shard's final file to its end. Reads never go past bytes already written, so
    the bytes read are the object's bytes whichever attempt they came from (every attempt GETs the same object)."""

    def __init__(self, dl: _Download) -> None:
        self.dl, self.pos, self.fd, self.attempt = dl, 0, -1, 0  # attempt -1: reading the final file

    def readable(self) -> bool:
        return True

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def readinto(self, b) -> int:
        dl, limit = self.dl, None
        with dl.cv:
            while True:
                if dl.done:
                    if dl.error is not None:
                        raise dl.error
                    if self.attempt != -1:  # the same bytes; the temp name is gone after the rename
                        self._open(dl.final)
                        self.attempt = -1
                    break
                if dl.tmp is not None and dl.attempt != self.attempt:
                    try:
                        self._open(dl.tmp)
                        self.attempt = dl.attempt
                    except FileNotFoundError:  # that attempt failed and was removed: wait for the next one
                        pass
                if self.attempt == dl.attempt and dl.written > self.pos:
                    limit = dl.written
                    break
                dl.cv.wait()
        view = memoryview(b)
        if limit is not None:
            view = view[: limit - self.pos]
        n = os.preadv(self.fd, [view], self.pos)
        self.pos += n
        return n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


class _Prefetcher:
    """One daemon thread per process that fetches queued shards in order; errors surface at the next `ensure`
    (the reader fetches the shard itself and gets the storage error with the object's name) or, for a followed
    shard, at the follower's read. Holds the queued and in-flight downloads only (the prefetch depth)."""

    def __init__(self, mirror: RemoteCacheMirror) -> None:
        self.mirror, self.pid = mirror, os.getpid()
        self.queue: list[str] = []
        self.downloads: dict[str, _Download] = {}  # queued or in flight
        self.current: str | None = None  # in flight
        self.cv = threading.Condition()
        threading.Thread(target=self._run, daemon=True, name="shard-prefetch").start()

    def submit(self, names: list[str]) -> None:
        with self.cv:
            for n in names:
                if n not in self.downloads:
                    self.downloads[n] = _Download(self.mirror.data_path(n))
                    self.queue.append(n)
            self.cv.notify()

    def first(self, name: str) -> _Download:
        """Queue `name` ahead of the others (unless it is in flight already); its download, to follow."""
        with self.cv:
            dl = self.downloads.get(name)
            if dl is None:
                dl = self.downloads[name] = _Download(self.mirror.data_path(name))
            if name != self.current:
                if name in self.queue:
                    self.queue.remove(name)
                self.queue.insert(0, name)
            self.cv.notify()
            return dl

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.queue:
                    self.cv.wait()
                name = self.current = self.queue.pop(0)
                dl = self.downloads[name]
            error = None
            try:
                self.mirror.ensure(name, progress=dl)
            except Exception as e:  # noqa: BLE001 - the reader's own ensure (or the follower) reports it
                error = e
            finally:  # whatever happened, a follower stops waiting (no final file: its read fails, naming it)
                with self.cv:
                    del self.downloads[name]
                    self.current = None
                dl.finish(error)


# ---------------------------------------------------------------------------------------------------------------
# writing: stage 1 stages a shard locally, then publishes its files in the order that keeps readers safe


def shard_files(root: Path, name: str, fmt: str) -> tuple[Path, list[Path], Path]:
    """(data, other small files such as an index, sidecar) of one local shard: every `shards/<name>.*` entry."""
    from .manifest import shard_sidecar_path

    data, side = shard_data_path(root, name, fmt), shard_sidecar_path(root, name)
    others = sorted(
        p for p in (root / SHARDS_DIR).glob(f"{name}.*") if p not in (data, side) and not is_tmp_name(p.name)
    )
    return data, others, side


def publish_shard(store: RemoteStore, root: Path, name: str, fmt: str) -> int:
    """Upload one completed local shard: its data, then its other files, then its sidecar (what marks it
    complete), so a shard whose sidecar is visible is whole. A zarr shard (a folder) is first deleted remotely: a
    run that died mid-upload may have left some of its objects. Returns bytes uploaded."""
    data, others, side = shard_files(root, name, fmt)
    rel = lambda p: f"{SHARDS_DIR}/{p.name}"  # noqa: E731
    if fmt == "zarr":
        store.remove(rel(data))
    n = store.upload(data, rel(data))
    for p in others:
        n += store.upload(p, rel(p))
    store.upload_file(side, rel(side))
    return n + side.stat().st_size


def publish_small_files(store: RemoteStore, root: Path, names: list[str], fmt: str) -> int:
    """Upload small_files.tar (see the module docstring) for the manifest now in `root`: call it after every shard
    is published and before the manifest is. Byte-reproducible (sorted members, zeroed times and owners).
    Returns its size. Grows with the shards' small files (~1/1000 of the data for 1024-sample shards)."""
    raw = (root / MANIFEST_NAME).read_bytes()
    tmp = tmp_path_for(root / SMALL_FILES_NAME)

    def add(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
        info = tarfile.TarInfo(arcname)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            add(tar, _BUNDLE_MANIFEST, hashlib.sha256(raw).hexdigest().encode())
            for name in names:
                _, others, side = shard_files(root, name, fmt)
                for p in sorted([*others, side]):
                    add(tar, f"{SHARDS_DIR}/{p.name}", p.read_bytes())
        store.upload_file(tmp, SMALL_FILES_NAME)
        return tmp.stat().st_size
    finally:
        remove_path(tmp)


def remote_completed(store: RemoteStore, fmt: str) -> list[str]:
    """Names of the shards whose sidecar and data both exist on the store (one LIST)."""
    entries = set(store.listdir(SHARDS_DIR))
    return sorted(
        e[:-5] for e in entries if e.endswith(".json") and not is_tmp_name(e) and e[:-5] + SHARD_SUFFIX[fmt] in entries
    )


def publish_cache(root: str | Path, url: str, cfg: StorageConfig | None = None) -> RemoteStore:
    """Upload a complete local cache to object storage in the order that keeps readers safe: every shard
    (publish_shard), then the other files and folders, the manifest last."""
    from .manifest import read_manifest

    root = Path(root)
    m = read_manifest(root)
    store = RemoteStore(url, cfg)
    for s in m.shards:
        publish_shard(store, root, s["name"], m.format)
    for p in sorted(root.iterdir()):
        if p.name not in (MANIFEST_NAME, SHARDS_DIR, LOCKS_DIR, SMALL_FILES_NAME) and not is_tmp_name(p.name):
            store.upload(p, p.name)
    publish_small_files(store, root, [s["name"] for s in m.shards], m.format)
    store.upload_file(root / MANIFEST_NAME, MANIFEST_NAME)
    return store


def download_cache(url: str, local: str | Path, cfg: StorageConfig | None = None) -> Path:
    """Every object of a remote cache into the folder `local` (created; renamed into place when complete)."""
    store = RemoteStore(url, cfg)
    store.download("", Path(local), is_dir=True)
    return Path(local)
