"""The CLI's stand-alone commands (no launch, no process group): prepare-data, checkpoints,
verify-efa, metric-definitions and report. ``cli.py`` dispatches to them."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .cluster import detect_here

__all__ = ["UsageError", "cmd_checkpoints", "cmd_metric_definitions", "cmd_prepare_data", "cmd_report",
           "cmd_verify_efa", "prepare_data_parser"]


class UsageError(ValueError):
    """Bad input to a command: one line on stderr, exit 2."""


def cmd_metric_definitions(args: Sequence[str]) -> int:
    from .metrics import metric_definitions

    parser = argparse.ArgumentParser(prog="llm-runtime metric-definitions")
    parser.add_argument("--json", action="store_true", help="the list as JSON (SageMaker's MetricDefinitions)")
    ns = parser.parse_args(args)
    definitions = metric_definitions()
    if ns.json:
        print(json.dumps(definitions, indent=2))
    else:
        for item in definitions:
            print(f"{item['Name']:<32} {item['Regex']}")
    return 0


def cmd_report(args: Sequence[str]) -> int:
    from .report import ReportError, load_metrics, plot

    parser = argparse.ArgumentParser(prog="llm-runtime report")
    parser.add_argument("metrics", help="a metrics JSON lines file (metrics.jsonl)")
    parser.add_argument("--out", default="report.png")
    parser.add_argument("--title", default="")
    ns = parser.parse_args(args)
    try:
        path = plot(load_metrics(ns.metrics), ns.out, title=ns.title)
    except ReportError as err:
        raise UsageError(str(err)) from None
    print(f"report: {path}")
    return 0


def prepare_data_parser() -> argparse.ArgumentParser:
    """``llm-runtime prepare-data``'s options (the README and the usage text list each of them)."""
    from .data.prepare import DEFAULT_PREFIXES

    parser = argparse.ArgumentParser(prog="llm-runtime prepare-data")
    parser.add_argument("--input", nargs="+", required=True, action="extend", help="files, globs or directories")
    parser.add_argument("--output", required=True, help="output directory or s3://bucket/prefix")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--tokenizer", default="byte")
    parser.add_argument("--shard-size", default="256MB")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    parser.add_argument("--text-field", default="text", help="the text field of JSON lines inputs")
    parser.add_argument("--prefixes", type=int, default=DEFAULT_PREFIXES,
                        help=f"spread shards over this many key prefixes (default {DEFAULT_PREFIXES})")
    parser.add_argument("--host-index", type=int, default=None, help="this host's index (default: detected)")
    parser.add_argument("--num-hosts", type=int, default=None, help="hosts sharing the work (default: detected)")
    parser.add_argument("--merge-timeout", type=float, default=3600.0,
                        help="seconds host 0 waits for the other hosts' partial indexes")
    return parser


def cmd_prepare_data(args: Sequence[str]) -> int:
    from .data.prepare import PrepareError, parse_size, prepare

    ns = prepare_data_parser().parse_args(args)
    host, hosts = ns.host_index, ns.num_hosts
    if host is None or hosts is None:
        info = detect_here()
        host = info.node_rank if host is None else host
        hosts = info.num_nodes if hosts is None else hosts
    try:
        summary = prepare(ns.input, ns.output, seq_len=ns.seq_len, shard_size=parse_size(ns.shard_size),
                          workers=ns.workers, tokenizer=ns.tokenizer, text_field=ns.text_field,
                          prefixes=ns.prefixes, host_index=host, num_hosts=hosts, merge_timeout_s=ns.merge_timeout)
    except PrepareError as err:
        raise UsageError(str(err)) from None
    print(summary.line(), flush=True)
    return 0


def cmd_checkpoints(args: Sequence[str]) -> int:
    from .checkpoint.inspect import main as checkpoints_main
    from .storage import StorageError

    try:
        return checkpoints_main(args)
    except (ValueError, StorageError) as err:
        raise UsageError(str(err)) from None


def cmd_verify_efa(args: Sequence[str]) -> int:
    from .verify_efa import analyse, exit_code

    parser = argparse.ArgumentParser(prog="llm-runtime verify-efa")
    parser.add_argument("logfile", help="a log with NCCL_DEBUG=INFO lines (several hosts' logs may be joined)")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args(args)
    try:
        with open(ns.logfile, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as err:
        raise UsageError(f"cannot read {ns.logfile}: {err.strerror}") from None
    report = analyse(text)
    print(report.to_json() if ns.json else report.summary(), flush=True)
    return exit_code(report)
