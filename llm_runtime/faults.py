"""Fault injection for tests and drills: ``LLM_RUNTIME_FAULT``, off unless set.

``kind:key=value,...``, several faults separated by ``;``. Kinds:

- ``hang``: sleep, as a stuck rank would (the watchdog and the collective timeouts must end it);
- ``kill``: SIGKILL this process, as a crashed host would;
- ``slow`` / ``corrupt`` (phase ``health``): the health check's matmul runs 10x slower /
  returns a wrong result on that rank, as a degraded / broken GPU would;
- ``slow`` with phase ``step`` and ``factor=F``: that rank's training step computes F x as long
  (it is busy, not asleep: a slow GPU or a throttled host), for the straggler detection;
- ``nan`` (phase ``step``): that step's loss is multiplied by NaN before the backward, so its
  gradients are poisoned too, as a numeric blow-up would;
- ``spike`` with ``factor=F`` (phase ``step``): that step's loss, and so its gradients, are
  multiplied by F, as a bad batch would;
- ``wipe`` (phase ``launch``, ``rank`` the node rank): that host's launcher removes the run's
  node-local checkpoint directory before anything starts (its own files and the peer replicas it
  holds), as a replaced host's fresh disk would; needs checkpoint.uri (the store keeps every
  committed checkpoint), so the resume rehearses the recovery from the peer and S3.

Keys: ``rank`` (default: every rank), ``step`` (default: any step), ``phase`` (where it fires:
``step`` (default, at the start of the forward/backward), ``data`` (while waiting for the batch),
``checkpoint`` (in the node's background checkpoint upload, so on a local rank 0), ``health``, or
``launch`` (in each host's launcher before any worker starts; ``rank`` is then the node rank)),
``restart`` (the elastic restart it fires in, default 0: a restarted job runs clean), and
``factor`` (``slow`` at phase ``step``, > 1; ``spike``, > 0). ``nan`` and ``spike`` apply to
every rank unless ``rank`` says which.
Examples: ``LLM_RUNTIME_FAULT=hang:rank=1,step=3,phase=data``, ``slow:rank=1,factor=3,phase=step``,
``wipe:rank=1,phase=launch``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .workerenv import restart_count

__all__ = ["Fault", "FaultError", "active", "drilled_loss", "inject", "loss_drill", "loss_factor", "parse_faults",
           "slowdown", "wiped_disk"]

log = logging.getLogger(__name__)
KINDS = ("hang", "kill", "slow", "corrupt", "nan", "spike", "wipe")
PHASES = ("step", "data", "checkpoint", "health", "launch")
_INT_KEYS = ("rank", "step", "restart")


class FaultError(ValueError):
    """A malformed LLM_RUNTIME_FAULT; the message quotes it."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None = None
    step: int | None = None
    phase: str = "step"
    restart: int = 0
    factor: float = 0.0

    def fires(self, rank: int, step: int | None, phase: str = "step", restart: int = 0) -> bool:
        return ((self.rank is None or self.rank == rank) and (self.step is None or self.step == step)
                and self.phase == phase and self.restart == restart)


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition(":")
        if kind not in KINDS:
            raise FaultError(f"LLM_RUNTIME_FAULT={text!r}: {kind!r} is not one of {', '.join(KINDS)}")
        values: dict = {}
        for pair in filter(None, args.split(",")):
            key, eq, value = (part.strip() for part in pair.partition("="))
            if key == "phase" and value in PHASES:
                values[key] = value
            elif key in _INT_KEYS and eq and value.lstrip("-").isdigit():
                values[key] = int(value)
            elif key == "factor" and eq and _number(value) > 0:
                values[key] = float(value)
            else:
                raise FaultError(f"LLM_RUNTIME_FAULT={text!r}: {pair!r} is not rank=N, step=N, restart=N, "
                                 f"factor=F or phase={'|'.join(PHASES)}")
        fault = Fault(kind, **values)
        problem = _mismatch(fault)
        if problem:
            raise FaultError(f"LLM_RUNTIME_FAULT={text!r}: {problem}")
        faults.append(fault)
    return faults


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _mismatch(fault: Fault) -> str:
    """Why ``fault``'s kind, phase and factor do not go together ('' when they do; pure)."""
    slow_step = fault.kind == "slow" and fault.phase == "step"
    if fault.kind == "wipe":
        ok = fault.phase == "launch" and not fault.factor and fault.step is None
        return "" if ok else "wipe applies to phase=launch only, with rank=N (the node rank) and no step or factor"
    if fault.kind in ("nan", "spike"):
        if fault.phase != "step":
            return f"{fault.kind} applies to phase=step only"
        if (fault.kind == "spike") != bool(fault.factor):
            return "spike needs factor=F, and nan takes none"
        return ""
    if fault.factor and not slow_step:
        return "factor=F applies to slow at phase=step and to spike only"
    if slow_step:
        return "" if fault.factor > 1 else "slow at phase=step needs factor=F (> 1)"
    if (fault.kind in ("slow", "corrupt")) != (fault.phase == "health"):
        return ("slow and corrupt apply to phase=health (slow also to phase=step with factor=F), and "
                "phase=health takes only slow or corrupt")
    return ""


def loss_factor(rank: int, step: int, env: Mapping[str, str] | None = None) -> float:
    """What the ``nan`` / ``spike`` drills multiply this step's loss by (1.0: nothing)."""
    factor = 1.0
    for fault in active(rank, step, "step", env):
        if fault.kind == "nan":
            factor *= float("nan")
        elif fault.kind == "spike":
            factor *= fault.factor
    return factor


_LOSS_FACTOR = [1.0]


@contextlib.contextmanager
def loss_drill(factor: float):
    """Within it, :func:`drilled_loss` multiplies the built-in trainer's losses by ``factor``."""
    _LOSS_FACTOR[0] = factor
    try:
        yield
    finally:
        _LOSS_FACTOR[0] = 1.0


def drilled_loss(loss):
    """``loss`` as the drill in force leaves it (unchanged outside :func:`loss_drill`)."""
    factor = _LOSS_FACTOR[0]
    return loss if factor == 1.0 else loss * factor


def slowdown(rank: int, step: int, env: Mapping[str, str] | None = None) -> float:
    """The ``slow`` drill's factor for this rank's training step (1.0: none)."""
    factors = [fault.factor for fault in active(rank, step, "step", env) if fault.kind == "slow"]
    return max(factors, default=1.0)


def wiped_disk(node_rank: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether the ``wipe`` drill takes this node's local checkpoints away at launch."""
    return any(fault.kind == "wipe" for fault in active(node_rank, None, "launch", env))


def active(rank: int, step: int | None, phase: str, env: Mapping[str, str] | None = None) -> list[Fault]:
    """The faults that fire for this rank, step and phase (none without LLM_RUNTIME_FAULT)."""
    env = os.environ if env is None else env
    text = env.get("LLM_RUNTIME_FAULT", "")
    if not text:
        return []
    restart = restart_count(env)
    return [fault for fault in parse_faults(text) if fault.fires(rank, step, phase, restart)]


def inject(rank: int, step: int | None, phase: str = "step", env: Mapping[str, str] | None = None) -> None:
    """Fire the hang and kill faults that match (a no-op without LLM_RUNTIME_FAULT)."""
    for fault in active(rank, step, phase, env):
        if fault.kind in ("hang", "kill"):
            log.warning("LLM_RUNTIME_FAULT: %s on rank %d at step %s in phase %s", fault.kind, rank, step, phase)
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600 * 24)  # hang: the job's timeouts must end it
