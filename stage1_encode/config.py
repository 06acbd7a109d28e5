"""EncodeConfig: the typed `configs/encode/*.yaml` of the stage-1 job, one section per component.

Everything except `ray:`, `log:`, `storage:` and the pure locations below defines the cache's content: a resumed job
must see the same values (the job refuses to mix two configs in one cache, naming the keys that changed). `ray:`,
`log:` and `storage:` only say how fast and where it runs, so they may differ between a run and its resume.
`output.root` is where the cache is stored, not what it holds: a cache copied or moved elsewhere resumes there.
`encoders.root` is where the encoders are read from; what they are is their fingerprint (weights, configs, tokenizer
files), which the job checks against the cache's `encoders.json` before it writes anything, so a copied encoder
folder does not block a resume either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.text import DEFAULT_CAPTION
from shared.storage import StorageConfig
from stage1_encode.readers import InputConfig

Dtype = Literal["float32", "float16", "bfloat16"]

# Sections that do not change what is written (see module docstring).
RUNTIME_SECTIONS = ("ray", "log", "storage")
# (section, key) of fields that only say where things are (see module docstring).
LOCATION_FIELDS = (("output", "root"), ("encoders", "root"))


def _at_least(section: object, low: float, *names: str) -> None:
    """ValueError naming the first field of `section` below `low` (the loader prefixes the section's name)."""
    for name in names:
        value = getattr(section, name)
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value!r}")


@dataclass
class OutputConfig:
    root: str = "outputs/cache"  # the cache folder (created; resumed if it holds a partial cache of this config)
    format: Literal["zarr", "webdataset"] = "webdataset"
    rows_per_shard: int = 1024  # input rows per partition = per shard (the unit of resume)
    # Lossless either way; zstd (Blosc, shuffled, mT5 rows XOR-delta) is ~0.40x the naive layout vs ~0.57x raw
    # (bench/cache_size.py), for a few ms of decode per sample in the loader workers.
    compression: Literal["none", "zstd"] = "zstd"

    def __post_init__(self) -> None:
        _at_least(self, 1, "rows_per_shard")


@dataclass
class EncodersConfig:
    root: str = "ckpts/t2i"  # a folder in the original ckpts/t2i layout (sdxl-vae-fp16-fix, clip_text_encoder, ...)
    vae_dtype: Dtype = "float32"
    clip_dtype: Dtype = "float32"
    t5_dtype: Dtype = "float16"  # the original runs mT5 in fp16
    clip_len: int = 77
    t5_len: int = 256
    # Samples per encoder forward pass. Batches are cut from the data (same bucket, row order within a partition),
    # never from scheduling, so results do not depend on the number of actors.
    batch_size: int = 8

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size")
        _at_least(self, 2, "clip_len", "t5_len")


@dataclass
class ImageConfig:
    multireso: bool = True  # aspect buckets (the original's --multireso) or one square resolution
    resolution: int = 1024  # single-res crop size R; multi-res base size of the buckets (--image-size)
    reso_step: int = 64  # --reso-step: bucket side step
    align: int = 16  # ResolutionGroup align (only checked: base_size % align == 0)
    min_size: int = 0  # reject images with a side below this (IndexKits multireso `min_size`)
    max_aspect_ratio: float = 16.0  # reject long/short above this (0 = off); guards absurd resize targets
    max_pixels: int = 89_478_485  # reject W*H above this before decoding (PIL's MAX_IMAGE_PIXELS default)
    random_flip: bool = False  # store a second, horizontally flipped view (the original's --random-flip)
    crop: Literal["random", "center"] = "random"
    seed: int = 0  # crop offsets are drawn from an RNG seeded by (sample key, seed)

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.multireso:
            if self.resolution % self.align:
                raise ValueError(f"resolution {self.resolution} is not divisible by align {self.align}")
            if not 0 < self.reso_step <= self.resolution // 2 or self.reso_step % 8:
                raise ValueError(
                    f"reso_step must be a multiple of 8 in (0, resolution // 2 = {self.resolution // 2}], "
                    f"got {self.reso_step}"
                )
        _at_least(self, 1, "max_pixels")
        _at_least(self, 0, "max_aspect_ratio", "min_size")  # max_aspect_ratio 0 = off


