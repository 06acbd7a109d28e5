"""A loader worker reuses a batch's shared memory only after the step has released that batch
(stage2_train/batch_buffers.py): released memory is reused, a batch the step still holds is never overwritten."""

from __future__ import annotations

import torch

from stage2_train.batch_buffers import BatchBuffers, carve

N = 1 << 16  # bytes per batch


class _Steps(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> int:
        return i


class _Collate:
    """Writes the micro-step into every byte of the batch's storage; says whether the storage was reused."""

    def __init__(self, buffers: BatchBuffers) -> None:
        self.buffers = buffers

    def __call__(self, steps: list[int]) -> dict:
        before = self.buffers.reused
        t = carve(self.buffers.storage(steps[0], N), 0, (N,), torch.uint8)
        t.fill_(steps[0] % 251)
        return {"step": steps[0], "data": t, "fresh": self.buffers.reused == before}


def _batches(buffers: BatchBuffers, steps: int):
    return torch.utils.data.DataLoader(
        _Steps(),
        batch_sampler=[[m] for m in range(steps)],
        collate_fn=_Collate(buffers),
        num_workers=1,
        prefetch_factor=2,
    )


def test_released_batches_are_reused_held_ones_never_overwritten():
    buffers = BatchBuffers(N, per_worker=4)
    buffers.reset(0)
    fresh = []
    for b in _batches(buffers, 12):
        assert bool((b["data"] == b["step"] % 251).all()), b["step"]
        fresh.append(b["fresh"])
        buffers.release(b["step"])
    assert sum(fresh) <= 4 and not all(fresh[4:]), fresh  # the pool's storages come back

    # The step holds every batch and releases none: no storage may be written twice.
    buffers.reset(0)
    held = list(_batches(buffers, 10))
    for b in held:
        assert bool((b["data"] == b["step"] % 251).all()), f"batch {b['step']} was overwritten by a later one"
    assert all(b["fresh"] for b in held)


def test_outside_workers_and_oversized_batches_use_plain_memory():
    buffers = BatchBuffers(N, per_worker=2)
    s = buffers.storage(0, 3 * N)
    assert s.nbytes() == 3 * N and not s.is_shared()
