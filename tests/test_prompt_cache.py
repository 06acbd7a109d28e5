"""Prompt encodings cached beside the stage-1 cache: written with the cache's encoders, refused for others, and
sampling from them equals sampling with the encoders loaded."""

from __future__ import annotations

import json

import pytest
import torch
from dit_helpers import perturbed_tiny, single_thread  # noqa: F401 (autouse fixture)
from test_sampler import shared_tiny_suite
from test_stage2_common import write_synthetic_cache

from pipeline.encoders import EncoderDtypes, load_encoders
from pipeline.sampler import NEGATIVE_PROMPT, PromptEmbeds, encode_prompts, sample_latents
from shared.manifest import encoders_hash
from shared.prompts import prompt_file_path, read_prompt_file
from stage1_encode.prompts import main as prompts_main

PROMPTS = ["a red square", "zwei blaue Kreise", "一只猫"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return shared_tiny_suite(tmp_path_factory)


@pytest.fixture(scope="module")
def encoders(suite):
    # the synthetic cache's spec: clip fp32, mT5 fp16, lengths 8 / 12
    return load_encoders(suite, EncoderDtypes(vae="float32", clip="float32", t5="float16"), clip_len=8, t5_len=12)


@pytest.mark.exact
def test_cached_prompts_sample_bit_identical_to_encoded_ones(tmp_path, suite, encoders, capsys):
    """Exact by construction: both paths run encode_prompts with the same encoders on the same prompts, the file
    stores the states losslessly in their own dtypes (fp16 mT5 stays fp16), and the sampler casts both to fp32."""
    cache = write_synthetic_cache(tmp_path / "cache", n=2, encoders=encoders.fingerprint())
    plist = tmp_path / "prompts.txt"
    plist.write_text("# validation prompts\n" + "\n".join(PROMPTS[1:]) + "\n\n", encoding="utf-8")
    assert (
        prompts_main(["--cache", str(cache), "--encoders", str(suite), "--prompt", PROMPTS[0], "--prompts", str(plist)])
        == 0
    )
    path = prompt_file_path(cache, "validation")
    assert path.is_file() and str(path) in capsys.readouterr().out
    manifest = json.loads((cache / "manifest.json").read_text())
    got = read_prompt_file(path, manifest["encoders_hash"])
    assert got["prompts"] == PROMPTS and got["negative_prompt"] == NEGATIVE_PROMPT
    assert got["embeds"]["t5_states"].dtype == torch.float16

    cached, cached_neg = PromptEmbeds.from_fields(got["embeds"]), PromptEmbeds.from_fields(got["negative"])
    live, live_neg = encode_prompts(encoders, PROMPTS), encode_prompts(encoders, [NEGATIVE_PROMPT])
    model = perturbed_tiny().eval()
    kw = dict(size=64, seeds=[0, 1, 2], sampler="ddim", steps=6, guidance_scale=6.0)
    a = sample_latents(model, cached, cached_neg, **kw)
    b = sample_latents(model, live, live_neg, **kw)
    assert torch.equal(a, b)
    # and the prompts matter: another prompt order gives other latents
    c = sample_latents(model, live.rows([1, 2, 0]), live_neg, **kw)
    assert not torch.equal(a, c)


def test_prompt_files_from_other_encoders_are_refused(tmp_path, suite, encoders, capsys):
    cache = write_synthetic_cache(tmp_path / "cache", n=2, encoders=encoders.fingerprint())
    assert prompts_main(["--cache", str(cache), "--encoders", str(suite), "--prompt", "x", "--name", "v"]) == 0
    path = prompt_file_path(cache, "v")
    with pytest.raises(ValueError, match="other encoders"):
        read_prompt_file(path, encoders_hash({"some": "other encoders"}))
    read_prompt_file(path, None)  # no cache to check against: accepted
    # a cache made by other encoders (here: the same weights in another mT5 dtype) refuses these encoders
    fp = encoders.fingerprint()
    fp["t5"]["dtype"] = "bfloat16"
    other = write_synthetic_cache(tmp_path / "other", n=2, encoders=fp)
    assert prompts_main(["--cache", str(other), "--encoders", str(suite), "--prompt", "x"]) == 2
    assert "are not the ones that made" in capsys.readouterr().err
    assert not prompt_file_path(other, "validation").exists()
    # and a cache without a fingerprint cannot be checked at all
    bare = write_synthetic_cache(tmp_path / "bare", n=2)
    assert prompts_main(["--cache", str(bare), "--encoders", str(suite), "--prompt", "x"]) == 2
    assert "no encoder fingerprint" in capsys.readouterr().err
