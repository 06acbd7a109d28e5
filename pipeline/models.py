"""HunYuanDiT in one file, numerically faithful to Tencent/HunyuanDiT (``hydit/modules/models.py`` @ 368280ec).

Parameter names equal the original's ``state_dict`` keys, so released ``pytorch_model_*.pt`` files load with
``strict=True`` (see ``pipeline.checkpoints``). What the original does and this file keeps:

* text tokens: BERT states (B, 77, 1024) concatenated with ``mlp_t5(mT5 states)`` (B, 256, 1024); every padded
  position is replaced by a learned per-position vector (``text_embedding_padding``); no attention mask anywhere;
* conditioning vector ``c = t_embedder(t) + extra_embedder([AttentionPool(raw mT5 states), size sinusoid, style])``;
  the pool reads all mT5 rows, padding included;
* blocks: long skips (LayerNorm(2D) then Linear, LIFO), self-attention input shifted by ``c`` (no scale, no gate),
  qk-norm, adjacent-pair RoPE on self-attention q/k and on cross-attention q;
* fp32 islands (``FP32LayerNorm``, ``FP32SiLU``, RoPE math, sinusoids) that survive bf16/fp16 autocast.

Where this file computes the same values with less work (equal to fp32 rounding, checked against the golden vectors):
``mlp_t5`` runs only on unpadded mT5 rows and each block projects a padded position's K/V once per batch
(``TextTokens``); the AttentionPool's single query is reassociated instead of projecting every row to K and V.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.rope import ROPE_IMG_CHOICES

#################################################################################
#                                   Config                                      #
#################################################################################


@dataclass
class DiTConfig:
    """Architecture of a HunYuanDiT; the defaults are the original's constructor/CLI defaults (DiT-XL/2 sizes)."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 4
    learn_sigma: bool = True
    # Text encoders: BERT ("CLIP") width/length and mT5 width/length.
    text_states_dim: int = 1024
    text_len: int = 77
    text_states_dim_t5: int = 2048
    text_len_t5: int = 256
    qk_norm: bool = True
    norm: Literal["layer", "rms"] = "layer"
    # v1.1 weights use both; v1.2 neither.
    use_style_cond: bool = False
    size_cond: bool = False
    # The original casts the image-size sinusoid to fp16 when trained with --use-fp16 (its default). False keeps
    # the fp32 values (what --no-fp16 and the golden vectors do); True reproduces the fp16 rounding.
    size_cond_fp16: bool = False
    # The original hard-codes the AttentionPool's output width and head count.
    pooler_out_dim: int = 1024
    pooler_num_heads: int = 8
    attn_backend: Literal["sdpa", "flash"] = "sdpa"
    # Not used by the model itself: how the caller builds RoPE tables (pipeline.rope.RopeCache).
    rope_img: Literal["extend", "base512", "base1024"] = "base512"

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.depth <= 0 or self.num_heads <= 0:
            raise ValueError(
                f"hidden_size, depth, num_heads must be positive, got {self.hidden_size}, {self.depth}, "
                f"{self.num_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} (hidden_size/num_heads) must be a multiple of 4 for 2D RoPE")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm={self.norm!r} is not supported; choose 'layer' or 'rms'")
        if self.attn_backend not in ("sdpa", "flash"):
            raise ValueError(f"attn_backend={self.attn_backend!r} is not supported; choose 'sdpa' or 'flash'")
        if self.rope_img not in ROPE_IMG_CHOICES:
            raise ValueError(f"rope_img={self.rope_img!r} is not supported; choose one of {ROPE_IMG_CHOICES}")
        if self.text_states_dim_t5 % self.pooler_num_heads:
            raise ValueError(
                f"text_states_dim_t5={self.text_states_dim_t5} must be divisible by "
                f"pooler_num_heads={self.pooler_num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DiTConfig:
        """A registry entry (``DIT_CONFIGS``) with some fields replaced."""
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(DIT_CONFIGS)}")
        return DIT_CONFIGS[name].replace(**overrides)

    def replace(self, **overrides: Any) -> DiTConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown DiTConfig field(s) {unknown}; allowed: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#################################################################################
