"""The configuration tree and its one loader.

Precedence, lowest to highest, resolved only in :func:`load_config`:
defaults < TOML file (``--config``) < ``LLM_RUNTIME_<SECTION>_<KEY>`` variables <
SageMaker hyperparameters (``section.key``) < command line ``--section.key=value``.
No other module reads configuration from the environment.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CheckpointConfig", "CommConfig", "Config", "ConfigError", "DataConfig", "DistConfig", "HealthConfig", "LaunchConfig", "MetricsConfig", "ModelConfig", "NetenvConfig", "ParallelConfig",
           "TrainConfig", "WatchdogConfig", "ENV_PREFIX", "load_config", "parse_cli_overrides", "to_dict"]

ENV_PREFIX = "LLM_RUNTIME_"


#: Keys that take one of a few words; checked where the value is read, with its source.
CHOICES = {
    "train.lr_schedule": ("constant", "cosine"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "launch.cluster": ("", "sagemaker", "torchrun", "mpi", "local"),
    "netenv.efa": ("auto", "on", "off"),
    "netenv.verify_efa": ("auto", "require", "off"),
    "parallel.backend": ("fsdp", "deepspeed"),
    "parallel.zero_shard_mode": ("hpz", "mics"),
    "deepspeed.partition_method": ("uniform", "parameters"),
    "parallel.pp_schedule": ("gpipe", "1f1b", "interleaved"),
    "parallel.mixed_precision": ("bf16", "fp32"),
    "parallel.reduce_dtype": ("bf16", "fp32"),
    "parallel.activation_checkpoint": ("none", "full", "every"),
    "data.mode": ("stream", "stage"),
    "health.stragglers": ("warn", "fail"),
}


#: Keys that were renamed, with their new names (a clear error instead of "unknown key").
MOVED = {"dist.init_timeout_s": "comm.init_timeout_s", "dist.train_timeout_s": "comm.train_timeout_s",
         "train.metrics_path": "metrics.jsonl"}


class ConfigError(ValueError):
    """A configuration value is unknown or malformed; the message names the key and its source."""


@dataclass
class TrainConfig:
    steps: int = 30
    """Optimizer steps to run."""
    seed: int = 1234
    """Seeds model init and the data order; ranks derive their own RNG streams from it."""
    batch_size: int = 16
    """GLOBAL batch in sequences per step, whatever the parallel layout."""
    micro_batch_size: int = 0
    """Sequences per replica per forward pass; 0 = the whole per-replica share (no accumulation)."""
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 5
    lr_schedule: str = "cosine"
    """``constant`` or ``cosine`` (decays to ``min_lr_ratio * lr`` at the last step)."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    log_every: int = 5
    """Steps between metrics lines (see metrics.py for the line's fields)."""
    export_dir: str = ""
    """When set, the final full weights are written there (one torch file per pipeline rank; fsdp backend)."""
    output_dir: str = ""
    """Failure records and reports; empty = SageMaker's output dir (SM_OUTPUT_DIR, /opt/ml/output) on
    SageMaker, else none (the record is only logged)."""
    model_dir: str = ""
    """Where the final consolidated model.safetensors goes; empty = SageMaker's model dir
    (SM_MODEL_DIR, /opt/ml/model) on SageMaker, else none."""


@dataclass
class ModelConfig:
    dim: int = 128
    layers: int = 4
    heads: int = 4


