"""Cached prompt encodings: BERT and mT5 states of a prompt list and a negative prompt, for sampling without encoders.

One safetensors file per list, ``<cache>/prompts/<name>.safetensors`` (written by ``python -m stage1_encode.prompts``):

    clip_states (N, Lc, Dc) clip dtype, clip_mask (N, Lc) bool, t5_states (N, Lt, Dt) t5 dtype, t5_mask (N, Lt) bool
    negative.clip_states (1, Lc, Dc), negative.clip_mask, negative.t5_states, negative.t5_mask
    metadata: prompts (JSON list), negative_prompt, encoders_hash (the cache manifest's), format

States keep the encoder dtypes, exactly as stage 1 stores sample states (bf16 as bf16: safetensors holds it). The
file records the encoders' ``encoders_hash``; ``read_prompt_file`` refuses a file whose hash is not the one expected
(the run's cache), so a model never samples from text features of encoders it was not trained on. These files are
not shards: the manifest does not list them and ``verify`` ignores them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

PROMPTS_DIR = "prompts"
PROMPT_FORMAT = "hydit-cached-prompts-1"
FIELDS = ("clip_states", "clip_mask", "t5_states", "t5_mask")


def read_prompt_lines(path: str | Path) -> list[str]:
    """A prompt list as text, one prompt a line; blank lines and lines starting with '#' are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def prompt_file_path(cache_root: str | Path, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"prompt list name {name!r} must be a plain file name (no path separators, no leading dot)")
    return Path(cache_root) / PROMPTS_DIR / f"{name}.safetensors"


def write_prompt_file(
    path: str | Path,
    *,
    prompts: list[str],
    negative_prompt: str,
    encoders_hash: str,
    embeds: dict[str, Any],
    negative: dict[str, Any],
) -> Path:
    """Write atomically (tmp + rename); ``embeds``/``negative`` hold the four FIELDS as torch tensors."""
    # lazy: torch costs seconds; shared/ modules import torch-free (readers need only safe_open)
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    for what, d, n in (("embeds", embeds, len(prompts)), ("negative", negative, 1)):
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise ValueError(f"{what} lacks {missing}")
        if any(d[f].shape[0] != n for f in FIELDS):
            raise ValueError(f"{what}: every field needs {n} rows, got {[tuple(d[f].shape) for f in FIELDS]}")
    tensors = {f: embeds[f].contiguous() for f in FIELDS}
    tensors.update({f"negative.{f}": negative[f].contiguous() for f in FIELDS})
    for f in ("clip_mask", "t5_mask"):
        tensors[f] = tensors[f].to(torch.bool)
        tensors[f"negative.{f}"] = tensors[f"negative.{f}"].to(torch.bool)
    meta = {
        "prompts": json.dumps(list(prompts), ensure_ascii=False),
        "negative_prompt": negative_prompt,
        "encoders_hash": encoders_hash,
        "format": PROMPT_FORMAT,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_prompt_file(path: str | Path, expected_encoders_hash: str | None) -> dict[str, Any]:
    """{"prompts", "negative_prompt", "encoders_hash", "embeds": {FIELDS}, "negative": {FIELDS}} (torch tensors).

    ``expected_encoders_hash``: the run's cache ``encoders_hash``; a different one is a ValueError naming both.
    None skips the check (a file used without a cache, e.g. sampling a downloaded checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with `python -m stage1_encode.prompts`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors prompt file: {err}") from None
    if meta.get("format") != PROMPT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {PROMPT_FORMAT!r}")
    missing = [k for k in (*FIELDS, *(f"negative.{f}" for f in FIELDS)) if k not in tensors]
    if missing:
        raise ValueError(f"{path} lacks the tensors {missing}")
    have = meta.get("encoders_hash", "")
    if expected_encoders_hash is not None and have != expected_encoders_hash:
        raise ValueError(
            f"{path} was encoded by other encoders (encoders_hash {have[:12]}...) than the run's cache "
            f"({expected_encoders_hash[:12]}...); re-encode the prompts with `python -m stage1_encode.prompts "
            "--cache <the run's cache> --encoders <the cache's encoders>`"
        )
    prompts = json.loads(meta["prompts"])
    if tensors["clip_states"].shape[0] != len(prompts):
        raise ValueError(f"{path}: {len(prompts)} prompts but {tensors['clip_states'].shape[0]} rows of encodings")
    return {
        "prompts": prompts,
        "negative_prompt": meta.get("negative_prompt", ""),
        "encoders_hash": have,
        "embeds": {f: tensors[f] for f in FIELDS},
        "negative": {f: tensors[f"negative.{f}"] for f in FIELDS},
    }