#                          fp32 islands and small layers                        #
#################################################################################


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (the original's ``FP32_Layernorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with the normalisation in fp32 and the weight applied in the input dtype (``norm="rms"``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FP32SiLU(nn.SiLU):
    """SiLU computed in fp32 and cast back (the original's ``FP32_SiLU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x.float()).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    return FP32LayerNorm(dim, eps=1e-6, elementwise_affine=True) if kind == "layer" else RMSNorm(dim, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, **cos first** (diffusers' flip_sin_to_cos=True), fp32: (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (N, dim)
    return emb


class PatchEmbed(nn.Module):
    """Conv patchify, no norm; tokens row-major (h outer, w inner)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, D, th, tw) -> (B, th*tw, D)
        # Token-major memory: the residual stream inherits this layout through every block's adds, and a
        # channel-major one makes each LayerNorm and Linear copy its input (forward and backward).
        return x.contiguous()


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU (plain, as the original) -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)  # (B, 256)
        return self.mlp(t_freq)  # (B, D)


class AttentionPool(nn.Module):
    """CLIP-ResNet attention pool: the mean token (plus a learned position) attends over all tokens."""

    def __init__(self, seq_len: int, embed_dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original's ``q_proj(x0) . k_proj(x)`` and ``softmax . v_proj(x)``, reassociated for its one query.

        Projecting the one query back through ``k_proj`` and pooling x before ``v_proj`` gives the same scores and
        output (the weights sum to 1, so the value bias passes through) without projecting all L+1 rows twice.
        """
        B, L, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, L+1, C): mean token first
        x = x + self.positional_embedding.to(x.dtype)[None]  # (B, L+1, C)
        # The weight is read directly, as the original's F.multi_head_attention_forward(q_proj_weight=...) does:
        # a LoRA on q_proj (peft's "q_proj" target matches it) is then bypassed here exactly as in the original.
        q = F.linear(x[:, 0], self.q_proj.weight, self.q_proj.bias).view(B, h, d) * d**-0.5  # (B, C) -> (B, h, d)
        q_in = torch.einsum("bhd,hdc->bhc", q, self.k_proj.weight.view(h, d, C))  # (B, h, C): query in x's space
        # The key bias's term is the same for every row; kept so k_proj.bias stays in the graph as in the original.
        q_bias = (q * self.k_proj.bias.view(h, d)).sum(-1, keepdim=True)  # (B, h, 1)
        weights = (torch.einsum("bhc,blc->bhl", q_in, x) + q_bias).softmax(dim=-1)  # (B, h, L+1)
        pooled = torch.einsum("bhl,blc->bhc", weights, x)  # (B, h, C)
        out = torch.einsum("bhc,hdc->bhd", pooled, self.v_proj.weight.view(h, d, C))  # (B, h, d)
        out = out.reshape(B, C) + self.v_proj.bias  # (B, h, d) -> (B, C)
        return self.c_proj(out)  # (B, output_dim)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm Mlp with drop 0; keys ``mlp.fc1`` / ``mlp.fc2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


#################################################################################
#                                   Attention                                   #
#################################################################################


class Rope(NamedTuple):
    """One image bucket's RoPE, prepared once per forward from the (N, d) cos/sin tables."""

    cos: torch.Tensor  # (N, 1, d)
    sin_signed: torch.Tensor  # (N, 1, d): sin with even dims negated, so a pair swap needs no negation
    freqs_cis: torch.Tensor  # (N, 1, d/2) complex: cos + i sin of each pair's angle

    @classmethod
    def from_tables(cls, cos: torch.Tensor, sin: torch.Tensor) -> Rope:
        """(N, d) tables with each frequency repeated for a pair of dims (the original's layout)."""
        cos, sin = cos.float(), sin.float()
        sign = torch.tensor([-1.0, 1.0], device=sin.device).repeat(sin.shape[-1] // 2)  # (d,)
        freqs_cis = torch.complex(cos[:, 0::2], sin[:, 0::2])  # (N, d/2)
        return cls(cos.unsqueeze(1), (sin * sign).unsqueeze(1), freqs_cis.unsqueeze(1))


class TextTokens(NamedTuple):
    """The cross-attention context of a batch, built once per forward and read by every block.

    A padded text position holds the same learned vector (``text_embedding_padding[l]``) in every sample, so each
    block's K/V of that position is the same for the whole batch. ``rows`` therefore keeps every distinct row once:
    the unpadded rows of all samples, then one row per position that is padded somewhere; ``index`` says which row
    each (sample, position) reads. Where that saves no rows (batch of one, full captions) ``rows`` is the dense
    batch and ``index`` is None. Same values as the original's dense (B, L, Dc) states, less work.
    """

    rows: torch.Tensor  # (R, Dc)
    index: torch.Tensor | None  # (B*L,) long, or None when rows is the dense (B*L, Dc)
    batch: int
    length: int

    def per_position(self, per_row: torch.Tensor) -> torch.Tensor:
        """(R, ...) computed once per row -> (B, L, ...) per (sample, position)."""
        if self.index is not None:
            per_row = per_row.index_select(0, self.index)  # (R, ...) -> (B*L, ...)
        return per_row.view(self.batch, self.length, *per_row.shape[1:])  # (B*L, ...) -> (B, L, ...)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) in fp32: out[2i] = x[2i]cos - x[2i+1]sin, out[2i+1] = x[2i+1]cos + x[2i]sin.

    That is the original's ``x*cos + rotate_half(x)*sin``. Eager mode writes it as one complex multiplication (same
    products and sums, ~5x cheaper forward+backward on CPU); under torch.compile the real form is used because
    inductor generates no code for complex ops. The result is cast back to x's dtype, as the original does.
    x: (B, N, h, d).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32, like the original's x.float()
    out = _rotate_real(xf, rope) if torch.compiler.is_compiling() else _rotate_complex(xf, rope)
    return out.to(x.dtype)


def _rotate_real(xf: torch.Tensor, rope: Rope) -> torch.Tensor:
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (..., d/2, 2) pairs swapped -> (..., d)
    return xf * rope.cos + swapped * rope.sin_signed


def _rotate_complex(xf: torch.Tensor, rope: Rope) -> torch.Tensor:
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (B, N, h, d/2, 2) -> (B, N, h, d/2) complex
    return torch.view_as_real(xc * rope.freqs_cis.to(xc.dtype)).flatten(-2)  # -> (B, N, h, d/2, 2) -> (B, N, h, d)


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(
            "attn_backend='flash' needs the flash-attn package (pip install 'hydit-cached[gpu]'); "
            "use attn_backend='sdpa' otherwise"
        ) from e
    return flash_attn_func


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """Unmasked attention, default scale d^-0.5. q: (B, N, h, d), k/v: (B, M, h, d) -> (B, N, h, d)."""
    if backend == "flash":
        # flash-attn only takes fp16/bf16; the original casts q and k to half after qk-norm.
        dtype = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else torch.float16
        out = _flash_attn_func()(q.to(dtype), k.to(dtype), v.to(dtype))  # (B, N, h, d)
        return out.to(v.dtype)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, N, d)
    return out.transpose(1, 2)  # (B, N, h, d)


