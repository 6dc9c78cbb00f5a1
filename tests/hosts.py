"""Simulated SageMaker hosts on one machine, for the integration tests and the benchmarks: each a
process tree with its own hostname (algo-1, algo-2), its own /opt/ml and hosts file (bind mounts in
a private mount namespace) and its own loopback address (127.0.1.1, 127.0.1.2). Every byte stays on
127.0.0.0/8. Needs root (unshare) and util-linux.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.procs import clean_env, free_port, kill_tree

HOSTS = ("algo-1", "algo-2")

ENTER_HOST = """#!/bin/sh
# enter-host NAME HOSTS_FILE TREE CMD...: become SageMaker host NAME in this private namespace.
set -e
name=$1; hosts=$2; tree=$3; shift 3
hostname "$name"
mount --bind "$hosts" /etc/hosts
mount --bind "$tree" /opt/ml
exec "$@"
"""

def namespaces_work() -> str | None:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter not installed"
    probe = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"namespaces not permitted here: {probe.stderr.strip()}"
    try:
        os.makedirs("/opt/ml", exist_ok=True)  # the mount point; each host binds its own tree over it
    except OSError as err:
        return f"cannot create the /opt/ml mount point: {err}"
    return None


class Cluster:
    """The simulated hosts: their trees, their processes, their output."""

    def __init__(self, root: Path, hyperparameters: dict, interface: str = "lo"):
        self.root = root
        self.port = free_port(span=2)  # MASTER_PORT, and + 1 for mpirun's exit status
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_files = []
        (root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
            f"127.0.1.{i} {h}\n" for i, h in enumerate(HOSTS, 1)))
        (root / "enter-host").write_text(ENTER_HOST)
        (root / "enter-host").chmod(0o755)
        for host in HOSTS:
            config = root / host / "input" / "config"
            config.mkdir(parents=True)
            (root / host / "output").mkdir()
            (root / host / "code").mkdir()
            config.joinpath("resourceconfig.json").write_text(json.dumps({
                "current_host": host, "hosts": list(HOSTS), "network_interface_name": interface,
                "current_instance_type": "ml.c5.xlarge", "current_group_name": "homogeneousCluster",
                "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                     "instance_type": "ml.c5.xlarge", "hosts": list(HOSTS)}]}))
            # SageMaker writes every hyperparameter value as a JSON-encoded string.
            config.joinpath("hyperparameters.json").write_text(json.dumps(
                {k: json.dumps(v) for k, v in hyperparameters.items()}))
            config.joinpath("inputdataconfig.json").write_text("{}")

    def start(self, host: str, *command: str, **env: str) -> subprocess.Popen:
        log = open(self.root / f"{host}.log", "w")
        self.log_files.append(log)
        proc = subprocess.Popen(
            ["unshare", "--uts", "--mount", "--propagation", "private", "--", str(self.root / "enter-host"),
             host, str(self.root / "hosts"), str(self.root / host), *command],
            env=clean_env(loopback=False, MASTER_PORT=str(self.port), **env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.procs[host] = proc
        return proc

    def output(self, host: str) -> str:
        return (self.root / f"{host}.log").read_text()

    def wait_all(self, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        codes = {}
        for host, proc in self.procs.items():
            try:
                codes[host] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        if len(codes) < len(self.procs):
            self.stop()
            raise AssertionError(f"hosts did not exit within {timeout}s (exited: {codes})\n" + self.logs())
        return codes

    def logs(self) -> str:
        return "\n".join(f"----- {h} -----\n{self.output(h)}" for h in self.procs)

    def stop(self) -> None:
        for proc in self.procs.values():
            kill_tree(proc)
            proc.wait(timeout=30)
        for log in self.log_files:
            log.close()
