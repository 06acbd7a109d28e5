"""The driver's loop: plan which partition goes where, launch the Ray tasks and actors, record what they report.

    partition -> preprocess_partition (streaming-generator task)  yields item refs in order, then an "end" ref
    item ref  -> EncoderActor.encode (least-loaded of the pool)     returns an encoded-item ref
    all refs  -> write_shard (one task per shard, <= ray.num_writers in flight)   writes + commits the shard

An item carries consecutive chunks of one partition (up to ray.item_mb MiB of pixels; a chunk is
one encoder batch, encoded on its own): the driver's Ray operations are per item, not per chunk.

The driver holds ObjectRefs and counters only: it never fetches a chunk (ray.wait with fetch_local=False), so its
memory is O(shards in flight x items per shard) refs and its CPU a few Ray calls per item, whatever the sample size.
It receives one small item: the empty caption (one sample, for the encoders' check).

Backpressure. A generator yields at most a few items ahead of the driver (_generator_backpressure_num_objects);
the driver pulls from generators only while an encoder has a free slot (`IN_FLIGHT_PER_ACTOR` calls each), and
opens a new partition only while fewer than preprocess_tasks + num_writers are in flight. Encoded chunks wait in the
object store (spilled to disk if full) until their shard's writer takes them: at most num_writers shards plus the
partitions being preprocessed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any

import ray

from shared.config import config_to_dict
from shared.schema import CacheSpec
from stage1_encode.config import EncodeConfig
from stage1_encode.encoder_actor import EncoderActor
from stage1_encode.payload import Item, read_item
from stage1_encode.preprocess_task import preprocess_empty, preprocess_partition
from stage1_encode.progress import Progress
from stage1_encode.readers import Partition
from stage1_encode.shard_writer import WriterJob, write_shard

logger = logging.getLogger("stage1_encode")

IN_FLIGHT_PER_ACTOR = 2  # one encoding, one queued: the actor never waits for the driver
GENERATOR_AHEAD = 4  # items a preprocessing task may produce before the driver takes them


@dataclasses.dataclass
class _Open:
    """One partition in flight: refs only."""

    part: Partition
    gen: Any = None  # ObjectRefGenerator while preprocessing runs
    held: Any = None  # the newest item ref: chunks, or (when the generator ends) the "end" item
    encoded: list = dataclasses.field(default_factory=list)  # encoded-item refs, in chunk order


class Dispatcher:
    def __init__(
        self, cfg: EncodeConfig, spec: CacheSpec, writer_job: WriterJob, todo: list[Partition], progress: Progress
    ) -> None:
        r = cfg.ray
        self.cfg, self.spec, self.base_job, self.progress = cfg, spec, writer_job, progress
        self.cfg_dict = config_to_dict(cfg)
        self.queue = deque(todo)
        self.max_open = r.preprocess_tasks + r.num_writers
        self.preprocess = ray.remote(preprocess_partition).options(
            num_returns="streaming", num_cpus=r.preprocess_num_cpus, _generator_backpressure_num_objects=GENERATOR_AHEAD
        )
        self.writer = ray.remote(write_shard).options(num_cpus=r.writer_num_cpus, max_retries=r.writer_retries)
        # `memory=` reserves the weights' room; restarts: an actor that died is rebuilt and its call retried (a
        # chunk's encoding is a pure function of the chunk).
        actor_cls = ray.remote(EncoderActor).options(
            num_gpus=r.num_gpus_per_actor,
            num_cpus=r.num_cpus_per_actor,
            memory=int(r.actor_memory_gb * 1024**3),
            max_restarts=2,
            max_task_retries=2,
        )
        self.actors = [actor_cls.remote(self.cfg_dict) for _ in range(r.num_encoder_actors)]
        self.load = [0] * len(self.actors)
        self.encoding: dict[Any, int] = {}  # encoded ref -> actor index
        self.preprocessing: dict[Any, _Open] = {}  # generator -> partition
        self.waiting: deque[_Open] = deque()  # preprocessed, waiting for a writer slot
        self.writing: dict[Any, str] = {}  # writer result ref -> shard name
        self.n_open = 0
        self.results: list[dict] = []

    def encode_empty(self) -> Item:
        """The empty caption through the first encoder actor (tokens from a preprocessing task)."""
        tokens = ray.remote(preprocess_empty).options(num_cpus=self.cfg.ray.preprocess_num_cpus).remote(self.cfg_dict)
        return ray.get(self.actors[0].encode_empty_item.remote(tokens))

    def _open_partitions(self) -> None:
        while self.queue and len(self.preprocessing) < self.cfg.ray.preprocess_tasks and self.n_open < self.max_open:
            part = self.queue.popleft()
            o = _Open(part, gen=self.preprocess.remote(self.cfg_dict, dataclasses.asdict(part)))
            self.preprocessing[o.gen] = o
            self.n_open += 1

    def _submit(self, o: _Open, ref: Any) -> None:
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        out = self.actors[i].encode.remote(ref)
        self.load[i] += 1
        self.encoding[out] = i
        o.encoded.append(out)

    def _take(self, o: _Open) -> None:
        """The generator of `o` is ready: its next item, or its end."""
        try:
            ref = next(o.gen)
        except StopIteration:  # the held item is the "end": the partition goes to a writer
            del self.preprocessing[o.gen]
            o.gen = None
            self.waiting.append(o)
            return
        if o.held is not None:  # the previous item was chunks (only the last one is the "end")
            self._submit(o, o.held)
        o.held = ref

    def _launch_writers(self) -> None:
        while self.waiting and len(self.writing) < self.cfg.ray.num_writers:
            o = self.waiting.popleft()
            job = dataclasses.replace(self.base_job, name=o.part.name)
            ref = self.writer.remote(job, o.encoded, o.held)
            self.writing[ref] = o.part.name

    def run(self) -> list[dict]:
        while self.queue or self.preprocessing or self.waiting or self.writing:
            self._open_partitions()
            self._launch_writers()
            free = sum(IN_FLIGHT_PER_ACTOR - n for n in self.load) > 0
            waitables = (list(self.preprocessing) if free else []) + list(self.encoding) + list(self.writing)
            if not waitables:
                continue
            ready, _ = ray.wait(waitables, num_returns=1, timeout=1.0, fetch_local=False)
            for x in ready:
                if x in self.preprocessing:
                    self._take(self.preprocessing[x])
                elif x in self.encoding:
                    self.load[self.encoding.pop(x)] -= 1
                else:
                    self._finish_writer(x)
        return self.results

    def _finish_writer(self, ref: Any) -> None:
        name = self.writing.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):  # a user mistake the writer found (output.root not shared)
                raise e.cause from None
            raise RuntimeError(f"the writer of shard {name} failed: {e}; re-run to resume") from e
        except ray.exceptions.RayError as e:  # its worker died more often than ray.writer_retries allows
            raise RuntimeError(
                f"the writer of shard {name} died ({type(e).__name__}: {e}) after "
                f"ray.writer_retries={self.cfg.ray.writer_retries} retries; re-run to resume"
            ) from e
        self.n_open -= 1
        self.results.append(res)
        self.progress.update(res["written"], res["rejected"])
        logger.info(
            f"shard {name}: {res['written']} samples, {res['rejected']} rejects, {res['bytes']} bytes "
            f"(writer on {res['node']})"
        )


def read_empty(item: Item) -> tuple[dict, dict]:
    _, arrays, meta = read_item(item)
    return arrays, meta


def steady_span(results: list[dict]) -> tuple[float, float] | None:
    spans = [r["t_encode"] for r in results if r["t_encode"]]
    return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None
