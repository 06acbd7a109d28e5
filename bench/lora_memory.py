"""Training memory of a LoRA run: from the cache vs with the encoders resident and run in the step (the original).

Part 1, measured (CPU unless --device cuda): DiT-S/2 LoRA rank 64 at --image-size (256) px with the bench encoder
preset (pipeline.tiny_suite TinySizes.bench(): SDXL-VAE, BERT-base-sized BERT, T5-small-sized mT5, random init), one
process per variant so each peak is its own: "online" (stage2_train.online: preprocessing + VAE/BERT/mT5 in every
step, encoders resident) and "cache" (zarr cache, same draws). Peak = ru_maxrss on CPU, max_memory_allocated on CUDA.

Part 2, accounted tensor by tensor: DiT-g/2, 1024x1024 (4096 image tokens), batch 1, bf16 autocast, frozen base held
in bf16 (lora.base_dtype=bfloat16; norms, embeddings, pooler stay fp32), LoRA rank 64 on the original's targets,
AdamW. Weights, adapter, its gradient and AdamW state are counted from the real module tree built on the meta device
(exact). Activations saved for backward are measured on real bf16-autocast forwards of the full-width DiT-g/2 at
depth 4 (blocks 0-1 push a long skip, 2 is the middle one, 3 takes a skip) with saved_tensors_hooks (unique
storages, parameters excluded), attributed to the block whose forward saved them first; measured at 256 and 512 px
(256 / 1024 image tokens) and extrapolated linearly in the tokens to 1024 px (4096), since bf16 matmuls on a CPU
without bf16 units are too slow for 4096 tokens (every saved tensor is tokens x width or text-sized; CPU sdpa is the
flash kernel, O(tokens): checked, it saves q, k, v, out and the (B, h, N) logsumexp). Scaled to DiT-g/2's
21 plain + 19 skip blocks. With activation checkpointing: what is saved outside the checkpointed blocks
(measured the same way) + every block's inputs (forward pre-hooks) + one
block's activations alive during its recompute. Not counted: the CUDA context and kernel workspaces (~0.5-1 GiB),
allocator fragmentation, the transient gradient of one activation in backward. Where a GPU is lent, run part 1 with
--device cuda for max_memory_allocated.

    python bench/lora_memory.py                 # both parts (part 2: ~5 min on 2 CPU cores)
    python bench/lora_memory.py --part g        # only the DiT-g/2 accounting
    python bench/lora_memory.py --part cpu --image-size 128
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30
GOAL_GIB = 12.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="all", choices=["all", "cpu", "g"])
    p.add_argument("--encoders", default="bench", choices=["bench", "tiny"])
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    # what train_step.prepare reads
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args()


def _train_step_module():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------- part 1: measured
def run_variant(work: Path, args: argparse.Namespace) -> dict:
    from shared.config import load_config
    from stage2_train.config import TrainConfig
    from stage2_train.trainer import Trainer

    ts = _train_step_module()
    cfg = load_config(
        TrainConfig,
        "configs/train/demo.yaml",
        [
            f"data.cache={work / 'cache_zarr'}",
            f"run_dir={work / 'runs' / args.variant}",
            f"steps={args.steps}",
            f"data.batch_size={args.batch}",
            "data.num_workers=0",
            f"model.preset={args.model}",
            *ts.quiet_run_overrides(args.device),
            "ema.enable=false",
            "training.parts=lora",
            f"lora.rank={args.rank}",
        ],
    )
    factory = ts.online_factory(work, args) if args.variant == "online" else None
    trainer = Trainer(cfg, batch_source_factory=factory)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = (
        torch.cuda.max_memory_allocated() / GIB
        if args.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    trainable = sum(p.numel() for p in trainer.inner.parameters() if p.requires_grad)
    return {"variant": args.variant, "peak_gib": peak, "trainable": trainable}


def part_cpu(args: argparse.Namespace) -> dict:
    ts = _train_step_module()
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_lora_memory_")
        args.work_dir = tmp.name
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ts.prepare(work, args)
    results = {}
    for variant in ("online", "cache"):
        cmd = [sys.executable, __file__, "--variant", variant, "--work-dir", str(work)]
        for name in ("encoders", "model", "images", "image_size", "batch", "steps", "rank", "device"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"variant {variant} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[variant] = json.loads(line[0][7:])
    on, ca = results["online"], results["cache"]
    print(
        f"\npart 1 (measured): {args.model} LoRA rank {args.rank} ({ca['trainable']:,} trainable), "
        f"{args.image_size}px, batch {args.batch}, encoders '{args.encoders}', {args.steps} steps, {args.device}"
    )
    print(f"  online (encoders resident, run in the step): peak {on['peak_gib']:.3f} GiB")
    print(f"  cache:                                       peak {ca['peak_gib']:.3f} GiB")
    print(f"  peak memory cache / online = {ca['peak_gib'] / on['peak_gib']:.3f}")
    if tmp is not None:
        tmp.cleanup()
    return results


# ---------------------------------------------------------------------------------------------- part 2: DiT-g/2
def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def static_accounting(rank: int) -> dict:
    """Weights / adapter / grads / AdamW state of DiT-g/2 + LoRA, from the module tree on the meta device."""
    from pipeline import lora
    from pipeline.models import DiTConfig, HunYuanDiT

    with torch.device("meta"):
        model = HunYuanDiT(DiTConfig.from_name("DiT-g/2"))
        lora.inject_lora(model, lora.lora_config(rank))
        lora.cast_base(model, torch.bfloat16)
    params = dict(model.named_parameters())
    adapter = [p for n, p in params.items() if lora.is_adapter_key(n)]
    trainable = [p for p in params.values() if p.requires_grad]
    base = [p for n, p in params.items() if not lora.is_adapter_key(n)]
    base_bf16 = [p for p in base if p.dtype == torch.bfloat16]
    base_fp32 = [p for p in base if p.dtype == torch.float32]
    return {
        "base_params": sum(p.numel() for p in base),
        "adapter_params": sum(p.numel() for p in adapter),
        "trainable_params": sum(p.numel() for p in trainable),
        "base_bf16_bytes": _bytes(base_bf16),
        "base_fp32_bytes": _bytes(base_fp32),
        "adapter_bytes": _bytes(adapter),
        "grad_bytes": _bytes(trainable),
        "adam_bytes": 2 * _bytes(trainable),  # exp_avg + exp_avg_sq, fp32 like the parameter
    }


def _measure_saved(rank: int, sizes: tuple[int, ...], depth: int = 4) -> dict:
    """Real bf16 forwards of full-width DiT-g/2 at `depth` (blocks 0-1 push a skip, 2 is the middle one, 3 takes a
    skip), without and with activation checkpointing. Bytes saved for backward (unique storages, parameters
    excluded) are attributed to the block during whose forward they were first saved, or to "outside"; block inputs
    (what checkpointing keeps for the recompute) likewise per block."""
    from pipeline import lora
    from pipeline.models import DiTConfig, HunYuanDiT

    torch.manual_seed(0)
    cfg = DiTConfig.from_name("DiT-g/2", depth=depth, attn_backend="sdpa")
    model = HunYuanDiT(cfg)
    lora.inject_lora(model, lora.lora_config(rank))
    lora.cast_base(model, torch.bfloat16)
    assert [b.skip_linear is None for b in model.blocks] == [True, True, True, False]
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list = [None]
    seen: set[int] = set()
    saved: dict = {}
    inputs: dict = {}

    def tag(store: dict, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() in param_ptrs or s.data_ptr() in seen:
            return
        seen.add(s.data_ptr())
        store[current[0]] = store.get(current[0], 0) + s.nbytes()

    def pack(t: torch.Tensor):
        tag(saved, t)
        return t

    def pre(i):
        def hook(module, args, kwargs):
            current[0] = i
            for a in list(args) + list(kwargs.values()):
                for t in a if isinstance(a, tuple) else (a,):
                    if isinstance(t, torch.Tensor):
                        s = t.untyped_storage()
                        if s.data_ptr() not in inputs.setdefault("_ptrs", set()):
                            inputs["_ptrs"].add(s.data_ptr())
                            inputs[i] = inputs.get(i, 0) + s.nbytes()

        return hook

    def post(module, args, out):
        current[0] = None

    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(pre(i), with_kwargs=True)
        b.register_forward_hook(post)
    results = {}
    for size in sizes:
        results[size] = _forwards(model, cfg, size, saved, inputs, seen, pack)
    return results


def _forwards(model, cfg, size, saved, inputs, seen, pack) -> dict:
    from pipeline.models import apply_activation_checkpointing
    from pipeline.rope import RopeCache

    h = w = size // 8
    cos, sin = RopeCache(cfg.head_dim, cfg.patch_size, cfg.rope_img).get(size, size, torch.device("cpu"))
    kw = dict(
        encoder_hidden_states=torch.randn(1, cfg.text_len, cfg.text_states_dim),
        text_embedding_mask=torch.ones(1, cfg.text_len, dtype=torch.bool),
        encoder_hidden_states_t5=torch.randn(1, cfg.text_len_t5, cfg.text_states_dim_t5),
        text_embedding_mask_t5=torch.ones(1, cfg.text_len_t5, dtype=torch.bool),
        cos_cis_img=cos,
        sin_cis_img=sin,
    )
    x = torch.randn(1, 4, h, w)
    out = {}
    for ac in (False, True):
        apply_activation_checkpointing(model, 1.0 if ac else 0.0)
        seen.clear()
        saved.clear()
        inputs.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, torch.tensor([500.0]), **kw)["x"]
        del y
        inputs.pop("_ptrs", None)
        out[ac] = {"saved": dict(saved), "inputs": dict(inputs)}
    return out


def part_g(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    st = static_accounting(args.rank)
    print(
        f"\npart 2 (accounted): DiT-g/2 1024x1024 batch 1, bf16 base, LoRA rank {args.rank}, AdamW "
        f"[meta-device tree in {time.perf_counter() - t0:.0f}s]",
        flush=True,
    )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sizes = (256, 512)
    ms = _measure_saved(args.rank, sizes)
    n1, n2 = ((s // 16) ** 2 for s in sizes)  # image tokens (8x VAE, patch 2)
    target = (1024 // 16) ** 2

    def at_1024(get) -> float:
        """Linear in the image tokens through the two measured sizes (every saved tensor is (tokens x width) or
        text-sized; CPU sdpa is the flash kernel, which saves O(tokens)), extrapolated to 4096 tokens."""
        y1, y2 = float(get(ms[sizes[0]])), float(get(ms[sizes[1]]))
        slope = (y2 - y1) / (n2 - n1)
        return y1 + slope * (target - n1)

    n_plain, n_skip, depth = 21, 19, 40  # DiT-g/2: blocks i > depth // 2 = 20 take the long skip
    # block 1, not 0: block 0's input was already saved outside (by the embedding), block 1's is first seen there
    plain = at_1024(lambda m: m[False]["saved"].get(1, 0))
    skip = at_1024(lambda m: m[False]["saved"].get(3, 0))
    outside = at_1024(lambda m: m[False]["saved"].get(None, 0))
    act_noac = outside + plain * n_plain + skip * n_skip
    outside_ac = at_1024(lambda m: sum(m[True]["saved"].values()))  # nothing inside a checkpointed block is saved
    # block 0's inputs include what all blocks share (c, text, rope); each later block adds its own x (and skip)
    inputs_ac = at_1024(lambda m: m[True]["inputs"].get(0, 0) + m[True]["inputs"].get(1, 0) * (depth - 1))
    s0 = {sz: {str(k): v for k, v in ms[sz][False]["saved"].items()} for sz in sizes}
    act_ac = outside_ac + inputs_ac + max(plain, skip)
    weights = st["base_bf16_bytes"] + st["base_fp32_bytes"]
    static = weights + st["adapter_bytes"] + st["grad_bytes"] + st["adam_bytes"]
    print(
        f"  base weights       {st['base_params']:>13,} params: bf16 {st['base_bf16_bytes'] / GIB:7.3f} GiB + "
        f"fp32 (norms, embeddings, pooler) {st['base_fp32_bytes'] / GIB:.3f} GiB"
    )
    print(
        f"  adapter (fp32)     {st['adapter_params']:>13,} params ({st['trainable_params']:,} trainable): "
        f"{st['adapter_bytes'] / GIB:7.3f} GiB"
    )
    print(f"  adapter gradients                        {st['grad_bytes'] / GIB:7.3f} GiB")
    print(f"  AdamW state (m, v)                       {st['adam_bytes'] / GIB:7.3f} GiB")
    print(f"  saved for backward (bytes per block, measured at {sizes} px = {n1}/{n2} tokens): {s0}")
    print(
        f"  -> at 4096 tokens: plain block {plain / GIB:.3f} GiB, skip block {skip / GIB:.3f} GiB, outside the "
        f"blocks {outside / GIB:.3f} GiB"
    )
    print(f"  activations, no checkpointing (21 plain + 19 skip blocks):      {act_noac / GIB:7.3f} GiB")
    print(
        f"  activations, checkpointing: saved outside {outside_ac / GIB:.3f} + 40 blocks' inputs "
        f"{inputs_ac / GIB:.3f} + one block recomputed {max(plain, skip) / GIB:.3f} = {act_ac / GIB:7.3f} GiB"
    )
    total_noac, total_ac = (static + act_noac) / GIB, (static + act_ac) / GIB
    print(f"  total without activation checkpointing: {total_noac:.2f} GiB")
    print(f"  total with activation checkpointing:    {total_ac:.2f} GiB   (+ CUDA context/workspaces, not counted)")
    print(f"  [measured in {time.perf_counter() - t0:.0f}s]")
    return {"static": st, "total_noac_gib": total_noac, "total_ac_gib": total_ac}


def main() -> None:
    args = parse_args()
    if args.variant is not None:
        print("RESULT " + json.dumps(run_variant(Path(args.work_dir), args)), flush=True)
        return
    ratio = None
    if args.part in ("all", "cpu"):
        res = part_cpu(args)
        ratio = res["cache"]["peak_gib"] / res["online"]["peak_gib"]
    if args.part in ("all", "g"):
        g = part_g(args)
        if ratio is not None:
            print(f"lora_cache_vs_online_peak_ratio = {ratio:.3f} (goal < 1)")
        print(f"dit_g_1024_lora_rank{args.rank}_ac_peak_gib = {g['total_ac_gib']:.2f} (goal <= {GOAL_GIB:g})")
    else:
        print(f"lora_cache_vs_online_peak_ratio = {ratio:.3f} (goal < 1)")


if __name__ == "__main__":
    main()
