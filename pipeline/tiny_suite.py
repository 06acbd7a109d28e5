"""Write a random-init `ckpts/t2i`-style folder with the REAL encoder classes, entirely offline.

    <root>/sdxl-vae-fp16-fix/   AutoencoderKL, SDXL layout (4 blocks -> 8x downsampling, 4 latent channels,
                                scaling_factor 0.13025), tiny widths
    <root>/clip_text_encoder/   BertModel without pooler (what the original loads with add_pooling_layer=False)
    <root>/tokenizer/           BertTokenizer: vocab.txt of specials, ASCII, caption words, CJK U+4E00..U+9FFF
    <root>/mt5/                 T5EncoderModel with an mT5 config (gated-gelu, relative attention 32/128) and a
                                sentencepiece unigram spiece.model trained here on the captions
                                (pad 0 "<pad>", eos 1 "</s>", unk 2 "<unk>" as mT5)

`load_encoders(root, ...)` reads it exactly like the real weights. Same seed -> byte-identical files.
The "bench" preset has the real SDXL-VAE architecture, a BERT-base-sized BERT and a T5-small-sized encoder, so
stage-1 throughput on it says something about the real encoders' cost.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn

from pipeline.encoders import SUBFOLDERS
from pipeline.text import DEFAULT_CAPTION

# Always part of the tokenizer training text, so that even a suite written for two captions has a usable mT5
# vocabulary and the BERT vocabulary has English words. Chinese, English and mixed, like the demo corpus.
BUILTIN_CAPTIONS = (
    DEFAULT_CAPTION,
    "一只橘色的猫坐在红色的沙发上",
    "夕阳下的海边，金色的沙滩和海浪",
    "山水画，云雾缭绕的高山和小桥流水",
    "一个穿着汉服的女孩站在樱花树下",
    "城市夜景，高楼大厦灯火通明",
    "雪山脚下的湖泊倒映着蓝天白云",
    "水墨风格的竹子和石头",
    "一碗热气腾腾的牛肉面",
    "古老的寺庙在秋天的红叶中",
    "一只小狗在草地上奔跑",
    "蓝色的圆形和黄色的三角形在白色背景上",
    "红色的正方形，绿色的条纹，抽象几何图案",
    "宇航员在月球上骑马，超现实主义风格",
    "中国传统节日，红灯笼和烟花",
    "a red circle on a blue background",
    "a photo of a cat sitting on a wooden table",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of mountains and a river at sunrise",
    "a bowl of noodles with chopsticks, studio lighting",
    "green stripes and yellow triangles, abstract geometric pattern",
    "a small dog running on the grass in the park",
    "city skyline at night with neon lights, 4k, highly detailed",
    "portrait of an old man with a white beard, oil painting",
    "A futuristic car parked in front of a glass building",
    "一只猫 wearing sunglasses, 赛博朋克风格",
    "油画 of a lighthouse on a cliff, 暴风雨",
    "kawaii 卡通 panda eating bamboo 竹子",
    "3D render of a 红色 apple on a table",
    "Logo design: 龙 dragon, minimalist, black and white",
)

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CJK_RANGE = (0x4E00, 0x9FFF)  # CJK Unified Ideographs: what bert-base-chinese style vocabularies mostly cover
_FULLWIDTH_PUNCT = "，。！？、：；“”‘’（）《》【】—…·「」『』"


@dataclass(frozen=True)
class TinySizes:
    """Model sizes for the suite. Defaults are the tiny demo; `TinySizes.bench()` is the benchmark preset."""

    vae_block_out_channels: tuple[int, ...] = (8, 16, 16, 16)
    vae_layers_per_block: int = 1
    vae_norm_num_groups: int = 4
    vae_latent_channels: int = 4
    vae_scaling_factor: float = 0.13025  # SDXL's (the Kohya port hard-codes the same value)
    vae_sample_size: int = 512
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    clip_intermediate: int = 64
    clip_max_positions: int = 512
    t5_d_model: int = 48
    t5_d_kv: int = 12
    t5_d_ff: int = 96
    t5_layers: int = 2
    t5_heads: int = 4
    # sentencepiece pieces wanted on top of the single characters (every CJK ideograph, printable ASCII, caption
    # characters); fewer if the training text cannot support that many
    t5_extra_pieces: int = 1000

    @classmethod
    def bench(cls) -> TinySizes:
        """Real SDXL-VAE architecture, BERT-base-sized BERT, T5-small-sized gated-gelu encoder (random init)."""
        return cls(
            vae_block_out_channels=(128, 256, 512, 512),
            vae_layers_per_block=2,
            vae_norm_num_groups=32,
            clip_hidden=768,
            clip_layers=12,
            clip_heads=12,
            clip_intermediate=3072,
            t5_d_model=512,
            t5_d_kv=64,
            t5_d_ff=1024,
            t5_layers=6,
            t5_heads=8,
            t5_extra_pieces=4000,
        )

    @classmethod
    def preset(cls, name: str) -> TinySizes:
        if name == "tiny":
            return cls()
        if name == "bench":
            return cls.bench()
        raise ValueError(f"unknown tiny-suite preset {name!r}; allowed: 'tiny', 'bench'")


def _seed_for(seed: int, component: int) -> int:
    # Separate streams per model so that changing one size never changes another model's weights.
    return seed * 1000 + component


def _write_vae(folder: Path, sizes: TinySizes, seed: int) -> None:
    from diffusers import AutoencoderKL  # lazy: seconds to import; BUILTIN_CAPTIONS / TinySizes users skip it

    n = len(sizes.vae_block_out_channels)
    torch.manual_seed(_seed_for(seed, 1))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(sizes.vae_block_out_channels),
        layers_per_block=sizes.vae_layers_per_block,
        act_fn="silu",
        latent_channels=sizes.vae_latent_channels,
        norm_num_groups=sizes.vae_norm_num_groups,
        sample_size=sizes.vae_sample_size,
        scaling_factor=sizes.vae_scaling_factor,
        force_upcast=False,  # as sdxl-vae-fp16-fix
    )
    vae.save_pretrained(folder, safe_serialization=True)


# The colour-faithful VAE below carries each colour channel as a (+v, -v) pair of feature channels scaled by
# _PAIR_SCALE x sqrt(GroupNorm eps): a pair has group mean 0, and its variance (<= 1e-6 eps for |v| <= 1000) is
# negligible next to eps, so GroupNorm is linear on it to ~1e-6 relative. _SILU_SHIFT moves the pairs into the range
# where SiLU(x) = x to 1e-8; the +/- difference cancels the shift again.
_PAIR_SCALE = 1e-6
_SILU_SHIFT = 20.0


def make_vae_colour_faithful(vae, *, posterior_std: float = 0.02):
    """Set the weights of an `AutoencoderKL` (in place; returned) so that decode(encode(x)) = x on flat colours.

    A random-init VAE decodes every colour to nearly the same grey, so nothing decoded from a tiny model says
    anything. This analytic construction keeps the architecture (real diffusers class, same config, loadable with
    `from_pretrained`) and makes the VAE a per-pixel linear map on smooth images:

    * every ResNet block's and the mid-block attention's residual branch is zero (conv2 / to_out), channel-changing
      shortcuts embed the first channels, down/upsampling convs are the identity centre tap (a stride-2 conv picks
      one pixel of each 2x2, nearest upsampling repeats it), so the trunk carries its input unchanged;
    * encoder `conv_in` writes RGB as (+v, -v) pairs (see _PAIR_SCALE), `conv_norm_out` + SiLU + `conv_out` turn
      them into the latent mean: channels 0..2 = RGB / scaling_factor (so the scaled latent the DiT sees is the
      colour in [-1, 1]), further channels 0; the log-variance is constant, posterior std = `posterior_std` in
      scaled units; quant_conv and post_quant_conv are the identity;
    * the decoder inverts it: RGB = scaling_factor x latent channels 0..2, whatever the other channels hold.

    Measured on the tiny preset: flat colours round-trip within 1e-4 (pixel range [-1, 1]). Not an autoencoder of
    real images (texture below the 8x8 grid is lost); only for tests that read colours off decoded images.
    """
    # lazy: diffusers costs seconds to import; importers of BUILTIN_CAPTIONS / TinySizes alone skip it
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    if posterior_std <= 0:
        raise ValueError(f"posterior_std must be > 0, got {posterior_std}")
    enc, dec = vae.encoder, vae.decoder
    latent = vae.config.latent_channels
    sf = float(vae.config.scaling_factor)
    for norm, where in ((enc.conv_norm_out, "encoder"), (dec.conv_norm_out, "decoder")):
        per_group = norm.num_channels // norm.num_groups
        if per_group % 2 or norm.num_channels < 6:
            raise ValueError(
                f"{where}.conv_norm_out has {norm.num_channels} channels in {norm.num_groups} groups; "
                "the colour-faithful construction needs >= 6 channels and an even number per group"
            )
    if latent < 3 or vae.config.in_channels != 3 or vae.config.out_channels != 3:
        raise ValueError(
            "the colour-faithful construction needs 3 image channels and >= 3 latent channels, got "
            f"{vae.config.in_channels}/{vae.config.out_channels} and {latent}"
        )

    def identity(conv: nn.Conv2d, gain: float = 1.0) -> None:
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        n = min(conv.in_channels, conv.out_channels)
        conv.weight[range(n), range(n), k, k] = gain
        if conv.bias is not None:
            conv.bias.zero_()

    def pairs_in(conv: nn.Conv2d, gain: float) -> None:  # input channel c -> feature channels (2c, 2c+1) = +-gain
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        for c in range(3):
            conv.weight[2 * c, c, k, k] = gain
            conv.weight[2 * c + 1, c, k, k] = -gain
        conv.bias.zero_()

    def pairs_out(conv: nn.Conv2d, gain: float) -> None:  # (2c, 2c+1) -> output channel c = gain * (a - b) / 2
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        for c in range(3):
            conv.weight[c, 2 * c, k, k] = gain / 2
            conv.weight[c, 2 * c + 1, k, k] = -gain / 2
        conv.bias.zero_()

    def linear_norm(norm: nn.GroupNorm) -> float:  # returns the pair scale it expects
        pair = _PAIR_SCALE * math.sqrt(norm.eps)
        norm.weight.fill_(math.sqrt(norm.eps) / pair)
        norm.bias.fill_(_SILU_SHIFT)
        return pair

    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock2D):
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
                if m.conv_shortcut is not None:
                    identity(m.conv_shortcut)
            elif isinstance(m, Attention):
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
            elif isinstance(m, (Downsample2D, Upsample2D)) and getattr(m, "conv", None) is not None:
                identity(m.conv)
        pairs_in(enc.conv_in, linear_norm(enc.conv_norm_out))
        pairs_out(enc.conv_out, 1.0 / sf)  # mean channels 0..2; the rest (mean and log-variance) zero so far
        enc.conv_out.bias[latent:] = 2 * math.log(posterior_std / sf)
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:
                identity(conv)
        pairs_in(dec.conv_in, sf * linear_norm(dec.conv_norm_out))
        pairs_out(dec.conv_out, 1.0)
    return vae


def write_colour_faithful_vae(root: str | Path, *, posterior_std: float = 0.02) -> Path:
    """Rewrite the VAE folder of a suite written by `write_tiny_suite` with `make_vae_colour_faithful` weights
    (same config, safetensors as before); returns the suite root."""
    from diffusers import AutoencoderKL  # lazy: seconds to import; BUILTIN_CAPTIONS / TinySizes users skip it

    folder = Path(root) / SUBFOLDERS["vae"]
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    make_vae_colour_faithful(vae, posterior_std=posterior_std)
    vae.save_pretrained(folder, safe_serialization=True)
    return Path(root)


def _basic_words(text: str) -> list[str]:
    """Lower-cased ASCII words of a caption, as BERT's basic tokenizer would split them."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _bert_vocab(captions: list[str]) -> list[str]:
    vocab: dict[str, None] = dict.fromkeys(_BERT_SPECIALS)
    printable = [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # do_lower_case: no upper-case pieces
    vocab.update(dict.fromkeys(printable))
    vocab.update(dict.fromkeys("##" + c for c in printable if c.isalnum()))
    vocab.update(dict.fromkeys(_FULLWIDTH_PUNCT))
    words = sorted({w for text in captions for w in _basic_words(text) if len(w) > 1})
    vocab.update(dict.fromkeys(words))
    vocab.update(dict.fromkeys(chr(c) for c in range(_CJK_RANGE[0], _CJK_RANGE[1] + 1)))
    # Anything else the captions use (other scripts, rare symbols) gets a piece too, in a stable order.
    extra = sorted({ch for text in captions for ch in text.lower() if not ch.isspace()} - set(vocab))
    vocab.update(dict.fromkeys(extra))
    return list(vocab)


def _write_bert_tokenizer(folder: Path, captions: list[str]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab(captions)
    (folder / "vocab.txt").write_text("".join(tok + "\n" for tok in vocab), encoding="utf-8")
    # The Chinese RoBERTa/BERT tokenizers lower-case and split every CJK character into its own token.
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "do_basic_tokenize": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "never_split": None,
        "model_max_length": 77,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return len(vocab)


def _write_bert(folder: Path, sizes: TinySizes, vocab_size: int, seed: int) -> None:
    from transformers import BertConfig, BertModel  # lazy: seconds to import, as diffusers above

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.clip_hidden,
        num_hidden_layers=sizes.clip_layers,
        num_attention_heads=sizes.clip_heads,
        intermediate_size=sizes.clip_intermediate,
        max_position_embeddings=sizes.clip_max_positions,
        hidden_act="gelu",
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    torch.manual_seed(_seed_for(seed, 2))
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)


def _coverage_text() -> list[str]:
    """Lines holding every CJK ideograph, printable ASCII and full-width punctuation once, so that (like real mT5)
    ordinary Chinese/English captions tokenise without <unk> even when the suite was trained on a few captions."""
    cjk = "".join(chr(c) for c in range(_CJK_RANGE[0], _CJK_RANGE[1] + 1))
    ascii_line = "".join(chr(c) for c in range(33, 127))
    return [cjk[i : i + 64] for i in range(0, len(cjk), 64)] + [ascii_line, _FULLWIDTH_PUNCT]


def _train_spiece(captions: list[str], extra_pieces: int) -> bytes:
    """A sentencepiece unigram model laid out like mT5's: <pad>=0, </s>=1, <unk>=2, no <s>."""
    text = [*captions, *_coverage_text()]
    # Every character of the training text is a required piece (character_coverage=1.0): the vocabulary must
    # have room for all of them, or the trainer refuses.
    n_chars = len({ch for line in text for ch in line if not ch.isspace()})
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        model_type="unigram",
        vocab_size=n_chars + 3 + extra_pieces,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,  # one thread: EM sums in a fixed order, so the model is byte-identical run to run
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return buf.getvalue()


def _write_t5_tokenizer(folder: Path, captions: list[str], extra_pieces: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    model = _train_spiece(captions, extra_pieces)
    (folder / "spiece.model").write_bytes(model)
    # As google/mt5-*: no sentinel tokens added on top of the sentencepiece vocabulary.
    config = {
        "tokenizer_class": "T5Tokenizer",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 1000000000,
    }
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def _write_t5(folder: Path, sizes: TinySizes, n_pieces: int, seed: int) -> None:
    from transformers import MT5Config, T5EncoderModel  # lazy: seconds to import, as diffusers above

    config = MT5Config(
        vocab_size=-(-n_pieces // 64) * 64,  # mT5 pads its embedding table past the tokenizer (250112 > 250100)
        d_model=sizes.t5_d_model,
        d_kv=sizes.t5_d_kv,
        d_ff=sizes.t5_d_ff,
        num_layers=sizes.t5_layers,
        num_heads=sizes.t5_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tokenizer_class="T5Tokenizer",
    )
    torch.manual_seed(_seed_for(seed, 3))
    T5EncoderModel(config).save_pretrained(folder)


def write_tiny_suite(
    root: str | Path,
    *,
    seed: int = 0,
    captions: list[str] | None = None,
    sizes: TinySizes = TinySizes(),
    overwrite: bool = False,
) -> Path:
    """Write the four encoder folders under `root` (created if needed) and return `root`.

    `captions` (plus BUILTIN_CAPTIONS) train the mT5 sentencepiece model and extend the BERT vocabulary.
    An existing encoder folder is an error unless `overwrite`.
    """
    root = Path(root)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    extra = [] if captions is None else list(captions)
    for i, c in enumerate(extra):
        if not isinstance(c, str):
            raise ValueError(f"captions[{i}] must be a str, got {type(c).__name__}")
    train_text = [c for c in (*BUILTIN_CAPTIONS, *extra) if c.strip()]
    root.mkdir(parents=True, exist_ok=True)
    for sub in SUBFOLDERS.values():
        target = root / sub
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
            shutil.rmtree(target)

    # Each folder is written under a temporary name and renamed, so a killed run leaves no half-written folder
    # that load_encoders would accept.
    def staged(sub: str) -> Path:
        tmp = root / f".{sub}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        return tmp

    tmp = staged(SUBFOLDERS["vae"])
    _write_vae(tmp, sizes, seed)
    tmp.rename(root / SUBFOLDERS["vae"])

    tmp = staged(SUBFOLDERS["clip_tokenizer"])
    n_bert = _write_bert_tokenizer(tmp, train_text)
    tmp.rename(root / SUBFOLDERS["clip_tokenizer"])

    tmp = staged(SUBFOLDERS["clip"])
    _write_bert(tmp, sizes, n_bert, seed)
    tmp.rename(root / SUBFOLDERS["clip"])

    tmp = staged(SUBFOLDERS["t5"])
    n_pieces = _write_t5_tokenizer(tmp, train_text, sizes.t5_extra_pieces)
    _write_t5(tmp, sizes, n_pieces, seed)
    tmp.rename(root / SUBFOLDERS["t5"])

    info = {
        "seed": seed,
        "sizes": asdict(sizes),
        "n_extra_captions": len(extra),
        "bert_vocab_size": n_bert,
        "t5_pieces": n_pieces,
    }
    (root / "tiny_suite.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return root


def _read_captions(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--captions file {path} does not exist (expected UTF-8 text, one caption per line)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tiny_suite",
        description=(
            "Write a random-init encoder folder in the original HunyuanDiT ckpts/t2i layout (sdxl-vae-fp16-fix/, "
            "clip_text_encoder/, tokenizer/, mt5/) using the real diffusers/transformers classes, with tokenizers "
            "built offline (a BERT vocab.txt and a sentencepiece model trained on the captions). Nothing is "
            "downloaded. Load it with pipeline.encoders.load_encoders(OUT_DIR, ...) exactly like real weights."
        ),
    )
    parser.add_argument("out_dir", type=Path, help="folder to write (e.g. ckpts/tiny_t2i)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; same seed -> byte-identical files")
    parser.add_argument(
        "--preset",
        choices=("tiny", "bench"),
        default="tiny",
        help="tiny: demo/test sizes (VAE widths 8-16, BERT 32-d, mT5 48-d); bench: real SDXL-VAE architecture, "
        "BERT-base-sized BERT, T5-small-sized mT5 encoder, for stage-1 throughput measurements",
    )
    parser.add_argument(
        "--captions",
        type=Path,
        default=None,
        help="UTF-8 text file, one caption per line, added to the built-in captions to train the mT5 "
        "sentencepiece model and extend the BERT vocabulary (use the corpus' captions for fewer <unk>)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace encoder folders that already exist")
    args = parser.parse_args(argv)
    try:
        captions = _read_captions(args.captions) if args.captions else None
    except (FileNotFoundError, UnicodeDecodeError) as err:
        parser.error(str(err))
    root = write_tiny_suite(
        args.out_dir,
        seed=args.seed,
        captions=captions,
        sizes=TinySizes.preset(args.preset),
        overwrite=args.overwrite,
    )
    print(f"wrote {args.preset} encoder suite (seed {args.seed}) to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
