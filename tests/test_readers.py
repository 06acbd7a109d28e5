import hashlib
import json
import os
import pickle
import re

import numpy as np
import pyarrow as pa
import pytest

from stage1_encode.demo_corpus import demo_records, write_demo_corpus, write_demo_image_list
from stage1_encode.readers import InputConfig, Partition, plan_partitions, read_partition

N = 90
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+-\d{8}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"), n=N, seed=0, rows_per_file=40)


def _read_all(cfg, rows_per_shard):
    parts = plan_partitions(cfg, rows_per_shard)
    return parts, [r for p in parts for r in read_partition(p, cfg)]


def _arrow_rows(corpus):
    table = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in corpus["arrow_files"]])
    return table.to_pylist()


def test_arrow_and_parquet_give_the_same_rows_keys_and_bytes(corpus):
    arrow_cfg = InputConfig(format="arrow", paths=[str(corpus["arrow_dir"])])
    parquet_cfg = InputConfig(format="parquet", paths=[str(corpus["parquet_dir"] / "*.parquet")])
    # 7 rows per shard cuts across record batches (32) and row groups (25)
    _, arrow = _read_all(arrow_cfg, 7)
    _, parquet = _read_all(parquet_cfg, 7)
    assert len(arrow) == len(parquet) == N
    for a, p in zip(arrow, parquet):
        assert (a["key"], a["row"], a["image"], a["caption"], a["md5"]) == (
            p["key"],
            p["row"],
            p["image"],
            p["caption"],
            p["md5"],
        )
    expected = _arrow_rows(corpus)
    for got, want in zip(arrow, expected):
        assert got["image"] == want["image"] and got["caption"] == want["text_zh"] and got["md5"] == want["md5"]
        assert got["error"] is None
    assert arrow[42]["caption"] == "" and arrow[7]["md5"] == hashlib.md5(arrow[7]["image"]).hexdigest()


def test_partitions_cover_every_row_once_and_are_deterministic(corpus):
    cfg = InputConfig(format="arrow", paths=[str(p) for p in reversed(corpus["arrow_files"])])
    parts = plan_partitions(cfg, 15)
    assert parts == plan_partitions(cfg, 15)
    assert [p.name for p in parts] == sorted(p.name for p in parts)
    assert parts[0] == Partition("00000-00000000", str(corpus["arrow_files"][0].resolve()), "00000", 0, 15)
    assert [(p.source_stem, p.start, p.stop) for p in parts if p.source_stem == "00002"] == [("00002", 0, 10)]
    seen = [(r["source"], r["row"]) for p in parts for r in read_partition(p, cfg)]
    assert len(seen) == len(set(seen)) == N == sum(p.num_rows for p in parts)
    assert all(p.num_rows <= 15 for p in parts)
    assert pickle.loads(pickle.dumps(parts[1])) == parts[1]  # Ray ships partitions to workers


def test_keys_are_unique_stable_and_independent_of_partitioning_and_order(corpus):
    cfg = InputConfig(format="arrow", paths=[str(corpus["arrow_dir"])])
    parts_a, rows_a = _read_all(cfg, 11)
    parts_b = plan_partitions(cfg, 1000)
    rows_b = [r for p in reversed(parts_b) for r in read_partition(p, cfg)]
    by_key_a = {r["key"]: r for r in rows_a}
    by_key_b = {r["key"]: r for r in rows_b}
    assert len(by_key_a) == N and by_key_a.keys() == by_key_b.keys()
    for k, r in by_key_a.items():
        assert KEY_RE.match(k)
        assert k == f"{r['source'].rsplit('/', 1)[1][:-6]}-{r['row']:08d}-{r['md5'][:12]}"
        assert by_key_b[k]["image"] == r["image"]
    # without an md5 column the key comes from hashing the bytes, and so it is the same
    no_md5 = InputConfig(format="arrow", paths=[str(corpus["arrow_dir"])], md5_column=None)
    assert [r["key"] for r in _read_all(no_md5, 11)[1]] == [r["key"] for r in rows_a]


