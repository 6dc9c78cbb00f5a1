"""The configuration tree: one dataclass per ``[section]``, a docstring under every key.

A key's annotation is its whole contract: the type, ``Literal`` choices, and a range
(``Annotated[int, ge(1)]``); :mod:`llm_runtime.config.check` enforces it whatever set the value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from .rules import between, ge, gt, not_zero

__all__ = ["CheckpointConfig", "CommConfig", "Config", "DataConfig", "DeepSpeedConfig", "DistConfig",
           "EvalConfig", "HealthConfig", "LaunchConfig", "MetricsConfig", "ModelConfig", "NetenvConfig", "ParallelConfig",
           "TrainConfig", "WatchdogConfig"]


@dataclass
class TrainConfig:
    steps: Annotated[int, ge(1)] = 30
    """Optimizer steps to run."""
    seed: int = 1234
    """Seeds model init and the data order; ranks derive their own RNG streams from it."""
    batch_size: Annotated[int, ge(1)] = 16
    """GLOBAL batch in sequences per step, whatever the parallel layout."""
    micro_batch_size: Annotated[int, ge(0)] = 0
    """Sequences per replica per forward pass; 0 = the whole per-replica share (no accumulation)."""
    seq_len: Annotated[int, ge(1)] = 128
    lr: Annotated[float, ge(0)] = 3e-3
    """Peak learning rate; 0 trains nothing (a dry run whose exported model equals its input)."""
    warmup_steps: Annotated[int, ge(0)] = 5
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """``constant`` or ``cosine`` (decays to ``min_lr_ratio * lr`` at the last step)."""
    min_lr_ratio: Annotated[float, between(0, 1)] = 0.1
    weight_decay: Annotated[float, ge(0)] = 0.1
    grad_clip: Annotated[float, ge(0)] = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    log_every: Annotated[int, ge(1)] = 5
    """Steps between metrics lines (see metrics.py for the line's fields)."""
    output_dir: str = ""
    """Failure records and reports; empty = SageMaker's output dir (SM_OUTPUT_DIR, /opt/ml/output) on
    SageMaker, else none (the record is only logged)."""
    model_dir: str = ""
    """Where the final model goes, in Hugging Face format (config.json, sharded safetensors and their
    index); empty = SageMaker's model dir (SM_MODEL_DIR, /opt/ml/model) on SageMaker, else none."""
    model_shard_mb: Annotated[int, ge(1)] = 5000
    """Largest safetensors file of the final model, in MB (a bigger tensor gets a file of its own)."""
    spike_sigma: Annotated[float, ge(0)] = 6.0
    """A loss above the mean + this many standard deviations of the last ``spike_window`` steps is a
    bad batch, like a loss that is not finite (badbatch.py): rolled back and skipped; 0 = only
    non-finite losses count."""
    spike_window: Annotated[int, ge(2)] = 100
    """Steps of loss history a spike is judged against (none is judged before it is full)."""
    max_rollbacks: Annotated[int, ge(0)] = 3
    """Rollbacks to the last clean checkpoint a run may make (over all its attempts); past that the
    job fails with a record saying why."""


@dataclass
class ModelConfig:
    dim: Annotated[int, ge(1)] = 128
    """The bundled Llama's width (ignored with hf_path)."""
    layers: Annotated[int, ge(1)] = 4
    heads: Annotated[int, ge(1)] = 4
    hf_path: str = ""
    """A Hugging Face model directory to train instead of the bundled Llama: a path, channel:NAME or
    s3://bucket/prefix (copied to node-local disk once per node). Its config.json (llama, mistral,
    qwen2), its safetensors weights when present (else the family's random init) and its
    tokenizer.json (which must be the data's); needs ``llm-runtime[hf]``."""


@dataclass
class ParallelConfig:
    backend: Literal["fsdp", "deepspeed"] = "fsdp"
    """``fsdp`` (FSDP2 / HSDP + tensor and pipeline parallel via torch.distributed) or ``deepspeed``."""
    zero_stage: Annotated[int, between(-1, 3)] = -1
    """DeepSpeed ZeRO stage 0-3; -1 = 3, or 1 with pipeline parallelism."""
    zero_shard_mode: Literal["hpz", "mics"] = "hpz"
    """How DeepSpeed uses shard_group_size: ``hpz`` (ZeRO++ hpZ) or ``mics`` (older DeepSpeed only)."""
    dp_replicate: Annotated[int, ge(-1)] = 0
    """Data-parallel replica groups (HSDP); 0 = infer from shard_group_size / the node layout."""
    dp_shard: Annotated[int, ge(-1), not_zero] = -1
    """Ranks one model copy is sharded over (FSDP); -1 = infer."""
    tp: Annotated[int, ge(1)] = 1
    """Tensor-parallel size (consecutive ranks, so keep it within a node)."""
    sequence_parallel: bool = True
    """With tp > 1, split norms, embeddings and head along the sequence (less activation memory)."""
    pp: Annotated[int, ge(1)] = 1
    """Pipeline stages."""
    shard_group_size: Annotated[int, ge(0)] = 0
    """Shard group size for both backends (FSDP's HSDP, DeepSpeed's MiCS/hpZ); 0 = default."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved"] = "1f1b"
    """``gpipe``, ``1f1b`` or ``interleaved`` (interleaved 1F1B: two or more stages per rank)."""
    microbatches: Annotated[int, ge(0)] = 0
    """Pipeline microbatches per step; 0 = as many as stages in the pipeline."""
    stages_per_rank: Annotated[int, ge(0)] = 0
    """Pipeline stages held by each rank; 0 = 1, or 2 for the interleaved schedule."""
    pp_split_points: str = ""
    """Comma-separated layer indices where stages 1.. begin (e.g. "3,6"); empty = even split."""
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    """Parameter/compute dtype: ``bf16`` or ``fp32`` (CPU always runs fp32)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Gradient reduction dtype: ``fp32`` or ``bf16``."""
    activation_checkpoint: Literal["none", "full", "every"] = "none"
    """``none``, ``full`` (every block) or ``every`` (every ``ac_every``-th block)."""
    ac_every: Annotated[int, ge(1)] = 2
    compile: bool = False
    """torch.compile each transformer block."""


@dataclass
class DeepSpeedConfig:
    config: str = ""
    """A DeepSpeed JSON merged over the runtime's own (its keys win; conflicts are reported)."""
    partition_method: Literal["uniform", "parameters"] = "uniform"
    """How PipelineModule assigns layers to stages: ``uniform`` (layer count) or ``parameters``."""


@dataclass
class DataConfig:
    uri: str = ""
    """Token shards (``llm-runtime prepare-data`` output): a directory, ``s3://bucket/prefix`` or
    ``channel:NAME`` (a SageMaker input channel). Empty = the ``train`` channel when the job has
    one, else the bundled text."""
    mode: Literal["stream", "stage"] = "stream"
    """``stream`` (read shards where they are) or ``stage`` (copy them once per host to local disk first)."""
    num_partitions: Annotated[int, ge(0)] = 0
    """Logical streams the data is dealt into; every data-parallel size must divide it and it must
    divide train.batch_size. 0 = data-parallel size x max(1, num_workers). A resumed run keeps its own."""
    shuffle_block: Annotated[int, ge(1)] = 1024
    """Samples shuffled together (a bounded shuffle buffer per partition)."""
    num_workers: Annotated[int, ge(0)] = 1
    """DataLoader worker processes per rank (0 = read in the training process)."""
    max_open_shards: Annotated[int, ge(1)] = 4
    """Shard streams each DataLoader worker reads at once."""
    stage_dir: str = ""
    """Where ``mode=stage`` copies shards; empty = $TMPDIR/llm_runtime/data."""
    stage_timeout_s: Annotated[float, gt(0)] = 3600.0
    """How long ranks wait for their host's staging copy."""
    max_attempts: Annotated[int, ge(1)] = 8
    """Attempts per S3 request or interrupted body before the error names the object."""
    timeout_s: Annotated[float, gt(0)] = 900.0
    """Longest wait for one batch from a DataLoader worker."""
    skip_steps: str = ""
    """Global steps whose batches are read and dropped (no optimizer step, no LR advance), as
    ``7,12,30-32``; added to the run's skipped_batches.json, which a rollback writes."""


@dataclass
class EvalConfig:
    data_uri: str = ""
    """Held-out token shards, in the training data's format: a directory, ``s3://bucket/prefix`` or
    ``channel:NAME``. Empty = the ``validation`` channel when the job has one, else no evaluation."""
    every_steps: Annotated[int, ge(0)] = 0
    """Evaluate after every N optimizer steps (0 = only ``at_start`` / ``at_end``)."""
    steps: Annotated[int, ge(0)] = 0
    """Global eval batches of train.batch_size sequences per evaluation; 0 = ``samples`` / batch, or
    every whole batch of the eval data."""
    samples: Annotated[int, ge(0)] = 0
    """Sequences per evaluation instead of ``steps`` (a multiple of train.batch_size)."""
    at_start: bool = False
    """Also evaluate before the first step (a run that starts from step 0 only)."""
    at_end: bool = True
    """Evaluate after the last step (not after a stop request, nor when a resume has nothing left to train)."""


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
    every_steps: Annotated[int, ge(0)] = 0
    """Save every N steps (0 = off)."""
    every_minutes: Annotated[float, ge(0)] = 0.0
    """Save when this many minutes passed since the last save (0 = off)."""
    at_end: bool = True
    """Save after the last step."""
    keep: Annotated[int, ge(1)] = 2
    """Complete checkpoints kept locally and in the URI (the newest complete one is never deleted)."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint of this run, if any), ``never``, or a checkpoint URI/PATH."""
    part_size_mb: Annotated[int, between(5, 5120)] = 64
    """Multipart upload part size."""
    upload_concurrency: Annotated[int, ge(1)] = 8
    """Parts in flight per node upload."""
    upload_timeout_s: Annotated[float, gt(0)] = 1800.0
    """A node upload taking longer is a failure (reported, never a silent hang)."""
    prefix_spread: Annotated[int, ge(1)] = 16
    """Node tars are spread over this many key prefixes, ``sK/`` ahead of the step (S3's request
    rates are per partitioned prefix; 16 keeps 1,024 nodes under half of them: benchmarks/s3_scale.py)."""
    replicate: bool = True
    """With several nodes and checkpoint.uri, node i's tier-1 files are also copied to node
    (i + 1) mod N over the job's network (checkpoint/replica.py): a replaced host restores from its
    peer before S3."""
    replica_min_free_mb: Annotated[int, ge(0)] = 1024
    """A peer refuses a replica that would leave less free disk than this."""


@dataclass
class DistConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto`` (nccl with GPUs, gloo without), ``nccl`` or ``gloo``."""


@dataclass
class CommConfig:
    init_timeout_s: Annotated[float, gt(0)] = 1800.0
    """Rendezvous and first barrier: hosts of a large job start minutes apart."""
    train_timeout_s: Annotated[float, gt(0)] = 600.0
    """Every collective after start-up, on every process group; a hung peer becomes an error after this long."""


@dataclass
class WatchdogConfig:
    enabled: bool = True
    """A thread in every worker that ends the job when a phase makes no progress (see watchdog.py)."""
    step_timeout_s: Annotated[float, ge(0)] = 0.0
    """Longest data wait or training step; 0 = ``multiple`` x the median step time, at least ``floor_s``
    (``first_timeout_s`` until ``warmup_steps`` steps were timed)."""
    multiple: Annotated[float, ge(1)] = 10.0
    floor_s: Annotated[float, ge(0)] = 180.0
    warmup_steps: Annotated[int, ge(0)] = 3
    first_timeout_s: Annotated[float, gt(0)] = 1800.0
    """Start-up and the first steps (compilation, first data fetch, restoring a checkpoint)."""
    checkpoint_timeout_s: Annotated[float, ge(0)] = 0.0
    """Longest blocking part of a save or restore; 0 = checkpoint.upload_timeout_s + 300 s. The
    background upload has its own deadline (checkpoint.upload_timeout_s)."""
    exchange_s: Annotated[float, ge(0)] = 10.0
    """After a stall, how long a rank waits for the other stalled ranks' records to name a suspect."""
    stragglers: Literal["warn", "fail", "off"] = "warn"
    """Slow ranks found during training (stragglers.py): ``warn`` names them in the metrics line,
    the JSONL and a warning; ``fail`` also ends the job with exit code 87 and a record naming the host."""
    straggler_every: Annotated[int, ge(0)] = 50
    """Steps per window of the comparison (the ranks' times go through the job's store from a
    background thread); 0 = off."""
    straggler_factor: Annotated[float, ge(1)] = 1.5
    """A rank is named when its own time per step (compute + data wait) exceeds this multiple of the
    other ranks' median..."""
    straggler_min_s: Annotated[float, ge(0)] = 0.05
    """...and exceeds it by at least this many seconds (keeps oversubscribed cores from false alarms)."""
    straggler_file: str = ""
    """Rank 0 appends each named straggler here as a JSON line; empty = ``stragglers.jsonl`` beside
    the metrics JSONL (uploaded with the job's output on SageMaker); ``none`` = off."""


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
    peak_tflops: Annotated[float, ge(0)] = 0.0
    """The device's peak TFLOP/s for MFU; 0 = from the table of known accelerators (metrics.py)."""
    flops_per_token: Annotated[float, ge(0)] = 0.0
    """Training FLOPs per token for MFU; 0 = the bundled model's approximation (6N + 12 x layers x dim x seq_len)."""
    mlflow: bool = False
    """Also log to MLflow (``MLFLOW_TRACKING_URI``; the ``mlflow`` extra): params = the resolved config,
    metrics = the metrics line and the evaluations, artefact = the report image (trackers.py)."""
    wandb: bool = False
    """Also log to Weights & Biases (the ``WANDB_*`` variables; ``WANDB_MODE`` must be set: online,
    offline, disabled or shared; the ``wandb`` extra). The run lives in ``WANDB_DIR``, else beside the JSONL."""


@dataclass
class HealthConfig:
    preflight: bool = False
    """Run the health check (``llm-runtime healthcheck``) in every worker before training starts."""
    matmul_size: Annotated[int, ge(0)] = 0
    """Square matmul size per device; 0 = 8192 (bf16) on a GPU, 384 (fp32) on CPU."""
    iters: Annotated[int, ge(1)] = 10
    """Timed matmuls and all-reduces."""
    alloc_mb: Annotated[int, ge(0)] = 0
    """Memory each device must allocate and fill; 0 = 80% of the free memory on a GPU, 256 MB on CPU."""
    allreduce_mb: Annotated[float, ge(0)] = 0.0
    """All-reduce message size; 0 = 256 MB on GPUs, 4 MB on CPU."""
    straggler_factor: Annotated[float, gt(1)] = 1.5
    """A rank whose matmul takes this many times the median (or longer) is named a straggler."""
    stragglers: Literal["warn", "fail"] = "warn"
    """``warn`` (name them and go on) or ``fail`` (their nodes fail the check)."""
    timeout_s: Annotated[float, gt(0)] = 600.0
    """The whole check's watchdog timeout (collectives also keep comm.train_timeout_s)."""


@dataclass
class LaunchConfig:
    nproc_per_node: Annotated[int, ge(0)] = 0
    """Workers per host; 0 = one per GPU, or 2 on a host without GPUs."""
    max_restarts: Annotated[int, ge(0)] = 0
    """Times the elastic agent restarts the local workers after a failure."""
    cluster: Literal["", "sagemaker", "torchrun", "mpi", "local"] = ""
    """Force a cluster kind (sagemaker, torchrun, mpi, local); empty = detect."""
    mpi: bool = False
    """Start the workers with mpirun from the first host instead of torchrun on each host."""
    mpi_wait_timeout_s: Annotated[float, gt(0)] = 600.0
    """How long a non-first host waits for the first host's mpirun to appear."""
    stop_deadline_s: Annotated[float, ge(0)] = 100.0
    """After the platform's SIGTERM: how long the workers get to save a checkpoint and stop before
    they are torn down (spot interruptions give 120 s). 0 = tear down at once."""


@dataclass
class NetenvConfig:
    efa: Literal["auto", "on", "off"] = "auto"
    """``auto`` (probe), ``on`` or ``off``: whether the hosts have EFA."""
    verify_efa: Literal["auto", "require", "off"] = "auto"
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    netenv: NetenvConfig = field(default_factory=NetenvConfig)
