"""HunYuanDiT: golden parity with the original code, parameter counts, init, checkpointing, mixed precision."""

from __future__ import annotations

import pytest
import torch
from dit_helpers import CASES, golden_model, perturbed_tiny, single_thread  # noqa: F401 (autouse fixture)

from pipeline import models
from pipeline.models import (
    DIT_CONFIGS,
    DiTConfig,
    FP32LayerNorm,
    HunYuanDiT,
    apply_activation_checkpointing,
    count_parameters,
    timestep_embedding,
)
from pipeline.rope import rope_tables


def tiny_inputs(cfg: DiTConfig, B: int = 2, h: int = 8, w: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    clip_mask = torch.ones(B, cfg.text_len, dtype=torch.long)
    clip_mask[0, cfg.text_len // 2 :] = 0
    t5_mask = torch.ones(B, cfg.text_len_t5, dtype=torch.long)
    t5_mask[1, 3:] = 0
    cos, sin = rope_tables(h * 8, w * 8, cfg.head_dim, cfg.patch_size, cfg.rope_img)
    kw = dict(
        x=torch.randn(B, cfg.in_channels, h, w, generator=g),
        t=torch.tensor([3.0, 700.0])[:B],
        encoder_hidden_states=torch.randn(B, cfg.text_len, cfg.text_states_dim, generator=g),
        text_embedding_mask=clip_mask,
        encoder_hidden_states_t5=torch.randn(B, cfg.text_len_t5, cfg.text_states_dim_t5, generator=g),
        text_embedding_mask_t5=t5_mask,
        cos_cis_img=cos,
        sin_cis_img=sin,
    )
    if cfg.size_cond:
        kw["image_meta_size"] = torch.tensor([[1024.0, 768.0, 1024.0, 768.0, 0.0, 16.0]] * B)
    if cfg.use_style_cond:
        kw["style"] = torch.zeros(B, dtype=torch.long)
    return kw


@pytest.mark.exact
@pytest.mark.parametrize("rope_form", ["complex", "real"])
@pytest.mark.parametrize("case", list(CASES))
def test_golden_forward_matches_original(case: str, rope_form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if rope_form == "real":  # the form torch.compile traces; run it eagerly on the same golden case
        monkeypatch.setattr(models, "_rotate_complex", models._rotate_real)
    model, _, data, inputs = golden_model(case)
    with torch.no_grad():
        out = model(data["x"], data["t"], **inputs)["x"]
    assert out.shape == data["output"].shape
    torch.testing.assert_close(out, data["output"], rtol=1e-5, atol=1e-5)
    # A sanity check that the comparison has teeth: the golden output is far from zero.
    assert data["output"].abs().max() > 0.5


@pytest.mark.exact
@pytest.mark.parametrize("case", list(CASES))
def test_golden_forward_with_shared_padding_rows(case: str) -> None:
    # The golden batch (2 samples, 20 text positions) is too small for shared padding rows to pay, so the model takes
    # the dense path there. Repeating its samples makes a batch where they do pay; each copy must still give the
    # original's output for its sample.
    model, _, data, inputs = golden_model(case)
    order = torch.tensor([0, 1, 0, 1, 0])
    batch = {
        k: (v[order] if v.shape[0] == 2 and k not in ("cos_cis_img", "sin_cis_img") else v) for k, v in inputs.items()
    }
    text = model.text_tokens(
        batch["encoder_hidden_states"],
        batch["text_embedding_mask"],
        batch["encoder_hidden_states_t5"],
        batch["text_embedding_mask_t5"],
    )
    n_valid = int(batch["text_embedding_mask"].sum() + batch["text_embedding_mask_t5"].sum())
    assert text.index is not None and text.rows.shape[0] == n_valid + 12 < 5 * 20  # 12 positions padded somewhere
    with torch.no_grad():
        out = model(data["x"][order], data["t"][order], **batch)["x"]
    torch.testing.assert_close(out, data["output"][order], rtol=1e-5, atol=1e-5)


@pytest.mark.exact
def test_shared_padding_rows_give_the_dense_gradients() -> None:
    # Batched (shared padding rows) vs one sample at a time (dense: a batch of one shares nothing): same outputs and,
    # for a loss that sums over samples, the same parameter gradients.
    model = perturbed_tiny()
    kw = tiny_inputs(model.config, B=2)
    kw = {k: (torch.cat([v, v.flip(0), v[:1]]) if v.shape[0] == 2 and "cis" not in k else v) for k, v in kw.items()}
    kw["t"] = torch.tensor([3.0, 700.0, 250.0, 999.0, 40.0])
    kw["text_embedding_mask"][4] = 0  # a sample whose text is all padding
    kw["text_embedding_mask_t5"][4] = 0
    text = model.text_tokens(
        kw["encoder_hidden_states"],
        kw["text_embedding_mask"],
        kw["encoder_hidden_states_t5"],
        kw["text_embedding_mask_t5"],
    )
    assert text.index is not None

    def loss_and_grads(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(**batch)["x"]
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = loss_and_grads(kw)
    singles = []
    total: dict[str, torch.Tensor] = {}
    for i in range(5):
        one = {k: (v[i : i + 1] if v.shape[0] == 5 and "cis" not in k else v) for k, v in kw.items()}
        assert (
            model.text_tokens(
                one["encoder_hidden_states"],
                one["text_embedding_mask"],
                one["encoder_hidden_states_t5"],
                one["text_embedding_mask_t5"],
            ).index
            is None
        )
        o, g = loss_and_grads(one)
        singles.append(o)
        total = {n: total.get(n, 0) + g[n] for n in g}
    torch.testing.assert_close(out, torch.cat(singles), rtol=1e-5, atol=1e-5)
    assert grads["text_embedding_padding"].abs().sum() > 0 and grads["mlp_t5.0.weight"].abs().sum() > 0
    for name in grads:
        torch.testing.assert_close(grads[name], total[name], rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_keys_are_the_originals() -> None:
    for case in CASES:
        model, _, data, _ = golden_model(case)
        expected = {k[len("state_dict.") :] for k in data if k.startswith("state_dict.")}
        assert set(model.state_dict()) == expected


def test_meta_device_parameter_counts() -> None:
    with torch.device("meta"):
        g = HunYuanDiT(DIT_CONFIGS["DiT-g/2"])
        g11 = HunYuanDiT(DIT_CONFIGS["DiT-g/2"].replace(use_style_cond=True, size_cond=True))
        xl = HunYuanDiT(DIT_CONFIGS["DiT-XL/2"])
    assert count_parameters(g) == 1_499_952_032
    assert count_parameters(g11) == 1_516_534_048
    assert count_parameters(xl) == 713_784_480
    # Per-submodule figures of the spec (DiT-g/2), to localise a mismatch.
    assert count_parameters(g.mlp_t5) == 25_175_040
    assert count_parameters(g.pooler) == 15_213_568
    assert count_parameters(g.blocks) == 1_439_135_872
    assert count_parameters(g.final_layer) == 4_012_832


def test_zero_output_at_init() -> None:
    torch.manual_seed(0)
    cfg = DIT_CONFIGS["DiT-tiny/2"]
    model = HunYuanDiT(cfg).eval()
    with torch.no_grad():
        out = model(**tiny_inputs(cfg))["x"]
    assert out.shape == (2, 8, 8, 12)
    assert torch.count_nonzero(out) == 0


def test_timestep_embedding_is_cos_first() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert emb[1, 0] == pytest.approx(torch.cos(torch.tensor(5.0)).item())
    assert emb[1, 4] == pytest.approx(torch.sin(torch.tensor(5.0)).item())


@pytest.mark.exact
def test_padding_tokens_are_replaced_and_text_values_there_ignored() -> None:
    model = perturbed_tiny().eval()
    kw = tiny_inputs(model.config)
    with torch.no_grad():
        a = model(**kw)["x"]
        kw2 = dict(kw)
        clip = kw["encoder_hidden_states"].clone()
        clip[0, model.config.text_len // 2 :] = 123.0  # masked-out rows of sample 0
        kw2["encoder_hidden_states"] = clip
        b = model(**kw2)["x"]
        t5 = kw["encoder_hidden_states_t5"].clone()
        t5[1, 5:] = 7.0  # masked-out mT5 rows still reach the (unmasked) AttentionPool
        kw2["encoder_hidden_states_t5"] = t5
        c = model(**kw2)["x"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(b[1], c[1])
    # The masked rows get the learned per-position padding vectors (not zeros): moving those vectors moves sample 0,
    # moving the vector of a position every sample fills with text does not.
    half = model.config.text_len // 2
    learned = model.text_embedding_padding.detach().clone()
    with torch.no_grad():
        model.text_embedding_padding[half:].add_(1.0)
        d = model(**kw)["x"]
        model.text_embedding_padding.copy_(learned)
        model.text_embedding_padding[0].add_(1.0)
        e = model(**kw)["x"]
    assert not torch.allclose(a[0], d[0])
    torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_text_of_the_wrong_length_is_refused() -> None:
    model = perturbed_tiny()
    for extra_clip, extra_t5 in ((-2, 0), (0, 3), (1, -1)):
        kw = tiny_inputs(model.config)
        Lc, Lt = model.config.text_len + extra_clip, model.config.text_len_t5 + extra_t5
        kw["encoder_hidden_states"] = kw["encoder_hidden_states"][:, :1].expand(-1, Lc, -1)
        kw["text_embedding_mask"] = torch.ones(2, Lc, dtype=torch.long)
        kw["encoder_hidden_states_t5"] = kw["encoder_hidden_states_t5"][:, :1].expand(-1, Lt, -1)
        kw["text_embedding_mask_t5"] = torch.ones(2, Lt, dtype=torch.long)
        with pytest.raises(ValueError, match=f"BERT {Lc}, mT5 {Lt}"):
            model(**kw)


def test_condition_inputs_must_match_config() -> None:
    model = perturbed_tiny()
    kw = tiny_inputs(model.config)
    with torch.no_grad():  # like the original, a v1.2 model ignores image sizes it was not built for
        torch.testing.assert_close(model(**kw, image_meta_size=torch.ones(2, 6))["x"], model(**kw)["x"])
    v11 = perturbed_tiny(use_style_cond=True, size_cond=True)
    with pytest.raises(ValueError, match="image_meta_size is missing"):
        v11(**kw, style=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="use_style_cond=False"):
        model(**kw, style=torch.zeros(2, dtype=torch.long))
    bad = dict(kw, cos_cis_img=kw["cos_cis_img"][:-1])
    with pytest.raises(ValueError, match="RoPE tables"):
        model(**bad)


def test_size_cond_fp16_flag_rounds_the_size_sinusoid() -> None:
    torch.manual_seed(0)
    model = perturbed_tiny(use_style_cond=True, size_cond=True).eval()
    kw = tiny_inputs(model.config)
    kw["image_meta_size"] = torch.tensor([[1000.0, 771.0, 1000.0, 771.0, 3.0, 17.0]] * 2)
    with torch.no_grad():
        a = model(**kw)["x"]
        model.config.size_cond_fp16 = True
        b = model(**kw)["x"]
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    model = perturbed_tiny()
    kw = tiny_inputs(model.config)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(**kw)["x"].square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    assert apply_activation_checkpointing(model, rate=1.0) == model.config.depth
    assert apply_activation_checkpointing(model, rate=0.5) == 3
    assert [b.gradient_checkpointing for b in model.blocks] == [False] * 3 + [True] * 3
    apply_activation_checkpointing(model, rate=1.0)
    got = grads()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert apply_activation_checkpointing(model, rate=0.0) == 0
    with pytest.raises(ValueError):
        apply_activation_checkpointing(model, rate=1.5)


def test_bf16_autocast_runs_and_keeps_fp32_islands() -> None:
    model = perturbed_tiny()
    kw = tiny_inputs(model.config)
    seen: list[torch.dtype] = []
    # Inside FP32LayerNorm the normalisation itself must run in fp32 even under autocast.
    orig = torch.nn.functional.layer_norm

    def spy(x, *a, **k):
        seen.append(x.dtype)
        return orig(x, *a, **k)

    norm = model.blocks[0].norm1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_in = torch.randn(2, 5, model.config.hidden_size).bfloat16()
        torch.nn.functional.layer_norm = spy
        try:
            y = norm(bf16_in)
        finally:
            torch.nn.functional.layer_norm = orig
        out = model(**kw)["x"]
    assert seen == [torch.float32]
    assert y.dtype == torch.bfloat16  # cast back to the input dtype like the original
    assert out.dtype in (torch.float32, torch.bfloat16)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = model(**kw)["x"]
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks.parameters())


@pytest.mark.exact
def test_fp32_layernorm_matches_fp32_math_for_half_inputs() -> None:
    ln = FP32LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 16).to(torch.float16)
    expected = torch.nn.functional.layer_norm(x.float(), (16,), ln.weight, ln.bias, 1e-6).half()
    assert torch.equal(ln(x), expected)


def test_rms_norm_and_no_qk_norm_variants_build_and_run() -> None:
    model = perturbed_tiny(norm="rms").eval()
    assert "blocks.0.norm1.weight" in model.state_dict() and "blocks.0.norm1.bias" not in model.state_dict()
    with torch.no_grad():
        out = model(**tiny_inputs(model.config))["x"]
    assert torch.isfinite(out).all()
    model = perturbed_tiny(qk_norm=False).eval()
    assert not any("q_norm" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_inputs(model.config))["x"]).all()


def test_config_validation_and_registry() -> None:
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ValueError, match="attn_backend"):
        DiTConfig(attn_backend="xformers")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown model"):
        DiTConfig.from_name("DiT-H/2")
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        DiTConfig.from_name("DiT-tiny/2", hiden_size=3)
    cfg = DiTConfig.from_name("DiT-g/2", use_style_cond=True, size_cond=True)
    assert cfg.head_dim == 88 and cfg.out_channels == 8 and DIT_CONFIGS["DiT-g/2"].use_style_cond is False
    assert set(DIT_CONFIGS) == {"DiT-g/2", "DiT-XL/2", "DiT-S/2", "DiT-tiny/2"}


def test_flash_backend_without_flash_attn_says_so() -> None:
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed")
    except ImportError:
        pass
    model = perturbed_tiny(attn_backend="flash")
    with pytest.raises(ImportError, match="flash-attn"):
        model(**tiny_inputs(model.config))


def test_rope_rotation_and_backward_match_rotate_half() -> None:
    from pipeline.models import Rope, apply_rope

    g = torch.Generator().manual_seed(0)
    cos, sin = rope_tables(64, 96, head_dim=16)  # (24, 16)
    x = torch.randn(2, 24, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)

    def reference(v: torch.Tensor) -> torch.Tensor:  # the original's rotate_half formulation
        real, imag = v.reshape(*v.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-imag, real], dim=-1).flatten(3)
        return v * cos[:, None].double() + rotated * sin[:, None].double()

    freqs = Rope.from_tables(cos, sin)
    out = apply_rope(x, freqs)
    torch.testing.assert_close(out, reference(x))
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, x, upstream)
    (expected,) = torch.autograd.grad(reference(x), x, upstream)
    torch.testing.assert_close(got, expected)
    # bf16 input: computed in fp32, returned in bf16
    assert apply_rope(x.detach().bfloat16(), freqs).dtype == torch.bfloat16
    # a strided view (qk_norm=False hands RoPE a slice of the fused qkv output) works too
    qkv = torch.randn(2, 24, 3, 3, 16, generator=g)
    torch.testing.assert_close(apply_rope(qkv[:, :, 1], freqs), reference(qkv[:, :, 1].double()).float())
    # Under torch.compile the traced graph is the real form (no complex op reaches inductor) and agrees.
    traced_ops: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        traced_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    compiled = torch.compile(lambda v: apply_rope(v, freqs), backend=recording_backend, fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), out.detach())
    assert traced_ops and not any("complex" in op for op in traced_ops), traced_ops