class SelfAttention(nn.Module):
    """Fused qkv projection, per-head LayerNorm on q and k, RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.Wqkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.unbind(2)  # (B, N, h, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, self.backend)  # (B, N, h, d)
        return self.out_proj(out.reshape(B, N, D))  # (B, N, D)


class CrossAttention(nn.Module):
    """Image queries attend over text; kv_proj's first D outputs are K, the last D are V; RoPE on q only."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool, backend: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(context_dim, 2 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: TextTokens, rope: Rope | None) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim)  # (B, N, h, d)
        kv = self.kv_proj(text.rows).view(-1, 2, self.num_heads, self.head_dim)  # (R, 2D) -> (R, 2, h, d)
        k = text.per_position(self.k_norm(kv[:, 0]))  # k_norm is per row: each distinct row once -> (B, M, h, d)
        v = text.per_position(kv[:, 1])  # (B, M, h, d)
        q = self.q_norm(q)
        if rope is not None:
            q = apply_rope(q, rope)  # text keys carry no position
        out = attention(q, k, v, self.backend)  # (B, N, h, d)
        return self.out_proj(out.reshape(B, N, D))  # (B, N, D)


#################################################################################
#                                 Core model                                    #
#################################################################################


class HunYuanDiTBlock(nn.Module):
    """Optional long skip, shifted self-attention, cross-attention (norm3), MLP (norm2); ungated residuals."""

    def __init__(self, cfg: DiTConfig, skip: bool) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = make_norm(cfg.norm, D)
        self.attn1 = SelfAttention(D, cfg.num_heads, cfg.qk_norm, cfg.attn_backend)
        self.norm2 = make_norm(cfg.norm, D)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.default_modulation = nn.Sequential(FP32SiLU(), nn.Linear(D, D))
        self.attn2 = CrossAttention(D, cfg.text_states_dim, cfg.num_heads, cfg.qk_norm, cfg.attn_backend)
        self.norm3 = make_norm(cfg.norm, D)
        if skip:
            self.skip_norm = make_norm(cfg.norm, 2 * D)
            self.skip_linear = nn.Linear(2 * D, D)
        else:
            self.skip_norm = None
            self.skip_linear = None
        # Set from outside by apply_activation_checkpointing(); not part of the state dict.
        self.gradient_checkpointing = False

    def _forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: TextTokens,
        rope: Rope | None,
        skip: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))  # (B, N, 2D) -> (B, N, D)
        shift_msa = self.default_modulation(c).unsqueeze(1)  # (B, 1, D)
        x = x + self.attn1(self.norm1(x) + shift_msa, rope)
        x = x + self.attn2(self.norm3(x), text, rope)
        x = x + self.mlp(self.norm2(x))
        return x

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        text: TextTokens,
        rope: Rope | None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, c, text, rope, skip, use_reentrant=False)
        return self._forward(x, c, text, rope, skip)


