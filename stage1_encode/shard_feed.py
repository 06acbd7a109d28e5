"""One shard's stream, run inside its writer task: the partition's preprocessing -> the encoder actors -> the encoded
items, in chunk order.

    write_shard (one Ray task per shard: shard_writer.py) calls encoded_items(), which
      launches  preprocess_partition   a streaming-generator task this writer owns; yields "chunks" items, then "end"
      calls     EncoderActor.encode    one call per item, round robin over the pool from this shard's own offset
      yields    the encoded items in chunk order, then the "end" item

Why here and not in the driver. Every item costs a few Ray operations (the generator's report, the encoder call and
its reply, the fetches, the frees), a few ms of CPU in whichever process owns its ObjectRefs. Owned by the driver,
that was ~0.3 ms of driver CPU per sample at 1024^2, for every GPU of the cluster on one core (bench/encode.py).
Owned by the shard's writer, it is spread over the writers' nodes and the driver pays one task per shard.

Memory. At most GENERATOR_AHEAD items wait for this writer and ENCODE_AHEAD encoder calls are outstanding, so the
object store holds a bounded window per shard in flight (~(4 + 2 + 1) x ray.item_mb of pixels plus the encoded
outputs of 2 items), never a whole partition.

Exactness. Items are numbered chunks of the partition; the actor that encodes one does not change its bytes (one
forward pass per chunk at the chunk's shape), and the writer takes them in chunk order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import ray

from stage1_encode.payload import Item
from stage1_encode.preprocess_task import preprocess_partition

GENERATOR_AHEAD = 4  # items the preprocessing task may produce before this writer takes them
ENCODE_AHEAD = 2  # encoder calls outstanding per shard: one encoding, one queued

_REMOTE: dict[float, Any] = {}  # the preprocessing task's remote function, per num_cpus (defined once per worker)


def _preprocess_remote(num_cpus: float) -> Any:
    if num_cpus not in _REMOTE:
        _REMOTE[num_cpus] = ray.remote(preprocess_partition).options(
            num_returns="streaming", num_cpus=num_cpus, _generator_backpressure_num_objects=GENERATOR_AHEAD
        )
    return _REMOTE[num_cpus]


def encoded_items(cfg_dict: dict, part: dict, num_cpus: float, actors: list, first: int) -> Iterator[Item]:
    """The encoded "chunks" items of partition `part` (dataclasses.asdict of a Partition) in chunk order, then its
    "end" item. Item i goes to actors[(first + i) % len(actors)]: shards started one after another begin on
    different actors, so the pool stays evenly loaded without the writers sharing state."""
    gen = _preprocess_remote(num_cpus).remote(cfg_dict, part)
    pending: deque = deque()  # encoded-item refs, chunk order
    held = None  # the newest item ref; when the generator ends, the "end" item
    k, ended = first, False
    while not ended or pending:
        if pending and (ended or len(pending) >= ENCODE_AHEAD):
            yield ray.get(pending.popleft())
            continue
        # room for another encoder call: take whichever comes first, the next item or the oldest encoded one
        waitables = [gen] + ([pending[0]] if pending else [])
        ready, _ = ray.wait(waitables, num_returns=1, fetch_local=False)
        if pending and pending[0] in ready:
            yield ray.get(pending.popleft())
            continue
        try:
            ref = next(gen)
        except StopIteration:
            ended = True
            continue
        if held is not None:  # the previous item was chunks: only the generator's last item is the "end"
            pending.append(actors[k % len(actors)].encode.remote(held))
            k += 1
        held = ref
    assert held is not None  # the generator always yields its "end" item
    yield ray.get(held)
