"""Procedurally drawn demo corpus in the original HunyuanDiT formats.

The corpus is what `hydit/data_loader/csv2arrow.py` writes (Arrow IPC *file* format, `00000.arrow`, ... with columns
`text_zh`, `md5`, `width`, `height`, `image`), the same rows as Parquet, and IndexKits-style index JSONs (a base index
and a multi-resolution index whose per-bucket indices live in a `.npz`). Images are shapes drawn with PIL in varied
sizes, aspect ratios, modes (RGB, L, RGBA, P, CMYK) and encodings (PNG, JPEG); captions describe them, mostly in
Chinese, some English or mixed, some longer than BERT's 77 tokens. Everything is a pure function of (n, seed).

`python -m stage1_encode.demo_corpus OUT [--n N] [--seed S]`
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from stage1_encode.preprocess import resolution_buckets

# (chinese, english, RGB)
COLORS = [
    ("红色", "red", (220, 40, 40)),
    ("橙色", "orange", (240, 140, 30)),
    ("黄色", "yellow", (235, 215, 40)),
    ("绿色", "green", (40, 170, 60)),
    ("青色", "cyan", (40, 200, 210)),
    ("蓝色", "blue", (40, 70, 210)),
    ("紫色", "purple", (140, 50, 180)),
    ("粉色", "pink", (240, 150, 190)),
    ("白色", "white", (250, 250, 250)),
    ("黑色", "black", (15, 15, 15)),
    ("灰色", "gray", (128, 128, 128)),
    ("棕色", "brown", (120, 70, 30)),
]
SHAPES = [
    ("圆形", "circle"),
    ("正方形", "square"),
    ("三角形", "triangle"),
    ("条纹", "stripes"),
    ("椭圆", "ellipse"),
    ("十字", "cross"),
    ("圆环", "ring"),
]
# (chinese, english, (cx, cy) as fractions of the canvas)
POSITIONS = [
    ("左上角", "top-left corner", (0.25, 0.25)),
    ("右上角", "top-right corner", (0.75, 0.25)),
    ("左下角", "bottom-left corner", (0.25, 0.75)),
    ("右下角", "bottom-right corner", (0.75, 0.75)),
    ("中间", "center", (0.5, 0.5)),
    ("上方", "top", (0.5, 0.22)),
    ("下方", "bottom", (0.5, 0.78)),
]
SIZES = [("小", "small", 0.18), ("", "", 0.3), ("大", "large", 0.45)]
# (width, height) aspect ratios, so some images are portrait and some panoramic
ASPECTS = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2), (3, 2), (2, 3)]
LONG_TAILS_ZH = [
    "画面简洁，线条清晰，色彩对比强烈，整体风格类似于现代极简主义的几何海报设计，适合作为测试图片使用",
    "光线均匀，没有阴影，边缘锐利，形状的比例协调，构图稳定，给人一种安静而有秩序的感觉",
    "这是一张程序生成的示意图，用于检验文本编码器和图像编码器能否正确处理较长的中文描述文字",
]
LONG_TAILS_EN = [
    "The drawing is flat, with crisp edges and no shading, in the style of a minimalist geometric poster.",
    "It is a procedurally generated test picture used to check long captions in the text encoders.",
]

# Rows that deliberately carry bad input, so the demo exercises stage 1's reject path and default-caption rule.
# row -> what is wrong. Only rows < n are used.
BAD_ROWS = {
    7: "corrupt_image",  # truncated PNG bytes: decode must fail and be recorded, not crash the job
    42: "empty_caption",  # "" -> the original substitutes "随机生成一张图片"
    123: "null_caption",  # null in the text_zh column
    250: "whitespace_caption",  # stripped to "" like the original
}


@dataclass(frozen=True)
class DemoRow:
    """The drawing instructions and caption of one corpus row."""

    index: int
    width: int
    height: int
    mode: str  # PIL mode the image is saved in
    fmt: str  # "PNG" | "JPEG"
    background: int  # index into COLORS
    shapes: tuple[tuple[int, int, int, int], ...]  # (shape, color, position, size) indices
    caption: str


def _row_rng(seed: int, index: int) -> random.Random:
    # One RNG per row: row i is the same whatever n is, so demo_captions(n) is a prefix of demo_captions(n + k).
    return random.Random(f"hydit-demo-{seed}-{index}")


def _describe_zh(shapes: tuple[tuple[int, int, int, int], ...], background: int) -> str:
    parts = []
    for k, (s, c, p, z) in enumerate(shapes):
        lead = "一个" if k == 0 else "还有一个"
        parts.append(f"{lead}{SIZES[z][0]}{COLORS[c][0]}的{SHAPES[s][0]}在{POSITIONS[p][0]}")
    return "，".join(parts) + f"，背景是{COLORS[background][0]}"


def _describe_en(shapes: tuple[tuple[int, int, int, int], ...], background: int) -> str:
    parts = []
    for k, (s, c, p, z) in enumerate(shapes):
        size = f"{SIZES[z][1]} " if SIZES[z][1] else ""
        lead = "A" if k == 0 else "and a"
        parts.append(f"{lead} {size}{COLORS[c][1]} {SHAPES[s][1]} in the {POSITIONS[p][1]}")
    return ", ".join(parts) + f", on a {COLORS[background][1]} background."


def _describe_mixed(shapes: tuple[tuple[int, int, int, int], ...], background: int) -> str:
    s, c, p, z = shapes[0]
    return (
        f"一个{COLORS[c][1]}的{SHAPES[s][0]} ({SHAPES[s][1]}) 在{POSITIONS[p][0]}, background {COLORS[background][1]}"
    )


def demo_row(index: int, seed: int = 0) -> DemoRow:
    """Drawing instructions and caption of row `index` (a pure function of index and seed)."""
    rng = _row_rng(seed, index)
    aw, ah = rng.choice(ASPECTS)
    long_side = rng.randint(48, 400)
    if aw >= ah:
        width, height = long_side, max(24, round(long_side * ah / aw))
    else:
        width, height = max(24, round(long_side * aw / ah)), long_side
    mode = rng.choices(["RGB", "L", "RGBA", "P", "CMYK"], weights=[10, 2, 2, 2, 1])[0]
    if mode in ("RGBA", "P"):
        fmt = "PNG"
    elif mode == "CMYK":
        fmt = "JPEG"
    else:
        fmt = rng.choice(["PNG", "JPEG"])
    background = rng.randrange(len(COLORS))
    n_shapes = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    shapes = []
    for _ in range(n_shapes):
        color = rng.randrange(len(COLORS))
        while color == background:
            color = rng.randrange(len(COLORS))
        shapes.append((rng.randrange(len(SHAPES)), color, rng.randrange(len(POSITIONS)), rng.randrange(len(SIZES))))
    shapes_t = tuple(shapes)
    language = rng.choices(["zh", "en", "mixed"], weights=[8, 1, 1])[0]
    if language == "zh":
        caption = _describe_zh(shapes_t, background)
        if rng.random() < 0.15:  # long: well past 77 BERT tokens (one token per Chinese character)
            caption += "。" + "。".join(rng.sample(LONG_TAILS_ZH, k=2)) + "。"
        if mode == "L":
            caption += "，黑白照片"
    elif language == "en":
        caption = _describe_en(shapes_t, background)
        if rng.random() < 0.15:
            caption += " " + " ".join(LONG_TAILS_EN)
    else:
        caption = _describe_mixed(shapes_t, background)
    return DemoRow(index, width, height, mode, fmt, background, shapes_t, caption)


def demo_captions(n: int, seed: int = 0) -> list[str]:
    """The captions of the first `n` demo rows, e.g. to train the tiny suite's tokenizers on."""
    return [demo_row(i, seed).caption for i in range(n)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: int, color: tuple, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    name = SHAPES[shape][1]
    if name == "circle":
        side = min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.ellipse((cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2), fill=color)
    elif name == "square":
        side = min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2), fill=color)
    elif name == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)
    elif name == "stripes":
        step = max(2, (x1 - x0) // 6)
        for x in range(x0, x1, 2 * step):
            draw.rectangle((x, y0, min(x + step - 1, x1), y1), fill=color)
    elif name == "ellipse":
        draw.ellipse(box, fill=color)
    elif name == "cross":
        tx, ty = max(1, (x1 - x0) // 6), max(1, (y1 - y0) // 6)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - tx, y0, cx + tx, y1), fill=color)
        draw.rectangle((x0, cy - ty, x1, cy + ty), fill=color)
    elif name == "ring":
        width = max(1, min(x1 - x0, y1 - y0) // 6)
        draw.ellipse(box, outline=color, width=width)
    else:  # pragma: no cover - SHAPES and this function are edited together
        raise AssertionError(name)


def render_row(row: DemoRow) -> Image.Image:
    """Draw the row's image in its storage mode."""
    img = Image.new("RGB", (row.width, row.height), COLORS[row.background][2])
    draw = ImageDraw.Draw(img)
    for shape, color, position, size in row.shapes:
        fx, fy = POSITIONS[position][2]
        half = SIZES[size][2] * min(row.width, row.height)
        cx, cy = fx * row.width, fy * row.height
        box = (int(cx - half), int(cy - half), int(cx + half), int(cy + half))
        _draw_shape(draw, shape, COLORS[color][2], box)
    if row.mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.new("L", img.size, 255 - (row.index % 4) * 40))
    elif row.mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    elif row.mode != "RGB":
        img = img.convert(row.mode)
    return img


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def demo_records(n: int, seed: int = 0, bad_rows: bool = True) -> list[dict[str, Any]]:
    """The corpus rows as csv2arrow would store them: text_zh, md5, width, height, image."""
    records = []
    for i in range(n):
        row = demo_row(i, seed)
        img = render_row(row)
        data = encode_image(img, row.fmt)
        caption: str | None = row.caption
        width, height = img.size
        problem = BAD_ROWS.get(i) if bad_rows else None
        if problem == "corrupt_image":
            data = data[: len(data) // 3]
        elif problem == "empty_caption":
            caption = ""
        elif problem == "null_caption":
            caption = None
        elif problem == "whitespace_caption":
            caption = "  \n\t "
        records.append(
            {
                "text_zh": caption,
                "md5": hashlib.md5(data).hexdigest(),
                "width": width,
                "height": height,
                "image": data,
            }
        )
    return records


SCHEMA = pa.schema(
    [
        ("text_zh", pa.string()),
        ("md5", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("image", pa.binary()),
    ]
)


def _table(records: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=SCHEMA)


def _calc_buckets(base_size: int, step: int, align: int = 16) -> list[tuple[int, int]]:
    """(h, w) buckets of IndexKits' ResolutionGroup(base_size, step): stage 1's own rule, so the demo index and
    stage 1 agree."""
    return [tuple(b) for b in resolution_buckets(base_size, step, align)]


def write_index_json(
    path: Path, arrow_files: list[Path], row_counts: list[int], indices: list[int], config_file: str = ""
) -> Path:
    """An IndexKits Index V2 base index (`idk base -t json` layout) selecting global rows `indices`."""
    cum = np.cumsum(row_counts).tolist()
    group_length = [0] * len(arrow_files)
    for g in indices:
        group_length[int(np.searchsorted(cum, g, side="right"))] += 1
    doc = {
        "data_type": ["demo corpus: rows with width>=64 and height>=64", "Keep md5 duplicates."],
        "config_file": config_file,
        "indices_file": "",
        "arrow_files": [str(p.resolve()) for p in arrow_files],
        "cum_length": cum,
        "group_length": group_length,
        "indices": [int(i) for i in indices],
        "example_indices": [],
    }
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1))
    return path


def write_multireso_json(
    path: Path,
    arrow_files: list[Path],
    row_counts: list[int],
    sizes: list[tuple[int, int]],
    base_size: int = 256,
    step: int = 64,
    min_size: int = 64,
) -> Path:
    """An IndexKits multi-resolution index: per "HxW" bucket, the global rows whose h/w ratio is nearest to it."""
    buckets = _calc_buckets(base_size, step)
    ratios = np.array([h / w for h, w in buckets])
    cum = np.cumsum(row_counts)
    groups: dict[str, list[int]] = {}
    group_length: dict[str, list[int]] = {}
    for g, (w, h) in enumerate(sizes):
        if w < min_size or h < min_size:
            continue
        bh, bw = buckets[int(np.argmin(np.abs(ratios - h / w)))]
        name = f"{bh}x{bw}"
        groups.setdefault(name, []).append(g)
        counts = group_length.setdefault(name, [0] * len(arrow_files))
        counts[int(np.searchsorted(cum, g, side="right"))] += 1
    npz_path = path.with_name(path.name.removesuffix(".json") + ".index.npz")
    np.savez(npz_path, **{k: np.asarray(v, dtype=np.int64) for k, v in groups.items()})
    doc = {
        "data_type": [
            f"base_size: {base_size}",
            f"reso_step: {step}",
            "target_ratios: None",
            "align: 16",
            f"min_size: {min_size}",
            "src: demo corpus",
        ],
        "config_file": "",
        "indices_file": npz_path.name,
        "arrow_files": [str(p.resolve()) for p in arrow_files],
        "cum_length": cum.tolist(),
        "group_length": group_length,
        "indices": {},
        "example_indices": [],
    }
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1))
    return path


