"""``llm-runtime`` / ``python -m llm_runtime``: launch, train and info.

Every subcommand checks its input (cluster files, config, launch options) before any
process or process group exists, and turns a bad input into one line on stderr and
exit status 2.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import netenv
from .cluster import ClusterError, ClusterInfo, detect_here
from .cluster import sagemaker as sm
from .config import Config, ConfigError, load_config, parse_cli_overrides, validate
from .paths import code_dir, job_paths
from .launch import LaunchError, Target, mpi_export_names, plan_launch, sagemaker_target
from .spawn import execute
from .cli_tools import (UsageError, cmd_checkpoints, cmd_metric_definitions, cmd_prepare_data, cmd_report,
                        cmd_verify_efa)
from .secrets import RedactingFilter, RedactingStream, install_excepthook, is_secret

__all__ = ["main"]

log = logging.getLogger(__name__)

USAGE = """usage: llm-runtime COMMAND [options]

commands:
  launch [--nproc-per-node N] [--max-restarts K] [--cluster KIND] [--mpi]
         [--config FILE.toml] [--group-command GROUP=CMD] (train | -m MODULE | SCRIPT.py) [ARGS...]
      start the job's workers on this host (SageMaker, torchrun, MPI or local)
  train [--nproc-per-node N] [--cluster KIND] [--config FILE.toml] [--section.key=VALUE ...]
      the built-in trainer: a small Llama-style model on the bundled text
  healthcheck [--nproc-per-node N] [--cluster KIND] [--health.key=VALUE ...]
      every device: memory, a matmul checked and timed; every rank: all-reduce sums and bandwidth;
      names stragglers; exit 87 when a node is bad (see README "Exit codes")
  info [--json] [--cluster KIND]
      the detected cluster and the network environment plan
  metric-definitions [--json]
      SageMaker metric definitions (Name, Regex) that read the training log's metrics line
  report METRICS.jsonl [--out report.png]
      loss, tokens/s and checkpoint blocked time against step, in one image
  prepare-data --input PATH|s3://...  --output DIR|s3://... --seq-len N [--tokenizer byte|tokenizer.json]
               [--shard-size 256MB] [--workers K] [--text-field text] [--prefixes N]
               [--host-index I --num-hosts H] [--merge-timeout 3600]  (hosts default to the detected cluster)
      tokenize text / jsonl files (.gz, .zst) into webdataset token shards with index.json
  checkpoints (list | verify [--step N]) URI [--run-id ID]
      a job's checkpoints under checkpoint.uri: complete or not, objects, bytes; verify checksums
  local-job --image IMAGE --workdir DIR [--hosts N] [--hp KEY=VALUE ...] [--hyperparameters FILE.json]
            [--channel NAME=PATH ...] [--env NAME ...] [--timeout S] [--stop-grace S]
      run N containers of IMAGE as SageMaker hosts algo-1..N (127.0.1.i, host network, each its own
      SageMaker tree DIR/algo-i) with SageMaker's `train`; collects exit codes, models and failure files
  verify-efa LOGFILE [--json]
      which network NCCL chose (EFA, EFA + GPUDirect RDMA, or a socket fallback) from NCCL_DEBUG=INFO
      output; exit 0 on EFA, 1 on a fallback, 2 when the log does not say