def test_binary_column_fallback_and_md5_computed(tmp_path, corpus):
    table = pa.ipc.open_file(pa.memory_map(str(corpus["arrow_files"][0]))).read_all()
    table = table.drop_columns(["md5"]).rename_columns(["text_zh", "width", "height", "binary"])
    path = tmp_path / "part-a.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as w:
        w.write_table(table)
    cfg = InputConfig(format="arrow", paths=[str(path)])
    _, rows = _read_all(cfg, 100)
    assert len(rows) == 40
    assert rows[3]["image"] == table["binary"][3].as_py()
    assert rows[3]["md5"] == hashlib.md5(rows[3]["image"]).hexdigest()
    assert rows[3]["key"].startswith("part-a-00000003-")


def _write_arrow(path, table):
    with pa.OSFile(str(path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as w:
        w.write_table(table)


def test_schema_errors_name_the_file_and_the_column(tmp_path, corpus):
    good = pa.ipc.open_file(pa.memory_map(str(corpus["arrow_files"][0]))).read_all()
    no_caption = tmp_path / "a" / "00007.arrow"
    no_caption.parent.mkdir()
    _write_arrow(no_caption, good.drop_columns(["text_zh"]))
    with pytest.raises(ValueError) as e:
        plan_partitions(InputConfig(format="arrow", paths=[str(no_caption)]), 10)
    msg = str(e.value)
    assert str(no_caption) in msg and "'text_zh'" in msg and "input.caption_column" in msg and "image (binary)" in msg

    with pytest.raises(ValueError, match=r"00000\.arrow: no image column 'img'.*columns are: text_zh \(string\)"):
        plan_partitions(InputConfig(format="arrow", paths=[str(corpus["arrow_files"][0])], image_column="img"), 10)
    with pytest.raises(ValueError, match=r"no image column 'image' \(nor 'binary'\)"):
        _write_arrow(tmp_path / "noimg.arrow", good.drop_columns(["image"]))
        plan_partitions(InputConfig(format="arrow", paths=[str(tmp_path / "noimg.arrow")]), 10)
    with pytest.raises(ValueError, match=r"image column 'md5' has type string, expected binary"):
        plan_partitions(InputConfig(format="arrow", paths=[str(corpus["arrow_files"][0])], image_column="md5"), 10)
    with pytest.raises(ValueError, match=r"00000\.parquet: no caption column 'text_en'"):
        plan_partitions(InputConfig(format="parquet", paths=[str(corpus["parquet_dir"])], caption_column="text_en"), 10)

    garbage = tmp_path / "broken.arrow"
    garbage.write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match=r"broken\.arrow: not a readable Arrow IPC file"):
        plan_partitions(InputConfig(format="arrow", paths=[str(garbage)]), 10)
    with pytest.raises(ValueError, match=r"input.paths: '.*nowhere/\*\.arrow' matches no file"):
        plan_partitions(InputConfig(format="arrow", paths=[str(tmp_path / "nowhere" / "*.arrow")]), 10)
    with pytest.raises(ValueError, match=r"input.format: 'tfrecord' is not a known format; allowed: arrow"):
        InputConfig(format="tfrecord", paths=["x"])
    with pytest.raises(ValueError, match=r"input.paths: empty"):
        plan_partitions(InputConfig(format="arrow"), 10)  # a default InputConfig() is fine until it is used
    with pytest.raises(ValueError, match="rows_per_shard"):
        plan_partitions(InputConfig(format="arrow", paths=[str(corpus["arrow_dir"])]), 0)


def test_indexkits_base_index_selects_its_rows(corpus):
    doc = json.loads(corpus["index_json"].read_text())
    cfg = InputConfig(format="indexkits", paths=[str(corpus["index_json"])])
    parts, rows = _read_all(cfg, 16)
    cum = [0] + doc["cum_length"]
    got = [cum[int(r["source"][-7:-6])] + r["row"] for r in rows]
    assert got == doc["indices"] and len(doc["indices"]) < N
    every = _arrow_rows(corpus)
    for g, r in zip(got, rows):
        assert r["image"] == every[g]["image"] and r["caption"] == every[g]["text_zh"]
    assert all(p.rows is not None and len(p.rows) <= 16 for p in parts)
    # the keys are the keys of plain arrow reading: the same sample has the same key however it was selected
    plain = {r["key"] for r in _read_all(InputConfig(format="arrow", paths=[str(corpus["arrow_dir"])]), 1000)[1]}
    assert {r["key"] for r in rows} <= plain


def test_indexkits_multireso_npz_and_large_index_npz(tmp_path, corpus):
    mt = json.loads(corpus["multireso_json"].read_text())
    with np.load(corpus["multireso_npz"], allow_pickle=False) as z:
        want = sorted(set(np.concatenate([z[k] for k in z.files]).tolist()))
    cfg = InputConfig(format="indexkits", paths=[str(corpus["multireso_json"])])
    rows = _read_all(cfg, 1000)[1]
    cum = [0] + mt["cum_length"]
    assert [cum[int(r["source"][-7:-6])] + r["row"] for r in rows] == want
    # several index files: the union of their rows, each row once
    both = InputConfig(format="indexkits", paths=[str(corpus["multireso_json"]), str(corpus["index_json"])])
    union = sorted(set(want) | set(json.loads(corpus["index_json"].read_text())["indices"]))
    assert [cum[int(r["source"][-7:-6])] + r["row"] for r in _read_all(both, 13)[1]] == union

    # a base index whose indices went to `<stem>.index.npz` (key "x"), with repeats and relative arrow paths
    doc = json.loads(corpus["index_json"].read_text())
    sel = np.array([5, 5, 0, 41, 89, 41], dtype=np.int64)
    np.savez(corpus["arrow_dir"] / "big.index.npz", x=sel)
    doc.update(indices=[], indices_file="big.index.npz", arrow_files=[p.name for p in corpus["arrow_files"]])
    (corpus["arrow_dir"] / "big.json").write_text(json.dumps(doc))
    rows = _read_all(InputConfig(format="indexkits", paths=[str(corpus["arrow_dir"] / "big.json")]), 2)[1]
    assert [(r["source"][-11:], r["row"]) for r in rows] == [
        ("00000.arrow", 0),
        ("00000.arrow", 5),
        ("00001.arrow", 1),
        ("00002.arrow", 9),
    ]

    stale = dict(doc, cum_length=[40, 80, 91])
    (tmp_path / "stale.json").write_text(json.dumps(dict(stale, arrow_files=[str(p) for p in corpus["arrow_files"]])))
    with pytest.raises(ValueError, match=r"stale\.json: 'cum_length' \[40, 80, 91\] does not match"):
        plan_partitions(InputConfig(format="indexkits", paths=[str(tmp_path / "stale.json")]), 10)
    (tmp_path / "oob.json").write_text(
        json.dumps(dict(doc, indices=[3, 90], indices_file="", arrow_files=[str(p) for p in corpus["arrow_files"]]))
    )
    with pytest.raises(ValueError, match=r"oob\.json: indices range 3\.\.90 is outside the 90 rows"):
        plan_partitions(InputConfig(format="indexkits", paths=[str(tmp_path / "oob.json")]), 10)
    (tmp_path / "notindex.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"notindex\.json: no 'arrow_files' key"):
        plan_partitions(InputConfig(format="indexkits", paths=[str(tmp_path / "notindex.json")]), 10)


def test_folder_jsonl_and_csv(tmp_path):
    loose = write_demo_image_list(tmp_path / "loose", n=8)
    arrow_by_row = demo_records(8, bad_rows=False)  # the loose files carry no deliberately bad row
    (loose["images"] / "00003.txt").unlink()  # no sidecar: caption None, row kept
    folder_cfg = InputConfig(format="folder", paths=[str(loose["images"])])
    parts, rows = _read_all(folder_cfg, 3)
    assert [p.num_rows for p in parts] == [3, 3, 2] and len(rows) == 8
    for i, r in enumerate(rows):
        assert r["image"] == arrow_by_row[i]["image"] and r["md5"] == arrow_by_row[i]["md5"]
        assert r["key"] == f"images-{i:08d}-{r['md5'][:12]}" and r["source"].endswith(f"{i:05d}" + r["source"][-4:])
        assert r["caption"] == (None if i == 3 else arrow_by_row[i]["text_zh"])

    # JSONL with a blank line, a broken line and a missing image: nothing crashes, nothing vanishes
    lines = loose["jsonl"].read_text().splitlines()
    lines[2] = "{broken"
    lines[4] = json.dumps({"img_path": "images/missing.png", "text_zh": 5})
    loose["jsonl"].write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    jsonl_cfg = InputConfig(format="jsonl", paths=[str(loose["jsonl"])])
    parts, rows = _read_all(jsonl_cfg, 3)
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 8)] and [r["row"] for r in rows] == list(range(8))
    assert rows[2]["image"] is None and "not a JSON object" in rows[2]["error"]
    assert rows[4]["image"] is None and "missing.png" in rows[4]["error"] and rows[4]["caption"] == 5
    for i in (0, 1, 3, 5, 6, 7):
        assert rows[i]["image"] == arrow_by_row[i]["image"] and rows[i]["caption"] == arrow_by_row[i]["text_zh"]
        assert rows[i]["key"] == f"list-{i:08d}-{arrow_by_row[i]['md5'][:12]}" and rows[i]["error"] is None

    csv_cfg = InputConfig(format="csv", paths=[str(loose["csv"])])
    rows = _read_all(csv_cfg, 5)[1]
    assert [r["image"] for r in rows] == [arrow_by_row[i]["image"] for i in range(8)]
    assert [r["caption"] for r in rows] == [arrow_by_row[i]["text_zh"] for i in range(8)]
    with pytest.raises(
        ValueError, match=r"list\.csv: no column 'path' \(input.image_path_column\); columns are: img_path"
    ):
        plan_partitions(InputConfig(format="csv", paths=[str(loose["csv"])], image_path_column="path"), 5)
    with pytest.raises(ValueError, match=r"list\.jsonl: no key 'caption' \(input.caption_column\) in line 1"):
        plan_partitions(InputConfig(format="jsonl", paths=[str(loose["jsonl"])], caption_column="caption"), 5)


