"""The driver's loop: plan which partition goes where, launch the Ray tasks and actors, record what they report.

    partition -> write_shard: one Ray task per shard (shard_writer.py), <= ray.num_writers in flight. It runs the
                 partition's preprocessing task, sends each item to the encoder actors and writes what comes back
                 (shard_feed.py), then commits the shard and returns its counts.
    the pool  -> EncoderActor: started here, passed to every writer as handles

The driver holds one ObjectRef per shard in flight and per-shard counts: its Ray calls are a task and a reply per
shard, whatever the number and size of the samples (bench/encode.py measures its CPU per sample). The per-item
ObjectRefs are the writers' own. It receives one small item: the empty caption (one sample, for the encoders'
check), before any writer starts, so no shard is ever committed with encoders other than the cache's.
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
from stage1_encode.preprocess_task import preprocess_empty
from stage1_encode.progress import Progress
from stage1_encode.readers import Partition
from stage1_encode.shard_writer import WriterJob, write_shard

logger = logging.getLogger("stage1_encode")


class Dispatcher:
    def __init__(
        self, cfg: EncodeConfig, spec: CacheSpec, writer_job: WriterJob, todo: list[Partition], progress: Progress
    ) -> None:
        r = cfg.ray
        self.cfg, self.spec, self.base_job, self.progress = cfg, spec, writer_job, progress
        self.cfg_dict = config_to_dict(cfg)
        self.queue = deque(todo)
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
        self.writing: dict[Any, str] = {}  # writer result ref -> shard name
        self.n_launched = 0
        self.results: list[dict] = []

    def encode_empty(self) -> Item:
        """The empty caption through the first encoder actor (tokens from a preprocessing task)."""
        tokens = ray.remote(preprocess_empty).options(num_cpus=self.cfg.ray.preprocess_num_cpus).remote(self.cfg_dict)
        return ray.get(self.actors[0].encode_empty_item.remote(tokens))

    def _launch_writers(self) -> None:
        while self.queue and len(self.writing) < self.cfg.ray.num_writers:
            part = self.queue.popleft()
            job = dataclasses.replace(self.base_job, name=part.name)
            first = self.n_launched % len(self.actors)  # consecutive shards start on consecutive actors
            ref = self.writer.remote(job, dataclasses.asdict(part), self.actors, first)
            self.n_launched += 1
            self.writing[ref] = part.name

    def run(self) -> list[dict]:
        while self.queue or self.writing:
            self._launch_writers()
            ready, _ = ray.wait(list(self.writing), num_returns=1, timeout=1.0, fetch_local=False)
            for x in ready:
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
