"""`python -m stage1_encode.prompts --cache CACHE --encoders CKPTS_T2I (--prompt TEXT ... | --prompts FILE)`

Encodes a prompt list and a negative prompt with the encoders that made CACHE and writes
``CACHE/prompts/<name>.safetensors`` (format: shared/prompts.py), so that stage 2 can sample validation images with
only the DiT and the VAE decoder resident. It lives in stage 1 because it needs what stage 1 has: the text encoders,
loaded with the cache's dtypes and text lengths, and the fingerprint check: the encoders' fingerprint must hash to
the manifest's ``encoders_hash``, else the command refuses (exit 2) instead of writing features the model never saw.
No Ray: a prompt list is small.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.encoders import EncoderDtypes, load_encoders
from pipeline.sampler import NEGATIVE_PROMPT, encode_prompts
from shared.manifest import encoders_hash, read_manifest
from shared.prompts import prompt_file_path, read_prompt_lines, write_prompt_file


def encode_prompt_file(
    cache: str | Path,
    encoders_root: str | Path,
    prompts: list[str],
    *,
    negative_prompt: str | None = None,
    name: str = "validation",
    out: str | Path | None = None,
    device: str = "cpu",
) -> Path:
    """Load the cache's encoders, check their fingerprint against the manifest, encode, write; returns the path."""
    if not prompts:
        raise ValueError("no prompts given; pass --prompt TEXT (repeatable) or --prompts FILE")
    manifest = read_manifest(cache)
    if not manifest.encoders:
        raise ValueError(
            f"{cache}/manifest.json records no encoder fingerprint, so no encoders can be checked "
            "against it; prompt files need a cache written by stage 1"
        )
    spec = manifest.spec
    enc = load_encoders(
        encoders_root,
        EncoderDtypes(vae=spec.vae_dtype, clip=spec.clip_dtype, t5=spec.t5_dtype),
        device,
        clip_len=spec.clip_len,
        t5_len=spec.t5_len,
    )
    have = encoders_hash(enc.fingerprint())
    if have != manifest.encoders_hash:
        raise ValueError(
            f"the encoders in {encoders_root} (encoders_hash {have[:12]}...) are not the ones that made {cache} "
            f"({manifest.encoders_hash[:12]}...); pass the ckpts/t2i folder stage 1 used for this cache"
        )
    negative_prompt = NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    pe = encode_prompts(enc, prompts)
    ne = encode_prompts(enc, [negative_prompt])

    def fields(p):
        return {"clip_states": p.clip, "clip_mask": p.clip_mask, "t5_states": p.t5, "t5_mask": p.t5_mask}

    path = Path(out) if out else prompt_file_path(cache, name)
    return write_prompt_file(
        path,
        prompts=list(prompts),
        negative_prompt=negative_prompt,
        encoders_hash=manifest.encoders_hash,
        embeds=fields(pe),
        negative=fields(ne),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m stage1_encode.prompts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cache", required=True, help="the stage-1 cache folder (holding manifest.json)")
    ap.add_argument("--encoders", required=True, help="the ckpts/t2i folder stage 1 encoded the cache with")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    ap.add_argument("--prompts", help="a text file, one prompt a line ('#' lines and blank lines skipped)")
    ap.add_argument("--max-prompts", type=int, default=0, help="keep only the first N prompts (0 = all)")
    ap.add_argument("--negative", default=None, help="negative prompt (default: the original's NEGATIVE_PROMPT)")
    ap.add_argument("--name", default="validation", help="writes CACHE/prompts/<name>.safetensors")
    ap.add_argument("--out", default=None, help="write here instead of CACHE/prompts/<name>.safetensors")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    prompts = list(args.prompt) + (read_prompt_lines(args.prompts) if args.prompts else [])
    if args.max_prompts > 0:
        prompts = prompts[: args.max_prompts]
    try:
        path = encode_prompt_file(
            args.cache,
            args.encoders,
            prompts,
            negative_prompt=args.negative,
            name=args.name,
            out=args.out,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(prompts)} prompt encodings (+ negative) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
