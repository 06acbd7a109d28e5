"""`python -m shared.cli upgrade-index CACHE`: convert a cache of the old layout (per-sample lists in each shard's
JSON sidecar) to the columnar index, in place, without touching a shard.

Per shard, one at a time (memory: one shard's sidecar): write shards/<name>.index from the old sidecar's lists, then
replace the sidecar by the per-shard one that names the index file; the manifest's shard entries gain their
index_sha256 last. Each file is replaced atomically, and a shard already converted is skipped, so an interrupted
upgrade is finished by running it again. The result is byte-identical to what the current writers produce for the
same shards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .fsutil import atomic_write_bytes, atomic_write_json, is_tmp_name
from .manifest import MANIFEST_NAME, SHARD_SUFFIX, SHARDS_DIR, ShardInfo, shard_data_path, shard_index_path
from .shard_index import INDEX_SUFFIX, INDEX_VERSION, encode_index, index_columns


def _convert_sidecar(root: Path, d: dict) -> ShardInfo:
    from .wds_store import ALL_FIELDS, member_fields_of

    name, n = d["name"], int(d["n_samples"])
    lists = {k: d[k] for k in ("keys", "buckets", "clip_lens", "t5_lens", "t5_unique")}
    bad = [k for k, v in lists.items() if len(v) != n]
    if bad:
        raise ValueError(f"shard {name!r}: the old sidecar's {bad} do not hold n_samples={n} entries; re-encode it")
    fields, off, size = [], None, None
    if d["format"] == "webdataset":
        members = d.get("members") or {}
        want = member_fields_of(members) or ALL_FIELDS  # the old sidecars' samples are of layout 1
        missing = [f for f in want if f not in members]
        if missing:
            raise ValueError(f"shard {name!r}: the old sidecar has no member offsets for {missing}; re-encode it")
        fields = list(want)
        off = [list(r) for r in zip(*(members[f]["offset"] for f in fields))] if n else []
        size = [list(r) for r in zip(*(members[f]["size"] for f in fields))] if n else []
    cols = index_columns(
        lists["keys"],
        lists["buckets"],
        lists["clip_lens"],
        lists["t5_lens"],
        lists["t5_unique"],
        off if fields else None,
        size if fields else None,
    )
    if fields and n == 0:
        cols["member_offset"] = cols["member_offset"].reshape(0, len(fields))
        cols["member_size"] = cols["member_size"].reshape(0, len(fields))
    data = encode_index(n, cols, fields)
    atomic_write_bytes(shard_index_path(root, name), data)
    info = ShardInfo(
        name=name,
        format=d["format"],
        n_samples=n,
        bytes=int(d["bytes"]),
        sha256=d["sha256"],
        field_bytes=dict(d.get("field_bytes", {})),
        index={
            "file": f"{name}{INDEX_SUFFIX}",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "version": INDEX_VERSION,
        },
        schema_version=d.get("schema_version", 1),
    )
    return info


def upgrade_index(root: str | Path, log=print) -> dict:
    """Convert every old-layout sidecar under root, then the manifest. Returns counts."""
    root = Path(root)
    shards_dir = root / SHARDS_DIR
    if not shards_dir.is_dir():
        raise FileNotFoundError(f"{shards_dir} does not exist: {root} is not a cache folder")
    converted, current, entries = 0, 0, {}
    for p in sorted(shards_dir.glob("*.json")):
        if is_tmp_name(p.name):
            continue
        d = json.loads(p.read_text("utf-8"))
        if d.get("format") not in SHARD_SUFFIX or d.get("name") != p.stem:
            continue
        if d.get("index"):
            info = ShardInfo.from_dict(d)
            current += 1
        else:
            if not shard_data_path(root, d["name"], d["format"]).exists():
                continue  # an unfinished shard: readers and stage 1 ignore it, so does the upgrade
            info = _convert_sidecar(root, d)
            atomic_write_json(p, info.to_dict())  # last for this shard: the old sidecar stays until the index exists
            converted += 1
        entries[info.name] = info.entry()
    manifest_updated = False
    mp = root / MANIFEST_NAME
    if mp.exists():
        m = json.loads(mp.read_text("utf-8"))
        for e in m.get("shards", []):
            new = entries.get(e["name"])
            if new is None:
                raise ValueError(f"{mp} lists shard {e['name']!r}, which has no complete sidecar under {shards_dir}")
            if any(e.get(k) != new[k] for k in ("n_samples", "bytes", "sha256")):
                raise ValueError(f"{mp}: the entry of shard {e['name']!r} disagrees with its sidecar; run verify")
            if e.get("index_sha256") != new["index_sha256"]:
                e["index_sha256"] = new["index_sha256"]
                manifest_updated = True
        if manifest_updated:
            atomic_write_json(mp, m)
    log(
        f"upgrade-index {root}: {converted} shards converted, {current} already current"
        f"{', manifest updated' if manifest_updated else ''}"
    )
    return {"converted": converted, "current": current, "manifest_updated": manifest_updated}