@pytest.mark.exact
@pytest.mark.parametrize("rope_form", ["complex", "real"])
def test_rope_under_bf16_autocast_computes_in_fp32(rope_form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The original: (x.float() * cos + rotate_half(x.float()) * sin).type_as(x), whatever autocast says.
    from pipeline.models import Rope, apply_rope

    if rope_form == "real":
        monkeypatch.setattr(models, "_rotate_complex", models._rotate_real)
    cos, sin = rope_tables(64, 96, head_dim=16)  # (24, 16)
    x = torch.randn(2, 24, 3, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    real, imag = x.float().reshape(2, 24, 3, 8, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)  # rotate_half on adjacent pairs
    expected = (x.float() * cos[:, None] + rotated * sin[:, None]).bfloat16()
    in_bf16 = (x * cos[:, None].bfloat16() + rotated.bfloat16() * sin[:, None].bfloat16()).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = apply_rope(x, Rope.from_tables(cos, sin))
    assert out.dtype == torch.bfloat16

    # fp32 math may differ from `expected` by a fused multiply-add (complex multiplication kernels use one on some
    # CPUs): at most 2 fp32 ulp before the cast, so after rounding to bf16 (16 fewer mantissa bits) an element
    # changes only when it sits within 2 fp32 ulp of a bf16 rounding midpoint, p ~ 4 / 2**16 per element, i.e.
    # ~0.14 of these 2304 elements expected; and then by one bf16 ulp. bf16 math changes ~27% of them (630).
    def mismatches(y: torch.Tensor) -> int:
        return int((y != expected).sum())

    assert mismatches(in_bf16) > 200  # the check below can tell fp32 math from bf16 math
    assert mismatches(out) <= 8, mismatches(out)
    one_ulp = expected.float().abs() * 2.0**-7  # bf16 keeps 8 significant bits
    assert ((out.float() - expected.float()).abs() <= one_ulp).all()


def test_half_model_runs_like_float16module() -> None:
    # The original trains model.half() with fp16 inputs (Float16Module); RoPE tables stay fp32.
    model = perturbed_tiny(use_style_cond=True, size_cond=True).eval()
    kw = tiny_inputs(model.config)
    with torch.no_grad():
        ref = model(**kw)["x"]
        model.half()
        half_kw = {k: (v.half() if v.is_floating_point() and not k.endswith("cis_img") else v) for k, v in kw.items()}
        out = model(**half_kw)["x"]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.01


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
def test_flash_attn_matches_sdpa_on_gpu() -> None:
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    cfg = DiTConfig.from_name("DiT-tiny/2", hidden_size=128, num_heads=2)  # head_dim 64, a flash-attn size
    sdpa = HunYuanDiT(cfg).cuda()
    flash = HunYuanDiT(cfg.replace(attn_backend="flash")).cuda()
    with torch.no_grad():
        for p in sdpa.parameters():
            p.add_(0.02 * torch.randn_like(p))
    flash.load_state_dict(sdpa.state_dict())
    kw = {k: v.cuda() for k, v in tiny_inputs(cfg).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = sdpa(**kw)["x"].float()
        b = flash(**kw)["x"].float()
    assert a.abs().max() > 0.1
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


@gpu
def test_bf16_autocast_on_gpu_tracks_fp32() -> None:
    model = perturbed_tiny().cuda()
    kw = {k: v.cuda() for k, v in tiny_inputs(model.config).items()}
    with torch.no_grad():
        ref = model(**kw)["x"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**kw)["x"].float()
    assert ref.abs().max() > 0.1 and not torch.equal(out, ref)  # a real output, and autocast really ran in bf16
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.01


def test_compiled_blocks_do_not_recompile_when_the_text_row_count_changes() -> None:
    # Every batch has its own number of distinct text rows (TextTokens); per-block torch.compile (how stage 2
    # compiles) must treat that size as dynamic instead of compiling the blocks again for each batch.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = perturbed_tiny()
    for block in model.blocks:
        block.compile(backend="aot_eager")  # traces like inductor, generates no code
    g = torch.Generator().manual_seed(0)
    rows = set()
    for _ in range(4):
        kw = tiny_inputs(model.config, B=2)
        B = 4
        kw = {k: (torch.cat([v, v]) if v.shape[0] == 2 and "cis" not in k else v) for k, v in kw.items()}
        kw["t"] = torch.rand(B, generator=g) * 999
        kw["text_embedding_mask"] = (torch.rand(B, model.config.text_len, generator=g) < 0.6).long()
        kw["text_embedding_mask_t5"] = (torch.rand(B, model.config.text_len_t5, generator=g) < 0.6).long()
        text = model.text_tokens(
            kw["encoder_hidden_states"],
            kw["text_embedding_mask"],
            kw["encoder_hidden_states_t5"],
            kw["text_embedding_mask_t5"],
        )
        assert text.index is not None
        rows.add(text.rows.shape[0])
        model(**kw)["x"].square().mean().backward()
    assert len(rows) >= 3  # the row count really changed
    # one graph for the blocks without a long skip and one for those with it, whatever the row count
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()
