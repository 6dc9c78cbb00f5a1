"""``llm-runtime local-job``: N containers of an image as N SageMaker hosts, as SageMaker's local mode
runs a training job, so a job can be tried before anyone pays for GPU instances.

Each container is host ``algo-i`` at ``127.0.1.i`` on the machine's loopback (host networking, no
bridge network, no other address): ``--hostname algo-i`` and an ``--add-host`` line per host. Its
own ``/opt/ml`` is a directory under ``--workdir`` written as SageMaker writes it
(``resourceconfig.json`` with ``network_interface_name: lo``, ``hyperparameters.json`` whose values
are JSON-encoded strings, ``inputdataconfig.json``, one directory per channel), and its command is
SageMaker's: ``docker run IMAGE train``. Environment variables are passed through by name (an S3
endpoint, credentials: their values never reach argv or the log). Afterwards each host's exit code,
``/opt/ml/model`` and ``/opt/ml/output/failure`` are collected. A SIGTERM or Ctrl-C (or the
timeout) stops every container as SageMaker stops a job: ``docker stop -t GRACE``.

The tree and the argv are pure (:func:`host_files`, :func:`docker_run_argv`); the rest runs docker.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .paths import SAGEMAKER_ROOT

__all__ = ["docker_run_argv", "host_address", "host_files", "main"]


def host_name(index: int) -> str:
    return f"algo-{index + 1}"


def host_address(index: int) -> str:
    return f"127.0.1.{index + 1}"


def host_files(index: int, hosts: int, hyperparameters: Mapping[str, object], channels: Sequence[str],
               instance_type: str) -> dict[str, str]:
    """The files of host ``index``'s /opt/ml/input/config, by name, as SageMaker writes them."""
    names = [host_name(i) for i in range(hosts)]
    group = "homogeneousCluster"
    resource = {"current_host": names[index], "current_instance_type": instance_type, "current_group_name": group,
                "hosts": names, "network_interface_name": "lo",
                "instance_groups": [{"instance_group_name": group, "instance_type": instance_type, "hosts": names}]}
    data = {name: {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
            for name in channels}
    return {"resourceconfig.json": json.dumps(resource, indent=1),
            "hyperparameters.json": json.dumps({k: json.dumps(v) for k, v in hyperparameters.items()}, indent=1),
            "inputdataconfig.json": json.dumps(data, indent=1)}


def docker_run_argv(image: str, index: int, hosts: int, tree: Path, job: str, env_names: Sequence[str],
                    channels: Mapping[str, Path], docker: str = "docker") -> list[str]:
    """``docker run -d`` of host ``index``: its name, hostname and loopback address, its /opt/ml,
    its channels read-only, the passed-through variables by name, and SageMaker's ``train``."""
    argv = [docker, "run", "-d", "--name", f"{job}-{host_name(index)}", "--network", "host",
            "--hostname", host_name(index)]
    for other in range(hosts):
        argv += ["--add-host", f"{host_name(other)}:{host_address(other)}"]
    argv += ["-v", f"{tree}:{SAGEMAKER_ROOT}"]
    for name, path in channels.items():
        argv += ["-v", f"{path}:{SAGEMAKER_ROOT}/input/data/{name}:ro"]
    for name in env_names:
        argv += ["-e", name]  # the value comes from this process's environment, never from argv
    return [*argv, image, "train"]


def _write_tree(root: Path, index: int, hosts: int, hyperparameters, channels, instance_type: str,
                code: str | None = None) -> Path:
    tree = root / host_name(index)
    if tree.exists():
        shutil.rmtree(tree)
    config = tree / "input" / "config"
    config.mkdir(parents=True)
    for name, text in host_files(index, hosts, hyperparameters, list(channels), instance_type).items():
        (config / name).write_text(text)
    for name in channels:
        (tree / "input" / "data" / name).mkdir(parents=True)
    for sub in ("model", "output/data", "checkpoints"):  # output/data: SageMaker's output_data_dir
        (tree / sub).mkdir(parents=True)
    if code:
        shutil.copytree(code, tree / "code")
    else:
        (tree / "code").mkdir()
    return tree


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llm-runtime local-job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--workdir", required=True, help="each host's SageMaker tree is WORKDIR/algo-i")
    parser.add_argument("--hyperparameters", default=None, help="a JSON file of hyperparameters")
    parser.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="one hyperparameter")
    parser.add_argument("--channel", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--env", action="append", default=[], metavar="NAME", help="pass this variable through")
    parser.add_argument("--code", default=None, help="a directory copied to each host's code "
                        "directory (the job's source, as sagemaker_submit_directory)")
    parser.add_argument("--instance-type", default="ml.c5.xlarge")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds before every host is stopped")
    parser.add_argument("--stop-grace", type=float, default=120.0, help="docker stop -t, as SageMaker's stop")
    parser.add_argument("--job", default=f"llm-runtime-local-{os.getpid()}", help="container name prefix")
    return parser.parse_args(argv)


def _hyperparameters(ns) -> dict:
    values: dict = {}
    if ns.hyperparameters:
        values.update(json.loads(Path(ns.hyperparameters).read_text()))
    for item in ns.hp:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--hp {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(value)
        except ValueError:
            values[key] = value
    return values


def _channels(ns) -> dict[str, Path]:
    out = {}
    for item in ns.channel:
        name, eq, path = item.partition("=")
        if not eq or not Path(path).exists():
            raise ValueError(f"--channel {item!r}: expected NAME=PATH to an existing directory")
        out[name] = Path(path).resolve()
    return out


def main(argv: Sequence[str]) -> int:
    try:
        ns = _parse(argv)
        hyperparameters, channels = _hyperparameters(ns), _channels(ns)
        missing = [name for name in ns.env if name not in os.environ]
        if ns.hosts < 1 or ns.hosts > 254:
            raise ValueError(f"--hosts {ns.hosts}: 1 to 254 hosts (127.0.1.1 to 127.0.1.254)")
        if missing:
            raise ValueError(f"--env {', '.join(missing)}: not set in this environment")
        if ns.code and not Path(ns.code).is_dir():
            raise ValueError(f"--code {ns.code}: not a directory")
    except (OSError, ValueError) as err:
        print(f"llm-runtime local-job: error: {err}", file=sys.stderr)
        return 2
    root = Path(ns.workdir).resolve()
    names = [f"{ns.job}-{host_name(i)}" for i in range(ns.hosts)]
    stop = _Stopper(names, ns.stop_grace)
    previous = signal.signal(signal.SIGTERM, stop.on_signal)
    try:
        for index in range(ns.hosts):
            tree = _write_tree(root, index, ns.hosts, hyperparameters, channels, ns.instance_type, ns.code)
            subprocess.run(docker_run_argv(ns.image, index, ns.hosts, tree, ns.job, ns.env, channels), check=True,
                           capture_output=True, text=True, timeout=120)
            print(f"local-job: started {host_name(index)} ({host_address(index)}) as {names[index]}", flush=True)
        codes = _wait(names, ns.timeout, stop)
    except subprocess.CalledProcessError as err:
        print(f"llm-runtime local-job: docker run failed: {err.stderr.strip()[-400:]}", file=sys.stderr)
        codes = {}
    except KeyboardInterrupt:
        stop.stop_all()
        codes = _wait(names, ns.stop_grace + 30, None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _collect_logs(names, root)
    return _report(root, names, codes)


class _Stopper:
    def __init__(self, names: list[str], grace_s: float):
        self.names, self.grace_s, self.stopping = names, grace_s, False

    def on_signal(self, signum, frame) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        print(f"local-job: stopping every host (docker stop -t {self.grace_s:g})", flush=True)
        subprocess.Popen(["docker", "stop", "-t", str(int(self.grace_s)), *self.names], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


def _wait(names: list[str], timeout_s: float, stop: _Stopper | None) -> dict[str, int]:
    """Each container's exit code; past ``timeout_s`` every host is stopped (as the job's stop)."""
    deadline, codes = time.monotonic() + timeout_s, {}
    while len(codes) < len(names):
        for name in names:
            if name in codes:
                continue
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name],
                                   capture_output=True, text=True, timeout=60).stdout.split()
            if not state or state[0] in ("exited", "dead"):
                codes[name] = int(state[1]) if state else -1
        if time.monotonic() > deadline and stop is not None and not stop.stopping:
            print(f"local-job: the job passed --timeout {timeout_s:g}s", flush=True)
            stop.stop_all()
            deadline = time.monotonic() + stop.grace_s + 30
            stop = None
        elif time.monotonic() > deadline and stop is None:
            subprocess.run(["docker", "kill", *[n for n in names if n not in codes]], capture_output=True, timeout=60)
            codes.update({n: 137 for n in names if n not in codes})
        time.sleep(0.5)
    return codes


def _collect_logs(names: list[str], root: Path) -> None:
    for index, name in enumerate(names):
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, timeout=120)
        (root / f"{host_name(index)}.log").write_text(logs.stdout + logs.stderr)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


def _report(root: Path, names: list[str], codes: Mapping[str, int]) -> int:
    """One line per host (exit code, model files, failure), and a summary JSON; the job's code."""
    summary, first_bad = {}, 0
    for index, name in enumerate(names):
        host, tree, code = host_name(index), root / host_name(index), codes.get(name)
        model = sorted(p.name for p in (tree / "model").iterdir()) if (tree / "model").is_dir() else []
        failure = tree / "output" / "failure"
        reason = failure.read_text().strip().splitlines()[:1] if failure.is_file() else []
        summary[host] = {"exit_code": code, "model": model, "failure": reason[0] if reason else None,
                         "log": str(root / f"{host}.log")}
        print(f"local-job: {host}: exit {code}, model {len(model)} file(s)"
              f"{', failure: ' + reason[0] if reason else ''}", flush=True)
        if code and not first_bad:
            first_bad = code
    (root / "local-job.json").write_text(json.dumps(summary, indent=1))
    return first_bad if len(codes) == len(names) else (first_bad or 1)
