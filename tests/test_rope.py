"""RoPE tables: bit-exact with the original, and the rules of its three modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dit_helpers import GOLDEN, single_thread  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file

from pipeline.rope import RopeCache, fill_resize_and_crop, grid_positions, rope_tables

pytestmark = pytest.mark.exact  # golden tables bit for bit: cos/sin kernels differ between CPUs


def test_1024_base512_table_is_bit_exact() -> None:
    golden = load_file(str(GOLDEN / "rope_1024x1024_base512.safetensors"))
    cos, sin = rope_tables(1024, 1024, head_dim=88, patch_size=2, rope_img="base512")
    assert cos.shape == sin.shape == (4096, 88) and cos.dtype == torch.float32
    assert torch.equal(cos, golden["cos"]) and torch.equal(sin, golden["sin"])


def test_non_square_base512_matches_golden_inputs() -> None:
    # The golden model inputs were built by the original for a 64x96 image (token grid 4x6, head_dim 16).
    data = load_file(str(GOLDEN / "hydit_tiny_v1.2.safetensors"))
    cos, sin = rope_tables(64, 96, head_dim=16, patch_size=2, rope_img="base512")
    assert torch.equal(cos, data["inputs.cos_cis_img"]) and torch.equal(sin, data["inputs.sin_cis_img"])


def test_fill_resize_and_crop_examples() -> None:
    assert fill_resize_and_crop((64, 64), 32) == ((0, 0), (32, 32))
    assert fill_resize_and_crop((48, 80), 32) == ((6, 0), (25, 32))  # 768x1280, spec section 3
    # round(1.5) == 2 and round(2.5) == 2 (banker's rounding): a 27-row grid -> offset round(2.5) = 2.
    assert fill_resize_and_crop((27, 32), 32) == ((2, 0), (29, 32))


def test_modes_positions() -> None:
    rows, cols = grid_positions("base512", 2, 64, 64)
    np.testing.assert_array_equal(rows, np.arange(64, dtype=np.float32) * 0.5)
    rows, cols = grid_positions("extend", 2, 48, 80)
    np.testing.assert_array_equal(rows, np.arange(48, dtype=np.float32))
    np.testing.assert_array_equal(cols, np.arange(80, dtype=np.float32))
    rows, cols = grid_positions("base1024", 2, 64, 64)
    np.testing.assert_array_equal(rows, np.arange(64, dtype=np.float32))
    with pytest.raises(ValueError, match="rope_img"):
        grid_positions("base2048x", 2, 4, 4)


def test_first_half_encodes_the_column() -> None:
    cos, sin = rope_tables(256, 256, head_dim=16, rope_img="extend")  # 16x16 tokens
    # token 1 = (row 0, col 1): differs from token 0 only in the first half.
    assert not torch.equal(cos[1, :8], cos[0, :8]) and torch.equal(cos[1, 8:], cos[0, 8:])
    # token 16 = (row 1, col 0): only the second half.
    assert torch.equal(cos[16, :8], cos[0, :8]) and not torch.equal(cos[16, 8:], cos[0, 8:])
    # adjacent pairs share a frequency
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(sin[:, 0::2], sin[:, 1::2])


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        rope_tables(100, 128, head_dim=16)
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_tables(128, 128, head_dim=18)


def test_cache_builds_once_per_bucket() -> None:
    cache = RopeCache(head_dim=16, patch_size=2, rope_img="base512")
    a = cache.get(768, 1280)
    b = cache.get(768, 1280)
    assert a[0] is b[0] and len(cache) == 1
    cache.get(1024, 1024)
    assert len(cache) == 2
    with pytest.raises(ValueError):
        RopeCache(16, 2, "base300")


def test_diffusers_tables_differ_for_offset_grids_only() -> None:
    emb = pytest.importorskip("diffusers.models.embeddings")
    # Square: crop start is 0, diffusers' stop*(n-1)/n trick equals endpoint=False.
    d_cos, _ = emb.get_2d_rotary_pos_embed(16, ((0, 0), (32, 32)), (64, 64), use_real=True)
    cos, _ = rope_tables(1024, 1024, head_dim=16)
    torch.testing.assert_close(d_cos, cos, rtol=0, atol=1e-6)
    # 768x1280: rows start at 6 -> diffusers' grid differs from the original's (recorded by export_diffusers).
    d_cos, _ = emb.get_2d_rotary_pos_embed(16, ((6, 0), (25, 32)), (48, 80), use_real=True)
    cos, _ = rope_tables(768, 1280, head_dim=16)
    assert (d_cos - cos).abs().max() > 1e-2


def test_the_vae_downsample_comes_from_the_caller():
    """A 16x VAE: 64 px are 4 latent cells, 2 tokens of patch 2 a side (not 4); base512 spans 512/16/2 = 16."""
    cos8, _ = rope_tables(64, 64, head_dim=16, patch_size=2, rope_img="base512")
    cos16, _ = rope_tables(64, 64, head_dim=16, patch_size=2, rope_img="base512", downsample=16)
    assert cos8.shape == (16, 16) and cos16.shape == (4, 16)
    rows, _ = grid_positions("base512", 2, 2, 2, downsample=16)
    assert rows.tolist() == [0.0, 8.0]  # 2 tokens over a 16-token base
    assert RopeCache(16, 2, "base512", downsample=16).get(64, 64)[0].shape == (4, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        rope_tables(48, 64, head_dim=16, downsample=16)
