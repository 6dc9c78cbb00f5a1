"""The commit of one checkpoint step on one node: markers -> node object -> manifest, through the store.

At save time local rank 0 writes the step's plan (``.save.json``: the save's token, this node's
ranks, the world) and every rank writes a done marker (``.done/rank-R``) once its local write has
finished. :func:`commit` then runs once per node, in the node's launch agent (so it survives
the workers) or, under a plain launcher, in a thread of local rank 0:

1. wait for the node's markers;
2. upload the node's files as one tar (``step-N/sK/node-I-<token>.tar``) and, from nodes other
   than 0, a node report (``step-N/nodes/node-I-<token>.json``: the object's members and checksums);
3. node 0 waits for every node's report, writes ``manifest.json`` (the commit), deletes objects
   of the step no manifest lists (an older save of it) and applies retention; the other nodes
   wait for that manifest;
4. every node copies the manifest to its local step directory and applies local retention.

Without a store the node's own object makes a node-local manifest. Coordination is through the
store alone (no port, no collective), so it works whichever processes are still alive. A
checkpoint costs 2 x nodes objects: a tar per node, a report per node but node 0, one manifest.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..faults import inject
from ..storage import open_store
from .layout import (MANIFEST, Manifest, ManifestError, NodeObject, node_key, retention, step_dir, step_of_key,
                     steps_in)
from .transfer import TarStream, local_members, run_with_deadline

__all__ = ["DONE_DIR", "FAILED", "PLAN", "SavePlan", "commit", "commit_failure", "commit_with_deadline", "open_run_store",
           "abandon_incomplete", "committed_token", "delete_step", "marker",
           "markers_missing", "pending_steps", "store_steps"]

log = logging.getLogger(__name__)
PLAN, DONE_DIR, FAILED, CLAIM = ".save.json", ".done", ".commit-failed", ".committing"
NODES = "nodes"
LOCAL_POLL_S = 0.02  # files on this node's disk: cheap to look at
STORE_POLL_S = 0.25  # objects in the store: one request per look


@dataclass
class SavePlan:
    """What a committer needs to know about one save, written by local rank 0 at save time."""
    step: int
    token: str
    run_id: str
    world_size: int
    num_nodes: int
    node_rank: int
    ranks: list[int]
    backend: str
    prefix_spread: int = 1
    keep: int = 2
    abandon_later: bool = False
    extra: dict = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        write_atomic(directory / PLAN, json.dumps(asdict(self)))

    @classmethod
    def read(cls, directory: Path) -> "SavePlan | None":
        try:
            return cls(**json.loads((directory / PLAN).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def marker(directory: Path, rank: int) -> Path:
    return directory / DONE_DIR / f"rank-{rank:05d}"


def markers_missing(directory: Path, plan: SavePlan) -> list[int]:
    return [r for r in plan.ranks if not marker(directory, r).exists()]


def committed_token(directory: Path) -> str | None:
    """The token of the save whose manifest lies in ``directory`` (None: not committed)."""
    try:
        return Manifest.parse((directory / MANIFEST).read_text(), str(directory)).extra.get("token", "")
    except (OSError, ManifestError):
        return None


def write_atomic(path: Path, text: str) -> None:
    """``text`` beside ``path``, then renamed over it: a reader polling for ``path`` sees all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def commit_failure(directory: Path) -> BaseException | None:
    """The failure a committer recorded for the save in ``directory`` (a TimeoutError past the
    deadline, else a StorageError), or None."""
    from ..storage import StorageError

    try:
        kind, _, text = (directory / FAILED).read_text().partition("\n")
    except OSError:
        return None
    return (TimeoutError if kind == "timeout" else StorageError)(text.strip() or kind)


def pending_steps(node_dir: Path) -> list[Path]:
    """Step directories with a plan but no manifest of that plan's save and no recorded failure."""
    found = []
    for directory in sorted(node_dir.glob("step-*")) if node_dir.is_dir() else ():
        plan = SavePlan.read(directory)
        if plan is not None and committed_token(directory) != plan.token and not (directory / FAILED).exists():
            found.append(directory)
    return found


