"""examples/inspect_cache.ipynb runs headless on a small cache with a tiny random VAE; decode gives an image."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
import torch

from shared.cache import open_cache, write_synthetic_cache
from shared.cli import main as cli_main
from shared.schema import CacheSpec

ROOT = Path(__file__).resolve().parents[1]


def _tiny_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_and_vae(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nb")
    spec = CacheSpec(format="webdataset", views=("plain", "flip"), clip_len=12, clip_dim=16, t5_len=24, t5_dim=20)
    write_synthetic_cache(tmp / "cache", spec, n_samples=6, n_shards=2, buckets=((64, 64), (32, 64)))
    return tmp / "cache", _tiny_vae(tmp / "vae")


def test_decode_and_grid(cache_and_vae, tmp_path):
    cache_dir, vae = cache_and_vae
    cache = open_cache(cache_dir)
    with pytest.raises(ValueError, match="decode needs a VAE"):
        cache.decode(0)
    im = cache.decode(1, vae_path=vae, view="flip")
    assert im.size == (64, 32) and im.mode == "RGB"  # bucket (H, W) = (32, 64)
    out = tmp_path / "grid.png"
    assert cli_main(["inspect", str(cache_dir), "--grid", str(out), "--vae", str(vae), "-n", "3"]) == 0
    assert out.stat().st_size > 0


def test_notebook_executes_headless(cache_and_vae):
    from nbclient import NotebookClient

    cache_dir, vae = cache_and_vae
    nb = nbformat.read(ROOT / "examples" / "inspect_cache.ipynb", as_version=4)
    env = {"HYDIT_CACHE": str(cache_dir), "HYDIT_VAE": str(vae), "HYDIT_REPO": str(ROOT)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=120, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "samples 6" in text and "bucket (64, 64)" in text and "empty caption: BERT tokens 2" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
