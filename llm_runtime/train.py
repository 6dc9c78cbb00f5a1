"""The built-in trainer (``llm-runtime train``): the bundled Llama-style model on bundled text.

The global batch is fixed in sequences per step; each data-parallel replica takes its slice
and accumulates micro-batches, so the same seed gives the same loss curve for any number
of processes.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from .config import LAYOUT_KEYS, Config, ConfigError, ParallelConfig, TrainConfig, set_by, validate
from .models import Llama, LlamaConfig, bundled_text
from .parallel.batching import batching, stages_per_rank
from .parallel.dims import ParallelDims, dims_for
from .parallel.pipeline import parse_split_points, split_layers
from .parallel.tensor import check_tensor_parallel
from .checkpoint.export import bundled_spec, export_model
from .data.build import DataPlan, build_loader, global_batch_starts
from .badbatch import parse_steps
from .hf_job import check_hf_model, data_vocab
from .paths import JobPaths
from .runtime import Runtime, run_worker
from .loop import Loop
from .evaluation import Evaluator, plan_eval
from .trackers import tracker_problem
from .trainers import TorchTrainer, deepspeed_batching, deepspeed_trainer, lr_factor

__all__ = ["batch_layout", "check_job", "deepspeed_batching", "global_batch_starts", "lr_factor", "main", "run"]

log = logging.getLogger(__name__)


def batch_layout(train: TrainConfig, data_parallel_size: int) -> tuple[int, int]:
    """(micro_batch_size, accumulation_steps) per replica without pipelining (parallel/batching.py)."""
    split = batching(train, ParallelConfig(), data_parallel_size, 1)
    return split.micro_batch, split.count


def check_job(config: Config, world_size: int, *, nproc_per_node: int | None = None, num_nodes: int = 1,
              report: bool = False, data: bool = True, paths: JobPaths | None = None,
              stage_model: bool = False) -> tuple[LlamaConfig, ParallelDims, DataPlan | None]:
    """Every config error the built-in trainer would hit on this world, as ConfigError, before any worker
    starts: the config's own check (config/check.py), then the layout, the batch split, the data and
    the model. ``report`` (the launcher, once per job) also logs which data the job reads and what a
    user DeepSpeed JSON overrides; ``data`` reads the data's index too (its channels from ``paths``);
    ``stage_model`` (each node's launcher) copies an s3:// model.hf_path to node-local disk.
    The model's vocabulary follows the data's tokenizer."""
    validate(config)
    problem = tracker_problem(config.metrics, os.environ)
    if problem:
        raise ConfigError(problem)
    try:
        parse_steps(config.data.skip_steps)
    except ValueError as err:
        raise ConfigError(f"{err}{set_by(config, ('data.skip_steps',))}") from None
    try:
        if config.parallel.backend == "deepspeed":
            model_config, dims = _check_deepspeed(config, world_size, report)
        else:
            dims = dims_for(config.parallel, world_size, nproc_per_node=nproc_per_node, num_nodes=num_nodes)
            batching(config.train, config.parallel, dims.dp_size, dims.pp, stages=stages_per_rank(config.parallel))
    except ConfigError as err:  # a rule over several keys and the world: say who set the keys
        raise ConfigError(f"{err}{set_by(config, LAYOUT_KEYS)}") from None
    plan = _check_data(config, dims, paths) if data else None
    if data:
        _check_checkpoint_store(config)
    if data and report:  # the eval data too (each worker reads its plan again: rank 0 logs it)
        plan_eval(config, dims.dp_size, paths, data_vocab(plan))
    if config.model.hf_path:
        spec = check_hf_model(config, dims, plan, paths, stage_model=stage_model)
        if report:
            log.info("model: %s from %s", spec.source.config.get("model_type"), config.model.hf_path)
        return spec, dims, plan
    if config.parallel.backend != "deepspeed":
        model_config = _check_model(config, dims, data_vocab(plan))
    if report and plan is not None:  # only once everything passed: an error stays the one line printed
        log.info("data: %s", plan.describe())
    return dataclasses.replace(model_config, vocab_size=data_vocab(plan)), dims, plan


def _check_model(config: Config, dims: ParallelDims, vocab_size: int) -> LlamaConfig:
    """The bundled model fits the layout: heads and sizes split over tp, layers over the stages."""
    parallel = config.parallel
    try:
        model_config = LlamaConfig(dim=config.model.dim, layers=config.model.layers, heads=config.model.heads,
                                   max_seq_len=config.train.seq_len, vocab_size=vocab_size).validate()
        check_tensor_parallel(dims.tp, heads=model_config.heads, kv_heads=model_config.num_kv_heads,
                              ffn_hidden=model_config.ffn_hidden_dim, vocab=model_config.vocab_size,
                              seq_len=config.train.seq_len, sequence_parallel=parallel.sequence_parallel)
        if dims.pp > 1:
            split_layers(model_config.layers, dims.pp * stages_per_rank(parallel),
                         parse_split_points(parallel.pp_split_points))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model_config


def _check_checkpoint_store(config: Config) -> None:
    """checkpoint.uri reachable: a missing bucket, endpoint or credentials fail here, in one line."""
    from .storage import StorageError, open_store

    if config.checkpoint.uri:
        try:
            open_store(config.checkpoint.uri).probe()
        except StorageError as err:
            raise ConfigError(f"checkpoint.uri: {err}") from None


def _check_data(config: Config, dims: ParallelDims, paths: JobPaths | None) -> DataPlan:
    """The data plan (index read, order checked); the bundled text must hold one sequence."""
    from .data.build import plan_data

    plan = plan_data(config, dims.dp_size, paths)
    if plan.index is None:
        text_bytes = len(bundled_text().encode())
        if text_bytes < config.train.seq_len + 2:
            raise ConfigError(f"train.seq_len={config.train.seq_len} is longer than the text ({text_bytes} tokens)")
    return plan


def _check_deepspeed(config: Config, world_size: int, report: bool = False) -> tuple[LlamaConfig, ParallelDims]:
    import importlib.util

    from .parallel.deepspeed_config import deepspeed_config, deepspeed_layout, read_user_config, resolve_user_config
    from .parallel.deepspeed_engine import INSTALL_HINT

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(INSTALL_HINT)
    train = config.train
    try:
        layout = deepspeed_layout(config.parallel, world_size)
        model_config = LlamaConfig(dim=config.model.dim, layers=config.model.layers,
                                   heads=config.model.heads, max_seq_len=train.seq_len).validate()
        if layout.pp > model_config.layers + 2:
            raise ValueError(f"parallel.pp={layout.pp} exceeds the model's {model_config.layers} layers "
                             "plus embedding and head")
        micro, accumulation = deepspeed_batching(config, layout.dp, layout.pp)
        mics = False
        if layout.shard_group_size and layout.shard_mode == "mics":
            from .parallel.deepspeed_engine import mics_available

            mics = mics_available()
        ours = deepspeed_config(config, layout, micro_batch=micro, accumulation=accumulation,
                                device_type="cuda", mics_available=mics)
        if config.deepspeed.config:
            _, conflicts, _ = resolve_user_config(ours, read_user_config(config.deepspeed.config), layout)
            for line in conflicts if report else ():
                log.warning("DeepSpeed config: %s", line)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model_config, ParallelDims(dp_replicate=1, dp_shard=layout.dp, tp=1, pp=layout.pp)


def run(rt: Runtime) -> dict[str, float]:
    """Train on this worker; returns the final metrics (identical on every rank)."""
    config, train = rt.config, rt.config.train
    model_config, _, plan = check_job(config, rt.world_size, nproc_per_node=rt.cluster.nproc_per_node,
                                      num_nodes=rt.cluster.num_nodes, paths=rt.paths)
    if rt.is_main:
        log.info("data: %s", plan.describe())
    micro, accumulation = batch_layout(train, rt.dp_size)
    per_replica = micro * accumulation
    evaluation = plan_eval(config, rt.dp_size, rt.paths, data_vocab(plan))
    if rt.is_main and evaluation is not None:
        log.info("eval: %s", evaluation.describe())
    if config.data.mode == "stage":  # ranks wait for their host's copy up to data.stage_timeout_s
        rt.watchdog.beat(0, "start", timeout_s=max(config.watchdog.first_timeout_s, config.data.stage_timeout_s + 300))
    loader = build_loader(config, rt.dims, dp_rank=rt.dp_rank, local_rank=rt.local_rank, paths=rt.paths, plan=plan,
                          last_step=train.steps - 1)
    try:
        return _train(rt, model_config, loader, per_replica, accumulation, evaluation)
    finally:
        loader.close()


def _train(rt: Runtime, model_config: LlamaConfig, loader, per_replica: int, accumulation: int,
           evaluation=None) -> dict[str, float]:
    config, train = rt.config, rt.config.train
    seed = torch.Generator().manual_seed(train.seed)  # identical weights on every rank and layout
    if config.model.hf_path:
        model, trainer = _hf_trainer(rt, model_config, seed)
    elif config.parallel.backend == "deepspeed":
        model, trainer = deepspeed_trainer(rt, lambda: Llama(model_config), lambda m: m.init_fn(seed), model_config)
    else:
        with torch.device("meta"):  # nothing allocated until each rank materialises its own shards
            model = Llama(model_config)
        trainer = TorchTrainer(rt, model, model.init_fn(seed))
    log.info("model %.2fM parameters, global batch %d x %d tokens, layout %s, %d replicas x %d sequences",
             model_config.num_parameters() / 1e6, train.batch_size, train.seq_len, rt.dims.describe(), rt.dp_size,
             per_replica)

    checkpointer = _checkpointer(rt, getattr(getattr(model_config, "source", None), "fingerprint", ""))
    evaluator = Evaluator(rt, trainer, evaluation, accumulation) if evaluation is not None else None
    try:
        return _loop(rt, trainer, loader, accumulation, checkpointer, model_config, evaluator)
    finally:
        if checkpointer is not None:
            rt.watchdog.beat(train.steps, "checkpoint")
            checkpointer.close()  # waits for the last upload; its failure fails the job
        rt.watchdog.pause()


def _hf_trainer(rt: Runtime, spec, seed: torch.Generator):
    """model.hf_path's model on the meta device, each rank's shards read from the weights (only its
    own block of each tensor where the layout allows) or drawn by the family's init."""
    from .models.hf import HFCausalLM, rope_summary
    from .models.hf_source import HFWeights

    weights = HFWeights(spec.source, HFCausalLM.hf_name) if spec.source.files else None
    try:
        if rt.config.parallel.backend == "deepspeed":
            model, trainer = deepspeed_trainer(rt, lambda: spec.build(meta=False),
                                                lambda m: weights or m.init_fn(seed), spec)
        else:
            model = spec.build()
            trainer = TorchTrainer(rt, model, weights or model.init_fn(seed), options=model.parallel_options())
    finally:
        if weights is not None:
            weights.close()
    log.info("model: %s, %s weights, rotary %s", type(model.config).__name__,
             "pretrained" if weights is not None else "random", rope_summary(model.config))
    if weights is not None:
        log.info("weights: %d tensor(s) read as this rank's block only, %d read whole", weights.reads["block"],
                 weights.reads["whole"])
    return model, trainer


def _checkpointer(rt: Runtime, model_fingerprint: str = ""):
    """Checkpoints are on when any checkpoint.uri / local_dir / cadence / sagemaker_sync is set."""
    ck = rt.config.checkpoint
    if not (ck.uri or ck.local_dir or ck.every_steps or ck.every_minutes or ck.sagemaker_sync):
        return None
    from .checkpoint.manager import Checkpointer

    return Checkpointer(rt.config, rank=rt.rank, world_size=rt.world_size, local_rank=rt.local_rank,
                        node_rank=rt.cluster.node_rank, num_nodes=max(1, rt.cluster.num_nodes),
                        backend=rt.config.parallel.backend, local_dir=rt.paths.checkpoint_dir,
                        on_stall=rt.watchdog.fail, model_fingerprint=model_fingerprint)


def _loop(rt: Runtime, trainer, loader, accumulation: int, checkpointer, model_config, evaluator) -> dict[str, float]:
    loop = Loop(rt, trainer, loader, accumulation, checkpointer, model_config, evaluator)
    try:
        metrics = loop.run()
        return metrics if loop.stopped else _finish(rt, trainer, loader, model_config, metrics, loop.start)
    finally:
        loop.close()


def _finish(rt: Runtime, trainer, loader, model_config, metrics: dict, start: int) -> dict:
    """After the last step: the final model, the data counters and the closing line."""
    train = rt.config.train
    rt.watchdog.beat(train.steps, "export")
    if rt.paths.model_dir:
        spec = model_config.export_spec() if hasattr(model_config, "export_spec") else bundled_spec(model_config)
        export_model(trainer, rt, rt.paths.model_dir, spec, shard_mb=train.model_shard_mb)
    stats = loader.stats()
    if stats:
        log.info("data requests=%d bytes=%d retries=%d (this rank's reads)", stats["requests"], stats["bytes"],
                 stats["retries"])
    if start >= train.steps:
        log.info("done: nothing to train, the checkpoint's step %d reaches train.steps=%d", start, train.steps)
        return metrics
    log.info("done steps=%d final_loss=%.4f", train.steps, metrics["loss"])
    return metrics


def main(config: Config) -> int:
    """Entry for a worker process: init, (pre-flight check,) train, shut down."""

    def body(rt: Runtime) -> int:
        if config.health.preflight:
            from .health import run_healthcheck

            code = run_healthcheck(rt)  # every rank reaches the same verdict
            if code:
                return code
            if rt.device.type == "cuda":  # memory_gb is training's peak, not the check's memory test
                torch.cuda.reset_peak_memory_stats(rt.device)
        rt.watchdog.beat(0, "start")
        run(rt)
        return 0

    return run_worker(config, body)