def abandon_incomplete(node_dir: Path, why: str) -> list[int]:
    """Pending saves whose done markers are not all in, once their workers are gone (they never
    will be): marked failed, so a committer waiting for them stops. Returns their steps."""
    abandoned = []
    for directory in pending_steps(node_dir):
        plan = SavePlan.read(directory)
        missing = markers_missing(directory, plan)
        if missing:
            write_atomic(directory / FAILED, f"error\nabandoned: ranks {missing} {why} before their local write "
                                             "finished\n")
            abandoned.append(plan.step)
    return abandoned


def store_steps(store) -> dict[int, bool]:
    return steps_in(key for key, _ in store.list())


def delete_step(store, step: int, keep: set[str] = frozenset(), keys: list[str] | None = None) -> None:
    """Every object of ``step`` but ``keep`` (its tars lie under the spread prefixes, so the run is
    listed, or ``keys`` from one listing used); the manifest first, in a request of its own."""
    keys = [key for key, _ in store.list()] if keys is None else keys
    names = [key for key in keys if step_of_key(key) == step and key not in keep]
    manifest = f"{step_dir(step)}/{MANIFEST}"
    store.delete(names, first=[manifest] if manifest in names else [])


def _wait(what: str, ready, deadline: float, stopping, poll_s: float = STORE_POLL_S) -> None:
    while not ready():
        if stopping():
            raise InterruptedError(f"{what}: abandoned (the job is stopping)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within checkpoint.upload_timeout_s")
        time.sleep(poll_s)


def commit(directory: Path, plan: SavePlan, store, local_store, *, timeout_s: float,
           stopping=lambda: False, on_stream=None) -> Manifest:
    """Commit the save planned in ``directory`` (see the module docstring); returns its manifest.
    ``stopping()`` abandons it between requests; ``on_stream(stream)`` sees the upload stream."""
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    what = f"checkpoint step {plan.step}"
    _wait(f"{what}: the done markers of ranks {markers_missing(directory, plan)} on node {plan.node_rank}",
          lambda: not markers_missing(directory, plan), deadline,
          lambda: stopping() or (directory / FAILED).exists(),  # abandon_incomplete(): they never will
          LOCAL_POLL_S)
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                   and not p.name.startswith(".commit") and p.name not in (MANIFEST, PLAN)
                   and DONE_DIR not in p.relative_to(directory).parts and not p.name.endswith(".tmp"))
    key = node_key(plan.step, plan.node_rank, plan.prefix_spread, plan.token)
    before = store.stats.requests if store is not None else 0
    if store is None:
        obj = local_members(directory, names, key, plan.node_rank)
    else:
        inject(plan.ranks[0] if plan.ranks else 0, plan.step, "checkpoint")  # a drill: a stuck upload
        stream = TarStream(directory, names)
        if on_stream is not None:
            on_stream(stream)
        store.write_stream(key, stream)
        obj = stream.node_object(key, plan.node_rank)
        if plan.node_rank != 0:  # node 0 has its own in hand
            store.write_text(_report_key(plan, plan.node_rank), json.dumps(asdict(obj)))
    if store is None or plan.node_rank == 0:
        objects = [obj] + (_collect_reports(store, plan, deadline, stopping) if store is not None else [])
        manifest = Manifest(run_id=plan.run_id, step=plan.step, world_size=plan.world_size, num_nodes=plan.num_nodes,
                            backend=plan.backend, objects=objects,
                            extra={**plan.extra, "token": plan.token, "upload_s": round(time.monotonic() - started, 3)})
        if store is not None:
            if stopping():
                raise InterruptedError(f"{what}: abandoned before its manifest (the job is stopping)")
            store.write_text(f"{step_dir(plan.step)}/{MANIFEST}", manifest.to_json())  # the commit
            _after_commit(store, manifest, plan)
    else:
        manifest = _wait_for_manifest(store, plan, deadline, stopping)
    write_atomic(directory / MANIFEST, manifest.to_json())
    _tidy(local_store, plan)
    if plan.node_rank == 0:
        requests = (store.stats.requests - before) if store is not None else 0
        log.info("checkpoint step=%d committed upload_s=%.2f bytes=%d node_requests=%d objects=%d", plan.step,
                 time.monotonic() - started, manifest.total_bytes(), requests,
                 2 * len(manifest.objects) if store is not None else 0)
    return manifest


