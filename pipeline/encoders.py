"""The frozen encoders of HunyuanDiT, loaded from a folder in the original `ckpts/t2i/` layout (spec 6, 7.2, 7.4).

    ckpts/t2i/
      sdxl-vae-fp16-fix/   AutoencoderKL            config.json + diffusion_pytorch_model.{safetensors,bin}
      clip_text_encoder/   BertModel (no pooler)    config.json + model.safetensors | pytorch_model.bin
      tokenizer/           BertTokenizer            vocab.txt (+ tokenizer_config.json)
      mt5/                 AutoTokenizer + T5EncoderModel

Loading mirrors `train_deepspeed.py:342-367` and `MT5Embedder`: `BertModel.from_pretrained(path, False)` (the
positional False is `add_pooling_layer`), `T5EncoderModel.from_pretrained(path, torch_dtype=fp16).eval().to(fp16)`.
Everything is local (`local_files_only=True`): no hub access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.text import T5_TRAIN_PAD_ID, tokenize_clip, tokenize_t5

# diffusers' DiagonalGaussianDistribution clamps the posterior's log-variance to this range; the stored moments carry
# the clamped logvar, and stage 2 samples from them with the same clamp (the one definition of the range).
LOGVAR_RANGE = (-30.0, 20.0)

SUBFOLDERS = {"vae": "sdxl-vae-fp16-fix", "clip": "clip_text_encoder", "clip_tokenizer": "tokenizer", "t5": "mt5"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Weight file stems that from_pretrained reads, in its order of preference (safetensors first, sharded or not).
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_BERT_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_T5_TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class EncoderDtypes:
    """Compute/storage dtype per encoder. Defaults are the original's: VAE and BERT fp32, mT5 fp16 (even without
    `--extra-fp16`). fp16 on CPU is slow and lacks some kernels; pick float32 explicitly in a CPU config."""

    vae: str = "float32"
    clip: str = "float32"
    t5: str = "float16"

    def __post_init__(self) -> None:
        for field in ("vae", "clip", "t5"):
            value = getattr(self, field)
            if value not in DTYPES:
                raise ValueError(f"EncoderDtypes.{field} = {value!r}; allowed: {sorted(DTYPES)}")

    def torch_dtype(self, name: str) -> torch.dtype:
        return DTYPES[getattr(self, name)]


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _weight_files(folder: Path, candidates: tuple[str, ...]) -> list[Path]:
    """The files from_pretrained would read: the first candidate present, whole or as an indexed set of shards."""
    for name in candidates:
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
            return [index] + [folder / s for s in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"no model weights in {folder}: expected {' or '.join(candidates)} (or a sharded *.index.json)"
    )


def resolve_encoder_paths(root: str | Path) -> dict[str, Path]:
    """Check that `root` has the original `ckpts/t2i/` layout; return the folder per SUBFOLDERS key.

    Raises FileNotFoundError naming the missing folder or file and what was expected there.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"encoder root {root} is not a directory; expected a ckpts/t2i-style folder with "
            f"{', '.join(SUBFOLDERS.values())}/ (write a random-init one with `python -m pipeline.tiny_suite`)"
        )
    paths = {key: root / sub for key, sub in SUBFOLDERS.items()}
    for key, folder in paths.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"missing folder {folder} ({key}); expected {root.name}/{SUBFOLDERS[key]}/")
    for key, candidates in (
        ("vae", _DIFFUSERS_WEIGHTS),
        ("clip", _TRANSFORMERS_WEIGHTS),
        ("t5", _TRANSFORMERS_WEIGHTS),
    ):
        config = paths[key] / "config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"missing {config}; expected {root.name}/{SUBFOLDERS[key]}/config.json and model weights "
                f"({' or '.join(candidates)})"
            )
        _weight_files(paths[key], candidates)
    if not (paths["clip_tokenizer"] / "vocab.txt").is_file():
        raise FileNotFoundError(
            f"missing {paths['clip_tokenizer'] / 'vocab.txt'}; expected the BertTokenizer vocabulary in "
            f"{root.name}/{SUBFOLDERS['clip_tokenizer']}/"
        )
    if not any((paths["t5"] / name).is_file() for name in ("spiece.model", "tokenizer.json")):
        raise FileNotFoundError(
            f"no tokenizer in {paths['t5']}; expected {root.name}/{SUBFOLDERS['t5']}/spiece.model or tokenizer.json"
        )
    return paths


