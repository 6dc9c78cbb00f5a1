"""``build_loader(config, dims)``: the training job's data, from ``[data]`` and ``[train]``.

:func:`plan_data` holds every decision and check (the launcher runs it before any worker
starts, so a wrong URI, a seq_len mismatch or a layout that does not fit fail first);
:func:`build_loader` adds the side effects (staging, opening the loader).
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..paths import JobPaths, job_paths
from .location import DataLocation, LocationError, resolve_location
from .loader import STATE_VERSION, LoaderSpec, ShardLoader, load_index
from .order import DataOrder, OrderError, auto_partitions
from .shards import RecordLayout, ShardIndex
from ..storage import StorageError, open_store

__all__ = ["BundledLoader", "DataPlan", "INDEX_COPY_ENV", "build_loader", "global_batch_starts", "host_index_copy",
           "keep_index_copy", "plan_data"]

INDEX_COPY_ENV = "LLM_RUNTIME_HOST_INDEX"  # not LLM_RUNTIME_DATA_*: that prefix sets [data] keys


@dataclass(frozen=True)
class DataPlan:
    location: DataLocation
    index: ShardIndex | None = None
    fingerprint: str = ""
    order: DataOrder | None = None
    text: str = ""
    """index.json as read, for the host's workers (:func:`keep_index_copy`)."""

    def describe(self) -> str:
        if self.index is None:
            return self.location.describe()
        return (f"{self.location.describe()}: {len(self.index.shards)} shards, {self.index.total_samples} samples, "
                f"{self.order.steps_per_epoch} steps per epoch, {self.order.num_partitions} partitions")


def plan_data(config: Config, dp_size: int, paths: JobPaths | None = None,
              num_partitions: int | None = None) -> DataPlan:
    """Resolve and check the job's data; ConfigError names the key, the URI and what is wrong.

    ``paths`` gives the SageMaker channels (default: this process's environment).
    ``num_partitions`` (from a saved loader state) wins over ``data.num_partitions`` when that is auto.
    """
    data, train = config.data, config.train
    paths = paths or job_paths(config, "", os.environ)
    try:
        location = resolve_location(data.uri, paths)
    except LocationError as err:
        raise ConfigError(str(err)) from None
    if location.kind == "bundled":
        return DataPlan(location)
    if location.kind == "s3" and importlib.util.find_spec("boto3") is None:
        raise ConfigError(f"data.uri={location.uri} needs boto3: pip install 'llm-runtime[s3]'")
    try:
        copy = host_index_copy(location.uri)  # the host's launcher read it: no request per rank
        if location.kind == "s3" and copy is None:  # a missing bucket, endpoint or credentials: one line, in seconds
            copy = open_store(location.uri).probe(read="index.json")  # the probe is the index's GET
        index, fingerprint = load_index(location.uri, max_attempts=data.max_attempts, text=copy)
        layout = RecordLayout.for_index(index)
        for shard in index.shards:
            if shard.samples < 0 or shard.bytes < shard.samples * layout.record_bytes:
                raise ValueError(f"index.json lists shard {shard.name} with {shard.samples} samples in "
                                 f"{shard.bytes} bytes; records are {layout.record_bytes} bytes each")
    except (StorageError, ValueError, TypeError) as err:
        raise ConfigError(f"data.uri ({location.describe()}): {err}") from None
    if index.seq_len != train.seq_len:
        raise ConfigError(f"data.uri ({location.describe()}) holds sequences of {index.seq_len} tokens "
                          f"(index.json seq_len) but train.seq_len={train.seq_len}; set --train.seq_len="
                          f"{index.seq_len} or prepare the data again")
    if not 2 <= index.vocab_size <= 2**31:
        raise ConfigError(f"data.uri ({location.describe()}): index.json vocab_size={index.vocab_size} "
                          "is not a vocabulary size")
    parts = num_partitions or data.num_partitions or auto_partitions(dp_size, data.num_workers)
    try:
        order = DataOrder(tuple(s.samples for s in index.shards), batch_size=train.batch_size,
                          num_partitions=parts, shuffle_block=data.shuffle_block, seed=train.seed)
        streams = order.check_layout(dp_size, data.num_workers)
    except OrderError as err:
        raise ConfigError(f"{err} (data at {location.describe()})") from None
    if streams > data.max_open_shards:
        raise ConfigError(f"each DataLoader worker would stream {streams} partitions at once but "
                          f"data.max_open_shards={data.max_open_shards}; raise it, add data.num_workers, "
                          "or lower data.num_partitions")
    return DataPlan(location, index, fingerprint, order, text=copy if copy is not None else index.to_json())