def test_same_file_names_in_two_folders_get_distinct_stems(tmp_path, corpus):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "00000.arrow").write_bytes(corpus["arrow_files"][0].read_bytes())
    cfg = InputConfig(format="arrow", paths=[str(tmp_path / "*" / "00000.arrow")])
    parts, rows = _read_all(cfg, 100)
    assert [p.source_stem for p in parts] == ["x_00000", "y_00000"]
    assert len({r["key"] for r in rows}) == 80


def test_unsafe_file_names_give_safe_distinct_stems(tmp_path, corpus):
    for name in ("my.data.arrow", "my_data.arrow", "图片.arrow"):
        (tmp_path / name).write_bytes(corpus["arrow_files"][0].read_bytes())
    parts = plan_partitions(InputConfig(format="arrow", paths=[str(tmp_path)]), 100)
    stems = [p.source_stem for p in parts]
    assert len(set(stems)) == 3 and "my_data" in stems
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", p.name) for p in parts)


def test_jsonl_blank_lines_lose_no_record_and_keys_ignore_rows_per_shard(tmp_path):
    """8 records and 2 blank lines inside partitions: 8 rows, numbered by record, whatever rows_per_shard is."""
    loose = write_demo_image_list(tmp_path / "loose", n=8)
    lines = loose["jsonl"].read_text().splitlines()
    loose["jsonl"].write_text("\n".join(lines[:2] + [""] + lines[2:5] + ["   "] + lines[5:]) + "\n")
    cfg = InputConfig(format="jsonl", paths=[str(loose["jsonl"])])
    by_rps = {}
    for rps in (1, 3, 4, 100):
        parts, rows = _read_all(cfg, rps)
        assert sum(p.num_rows for p in parts) == 8
        assert [r["row"] for r in rows] == list(range(8)) and all(r["error"] is None for r in rows), rps
        by_rps[rps] = [r["key"] for r in rows]
    want = [f"list-{i:08d}-{r['md5'][:12]}" for i, r in enumerate(demo_records(8, bad_rows=False))]
    assert all(keys == want for keys in by_rps.values())