def write_demo_corpus(
    out_dir: str | Path, n: int = 300, seed: int = 0, rows_per_file: int = 100, bad_rows: bool = True
) -> dict[str, Any]:
    """Write the demo corpus under `out_dir`; returns its paths.

    Layout: `arrow/00000.arrow ...`, `arrow/index.json` (base index: rows at least 64 px on both sides),
    `arrow/index_mt.json` + `arrow/index_mt.index.npz` (multi-resolution index, base 256), `parquet/00000.parquet ...`
    (same rows, row groups of 25), `captions.txt` (one caption a line, for tokenizer training).
    With `bad_rows`, the rows in BAD_ROWS carry a truncated image or an empty/null caption (returned as "bad_rows").
    """
    if n < 1 or rows_per_file < 1:
        raise ValueError(f"n and rows_per_file must be >= 1, got n={n}, rows_per_file={rows_per_file}")
    out = Path(out_dir)
    arrow_dir, parquet_dir = out / "arrow", out / "parquet"
    arrow_dir.mkdir(parents=True, exist_ok=True)
    parquet_dir.mkdir(parents=True, exist_ok=True)
    records = demo_records(n, seed, bad_rows)
    arrow_files, parquet_files, row_counts = [], [], []
    for f, start in enumerate(range(0, n, rows_per_file)):
        table = _table(records[start : start + rows_per_file])
        arrow_path = arrow_dir / f"{f:05d}.arrow"
        # Small record batches so readers must handle partitions that span several batches.
        with pa.OSFile(str(arrow_path), "wb") as sink, pa.RecordBatchFileWriter(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=32):
                writer.write_batch(batch)
        parquet_path = parquet_dir / f"{f:05d}.parquet"
        pq.write_table(table, parquet_path, row_group_size=25)
        arrow_files.append(arrow_path)
        parquet_files.append(parquet_path)
        row_counts.append(table.num_rows)
    sizes = [(r["width"], r["height"]) for r in records]
    selected = [g for g, (w, h) in enumerate(sizes) if w >= 64 and h >= 64]
    index_json = write_index_json(arrow_dir / "index.json", arrow_files, row_counts, selected)
    multireso_json = write_multireso_json(arrow_dir / "index_mt.json", arrow_files, row_counts, sizes)
    captions_txt = out / "captions.txt"
    # One caption per line (newlines inside captions would split them; the generator never makes any).
    captions_txt.write_text("\n".join(demo_captions(n, seed)) + "\n")
    return {
        "root": out,
        "arrow_dir": arrow_dir,
        "arrow_files": arrow_files,
        "parquet_dir": parquet_dir,
        "parquet_files": parquet_files,
        "index_json": index_json,
        "multireso_json": multireso_json,
        "multireso_npz": multireso_json.with_name("index_mt.index.npz"),
        "captions": captions_txt,
        "n": n,
        "bad_rows": {i: why for i, why in BAD_ROWS.items() if bad_rows and i < n},
    }