def host_index_copy(uri: str, env=None) -> str | None:
    """index.json as the host's launcher read it (``LLM_RUNTIME_HOST_INDEX`` names the file), when it
    is of ``uri``; else None. At 1,024 hosts x 8 ranks, one read per host keeps the data root under
    half of S3's per-prefix request rates (benchmarks/s3_scale.py)."""
    path = (os.environ if env is None else env).get(INDEX_COPY_ENV, "")
    if not path:
        return None
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # gone or torn: read it from the source
    return body.get("text") if isinstance(body, dict) and body.get("uri") == uri else None


def keep_index_copy(plan: DataPlan | None, env, directory: str = "") -> None:
    """The launcher's side: write the index it read where this host's workers find it
    (``$TMPDIR/llm_runtime/``, named by the URI and the shards, so a copy is never another job's)."""
    if plan is None or plan.index is None or not plan.text:
        return
    import hashlib
    import tempfile

    name = hashlib.sha256(f"{plan.location.uri}\n{plan.fingerprint}".encode()).hexdigest()[:16]
    path = Path(directory or Path(tempfile.gettempdir()) / "llm_runtime") / f"data-index-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"uri": plan.location.uri, "text": plan.text}))
    tmp.replace(path)
    env[INDEX_COPY_ENV] = str(path)


def global_batch_starts(seed: int, step: int, batch_size: int, num_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of the step's global batch: a function of (seed, step) only."""
    if num_tokens < seq_len + 2:
        raise ConfigError(f"train.seq_len={seq_len} is longer than the text ({num_tokens} tokens)")
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len - 1, size=batch_size)


class BundledLoader:
    """No data configured: seeded random windows of the bundled text (a function of seed and step)."""

    def __init__(self, config: Config, dp_rank: int, dp_size: int):
        from ..models import ByteTokenizer, bundled_text

        self.train, self.dp_rank, self.dp_size = config.train, dp_rank, dp_size
        self.tokens = torch.from_numpy(ByteTokenizer().encode_array(bundled_text()).astype(np.int64))
        self.offsets = torch.arange(self.train.seq_len + 1)
        self.step = 0

    def next_batch(self) -> torch.Tensor:
        train, per_replica = self.train, self.train.batch_size // self.dp_size
        self.step += 1
        starts = global_batch_starts(train.seed, self.step, train.batch_size, len(self.tokens), train.seq_len)
        mine = torch.from_numpy(starts[self.dp_rank * per_replica:(self.dp_rank + 1) * per_replica])
        return self.tokens[mine[:, None] + self.offsets]

    def stats(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "bundled": True, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("bundled"):
            raise ValueError("the saved data position is for token shards, but this run reads the bundled text")
        self.step = int(state["step"])

    def close(self) -> None:
        pass

    def __enter__(self) -> "BundledLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_loader(config: Config, dims, *, dp_rank: int, local_rank: int = 0, paths: JobPaths | None = None,
                 plan: DataPlan | None = None, state: dict | None = None,
                 last_step: int | None = None) -> ShardLoader | BundledLoader:
    """This rank's loader: its data-parallel replica's rows of every global batch.

    ``last_step`` (from 0: ``train.steps - 1`` for a training job) ends the token shards' stream
    there: nothing is read or prefetched past it, so a run makes no GET it does not use.

    ``state`` (a saved ``state_dict()``) resumes at its position; with ``data.num_partitions``
    left at auto, the saved run's partition count is kept, so the order continues unchanged.
    """
    data = config.data
    saved_parts = (state or {}).get("num_partitions") if not data.num_partitions else None
    if plan is None or (saved_parts and plan.order is not None and plan.order.num_partitions != saved_parts):
        plan = plan_data(config, dims.dp_size, paths, num_partitions=saved_parts)
    if plan.index is None:
        loader = BundledLoader(config, dp_rank, dims.dp_size)
        if state:
            loader.load_state_dict(state)
        return loader
    uri = plan.location.uri
    if data.mode == "stage":
        from .stage import stage

        uri = stage(uri, plan.index, plan.fingerprint, stage_dir=data.stage_dir, local_rank=local_rank,
                    timeout_s=data.stage_timeout_s)
    sequential = plan.location.sequential
    spec = LoaderSpec(uri=uri, names=tuple(s.name for s in plan.index.shards), order=plan.order,
                      layout=RecordLayout.for_index(plan.index), dp_rank=dp_rank, dp_size=dims.dp_size,
                      num_workers=data.num_workers, threads=1 if sequential else data.max_open_shards,
                      max_attempts=data.max_attempts, read_size=(8 if sequential else 1) << 20,
                      last_step=last_step)
    loader = ShardLoader(spec, fingerprint=plan.fingerprint, location=plan.location.describe(),
                         timeout_s=data.timeout_s, auto_partitions=not data.num_partitions,
                         max_open_shards=data.max_open_shards)
    if state:
        loader.load_state_dict(state)
    return loader