"""

# Launcher options shared by `launch` and `train`, mapped onto config keys.
_LAUNCH_OPTIONS = {"--nproc-per-node": "launch.nproc_per_node", "--max-restarts": "launch.max_restarts",
                   "--cluster": "launch.cluster"}


def _split_launcher_options(args: Sequence[str], *, stop_at_target: bool):
    """Take the launcher's own options off the front; return (cli pairs, toml, extras, rest)."""
    pairs: list[tuple[str, str]] = []
    toml: str | None = None
    flags: dict[str, object] = {"mpi": False, "group_commands": {}}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        takes_value = name in _LAUNCH_OPTIONS or name in ("--config", "--group-command")
        if takes_value:
            if not eq:
                if i + 1 >= len(args):
                    raise UsageError(f"{name} needs a value")
                i += 1
                value = args[i]
            if name == "--config":
                toml = value
            elif name == "--group-command":
                group, sep, command = value.partition("=")
                if not sep or not group or not command:
                    raise UsageError(f"--group-command expects GROUP=COMMAND, got {value!r}")
                flags["group_commands"][group] = command
            else:
                if name == "--nproc-per-node" and not (value.isdigit() and int(value) >= 1):
                    raise UsageError(f"--nproc-per-node must be an integer >= 1, got {value!r}")
                pairs.append((_LAUNCH_OPTIONS[name], value))
        elif arg == "--mpi":
            flags["mpi"] = True
        elif stop_at_target:
            rest = list(args[i:])
            break
        else:
            rest.append(arg)
        i += 1
    return pairs, toml, flags, rest


def _target_from(rest: list[str]) -> Target:
    if not rest:
        raise UsageError("launch needs a target: train, -m MODULE or SCRIPT.py")
    if rest[0] == "-m":
        if len(rest) < 2:
            raise UsageError("-m needs a module name")
        return Target(module=rest[1], args=tuple(rest[2:]))
    if rest[0].startswith("-"):
        raise UsageError(f"unknown launch option {rest[0]!r}")
    if not Path(rest[0]).is_file():
        raise UsageError(f"script {rest[0]!r} does not exist")
    return Target(script=rest[0], args=tuple(rest[1:]))


def _detect(config: Config) -> ClusterInfo:
    return detect_here(kind=config.launch.cluster or None)


def _env_plan(info: ClusterInfo, config: Config) -> tuple[netenv.EnvPlan, netenv.Fabric]:
    fabric = netenv.probe_fabric(overrides=netenv.config_overrides(**vars(config.netenv)))
    # The flight recorder serves NCCL's dump on timeout; on a CPU-only host it would only record
    # every gloo collective (measured: ~2-3% of an FSDP step on 2 CPU workers) for nothing.
    return netenv.plan(info, fabric, timeout_dump=fabric.gpus > 0, verify_efa=netenv.verify_planned(config.netenv.verify_efa, os.environ)), fabric


def _check_faults(warn: bool = True) -> list:
    from .faults import FaultError, parse_faults

    try:
        faults = parse_faults(os.environ.get("LLM_RUNTIME_FAULT", ""))
    except FaultError as err:
        raise UsageError(str(err)) from None
    if faults and warn:
        log.warning("LLM_RUNTIME_FAULT=%s is set: faults will be injected", os.environ["LLM_RUNTIME_FAULT"])
    return faults