class FinalLayer(nn.Module):
    """Plain (not fp32) LayerNorm without affine, modulated by (shift, scale) -- shift first -- then Linear."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(FP32SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        x = self.norm_final(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, N, D)
        return self.linear(x)  # (B, N, p*p*C_out)


class HunYuanDiT(nn.Module):
    """HunyuanDiT denoiser; ``state_dict()`` keys equal the original's."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        cfg = self.config = config
        D = cfg.hidden_size
        self.mlp_t5 = nn.Sequential(
            nn.Linear(cfg.text_states_dim_t5, cfg.text_states_dim_t5 * 4),
            FP32SiLU(),
            nn.Linear(cfg.text_states_dim_t5 * 4, cfg.text_states_dim),
        )
        self.text_embedding_padding = nn.Parameter(torch.randn(cfg.text_len + cfg.text_len_t5, cfg.text_states_dim))
        self.pooler = AttentionPool(cfg.text_len_t5, cfg.text_states_dim_t5, cfg.pooler_num_heads, cfg.pooler_out_dim)
        extra_in_dim = cfg.pooler_out_dim + (6 * 256 if cfg.size_cond else 0) + (D if cfg.use_style_cond else 0)
        if cfg.use_style_cond:
            # Only index 0 is ever used by the original (dataset and inference both pass style 0).
            self.style_embedder = nn.Embedding(1, D)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.extra_embedder = nn.Sequential(nn.Linear(extra_in_dim, D * 4), FP32SiLU(), nn.Linear(D * 4, D))
        self.blocks = nn.ModuleList([HunYuanDiTBlock(cfg, skip=i > cfg.depth // 2) for i in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The original's init: xavier Linears, N(0, 0.02) embedder MLPs, zeroed shift/final layers (output 0)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # like a Linear over (C*p*p) inputs
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.extra_embedder[0].weight, std=0.02)
        nn.init.normal_(self.extra_embedder[2].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.default_modulation[-1].weight)
            nn.init.zeros_(block.default_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # Left as constructed (like the original): text_embedding_padding ~ N(0,1), pooler positions
        # ~ N(0,1)/sqrt(C), style_embedder ~ N(0,1), norms weight 1 / bias 0.

    def _check_conditions(self, image_meta_size: torch.Tensor | None, style: torch.Tensor | None) -> None:
        cfg = self.config
        if cfg.size_cond and image_meta_size is None:
            raise ValueError("size_cond=True but image_meta_size is missing; pass the (B, 6) image meta sizes")
        if cfg.use_style_cond != (style is not None):
            raise ValueError(
                f"use_style_cond={cfg.use_style_cond} but style is {'missing' if style is None else 'given'}; "
                "pass it exactly when use_style_cond is True"
            )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embedding_mask: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor,
        text_embedding_mask_t5: torch.Tensor,
        image_meta_size: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        cos_cis_img: torch.Tensor | None = None,
        sin_cis_img: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """x (B, C, H, W), t (B,), BERT (B, Lc, Dc) + mask, mT5 (B, Lt, Dt) + mask, RoPE (HW/p^2, d) -> {"x"}."""
        cfg = self.config
        if not cfg.size_cond:
            image_meta_size = None  # ignored, as the original does, so callers may always pass the cached sizes
        self._check_conditions(image_meta_size, style)
        B, _, H, W = x.shape
        p = cfg.patch_size
        th, tw = H // p, W // p

        text = self.text_tokens(
            encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5
        )

        t_emb = self.t_embedder(t)  # (B, D)
        x = self.x_embedder(x)  # (B, th*tw, D)

        # Conditioning vector: pooled raw mT5 states (no mask), [size sinusoid], [style].
        extra_vec = self.pooler(encoder_hidden_states_t5)  # (B, pooler_out_dim)
        if image_meta_size is not None:
            meta = timestep_embedding(image_meta_size.reshape(-1), 256)  # (B*6, 256)
            if cfg.size_cond_fp16:
                meta = meta.half()
            # Like the original (fp16 model, or fp32 model with fp32 sinusoid): the sinusoid joins in the pool's dtype.
            meta = meta.to(extra_vec.dtype).view(B, 6 * 256)  # (B*6, 256) -> (B, 1536)
            extra_vec = torch.cat([extra_vec, meta], dim=1)  # (B, pooler_out_dim + 1536)
        if style is not None:
            extra_vec = torch.cat([extra_vec, self.style_embedder(style)], dim=1)  # (B, extra_in_dim)
        c = t_emb + self.extra_embedder(extra_vec)  # (B, D)

        rope = None
        if cos_cis_img is not None and sin_cis_img is not None:
            n = th * tw
            if cos_cis_img.shape != (n, cfg.head_dim) or sin_cis_img.shape != (n, cfg.head_dim):
                raise ValueError(
                    f"RoPE tables {tuple(cos_cis_img.shape)}/{tuple(sin_cis_img.shape)} do not fit a {th}x{tw} token "
                    f"grid with head_dim {cfg.head_dim}; expected ({n}, {cfg.head_dim})"
                )
            rope = Rope.from_tables(cos_cis_img, sin_cis_img)

        skips: list[torch.Tensor] = []
        half = cfg.depth // 2
        for layer, block in enumerate(self.blocks):
            skip = skips.pop() if layer > half else None  # LIFO: the last pushed output feeds the first skip
            x = block(x, c, text, rope, skip)  # (B, N, D)
            if layer < half - 1:
                skips.append(x)

        x = self.final_layer(x, c)  # (B, N, p*p*C_out)
        x = self.unpatchify(x, th, tw)  # (B, C_out, H, W)
        return {"x": x} if return_dict else x

    def text_tokens(
        self,
        encoder_hidden_states: torch.Tensor,
        text_embedding_mask: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor,
        text_embedding_mask_t5: torch.Tensor,
    ) -> TextTokens:
        """BERT states then ``mlp_t5``(mT5 states), every padded position replaced by its learned padding vector.

        The original projects all mT5 rows and then overwrites the padded ones; only the unpadded rows are projected
        here, and a padded position's vector is kept once for the batch (see ``TextTokens``).
        """
        B, Lc, _ = encoder_hidden_states.shape
        Lt = encoder_hidden_states_t5.shape[1]
        L = Lc + Lt
        if (Lc, Lt) != (self.config.text_len, self.config.text_len_t5):
            # the original's torch.where against text_embedding_padding fails on this too; here it must be explicit,
            # or padding rows would be looked up at the wrong positions
            raise ValueError(
                f"text lengths BERT {Lc}, mT5 {Lt} do not match the model's text_len={self.config.text_len}, "
                f"text_len_t5={self.config.text_len_t5}"
            )
        clip_mask, t5_mask = text_embedding_mask.bool(), text_embedding_mask_t5.bool()
        mask = torch.cat([clip_mask, t5_mask], dim=1)  # (B, L)
        clip = encoder_hidden_states[clip_mask]  # (n_clip, Dc), (sample, position) order
        t5 = self.mlp_t5(encoder_hidden_states_t5[t5_mask])  # (n_t5, Ct) -> (n_t5, Dc)
        padded = (~mask).any(dim=0).nonzero().squeeze(1)  # (n_pad,) positions padded in some sample
        n_clip, n_t5 = clip.shape[0], t5.shape[0]
        pad = self.text_embedding_padding[padded]  # (n_pad, Dc)
        rows = torch.cat([clip, t5, pad.to(torch.promote_types(clip.dtype, t5.dtype))], dim=0)  # (R, Dc)

        own = torch.cat(
            [clip_mask.flatten().cumsum(0).view(B, Lc) - 1, n_clip + t5_mask.flatten().cumsum(0).view(B, Lt) - 1],
            dim=1,
        )  # (B, L): row of an unpadded (sample, position); meaningless where padded, and not read there
        shared = torch.zeros(L, dtype=torch.long, device=mask.device)
        shared[padded] = n_clip + n_t5 + torch.arange(padded.numel(), device=mask.device)  # (L,): padding row
        index = torch.where(mask, own, shared).flatten()  # (B*L,)
        if "torch._dynamo" in sys.modules:  # something here compiles (importing dynamo just to check costs ~2 s)
            # The row count changes from batch to batch: say so up front, or compiled blocks specialise and recompile.
            torch._dynamo.maybe_mark_dynamic(rows, 0)
        if rows.shape[0] == B * L:  # R <= B*L; equal when nothing is shared (one sample, no padding): go dense
            return TextTokens(rows.index_select(0, index), None, B, L)
        return TextTokens(rows, index, B, L)

    def unpatchify(self, x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
        """(B, th*tw, p*p*C) with features ordered (p_row, p_col, C) -> (B, C, th*p, tw*p)."""
        c, p = self.config.out_channels, self.config.patch_size
        assert th * tw == x.shape[1]
        x = x.reshape(x.shape[0], th, tw, p, p, c)  # (B, th, tw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, th, p, tw, p)
        return x.reshape(x.shape[0], c, th * p, tw * p)  # (B, C, H, W)


#################################################################################
#                       Applied from outside the model                          #
#################################################################################


def apply_activation_checkpointing(model: HunYuanDiT, rate: float = 1.0) -> int:
    """Recompute blocks ``i >= (1 - rate) * depth`` in backward (non-reentrant); return how many. rate 0 disables."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"activation checkpointing rate={rate} must be in [0, 1]")
    n = 0
    depth = len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.gradient_checkpointing = rate > 0 and i >= (1 - rate) * depth
        n += int(block.gradient_checkpointing)
    return n


#################################################################################
#                                   Configs                                     #
#################################################################################

# Small text dims for CPU tests and demos (same as the golden vectors and the tiny encoder suite).
_TINY_TEXT = dict(text_states_dim=32, text_len=8, text_states_dim_t5=48, text_len_t5=12)

DIT_CONFIGS: dict[str, DiTConfig] = {
    # The original's two sizes (hydit/modules/models.py HUNYUAN_DIT_CONFIG).
    "DiT-g/2": DiTConfig(hidden_size=1408, depth=40, num_heads=16, mlp_ratio=4.3637),
    "DiT-XL/2": DiTConfig(hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0),
    # Not in the original: small sizes for CPU runs, same architecture.
    "DiT-S/2": DiTConfig(hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "DiT-tiny/2": DiTConfig(hidden_size=64, depth=6, num_heads=4, mlp_ratio=4.0, **_TINY_TEXT),
}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
