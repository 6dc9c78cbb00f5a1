"""``rt = llm_runtime.init()``: the process group, device, seeds and logging of one worker.

Works the same under ``llm-runtime launch``, torchrun and mpirun; a plain ``python
script.py`` becomes a world of one. :func:`init` is a short composition of named steps; each
step that acts on the process (logging, os.environ, signals, process groups, RNGs, threads,
files) says so in its name and docstring.
"""
from __future__ import annotations

import gc
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import netenv
from .cluster import ClusterInfo, detect_here
from .cluster import sagemaker as sm
from .config import Config, ConfigError, load_config, validate
from .failures import set_aside_failure
from .parallel.dims import ParallelDims, dims_for
from .parallel.pipeline import parse_split_points
from .paths import JobPaths, job_paths
from .secrets import RedactingFilter
from .watchdog import Watchdog, collective_cap
from .workerenv import process_env, restart_count

__all__ = ["Runtime", "World", "build_device_mesh", "check_network", "choose_backend", "config_from_environment",
           "die_with_launcher", "init", "run_worker", "seed_everything", "set_aside_previous_attempt",
           "set_group_timeouts", "setup_logging", "setup_network", "start_process_group", "start_watchdog",
           "verify_network", "world_of"]

log = logging.getLogger(__name__)

CHECKPOINT_PHASE_MARGIN_S = 300.0
"""The watchdog's checkpoint phase outlasts checkpoint.upload_timeout_s by this much (the upload's own
deadline speaks first)."""


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    local_rank: int
    size: int


def world_of(info: ClusterInfo) -> World:
    """A worker's ranks from detection; a process no launcher started is a world of one."""
    if info.is_worker:
        return World(info.rank, info.local_rank, info.world_size)
    return World(0, 0, 1)


def choose_backend(requested: str, cuda_available: bool) -> str:
    """``dist.backend`` on this machine (the key's choices are checked by the config)."""
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested == "nccl" and not cuda_available:
        raise ConfigError("dist.backend=nccl needs CUDA GPUs, and none is visible to this process")
    return requested


def set_group_timeouts(timeout_s: float) -> None:
    """Give every existing process group the train timeout (through torch's private ``_set_pg_timeout``:
    there is no public API). Groups made after init (mesh axes, HSDP, DeepSpeed's) start with torch's
    default, and a hung collective in one of them must fail as fast as one on the default group."""
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, redact: bool = True) -> None:
    """Side effect on global logging: the ``llm_runtime`` logger gets one handler of its own (stdout on
    rank 0, stderr elsewhere, ``[rank N]`` prefix, secrets redacted unless ``redact=False``), INFO on
    rank 0 and WARNING elsewhere, and stops propagating to the root logger (a user's handlers would
    print every line twice)."""
    logger = logging.getLogger("llm_runtime")
    for handler in list(logger.handlers):
        if getattr(handler, "_llm_runtime", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    handler._llm_runtime = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank))
    if redact:
        handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


@dataclass
class Runtime:
    """One worker's handle on the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    cluster: ClusterInfo
    config: Config
    seed: int = 0
    """This rank's own seed (``train.seed + rank``) for rank-local randomness."""
    dims: ParallelDims | None = None
    """The parallel layout (from the ``parallel`` config section)."""
    mesh: object = None
    """DeviceMesh over the axes of ``dims`` larger than 1 (None in a world of one)."""
    watchdog: object = None
    """The hang watchdog (watchdog.py): idle until the training loop's first ``beat(step, phase)``."""
    paths: JobPaths | None = None
    """Where this job's outputs go (paths.py): the same value the launcher derived."""
    _owns_group: bool = field(default=True, repr=False)

    @property
    def dp_rank(self) -> int:
        """Which slice of every global batch this rank reads (tensor/pipeline peers share it)."""
        return self.dims.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp_size

    def parallelize(self, model, **options):
        """Parallelize ``model`` on this job's mesh; options default to the ``parallel`` config.

        For tensor parallelism pass ``tp_plan`` ({module path in a block: ParallelStyle});
        for pipelining the model needs a ``layers`` list and a forward that skips modules
        set to None (``first_only`` / ``last_only`` name them). See parallel/api.py.
        A Hugging Face causal LM (Llama, Mistral, Qwen2) needs none of that: it is wrapped in
        models/hf.py's HFCausalLM, with the family's TP plan and, on the meta device, its init.
        """
        from .models.hf import HFCausalLM, check_hf_layout, is_hf_causal_lm, warn_sliding_window
        from .parallel.api import parallelize
        from .parallel.materialize import has_meta

        if is_hf_causal_lm(model):  # a transformers causal LM: its own modules, plan and init
            model = HFCausalLM(model)
            check_hf_layout(model.config.to_dict(), tp=self.dims.tp, pp=self.dims.pp, seq_len=0,
                            where=type(model.config).__name__)
            warn_sliding_window(model.config.to_dict(), type(model.config).__name__)
            seeded = torch.Generator().manual_seed(self.config.train.seed)
            options = {**model.parallel_options(), **({"init_fn": model.init_fn(seeded)} if has_meta(model) else {}),
                       **options}
        parallel = self.config.parallel
        defaults = dict(pp_schedule=parallel.pp_schedule, microbatches=parallel.microbatches,
                        stages_per_rank=parallel.stages_per_rank,
                        split_points=parse_split_points(parallel.pp_split_points),
                        mixed_precision=parallel.mixed_precision, reduce_dtype=parallel.reduce_dtype,
                        activation_checkpoint=parallel.activation_checkpoint, ac_every=parallel.ac_every,
                        compile=parallel.compile)
        parallel_model = parallelize(model, self.dims, rank=self.rank, device=self.device, mesh=self.mesh,
                                     **{**defaults, **options})
        if self.world_size > 1:
            set_group_timeouts(self.config.comm.train_timeout_s)  # groups parallelize made
        return parallel_model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shutdown(self, barrier: bool = True) -> None:
        """Destroy the process group (idempotent); call at the end of the job.

        Every rank first meets in a barrier: a gloo rank that tears down while a peer still
        has traffic in flight to it can abort the peer ("terminate called without an
        active exception"), turning a finished job into a failed one. After an error pass
        ``barrier=False``: the peers may be gone, and a barrier would only wait for the timeout.
        """
        if self.watchdog is not None:
            self.watchdog.close()
        if self._owns_group and dist.is_initialized():
            # DDP/FSDP keep the process group alive from reference cycles; collected only at
            # interpreter exit, gloo's threads then abort the process (SIGABRT) after a
            # finished job. Collect now, so destroy_process_group really destroys it.
            gc.collect()
            if barrier and self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()


