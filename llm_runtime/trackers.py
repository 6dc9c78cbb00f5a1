"""Experiment trackers next to the JSONL and TensorBoard: MLflow (``metrics.mlflow``) and
Weights & Biases (``metrics.wandb``). Only rank 0 logs.

Trackers never stall training: every call runs in one background thread per tracker, off a
bounded queue. A call that fails is retried (tenacity, a few attempts with backoff); a tracker
that still fails, or whose queue fills, logs one warning, drops its records from then on, and
training goes on. Params are the resolved config, redacted like the logs. The tracker's run id
is kept in the run's checkpoint store (``trackers.json``), so a resumed job continues the same
run; a replayed step (after a restart or a rollback) is logged again at the same step.
"""
from __future__ import annotations

import json
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping

from .secrets import redact

__all__ = ["Background", "MlflowTracker", "RUN_RECORD", "WANDB_MODES", "WandbTracker", "flat_params", "numeric",
           "tracker_problem", "trackers_for_run"]

log = logging.getLogger(__name__)
RUN_RECORD = "trackers.json"
"""In the run's checkpoint store: each tracker's run id, for the next attempt."""
QUEUE_SIZE = 10_000
ATTEMPTS = 3
CLOSE_TIMEOUT_S = 30.0
WANDB_MODES = ("online", "offline", "disabled", "shared")
"""The W&B modes a job may name in ``WANDB_MODE``; the runtime never picks one itself."""


def flat_params(config_dict: Mapping[str, Mapping]) -> dict[str, str]:
    """``{"section.key": value}`` of the resolved config, as strings, secrets masked (pure)."""
    return {f"{section}.{key}": redact(str(value)) for section, keys in config_dict.items()
            for key, value in keys.items()}


