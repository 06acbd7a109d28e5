"""Atomic file and directory writes, checksums over files and folders.

A reader must never see half of anything: every writer here writes under a `.tmp-` name, fsyncs, then renames.
Anything still carrying the `.tmp-` prefix is debris from a job that died and is ignored by readers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 22


def tmp_path_for(final: str | Path) -> Path:
    """A unique sibling temp name for `final`: `.tmp-<name>-<pid>-<hex>`; never collides with a retry."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(TMP_PREFIX)


_TMP_RE = re.compile(r"^\.tmp-.+-\d+-[0-9a-f]{8}$")  # exactly what tmp_path_for makes


def remove_dead_tmp_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temp entries directly in `folder` whose writing process is gone (the pid tmp_path_for put in the
    name is not alive on this machine) and return them; the temp files of live processes are kept.

    For folders that several writers on ONE machine share (stage 1's per-node staging folder of an s3:// cache):
    a writer that was SIGKILLed there leaves its temp files, and its shard may be rewritten on another node, so no
    later writer of that shard would remove them. Only safe in a folder no other machine writes into (a reused pid
    makes a leftover look alive: it is kept, never the other way round)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not _TMP_RE.match(p.name) or _pid_alive(int(p.name.rsplit("-", 2)[1])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_tmp_leftovers(folder: str | Path, stem: str | None = None) -> list[Path]:
    """Delete the entries directly in `folder` named as tmp_path_for names them (debris of writes that died) and
    return them; with `stem`, only the temp names of `<stem>.*` files. Not recursive; a symlink is unlinked, never
    followed; any other name is kept.

    Only safe where no other process is writing into `folder` (stage 1 holds its cache's lock), or, with `stem`,
    those files (a stage-1 shard has one writer at a time).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not _TMP_RE.match(p.name) or (stem is not None and not p.name.startswith(f"{TMP_PREFIX}{stem}.")):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory below `path` (a zarr group is a folder of many files)."""
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            fsync_file(os.path.join(dirpath, f))
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_path_for(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode("utf-8"))


def atomic_replace(tmp: str | Path, final: str | Path, overwrite: bool = False) -> None:
    """Rename a finished temp file or folder to its final name.

    A folder cannot be renamed over a non-empty folder, so with overwrite=True an old one is first moved aside
    (to a .tmp- name that readers ignore) and deleted after the rename.
    """
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
        if final.is_dir():
            old = tmp_path_for(final)
            os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _hash_file(h: Any, path: str | Path) -> None:
    with open(path, "rb") as f:
        while b := f.read(_CHUNK):
            h.update(b)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    _hash_file(h, path)
    return h.hexdigest()


def tree_files(path: str | Path) -> list[Path]:
    """All files below `path`, sorted by their relative POSIX path (a stable order for hashing)."""
    path = Path(path)
    if path.is_file():
        return [path]
    out = [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    return sorted(out, key=lambda p: p.relative_to(path).as_posix())


def tree_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder as (relative path, size, bytes) of every file in sorted order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in tree_files(path):
        rel = f.relative_to(path).as_posix().encode("utf-8")
        h.update(rel + b"\0" + str(f.stat().st_size).encode() + b"\0")
        _hash_file(h, f)
    return h.hexdigest()


def tree_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in tree_files(path))


def remove_path(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
