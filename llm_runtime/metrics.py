"""Training metrics: one fixed log line per interval, the same record as JSON lines, TensorBoard,
the SageMaker metric definitions that read the line back, and MFU.

The line (rank 0, every ``train.log_every`` steps), fields always in this order:

``metrics: step=120 loss=3.1416 lr=2.500e-04 tokens_per_s=51234 tokens_per_s_per_device=6404
step_time_s=0.640 mfu=0.412 grad_norm=0.8123 memory_gb=61.20 data_wait_s=0.0012 checkpoint_blocked_s=0.000
checkpoint_slowdown_s=0.000 overhead_s=0.0004``, and while a slow rank is named (stragglers.py)
``straggler=algo-2:rank3 slow_s=0.2100`` at the end.

``tokens_per_s`` is the whole job's; ``step_time_s``, ``data_wait_s``, ``checkpoint_blocked_s``,
``checkpoint_slowdown_s`` and ``overhead_s`` are per-step means over the interval; ``memory_gb`` is the peak allocated GPU memory (the peak
resident memory of the process on CPU); ``mfu`` is ``nan`` when the device's peak is unknown.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EVAL_FIELDS", "FIELDS", "MetricsWindow", "MetricsSink", "flops_per_token", "format_line",
           "format_eval_line", "metric_definitions", "metrics_for_run", "mfu", "peak_tflops"]

log = logging.getLogger(__name__)
PREFIX = "metrics:"
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

#: (key, format, SageMaker metric name, description), in line order.
FIELDS = (
    ("step", "d", "train:step", "optimizer step"),
    ("loss", ".4f", "train:loss", "mean cross-entropy over the global batch"),
    ("lr", ".3e", "train:lr", "learning rate after the step"),
    ("tokens_per_s", ".0f", "train:tokens_per_s", "tokens per second, whole job"),
    ("tokens_per_s_per_device", ".0f", "train:tokens_per_s_per_device", "tokens per second per rank"),
    ("step_time_s", ".3f", "train:step_time_s", "seconds per step (mean over the interval)"),
    ("mfu", ".3f", "train:mfu", "model FLOPs utilisation (0-1)"),
    ("grad_norm", ".4f", "train:grad_norm", "global gradient norm before clipping"),
    ("memory_gb", ".2f", "train:memory_gb", "peak allocated device memory (peak RSS on CPU)"),
    ("data_wait_s", ".4f", "train:data_wait_s", "seconds per step waiting for the batch"),
    ("checkpoint_blocked_s", ".3f", "train:checkpoint_blocked_s", "seconds per step training was blocked by saves"),
    ("checkpoint_slowdown_s", ".3f", "train:checkpoint_slowdown_s",
     "seconds per step lost to saves running in the background, over and above checkpoint_blocked_s"),
    ("overhead_s", ".4f", "train:overhead_s",
     "seconds per step outside the model's step and saves: the runtime's own cost, data hand-off included"),
)

#: Fields that appear only when they apply, after the fixed ones.
OPTIONAL = (
    ("slow_s", ".4f", "train:straggler_slow_s",
     "seconds per step the named straggler (straggler=host:rankN) is slower than the other ranks' median"),
)

#: The eval line (evaluation.py), ``eval: step=120 loss=3.2011 ppl=24.560``: (key, JSONL key,
#: format, SageMaker metric name, description).
EVAL_PREFIX = "eval:"
EVAL_FIELDS = (
    ("loss", "eval_loss", ".4f", "eval:loss", "cross-entropy over every held-out token (their sum / their count)"),
    ("ppl", "eval_ppl", ".3f", "eval:ppl", "perplexity: exp(eval loss)"),
)

#: Dense bf16 tensor-core peak TFLOP/s per device (vendor datasheets), most specific name first.
PEAK_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("A10G", 125.0), ("A10", 125.0), ("L4", 121.0), ("A6000", 155.0), ("V100", 125.0), ("T4", 65.0),
)


def peak_tflops(device_name: str, override: float = 0.0) -> float:
    """The device's peak (``metrics.peak_tflops`` wins); 0 when unknown (a CPU, a new GPU)."""
    if override > 0:
        return override
    for name, tflops in PEAK_TFLOPS:
        if name in device_name:
            return tflops
    return 0.0


