"""``rt = llm_runtime.init()``: the process group, device, seeds and logging of one worker.

Works the same under ``llm-runtime launch``, torchrun and mpirun; a plain ``python
script.py`` becomes a world of one.
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
from .config import Config, ConfigError, ParallelConfig, load_config
from .parallel.dims import ParallelDims, resolve_dims
from .faults import restart_count
from .secrets import RedactingFilter
from .watchdog import Watchdog, collective_cap, output_dir_for, set_aside_failure

__all__ = ["Runtime", "dims_for", "init", "process_env", "run_worker", "train_timeout_everywhere"]

log = logging.getLogger(__name__)


def process_env(info: ClusterInfo) -> dict[str, str]:
    """The torch.distributed variables for a worker (MPI ranks get them from here)."""
    if not info.is_worker:
        return {}
    return {
        "RANK": str(info.rank),
        "LOCAL_RANK": str(info.local_rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_WORLD_SIZE": str(info.nproc_per_node),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    }


def train_timeout_everywhere(timeout_s: float) -> None:
    """Give every process group the train timeout: groups made after init (mesh axes, HSDP,
    DeepSpeed's) start with torch's default, and a hung collective in one of them must fail
    as fast as one on the default group."""
    for group in list(dist.distributed_c10d._world.pg_map):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def parse_split_points(text: str) -> list[int]:
    """``parallel.pp_split_points`` ("3,6") as layer indices."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"parallel.pp_split_points must be comma-separated layer indices, got {text!r}") from None


def dims_for(parallel: ParallelConfig, world_size: int, info: ClusterInfo) -> ParallelDims:
    """The parallel layout for this job, checked against the world size (raises ConfigError)."""
    try:
        return resolve_dims(world_size=world_size, dp_replicate=parallel.dp_replicate, dp_shard=parallel.dp_shard,
                            tp=parallel.tp, pp=parallel.pp, shard_group_size=parallel.shard_group_size,
                            nproc_per_node=info.nproc_per_node, num_nodes=info.num_nodes)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def choose_backend(requested: str, cuda_available: bool) -> str:
    if requested == "auto":
        return "nccl" if cuda_available else "gloo"
    if requested not in ("nccl", "gloo"):
        raise ConfigError(f"dist.backend must be auto, nccl or gloo, got {requested!r}")
    if requested == "nccl" and not cuda_available:
        raise ConfigError("dist.backend=nccl needs CUDA GPUs, and none is visible to this process")
    return requested


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def _setup_logging(rank: int) -> None:
    logger = logging.getLogger("llm_runtime")
    for handler in list(logger.handlers):
        if getattr(handler, "_llm_runtime", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    handler._llm_runtime = True  # type: ignore[attr-defined]
    handler.addFilter(_RankFilter(rank))
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
        """
        from .parallel.api import parallelize

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
            train_timeout_everywhere(self.config.comm.train_timeout_s)  # groups parallelize made
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


def die_with_parent() -> None:
    """A worker whose launcher is killed (torchrun's agent, orted) is killed too (Linux), instead of
    living on, holding its device, until a collective times out; torchrun starts each worker in a
    session of its own, so nothing else would reach it."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os._exit(1)


def init(config: Config | None = None) -> Runtime:
    """Start this worker: process group with init then train timeouts, device, seeds, logging.

    Without ``config`` it is loaded from the environment and, on SageMaker, from the
    hyperparameters that name config keys (a user program's own keys are left to it).
    """
    if config is None:
        config = load_config(
            env=os.environ,
            hyperparameters=sm.read_hyperparameters(os.environ),
            strict_hyperparameters=False,
        )
    info = detect_here(kind=config.launch.cluster or None)
    cuda = torch.cuda.is_available()
    backend = choose_backend(config.dist.backend, cuda)
    if info.is_worker:
        rank, local_rank, world = info.rank, info.local_rank, info.world_size
    else:
        rank, local_rank, world = 0, 0, 1
    dims = dims_for(config.parallel, world, info)  # a layout that cannot fit fails before any group
    _setup_logging(rank)
    if info.is_worker and ("TORCHELASTIC_RUN_ID" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ):
        die_with_parent()

    fabric = None
    if backend == "nccl":
        fabric = netenv.probe_fabric(overrides=netenv.config_overrides(**vars(config.netenv)))
        netenv.apply(netenv.plan(info, fabric, verify_efa=netenv.verify_planned(config.netenv.verify_efa, os.environ)), os.environ)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    owns = not dist.is_initialized()
    if owns:
        init_timeout = timedelta(seconds=config.comm.init_timeout_s)
        if info.is_worker:
            # Detection decided these (for MPI ranks: the master it chose, not a MASTER_ADDR an
            # image happened to set); env:// must rendezvous at the same place.
            os.environ.update(process_env(info))
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                    timeout=init_timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=init_timeout)
        # The first barrier proves every rank arrived while the generous init timeout holds;
        # after it, a hung collective should fail fast.
        dist.barrier()
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=config.comm.train_timeout_s))

    seed = config.train.seed + rank
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed % 2**32)
    except ImportError:
        pass
    mesh = None
    if world > 1:
        from .parallel.api import build_mesh

        mesh = build_mesh(dims, device.type)
        train_timeout_everywhere(config.comm.train_timeout_s)
    watchdog = Watchdog(config.watchdog, rank=rank, world_size=world, host=info.current_host or "localhost",
                        output_dir=output_dir_for(config.train.output_dir, os.environ, info.kind),
                        checkpoint_s=config.checkpoint.upload_timeout_s + 300,
                        cap_s=collective_cap(config.comm.train_timeout_s, config.watchdog.exchange_s),
                        store=dist.distributed_c10d._get_default_store() if world > 1 else None)
    if (fabric is not None and fabric.has_efa and config.netenv.verify_efa != "off" and local_rank == 0
            and info.num_nodes > 1):
        verify_network(config.netenv.verify_efa, watchdog, info.current_host or "localhost")
    restart = restart_count()
    if restart and local_rank == 0:  # this attempt's failure, if any, must be the one SageMaker shows
        set_aside_failure(watchdog.output_dir, f"attempt-{restart - 1}")
    log.info("initialised rank %d/%d on %s %s (backend %s, cluster %s, init timeout %.0fs, train timeout %.0fs)",
             rank, world, info.current_host, device, backend, info.kind, config.comm.init_timeout_s,
             config.comm.train_timeout_s)
    return Runtime(rank, local_rank, world, device, backend, info, config, seed, dims, mesh, watchdog, owns)



def verify_network(mode: str, watchdog: Watchdog, host: str) -> None:
    """After the first NCCL collective: which network did NCCL choose (its INFO log, NCCL_DEBUG_FILE)?
    A fallback off EFA is a warning, or with ``netenv.verify_efa=require`` a failure record and exit 88."""
    import socket

    from .verify_efa import EfaReport, analyse, debug_file, startup_action
    from .watchdog import FailureRecord

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
