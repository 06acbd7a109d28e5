"""load_encoders on a tiny suite: the original layout, shapes, the original forward calls, errors, fingerprints."""

import json
import shutil

import pytest
import torch

from pipeline.encoders import SUBFOLDERS, EncoderDtypes, load_encoders, resolve_encoder_paths
from pipeline.tiny_suite import write_tiny_suite

CAPTIONS = ["一只橘色的猫坐在红色的沙发上", "a photo of a cat", "", "山水画 " * 200]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_tiny_suite(tmp_path_factory.mktemp("suite"), seed=0)


@pytest.fixture(scope="module")
def encoders(suite):
    return load_encoders(suite, EncoderDtypes(vae="float32", clip="float32", t5="float32"))


def test_roundtrip_shapes(encoders):
    enc = encoders
    assert enc.scaling_factor == pytest.approx(0.13025)
    assert (enc.latent_channels, enc.vae_downsample, enc.clip_dim, enc.t5_dim) == (4, 8, 32, 48)
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    moments = enc.encode_images(pixels)
    assert moments.shape == (2, 8, 8, 12) and moments.dtype == torch.float32
    tok = enc.tokenize(CAPTIONS)
    clip = enc.encode_clip(tok["clip_ids"], tok["clip_mask"])
    t5 = enc.encode_t5(tok["t5_ids"], tok["t5_mask"])
    assert clip.shape == (4, 77, 32) and t5.shape == (4, 256, 48)
    assert torch.isfinite(moments).all() and torch.isfinite(clip).all() and torch.isfinite(t5).all()
    assert not clip.requires_grad and not t5.requires_grad


def test_frozen_and_original_classes(encoders):
    enc = encoders
    assert type(enc.vae).__name__ == "AutoencoderKL"
    assert type(enc.clip).__name__ == "BertModel" and enc.clip.pooler is None  # add_pooling_layer=False
    assert type(enc.t5).__name__ == "T5EncoderModel"
    assert type(enc.clip_tokenizer).__name__ == "BertTokenizer"
    for model in (enc.vae, enc.clip, enc.t5):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.exact
def test_outputs_equal_the_original_calls(encoders):
    enc = encoders
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = enc.vae.encode(pixels).latent_dist  # train_deepspeed.py:186-188 samples from this
        tok = enc.tokenize(CAPTIONS)
        ref_clip = enc.clip(tok["clip_ids"], attention_mask=tok["clip_mask"])[0]
        ref_t5 = enc.t5(tok["t5_ids"], attention_mask=tok["t5_mask"], output_hidden_states=True)["hidden_states"][-1]
    moments = enc.encode_images(pixels)
    mean, logvar = moments.chunk(2, dim=1)
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)
    assert torch.equal(enc.encode_clip(tok["clip_ids"], tok["clip_mask"]), ref_clip)
    assert torch.equal(enc.encode_t5(tok["t5_ids"], tok["t5_mask"]), ref_t5)
    # Stage 1 stores masks as bool: same outputs as the tokenizer's int64 masks.
    assert torch.equal(enc.encode_clip(tok["clip_ids"], tok["clip_mask"].bool()), ref_clip)
    assert torch.equal(enc.encode_t5(tok["t5_ids"], tok["t5_mask"].bool()), ref_t5)
    # hidden_states[-1] is the final-layer-normed output, i.e. last_hidden_state.
    with torch.no_grad():
        last = enc.t5(tok["t5_ids"], attention_mask=tok["t5_mask"]).last_hidden_state
    assert torch.equal(last, ref_t5)


def test_logvar_is_clamped_like_the_posterior(encoders):
    enc = encoders
    # Blow up the quant_conv logvar half on a copy so that the clamp bites.
    import copy

    vae = copy.deepcopy(enc.vae)
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 100.0
    enc2 = copy.copy(enc)
    enc2.vae = vae
    moments = enc2.encode_images(torch.zeros(1, 3, 16, 16))
    assert moments[:, 4:].max() == 20.0


def test_default_dtypes_are_the_originals(suite):
    assert EncoderDtypes() == EncoderDtypes(vae="float32", clip="float32", t5="float16")
    enc = load_encoders(suite, EncoderDtypes())
    # MT5Embedder's final `.to(fp16)` also casts T5's `wo` layers that transformers would keep in fp32.
    assert {p.dtype for p in enc.t5.parameters()} == {torch.float16}
    assert {p.dtype for p in enc.vae.parameters()} == {torch.float32}
    tok = enc.tokenize(CAPTIONS[:2])
    assert enc.encode_t5(tok["t5_ids"], tok["t5_mask"]).dtype == torch.float16
    bf = load_encoders(suite, EncoderDtypes(vae="bfloat16", clip="bfloat16", t5="bfloat16"))
    assert bf.encode_images(torch.zeros(1, 3, 16, 16)).dtype == torch.bfloat16
    assert bf.encode_clip(tok["clip_ids"], tok["clip_mask"]).dtype == torch.bfloat16
    assert bf.fingerprint()["t5"]["dtype"] == "bfloat16"