def flops_per_token(model=None, override: float = 0.0) -> float:
    """Training FLOPs per token of a user's model: ``override`` (``metrics.flops_per_token``), else 6 x
    its parameter count (forward 2N + backward 4N; attention's sequence-length term is not counted)."""
    if override > 0:
        return override
    if model is None:
        raise ValueError("flops_per_token needs a model or an override")
    return float(6 * sum(p.numel() for p in model.parameters()))


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float) -> float:
    """Achieved model FLOP/s over the device's peak (``peak`` in TFLOP/s); nan when the peak is unknown."""
    if peak <= 0:
        return float("nan")
    return tokens_per_s_per_device * flops_per_token / (peak * 1e12)


def format_line(record: Mapping[str, float]) -> str:
    """The fixed metrics line (see the module docstring)."""
    parts = [PREFIX]
    for key, spec, _, _ in FIELDS:
        value = record.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            parts.append(f"{key}=nan")
        else:
            parts.append(f"{key}={format(value, spec)}")
    if record.get("straggler"):  # only while a rank is named (stragglers.py)
        parts.append(f"straggler={record['straggler']} slow_s={record.get('slow_s', float('nan')):.4f}")
    return " ".join(parts)


def format_eval_line(record: Mapping[str, float]) -> str:
    """The eval line: ``eval: step=N loss=... ppl=...``."""
    parts = [EVAL_PREFIX, f"step={int(record['step'])}"]
    for key, field_name, spec, _, _ in EVAL_FIELDS:
        value = record.get(field_name)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        parts.append(f"{key}={format(value, spec) if finite else 'nan'}")
    return " ".join(parts)


def metric_definitions() -> list[dict[str, str]]:
    """SageMaker ``MetricDefinitions``: one regex per field, reading the value from its line."""
    # Each line starts "<prefix> step=": the logger's name ("llm_runtime.metrics: eval: step=...") cannot
    # make a train regex read the eval line.
    return ([{"Name": name, "Regex": rf"{PREFIX} step=.*\b{key}={_NUMBER}"} for key, _, name, _ in FIELDS + OPTIONAL
             if key != "step"]
            + [{"Name": name, "Regex": rf"{EVAL_PREFIX} step=.*\b{key}={_NUMBER}"}
               for key, _, _, name, _ in EVAL_FIELDS])


def memory_gb(device) -> float:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


@dataclass
class MetricsWindow:
    """Per-interval accumulators; :meth:`close` turns them into one record and starts the next."""

    tokens_per_step: int
    world_size: int
    flops_per_token: float
    peak: float
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait_s: float = 0.0
    checkpoint_blocked_s: float = 0.0
    checkpoint_slowdown_s: float = 0.0
    compute_s: float = 0.0
    """The model's own time (forward, backward, optimizer, the loss's reduction): the rest of the
    interval, less saves, is the runtime's overhead."""
    eval_s: float = 0.0
    """Time spent in evaluations (evaluation.py): not training time, so not in any per-step figure."""

    def close(self, *, step: int, loss: float, lr: float, grad_norm: float, memory: float) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(1, self.steps)
        elapsed = max(now - self.started - self.eval_s, 1e-9)
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        per_device = tokens_per_s / max(1, self.world_size)
        record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_device": per_device, "step_time_s": elapsed / steps,
                  "mfu": mfu(per_device, self.flops_per_token, self.peak), "grad_norm": grad_norm,
                  "memory_gb": memory, "data_wait_s": self.data_wait_s / steps,
                  "checkpoint_blocked_s": self.checkpoint_blocked_s / steps,
                  "checkpoint_slowdown_s": self.checkpoint_slowdown_s / steps,
                  "overhead_s": max(0.0, elapsed - self.compute_s - self.checkpoint_blocked_s) / steps}
        self.reset(now)
        return record

    def reset(self, now: float | None = None) -> None:
        """Start the next interval (also after a rollback: the steps before it are dropped)."""
        self.started = time.perf_counter() if now is None else now
        self.steps, self.data_wait_s, self.checkpoint_blocked_s, self.compute_s = 0, 0.0, 0.0, 0.0
        self.checkpoint_slowdown_s = self.eval_s = 0.0


