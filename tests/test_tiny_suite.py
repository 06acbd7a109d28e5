"""The offline tiny encoder suite: layout, real architectures, determinism, CLI."""

import json
from pathlib import Path

import pytest

from pipeline.encoders import SUBFOLDERS, EncoderDtypes, load_encoders
from pipeline.tiny_suite import TinySizes, main, write_tiny_suite


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_seed0(tmp_path_factory):
    a = write_tiny_suite(tmp_path_factory.mktemp("a"), seed=0)
    b = write_tiny_suite(tmp_path_factory.mktemp("b"), seed=0)
    return a, b


def test_layout_and_architectures(two_seed0):
    root = two_seed0[0]
    for sub in SUBFOLDERS.values():
        assert (root / sub).is_dir()
    assert not list(root.glob(".*.tmp")), "staging folders must be renamed away"
    vae = json.loads((root / "sdxl-vae-fp16-fix" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKL" and vae["latent_channels"] == 4
    assert len(vae["block_out_channels"]) == 4 and vae["scaling_factor"] == 0.13025
    t5 = json.loads((root / "mt5" / "config.json").read_text())
    assert t5["model_type"] == "mt5" and t5["feed_forward_proj"] == "gated-gelu"
    assert (t5["relative_attention_num_buckets"], t5["relative_attention_max_distance"]) == (32, 128)
    bert = json.loads((root / "clip_text_encoder" / "config.json").read_text())
    assert bert["model_type"] == "bert" and bert["max_position_embeddings"] >= 77
    vocab = (root / "tokenizer" / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert "猫" in vocab and "photo" in vocab


def test_same_seed_is_byte_identical(two_seed0):
    a, b = two_seed0
    assert _files(a) == _files(b)
    fa = load_encoders(a, EncoderDtypes(t5="float32")).fingerprint()
    fb = load_encoders(b, EncoderDtypes(t5="float32")).fingerprint()
    assert fa == fb


def test_other_seed_changes_weights_not_tokenizers(two_seed0, tmp_path):
    a = two_seed0[0]
    c = write_tiny_suite(tmp_path / "c", seed=1)
    fa = load_encoders(a, EncoderDtypes(t5="float32")).fingerprint()
    fc = load_encoders(c, EncoderDtypes(t5="float32")).fingerprint()
    for key in ("vae", "clip", "t5"):
        assert fa[key]["weights"] != fc[key]["weights"], key
        assert fa[key]["config"] == fc[key]["config"], key
    assert fa["clip_tokenizer"] == fc["clip_tokenizer"] and fa["t5_tokenizer"] == fc["t5_tokenizer"]


def test_captions_extend_the_tokenizers(tmp_path):
    root = write_tiny_suite(tmp_path / "s", seed=0, captions=["Ωμέγα zebrafish ☃"])
    enc = load_encoders(root, EncoderDtypes(t5="float32"))
    assert "zebrafish" in enc.clip_tokenizer.get_vocab() and "ω" in enc.clip_tokenizer.get_vocab()
    ids = enc.tokenize(["Ωμέγα ☃"])["t5_ids"][0]
    assert enc.t5_tokenizer.unk_token_id not in ids.tolist()


def test_existing_folder_needs_overwrite(tmp_path):
    root = write_tiny_suite(tmp_path / "s", seed=0)
    with pytest.raises(FileExistsError, match="sdxl-vae-fp16-fix exists"):
        write_tiny_suite(root, seed=0)
    write_tiny_suite(root, seed=2, overwrite=True)
    assert json.loads((root / "tiny_suite.json").read_text())["seed"] == 2


def test_presets_and_bad_values():
    bench = TinySizes.preset("bench")
    assert bench == TinySizes.bench()
    assert (bench.vae_block_out_channels, bench.vae_layers_per_block, bench.vae_norm_num_groups) == (
        (128, 256, 512, 512),
        2,
        32,
    )
    assert (bench.clip_hidden, bench.clip_layers, bench.clip_heads) == (768, 12, 12)
    assert (bench.t5_d_model, bench.t5_layers, bench.t5_heads, bench.t5_d_ff) == (512, 6, 8, 1024)
    assert TinySizes.preset("tiny") == TinySizes()
    with pytest.raises(ValueError, match="'huge'"):
        TinySizes.preset("huge")
    with pytest.raises(ValueError, match="seed"):
        write_tiny_suite("unused", seed=-1)


def test_cli(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("一只猫\n\nzebrafish swimming\n", encoding="utf-8")
    assert main([str(tmp_path / "out"), "--seed", "3", "--captions", str(captions)]) == 0
    info = json.loads((tmp_path / "out" / "tiny_suite.json").read_text())
    assert info["seed"] == 3 and info["n_extra_captions"] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--preset" in help_text and "ckpts/t2i" in help_text and "--captions" in help_text


def test_colour_faithful_vae_round_trips_colours(two_seed0, tmp_path):
    """write_colour_faithful_vae: loaded with load_encoders like real weights, flat colours (and 8x8-blocky images)
    come back within 1e-5 (measured 9.5e-7: float32 rounding); the scaled latent is the colour; decoding any latent
    gives scaling_factor x its first three channels. The random-init VAE it replaces is far off (a grey)."""
    import shutil

    import torch

    from pipeline.tiny_suite import write_colour_faithful_vae

    root = shutil.copytree(two_seed0[0], tmp_path / "suite")
    shutil.copytree(two_seed0[0], tmp_path / "random")
    write_colour_faithful_vae(root)

    def cfg(r: Path) -> dict:
        c = json.loads((r / SUBFOLDERS["vae"] / "config.json").read_text())
        c.pop("_name_or_path", None)  # save_pretrained records where it was loaded from
        return c

    assert cfg(root) == cfg(tmp_path / "random")  # same architecture and scaling factor, only the weights differ
    colours = torch.tensor([[220, 30, 30], [30, 200, 40], [30, 40, 220], [230, 220, 30]]) / 127.5 - 1
    x = colours[:, :, None, None].expand(4, 3, 32, 32).contiguous()
    g = torch.Generator().manual_seed(0)
    blocky = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 6, generator=g) * 2 - 1, scale_factor=8)
    errors = {}
    for name in ("suite", "random"):
        vae = load_encoders(tmp_path / name, EncoderDtypes(vae="float32", clip="float32", t5="float32")).vae
        sf = vae.config.scaling_factor
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            errors[name] = float((vae.decode(post.mean).sample - x).abs().max())
            if name == "suite":
                assert torch.allclose(post.mean[:, :3] * sf, x[:, :, :4, :4], atol=1e-6)
                assert torch.allclose(post.std * sf, torch.full_like(post.std, 0.02))
                assert float((vae.decode(vae.encode(blocky).latent_dist.mean).sample - blocky).abs().max()) < 1e-5
                z = torch.randn(2, 4, 4, 4, generator=g)
                assert torch.allclose(
                    vae.decode(z).sample, torch.nn.functional.interpolate(z[:, :3] * sf, scale_factor=8), atol=1e-5
                )
    assert errors["suite"] < 1e-5 and errors["random"] > 0.3, errors