@dataclass
class ParallelConfig:
    backend: str = "fsdp"
    """``fsdp`` (FSDP2 / HSDP + tensor and pipeline parallel via torch.distributed) or ``deepspeed``."""
    zero_stage: int = -1
    """DeepSpeed ZeRO stage 0-3; -1 = 3, or 1 with pipeline parallelism."""
    zero_shard_mode: str = "hpz"
    """How DeepSpeed uses shard_group_size: ``hpz`` (ZeRO++ hpZ) or ``mics`` (older DeepSpeed only)."""
    dp_replicate: int = 0
    """Data-parallel replica groups (HSDP); 0 = infer from shard_group_size / the node layout."""
    dp_shard: int = -1
    """Ranks one model copy is sharded over (FSDP); -1 = infer."""
    tp: int = 1
    """Tensor-parallel size (consecutive ranks, so keep it within a node)."""
    sequence_parallel: bool = True
    """With tp > 1, split norms, embeddings and head along the sequence (less activation memory)."""
    pp: int = 1
    """Pipeline stages."""
    shard_group_size: int = 0
    """Shard group size for both backends (FSDP's HSDP, DeepSpeed's MiCS/hpZ); 0 = default."""
    pp_schedule: str = "1f1b"
    """``gpipe``, ``1f1b`` or ``interleaved`` (interleaved 1F1B: two or more stages per rank)."""
    microbatches: int = 0
    """Pipeline microbatches per step; 0 = as many as stages in the pipeline."""
    stages_per_rank: int = 0
    """Pipeline stages held by each rank; 0 = 1, or 2 for the interleaved schedule."""
    pp_split_points: str = ""
    """Comma-separated layer indices where stages 1.. begin (e.g. "3,6"); empty = even split."""
    mixed_precision: str = "bf16"
    """Parameter/compute dtype: ``bf16`` or ``fp32`` (CPU always runs fp32)."""
    reduce_dtype: str = "fp32"
    """Gradient reduction dtype: ``fp32`` or ``bf16``."""
    activation_checkpoint: str = "none"
    """``none``, ``full`` (every block) or ``every`` (every ``ac_every``-th block)."""
    ac_every: int = 2
    compile: bool = False
    """torch.compile each transformer block."""


@dataclass
class DeepSpeedConfig:
    config: str = ""
    """A DeepSpeed JSON merged over the runtime's own (its keys win; conflicts are reported)."""
    partition_method: str = "uniform"
    """How PipelineModule assigns layers to stages: ``uniform`` (layer count) or ``parameters``."""


@dataclass
class DataConfig:
    uri: str = ""
    """Token shards (``llm-runtime prepare-data`` output): a directory, ``s3://bucket/prefix`` or
    ``channel:NAME`` (a SageMaker input channel). Empty = the ``train`` channel when the job has
    one, else the bundled text."""
    mode: str = "stream"
    """``stream`` (read shards where they are) or ``stage`` (copy them once per host to local disk first)."""
    num_partitions: int = 0
    """Logical streams the data is dealt into; every data-parallel size must divide it and it must
    divide train.batch_size. 0 = data-parallel size x max(1, num_workers). A resumed run keeps its own."""
    shuffle_block: int = 1024
    """Samples shuffled together (a bounded shuffle buffer per partition)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    max_open_shards: int = 4
    """Shard streams each DataLoader worker reads at once."""
    stage_dir: str = ""
    """Where ``mode=stage`` copies shards; empty = $TMPDIR/llm_runtime/data."""
    stage_timeout_s: float = 3600.0
    """How long ranks wait for their host's staging copy."""
    max_attempts: int = 8
    """Attempts per S3 request or interrupted body before the error names the object."""
    timeout_s: float = 900.0
    """Longest wait for one batch from a DataLoader worker."""