def _png(path):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(path, "PNG")
    return path.read_bytes()


def _reasons(cfg, rows_per_shard=100):
    return [(r["error_reason"], r["image"] is not None) for r in _read_all(cfg, rows_per_shard)[1]]


def test_list_paths_stay_inside_the_list_folder_unless_allowed(tmp_path):
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "images").mkdir(parents=True)
    outside.mkdir()
    ok = _png(corpus / "images" / "ok.png")
    _png(outside / "secret.png")
    (corpus / "images" / "link_out.png").symlink_to(outside / "secret.png")  # a symlink out of the folder
    (corpus / "images" / "link_in.png").symlink_to(corpus / "images" / "ok.png")
    paths = [
        "images/ok.png",
        "../outside/secret.png",
        "../../../../../../etc/passwd",
        str(outside / "secret.png"),
        "/etc/passwd",
        "images/link_out.png",
        "images/link_in.png",
        "images/../images/ok.png",
        str(corpus / "images" / "ok.png"),
    ]
    (corpus / "list.jsonl").write_text("".join(json.dumps({"img_path": p, "text_zh": "x"}) + "\n" for p in paths))
    with (corpus / "list.csv").open("w") as fh:
        fh.write("img_path,text_zh\n" + "".join(f"{p},x\n" for p in paths))
    inside = [(None, True)]
    want = inside + [("outside_roots", False)] * 5 + inside * 3
    for fmt in ("jsonl", "csv"):
        cfg = InputConfig(format=fmt, paths=[str(corpus / f"list.{fmt}")])
        assert _reasons(cfg) == want, fmt
        rows = _read_all(cfg, 100)[1]
        assert "outside the allowed folders" in rows[1]["error"] and rows[0]["image"] == ok
        assert "resolves to" in rows[5]["error"]  # the symlink names where it points
        # configured roots extend the list's folder; the explicit option reads anywhere
        extra = InputConfig(format=fmt, paths=[str(corpus / f"list.{fmt}")], allowed_roots=[str(outside)])
        refused = [("outside_roots", False)]
        assert _reasons(extra) == inside * 2 + refused + inside + refused + inside * 4
        anywhere = InputConfig(format=fmt, paths=[str(corpus / f"list.{fmt}")], allow_outside_paths=True)
        got = _reasons(anywhere)
        assert got == [(None, True)] * len(paths)  # /etc/passwd included: that is what the option means
    with pytest.raises(ValueError, match=r"input.allowed_roots: '.*nowhere' is not a folder"):
        plan_partitions(
            InputConfig(format="jsonl", paths=[str(corpus / "list.jsonl")], allowed_roots=[str(tmp_path / "nowhere")]),
            10,
        )


