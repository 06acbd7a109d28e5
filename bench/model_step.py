"""Forward+backward step of this project's HunYuanDiT vs diffusers' HunyuanDiT2DModel, same config and weights.

Both models run in the same process on the same inputs, back to back, many repeats; the per-pair ratios are compared.
Memory: the bytes autograd saves for backward (deduplicated by storage), which is what activation memory is made of
and is deterministic; and the peak, as the growth of the resident set during one step in a forked child on CPU
(Linux) or the peak allocated memory on CUDA.

    python bench/model_step.py                                   # CPU, DiT-S/2 sizes, 256x256 images, batch 4
    python bench/model_step.py --device cuda --config DiT-g/2 --dtype bf16 --image-size 1024 --batch 1 --no-baseline

The last line is the headline: ``model_step_time_ratio = <ours / diffusers> (goal <= 0.9)``, the median over
back-to-back pairs of the ratio of process CPU time on CPU (robust to other jobs on a shared machine; one thread by
default) or of synchronised wall time on CUDA; the ratio of the medians and the wall-time ratio are printed too.
With --no-baseline it is ``mfu = <achieved / peak> (goal >= 0.45 on an H100)``, with the peak from --peak-tflops
(default: H100 SXM dense bf16, 989) and tokens/s on the line before.

Captions: every sample has --caption-tokens unpadded BERT,mT5 positions (default 25,64 of 77,256). This project's
model skips work on padded positions that diffusers' does (pipeline.models.TextTokens), so the ratio depends on
them; ``--caption-tokens full`` (no padding at all) is the case least favourable to it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checkpoints import diffusers_config, to_diffusers_state_dict  # noqa: E402
from pipeline.models import DIT_CONFIGS, DiTConfig, HunYuanDiT, apply_activation_checkpointing  # noqa: E402
from pipeline.rope import rope_tables  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="DiT-S/2", choices=sorted(DIT_CONFIGS), help="model size (default DiT-S/2)")
    p.add_argument("--image-size", type=int, default=256, help="square image side in pixels (latent = /8)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument(
        "--text-dims",
        default="256,77,512,256",
        help="BERT dim, BERT len, mT5 dim, mT5 len (default small: 256,77,512,256; 'full' = 1024,77,2048,256)",
    )
    p.add_argument(
        "--caption-tokens",
        default="25,64",
        help="unpadded BERT,mT5 tokens per sample (default 25,64 of 77,256; 'full' = no padding, the case "
        "where this model's shared padding rows save nothing)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32 = no autocast)")
    p.add_argument("--attn-backend", default="sdpa", choices=["sdpa", "flash"])
    p.add_argument(
        "--repeats",
        type=int,
        default=21,
        help="timed back-to-back pairs (the headline is the median of the per-pair ratios)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine extra OpenMP threads only add noise; "
        "0 = torch default)",
    )
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on every block (ours only)")
    p.add_argument("--no-baseline", action="store_true", help="only time this project's model (GPU throughput runs)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM bf16 dense)")
    return p.parse_args()


def make_inputs(cfg: DiTConfig, args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    B, h = args.batch, args.image_size // 8
    if args.caption_tokens == "full":
        n1, n5 = cfg.text_len, cfg.text_len_t5
    else:
        n1, n5 = (int(v) for v in args.caption_tokens.split(","))
    if not (0 < n1 <= cfg.text_len and 0 < n5 <= cfg.text_len_t5):
        raise ValueError(f"--caption-tokens {args.caption_tokens!r} must fit 1..{cfg.text_len},1..{cfg.text_len_t5}")
    m1 = torch.ones(B, cfg.text_len, dtype=torch.long)
    m1[:, n1:] = 0
    m5 = torch.ones(B, cfg.text_len_t5, dtype=torch.long)
    m5[:, n5:] = 0
    kw = dict(
        x=torch.randn(B, cfg.in_channels, h, h, generator=g),
        t=torch.randint(0, 1000, (B,), generator=g).float(),
        encoder_hidden_states=torch.randn(B, cfg.text_len, cfg.text_states_dim, generator=g),
        text_embedding_mask=m1,
        encoder_hidden_states_t5=torch.randn(B, cfg.text_len_t5, cfg.text_states_dim_t5, generator=g),
        text_embedding_mask_t5=m5,
    )
    return {k: v.to(device) for k, v in kw.items()}


class SavedBytes:
    """Sum of distinct storages autograd saves for backward during a forward."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter) and t.device.type != "meta":
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step_fns(ours: HunYuanDiT, theirs, kw: dict, rope: tuple, dtype: torch.dtype, device: torch.device):
    autocast = dtype != torch.float32

    def run_ours(hooks: SavedBytes | None = None) -> torch.Tensor:
        ctx = torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda t: t) if hooks else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = ours(**kw, cos_cis_img=rope[0], sin_cis_img=rope[1])["x"]
        out.float().square().mean().backward()
        return out

    def run_theirs(hooks: SavedBytes | None = None) -> torch.Tensor:
        ctx = torch.autograd.graph.saved_tensors_hooks(hooks.pack, lambda t: t) if hooks else contextlib.nullcontext()
        with ctx, torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = theirs(
                kw["x"],
                kw["t"],
                encoder_hidden_states=kw["encoder_hidden_states"],
                text_embedding_mask=kw["text_embedding_mask"],
                encoder_hidden_states_t5=kw["encoder_hidden_states_t5"],
                text_embedding_mask_t5=kw["text_embedding_mask_t5"],
                image_rotary_emb=rope,
            ).sample
        out.float().square().mean().backward()
        return out

    return run_ours, run_theirs


