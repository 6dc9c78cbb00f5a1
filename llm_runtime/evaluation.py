"""Evaluation during training: the held-out loss and its perplexity (``[eval]``).

The eval set is the first ``eval.steps x train.batch_size`` samples of the eval shards, in the
index's order, unshuffled. Eval batch ``g`` is samples ``g*B .. (g+1)*B - 1`` and data-parallel
replica ``r`` of ``D`` takes the contiguous rows ``r*B/D ..`` of it (one ranged read per shard it
spans), so the samples and their order do not depend on ``D``. Every sample has ``seq_len``
targets, so the loss over all eval tokens (their summed cross-entropy over their count) is the
mean of the replicas' and micro-batches' equal-sized means: the one all-reduce the logged
training loss uses gives it, on every layout (FSDP, TP, PP, DeepSpeed). No gradient is kept and
the watchdog times each batch like a training step (phase ``eval``).
"""
from __future__ import annotations

import bisect
import importlib.util
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config, ConfigError
from .data.loader import load_index
from .data.location import DataLocation, LocationError, resolve_location
from .data.shards import RecordLayout, ShardIndex
from .paths import JobPaths, job_paths
from .storage import StorageError, open_store

__all__ = ["EvalPlan", "EvalReader", "Evaluator", "plan_eval"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    location: DataLocation
    index: ShardIndex
    steps: int
    """Global eval batches per evaluation."""
    batch: int

    def describe(self) -> str:
        return (f"{self.location.describe()}: {self.steps} batches of {self.batch} sequences "
                f"({self.steps * self.batch} of its {self.index.total_samples} samples)")


def _eval_location(config: Config, paths: JobPaths) -> DataLocation | None:
    uri = config.eval.data_uri
    if not uri:  # the validation channel, when the job has one
        return _channel_or_none(paths)
    try:
        return resolve_location(uri, paths)
    except LocationError as err:
        raise ConfigError(str(err).replace("data.uri", "eval.data_uri")) from None


def _channel_or_none(paths: JobPaths) -> DataLocation | None:
    try:
        location = resolve_location("channel:validation", paths)
    except LocationError:
        return None
    return location


def plan_eval(config: Config, dp_size: int, paths: JobPaths | None = None, vocab_size: int = 0) -> EvalPlan | None:
    """The job's evaluation (None without eval data), checked: ConfigError names the key and the data.
    ``vocab_size``: the training data's, which the eval data must share."""
    ev, train = config.eval, config.train
    paths = paths or job_paths(config, "", os.environ)
    location = _eval_location(config, paths)
    if location is None:
        if ev.every_steps or ev.at_start or ev.steps or ev.samples:
            raise ConfigError("eval.every_steps / eval.at_start / eval.steps / eval.samples are set but there is "
                              "no eval data: set eval.data_uri or give the job a 'validation' channel")
        return None
    where = f"eval.data_uri ({location.describe()})"
    if location.kind == "s3" and importlib.util.find_spec("boto3") is None:
        raise ConfigError(f"{where} needs boto3: pip install 'llm-runtime[s3]'")
    try:
        index, _ = load_index(location.uri, max_attempts=config.data.max_attempts)
    except (StorageError, ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None
    if index.seq_len != train.seq_len:
        raise ConfigError(f"{where} holds sequences of {index.seq_len} tokens (index.json seq_len) but "
                          f"train.seq_len={train.seq_len}")
    if vocab_size and index.vocab_size != vocab_size:
        raise ConfigError(f"{where} was tokenized with a vocabulary of {index.vocab_size} (index.json vocab_size, "
                          f"tokenizer {index.tokenizer!r}) but the training data's has {vocab_size}")
    steps = _eval_steps(ev.steps, ev.samples, train.batch_size, index.total_samples, where)
    if train.batch_size % dp_size:
        raise ConfigError(f"train.batch_size={train.batch_size} does not split over {dp_size} data-parallel replicas")
    return EvalPlan(location, index, steps, train.batch_size)


def _eval_steps(steps: int, samples: int, batch: int, total: int, where: str) -> int:
    """Eval batches per evaluation from eval.steps / eval.samples (pure)."""
    if steps and samples:
        raise ConfigError(f"set eval.steps ({steps}) or eval.samples ({samples}), not both")
    if samples:
        if samples % batch:
            raise ConfigError(f"eval.samples={samples} is not a multiple of train.batch_size={batch} "
                              "(every eval batch is a whole global batch)")
        steps = samples // batch
    steps = steps or total // batch
    if steps < 1 or steps * batch > total:
        raise ConfigError(f"{where} has {total} samples: fewer than {max(1, steps)} eval batch(es) of "
                          f"train.batch_size={batch} (eval.steps / eval.samples)")
    return steps


class EvalReader:
    """This replica's rows of each eval batch, read straight from the shards."""

    def __init__(self, plan: EvalPlan, dp_rank: int, dp_size: int, max_attempts: int = 8):
        self.plan, self.per = plan, plan.batch // dp_size
        self.first = dp_rank * self.per
        self.store = open_store(plan.location.uri, max_attempts=max_attempts)
        self.layout = RecordLayout.for_index(plan.index)
        self.starts = list(np.cumsum([0] + [s.samples for s in plan.index.shards]))

    def rows(self, batch: int) -> torch.Tensor:
        """Eval batch ``batch``'s rows of this replica: [batch / D, seq_len + 1] token ids."""
        sample, end = batch * self.plan.batch + self.first, batch * self.plan.batch + self.first + self.per
        parts, size = [], self.layout.record_bytes
        while sample < end:
            shard = bisect.bisect_right(self.starts, sample) - 1
            within = sample - self.starts[shard]
            count = min(end - sample, self.plan.index.shards[shard].samples - within)
            name = self.plan.index.shards[shard].name
            parts.append(self.layout.decode(self.store.read_bytes(name, within * size, count * size), name,
                                            within * size))
            sample += count
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))


class Evaluator:
    """Runs an evaluation on every rank; rank 0's sink reports it."""

    def __init__(self, rt, trainer, plan: EvalPlan, accumulation: int):
        self.rt, self.trainer, self.plan, self.accumulation = rt, trainer, plan, accumulation
        self.reader = EvalReader(plan, rt.dp_rank, rt.dp_size, rt.config.data.max_attempts)
        self.every = rt.config.eval.every_steps
        self.done: set[int] = set()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step not in self.done

    def run(self, step: int, sink) -> dict:
        """The eval loss and perplexity after ``step`` (every rank gets the same record)."""
        watchdog, losses = self.rt.watchdog, []
        for batch in range(self.plan.steps):
            watchdog.beat(step, "eval")
            rows = self.reader.rows(batch).to(self.rt.device)
            losses.append(self.trainer.eval_loss(rows[:, :-1], rows[:, 1:], self.accumulation).reshape(()))
        loss = sum(self.trainer.global_losses(torch.stack(losses))) / len(losses)
        watchdog.pause()  # the eval is not the next step's time
        self.done.add(step)
        record = {"step": step, "eval_loss": loss, "eval_ppl": math.exp(loss) if loss < 700 else float("inf")}
        if sink is not None:
            sink.write_eval(record)
        return record
