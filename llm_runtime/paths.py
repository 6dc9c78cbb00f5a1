"""Where a job's files go: the one owner of SageMaker's ``/opt/ml`` layout.

:func:`job_paths` is pure: it reads the config, the cluster kind and an environment mapping,
so the launcher and every worker derive the same value. Everything else reads a
:class:`JobPaths` instead of knowing ``/opt/ml`` or the ``SM_*`` variables itself.

On SageMaker (or wherever SageMaker's ``SM_*`` variables are set) the defaults are the paths
the platform uploads; elsewhere they follow ``train.output_dir`` or are off.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["JobPaths", "code_dir", "failure_file", "failures_dir", "input_config_dir", "job_paths", "sagemaker_root"]

SAGEMAKER_ROOT = "/opt/ml"


def sagemaker_root(env: Mapping[str, str]) -> Path:
    """SageMaker's base directory: ``$SAGEMAKER_BASE_DIR`` (the toolkit's override, used by tests
    and local runs) or /opt/ml."""
    return Path(env.get("SAGEMAKER_BASE_DIR") or SAGEMAKER_ROOT)


def input_config_dir(root: str | Path) -> Path:
    """``resourceconfig.json``, ``hyperparameters.json``, ``inputdataconfig.json``."""
    return Path(root) / "input" / "config"


def code_dir(env: Mapping[str, str]) -> Path:
    """Where SageMaker unpacks the job's program (``sagemaker_submit_directory``)."""
    return sagemaker_root(env) / "code"


def failure_file(output_dir: str) -> str:
    """The host's one-line failure record; SageMaker shows ``/opt/ml/output/failure`` as the job's reason."""
    return os.path.join(output_dir, "failure") if output_dir else ""


def failures_dir(output_dir: str) -> str:
    """Each rank's JSON record and stacks, and the records set aside from earlier attempts."""
    return os.path.join(output_dir, "failures") if output_dir else ""


@dataclass(frozen=True)
class JobPaths:
    """Every path of one job; an empty string means "off" (nothing is written there)."""

    root: str
    """SageMaker's base directory (``/opt/ml``), whether or not this is a SageMaker job."""
    output_dir: str
    """Failure records and reports (``/opt/ml/output`` on SageMaker, else ``train.output_dir``)."""
    model_dir: str
    """The final consolidated model (``/opt/ml/model`` on SageMaker, else ``train.model_dir``)."""
    checkpoint_dir: str
    """Tier-1 (node-local) checkpoints."""
    metrics_jsonl: str
    tensorboard_dir: str
    channel_dirs: Mapping[str, str] = field(default_factory=dict)
    """``SM_CHANNEL_<NAME>`` values, by lower-case channel name."""

    @property
    def failure_file(self) -> str:
        return failure_file(self.output_dir)

    @property
    def failures_dir(self) -> str:
        return failures_dir(self.output_dir)

    @property
    def input_config_dir(self) -> Path:
        return input_config_dir(self.root)

    @property
    def code_dir(self) -> Path:
        return Path(self.root) / "code"

    def channel_dir(self, name: str) -> str:
        """Where channel ``name`` is (``SM_CHANNEL_<NAME>``, else ``<root>/input/data/<name>``)."""
        return self.channel_dirs.get(name.lower()) or str(Path(self.root) / "input" / "data" / name)


def _on_sagemaker(cluster_kind: str, env: Mapping[str, str], variable: str) -> bool:
    return cluster_kind == "sagemaker" or bool(env.get(variable))


def job_paths(config, cluster_kind: str, env: Mapping[str, str]) -> JobPaths:
    """This job's paths from ``[train]``, ``[metrics]``, ``[checkpoint]``, the cluster kind and ``env``."""
    root = sagemaker_root(env)
    train, metrics, ck = config.train, config.metrics, config.checkpoint
    output_dir = train.output_dir or env.get("SM_OUTPUT_DIR") or (
        str(root / "output") if cluster_kind == "sagemaker" else "")
    model_dir = train.model_dir or env.get("SM_MODEL_DIR") or (
        str(root / "model") if cluster_kind == "sagemaker" else "")
    if metrics.jsonl:
        jsonl = "" if metrics.jsonl == "none" else metrics.jsonl
    elif _on_sagemaker(cluster_kind, env, "SM_OUTPUT_DATA_DIR"):  # uploaded with the job's output
        jsonl = os.path.join(env.get("SM_OUTPUT_DATA_DIR") or str(root / "output" / "data"), "metrics.jsonl")
    else:
        jsonl = os.path.join(output_dir, "metrics.jsonl") if output_dir else ""
    if metrics.tensorboard_dir:
        tensorboard = metrics.tensorboard_dir
    elif cluster_kind == "sagemaker":  # what TensorBoardOutputConfig uploads
        tensorboard = str(root / "output" / "tensorboard")
    else:
        tensorboard = os.path.join(output_dir or ".", "tensorboard")
    if ck.local_dir:
        checkpoint_dir = ck.local_dir
    elif ck.sagemaker_sync:  # SageMaker syncs /opt/ml/checkpoints to the job's checkpoint S3 URI itself
        checkpoint_dir = str(root / "checkpoints")
    else:
        checkpoint_dir = os.path.join(tempfile.gettempdir(), "llm_runtime", "checkpoints")
    channels = {name[len("SM_CHANNEL_"):].lower(): value for name, value in env.items()
                if name.startswith("SM_CHANNEL_") and value}
    return JobPaths(str(root), output_dir, model_dir, checkpoint_dir, jsonl, tensorboard, channels)