@dataclass
class CheckpointConfig:
    uri: str = ""
    """Tier 2: ``s3://bucket/prefix`` or a shared PATH; empty = node-local checkpoints only."""
    local_dir: str = ""
    """Tier 1, node-local disk; empty = $TMPDIR/llm_runtime/checkpoints (or /opt/ml/checkpoints with
    sagemaker_sync)."""
    sagemaker_sync: bool = False
    """Write tier 1 under /opt/ml/checkpoints, which SageMaker itself syncs to S3."""
    run_id: str = ""
    """Names this run's checkpoints under the URI; empty = derived from checkpoint.uri (stable)."""
    every_steps: int = 0
    """Save every N steps (0 = off)."""
    every_minutes: float = 0.0
    """Save when this many minutes passed since the last save (0 = off)."""
    at_end: bool = True
    """Save after the last step."""
    keep: int = 2
    """Complete checkpoints kept locally and in the URI (the newest complete one is never deleted)."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint of this run, if any), ``never``, or a checkpoint URI/PATH."""
    part_size_mb: int = 64
    """Multipart upload part size."""
    upload_concurrency: int = 8
    """Parts in flight per node upload."""
    upload_timeout_s: float = 1800.0
    """A node upload taking longer is a failure (reported, never a silent hang)."""
    prefix_spread: int = 8
    """Node objects are spread over this many key prefixes (S3 request rates are per prefix)."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """``auto`` (nccl with GPUs, gloo without), ``nccl`` or ``gloo``."""


@dataclass
class CommConfig:
    init_timeout_s: float = 1800.0
    """Rendezvous and first barrier: hosts of a large job start minutes apart."""
    train_timeout_s: float = 600.0
    """Every collective after start-up, on every process group; a hung peer becomes an error after this long."""


@dataclass
class WatchdogConfig:
    enabled: bool = True
    """A thread in every worker that ends the job when a phase makes no progress (see watchdog.py)."""
    step_timeout_s: float = 0.0
    """Longest data wait or training step; 0 = ``multiple`` x the median step time, at least ``floor_s``
    (``first_timeout_s`` until ``warmup_steps`` steps were timed)."""
    multiple: float = 10.0
    floor_s: float = 180.0
    warmup_steps: int = 3
    first_timeout_s: float = 1800.0
    """Start-up and the first steps (compilation, first data fetch, restoring a checkpoint)."""
    checkpoint_timeout_s: float = 0.0
    """Longest blocking part of a save or restore; 0 = checkpoint.upload_timeout_s + 300 s. The
    background upload has its own deadline (checkpoint.upload_timeout_s)."""
    exchange_s: float = 10.0
    """After a stall, how long a rank waits for the other stalled ranks' records to name a suspect."""


@dataclass
class MetricsConfig:
    jsonl: str = ""
    """Rank 0 appends each metrics record here; empty = SageMaker's output data dir
    (/opt/ml/output/data/metrics.jsonl) or ``train.output_dir/metrics.jsonl``; ``none`` = off."""
    tensorboard: bool = False
    """Also write TensorBoard event files (the ``tensorboard`` extra)."""
    tensorboard_dir: str = ""
    """Empty = /opt/ml/output/tensorboard on SageMaker (its TensorBoardOutputConfig path), else
    ``train.output_dir/tensorboard``."""
    peak_tflops: float = 0.0
    """The device's peak TFLOP/s for MFU; 0 = from the table of known accelerators (metrics.py)."""
    flops_per_token: float = 0.0
    """Training FLOPs per token for MFU; 0 = the bundled model's exact count."""


@dataclass
class HealthConfig:
    preflight: bool = False
    """Run the health check (``llm-runtime healthcheck``) in every worker before training starts."""
    matmul_size: int = 0
    """Square matmul size per device; 0 = 8192 (bf16) on a GPU, 384 (fp32) on CPU."""
    iters: int = 10
    """Timed matmuls and all-reduces."""
    alloc_mb: int = 0
    """Memory each device must allocate and fill; 0 = 80% of the free memory on a GPU, 256 MB on CPU."""
    allreduce_mb: float = 0.0
    """All-reduce message size; 0 = 256 MB on GPUs, 4 MB on CPU."""
    straggler_factor: float = 1.5
    """A rank whose matmul takes this many times the median (or longer) is named a straggler."""
    stragglers: str = "warn"
    """``warn`` (name them and go on) or ``fail`` (their nodes fail the check)."""
    timeout_s: float = 600.0
    """The whole check's watchdog timeout (collectives also keep comm.train_timeout_s)."""


