"""The whole job end to end on the built-in demo, one step after another (`bash scripts/demo.sh` runs this).

    corpus   procedurally drawn images + captions, the original Arrow IPC format (+ Parquet, IndexKits index)
    models   a tiny random-init ckpts/t2i folder (real VAE/BERT/mT5 classes, tokenizers trained on the captions)
    encode   stage 1 on an embedded local Ray: VAE moments + BERT/mT5 states into a sharded cache
    prompts  validation prompt encodings beside the cache (python -m stage1_encode.prompts)
    train    stage 2 for a short run from the cache, with a validation grid at its last step
    inspect  cache summary and a PNG grid of decoded samples
    loss     the stage-2 loss curve as a PNG
    sample   images of the trained model for the cached validation prompts (python -m stage2_train.sample)

Each step is one command in STEPS below; a step whose code is not in the repository yet is reported as NOT BUILT and
the steps that need its output are skipped, so the demo always says exactly how far the project goes.
Exit code: 0 when every built step succeeded, 1 when a built step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Step:
    name: str
    what: str
    command: list[str] | Callable[[], None]  # a command line, or a function run in this process
    needs_files: list[str] = field(default_factory=list)  # repository files that must exist for the step to be built
    needs_steps: list[str] = field(default_factory=list)  # steps whose outputs this one reads
    output: str = ""  # what to show the person afterwards


def build_steps(out: Path, args: argparse.Namespace) -> list[Step]:
    corpus, ckpts, cache, run = out / "corpus", out / "ckpts" / "t2i", out / "cache", out / "run"
    return [
        Step(
            "corpus",
            f"write {args.n} demo images + captions (Arrow IPC, Parquet, IndexKits index)",
            [PY, "-m", "stage1_encode.demo_corpus", str(corpus), "--n", str(args.n), "--seed", str(args.seed)],
            needs_files=["stage1_encode/demo_corpus.py"],
            output=f"{corpus}/arrow/*.arrow",
        ),
        Step(
            "models",
            "write the tiny random-init encoder suite (tokenizers trained on the demo captions)",
            [
                PY,
                "-m",
                "pipeline.tiny_suite",
                str(ckpts),
                "--seed",
                str(args.seed),
                "--captions",
                str(corpus / "captions.txt"),
                "--overwrite",
            ],
            needs_files=["pipeline/tiny_suite.py"],
            needs_steps=["corpus"],
            output=str(ckpts),
        ),
        Step(
            "encode",
            "stage 1: encode the corpus into a sharded cache on an embedded local Ray",
            [
                PY,
                "-m",
                "stage1_encode",
                "--config",
                "configs/encode/demo.yaml",
                f"input.paths=[{corpus / 'arrow'}]",
                f"encoders.root={ckpts}",
                f"output.root={cache}",
            ],
            needs_files=["stage1_encode/__main__.py", "stage1_encode/job.py", "configs/encode/demo.yaml"],
            needs_steps=["corpus", "models"],
            output=str(cache),
        ),
        Step(
            "prompts",
            "encode 4 demo captions + the negative prompt beside the cache (validation prompts)",
            [
                PY,
                "-m",
                "stage1_encode.prompts",
                "--cache",
                str(cache),
                "--encoders",
                str(ckpts),
                "--prompts",
                str(corpus / "captions.txt"),
                "--max-prompts",
                "4",
            ],
            needs_files=["stage1_encode/prompts.py"],
            needs_steps=["encode"],
            output=str(cache / "prompts" / "validation.safetensors"),
        ),
        Step(
            "train",
            f"stage 2: train DiT-tiny/2 for {args.steps} steps from the cache, validation grid at the end",
            [
                PY,
                "stage2_train/train.py",
                "--config",
                "configs/train/demo.yaml",
                f"data.cache={cache}",
                f"run_dir={run}",
                f"steps={args.steps}",
                "logging.every=5",
                f"validation.every={args.steps}",
                f"validation.vae={ckpts}",
                "validation.sizes=[[128,128]]",
            ],
            needs_files=["stage2_train/train.py", "configs/train/demo.yaml", "stage2_train/validation.py"],
            needs_steps=["encode", "prompts"],
            output=str(run / "validation"),
        ),
        Step(
            "inspect",
            "summarise the cache and decode samples into a PNG grid",
            [
                PY,
                "-m",
                "shared.cli",
                "inspect",
                str(cache),
                "--grid",
                str(out / "samples.png"),
                "--vae",
                str(ckpts / "sdxl-vae-fp16-fix"),
                "-n",
                "8",
            ],
            needs_files=["shared/cli.py"],
            needs_steps=["encode"],
            output=str(out / "samples.png"),
        ),
        Step(
            "loss",
            "plot the stage-2 loss curve from metrics.jsonl",
            lambda: plot_loss(run / "metrics.jsonl", out / "loss.png"),
            needs_steps=["train"],
            output=str(out / "loss.png"),
        ),
        Step(
            "sample",
            "sample the cached validation prompts with the trained model's EMA weights (captioned grid)",
            [
                PY,
                "-m",
                "stage2_train.sample",
                "--run",
                str(run),
                "--ema",
                "--prompt-file",
                "validation",
                "--vae",
                str(ckpts),
                "--sampler",
                "ddim",
                "--steps",
                "20",
                "--size",
                "128x128",
                "--out",
                str(out / "generated"),
            ],
            needs_files=["stage2_train/sample.py"],
            needs_steps=["train", "prompts"],
            output=str(out / "generated" / "grid.png"),
        ),
    ]


def plot_loss(metrics: Path, png: Path) -> None:
    """Write the loss curve of a stage-2 run (one point per log interval) and print it as a table."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        raise RuntimeError(f"{metrics} has no logged step")
    for r in rows:
        print(f"  step {r['step']:5d}  loss {r['loss']:.4f}  mse {r.get('mse', float('nan')):.4f}")
    # Drawn with PIL (always installed) rather than matplotlib, whose first import costs seconds.
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 360, 70, 20, 30, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in rows]
    series = [("loss", (200, 40, 40), "red")]
    if all("mse" in r for r in rows):
        series.append(("mse", (40, 90, 200), "blue"))
    values = [r[k] for k, _, _ in series for r in rows]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(max(values), min(values) + 1e-9)

    def xy(step: float, value: float) -> tuple[float, float]:
        return (
            left + (step - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (value - y0) / (y1 - y0) * (h - top - bottom),
        )

    draw.rectangle((left, top, w - right, h - bottom), outline="black")
    draw.text((left, 8), "demo stage-2 training: " + ", ".join(f"{k} ({name})" for k, _, name in series), fill="black")
    draw.text((8, top), f"{y1:.4f}", fill="black")
    draw.text((8, h - bottom - 10), f"{y0:.4f}", fill="black")
    draw.text((left, h - bottom + 8), f"step {x0}", fill="black")
    draw.text((w - right - 70, h - bottom + 8), f"step {x1}", fill="black")
    for key, color, _ in series:
        points = [xy(r["step"], r[key]) for r in rows]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
    img.save(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.py",
        description=__doc__.split("\n\n")[0],
        epilog="Steps: corpus, models, encode, train, inspect, loss.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out", help="output folder (default demo_out/)")
    parser.add_argument("--n", type=int, default=300, help="demo corpus size (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus and tiny weights (default 0)")
    parser.add_argument("--steps", type=int, default=40, help="stage-2 training steps (default 40)")
    parser.add_argument("--only", nargs="+", default=None, metavar="STEP", help="run only these steps")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"),
        RAY_USAGE_STATS_ENABLED=os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    steps = build_steps(out, args)
    unknown = set(args.only or []) - {s.name for s in steps}
    if unknown:
        parser.error(f"--only: unknown step(s) {sorted(unknown)}; steps are {[s.name for s in steps]}")

    status: dict[str, str] = {}
    t_start = time.monotonic()
    for i, step in enumerate(steps, 1):
        header = f"[{i}/{len(steps)}] {step.name}: {step.what}"
        print(f"\n{'=' * 100}\n{header}", flush=True)
        if args.only and step.name not in args.only:
            status[step.name] = "skipped (not in --only)"
            print("  skipped (not in --only)")
            continue
        missing = [f for f in step.needs_files if not (ROOT / f).exists()]
        if missing:
            status[step.name] = f"NOT BUILT YET (missing {', '.join(missing)})"
            print(f"  NOT BUILT YET: {', '.join(missing)} not in the repository")
            continue
        blocked = [d for d in step.needs_steps if not status.get(d, "").startswith(("ok", "skipped (not in --only)"))]
        if blocked:
            status[step.name] = f"skipped (needs {', '.join(blocked)})"
            print(f"  skipped: needs the output of {', '.join(blocked)}")
            continue
        is_command = isinstance(step.command, list)
        print(f"  $ {shlex.join(step.command)}" if is_command else "  (in this process)", flush=True)
        if args.dry_run:
            status[step.name] = "ok (dry run)"
            continue
        t0 = time.monotonic()
        if is_command:
            rc = subprocess.call(step.command, cwd=ROOT, env=env)
        else:
            try:
                step.command()
                rc = 0
            except Exception as e:  # a failed step is reported in the summary; the other steps still run
                print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
                rc = 1
        dt = time.monotonic() - t0
        if rc == 0:
            status[step.name] = f"ok in {dt:.0f} s -> {step.output}"
        else:
            status[step.name] = f"FAILED (exit code {rc} after {dt:.0f} s)"

    print(f"\n{'=' * 100}\nDemo summary ({time.monotonic() - t_start:.0f} s, outputs in {out}):")
    for name, line in status.items():
        print(f"  {name:<8} {line}")
    failed = [n for n, s in status.items() if s.startswith("FAILED")]
    not_built = [n for n, s in status.items() if s.startswith("NOT BUILT")]
    if not_built:
        print(f"Not built yet: {', '.join(not_built)} (the demo runs them as soon as their code lands).")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
