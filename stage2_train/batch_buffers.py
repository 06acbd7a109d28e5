"""Shared memory for the compact batches of the cache's DataLoader workers, reused once the step is done with them.

A batch reaches the training process as tensors in shared memory (the worker writes it, the training process maps
the same pages). Fresh shared memory costs a page fault per 4 KiB on first touch in the worker, and on the project's
VMs that fault costs ~7-11 us: a 1024^2 sample's ~1.2 MB of rows was ~2 ms of worker CPU in faults alone, more than
reading and decoding it. So each worker keeps a few batch-sized storages and writes a later batch into one the step
has released, whose pages are already there.

The release protocol: one shared counter, `released`, the highest micro-step whose compact batch the training
process no longer reads. The step's side sets it after expanding a batch (CacheBatchSource.release: the dense batch
expand_batch returns shares no memory with the compact one); batches arrive in micro-step order, so every batch up to
it is done. A worker reuses a storage only if the micro-step it last held is <= released; otherwise (the step is
behind, or nobody releases, e.g. a caller that keeps its batches) it allocates fresh shared memory, as before. Memory:
at most `per_worker` storages of `capacity` bytes per worker (only the pages ever written are backed), so
(prefetch_factor + 2) x one batch's largest size; it does not grow with the cache.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import torch

_ALIGN = 64  # every tensor carved from a storage starts on a cache line


def carve(storage: torch.UntypedStorage, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` over storage bytes [offset, offset + its size) (offset a multiple of the dtype's size)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert offset % itemsize == 0, (offset, dtype)
    return torch.empty(0, dtype=dtype).set_(storage, offset // itemsize, shape)


def aligned(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


class BatchBuffers:
    """Per DataLoader worker: reusable shared-memory storages for compact batches (see the module docstring)."""

    def __init__(self, capacity: int, per_worker: int) -> None:
        if capacity <= 0 or per_worker < 0:
            raise ValueError(f"BatchBuffers needs capacity > 0 and per_worker >= 0, got {capacity}, {per_worker}")
        self.capacity, self.per_worker = int(capacity), int(per_worker)
        # Shared with the workers (inherited at their start, as CacheBatchSource's release flag).
        self.released = multiprocessing.RawValue("q", -1)
        self._pool: list[list[Any]] = []  # this process's [storage, micro-step it holds]
        self._pid = -1
        self.reused = 0  # storages handed out again in this process (tests, benches)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": [], "_pid": -1, "reused": 0}

    def reset(self, micro_step: int) -> None:
        """A new loader starts at `micro_step` (fresh workers, empty pools): nothing after it is released."""
        self.released.value = micro_step - 1

    def release(self, micro_step: int) -> None:
        """The step no longer reads the compact batch of `micro_step` (nor, batches being in order, any before)."""
        self.released.value = max(self.released.value, int(micro_step))

    def storage(self, micro_step: int, nbytes: int) -> torch.UntypedStorage:
        """A storage of >= nbytes for the batch of `micro_step`: a released one of this worker's pool, else fresh
        shared memory (kept in the pool while it has room). Outside a DataLoader worker: plain memory."""
        if torch.utils.data.get_worker_info() is None:
            return torch.UntypedStorage(max(1, nbytes))
        if self._pid != os.getpid():  # a forked worker starts with its own, empty pool
            self._pool, self._pid, self.reused = [], os.getpid(), 0
        if nbytes > self.capacity:
            return torch.UntypedStorage._new_shared(max(1, nbytes))
        done = self.released.value
        for entry in self._pool:
            if entry[1] <= done:
                entry[1] = micro_step
                self.reused += 1
                return entry[0]
        storage = torch.UntypedStorage._new_shared(self.capacity)
        if len(self._pool) < self.per_worker:
            self._pool.append([storage, micro_step])
        return storage


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """In a loader worker: let glibc keep freed memory for the next sample instead of returning it to the kernel.

    A worker allocates and frees ~2-3 MB per 1024^2 sample (the pread, the decoded rows). With glibc's defaults,
    blocks over the (dynamic) mmap threshold are mmapped and unmapped each time, and heap space above the trim
    threshold is given back, so the next sample touches fresh pages again: a page fault per 4 KiB, ~7-11 us each on
    the project's VMs (bench/loader.py). With both thresholds raised, the heap is reused: a worker's memory stays at
    its peak (a few samples' worth), which it reaches anyway. Returns False where there is no glibc mallopt (musl,
    macOS): nothing changes there."""
    import ctypes  # lazy: only DataLoader workers call this

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
