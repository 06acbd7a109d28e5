"""examples/inspect_cache.ipynb runs headless on a small cache and decodes samples through a tiny random VAE.

The VAE is a committed 45 KB fixture (tests/fixtures/cache_tiny_vae) so that only the notebook kernel pays for
importing diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

from shared.cache import open_cache
from shared.cli import main as cli_main
from shared.inspection import write_synthetic_cache
from shared.schema import CacheSpec

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = ROOT / "tests" / "fixtures" / "cache_tiny_vae"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nb") / "cache"
    spec = CacheSpec(format="webdataset", views=("plain", "flip"), clip_len=12, clip_dim=16, t5_len=24, t5_dim=20)
    write_synthetic_cache(root, spec, n_samples=6, n_shards=2, buckets=((64, 64), (32, 64)))
    return root


def test_decode_needs_a_vae(cache_dir):
    cache = open_cache(cache_dir)
    with pytest.raises(ValueError, match="decode needs a VAE"):
        cache.decode(0)
    with pytest.raises(ValueError, match="view 'mirror' is not in this cache"):
        cache.decode(0, vae_path=TINY_VAE, view="mirror")
    assert cli_main(["inspect", str(cache_dir), "--grid", "g.png"]) == 2  # --grid without --vae


def test_notebook_executes_headless_and_decodes(cache_dir, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "examples" / "inspect_cache.ipynb", as_version=4)
    # the last cell also runs the CLI's --grid path, so the kernel imports diffusers once for both
    grid = tmp_path / "grid.png"
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "from shared.cli import main\n"
            f"assert main(['inspect', CACHE, '--grid', {str(grid)!r}, '--vae', VAE, '-n', '3']) == 0\n"
            "flipped = cache.decode(1, view='flip')\n"
            "print('flip decode', flipped.size, flipped.mode)"
        )
    )
    env = {"HYDIT_CACHE": str(cache_dir), "HYDIT_VAE": str(TINY_VAE), "HYDIT_REPO": str(ROOT)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "examples")}}
        ).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "samples 6" in text and "bucket (64, 64)" in text and "empty caption: BERT tokens 2" in text
    assert "(64, 64)" in text  # decode(0): a 64x64 image from an 8x8 latent
    assert "flip decode (64, 32) RGB" in text  # sample 1 is in bucket (H, W) = (32, 64)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    assert grid.stat().st_size > 0