def die_with_launcher(info: ClusterInfo) -> None:
    """Side effect on the process (Linux PR_SET_PDEATHSIG): a worker whose launcher is killed
    (torchrun's agent, orted) is killed too, instead of living on, holding its device, until a
    collective times out; torchrun starts each worker in a session of its own, so nothing else would
    reach it. Only under a launcher that this process is a worker of."""
    import ctypes
    import signal

    if not info.is_worker or not ("TORCHELASTIC_RUN_ID" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(1)


def setup_network(backend: str, config: Config, info: ClusterInfo, local_rank: int):
    """(device, fabric). With NCCL: writes the network plan (EFA/NCCL variables, netenv.py) into
    ``os.environ`` and selects this rank's GPU; with gloo: the CPU, nothing written."""
    if backend != "nccl":
        return torch.device("cpu"), None
    fabric = netenv.probe_fabric(overrides=netenv.config_overrides(**vars(config.netenv)))
    verify = netenv.verify_planned(config.netenv.verify_efa, os.environ)
    netenv.apply(netenv.plan(info, fabric, verify_efa=verify), os.environ)
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device, fabric


def start_process_group(backend: str, info: ClusterInfo, world: World, comm) -> bool:
    """The default process group, under ``comm.init_timeout_s`` until every rank passed a first
    barrier, then ``comm.train_timeout_s``. A worker writes RANK/MASTER_* (as detection decided them)
    into ``os.environ`` for env:// rendezvous. False when the caller had already made the group."""
    if dist.is_initialized():
        return False
    init_timeout = timedelta(seconds=comm.init_timeout_s)
    if info.is_worker:
        # For MPI ranks: the master detection chose, not a MASTER_ADDR an image happened to set.
        os.environ.update(process_env(info))
        dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size,
                                timeout=init_timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=init_timeout)
    # The first barrier proves every rank arrived while the generous init timeout holds; after it,
    # a hung collective should fail fast.
    dist.barrier()
    set_group_timeouts(comm.train_timeout_s)
    return True


def seed_everything(seed: int, rank: int) -> int:
    """Side effect on the global RNGs of ``random``, torch and numpy: each rank seeded ``seed + rank``."""
    mine = seed + rank
    random.seed(mine)
    torch.manual_seed(mine)
    try:
        import numpy

        numpy.random.seed(mine % 2**32)
    except ImportError:
        pass
    return mine


def build_device_mesh(dims: ParallelDims, device: torch.device, world: World, train_timeout_s: float):
    """The DeviceMesh over the axes of ``dims`` larger than 1 (its groups get the train timeout); None alone."""
    if world.size == 1:
        return None
    from .parallel.api import build_mesh

    mesh = build_mesh(dims, device.type)
    set_group_timeouts(train_timeout_s)
    return mesh


def start_watchdog(config: Config, world: World, info: ClusterInfo, paths: JobPaths) -> Watchdog:
    """Starts the watchdog thread (idle until the first beat); it trades stall records over the job's store."""
    return Watchdog(config.watchdog, rank=world.rank, world_size=world.size, host=info.current_host or "localhost",
                    output_dir=paths.output_dir,
                    checkpoint_s=config.checkpoint.upload_timeout_s + CHECKPOINT_PHASE_MARGIN_S,
                    cap_s=collective_cap(config.comm.train_timeout_s, config.watchdog.exchange_s),
                    store=dist.distributed_c10d._get_default_store() if world.size > 1 else None)