def test_only_regular_files_are_opened_and_refusals_are_rows(tmp_path):
    import threading

    folder, outside = tmp_path / "images", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    _png(folder / "a_ok.png")
    _png(outside / "secret.png")
    (folder / "b_broken.png").symlink_to(folder / "gone.png")
    os.mkfifo(folder / "c_fifo.png")
    (folder / "d_out.png").symlink_to(outside / "secret.png")
    _png(folder / "e_caption_fifo.png")
    os.mkfifo(folder / "e_caption_fifo.txt")  # a FIFO sidecar must not block either
    (folder / "f_dir.png").mkdir()  # a folder named like an image is no row (nor a reject)
    want = [
        (None, True),
        ("broken_symlink", False),
        ("not_regular_file", False),
        ("outside_roots", False),
        ("not_regular_file", True),
    ]
    (folder / "list.jsonl").write_text(
        "".join(  # inside the folder: outside/ is outside the list's folder too
            json.dumps({"img_path": n, "text_zh": "x"}) + "\n"
            for n in ("a_ok.png", "b_broken.png", "c_fifo.png", "d_out.png", "e_caption_fifo.png")
        )
    )
    got = {}

    def read():
        got["folder"] = _reasons(InputConfig(format="folder", paths=[str(folder)]), 2)
        got["jsonl"] = _reasons(InputConfig(format="jsonl", paths=[str(folder / "list.jsonl")]), 2)

    t = threading.Thread(target=read, daemon=True)  # a blocked open() must fail the test, not hang it
    t.start()
    t.join(timeout=30)
    assert not t.is_alive(), "reading a FIFO blocked"
    assert got["folder"] == want
    assert got["jsonl"] == want[:4] + [(None, True)]  # lists have no sidecars