def timed(fn, model, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step; CPU time is robust to other jobs on a shared machine."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def peak_cuda(fn, model) -> int:
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated()


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(run, model) -> int | None:
    """Bytes the process's resident set grows by at its peak during one step, measured in a forked child.

    The child starts as a copy of this process (models, inputs), returns free heap pages to the kernel, resets the
    kernel's high-water mark, runs the step and reports VmHWM - VmRSS-at-start. Linux only; None elsewhere.
    """
    import os

    if not Path("/proc/self/clear_refs").exists():
        return None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        grown = -1
        try:
            model.zero_grad(set_to_none=True)
            try:  # hand the heap's free pages (earlier steps' activations) back, or the step would reuse them unseen
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except (OSError, AttributeError):
                pass
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            start = _proc_status_kib("VmRSS")
            run()
            grown = (_proc_status_kib("VmHWM") - start) * 1024
        finally:
            os.write(write_end, str(grown).encode())
            os._exit(0)
    os.close(write_end)
    reply = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(pid, 0)
    value = int(reply or -1)
    return value if value >= 0 else None


def measure(name: str, run, model, times: list[tuple[float, float]], device: torch.device) -> tuple:
    """One more step counting saved activations, then the timing report and peak memory: (saved, wall, cpu, peak)."""
    saved = SavedBytes()
    model.zero_grad(set_to_none=True)
    run(saved)
    wall, cpu = report(name, times, saved)
    if device.type == "cuda":
        peak = peak_cuda(run, model)
        print(f"{name} : peak allocated {peak / 2**30:.2f} GiB")
    else:
        peak = peak_rss_growth(run, model)
        if peak is not None:
            print(f"{name} : peak resident-set growth during a step {peak / 2**20:7.1f} MiB")
    return saved, wall, cpu, peak


def report(name: str, times: list[tuple[float, float]], saved: SavedBytes) -> tuple[float, float]:
    wall = [w for w, _ in times]
    cpu = [c for _, c in times]
    m_wall, m_cpu = statistics.median(wall), statistics.median(cpu)
    print(
        f"{name} : wall median {m_wall * 1e3:8.1f} ms/step (min {min(wall) * 1e3:.1f}, max {max(wall) * 1e3:.1f}) "
        f"| cpu median {m_cpu * 1e3:8.1f} ms | saved-for-backward {saved.total / 2**20:7.1f} MiB"
    )
    return m_wall, m_cpu


def main() -> None:
    args = parse_args()
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.text_dims == "full":  # the real encoders' sizes: DiTConfig's defaults
        d = DiTConfig()
        dims = (d.text_states_dim, d.text_len, d.text_states_dim_t5, d.text_len_t5)
    else:
        dims = tuple(int(v) for v in args.text_dims.split(","))
    cfg = DiTConfig.from_name(
        args.config,
        text_states_dim=dims[0],
        text_len=dims[1],
        text_states_dim_t5=dims[2],
        text_len_t5=dims[3],
        attn_backend=args.attn_backend,
    )
    torch.manual_seed(0)
    ours = HunYuanDiT(cfg).to(device).train()
    with torch.no_grad():  # move zero-initialised layers off zero so every path does real work
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if args.grad_ckpt:
        apply_activation_checkpointing(ours, 1.0)
    kw = make_inputs(cfg, args, device)
    rope = tuple(r.to(device) for r in rope_tables(args.image_size, args.image_size, cfg.head_dim, cfg.patch_size))
    tokens = args.batch * (args.image_size // 8 // cfg.patch_size) ** 2
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"config {args.config} hidden {cfg.hidden_size} depth {cfg.depth} heads {cfg.num_heads} params {n_params:,} "
        f"| text {dims} caption tokens {args.caption_tokens} | image {args.image_size}^2 batch {args.batch} "
        f"tokens/step {tokens} | {device} {args.dtype} "
        f"| torch {torch.__version__} threads {torch.get_num_threads()}"
    )

    theirs = None
    if not args.no_baseline:
        from diffusers import HunyuanDiT2DModel

        theirs = HunyuanDiT2DModel(**diffusers_config(cfg)).to(device).train()
        theirs.load_state_dict(to_diffusers_state_dict(ours.state_dict()), strict=True)
    run_ours, run_theirs = step_fns(ours, theirs, kw, rope, dtype, device)

    if theirs is not None:  # same function, same weights: outputs must agree before timing means anything
        ours.zero_grad(set_to_none=True)
        a = run_ours().detach()
        b = run_theirs().detach()
        diff = (a.float() - b.float()).abs().max().item()
        print(f"max |ours - diffusers| output = {diff:.3g} (scale {a.abs().max().item():.3g})")

    for _ in range(args.warmup):
        timed(run_ours, ours, device)
        if theirs is not None:
            timed(run_theirs, theirs, device)
    t_ours, t_theirs = [], []
    for i in range(args.repeats):
        # alternate the order so neither model always runs on a warmer cache
        if i % 2 == 0 or theirs is None:
            t_ours.append(timed(run_ours, ours, device))
            if theirs is not None:
                t_theirs.append(timed(run_theirs, theirs, device))
        else:
            t_theirs.append(timed(run_theirs, theirs, device))
            t_ours.append(timed(run_ours, ours, device))

    saved_ours, m_ours, c_ours, peak_ours = measure("ours     ", run_ours, ours, t_ours, device)
    if theirs is not None:
        saved_theirs, m_theirs, c_theirs, peak_theirs = measure("diffusers", run_theirs, theirs, t_theirs, device)
        print(f"activation_memory_ratio = {saved_ours.total / saved_theirs.total:.3f}")
        if peak_ours and peak_theirs:
            print(f"peak_memory_ratio = {peak_ours / peak_theirs:.3f}")
        print(f"wall_time_ratio = {m_ours / m_theirs:.3f}")
        # On a CPU shared with other jobs wall time mostly measures the neighbours; with one thread the process's
        # CPU time is the compute itself. On CUDA (synchronised) wall time is the measure.
        # Each repeat times the two models back to back, so a slow spell of the machine hits both halves of a
        # pair; the median of the per-pair ratios is steadier than the ratio of the two medians.
        col = 1 if device.type == "cpu" else 0
        pair_ratios = sorted(a[col] / b[col] for a, b in zip(t_ours, t_theirs))
        best = min(a[col] for a in t_ours) / min(b[col] for b in t_theirs)
        print(
            f"ratio of medians {(c_ours / c_theirs if col else m_ours / m_theirs):.3f} | ratio of minimums "
            f"{best:.3f} | per-pair ratios " + " ".join(f"{r:.3f}" for r in pair_ratios)
        )
        basis = "cpu time" if device.type == "cpu" else "wall time"
        print(
            f"model_step_time_ratio = {statistics.median(pair_ratios):.3f} (goal <= 0.9; {basis}, "
            f"median of {args.repeats} back-to-back pairs)"
        )
        return

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run_ours()
    flops = counter.get_total_flops()
    tps = tokens / m_ours
    mfu = flops / m_ours / (args.peak_tflops * 1e12)
    print(
        f"flops/step {flops / 1e12:.2f} TFLOP | achieved {flops / m_ours / 1e12:.1f} TFLOP/s "
        f"of {args.peak_tflops:.0f} peak | {tps:.0f} tokens/s"
    )
    print(f"mfu = {mfu:.3f} (goal >= 0.45 on an H100)")


if __name__ == "__main__":
    main()