@dataclass
class LaunchConfig:
    nproc_per_node: int = 0
    """Workers per host; 0 = one per GPU, or 2 on a host without GPUs."""
    max_restarts: int = 0
    """Times the elastic agent restarts the local workers after a failure."""
    cluster: str = ""
    """Force a cluster kind (sagemaker, torchrun, mpi, local); empty = detect."""
    mpi: bool = False
    """Start the workers with mpirun from the first host instead of torchrun on each host."""
    mpi_wait_timeout_s: float = 600.0
    """How long a non-first host waits for the first host's mpirun to appear."""
    stop_deadline_s: float = 100.0
    """After the platform's SIGTERM: how long the workers get to save a checkpoint and stop before
    they are torn down (spot interruptions give 120 s). 0 = tear down at once."""


@dataclass
class NetenvConfig:
    efa: str = "auto"
    """``auto`` (probe), ``on`` or ``off``: whether the hosts have EFA."""
    verify_efa: str = "auto"
    """On EFA hosts with NCCL: read NCCL's INFO log at start and say which network it chose. ``auto``
    warns on a fallback, ``require`` exits with code 88, ``off`` leaves NCCL_DEBUG alone."""
    libfabric_version: str = ""
    ofi_nccl_version: str = ""
    nccl_version: str = ""


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    netenv: NetenvConfig = field(default_factory=NetenvConfig)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _coerce(value: Any, kind: type, key: str, source: str) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{key} expects {what}, got {value!r} (from {source})")

    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise bad("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad("an integer") from None
    if kind is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
    if isinstance(value, (dict, list)):
        raise bad("a string")
    return str(value)


def _set(config: Config, dotted: str, value: Any, source: str) -> None:
    sections = _sections(config)
    section_name, _, key = dotted.partition(".")
    if section_name not in sections or not key:
        raise ConfigError(
            f"unknown config key {dotted!r} (from {source}); keys look like section.key "
            f"with section one of {', '.join(sections)}"
        )
    section = sections[section_name]
    hints = typing.get_type_hints(type(section))
    if dotted in MOVED:
        raise ConfigError(f"config key {dotted!r} (from {source}) is now {MOVED[dotted]!r}")
    if key not in hints:
        raise ConfigError(
            f"unknown config key {dotted!r} (from {source}); [{section_name}] has "
            f"{', '.join(sorted(hints))}"
        )
    value = _coerce(value, hints[key], dotted, source)
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(f"{dotted} must be one of {', '.join(map(repr, CHOICES[dotted]))}, got {value!r} (from {source})")
    setattr(section, key, value)


def parse_cli_overrides(args: Iterable[str]) -> list[tuple[str, str]]:
    """``--section.key=value`` or ``--section.key value`` pairs, in order."""
    args = list(args)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --train.steps=10")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value (--{name}=VALUE)")
            i += 1
            value = args[i]
        pairs.append((name, value))
        i += 1
    return pairs


def _walk_toml(data: Mapping[str, Any], path: Path) -> list[tuple[str, Any]]:
    pairs = []
    for section, body in data.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table")
        pairs.extend((f"{section}.{key}", value) for key, value in body.items())
    return pairs


def load_config(
    *,
    toml_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    cli: Iterable[tuple[str, str]] = (),
    strict_hyperparameters: bool = True,
) -> Config:
    """Build the Config from every source, in precedence order (see module docstring).

    ``strict_hyperparameters=False`` is for user programs on SageMaker: their own
    hyperparameters (keys without a known ``section.``) are theirs, not ours.
    """
    config = Config()
    if toml_path:
        path = Path(toml_path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        for key, value in _walk_toml(data, path):
            _set(config, key, value, f"config file {path}")
    for name, value in sorted((env or {}).items()):
        if name.startswith(ENV_PREFIX) and name[len(ENV_PREFIX):].count("_") >= 1:
            section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
            if section in _sections(config):
                _set(config, f"{section}.{key}", value, f"environment variable {name}")
    sections = _sections(config)
    for key, value in (hyperparameters or {}).items():
        if key.startswith("sagemaker_"):
            continue  # the platform's own parameters (program, region, distribution, ...)
        if not strict_hyperparameters and key.partition(".")[0] not in sections:
            continue
        _set(config, key, value, "SageMaker hyperparameters.json")
    for key, value in cli:
        _set(config, key, value, f"command line --{key}")
    return config