def _launch(info: ClusterInfo, config: Config, target: Target, flags: dict, hyper: dict) -> int:
    mpi = config.launch.mpi or flags["mpi"] or bool(hyper.get("sagemaker_mpi_enabled"))
    nproc = config.launch.nproc_per_node or int(hyper.get("sagemaker_mpi_num_of_processes_per_host") or 0)
    if target.module == "llm_runtime" and target.args[:1] == ("train",) and info.trains and not info.is_worker:
        from .data.build import keep_index_copy
        from .train import check_job

        # Every config error of the built-in trainer surfaces here, once, not in N workers.
        per_node = nproc or info.nproc_per_node
        faults = _check_faults(warn=False)
        paths = job_paths(config, info.kind, os.environ)
        *_, data_plan = check_job(config, per_node * max(1, info.num_nodes), nproc_per_node=per_node,
                                  num_nodes=info.num_nodes, report=True, paths=paths, stage_model=True)
        keep_index_copy(data_plan, os.environ)  # this host's workers read the launcher's copy
        if faults:
            log.warning("LLM_RUNTIME_FAULT=%s is set: faults will be injected", os.environ["LLM_RUNTIME_FAULT"])
        if any(fault.kind == "wipe" for fault in faults) and not config.checkpoint.uri:
            raise UsageError(f"LLM_RUNTIME_FAULT={os.environ['LLM_RUNTIME_FAULT']!r}: wipe needs checkpoint.uri; "
                             "without it the node-local checkpoints are the only copy and the drill would lose them")
    else:
        validate(config)  # a user program's config keys, and every launcher key
    if target.module == "llm_runtime" and not info.is_worker:
        from .failures import set_aside_failure

        set_aside_failure(job_paths(config, info.kind, os.environ).output_dir, "previous")
    env_plan, fabric = _env_plan(info, config)
    plan = plan_launch(info, target, nproc=nproc, max_restarts=config.launch.max_restarts, mpi=mpi,
                       env_exports=mpi_export_names(os.environ, netenv.mpi_exports(env_plan)),
                       group_commands=flags["group_commands"],
                       ssh=not os.environ.get("OMPI_MCA_plm_rsh_agent"))
    if plan.action not in ("exec", "idle"):
        for line in netenv.notes(info, fabric):
            print(f"llm-runtime: {line}", file=sys.stderr)
        log.info("network environment:\n%s", netenv.format_table(_visible(netenv.resolve(env_plan, os.environ))))
        netenv.apply(env_plan, os.environ)
    agent = None
    if plan.action == "torchrun" and target.module == "llm_runtime" and target.args[:1] == ("train",):
        from .checkpoint.agent import start_agent

        agent = start_agent(config, job_paths(config, info.kind, os.environ), max(0, info.node_rank),
                            num_nodes=max(1, info.num_nodes), host=info.current_host or "")
    return execute(plan, info, mpi_wait_timeout_s=config.launch.mpi_wait_timeout_s,
                   stop_deadline_s=config.launch.stop_deadline_s, agent=agent)


def cmd_launch(args: Sequence[str]) -> int:
    pairs, toml, flags, rest = _split_launcher_options(args, stop_at_target=True)
    hyper = sm.read_hyperparameters(os.environ)
    program = None
    if rest and rest[0] in RUNTIME_COMMANDS:  # `docker run IMAGE healthcheck`, `... info` (ENTRYPOINT is launch)
        options = list(args[:len(args) - len(rest)]) if rest[0] == "healthcheck" else []
        return COMMANDS[rest[0]]([*options, *rest[1:]])
    if rest and rest[0] == "train":
        # The SageMaker contract: `docker run IMAGE train` -> the job's program, else the built-in trainer.
        program = sagemaker_target(hyper, os.environ, code_dir(os.environ))
        target = program or Target(module="llm_runtime",
                                   args=("train", *(["--config", toml] if toml else []), *rest[1:]))
    else:
        target = _target_from(rest)
    builtin = program is None and bool(rest) and rest[0] == "train"
    # The built-in trainer owns every section.key hyperparameter; a user program owns its own.
    config = load_config(toml_path=toml, env=os.environ, hyperparameters=hyper, cli=pairs,
                         strict_hyperparameters=builtin)
    return _launch(_detect(config), config, target, flags, hyper)


def cmd_train(args: Sequence[str]) -> int:
    pairs, toml, flags, rest = _split_launcher_options(args, stop_at_target=False)
    overrides = parse_cli_overrides(rest)
    hyper = sm.read_hyperparameters(os.environ)
    config = load_config(toml_path=toml, env=os.environ, hyperparameters=hyper, cli=pairs + overrides)
    info = _detect(config)
    if info.is_worker:
        from .spawn import default_sigterm
        from .train import main as train_main

        default_sigterm()
        return train_main(config)
    return _launch(info, config, Target(module="llm_runtime", args=("train", *args)), flags, hyper)


def cmd_healthcheck(args: Sequence[str]) -> int:
    pairs, toml, flags, rest = _split_launcher_options(args, stop_at_target=False)
    config = load_config(toml_path=toml, env=os.environ, hyperparameters=sm.read_hyperparameters(os.environ),
                         cli=pairs + parse_cli_overrides(rest), strict_hyperparameters=False)
    info = _detect(config)
    if info.is_worker:
        from .health import run_healthcheck
        from .runtime import run_worker
        from .spawn import default_sigterm

        default_sigterm()
        return run_worker(config, run_healthcheck)
    _check_faults()
    return _launch(info, config, Target(module="llm_runtime", args=("healthcheck", *args)), flags, {})