class MetricsSink:
    """Rank 0's outputs: the log line, the JSON lines file and (optionally) TensorBoard."""

    def __init__(self, jsonl: str, tensorboard_dir: str = "", trackers=()):
        self.jsonl, self.trackers = jsonl, list(trackers)
        """trackers.py's MLflow / W&B runs: each record goes to them too, in their own threads."""
        self.writer = None
        if jsonl:
            Path(jsonl).parent.mkdir(parents=True, exist_ok=True)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # the extra is missing: say how to get it, keep training
                log.warning("metrics.tensorboard needs the tensorboard package (pip install "
                            "'llm-runtime[tensorboard]'): %s", err)
            else:
                self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def write(self, record: Mapping[str, float]) -> None:
        log.info("%s", format_line(record))
        self._append(record)
        for tracker in self.trackers:
            tracker.log(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, int(record["step"]))
            self.writer.flush()

    def _append(self, record: Mapping[str, float]) -> None:
        if self.jsonl:  # a value that is not finite is written as null (JSON has no NaN)
            clean = {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in record.items()}
            with open(self.jsonl, "a") as sink:
                sink.write(json.dumps(clean) + "\n")

    def write_eval(self, record: Mapping[str, float]) -> None:
        """An evaluation: its own line, a JSONL row ``{step, eval_loss, eval_ppl}``, TensorBoard ``eval/``."""
        log.info("%s", format_eval_line(record))
        self._append(record)
        for tracker in self.trackers:
            tracker.log(record)
        if self.writer is not None:
            for key, field_name, _, _, _ in EVAL_FIELDS:
                value = record.get(field_name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"eval/{key}", value, int(record["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.trackers:
            artifact = self._report()
            for tracker in self.trackers:
                tracker.close(artifact)

    def _report(self) -> str:
        """The report image beside the JSONL, for the trackers ('' without matplotlib or records)."""
        from .report import ReportError, load_metrics, plot

        try:
            return str(plot(load_metrics(self.jsonl), Path(self.jsonl).with_name("report.png"))) if self.jsonl else ""
        except ReportError as err:
            log.info("no report image for the trackers: %s", err)
            return ""


def metrics_for_run(rt, model_config, run_store=None) -> tuple[MetricsWindow, MetricsSink | None]:
    """This run's metrics window (every rank) and sink (rank 0: log line, JSON lines, TensorBoard,
    trackers; ``run_store``, the run's checkpoint store, keeps a tracker's run id for a resume)."""
    import torch

    config, train = rt.config, rt.config.train
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    window = MetricsWindow(tokens_per_step=train.batch_size * train.seq_len, world_size=rt.world_size,
                           flops_per_token=config.metrics.flops_per_token or model_config.flops_per_token(train.seq_len),
                           peak=peak_tflops(device_name, config.metrics.peak_tflops))
    if not rt.is_main:
        return window, None
    tensorboard = rt.paths.tensorboard_dir if config.metrics.tensorboard else ""
    if not window.peak:
        log.info("MFU: the peak FLOP/s of %s is unknown (set metrics.peak_tflops); mfu is logged as nan", device_name)
    from .config import to_dict
    from .trackers import trackers_for_run

    output = os.path.dirname(rt.paths.metrics_jsonl) if rt.paths.metrics_jsonl else rt.paths.output_dir
    trackers = trackers_for_run(config, to_dict(config), run_store, output_dir=output)
    return window, MetricsSink(rt.paths.metrics_jsonl, tensorboard, trackers)
