"""The node's commit agent: a thread of ``llm-runtime launch`` that commits this node's checkpoints.

torch.distributed.run kills every worker of a node when one fails, local rank 0 and its upload
thread with them. The agent lives in the launcher instead: it watches the node's tier-1
directory for saves planned after it started (``.save.json``), claims each one (``.committing``)
and runs :func:`.commit.commit` for it, so a save whose done markers are all written is committed
even when a worker dies right after. Saves that were pending before it started are left to the
workers' ``restore()``, which commits them once every node has them.

When training ends the launcher calls :meth:`CommitAgent.finish` with what is left of its
deadline: ``checkpoint.upload_timeout_s`` after a failure or a normal end, what remains of
``launch.stop_deadline_s`` after SIGTERM; a commit still running then is abandoned cleanly (no
manifest is written, so the step stays incomplete and nothing committed is touched).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .commit import CLAIM, SavePlan, abandon_incomplete, commit_with_deadline, open_run_store, pending_steps
from .layout import run_id_for

__all__ = ["CommitAgent", "start_agent"]

log = logging.getLogger(__name__)
SCAN_S = 0.05


class CommitAgent:
    def __init__(self, node_dir: Path, store, local_store, *, timeout_s: float):
        self.node_dir, self.store, self.local, self.timeout_s = node_dir, store, local_store, timeout_s
        # Saves pending before the agent started are the workers' restore()'s to commit.
        self._ignored = {(str(d), SavePlan.read(d).token) for d in pending_steps(node_dir)}
        self._stop, self._stopping = threading.Event(), threading.Event()
        self._busy = threading.Event()
        self.committed: list[int] = []
        self._thread = threading.Thread(target=self._run, name="checkpoint-commit-agent", daemon=True)

    def start(self) -> "CommitAgent":
        self._thread.start()
        return self

    def _next(self) -> Path | None:
        for directory in pending_steps(self.node_dir):
            plan = SavePlan.read(directory)
            if plan is not None and (str(directory), plan.token) not in self._ignored:
                return directory
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            directory = self._next()
            if directory is None:
                self._stop.wait(SCAN_S)
                continue
            self._busy.set()
            try:
                self._commit(directory)
            finally:
                self._busy.clear()

    def _commit(self, directory: Path) -> None:
        plan = SavePlan.read(directory)
        (directory / CLAIM).write_text(f"{os.getpid()}\n")
        try:
            commit_with_deadline(directory, plan, self.store, self.local, self.timeout_s,
                                 stopping=self._stopping.is_set)
            self.committed.append(plan.step)
        except InterruptedError as err:
            log.warning("%s", err)
        except BaseException as err:  # noqa: BLE001 - recorded for the workers; the agent goes on
            log.error("checkpoint step %d: the commit failed: %s", plan.step, err)
        finally:
            (directory / CLAIM).unlink(missing_ok=True)

    def finish(self, timeout_s: float) -> bool:
        """Let a commit in flight (or one the workers just planned) finish within ``timeout_s``, then
        stop; False when one had to be abandoned."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        time.sleep(min(3 * SCAN_S, max(0.0, timeout_s)))  # a save planned just before the workers exited
        for step in abandon_incomplete(self.node_dir, "exited"):
            log.warning("checkpoint step %d: a worker exited before its local write finished; not committed", step)
        while (self._busy.is_set() or self._next() is not None) and time.monotonic() < deadline:
            time.sleep(SCAN_S)
        abandoned = self._busy.is_set() or self._next() is not None
        if abandoned:
            log.warning("checkpoint: a commit was still running after %.0fs; abandoned (that step stays "
                        "incomplete; the committed ones are untouched)", timeout_s)
        self._stopping.set()
        self._stop.set()
        self._thread.join(1)  # a request stuck past its deadline is left to the process's exit
        return not abandoned


def start_agent(config, paths, node_rank: int) -> CommitAgent | None:
    """The agent for this host's node (None without checkpoint.uri: a local commit needs no agent)."""
    from ..storage import open_store

    ck = config.checkpoint
    if not ck.uri:
        return None
    local_dir = paths.checkpoint_dir
    run_id = run_id_for(ck.uri or os.path.abspath(local_dir), ck.run_id)
    node_dir = Path(local_dir) / run_id / f"node-{node_rank:05d}"
    node_dir.mkdir(parents=True, exist_ok=True)
    agent = CommitAgent(node_dir, open_run_store(ck.uri, run_id, ck), open_store(str(node_dir)),
                        timeout_s=ck.upload_timeout_s)
    return agent.start()
