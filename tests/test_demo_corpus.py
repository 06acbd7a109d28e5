import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stage1_encode import demo_corpus
from stage1_encode.demo_corpus import BAD_ROWS, demo_captions, write_demo_corpus, write_demo_image_list

N = 130  # covers bad rows 7, 42 and 123


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), n=N, seed=0, rows_per_file=50)


def _read_arrow(path):
    # exactly how the original IndexKits loader opens a file
    return pa.ipc.RecordBatchFileReader(pa.memory_map(str(path))).read_all()


def test_arrow_files_have_the_original_csv2arrow_layout(corpus):
    names = [p.name for p in corpus["arrow_files"]]
    assert names == ["00000.arrow", "00001.arrow", "00002.arrow"]
    tables = [_read_arrow(p) for p in corpus["arrow_files"]]
    assert [t.num_rows for t in tables] == [50, 50, 30]
    schema = tables[0].schema
    assert schema.names == ["text_zh", "md5", "width", "height", "image"]
    assert schema.field("width").type == pa.int64() and schema.field("height").type == pa.int64()
    assert schema.field("image").type == pa.binary() and schema.field("text_zh").type == pa.string()
    table = pa.concat_tables(tables)
    for i, rec in enumerate(table.to_pylist()):
        assert rec["md5"] == hashlib.md5(rec["image"]).hexdigest()
        if BAD_ROWS.get(i) == "corrupt_image":
            with pytest.raises(OSError):  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
                Image.open(io.BytesIO(rec["image"])).convert("RGB")
            continue
        img = Image.open(io.BytesIO(rec["image"]))
        assert img.size == (rec["width"], rec["height"])


def test_parquet_holds_the_same_rows(corpus):
    arrow = pa.concat_tables([_read_arrow(p) for p in corpus["arrow_files"]])
    parquet = pa.concat_tables([pq.read_table(p) for p in corpus["parquet_files"]])
    assert parquet.to_pylist() == arrow.to_pylist()
    assert pq.ParquetFile(corpus["parquet_files"][0]).metadata.num_row_groups == 2  # row groups of 25


def test_variety_of_modes_formats_sizes_and_captions(corpus):
    table = pa.concat_tables([_read_arrow(p) for p in corpus["arrow_files"]])
    modes, formats = set(), set()
    for i, rec in enumerate(table.to_pylist()):
        if i in BAD_ROWS:
            continue
        img = Image.open(io.BytesIO(rec["image"]))
        modes.add(img.mode)
        formats.add(img.format)
        assert 24 <= min(img.size) and max(img.size) <= 400
    assert {"RGB", "L", "RGBA", "P", "CMYK"} <= modes
    assert formats == {"PNG", "JPEG"}
    widths, heights = np.array(table["width"]), np.array(table["height"])
    ratios = widths / heights
    assert ratios.min() < 0.7 and ratios.max() > 1.5  # portrait and landscape
    caps = demo_captions(N)
    assert any(len(c) > 77 for c in caps)  # longer than BERT's 77 tokens (one token per Chinese character)
    assert any(c.isascii() for c in caps)  # English
    assert sum("背景是" in c for c in caps) > N // 2  # mostly Chinese
    assert len(set(caps)) > N * 0.9


def test_bad_rows_are_where_the_result_says(corpus):
    assert corpus["bad_rows"] == {7: "corrupt_image", 42: "empty_caption", 123: "null_caption"}
    table = pa.concat_tables([_read_arrow(p) for p in corpus["arrow_files"]])
    caps = table["text_zh"].to_pylist()
    assert caps[42] == "" and caps[123] is None
    good = demo_captions(N)
    assert [c for i, c in enumerate(caps) if i not in BAD_ROWS] == [c for i, c in enumerate(good) if i not in BAD_ROWS]


def test_deterministic_and_seeded(tmp_path, corpus):
    again = write_demo_corpus(tmp_path / "a", n=N, seed=0, rows_per_file=50)
    for p, q in zip(corpus["arrow_files"], again["arrow_files"]):
        assert _read_arrow(p).equals(_read_arrow(q))
    other = write_demo_corpus(tmp_path / "b", n=20, seed=1, rows_per_file=50, bad_rows=False)
    assert other["bad_rows"] == {}
    assert (
        _read_arrow(other["arrow_files"][0])["md5"].to_pylist()
        != _read_arrow(corpus["arrow_files"][0])["md5"].to_pylist()[:20]
    )
    assert demo_captions(10) == demo_captions(50)[:10]  # row i does not depend on n
    assert demo_captions(10, seed=1) != demo_captions(10, seed=0)
    assert (corpus["captions"].read_text().splitlines()) == demo_captions(N)


def test_index_jsons(corpus):
    doc = json.loads(corpus["index_json"].read_text())
    assert set(doc) >= {
        "data_type",
        "config_file",
        "indices_file",
        "arrow_files",
        "cum_length",
        "group_length",
        "indices",
        "example_indices",
    }
    assert doc["cum_length"] == [50, 100, 130]
    assert sum(doc["group_length"]) == len(doc["indices"])
    table = pa.concat_tables([_read_arrow(p) for p in doc["arrow_files"]])
    w, h = np.array(table["width"]), np.array(table["height"])
    assert doc["indices"] == np.nonzero((w >= 64) & (h >= 64))[0].tolist()

    mt = json.loads(corpus["multireso_json"].read_text())
    assert mt["indices"] == {} and mt["indices_file"] == "index_mt.index.npz"
    with np.load(corpus["multireso_npz"], allow_pickle=False) as z:
        groups = {k: z[k] for k in z.files}
    assert set(groups) == set(mt["group_length"])
    for name, idx in groups.items():
        bh, bw = map(int, name.split("x"))
        assert sum(mt["group_length"][name]) == len(idx)
        for g in idx:  # each row sits in a bucket whose aspect is on the same side of square
            assert (h[g] / w[g] - 1) * (bh / bw - 1) >= 0 or bh == bw
    assert sorted(np.concatenate(list(groups.values())).tolist()) == doc["indices"]


def test_image_list_and_cli(tmp_path, capsys):
    paths = write_demo_image_list(tmp_path / "loose", n=5)
    assert len(list(paths["images"].glob("*.txt"))) == 5
    first = json.loads(paths["jsonl"].read_text().splitlines()[0])
    assert first == {"img_path": first["img_path"], "text_zh": demo_captions(1)[0]}
    assert (paths["root"] / first["img_path"]).exists()
    demo_corpus.main([str(tmp_path / "cli"), "--n", "12", "--seed", "3", "--rows-per-file", "5"])
    out = capsys.readouterr().out
    assert "wrote 12 rows: 3 arrow + 3 parquet files" in out
    assert (tmp_path / "cli" / "arrow" / "00002.arrow").exists()
    with pytest.raises(ValueError, match="n and rows_per_file"):
        write_demo_corpus(tmp_path / "bad", n=0)