def numeric(record: Mapping) -> dict[str, float]:
    """A metrics record's finite numbers, ``step`` left out (pure)."""
    return {key: float(value) for key, value in record.items() if key != "step" and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


class Background:
    """One tracker's calls, in order, in a daemon thread off a bounded queue."""

    def __init__(self, name: str, queue_size: int = QUEUE_SIZE, attempts: int = ATTEMPTS):
        self.name, self.attempts = name, attempts
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.failed = False
        self._thread = threading.Thread(target=self._run, name=f"tracker-{name}", daemon=True)
        self._thread.start()

    def submit(self, call: Callable, *args) -> None:
        if self.failed:
            return
        try:
            self.queue.put_nowait((call, args))
        except queue.Full:
            self._give_up("its queue is full: it is slower than training")

    def _run(self) -> None:
        from tenacity import Retrying, stop_after_attempt, wait_exponential

        while True:
            item = self.queue.get()
            if item is None:
                return
            call, args = item
            if self.failed:
                continue
            try:
                for attempt in Retrying(stop=stop_after_attempt(self.attempts), wait=wait_exponential(max=2.0),
                                        reraise=True):
                    with attempt:
                        call(*args)
            except Exception as err:  # noqa: BLE001 - whatever the tracker raises, training goes on
                self._give_up(f"{type(err).__name__}: {err}")

    def _give_up(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            log.warning("%s", redact(f"metrics.{self.name}: the tracker failed ({why[:500]}); its records are dropped "
                                     "from now on and training goes on"))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Let queued calls finish, for at most ``timeout_s``; then leave the thread to the process's exit."""
        try:
            self.queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)


class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (``MLFLOW_TRACKING_URI``; a SageMaker managed
    tracking server's ARN works with the ``sagemaker-mlflow`` plugin installed)."""

    name = "mlflow"

    def __init__(self, params: dict[str, str], run_store, job_name: str):
        from mlflow.tracking import MlflowClient

        for variable, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20"),
                                ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
            os.environ.setdefault(variable, value)  # a server that is gone shows within seconds, not minutes
        self.client, self.run_store, self.run_id = MlflowClient(), run_store, ""
        self.background = Background(self.name)
        self.background.submit(self._start, params, job_name or "llm-runtime")

    def _start(self, params: dict[str, str], job_name: str) -> None:
        from mlflow.entities import Param

        self.run_id = _read_record(self.run_store).get("mlflow_run_id", "")
        if self.run_id:  # a resumed job: the same run (its params are the first attempt's)
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("metrics.mlflow: continuing run %s", self.run_id)
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or job_name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=job_name).info.run_id
        _write_record(self.run_store, mlflow_run_id=self.run_id)
        items = [Param(key, value[:6000]) for key, value in sorted(params.items())]
        for first in range(0, len(items), 100):  # the REST API takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[first:first + 100])
        log.info("metrics.mlflow: run %s in experiment %r", self.run_id, name)

    def log(self, record: Mapping) -> None:
        values, step, now = numeric(record), int(record["step"]), int(time.time() * 1000)
        self.background.submit(self._log, values, step, now)

    def _log(self, values: dict[str, float], step: int, when_ms: int) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, v, when_ms, step) for k, v in values.items()])

    def close(self, artifact: str = "") -> None:
        if artifact:
            self.background.submit(lambda: self.client.log_artifact(self.run_id, artifact))
        self.background.submit(lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self.background.close()


class WandbTracker:
    """A W&B run (the ``WANDB_*`` variables; ``WANDB_MODE`` named by the job). Every metric is
    plotted against the training step (``step``), so a replayed step is logged again rather than
    refused by W&B's own monotone step counter."""

    name = "wandb"

    def __init__(self, params: dict[str, str], run_store, job_name: str, directory: str):
        import wandb  # an ImportError here is trackers_for_run's warning

        self.wandb, self.run_store, self.run = wandb, run_store, None
        self.background = Background(self.name)
        self.background.submit(self._start, params, job_name or "llm-runtime", directory)

    def _start(self, params: dict[str, str], job_name: str, directory: str) -> None:
        wandb = self.wandb
        known = _read_record(self.run_store).get("wandb_run_id", "")
        run_id = known or secrets.token_hex(6)  # W&B's own id alphabet: lower-case letters and digits
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(id=run_id, resume="allow", dir=directory, config=params,
                              project=os.environ.get("WANDB_PROJECT") or job_name,
                              name=os.environ.get("WANDB_NAME") or job_name,
                              settings=wandb.Settings(console="off", save_code=False, disable_git=True,
                                                      init_timeout=30.0))
        if not known:  # recorded once the run exists: a failed init leaves no id behind
            _write_record(self.run_store, wandb_run_id=run_id)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        log.info("metrics.wandb: %s run %s (%s mode) in %s", "continuing" if known else "started", run_id,
                 os.environ.get("WANDB_MODE"), self.run.dir)

    def log(self, record: Mapping) -> None:
        self.background.submit(self._log, {**numeric(record), "step": int(record["step"])})

    def _log(self, values: dict[str, float]) -> None:
        self.run.log(values)

    def close(self, artifact: str = "") -> None:
        if artifact:
            self.background.submit(lambda: self.run.save(artifact, base_path=os.path.dirname(artifact), policy="now"))
        self.background.submit(lambda: self.run.finish())
        self.background.close()


def tracker_problem(metrics, env: Mapping[str, str]) -> str:
    """What stops the ``[metrics]`` trackers from starting as configured, or "" (pure): W&B's mode
    must be named, since guessing online or offline from the network would send or hide a job's metrics."""
    mode = env.get("WANDB_MODE", "")
    if not metrics.wandb or mode in WANDB_MODES:
        return ""
    if not mode:
        return (f"metrics.wandb=true needs WANDB_MODE set explicitly to one of {', '.join(WANDB_MODES)}: "
                "the runtime does not guess it from the network")
    return f"WANDB_MODE={mode!r} (for metrics.wandb=true) is not one of {', '.join(WANDB_MODES)}"


def _read_record(store) -> dict:
    if store is None:
        return {}
    try:
        return json.loads(store.read_text(RUN_RECORD) or "{}")
    except ValueError:
        return {}


def _write_record(store, **ids: str) -> None:
    if store is not None:
        store.write_text(RUN_RECORD, json.dumps({**_read_record(store), **ids}))


def trackers_for_run(config, config_dict: Mapping, run_store, output_dir: str = "",
                     env: Mapping[str, str] | None = None) -> list:
    """Rank 0's trackers, as ``[metrics]`` asks; one that cannot start is a warning, not a failure.
    W&B writes its run under ``WANDB_DIR``, else ``output_dir`` (beside the metrics JSONL)."""
    env = os.environ if env is None else env
    job_name = env.get("TRAINING_JOB_NAME", "")
    made = []
    if config.metrics.mlflow:
        try:
            made.append(MlflowTracker(flat_params(config_dict), run_store, job_name))
        except ImportError as err:
            log.warning("metrics.mlflow needs MLflow (pip install 'llm-runtime[mlflow]'): %s", err)
    if config.metrics.wandb:
        try:
            made.append(WandbTracker(flat_params(config_dict), run_store, job_name,
                                     env.get("WANDB_DIR") or output_dir or "."))
        except ImportError as err:
            log.warning("metrics.wandb needs wandb (pip install 'llm-runtime[wandb]'): %s", err)
    return made