def _hash_files(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {name: _sha256_file(folder / name) for name in sorted(names) if (folder / name).is_file()}


def vae_downsample_factor(block_out_channels) -> int:
    """One 2x downsample per encoder block except the last (diffusers' Encoder)."""
    return 2 ** (len(block_out_channels) - 1)


class FrozenEncoders:
    """VAE + BERT + mT5, loaded once, eval(), requires_grad False; every encode runs under inference_mode."""

    def __init__(
        self,
        vae,
        clip,
        clip_tokenizer,
        t5,
        t5_tokenizer,
        *,
        paths: dict[str, Path],
        dtypes: EncoderDtypes,
        device: torch.device,
        clip_len: int = 77,
        t5_len: int = 256,
        t5_pad_id: int = T5_TRAIN_PAD_ID,
    ) -> None:
        self.vae, self.clip, self.clip_tokenizer = vae, clip, clip_tokenizer
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.paths, self.dtypes, self.device = paths, dtypes, device
        self.clip_len, self.t5_len, self.t5_pad_id = clip_len, t5_len, t5_pad_id
        self._fingerprint: dict | None = None

    # ---- identity of the loaded models --------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_downsample(self) -> int:
        return vae_downsample_factor(self.vae.config.block_out_channels)

    @property
    def clip_dim(self) -> int:
        return int(self.clip.config.hidden_size)

    @property
    def t5_dim(self) -> int:
        return int(self.t5.config.d_model)

    # ---- tokenisation --------------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Both tokenisations with the configured lengths: clip_ids, clip_mask, t5_ids, t5_mask (int64 (B, L))."""
        clip_ids, clip_mask = tokenize_clip(self.clip_tokenizer, texts, self.clip_len)
        t5_ids, t5_mask = tokenize_t5(self.t5_tokenizer, texts, self.t5_len, pad_id=self.t5_pad_id)
        return {"clip_ids": clip_ids, "clip_mask": clip_mask, "t5_ids": t5_ids, "t5_mask": t5_mask}

    # ---- encoding ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> posterior moments (B, 2C, H/8, W/8) = [mean, logvar] in the VAE dtype.

        logvar is clamped to LOGVAR_RANGE [-30, 20] as diffusers' DiagonalGaussianDistribution does before the
        original samples from it (`latent_dist.sample()`), so sampling from these moments needs no further clamp.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
        f = self.vae_downsample
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image height/width must be multiples of {f}, got {tuple(pixels.shape[2:])}")
        # Contiguous NCHW whatever the caller's strides, as the original's `to_tensor` batches are: the same values
        # in channels_last take other CPU kernels, and GroupNorm there loses precision on near-constant groups.
        x = pixels.to(device=self.device, dtype=self.vae.dtype, memory_format=torch.contiguous_format)
        posterior = self.vae.encode(x).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)  # (B, 2C, H/f, W/f)

    @torch.inference_mode()
    def encode_clip(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """BertModel last hidden state (B, L, clip_dim) in the BERT dtype (`train_deepspeed.py:154-157`)."""
        out = self.clip(ids.to(self.device), attention_mask=mask.to(self.device))
        return out[0]

    @torch.inference_mode()
    def encode_t5(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """T5EncoderModel `hidden_states[-1]` (B, L, t5_dim) in the mT5 dtype (`train_deepspeed.py:158-170`).

        Padded rows (id 1, mask 0) are not noise: a padded query sees only the real tokens, through relative-position
        buckets (32 buckets, max distance 128), so its state is a function of its bucket pattern and many padded rows
        are bit-identical. Measured on the tiny suite (CPU, fp32 and fp16 alike): "" -> 1 distinct row of 256;
        10 real tokens -> 62 (fp16: 59) distinct among 246 padded rows, 72 of 256 overall; 23 tokens -> 87 of 233
        padded, 110 overall; 142 tokens -> 91 of 114 padded. Batched and one-by-one outputs were bit-identical.
        This is why the cache stores T5 rows deduplicated.
        """
        out = self.t5(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True)
        return out["hidden_states"][-1]

    # ---- fingerprint ---------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What identifies these encoders for a cache: per model its class, config.json, sha256 of the weight
        files read and dtype; per tokenizer its class, size, file hashes and the tokenisation rule.

        Deterministic (a pure function of the folder contents and settings, no paths) and JSON-serialisable.
        Weight hashing streams the files once and is memoised.
        """
        if self._fingerprint is None:
            fp: dict[str, Any] = {}
            for key, model, candidates in (
                ("vae", self.vae, _DIFFUSERS_WEIGHTS),
                ("clip", self.clip, _TRANSFORMERS_WEIGHTS),
                ("t5", self.t5, _TRANSFORMERS_WEIGHTS),
            ):
                folder = self.paths[key]
                fp[key] = {
                    "class": type(model).__name__,
                    "config": json.loads((folder / "config.json").read_text(encoding="utf-8")),
                    "weights": {p.name: _sha256_file(p) for p in _weight_files(folder, candidates)},
                    "dtype": getattr(self.dtypes, key),
                }
            fp["vae"]["moments"] = f"cat(mean, clamp(logvar, {LOGVAR_RANGE[0]:g}, {LOGVAR_RANGE[1]:g}))"
            fp["clip"]["add_pooling_layer"] = False
            fp["t5"]["output"] = "hidden_states[-1]"
            fp["clip_tokenizer"] = {
                "class": type(self.clip_tokenizer).__name__,
                "vocab_size": len(self.clip_tokenizer),
                "files": _hash_files(self.paths["clip_tokenizer"], _BERT_TOKENIZER_FILES),
                "max_length": self.clip_len,
                "padding": "max_length",
            }
            fp["t5_tokenizer"] = {
                "class": type(self.t5_tokenizer).__name__,
                "vocab_size": len(self.t5_tokenizer),
                "files": _hash_files(self.paths["t5"], _T5_TOKENIZER_FILES),
                "max_length": self.t5_len,
                "pad_id": self.t5_pad_id,
            }
            fp["dtypes"] = asdict(self.dtypes)
            json.dumps(fp)  # fail here, not in a manifest writer, if something is not serialisable
            self._fingerprint = fp
        return json.loads(json.dumps(self._fingerprint))


def load_encoders(
    root: str | Path,
    dtypes: EncoderDtypes | None = None,
    device: str | torch.device = "cpu",
    *,
    clip_len: int = 77,
    t5_len: int = 256,
) -> FrozenEncoders:
    """Load the VAE, BERT (+ BertTokenizer) and mT5 (+ AutoTokenizer) from a ckpts/t2i-style folder."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, BertModel, BertTokenizer, T5EncoderModel

    dtypes = EncoderDtypes() if dtypes is None else dtypes
    if not isinstance(dtypes, EncoderDtypes):
        raise ValueError(f"dtypes must be an EncoderDtypes, got {type(dtypes).__name__}")
    for name, value in (("clip_len", clip_len), ("t5_len", t5_len)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    device = torch.device(device)
    paths = resolve_encoder_paths(root)

    vae = AutoencoderKL.from_pretrained(
        paths["vae"],
        local_files_only=True,
        torch_dtype=dtypes.torch_dtype("vae"),
        low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,  # diffusers needs accelerate for it
    )
    clip = BertModel.from_pretrained(
        paths["clip"], add_pooling_layer=False, local_files_only=True, dtype=dtypes.torch_dtype("clip")
    )
    clip_tokenizer = BertTokenizer.from_pretrained(paths["clip_tokenizer"], local_files_only=True)
    t5_tokenizer = AutoTokenizer.from_pretrained(paths["t5"], local_files_only=True)
    t5 = T5EncoderModel.from_pretrained(paths["t5"], local_files_only=True, dtype=dtypes.torch_dtype("t5"))
    # MT5Embedder ends with `.to(torch_dtype)`: that also casts the `wo` layers that transformers keeps in fp32
    # (T5's `_keep_in_fp32_modules`), so the original runs them in fp16 too. BERT gets the same explicit cast
    # (the original's `.half()` with --extra-fp16), which also covers transformers versions without `dtype=`.
    t5.to(dtype=dtypes.torch_dtype("t5"))
    clip.to(dtype=dtypes.torch_dtype("clip"))
    for key, model in (("vae", vae), ("clip", clip), ("t5", t5)):
        model.to(device=device)
        model.eval()
        model.requires_grad_(False)
        got = {p.dtype for p in model.parameters()}
        assert got == {dtypes.torch_dtype(key)}, (key, got)
    return FrozenEncoders(
        vae,
        clip,
        clip_tokenizer,
        t5,
        t5_tokenizer,
        paths=paths,
        dtypes=dtypes,
        device=device,
        clip_len=clip_len,
        t5_len=t5_len,
    )