def write_demo_image_list(out_dir: str | Path, n: int = 20, seed: int = 0) -> dict[str, Path]:
    """The first `n` demo rows as loose files: `images/<i>.png|jpg` + sidecar `<i>.txt`, `list.jsonl`, `list.csv`.

    The JSONL/CSV use the original csv2arrow column names (`img_path`, `text_zh`), with paths relative to the list.
    """
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row = demo_row(i, seed)
        ext = "jpg" if row.fmt == "JPEG" else "png"
        name = f"{i:05d}.{ext}"
        (img_dir / name).write_bytes(encode_image(render_row(row), row.fmt))
        (img_dir / f"{i:05d}.txt").write_text(row.caption)
        rows.append({"img_path": f"images/{name}", "text_zh": row.caption})
    jsonl = out / "list.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    csv_path = out / "list.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["img_path", "text_zh"])
        writer.writeheader()
        writer.writerows(rows)
    return {"root": out, "images": img_dir, "jsonl": jsonl, "csv": csv_path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stage1_encode.demo_corpus",
        description="Write the procedurally drawn demo corpus: Arrow IPC files (the original HunyuanDiT format) with "
        "IndexKits index JSONs, the same rows as Parquet, and captions.txt.",
    )
    parser.add_argument("out", type=Path, help="output folder (arrow/, parquet/, captions.txt are written inside)")
    parser.add_argument("--n", type=int, default=300, help="number of rows (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawings and captions (default 0)")
    parser.add_argument("--rows-per-file", type=int, default=100, help="rows per .arrow/.parquet file (default 100)")
    parser.add_argument(
        "--no-bad-rows", action="store_true", help="leave out the rows with a corrupt image or empty/null caption"
    )
    parser.add_argument(
        "--image-list",
        type=int,
        default=0,
        metavar="N",
        help="also write the first N rows as an image folder with .txt sidecars, list.jsonl and list.csv (in loose/)",
    )
    args = parser.parse_args(argv)
    paths = write_demo_corpus(args.out, args.n, args.seed, args.rows_per_file, bad_rows=not args.no_bad_rows)
    if args.image_list:
        write_demo_image_list(args.out / "loose", args.image_list, args.seed)
    print(f"wrote {paths['n']} rows: {len(paths['arrow_files'])} arrow + {len(paths['parquet_files'])} parquet files")
    print(f"  arrow:    {paths['arrow_dir']}")
    print(f"  parquet:  {paths['parquet_dir']}")
    print(f"  index:    {paths['index_json']} (base), {paths['multireso_json']} (multi-resolution)")
    print(f"  captions: {paths['captions']}")
    if paths["bad_rows"]:
        print(f"  deliberately bad rows: {paths['bad_rows']}")


if __name__ == "__main__":
    main()