def test_bad_dtype_and_inputs(encoders):
    with pytest.raises(ValueError, match=r"EncoderDtypes.t5 = 'fp16'"):
        EncoderDtypes(t5="fp16")
    with pytest.raises(ValueError, match="multiples of 8"):
        encoders.encode_images(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoders.encode_images(torch.zeros(3, 16, 16))


def test_fingerprint_is_deterministic_and_json(suite, encoders, tmp_path):
    fp = encoders.fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert set(fp) >= {"vae", "clip", "t5", "clip_tokenizer", "t5_tokenizer"}
    assert fp["vae"]["class"] == "AutoencoderKL" and fp["vae"]["config"]["scaling_factor"] == 0.13025
    assert set(fp["vae"]["weights"]) == {"diffusion_pytorch_model.safetensors"}
    assert fp["clip"]["class"] == "BertModel" and fp["t5"]["class"] == "T5EncoderModel"
    assert fp["t5"]["config"]["feed_forward_proj"] == "gated-gelu"
    assert fp["t5_tokenizer"]["pad_id"] == 1 and fp["t5_tokenizer"]["max_length"] == 256
    assert "spiece.model" in fp["t5_tokenizer"]["files"] and "vocab.txt" in fp["clip_tokenizer"]["files"]
    # Same folder, fresh load -> same dict; a copy elsewhere too (no paths inside).
    copy_root = tmp_path / "copy"
    shutil.copytree(suite, copy_root)
    again = load_encoders(copy_root, EncoderDtypes(t5="float32")).fingerprint()
    assert again == fp
    # A changed weight file changes the fingerprint.
    weights = copy_root / SUBFOLDERS["clip"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = load_encoders(copy_root, EncoderDtypes(t5="float32")).fingerprint()
    assert changed["clip"]["weights"] != fp["clip"]["weights"] and changed["vae"] == fp["vae"]


@pytest.mark.parametrize(
    "remove, message",
    [
        ("sdxl-vae-fp16-fix", r"missing folder .*sdxl-vae-fp16-fix"),
        ("tokenizer", r"missing folder .*tokenizer"),
        ("mt5/config.json", r"mt5/config\.json and model weights"),
        ("clip_text_encoder/model.safetensors", r"no model weights in .*clip_text_encoder.*model\.safetensors"),
        ("sdxl-vae-fp16-fix/diffusion_pytorch_model.safetensors", r"diffusion_pytorch_model\.safetensors"),
        ("tokenizer/vocab.txt", r"tokenizer/vocab\.txt"),
        ("mt5/spiece.model", r"mt5/spiece\.model or tokenizer\.json"),
    ],
)
def test_missing_parts_are_named(suite, tmp_path, remove, message):
    root = tmp_path / "t2i"
    shutil.copytree(suite, root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=message):
        load_encoders(root, EncoderDtypes(t5="float32"))


def test_missing_root_and_bin_weights(suite, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory.*sdxl-vae-fp16-fix"):
        resolve_encoder_paths(tmp_path / "nowhere")
    # Old-style pytorch_model.bin folders (weights-only safe tensors dict) are accepted as well.
    from safetensors.torch import load_file

    root = tmp_path / "t2i"
    shutil.copytree(suite, root)
    st = root / "mt5" / "model.safetensors"
    torch.save(load_file(st), root / "mt5" / "pytorch_model.bin")
    st.unlink()
    enc = load_encoders(root, EncoderDtypes(t5="float32"))
    assert set(enc.fingerprint()["t5"]["weights"]) == {"pytorch_model.bin"}


def test_padded_t5_rows_repeat(encoders):
    """Why the cache deduplicates T5 rows: padded rows depend only on their relative-position buckets."""
    tok = encoders.tokenize(["", "一只橘色的猫坐在红色的沙发上"])
    states = encoders.encode_t5(tok["t5_ids"], tok["t5_mask"])
    assert torch.unique(states[0], dim=0).shape[0] == 1  # "" : </s> + 255 pads, one key -> one distinct row
    n = int(tok["t5_mask"][1].sum())
    far = states[1, n - 1 + 128 :]  # every real token at distance >= 128: all in the last bucket
    assert far.shape[0] > 0 and (far == far[0]).all()
    assert torch.unique(states[1], dim=0).shape[0] < 256 // 2
