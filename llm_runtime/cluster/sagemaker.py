"""SageMaker's view of the job: ``/opt/ml/input/config`` and the ``SM_*`` variables.

SageMaker writes ``resourceconfig.json`` (hosts, current host, network interface,
instance groups) and ``hyperparameters.json`` (every value a JSON-encoded string)
before the container starts.  ``read_config`` is the only function here that reads
files; everything else is a pure function of what it returned.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ClusterError, ClusterInfo, InstanceGroup, env_int
from ..paths import input_config_dir, sagemaker_root

__all__ = [
    "DEFAULT_MASTER_PORT",
    "SageMakerConfig",
    "config_dir",
    "decode_hyperparameters",
    "node_info",
    "read_config",
    "read_hyperparameters",
]

#: The port the sagemaker-training toolkit's torchrun runner uses; we keep it for parity.
DEFAULT_MASTER_PORT = 7777
DISTRIBUTION_GROUPS_KEY = "sagemaker_distribution_instance_groups"


@dataclass(frozen=True)
class SageMakerConfig:
    """The parsed SageMaker job description, and where it came from (for messages)."""

    source: str
    resource: Mapping[str, Any]
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)


def config_dir(env: Mapping[str, str], root: str | Path | None = None) -> Path:
    """``<root>/input/config``; root defaults to ``$SAGEMAKER_BASE_DIR`` or /opt/ml."""
    return input_config_dir(root if root is not None else sagemaker_root(env))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ClusterError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ClusterError(f"cannot read {path}: {err.strerror}") from None


def decode_hyperparameters(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """SageMaker stores every hyperparameter value as a JSON-encoded string; decode each.

    A value that is not valid JSON is kept as the plain string, as the toolkit does.
    """
    if not isinstance(raw, Mapping):
        raise ClusterError(f"{source}: expected a JSON object, found {type(raw).__name__}")
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        decoded[key] = value
    return decoded


def read_hyperparameters(env: Mapping[str, str], root: str | Path | None = None) -> dict[str, Any]:
    """The job's hyperparameters, decoded; empty when there are none."""
    path = config_dir(env, root) / "hyperparameters.json"
    if path.exists():
        return decode_hyperparameters(_load_json(path), str(path))
    if env.get("SM_HPS"):
        try:
            return dict(json.loads(env["SM_HPS"]))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ClusterError(f"SM_HPS is not a JSON object: {err}") from None
    return {}


def read_config(env: Mapping[str, str], root: str | Path | None = None) -> SageMakerConfig | None:
    """Read the SageMaker job description, or None when this is not a SageMaker job.

    ``resourceconfig.json`` wins; ``SM_HOSTS`` / ``SM_CURRENT_HOST`` (what the toolkit
    exports to user scripts) are the fallback when only the variables were passed on.
    """
    path = config_dir(env, root) / "resourceconfig.json"
    if path.exists():
        resource = _load_json(path)
        if not isinstance(resource, Mapping):
            raise ClusterError(f"{path}: expected a JSON object, found {type(resource).__name__}")
        return SageMakerConfig(str(path), resource, read_hyperparameters(env, root))
    if "SM_HOSTS" in env or "SM_CURRENT_HOST" in env:
        try:
            hosts = json.loads(env.get("SM_HOSTS", "[]"))
        except json.JSONDecodeError as err:
            raise ClusterError(f"SM_HOSTS is not a JSON list: {err}") from None
        resource = {
            "hosts": hosts,
            "current_host": env.get("SM_CURRENT_HOST", ""),
            "network_interface_name": env.get("SM_NETWORK_INTERFACE_NAME", "eth0"),
            "current_instance_type": env.get("SM_CURRENT_INSTANCE_TYPE"),
        }
        return SageMakerConfig("SM_HOSTS/SM_CURRENT_HOST", resource, read_hyperparameters(env, root))
    return None


def _instance_groups(cfg: SageMakerConfig) -> tuple[InstanceGroup, ...]:
    groups = []
    for entry in cfg.resource.get("instance_groups") or ():
        try:
            groups.append(
                InstanceGroup(
                    name=str(entry["instance_group_name"]),
                    instance_type=str(entry.get("instance_type", "")),
                    hosts=tuple(entry["hosts"]),
                )
            )
        except (KeyError, TypeError) as err:
            raise ClusterError(f"{cfg.source}: malformed instance_groups entry {entry!r} ({err})") from None
    return tuple(groups)


def _training_hosts(cfg: SageMakerConfig, all_hosts: tuple[str, ...], groups: tuple[InstanceGroup, ...]) -> tuple[str, ...]:
    """Hosts of the distribution instance groups (default: every group), in listed order."""
    if not groups:
        return all_hosts
    wanted = cfg.hyperparameters.get(DISTRIBUTION_GROUPS_KEY)
    if wanted is None:
        return all_hosts if len(groups) == 1 else tuple(h for g in groups for h in g.hosts)
    if isinstance(wanted, str):
        wanted = [wanted]
    if not isinstance(wanted, list) or not all(isinstance(name, str) for name in wanted):
        raise ClusterError(f"hyperparameter {DISTRIBUTION_GROUPS_KEY} must be a list of instance group "
                           f"names, got {wanted!r}")
    known = {g.name for g in groups}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise ClusterError(
            f"hyperparameter {DISTRIBUTION_GROUPS_KEY} names unknown instance group(s) {unknown}; "
            f"{cfg.source} lists {sorted(known)}"
        )
    return tuple(h for g in groups if g.name in wanted for h in g.hosts)


def node_info(
    cfg: SageMakerConfig, env: Mapping[str, str], *, num_gpus: int, cpu_procs: int = 2
) -> ClusterInfo:
    """Node-level facts for this host (no ranks: the launcher spawns the workers)."""
    hosts = cfg.resource.get("hosts")
    current = cfg.resource.get("current_host")
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) and h for h in hosts):
        raise ClusterError(f"{cfg.source}: 'hosts' must be a non-empty list of host names, found {hosts!r}")
    if not isinstance(current, str) or not current:
        raise ClusterError(f"{cfg.source}: 'current_host' is missing or empty")
    all_hosts = tuple(hosts)  # never re-sorted: as strings algo-10 sorts before algo-2
    if len(set(all_hosts)) != len(all_hosts):
        raise ClusterError(f"{cfg.source}: 'hosts' lists a host twice: {list(all_hosts)}")
    if current not in all_hosts:
        raise ClusterError(f"{cfg.source}: current_host {current!r} is not in hosts {list(all_hosts)}")
    groups = _instance_groups(cfg)
    training = _training_hosts(cfg, all_hosts, groups)
    if not training:
        raise ClusterError(f"{cfg.source}: no host is in the distribution instance groups")
    current_group = cfg.resource.get("current_group_name")
    instance_type = cfg.resource.get("current_instance_type")
    if instance_type is None:
        instance_type = next((g.instance_type for g in groups if current in g.hosts), None)
    gpus = num_gpus if num_gpus > 0 else env_int(env, "SM_NUM_GPUS", "SageMaker", 0)
    return ClusterInfo(
        kind="sagemaker",
        hosts=training,
        current_host=current,
        node_rank=training.index(current) if current in training else -1,
        num_nodes=len(training),
        nproc_per_node=gpus if gpus > 0 else cpu_procs,
        master_addr=training[0],
        master_port=env_int(env, "MASTER_PORT", "the environment", DEFAULT_MASTER_PORT),
        network_interface=cfg.resource.get("network_interface_name") or "eth0",
        instance_type=instance_type,
        instance_groups=groups,
        current_group=current_group,
    )
