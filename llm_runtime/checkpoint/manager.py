"""Hierarchical, asynchronous checkpoints: rank -> node-local disk -> one upload per node -> manifest.

``save(step)`` blocks training only while the state is staged (DCP's CPU copy) and this rank's
JSON state is written. A background thread per rank then waits for the local write and writes
the rank's done marker; the node's commit (:mod:`.commit`: node tar, node report, manifest)
runs in the node's ``llm-runtime launch`` agent when there is one (it outlives the workers), or
else in local rank 0's thread. Every rank's thread then waits for the commit to reach its node
(the manifest in the step directory), under ``checkpoint.upload_timeout_s``. A new save first
waits for the previous one, so memory never grows with a slow upload. Restoring is
:mod:`.restore`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..gather import gather_json
from ..storage import open_store
from ..workerenv import commit_agent, stop_file
from .agree import StepAgreement
from .commit import SavePlan, commit_failure, commit_with_deadline, committed_token, marker, open_run_store
from .layout import MANIFEST, Manifest, due, parse_resume, parse_step_dir, run_id_for, step_dir
from .restore import Restorer, config_json
from .skips import Skips
from .slowdown import SlowdownMeter
from .state import rng_state

__all__ = ["Checkpointer", "SaveReport"]

log = logging.getLogger(__name__)


@dataclass
class SaveReport:
    step: int
    blocked_s: float = 0.0
    upload_s: float = 0.0
    bytes: int = 0
    slowdown_s: float = 0.0
    """Training time lost while the save ran in the background, over and above ``blocked_s`` (:mod:`.slowdown`)."""
    objects: int = 0

    def line(self) -> str:
        return (f"checkpoint step={self.step} blocked_s={self.blocked_s:.3f} slowdown_s={self.slowdown_s:.3f} "
                f"upload_s={self.upload_s:.2f} bytes={self.bytes} objects={self.objects}")


def save_token(prefix: str, step: int, count: int) -> str:
    """The name of one save (in its objects' keys): unique per launch (``prefix`` is drawn by rank 0
    once per Checkpointer), per step and per save of this Checkpointer; the same on every rank (pure)."""
    return hashlib.sha256(f"{prefix}:{step}:{count}".encode()).hexdigest()[:8]


class Checkpointer(Restorer):
    def __init__(self, config, *, rank: int, world_size: int, local_rank: int, node_rank: int, num_nodes: int,
                 backend: str, local_dir: str, on_stall=None, model_fingerprint: str = ""):
        ck = config.checkpoint
        self.model_fingerprint = model_fingerprint
        """A hash of model.hf_path's config.json, recorded with the config and checked on resume."""
        self.on_stall = on_stall
        """Called with (reason, phase=, stalled_s=, timeout_s=) when the commit passes its deadline; it
        ends the process (the watchdog's failure record and exit code), where a raise would wait for
        the next step, which may itself wait on this rank in a collective."""
        self.ck, self.config = ck, config
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node_rank, self.num_nodes, self.backend = node_rank, num_nodes, backend
        self.resume = parse_resume(ck.resume)  # parsed once: None for auto / never
        self.run_id = run_id_for(ck.uri or os.path.abspath(local_dir), ck.run_id)  # local_dir: JobPaths.checkpoint_dir
        self.local_root = Path(local_dir) / self.run_id / f"node-{node_rank:05d}"
        self.local = open_store(str(self.local_root))  # tier 1, same layout
        self.store = open_run_store(ck.uri, self.run_id, ck)
        self.agent = commit_agent() and self.store is not None  # the launch agent commits this node's saves
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=ck.upload_timeout_s + 300))
        self.nodes = [int(n) for n in gather_json(node_rank, self.group)]  # rank -> node
        self.stop_file = stop_file()
        # One gather: rank 0's run prefix (the agreement's keys, the saves' tokens) and the step
        # directories the node leaders find left on their disks (a save there cleans up first).
        names = os.listdir(self.local_root) if local_rank == 0 and self.local_root.is_dir() else []
        found = sorted(step for step in map(parse_step_dir, names) if step is not None)
        shared = gather_json([secrets.token_hex(4) if rank == 0 else None, found], self.group)
        prefix = shared[0][0]
        self._prefix, self._leftovers = prefix, {step for _, steps in shared for step in steps}
        # Time-based saves and stop requests are agreed on through the job's store, not a per-step collective.
        self.agreement = StepAgreement(
            dist.PrefixStore(f"llm_runtime/agree/{prefix}/", dist.distributed_c10d._get_default_store()),
            rank=rank, world_size=world_size, last_step=config.train.steps, every_minutes=ck.every_minutes,
            stop_file=self.stop_file, timeout_s=config.comm.train_timeout_s)
        self.abandon_later = self.resume is not None  # the user named the checkpoint to continue from
        self.skips = Skips()  # the run's skipped_batches.json, read at each restore
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.reports: list[SaveReport] = []
        self._meter, self._blocked_since, self.last_lost = SlowdownMeter(), 0.0, 0.0

    # ---- saving -------------------------------------------------------------------------
    def step_boundary(self, step: int, last_step: int) -> tuple[bool, bool]:
        """(save now, stop now), the same on every rank with no collective: step-count saves are
        computed here, a time-based save or any launcher's stop request was agreed on ahead of this
        step by :mod:`.agree`'s threads. Raises a failed background save."""
        self.last_lost = self._meter.end(time.perf_counter(), self._blocked_since)
        self._blocked_since = 0.0
        if self.last_lost and self.reports:
            self.reports[-1].slowdown_s += self.last_lost  # the save this step ran beside
        if self._error is not None or (self._thread is not None and not self._thread.is_alive()):
            self.wait()  # a stuck upload, say, fails at this step, not at the next save; a done one is logged
        save, stop = self.agreement.boundary(step)
        save = save or due(step, last_step, every_steps=self.ck.every_steps, every_minutes=0.0,
                           minutes_since_save=0.0, at_end=self.ck.at_end)
        self._meter.begin(self._thread is not None or save or stop)
        return save, stop

    def _plan(self, step: int, token: str) -> SavePlan:
        return SavePlan(step=step, token=token, run_id=self.run_id, world_size=self.world_size,
                        num_nodes=self.num_nodes, node_rank=self.node_rank,
                        ranks=[r for r, n in enumerate(self.nodes) if n == self.node_rank], backend=self.backend,
                        prefix_spread=self.ck.prefix_spread, keep=self.ck.keep, abandon_later=self.abandon_later,
                        extra={"config": config_json(self.config, self.model_fingerprint)})

    def save(self, step: int, state, loader) -> SaveReport:
        """Stage this rank's state for ``step`` and return; the write and commit continue in the background."""
        self.wait()  # one save in flight at most
        started = time.monotonic()
        directory = self.local_root / step_dir(step)
        if step in self._leftovers:  # the same set on every rank: all of them wait for the cleanup
            if self.local_rank == 0 and directory.exists():  # a leftover of an earlier save of this step:
                # renamed away first, so the node's commit agent, which scans the step directories,
                # never sees it half deleted (its plan without its manifest: "pending") and claims it
                doomed = directory.with_name(f".{directory.name}.deleting-{os.getpid()}")
                directory.rename(doomed)
                shutil.rmtree(doomed)
            gather_json(None, self.group)
        self._leftovers.add(step)  # saving a step again (not done by the loop) cleans up first too
        token = save_token(self._prefix, step, len(self.reports))  # no collective: the same on every rank
        directory.mkdir(parents=True, exist_ok=True)
        extras = {"step": step, "world_size": self.world_size, "loader": loader.state_dict(),
                  "rng": rng_state(), **state.json_state()}
        (directory / f"rank-{self.rank:05d}.json").write_text(json.dumps(extras))
        if self.local_rank == 0:
            self._plan(step, token).write(directory)
        future = state.save(directory, self.group)
        report = SaveReport(step=step, blocked_s=time.monotonic() - started)
        self._blocked_since = report.blocked_s
        self.agreement.saved()
        self.reports.append(report)
        self._thread = threading.Thread(target=self._finish, args=(directory, token, future, report), daemon=True,
                                        name=f"checkpoint-{step}")
        self._thread.start()
        return report

    def wait(self) -> None:
        """Wait for the save in flight; its failure is raised here, its line logged (rank 0) once it is in."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is None and self.rank == 0:
                log.info("%s", self.reports[-1].line())
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _finish(self, directory: Path, token: str, future, report: SaveReport) -> None:
        try:
            if future is not None:
                getattr(future, "upload_completion", future).result()
            done = marker(directory, self.rank)
            done.parent.mkdir(exist_ok=True)
            done.write_text(f"{token}\n")
            if self.local_rank == 0 and not self.agent:
                self._commit_here(directory, report.step)
            self._wait_committed(directory, token, report)
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
            if isinstance(err, TimeoutError) and self.on_stall is not None:
                self.on_stall(str(err), phase="checkpoint", stalled_s=self.ck.upload_timeout_s,
                              timeout_s=self.ck.upload_timeout_s, frame=sys._getframe())
            self._error = err

    def _commit_here(self, directory: Path, step: int) -> None:
        """A plain launcher: this node's commit runs in local rank 0's thread, under the upload deadline."""
        commit_with_deadline(directory, SavePlan.read(directory), self.store, self.local, self.ck.upload_timeout_s)

    def _wait_committed(self, directory: Path, token: str, report: SaveReport) -> None:
        """Until the manifest of this save lies in the node's step directory (or the commit failed),
        within checkpoint.upload_timeout_s of this rank's done marker."""
        deadline = time.monotonic() + self.ck.upload_timeout_s
        while committed_token(directory) != token:
            failure = commit_failure(directory)
            if failure is not None:  # the committer's own error: a TimeoutError stays one (exit 86)
                raise type(failure)(f"checkpoint step {report.step} was not committed: {failure}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the commit of node {self.node_rank}'s checkpoint (step {report.step}) did not "
                                   f"finish within {self.ck.upload_timeout_s:g}s (checkpoint.upload_timeout_s)")
            time.sleep(0.02)  # a local file: cheap to look at
        manifest = Manifest.parse((directory / MANIFEST).read_text(), str(directory / MANIFEST))
        report.upload_s, report.bytes = float(manifest.extra.get("upload_s", 0.0)), manifest.total_bytes()
        report.objects = 2 * len(manifest.objects) if self.store else 0

    def close(self) -> None:
        """Wait for the last save (its failure is raised) and release the checkpoint groups."""
        self.agreement.close()
        try:
            self.wait()
        finally:
            if self.group is not None:
                dist.destroy_process_group(self.group)
            self.group = None
