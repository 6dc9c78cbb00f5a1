"""Parity with the sagemaker-training toolkit's own reading of the same ``/opt/ml`` tree.

The toolkit reads SAGEMAKER_BASE_DIR when it is imported and writes os.environ while it
builds its Environment, so it runs in a subprocess (with a timeout) and prints JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llm_runtime.cluster import detect
from llm_runtime.cluster import sagemaker as sm

pytest.importorskip("sagemaker_training")

MARKER = "PARITY-JSON:"
TOOLKIT_SCRIPT = f"""
import json, sys
from sagemaker_training import environment
env = environment.Environment()
facts = {{
    "hosts": list(env.hosts),
    "current_host": env.current_host,
    "master_hostname": env.master_hostname,
    "distribution_hosts": list(env.distribution_hosts),
    "network_interface_name": env.network_interface_name,
    "current_instance_type": env.current_instance_type,
    "hyperparameters": env.hyperparameters,
}}
sys.stdout.write({MARKER!r} + json.dumps(facts) + "\\n")
"""
TOOLKIT_TIMEOUT_S = 60


def toolkit_view(root) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_"))}
    env.update(SAGEMAKER_BASE_DIR=str(root), AWS_REGION="us-west-2", AWS_DEFAULT_REGION="us-west-2")
    proc = subprocess.run([sys.executable, "-c", TOOLKIT_SCRIPT], env=env, cwd=str(root), capture_output=True,
                          text=True, timeout=TOOLKIT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    return json.loads(line[len(MARKER):])


UNSORTED = ["algo-2", "algo-10", "algo-1"]
HETERO = {"cpu": ("ml.c5.4xlarge", ["algo-1", "algo-3"]), "gpu": ("ml.p4d.24xlarge", ["algo-2", "algo-4"])}
USER_HP = {"train.steps": 5, "lr": 0.01, "tag": "run-a"}
PARITY_CASES = [
    # (id, tree kwargs); hyperparameters are Python values, JSON-encoded by the fixture.
    ("homogeneous-3-unsorted-group", dict(
        hosts=UNSORTED, current_host="algo-10", network_interface="ens5", instance_type="ml.g5.12xlarge",
        groups={"homogeneousCluster": ("ml.g5.12xlarge", UNSORTED)},
        hyperparameters={**USER_HP, "sagemaker_program": "train.py", "sagemaker_torch_distributed_enabled": True})),
    ("homogeneous-3-unsorted-no-groups", dict(
        hosts=UNSORTED, current_host="algo-1", network_interface="eth0", instance_type="ml.p5.48xlarge",
        hyperparameters={**USER_HP, "sagemaker_program": "train.py"})),
    ("heterogeneous-gpu-group-trains-gpu-host", dict(
        groups=HETERO, current_host="algo-4", network_interface="eth0",
        hyperparameters={**USER_HP, "sagemaker_distribution_instance_groups": ["gpu"]})),
    ("heterogeneous-gpu-group-trains-cpu-host", dict(
        groups=HETERO, current_host="algo-3", network_interface="eth0",
        hyperparameters={**USER_HP, "sagemaker_distribution_instance_groups": ["gpu"]})),
]


@pytest.mark.parametrize("tree", [c[1] for c in PARITY_CASES], ids=[c[0] for c in PARITY_CASES])
def test_detect_agrees_with_the_sagemaker_training_toolkit(tree, sagemaker_tree):
    root = sagemaker_tree(**tree)
    theirs = toolkit_view(root)
    ours = detect({}, root, num_gpus=1)

    assert ours.kind == "sagemaker"
    assert list(ours.hosts) == theirs["distribution_hosts"]
    assert ours.master_addr == theirs["master_hostname"]
    assert ours.current_host == theirs["current_host"]
    assert ours.network_interface == theirs["network_interface_name"]
    assert ours.instance_type == theirs["current_instance_type"]
    expected_rank = (theirs["distribution_hosts"].index(theirs["current_host"])
                     if theirs["current_host"] in theirs["distribution_hosts"] else -1)
    assert ours.node_rank == expected_rank
    assert ours.trains is (expected_rank >= 0)
    # Every host the toolkit knows is one of ours (all groups), in the toolkit's order.
    all_ours = [h for g in ours.instance_groups for h in g.hosts] or list(ours.hosts)
    assert sorted(all_ours) == sorted(theirs["hosts"])
    if not ours.instance_groups or len(ours.instance_groups) == 1:
        assert list(ours.hosts) == theirs["hosts"]  # never re-sorted
    # The user's hyperparameters, decoded, without the platform's sagemaker_* keys.
    hyper = sm.read_hyperparameters({}, root)
    assert {k: v for k, v in hyper.items() if not k.startswith("sagemaker_")} == theirs["hyperparameters"]
