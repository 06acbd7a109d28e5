"""Seconds per image: this project's sampler (pipeline.sampler) vs diffusers' HunyuanDiTPipeline, same weights.

Both run the same denoising loop in one process, back to back: DiT-S/2 sizes, 256x256, 20 ddim steps, cfg 6, the
same prompt embeddings (random, --caption-tokens unpadded BERT,mT5 positions of 77,256), the same seeds, final
latents only (no VAE decode, no text encoders: both would add the same work). The pipeline's VAE and text encoders
are the tiny random-init suite's, built in memory and never called.

    python bench/sample.py                       # CPU, one thread, DiT-S/2, 256x256, 20 ddim steps, 1 image (~2 min)
    python bench/sample.py --device cuda --config DiT-g/2 --size 1024 --steps 50 --dtype bf16 --no-baseline

The last line is the headline: ``sample_time_ratio = <ours / diffusers> (goal <= 1.0)``, the median over
back-to-back pairs of the ratio of process CPU time (robust to other jobs on a shared machine) or of synchronised
wall time on CUDA. With --no-baseline: ``seconds_per_image = <s>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import DIT_CONFIGS, HunYuanDiT  # noqa: E402
from pipeline.sampler import DiffusionSettings, PromptEmbeds, make_scheduler, sample_latents  # noqa: E402


def _embeds(cfg, n: int, tokens: tuple[int, int], g: torch.Generator) -> PromptEmbeds:
    clip_mask = torch.arange(cfg.text_len)[None].expand(n, -1) < tokens[0]
    t5_mask = torch.arange(cfg.text_len_t5)[None].expand(n, -1) < tokens[1]
    return PromptEmbeds(
        torch.randn(n, cfg.text_len, cfg.text_states_dim, generator=g),
        clip_mask,
        torch.randn(n, cfg.text_len_t5, cfg.text_states_dim_t5, generator=g),
        t5_mask,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="DiT-S/2", choices=sorted(DIT_CONFIGS))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--cfg", type=float, default=6.0)
    ap.add_argument("--images", type=int, default=1, help="images per call (one batch)")
    ap.add_argument("--caption-tokens", default="25,64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tokens = tuple(int(x) for x in args.caption_tokens.split(","))
    torch.manual_seed(0)
    model = HunYuanDiT(DIT_CONFIGS[args.config])
    with torch.no_grad():  # off the zero init, so every path computes something
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = model.to(device).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    prompts, negative = _embeds(cfg, args.images, tokens, g), _embeds(cfg, 1, tokens, g)
    seeds = list(range(args.images))
    d = DiffusionSettings()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ours() -> torch.Tensor:
        return sample_latents(
            model,
            prompts,
            negative,
            size=args.size,
            seeds=seeds,
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.cfg,
            diffusion=d,
            dtype=args.dtype,
            device=device,
        )

    def timed(fn):
        sync()
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        return out, (time.perf_counter() - w, time.process_time() - c)

    warm = dict(steps=2)

    def ours_warm() -> None:
        sample_latents(
            model,
            prompts,
            negative,
            size=args.size,
            seeds=seeds,
            sampler=args.sampler,
            guidance_scale=args.cfg,
            diffusion=d,
            dtype=args.dtype,
            device=device,
            **warm,
        )

    ours_warm()  # warm-up (2 steps)
    if args.no_baseline:
        times = [timed(ours)[1][0] for _ in range(args.repeats)]
        print(
            f"{args.config} {args.size}x{args.size} {args.sampler} {args.steps} steps {args.dtype}: "
            f"{[round(t, 2) for t in times]} s per call of {args.images} image(s)"
        )
        print(f"seconds_per_image = {statistics.median(times) / args.images:.3f}")
        return

    from diffusers import HunyuanDiT2DModel, HunyuanDiTPipeline

    from pipeline.checkpoints import export_diffusers
    from pipeline.encoders import load_encoders
    from pipeline.tiny_suite import TinySizes, write_tiny_suite

    with tempfile.TemporaryDirectory() as tmp:
        transformer = HunyuanDiT2DModel.from_pretrained(export_diffusers(model.cpu(), Path(tmp) / "dit"))
        model.to(device)
        # only the pipeline's constructor needs these: embeddings are passed in, latents come out undecoded
        enc = load_encoders(
            write_tiny_suite(Path(tmp) / "t2i", sizes=TinySizes(t5_extra_pieces=50)), clip_len=8, t5_len=12
        )
    transformer = transformer.to(device).eval()
    pipe = HunyuanDiTPipeline(
        vae=enc.vae,
        text_encoder=enc.clip,
        tokenizer=enc.clip_tokenizer,
        transformer=transformer,
        scheduler=make_scheduler(args.sampler, d),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=enc.t5,
        tokenizer_2=enc.t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    neg = negative.repeat_to(args.images)

    def theirs(steps: int | None = None) -> torch.Tensor:
        return pipe(
            height=args.size,
            width=args.size,
            num_inference_steps=steps or args.steps,
            guidance_scale=args.cfg,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            prompt_embeds=prompts.clip.to(device),
            prompt_attention_mask=prompts.clip_mask.long().to(device),
            prompt_embeds_2=prompts.t5.to(device),
            prompt_attention_mask_2=prompts.t5_mask.long().to(device),
            negative_prompt_embeds=neg.clip.to(device),
            negative_prompt_attention_mask=neg.clip_mask.long().to(device),
            negative_prompt_embeds_2=neg.t5.to(device),
            negative_prompt_attention_mask_2=neg.t5_mask.long().to(device),
            output_type="latent",
            use_resolution_binning=False,
            original_size=(args.size, args.size),
        ).images

    theirs(2)  # warm-up (2 steps)
    pairs = []
    for _ in range(args.repeats):
        a, ta = timed(ours)
        b, tb = timed(theirs)
        pairs.append((ta, tb))
    print(f"max abs difference of the final latents: {(a - b).abs().max().item():.3g}")
    col = 1 if device.type == "cpu" else 0
    basis = "process cpu time" if col else "wall time"
    so = statistics.median(p[0][col] for p in pairs) / args.images
    st = statistics.median(p[1][col] for p in pairs) / args.images
    print(
        f"{args.config} {args.size}x{args.size} {args.sampler} {args.steps} steps cfg {args.cfg} {args.dtype}, "
        f"{args.threads} thread(s): ours {so:.2f} s/image, HunyuanDiTPipeline {st:.2f} s/image ({basis})"
    )
    ratios = sorted(p[0][col] / p[1][col] for p in pairs)
    print("per-pair ratios " + " ".join(f"{r:.3f}" for r in ratios))
    print(
        f"sample_time_ratio = {statistics.median(ratios):.3f} (goal <= 1.0; {basis}, median of "
        f"{args.repeats} back-to-back pairs)"
    )


if __name__ == "__main__":
    main()
