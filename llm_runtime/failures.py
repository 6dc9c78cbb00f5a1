"""Failure records: what a failed worker leaves behind, and how an error is classified.

A rank's record is JSON under ``<output_dir>/failures/rank-N.json`` (with its stacks after a
stall); the host's one-line record is ``<output_dir>/failure``, written once, by the first rank on
the host to fail: on SageMaker ``/opt/ml/output/failure``, the text shown as the job's failure
reason. The watchdog (watchdog.py) decides when to write; this module says what and where.
"""
from __future__ import annotations

import faulthandler
import io
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .paths import failure_file, failures_dir
from .secrets import redact

__all__ = ["FailureRecord", "dump_stacks", "is_collective_timeout", "log_nccl_warnings", "lost_peer",
           "set_aside_failure", "suspects", "where", "write_record"]

log = logging.getLogger(__name__)


def is_collective_timeout(err: BaseException) -> bool:
    """A collective (gloo, NCCL) or the data loader gave up waiting: a stall, not a bug."""
    text = str(err).lower()
    return isinstance(err, TimeoutError) or (isinstance(err, RuntimeError) and (
        "timed out" in text or "operation timeout" in text))


def set_aside_failure(output_dir: str, label: str) -> str:
    """Move ``output_dir/failure`` (an earlier run's or attempt's) to ``failures/<label>-<time>.txt``,
    so the file only ever describes this run; returns the new path, or "" when there was none."""
    failure = Path(failure_file(output_dir)) if output_dir else None
    if failure is None or not failure.exists():
        return ""
    try:
        target = Path(failures_dir(output_dir)) / f"{label}-{int(time.time())}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        failure.replace(target)
        return str(target)
    except OSError as err:
        log.warning("could not move the failure record %s aside: %s", failure, err)
        return ""


def lost_peer(err: BaseException) -> bool:
    """A collective failed because a peer process went away (gloo: connection closed/reset)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in ("closed by peer", "reset by peer", "broken pipe"))


def where(frame) -> tuple[str, bool]:
    """(innermost ``file:line function`` of a thread's stack, whether it waits inside torch.distributed)."""
    if frame is None:
        return "", False
    stack = traceback.extract_stack(frame)
    last = stack[-1]
    in_collective = any("/torch/distributed/" in entry.filename.replace("\\", "/") for entry in stack[-15:])
    return f"{os.path.basename(last.filename)}:{last.lineno} {last.name}", in_collective


def suspects(records: Sequence[Mapping], world_size: int = 0) -> list[int]:
    """The ranks to blame: those stalled outside a collective (the others wait for them); when every
    reporter waits in one, the ranks that did not report (frozen, or their watchdog could not run);
    else all of them (the network)."""
    outside = [r for r in records if not r.get("in_collective")]
    if outside:
        return sorted({int(r["rank"]) for r in outside})
    missing = sorted(set(range(world_size)) - {int(r["rank"]) for r in records})
    return missing or sorted({int(r["rank"]) for r in records})


@dataclass
class FailureRecord:
    kind: str
    """``stalled`` (watchdog / timeout) or ``error``."""
    host: str
    rank: int
    step: int
    phase: str
    reason: str
    stalled_s: float = 0.0
    timeout_s: float = 0.0
    where: str = ""
    in_collective: bool = False
    time: float = field(default_factory=time.time)
    suspects: list[int] = field(default_factory=list)

    def line(self) -> str:
        parts = [f"llm-runtime {self.kind}: host={self.host} rank={self.rank} step={self.step} phase={self.phase}"]
        if self.kind == "stalled":
            parts.append(f"stalled_s={self.stalled_s:.0f} timeout_s={self.timeout_s:g}")
        if self.where:
            parts.append(f"where={self.where.replace(' ', ':')}" + (" (in a collective)" if self.in_collective else ""))
        if self.suspects:
            parts.append("suspect_ranks=" + ",".join(map(str, self.suspects)))
        parts.append(f"reason={self.reason}")
        return redact(" ".join(parts))


def dump_stacks(stream) -> None:
    """Every thread's stack (faulthandler: works even when the main thread holds the GIL in C code);
    a stream without a file descriptor (a notebook's) falls back to the process's stderr."""
    try:
        faulthandler.dump_traceback(file=stream, all_threads=True)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        try:
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            pass


def log_nccl_warnings(limit: int = 20) -> None:
    """NCCL's WARN lines from this process's NCCL_DEBUG_FILE (the runtime sends NCCL's INFO output
    there on EFA hosts), so a failure's NCCL errors reach the job log too."""
    template = os.environ.get("NCCL_DEBUG_FILE", "")
    if not template:
        return
    import socket

    from .verify_efa import debug_file

    path = debug_file(template, socket.gethostname(), os.getpid())
    try:
        with open(path, errors="replace") as handle:
            warnings = [line.rstrip() for line in handle if "NCCL WARN" in line]
    except OSError:
        return
    for line in warnings[-limit:]:
        log.error("nccl: %s", redact(line))


def write_record(output_dir: str, rank: int, record: FailureRecord, summary: FailureRecord,
                 stacks: bool = False) -> None:
    """The rank's record (JSON, and its stacks) under output_dir/failures, and the host's one-line
    ``output_dir/failure``: ``summary`` from the first rank on the host to fail. No output dir: nothing."""
    if not output_dir:
        return
    try:
        folder = Path(failures_dir(output_dir))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{rank:05d}.json").write_text(redact(json.dumps(asdict(record))) + "\n")
        if stacks:
            with open(folder / f"rank-{rank:05d}.stacks.txt", "w") as sink:
                dump_stacks(sink)
        fd = os.open(failure_file(output_dir), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as sink:
            sink.write(summary.line() + "\n")
    except FileExistsError:
        pass
    except OSError as err:
        log.warning("could not write the failure record under %s: %s", output_dir, err)
