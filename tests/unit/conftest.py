"""Shared fixtures for the unit tests: fake SageMaker ``/opt/ml`` trees under tmp_path."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

_UNSET: Any = object()


@pytest.fixture
def sagemaker_tree(tmp_path):
    """Factory writing ``<root>/input/config/{resourceconfig,hyperparameters,inputdataconfig}.json``.

    ``make(hosts, current_host, ...)`` returns the root (what SAGEMAKER_BASE_DIR points at).

    * ``hyperparameters`` holds Python values; each is JSON-encoded into a string, as SageMaker
      writes them (``{"train.steps": 5}`` -> ``{"train.steps": "5"}``).
      ``raw_hyperparameters`` is written verbatim instead.
    * ``groups`` maps group name -> (instance type, hosts) and becomes ``instance_groups``;
      ``hosts`` defaults to the groups' hosts in order, and ``current_group_name`` to the
      group holding ``current_host``.
    * ``resource_text`` replaces resourceconfig.json with arbitrary text (malformed files);
      ``resource_extra`` adds or overrides keys of the generated resourceconfig.
    """
    counter = iter(range(1_000_000))

    def make(
        hosts: Sequence[str] | None = None,
        current_host: str | None = None,
        *,
        hyperparameters: Mapping[str, Any] | None = None,
        raw_hyperparameters: Mapping[str, Any] | None = None,
        groups: Mapping[str, tuple[str, Sequence[str]]] | None = None,
        network_interface: str | None = "eth0",
        instance_type: Any = "ml.p4d.24xlarge",
        current_group: Any = _UNSET,
        resource_text: str | None = None,
        resource_extra: Mapping[str, Any] | None = None,
        input_data: Mapping[str, Any] | None = None,
        code_files: Sequence[str] = (),
    ) -> Path:
        root = tmp_path / f"sm{next(counter)}"
        config = root / "input" / "config"
        config.mkdir(parents=True)
        (root / "code").mkdir()
        (root / "model").mkdir()
        for name in code_files:
            (root / "code" / name).write_text("print('user program')\n")

        if resource_text is not None:
            (config / "resourceconfig.json").write_text(resource_text)
        else:
            if hosts is None:
                hosts = [h for _, group_hosts in (groups or {}).values() for h in group_hosts]
            hosts = list(hosts)
            if current_host is None:
                current_host = hosts[0] if hosts else "algo-1"
            resource: dict[str, Any] = {"current_host": current_host, "hosts": hosts}
            if network_interface is not None:
                resource["network_interface_name"] = network_interface
            if instance_type is not None:
                resource["current_instance_type"] = instance_type
            if groups:
                resource["instance_groups"] = [
                    {"instance_group_name": name, "instance_type": itype, "hosts": list(ghosts)}
                    for name, (itype, ghosts) in groups.items()
                ]
                if current_group is _UNSET:
                    current_group = next(
                        (name for name, (_, ghosts) in groups.items() if current_host in ghosts), None)
                if instance_type is not None and current_group in groups:
                    resource["current_instance_type"] = groups[current_group][0]
            if current_group is not _UNSET and current_group is not None:
                resource["current_group_name"] = current_group
            resource.update(resource_extra or {})
            (config / "resourceconfig.json").write_text(json.dumps(resource))

        if raw_hyperparameters is not None:
            encoded = dict(raw_hyperparameters)
        else:
            encoded = {key: json.dumps(value) for key, value in (hyperparameters or {}).items()}
        (config / "hyperparameters.json").write_text(json.dumps(encoded))
        channels = input_data if input_data is not None else {
            "train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated",
                      "RecordWrapperType": "None"}}
        (config / "inputdataconfig.json").write_text(json.dumps(channels))
        return root

    return make


@pytest.fixture
def empty_dir(tmp_path) -> Path:
    """A directory with no SageMaker config in it (so detection never reads /opt/ml)."""
    path = tmp_path / "no-sagemaker"
    path.mkdir()
    return path