@dataclass
class TextConfig:
    # What an empty (or whitespace-only) caption becomes: the original's default caption, or a reject.
    empty_caption: Literal["default", "reject"] = "default"
    default_caption: str = DEFAULT_CAPTION
    # What a null (missing) caption becomes. "default": the same as an empty caption (above). "reject": a reject
    # with reason null_caption. "original": the text "None", as the original trainer does (`str(None).strip()` in
    # arrow_load_stream.py get_text) -- it trains on the word "None"; kept only to reproduce the original exactly.
    # Null captions are counted in the job summary and the manifest (`null_captions`) whichever the rule.
    null_caption: Literal["default", "reject", "original"] = "default"


@dataclass
class RayConfig:
    address: str | None = None  # null: embedded local Ray (or RAY_ADDRESS when set); "auto" or host:port to attach
    num_cpus: int | None = None  # embedded Ray only: logical CPUs (default: os.cpu_count())
    object_store_memory_gb: float = 2.0  # embedded Ray only
    preprocess_num_cpus: float = 1.0  # each shard in flight runs one read/decode/resize/tokenise task
    num_encoder_actors: int = 1  # encoder replicas (ActorPoolStrategy size); one per GPU on a GPU cluster
    num_gpus_per_actor: float = 0.0  # 0 runs the encoders on CPU
    num_cpus_per_actor: float = 1.0
    actor_memory_gb: float = 1.0  # Ray memory reservation per encoder actor (model weights + activations)
    torch_threads: int = 0  # intra-op threads per encoder actor (0: torch's default)
    # Shards in flight: each is one writer task (zstd, tar/zarr, sha256, fsync, rename, sidecar, s3 publish) that runs
    # its partition's preprocessing task and feeds the encoder actors (shard_feed.py). Preprocessing (decode, crop,
    # tokenise) is the CPU-heavy part, so size this by it: enough shards that their preprocessing keeps every actor fed,
    # and at least num_encoder_actors. A shard in flight holds writer_num_cpus + preprocess_num_cpus. The output does
    # not depend on it.
    num_writers: int = 2
    writer_num_cpus: float = 1.0
    writer_retries: int = 2  # times Ray reruns a writer whose worker died (the shard is rewritten from the start)
    # Consecutive chunks of a partition travel as one item until their pixels reach this many MiB. Every item costs
    # its shard's writer a few Ray operations (the generator's report, the encoder call and its reply, the fetches):
    # ~5 ms of CPU when the driver made them (session 5, bench/encode.py), a per-sample cost at small items. 64 keeps an
    # item small at any resolution: 3 chunks of 8 at 1024^2 (24 MiB of uint8 pixels each), a whole shard of small
    # images. The cache does not depend on it.
    item_mb: float = 64.0

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_encoder_actors", "num_writers")
        _at_least(
            self,
            0,
            "num_gpus_per_actor",
            "num_cpus_per_actor",
            "preprocess_num_cpus",
            "torch_threads",
            "writer_num_cpus",
            "writer_retries",
        )
        if self.actor_memory_gb <= 0:
            raise ValueError(f"actor_memory_gb must be > 0, got {self.actor_memory_gb}")
        if self.item_mb <= 0:
            raise ValueError(f"ray.item_mb must be > 0, got {self.item_mb}")


@dataclass
class LogConfig:
    progress: bool = True  # tqdm bar on a terminal
    interval_s: float = 30.0  # a plain progress line this often when stdout is not a terminal (ray job logs, CI)


@dataclass
class EncodeConfig:
    input: InputConfig = field(default_factory=lambda: InputConfig(paths=["data"]))
    output: OutputConfig = field(default_factory=OutputConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # object storage (output.root=s3://...): endpoint, retries, the local staging folder; never credentials
    storage: StorageConfig = field(default_factory=StorageConfig)