def check_network(config: Config, fabric, watchdog: Watchdog, info: ClusterInfo, world: World) -> None:
    """On EFA hosts of a multi-node NCCL job, local rank 0 reads NCCL's log to see which network it chose
    (:func:`verify_network`; it can exit the process with code 88). Single-node jobs skip it: NCCL
    uses NVLink/shared memory there, and no EFA traffic would show."""
    if (fabric is not None and fabric.has_efa and config.netenv.verify_efa != "off" and world.local_rank == 0
            and info.num_nodes > 1):
        verify_network(config.netenv.verify_efa, watchdog, info.current_host or "localhost")


def set_aside_previous_attempt(paths: JobPaths, world: World) -> None:
    """Moves the failure file of the previous elastic attempt aside (on disk), so the one SageMaker
    shows describes this attempt; one rank per host does it."""
    restart = restart_count()
    if restart and world.local_rank == 0:
        set_aside_failure(paths.output_dir, f"attempt-{restart - 1}")


def config_from_environment() -> Config:
    """A user program's config: ``LLM_RUNTIME_*`` variables and, on SageMaker, the hyperparameters that
    name config keys (the program's own keys are left to it)."""
    return load_config(env=os.environ, hyperparameters=sm.read_hyperparameters(os.environ),
                       strict_hyperparameters=False)


def init(config: Config | None = None, *, redact_logs: bool = True) -> Runtime:
    """Start this worker: config check, process group with init then train timeouts, device, seeds,
    logging, watchdog. Without ``config`` it is read from the environment (:func:`config_from_environment`)."""
    config = validate(config if config is not None else config_from_environment())
    info = detect_here(kind=config.launch.cluster or None)
    world = world_of(info)
    backend = choose_backend(config.dist.backend, torch.cuda.is_available())
    dims = dims_for(config.parallel, world.size, nproc_per_node=info.nproc_per_node, num_nodes=info.num_nodes)
    paths = job_paths(config, info.kind, os.environ)  # a layout that cannot fit has failed before any group
    setup_logging(world.rank, redact=redact_logs)
    die_with_launcher(info)
    device, fabric = setup_network(backend, config, info, world.local_rank)
    owns = start_process_group(backend, info, world, config.comm)
    seed = seed_everything(config.train.seed, world.rank)
    mesh = build_device_mesh(dims, device, world, config.comm.train_timeout_s)
    watchdog = start_watchdog(config, world, info, paths)
    check_network(config, fabric, watchdog, info, world)
    set_aside_previous_attempt(paths, world)
    log.info("initialised rank %d/%d on %s %s (backend %s, cluster %s, init timeout %.0fs, train timeout %.0fs)",
             world.rank, world.size, info.current_host, device, backend, info.kind, config.comm.init_timeout_s,
             config.comm.train_timeout_s)
    return Runtime(world.rank, world.local_rank, world.size, device, backend, info, config, seed, dims, mesh,
                   watchdog, paths, owns)


def verify_network(mode: str, watchdog: Watchdog, host: str) -> None:
    """After the first NCCL collective: which network did NCCL choose (its INFO log, NCCL_DEBUG_FILE)?
    A fallback off EFA is a warning, or with ``netenv.verify_efa=require`` a failure record and exit 88."""
    import socket

    from .verify_efa import EfaReport, analyse, debug_file, startup_action
    from .failures import FailureRecord

    template = os.environ.get("NCCL_DEBUG_FILE", "")
    report = EfaReport()
    if template and os.environ.get("NCCL_DEBUG", "").upper() in ("INFO", "TRACE"):
        try:
            with open(debug_file(template, socket.gethostname(), os.getpid()), errors="replace") as handle:
                report = analyse(handle.read())
        except OSError as err:
            log.warning("network check: cannot read NCCL's log: %s", err)
    level, code = startup_action(mode, report)
    log.log(level, "network check: %s", report.summary().replace("\n", " "))
    if code:
        record = FailureRecord("network", host, watchdog.rank, 0, "start", report.summary().splitlines()[0])
        watchdog.write_record(record)
        log.error("%s", record.line())
        for handler in logging.getLogger("llm_runtime").handlers:
            handler.flush()
        os._exit(code)


def run_worker(config: Config, body) -> int:
    """A worker's whole life: init, ``body(rt)`` -> exit code, shut down. A failure goes to the
    watchdog first (a timeout exits there with exitcodes.STALLED; anything else gets a record)."""
    rt = init(config)
    try:
        code = body(rt)
    except BaseException as err:
        rt.watchdog.on_error(err)
        rt.shutdown(barrier=False)
        raise
    rt.shutdown()
    return code
