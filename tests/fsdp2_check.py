"""Run by tests/test_stage2_torchrun.py under `torchrun --nproc_per_node 2` (gloo, CPU); not collected by pytest.

Checks, on DiT-tiny/2, what parallel.build_parallel_model promises under FSDP2:
1. the meta-device build, materialised shard by shard from rank 0, holds bit-identical weights to today's seeded
   full build (one process, torch.manual_seed(seed) then HunYuanDiT(...));
2. precision=bf16 (MixedPrecisionPolicy: block Linears gathered in bf16, fp32 reduce, norms and root fp32) under
   autocast gives bit-identical loss and gradients to fp32 parameters under autocast, over two micro-steps of
   gradient accumulation: autocast's bf16 cast of an fp32 weight and FSDP2's bf16 all-gather round the same fp32
   value the same way, the fp32 islands read the same fp32 parameters, and the bf16 weight gradients are upcast to
   fp32 before they are reduced or accumulated, as autocast's cast backward does today;
3. the block Linears really run from bf16 parameters, the norms and the root from fp32 ones.
Prints "fsdp2 check ok" on rank 0; any failure raises (torchrun then exits non-zero).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.models import DiTConfig, HunYuanDiT
from pipeline.rope import RopeCache
from stage2_train.checkpointing import full_model_state
from stage2_train.config import ParallelSection
from stage2_train.parallel import build_parallel_model, grad_sync, init_distributed

SEED = 7


def main() -> None:
    par = ParallelSection(strategy="fsdp2")
    info = init_distributed(par, "cpu")
    cfg = DiTConfig.from_name("DiT-tiny/2", text_len=8, text_states_dim=32, text_len_t5=12, text_states_dim_t5=48)

    torch.manual_seed(SEED)
    reference = HunYuanDiT(cfg).state_dict()
    models = {
        p: build_parallel_model(lambda: HunYuanDiT(cfg), par, info, seed=SEED, fresh=True, precision=p)
        for p in ("fp32", "bf16")
    }
    for prec, model in models.items():
        full = full_model_state(model)  # collective; rank 0 gets the full tensors
        if info.is_main:
            assert set(full) == set(reference), prec
            bad = [k for k in reference if not torch.equal(full[k], reference[k])]
            assert not bad, f"{prec}: meta-device init differs from the seeded full build in {bad[:5]}"
        # each rank's own shards of the fresh model equal its slice of the reference: nothing left uninitialised
        for name, p in model.named_parameters():
            shard = torch.distributed.tensor.distribute_tensor(reference[name], p.device_mesh, p.placements)
            assert torch.equal(p.to_local(), shard.to_local()), (prec, name)
        with torch.no_grad():  # the zero-initialised layers would leave most gradients zero
            for p in model.parameters():
                p.add_(0.01)

    seen: dict[str, torch.dtype] = {}

    def record(what: str, tensor):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the inputs
            seen.setdefault(what, tensor(module).dtype)

        return hook

    bf16_model = models["bf16"]
    bf16_model.blocks[0].attn1.register_forward_pre_hook(record("block linear", lambda m: next(m.parameters())))
    bf16_model.blocks[0].norm1.register_forward_pre_hook(record("block norm", lambda m: m.weight))
    bf16_model.t_embedder.register_forward_pre_hook(record("root", lambda m: next(m.parameters())))

    rope = RopeCache(cfg.head_dim, cfg.patch_size, cfg.rope_img)
    cos, sin = rope.get(64, 64, torch.device("cpu"))
    results = {}
    for prec, model in models.items():
        g = torch.Generator().manual_seed(100 + info.rank)
        losses = []
        for micro in range(2):
            b = 2
            kw = dict(
                encoder_hidden_states=torch.randn(b, 8, 32, generator=g),
                text_embedding_mask=torch.ones(b, 8),
                encoder_hidden_states_t5=torch.randn(b, 12, 48, generator=g),
                text_embedding_mask_t5=torch.ones(b, 12),
                image_meta_size=torch.tensor([[64.0] * 4 + [0, 0]] * b),
            )
            x, t = torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)
            with grad_sync(model, micro == 1), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, t, **kw, cos_cis_img=cos, sin_cis_img=sin)["x"].float()
            loss = (out**2).mean()
            loss.backward()
            losses.append(loss.detach())
        results[prec] = (losses, {n: p.grad.full_tensor() for n, p in model.named_parameters()})
    assert seen == {"block linear": torch.bfloat16, "block norm": torch.float32, "root": torch.float32}, seen
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert all(torch.equal(a, b) for a, b in zip(l32, l16)), (l32, l16)
    bad = [n for n in g32 if not torch.equal(g32[n], g16[n])]
    assert not bad, f"bf16 MixedPrecisionPolicy changes the gradients of {bad[:5]}"
    if info.is_main:
        print("fsdp2 check ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