def commit_with_deadline(directory: Path, plan: SavePlan, store, local_store, timeout_s: float,
                         stopping=lambda: False) -> Manifest:
    """:func:`commit` bounded by ``timeout_s`` (a stuck request included); a failure is recorded in the
    step directory (``.commit-failed``) for the node's workers. A commit past its deadline is
    cancelled: it may still finish a request, but never writes the manifest after that."""
    cancelled = threading.Event()
    try:
        return run_with_deadline(
            lambda: commit(directory, plan, store, local_store, timeout_s=timeout_s,
                           stopping=lambda: cancelled.is_set() or stopping()),
            timeout_s, f"commit of node {plan.node_rank}'s checkpoint (step {plan.step})")
    except BaseException as err:
        cancelled.set()
        text = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
        # Atomic: the node's workers poll for this file, and one that read it half-written took the
        # empty record for a storage error (exit 1) instead of the deadline's TimeoutError (exit 86).
        write_atomic(directory / FAILED, f"{'timeout' if isinstance(err, TimeoutError) else 'error'}\n{text}\n")
        raise


def _report_key(plan: SavePlan, node: int) -> str:
    return f"{step_dir(plan.step)}/{NODES}/node-{node:05d}-{plan.token}.json"


def _collect_reports(store, plan: SavePlan, deadline: float, stopping) -> list[NodeObject]:
    """The objects of nodes 1..N-1, from their reports."""
    wanted = {_report_key(plan, n): n for n in range(1, plan.num_nodes)}
    if not wanted:
        return []
    present: set[str] = set()

    def ready() -> bool:
        present.update(k for k, _ in store.list(f"{step_dir(plan.step)}/{NODES}/") if k in wanted)
        return len(present) == len(wanted)

    _wait(f"checkpoint step {plan.step}: the uploads of nodes "
          f"{sorted(n for k, n in wanted.items() if k not in present)}", ready, deadline, stopping)
    return [NodeObject.from_json(json.loads(store.read_bytes(k).decode())) for k in sorted(wanted, key=wanted.get)]


def _wait_for_manifest(store, plan: SavePlan, deadline: float, stopping) -> Manifest:
    found: list[Manifest] = []

    def ready() -> bool:
        text = store.read_text(f"{step_dir(plan.step)}/{MANIFEST}")
        if text is not None:
            manifest = Manifest.parse(text, f"{store.url(step_dir(plan.step))}/{MANIFEST}")
            if manifest.extra.get("token") == plan.token:
                found.append(manifest)
        return bool(found)

    _wait(f"checkpoint step {plan.step}: node 0's manifest", ready, deadline, stopping)
    return found[0]


def _after_commit(store, manifest: Manifest, plan: SavePlan) -> None:
    """Objects of the step that the new manifest does not list (an older save of it) go; then retention.
    Cleanup failing leaves old objects behind, never the commit undone."""
    step = step_dir(plan.step)
    keep = {f"{step}/{MANIFEST}", *(o.key for o in manifest.objects),
            *(_report_key(plan, n) for n in range(1, plan.num_nodes))}
    try:
        delete_step(store, plan.step, keep=keep)
        _tidy(store, plan)
    except OSError as err:
        log.warning("checkpoint step %d is committed; cleaning up older objects failed (%s): they stay",
                    plan.step, err)


def _tidy(store, plan: SavePlan) -> None:
    """Retention after ``plan.step`` was committed (store: node 0; local: every node)."""
    keys = [key for key, _ in store.list()]
    steps = steps_in(keys)
    for old in retention([s for s, ok in steps.items() if ok], list(steps), plan.keep, plan.step,
                         plan.abandon_later):
        delete_step(store, old, keys=keys)


def open_run_store(uri: str, run_id: str, ck):
    """Tier 2 of run ``run_id`` under ``uri`` (None without a URI)."""
    if not uri:
        return None
    return open_store(uri, part_size=ck.part_size_mb << 20, concurrency=ck.upload_concurrency).child(run_id)
