"""``skipped_batches.json``: the run's bad batches, beside its checkpoints' manifests.

One object of its own (manifests are immutable), rewritten whole by rank 0 at each rollback:
the global steps whose batches every later attempt skips (a resume, a retry, another
data-parallel size), the checkpoints that must never be resumed from (taken after a bad step),
and the rollbacks so far (``train.max_rollbacks`` bounds them across attempts).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

__all__ = ["SKIPS", "Skips", "read_skips", "rollback_target", "with_rollback", "write_skips"]

SKIPS = "skipped_batches.json"


@dataclass(frozen=True)
class Skips:
    skipped: tuple[int, ...] = ()
    poisoned: tuple[int, ...] = ()
    """Checkpoint steps taken after a bad step: never resumed from."""
    rollbacks: int = 0
    events: tuple[dict, ...] = field(default=())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "events": list(self.events)}, indent=1) + "\n"

    @classmethod
    def parse(cls, text: str, where: str) -> "Skips":
        try:
            data = json.loads(text)
            return cls(skipped=tuple(sorted({int(s) for s in data["skipped"]})),
                       poisoned=tuple(sorted({int(s) for s in data["poisoned"]})), rollbacks=int(data["rollbacks"]),
                       events=tuple(data.get("events", ())))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where} is not a skipped-batches record ({err}); fix or remove it (it lists the "
                             "batches this run must skip)") from None


def rollback_target(skips: Skips, step: int, committed: list[int]) -> int:
    """The newest committed checkpoint before bad step ``step`` that is not poisoned (0: none; pure)."""
    return max((s for s in committed if s < step and s not in skips.poisoned), default=0)


def with_rollback(skips: Skips, step: int, reason: str, committed: list[int]) -> Skips:
    """``skips`` plus a rollback for bad step ``step`` (pure): the step is skipped, and every
    committed checkpoint at or after it is poisoned."""
    poisoned = sorted(set(skips.poisoned) | {s for s in committed if s >= step})
    event = {"step": step, "reason": reason, "rolled_back_to": rollback_target(skips, step, committed),
             "time": time.time()}
    return Skips(skipped=tuple(sorted(set(skips.skipped) | {step})), poisoned=tuple(poisoned),
                 rollbacks=skips.rollbacks + 1, events=(*skips.events, event))


def read_skips(store) -> Skips:
    text = store.read_text(SKIPS)
    return Skips() if text is None else Skips.parse(text, store.url(SKIPS))


def write_skips(store, skips: Skips) -> None:
    store.write_text(SKIPS, skips.to_json())
