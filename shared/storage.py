"""Object storage for caches: `s3://bucket/prefix` roots through fsspec / s3fs, moving whole files only.

    store = RemoteStore("s3://bucket/cache", StorageConfig(endpoint_url="http://127.0.0.1:8333"))
    store.upload(local_path, "shards/part-000000.tar"); store.download("manifest.json", local_path)

Why whole files. A shard is read as one sequential object (one GET), never one GET per sample field, and a shard's
files (its data, sidecar, index) are moved as opaque files, so the layout of what is inside them can change without
touching this module. A cache on object storage is the same tree of files a local cache is.

Two clients, one configuration. Listings, uploads (multipart), small reads and deletes go through s3fs; whole-object
downloads (`download_file`: every shard stage 2 reads) through botocore's synchronous client, the body read from
its socket into a reused buffer: under a third of s3fs's client CPU per byte (bench/loader.py). Both are made
once per process and endpoint settings, with the same endpoint, region, timeouts and credential chain, and
botocore's own retries off.

Credentials come only from the standard AWS sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE, instance roles) as botocore reads them; `StorageConfig` has no field for them, so they can never end up
in a saved config, a manifest or a log line. The endpoint comes from `storage.endpoint_url`, else
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (e.g. a local SeaweedFS or MinIO).

Faults. Every operation is retried with exponential backoff for transient errors (connection refused or reset,
timeouts, 5xx, throttling); after `retries` attempts a `StorageError` names the object and the last error. A missing
object raises `MissingObjectError` (a FileNotFoundError) naming it, at once: retrying cannot make it appear.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .fsutil import fsync_dir, remove_path, tmp_path_for

logger = logging.getLogger("shared.storage")
T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "s3a")


@dataclass
class StorageConfig:
    """How to reach object storage (no credentials here: they come from the standard AWS variables)."""

    endpoint_url: str = ""  # "" = AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the AWS default
    region: str = ""  # "" = AWS_REGION / AWS_DEFAULT_REGION / botocore's default
    retries: int = 5  # attempts per operation for transient errors
    backoff_s: float = 0.5  # first retry delay; doubles per attempt
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    multipart_mb: int = 64  # files above this are uploaded as multipart (visible only once complete)
    cache_dir: str = ""  # stage 2's local shard cache; "" = $HYDIT_SHARD_CACHE or ~/.cache/hydit/shards
    cache_max_gb: float = 50.0  # size limit of the shard data in the local cache (LRU beyond it)
    staging_dir: str = ""  # stage 1's local staging folder; "" = $HYDIT_STAGING or ~/.cache/hydit/staging
    prefetch_shards: int = 4  # stage 2: shards fetched ahead of the ones being read

    def __post_init__(self) -> None:
        if self.retries < 1:
            raise ValueError(f"storage.retries={self.retries}: must be >= 1")
        if self.backoff_s < 0 or self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("storage.backoff_s must be >= 0 and the timeouts > 0")
        if self.multipart_mb < 5:
            raise ValueError(f"storage.multipart_mb={self.multipart_mb}: S3 parts must be >= 5 MiB")
        if self.cache_max_gb <= 0:
            raise ValueError(f"storage.cache_max_gb={self.cache_max_gb}: must be > 0")
        if self.prefetch_shards < 0:
            raise ValueError(f"storage.prefetch_shards={self.prefetch_shards}: must be >= 0")


class StorageError(OSError):
    """An object-storage operation failed after its retries (names the object and the last error)."""


class MissingObjectError(FileNotFoundError):
    """An object that must exist does not."""


def is_remote(path: Any) -> bool:
    """True for `s3://...` URLs; local paths (and file://) are False."""
    return isinstance(path, str) and "://" in path and path.split("://", 1)[0].lower() in REMOTE_SCHEMES


def split_url(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket/a/b'); a ValueError names a URL without a bucket."""
    if not is_remote(url):
        raise ValueError(f"{url!r} is not an object-storage URL; allowed schemes: {list(REMOTE_SCHEMES)}")
    scheme, rest = url.split("://", 1)
    rest = rest.strip("/")
    if not rest or rest.startswith("/"):
        raise ValueError(f"{url!r} names no bucket: use s3://BUCKET/PREFIX")
    return scheme.lower(), rest


def _endpoint(cfg: StorageConfig) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _is_missing(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", "")) if hasattr(err, "response") else ""
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def _is_permanent(err: BaseException) -> bool:
    """Errors that retrying cannot fix: wrong credentials, bad arguments."""
    if isinstance(err, (PermissionError, ValueError, TypeError, IsADirectoryError, NotADirectoryError)):
        return True
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", "")) if hasattr(err, "response") else ""
    return code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName")


class RemoteStore:
    """A cache root on object storage. Paths are relative to the root ("shards/part-000000.tar").

    Picklable (the filesystem is rebuilt lazily in each process, so Ray workers and DataLoader workers each get
    their own connection pool and event loop). `requests` counts GET requests made by downloads (bench, tests).
    """

    def __init__(self, url: str, cfg: StorageConfig | None = None) -> None:
        self.scheme, self.base = split_url(url)
        self.url = f"{self.scheme}://{self.base}"
        self.cfg = cfg or StorageConfig()
        self._fs = None
        self._client = None
        self._pid = -1
        self.gets = 0

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_fs"], d["_client"], d["_pid"] = None, None, -1
        return d

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    def _own_process(self) -> None:
        if self._pid != os.getpid():  # forked (a DataLoader worker): connections are never shared with the parent
            self._fs = self._client = None
            self._pid = os.getpid()

    @property
    def fs(self):
        """The s3fs filesystem: listings, uploads (multipart), small reads and deletes."""
        self._own_process()
        if self._fs is None:
            self._fs = _filesystem(self.cfg)
        return self._fs

    @property
    def client(self):
        """botocore's synchronous S3 client: whole-object downloads (download_file)."""
        self._own_process()
        if self._client is None:
            self._client = _sync_client(self.cfg)
        return self._client

    def _drop_fs(self) -> None:
        """After a failure: the next attempt gets new connection pools (a dead one is not reused)."""
        _FILESYSTEMS.pop(_fs_key(self.cfg), None)
        _CLIENTS.pop(_fs_key(self.cfg), None)
        self._fs = self._client = None

    def path(self, rel: str = "") -> str:
        rel = str(rel).strip("/")
        return f"{self.base}/{rel}" if rel else self.base

    def url_of(self, rel: str = "") -> str:
        return f"{self.scheme}://{self.path(rel)}"

    # -- the retry loop ------------------------------------------------------------------------------------------
    def _retry(self, what: str, rel: str, fn: Callable[[], T], missing_ok: bool = False) -> T:
        cfg = self.cfg
        last: BaseException | None = None
        for attempt in range(cfg.retries):
            try:
                return fn()
            except BaseException as err:  # noqa: BLE001 - classified below; KeyboardInterrupt passes through
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                if _is_missing(err):
                    if missing_ok:
                        raise
                    raise MissingObjectError(f"object {self.url_of(rel)} does not exist ({what})") from None
                if _is_permanent(err):
                    raise StorageError(f"{what} {self.url_of(rel)} failed: {type(err).__name__}: {err}") from err
                last = err
                self._drop_fs()
                if attempt + 1 < cfg.retries:
                    delay = cfg.backoff_s * (2**attempt)
                    logger.warning(
                        f"{what} {self.url_of(rel)}: {type(err).__name__}: {err}; retry "
                        f"{attempt + 1}/{cfg.retries - 1} in {delay:.1f}s"
                    )
                    time.sleep(delay)
        raise StorageError(
            f"{what} {self.url_of(rel)} failed after {cfg.retries} attempts: {type(last).__name__}: {last}"
        ) from last

    # -- operations ------------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return bool(self._retry("stat", rel, lambda: self.fs.exists(self.path(rel))))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under rel; [] if there is nothing."""

        def ls() -> list[str]:
            try:
                entries = self.fs.ls(self.path(rel), detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)

        return self._retry("list", rel, ls)

    def find(self, rel: str = "") -> dict[str, int]:
        """{path relative to rel: size} of every object below rel."""
        base = self.path(rel)

        def find() -> dict[str, int]:
            try:
                out = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {
                p[len(base) :].lstrip("/"): int(i.get("size") or 0)
                for p, i in out.items()
                if i.get("type") != "directory"
            }

        return self._retry("list", rel, find)

    def read_bytes(self, rel: str) -> bytes:
        self.gets += 1
        return self._retry("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        self._retry("write", rel, lambda: self.fs.pipe_file(self.path(rel), data))

    def upload_file(self, local: str | Path, rel: str) -> None:
        """Upload one file; above `multipart_mb` as a multipart upload, which becomes visible only when the last
        part is committed, so a reader never sees half an object."""
        chunk = self.cfg.multipart_mb << 20
        self._retry("upload", rel, lambda: self.fs.put_file(str(local), self.path(rel), chunksize=chunk))

    def upload(self, local: str | Path, rel: str) -> int:
        """Upload a file, or a folder file by file in sorted order. Returns bytes uploaded."""
        local = Path(local)
        if local.is_file():
            self.upload_file(local, rel)
            return local.stat().st_size
        n = 0
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            self.upload_file(f, f"{rel}/{f.relative_to(local).as_posix()}")
            n += f.stat().st_size
        return n

    def download_file(self, rel: str, local: str | Path, progress: Any = None) -> None:
        """One GET into a temp sibling, then an atomic rename: `local` is either absent or complete.

        `progress` (optional) sees the temp file fill: `progress.started(tmp)` once per attempt (a retry starts over
        from byte 0, into a new file of the same name) and `progress.wrote(n)` each time the file holds n bytes, so
        a reader in this process can follow the bytes as they arrive (shared.remote_cache's followers).

        Through botocore's plain (synchronous) client, read straight into one reused buffer, not through s3fs:
        this is stage 2's hot path (every shard's data), and s3fs's asyncio/aiohttp body reads cost 3x the client
        CPU (about 100 vs 30 ms per 42 MiB shard on this project's machine) on the cores the decoding needs.
        A body shorter than its Content-Length is an error (retried, then named; see _get_object_to_file)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(local)
        bucket, _, key = self.path(rel).partition("/")

        def get() -> None:
            try:
                _get_object_to_file(self.client, bucket, key, tmp, progress)
            except BaseException:
                remove_path(tmp)
                raise

        self.gets += 1
        self._retry("download", rel, get)
        os.replace(tmp, local)

    def download(self, rel: str, local: str | Path, is_dir: bool = False, progress: Any = None) -> int:
        """Download a file (`progress`: as download_file's), or (is_dir) every object below rel into the folder
        `local`, built under a temp name and renamed into place. Returns bytes downloaded."""
        local = Path(local)
        if not is_dir:
            self.download_file(rel, local, progress)
            return local.stat().st_size
        objects = self.find(rel)
        if not objects:
            raise MissingObjectError(f"object folder {self.url_of(rel)} is empty or does not exist")
        tmp = tmp_path_for(local)
        try:
            for name in sorted(objects):
                self.download_file(f"{rel}/{name}", tmp / name)
            if local.exists():
                remove_path(local)
            os.replace(tmp, local)
        except BaseException:
            remove_path(tmp)
            raise
        fsync_dir(local.parent)
        return sum(objects.values())

    def remove(self, rel: str) -> None:
        """Delete an object or everything below a prefix (no error if absent)."""

        def rm() -> None:
            p = self.path(rel)
            try:
                if self.fs.isdir(p):
                    self.fs.rm(p, recursive=True)
                else:
                    self.fs.rm_file(p)
            except FileNotFoundError:
                pass

        self._retry("delete", rel, rm)


_FILESYSTEMS: dict[tuple, Any] = {}


def _fs_key(cfg: StorageConfig) -> tuple:
    return (os.getpid(), _endpoint(cfg), cfg.region, cfg.connect_timeout_s, cfg.read_timeout_s)


def _filesystem(cfg: StorageConfig):
    """One s3fs filesystem per process and endpoint settings (its connection pool and event loop are per process)."""
    key = _fs_key(cfg)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if _endpoint(cfg):
            client_kwargs["endpoint_url"] = _endpoint(cfg)
        if cfg.region:
            client_kwargs["region_name"] = cfg.region
        # botocore's own retries off: ours name the object and back off the same way for every operation
        config_kwargs = {
            "connect_timeout": cfg.connect_timeout_s,
            "read_timeout": cfg.read_timeout_s,
            "retries": {"max_attempts": 1, "mode": "standard"},
        }
        fs = s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            session=_session(),
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.retries = 1  # s3fs's internal retry loop as well
        _FILESYSTEMS[key] = fs
    return fs


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _new_clients_lock() -> None:
    global _CLIENTS_LOCK
    _CLIENTS_LOCK = threading.Lock()  # a fork while another thread held it would leave the child's copy locked


os.register_at_fork(after_in_child=_new_clients_lock)
_READ_CHUNK = 512 << 10  # bytes per socket read of a download: from 2 MiB on, each read cost 4x more CPU here


def _sync_client(cfg: StorageConfig):
    """One botocore S3 client per process and endpoint settings (the same endpoint, region, timeouts and credential
    chain as the s3fs filesystem; botocore's retries off: ours name the object)."""
    key = _fs_key(cfg)
    with _CLIENTS_LOCK:  # a reader and its prefetch thread may ask first at once (sessions are not thread-safe)
        client = _CLIENTS.get(key)
        if client is not None:
            return client
        import botocore.config

        client = _sync_session().create_client(
            "s3",
            endpoint_url=_endpoint(cfg),
            region_name=cfg.region or None,
            config=botocore.config.Config(
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=cfg.read_timeout_s,
                retries={"max_attempts": 1, "mode": "standard"},
            ),
        )
        _CLIENTS[key] = client
        return client


def _get_object_to_file(client, bucket: str, key: str, path: Path, progress: Any = None) -> int:
    """GET one object into `path` (created or truncated) through one reused buffer; returns its size. Unbuffered
    writes: what `progress.wrote(n)` reports is in the file.

    The body is read from the HTTP response under urllib3 (`_plain_body`): urllib3 2's readinto is a read() into a
    fresh bytes object plus a copy, which was half the client CPU of a download (56-65 -> 30-31 ms per 42 MiB
    shard, 25-30 ms of it user time, bench/loader.py); read directly, the socket fills the reused buffer and that
    buffer goes to the file. That path checks the length itself (http.client does not); anything it does not
    handle (a content encoding, a chunked body) goes through botocore's readinto, which checks it at the end."""
    resp = client.get_object(Bucket=bucket, Key=key)
    body = resp["Body"]
    raw = _plain_body(body)
    read = raw.readinto if raw is not None else body.readinto
    buf = memoryview(bytearray(_READ_CHUNK))
    n = 0
    with body, open(path, "wb", buffering=0) as f:
        if progress is not None:
            progress.started(path)
        while k := read(buf):  # (botocore checks the length at its last, empty read)
            done = 0
            while done < k:  # a regular file takes it whole; looped in case it does not
                done += f.write(buf[done:k])
            n += k
            if progress is not None:
                progress.wrote(n)
    if raw is not None and n != resp["ContentLength"]:  # the connection ended early
        import botocore.exceptions

        raise botocore.exceptions.IncompleteReadError(actual_bytes=n, expected_bytes=resp["ContentLength"])
    return n


def _plain_body(body):
    """The http.client response under a botocore StreamingBody when its bytes are the object's bytes as sent
    (a Content-Length, no content or transfer encoding, nothing buffered above it yet); else None."""
    import http.client

    urllib3_resp = getattr(body, "_raw_stream", None)
    raw = getattr(urllib3_resp, "_fp", None)
    if not isinstance(raw, http.client.HTTPResponse) or raw.chunked or raw.length is None:
        return None
    if urllib3_resp.headers.get("content-encoding") or len(getattr(urllib3_resp, "_decoded_buffer", b"")):
        return None
    return raw


_SYNC_SESSION: list = []


def _sync_session():
    """As _session, for the synchronous client: made once, before DataLoader workers fork, so that they inherit
    botocore's loaded service model and endpoint data instead of each loading them again."""
    if not _SYNC_SESSION:
        import botocore.session

        _SYNC_SESSION.append(botocore.session.get_session())
    return _SYNC_SESSION[0]


_SESSION: list = []


def _session():
    """One aiobotocore session for this process and the processes forked from it (DataLoader workers).

    A session holds no connection or event loop (each filesystem makes its own client), only botocore's loaded
    service models and resolved settings: reusing it after a fork saves each worker reloading them, ~1 s of its
    first request (bench/loader.py's cold S3 column waits for that on every worker's first shard)."""
    if not _SESSION:
        import aiobotocore.session

        _SESSION.append(aiobotocore.session.AioSession())
    return _SESSION[0]


def default_dir(configured: str, env: str, leaf: str) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return Path.home() / ".cache" / "hydit" / leaf
