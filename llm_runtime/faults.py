"""Fault injection for tests and drills: ``LLM_RUNTIME_FAULT``, off unless set.

``kind:key=value,...`` with kind ``hang`` (sleep, as a stuck rank would) or ``kill`` (SIGKILL
this process, as a crashed host would), and keys ``rank`` (default: every rank) and ``step``
(the training step at whose start the fault fires). Several faults are separated by ``;``.
Example: ``LLM_RUNTIME_FAULT=hang:rank=1,step=3``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Fault", "FaultError", "inject", "parse_faults"]

log = logging.getLogger(__name__)
KINDS = ("hang", "kill")


class FaultError(ValueError):
    """A malformed LLM_RUNTIME_FAULT; the message quotes it."""


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int | None = None
    step: int | None = None

    def fires(self, rank: int, step: int) -> bool:
        return (self.rank is None or self.rank == rank) and (self.step is None or self.step == step)


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, _, args = item.partition(":")
        if kind not in KINDS:
            raise FaultError(f"LLM_RUNTIME_FAULT={text!r}: {kind!r} is not one of {', '.join(KINDS)}")
        values: dict[str, int] = {}
        for pair in filter(None, args.split(",")):
            key, eq, value = pair.partition("=")
            if key not in ("rank", "step") or not eq or not value.strip().lstrip("-").isdigit():
                raise FaultError(f"LLM_RUNTIME_FAULT={text!r}: {pair!r} is not rank=N or step=N")
            values[key] = int(value)
        faults.append(Fault(kind, **values))
    return faults


def inject(rank: int, step: int, env: Mapping[str, str] | None = None) -> None:
    """Fire the faults that match this rank and step (no-op without LLM_RUNTIME_FAULT)."""
    text = (os.environ if env is None else env).get("LLM_RUNTIME_FAULT", "")
    if not text:
        return
    for fault in parse_faults(text):
        if fault.fires(rank, step):
            log.warning("LLM_RUNTIME_FAULT: %s on rank %d at step %d", fault.kind, rank, step)
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600 * 24)  # hang: a stuck rank; the job's timeouts must end it
