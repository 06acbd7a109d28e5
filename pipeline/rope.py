"""2D rotary position tables for image tokens, built exactly as the original HunyuanDiT.

The original (``hydit/modules/posemb_layers.py``) builds, per image resolution, real ``cos``/``sin`` tables of shape
(tokens, head_dim) in fp32. Three rules place the token grid on RoPE coordinates:

* ``extend``: integer positions ``0..th-1`` and ``0..tw-1``;
* ``base512`` / ``base1024``: the (th, tw) token grid is fitted inside a square base grid (``N // 8 // patch``
  tokens a side) keeping the aspect ratio, centred, and sampled with ``linspace(start, stop, num, endpoint=False)``;
  1024x1024 with base512 therefore gets positions 0, 0.5, ..., 31.5.

The first half of the head dim encodes the column (w) coordinate, the second half the row (h) coordinate, and each
frequency is repeated for an adjacent pair of dims (2i, 2i+1) -- the LLaMA complex-pair convention.
"""

from __future__ import annotations

import numpy as np
import torch

ROPE_IMG_CHOICES: tuple[str, ...] = ("extend", "base512", "base1024")
# `downsample` below is the VAE's (pixels per latent cell): the caller passes the cache manifest's or the VAE's
# value. The original hard-codes 8 (``reso // 8 // patch_size``), the SDXL VAE's, which is the default here.


def fill_resize_and_crop(grid: tuple[int, int], base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fit a (th, tw) grid inside a base x base square keeping its aspect; return (start, stop) as (row, col).

    Python's ``round`` (banker's rounding) is used on purpose: the original does, and e.g. a 2.5 offset becomes 2.
    """
    h, w = grid
    if h / w > 1.0:  # taller than the (square) base: the height fills it
        resize_h, resize_w = base, int(round(base / h * w))
    else:
        resize_w, resize_h = base, int(round(base / w * h))
    top = int(round((base - resize_h) / 2.0))
    left = int(round((base - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def grid_positions(
    rope_img: str, patch_size: int, th: int, tw: int, downsample: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32, length th and tw) of the token grid under a ``rope_img`` rule."""
    if rope_img == "extend":
        start, stop = (0, 0), (th, tw)
    elif rope_img in ("base512", "base1024"):
        base = int(rope_img[4:]) // downsample // patch_size
        start, stop = fill_resize_and_crop((th, tw), base)
    else:
        raise ValueError(f"rope_img={rope_img!r} is not supported; choose one of {ROPE_IMG_CHOICES}")
    rows = np.linspace(start[0], stop[0], th, endpoint=False, dtype=np.float32)
    cols = np.linspace(start[1], stop[1], tw, endpoint=False, dtype=np.float32)
    return rows, cols


def _axis_cos_sin(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Same op order and dtypes as the original's get_1d_rotary_pos_embed, so the tables are bit-identical.
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))  # (dim/2,)
    angles = torch.outer(pos, freqs).float()  # (N, dim/2)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)  # (N, dim) each


def rope_tables(
    height: int, width: int, head_dim: int, patch_size: int = 2, rope_img: str = "base512", downsample: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real RoPE tables (cos, sin), each (tokens, head_dim) fp32, for an image of height x width pixels."""
    if head_dim % 4 != 0:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for 2D RoPE (two axes, pairs of dims)")
    step = downsample * patch_size
    if height % step or width % step or height <= 0 or width <= 0:
        raise ValueError(
            f"image size {height}x{width} must be positive multiples of {step} (VAE {downsample}x times patch)"
        )
    th, tw = height // step, width // step
    rows, cols = grid_positions(rope_img, patch_size, th, tw, downsample)
    col_grid, row_grid = np.meshgrid(cols, rows)  # (th, tw) each; tokens are row-major
    cos_w, sin_w = _axis_cos_sin(head_dim // 2, torch.from_numpy(col_grid.reshape(-1)))  # (N, d/2)
    cos_h, sin_h = _axis_cos_sin(head_dim // 2, torch.from_numpy(row_grid.reshape(-1)))  # (N, d/2)
    cos = torch.cat([cos_w, cos_h], dim=1)  # (N, d): first half = column, second half = row
    sin = torch.cat([sin_w, sin_h], dim=1)  # (N, d)
    return cos, sin


class RopeCache:
    """Builds RoPE tables once per (height, width) pixel bucket, like the original's start-up dict."""

    def __init__(self, head_dim: int, patch_size: int = 2, rope_img: str = "base512", downsample: int = 8) -> None:
        if rope_img not in ROPE_IMG_CHOICES:
            raise ValueError(f"rope_img={rope_img!r} is not supported; choose one of {ROPE_IMG_CHOICES}")
        if downsample < 1:
            raise ValueError(f"downsample={downsample} must be >= 1 (the VAE's pixels per latent cell)")
        self.head_dim, self.patch_size, self.rope_img, self.downsample = head_dim, patch_size, rope_img, downsample
        self._tables: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, height: int, width: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for an image of height x width pixels, each (tokens, head_dim) fp32 on ``device``."""
        key = (int(height), int(width), str(device or "cpu"))
        if key not in self._tables:
            cos, sin = rope_tables(
                int(height), int(width), self.head_dim, self.patch_size, self.rope_img, self.downsample
            )
            self._tables[key] = (cos.to(device or "cpu"), sin.to(device or "cpu"))
        return self._tables[key]

    def __len__(self) -> int:
        return len(self._tables)
