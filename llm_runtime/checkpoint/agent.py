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

import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from ..faults import wiped_disk
from .commit import CLAIM, SavePlan, abandon_incomplete, commit_with_deadline, open_run_store, pending_steps
from .layout import run_id_for
from .replica import ReplicaServer, holder_of, push, replica_record, server_record

__all__ = ["CommitAgent", "start_agent"]

log = logging.getLogger(__name__)
SCAN_S = 0.05


class CommitAgent:
    def __init__(self, node_dir: Path, store, local_store, *, timeout_s: float, replicas=None):
        self.node_dir, self.store, self.local, self.timeout_s = node_dir, store, local_store, timeout_s
        self.replicas = replicas
        """A :class:`Replicas` when this node's files are also copied to its peer."""
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
            manifest = commit_with_deadline(directory, plan, self.store, self.local, self.timeout_s,
                                            stopping=self._stopping.is_set)
            self.committed.append(plan.step)
            if self.replicas is not None:
                self.replicas.start_push(directory, manifest, plan.keep)
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
        if self.replicas is not None:  # the replica is a second copy: it gets what is left, and no more
            self.replicas.finish(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        self._stop.set()
        self._thread.join(1)  # a request stuck past its deadline is left to the process's exit
        return not abandoned


class Replicas:
    """This node's replica server (its peers' files) and the push of its own files to its holder."""

    def __init__(self, store, run_dir: Path, node: int, num_nodes: int, host: str, *, keep: int, min_free_mb: int,
                 timeout_s: float):
        self.store, self.node, self.num_nodes, self.timeout_s = store, node, num_nodes, timeout_s
        self.server = ReplicaServer(run_dir / "replicas", socket.gethostbyname(host), keep=keep,
                                    min_free_mb=min_free_mb, own_node=node, own_dir=run_dir / f"node-{node:05d}")
        store.write_text(server_record(node), json.dumps({"node": node, "host": host, "url": self.server.url}))
        self.holder = holder_of(node, num_nodes)
        self._thread: threading.Thread | None = None
        log.info("checkpoint replicas: node %d holds node %d's files at %s; node %d holds this node's", node,
                 (node - 1) % num_nodes, self.server.address, self.holder)

    def start_push(self, directory: Path, manifest, keep: int) -> None:
        """Copy this node's files of ``manifest`` to the holder, in the background: one at a time, and
        never waited for here (the commits go on; a step whose push could not start keeps S3 alone)."""
        if self._thread is not None and self._thread.is_alive():
            log.warning("checkpoint step %d: the previous replica push is still running; this step's files "
                        "are not replicated (the S3 copy stands)", manifest.step)
            return
        self._thread = threading.Thread(target=self._push, args=(directory, manifest, keep), daemon=True,
                                        name=f"checkpoint-replica-{manifest.step}")
        self._thread.start()

    def _push(self, directory: Path, manifest, keep: int) -> None:
        started = time.monotonic()
        deadline = started + self.timeout_s
        try:
            server = json.loads(self.store.read_text(server_record(self.holder)) or "{}")
            if "url" not in server or not push(directory, manifest, self.node, server["url"], deadline):
                return
            size = sum(m.size for o in manifest.objects if o.node == self.node for m in o.members)
            log.info("checkpoint step %d: replica of node %d on node %d: %.1f MB in %.2fs", manifest.step, self.node,
                     self.holder, size / 1e6, time.monotonic() - started)
            old = json.loads(self.store.read_text(replica_record(self.node)) or "{}")
            steps = sorted({*old.get("steps", ()), manifest.step} if old.get("held_by") == self.holder
                           else {manifest.step})[-max(1, keep):]  # what the holder keeps after pruning
            self.store.write_text(replica_record(self.node), json.dumps({"node": self.node, "held_by": self.holder,
                                                                         "steps": steps}))
        except (OSError, ValueError) as err:
            log.warning("checkpoint step %d: node %d's replica was not recorded (%s); the S3 copy stands",
                        manifest.step, self.node, err)

    def finish(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def close(self) -> None:
        self.server.close()


def start_agent(config, paths, node_rank: int, num_nodes: int = 1, host: str = "") -> CommitAgent | None:
    """The agent for this host's node (None without checkpoint.uri: a local commit needs no agent);
    with several nodes and ``checkpoint.replicate``, it also serves and pushes peer replicas."""
    from ..storage import open_store

    ck = config.checkpoint
    if not ck.uri:  # (the launcher refuses the wipe drill without one: the local copy would be the only one)
        return None
    local_dir = paths.checkpoint_dir
    run_id = run_id_for(ck.uri or os.path.abspath(local_dir), ck.run_id)
    if wiped_disk(node_rank):  # the drill: a replaced host's fresh disk (the store keeps every committed checkpoint)
        log.warning("LLM_RUNTIME_FAULT: wipe: removing node %d's local checkpoints %s", node_rank,
                    Path(local_dir) / run_id)
        shutil.rmtree(Path(local_dir) / run_id, ignore_errors=True)
    node_dir = Path(local_dir) / run_id / f"node-{node_rank:05d}"
    node_dir.mkdir(parents=True, exist_ok=True)
    store = open_run_store(ck.uri, run_id, ck)
    replicas = None
    if ck.replicate and num_nodes > 1 and host:
        try:
            replicas = Replicas(store, node_dir.parent, node_rank, num_nodes, host, keep=ck.keep,
                                min_free_mb=ck.replica_min_free_mb, timeout_s=ck.upload_timeout_s)
        except OSError as err:  # an address that does not resolve or bind: S3 alone, as before
            log.warning("checkpoint replicas are off on node %d: %s", node_rank, err)
    agent = CommitAgent(node_dir, store, open_store(str(node_dir)), timeout_s=ck.upload_timeout_s, replicas=replicas)
    return agent.start()