def cmd_info(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="llm-runtime info")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cluster", default=None)
    parser.add_argument("--config", default=None)
    ns = parser.parse_args(args)
    config = load_config(toml_path=ns.config, env=os.environ, hyperparameters=sm.read_hyperparameters(os.environ),
                         cli=[("launch.cluster", ns.cluster)] if ns.cluster else [], strict_hyperparameters=False)
    info = _detect(config)
    env_plan, fabric = _env_plan(info, config)
    resolved = _visible(netenv.resolve(env_plan, os.environ))
    if ns.json:
        print(json.dumps({
            "cluster": info.to_dict(),
            "env": {k: {"value": r.value, "reason": r.reason, "source": r.source} for k, r in resolved.items()},
            "notes": netenv.notes(info, fabric),
        }, indent=2))
        return 0
    for key, value in info.to_dict().items():
        print(f"{key:>18}: {value}")
    print()
    print(netenv.format_table(resolved))
    for line in netenv.notes(info, fabric):
        print(f"note: {line}")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and embedders swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _visible(resolved: dict) -> dict:
    return {name: entry for name, entry in resolved.items() if not is_secret(name)}


def _launcher_logging() -> None:
    """The launcher's own messages go to stderr; a worker's runtime.init replaces this."""
    logger = logging.getLogger("llm_runtime")
    if not logger.handlers:
        handler = _StderrHandler()
        handler._llm_runtime = True  # type: ignore[attr-defined]  # runtime.init replaces it in workers
        handler.addFilter(RedactingFilter())
        handler.setFormatter(logging.Formatter("llm-runtime: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def cmd_local_job(args: Sequence[str]) -> int:
    from .local_job import main as local_job

    return local_job(args)


COMMANDS = {"launch": cmd_launch, "train": cmd_train, "healthcheck": cmd_healthcheck, "info": cmd_info,
            "metric-definitions": cmd_metric_definitions, "report": cmd_report, "prepare-data": cmd_prepare_data,
            "checkpoints": cmd_checkpoints, "verify-efa": cmd_verify_efa, "local-job": cmd_local_job}


#: Commands `launch` passes on (the image's ENTRYPOINT is `llm-runtime launch`).
RUNTIME_COMMANDS = ("healthcheck", "info", "metric-definitions", "verify-efa", "checkpoints", "report", "prepare-data")


#: Commands whose process may be the host's launcher (SIGTERM handled from the first line).
LAUNCHING = ("launch", "train", "healthcheck")


def _torch_too_old() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    from .launch import torch_too_old

    try:
        return torch_too_old(version("torch"))
    except PackageNotFoundError:
        return "torch is not installed: pip install 'torch>=2.9'"


def entry() -> int:
    """The console script and ``python -m llm_runtime``: :func:`main`, then a quick exit.

    The interpreter's last garbage collections walk every object that importing torch created,
    about 0.5 s per process on a slow core, paid by the launcher and by every worker at the end of
    each job and restart. Frozen objects are not walked; finalizers and atexit handlers still run.
    """
    code = main()
    gc.freeze()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"llm-runtime: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    if argv[0] in LAUNCHING:
        from .spawn import early_sigterm

        early_sigterm()
        too_old = _torch_too_old()
        if too_old:
            print(f"llm-runtime {argv[0]}: error: {too_old}", file=sys.stderr)
            return 2
    _launcher_logging()
    install_excepthook()
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)  # prints, tracebacks
    try:
        return command(argv[1:])
    except (ClusterError, ConfigError, LaunchError, UsageError) as err:  # bad input: one line, exit 2
        print(f"llm-runtime {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    finally:
        sys.stdout, sys.stderr = streams
