"""Hierarchical, asynchronous checkpoints: rank -> node-local disk -> one upload per node -> manifest.

``save(step)`` blocks training only while the state is staged (DCP's CPU copy) and this
rank's JSON state is written; a background thread per rank then waits for the local write,
lets local rank 0 of each node pack the node's files into one tar and upload it (multipart,
under ``checkpoint.upload_timeout_s``), gathers the nodes' reports over a checkpoint-only
gloo group and has rank 0 write the manifest last. A new save first waits for the previous
one, so memory never grows with a slow upload. ``restore()`` finds the newest complete
checkpoint, verifies every file it reads against the manifest (fetching only what this
node's ranks need) and falls back to an older checkpoint when one is corrupt.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .layout import MANIFEST, Manifest, ManifestError, due, node_key, resume_order, retention, run_id_for, step_dir
from .state import restore_rng, rng_state
from .store import StoreError, open_store
from .transfer import CorruptCheckpoint, TarStream, ensure_member, gather_json, local_members, run_with_deadline

__all__ = ["Checkpointer", "SaveReport", "default_local_dir"]

log = logging.getLogger(__name__)


def default_local_dir(sagemaker_sync: bool) -> str:
    return "/opt/ml/checkpoints" if sagemaker_sync else os.path.join(tempfile.gettempdir(), "llm_runtime",
                                                                       "checkpoints")


@dataclass
class SaveReport:
    step: int
    blocked_s: float = 0.0
    upload_s: float = 0.0
    bytes: int = 0
    requests: int = 0

    def line(self) -> str:
        return (f"checkpoint step={self.step} blocked_s={self.blocked_s:.3f} upload_s={self.upload_s:.2f} "
                f"bytes={self.bytes} requests={self.requests}")


class Checkpointer:
    def __init__(self, config, *, rank: int, world_size: int, local_rank: int, node_rank: int, num_nodes: int,
                 backend: str):
        ck = config.checkpoint
        self.ck, self.config = ck, config
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node_rank, self.num_nodes, self.backend = node_rank, num_nodes, backend
        base = ck.local_dir or default_local_dir(ck.sagemaker_sync)
        self.run_id = run_id_for(ck.uri or os.path.abspath(base), ck.run_id)
        self.local_root = Path(base) / self.run_id / f"node-{node_rank:05d}"
        self.store = open_store(ck.uri, self.run_id, part_size=ck.part_size_mb << 20,
                                concurrency=ck.upload_concurrency)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=ck.upload_timeout_s + 300))
        self.nodes = [int(n) for n in gather_json(node_rank, self.group)]  # rank -> node
        # Stop requests are agreed on over a group of their own: the checkpoint group may be busy
        # with a background upload's collectives at any moment.
        self.control = dist.new_group(backend="gloo")
        self.stop_file = os.environ.get("LLM_RUNTIME_STOP_FILE", "")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_save = time.monotonic()
        self.reports: list[SaveReport] = []

    # ---- saving -------------------------------------------------------------------------
    def due(self, step: int, last_step: int) -> bool:
        return due(step, last_step, every_steps=self.ck.every_steps, every_minutes=self.ck.every_minutes,
                   minutes_since_save=(time.monotonic() - self._last_save) / 60, at_end=self.ck.at_end)

    def stop_requested(self) -> bool:
        """Whether any rank's launcher asked to stop (SIGTERM from the platform): all ranks agree."""
        import torch

        if self._error is not None:  # a background save failed (a stuck upload, say): fail now, not at the next save
            self.wait()
        flag = torch.tensor([int(bool(self.stop_file) and os.path.exists(self.stop_file))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def save(self, step: int, state, loader) -> SaveReport:
        """Stage this rank's state for ``step`` and return; the upload continues in the background."""
        self.wait()  # one save in flight at most
        started = time.monotonic()
        directory = self.local_root / step_dir(step)
        if self.local_rank == 0 and directory.exists():
            shutil.rmtree(directory)  # a leftover of an unfinished save of this step
        dist.barrier(group=self.group)  # the node's ranks share the directory
        directory.mkdir(parents=True, exist_ok=True)
        extras = {"step": step, "world_size": self.world_size, "loader": loader.state_dict(),
                  "rng": rng_state(), **state.json_state()}
        (directory / f"rank-{self.rank:05d}.json").write_text(json.dumps(extras))
        future = None
        if state.kind == "dcp":
            import torch.distributed.checkpoint as dcp

            future = dcp.async_save(state.dcp_state(), storage_writer=dcp.FileSystemWriter(str(directory / "dcp")),
                                    process_group=self.group)
        else:
            state.save_local(directory)  # DeepSpeed writes synchronously; the upload is still async
        report = SaveReport(step=step, blocked_s=time.monotonic() - started)
        self._last_save = time.monotonic()
        self.reports.append(report)
        self._thread = threading.Thread(target=self._finish, args=(step, future, report), daemon=True,
                                        name=f"checkpoint-{step}")
        self._thread.start()
        return report

    def wait(self) -> None:
        """Wait for the save in flight; its failure is raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _finish(self, step: int, future, report: SaveReport) -> None:
        try:
            if future is not None:
                result = getattr(future, "upload_completion", future)
                result.result()
            dist.barrier(group=self.group)  # every rank's files are written
            started = time.monotonic()
            mine = self._node_report(step) if self.local_rank == 0 else None
            reports = [r for r in gather_json(mine, self.group) if r is not None]
            manifest = Manifest(run_id=self.run_id, step=step, world_size=self.world_size,
                                num_nodes=self.num_nodes, backend=self.backend,
                                objects=[_node_object(r["object"]) for r in sorted(reports, key=lambda r: r["node"])],
                                extra={"config": _config_json(self.config)})
            committed = True
            if self.rank == 0 and self.store is not None:
                try:
                    self.store.put_text(f"{step_dir(step)}/{MANIFEST}", manifest.to_json())
                except StoreError as err:
                    log.error("checkpoint step %d: the manifest was not written: %s", step, err)
                    committed = False
            committed = all(gather_json(committed, self.group))
            if not committed:
                raise StoreError(f"checkpoint step {step}: rank 0 could not write the manifest")
            if self.local_rank == 0:
                (self.local_root / step_dir(step) / MANIFEST).write_text(manifest.to_json())
                self._apply_retention()
            report.upload_s = time.monotonic() - started
            report.bytes = manifest.total_bytes()
            report.requests = sum(r["requests"] for r in reports)
            if self.rank == 0:
                log.info("%s objects=%d", report.line(), len(manifest.objects) + (1 if self.store else 0))
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = err

    def _node_report(self, step: int) -> dict:
        root = self.local_root / step_dir(step)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
        key = node_key(step, self.node_rank, self.ck.prefix_spread)
        if self.store is None:
            return {"node": self.node_rank, "requests": 0,
                    "object": _object_json(local_members(root, names, key, self.node_rank))}
        stream = TarStream(root, names)  # packed while it uploads: no local tar copy
        before = sum(self.store.stats.counts.values())
        run_with_deadline(lambda: self.store.put_stream(key, stream), self.ck.upload_timeout_s,
                          f"upload of node {self.node_rank}'s checkpoint (step {step})")
        return {"node": self.node_rank, "requests": sum(self.store.stats.counts.values()) - before,
                "object": _object_json(stream.node_object(key, self.node_rank))}

    def _apply_retention(self) -> None:
        if self.rank == 0 and self.store is not None:
            remote = self.store.steps()
            for old in retention([s for s, ok in remote.items() if ok], list(remote), self.ck.keep):
                self.store.delete_step(step_dir(old))
        local = self._local_steps()
        for old in retention([s for s, ok in local.items() if ok], list(local), self.ck.keep):
            shutil.rmtree(self.local_root / step_dir(old), ignore_errors=True)

    def _local_steps(self) -> dict[int, bool]:
        from .layout import parse_step_dir

        if not self.local_root.is_dir():
            return {}
        return {step: (self.local_root / entry.name / MANIFEST).exists()
                for entry in self.local_root.iterdir() if (step := parse_step_dir(entry.name)) is not None}

    # ---- restoring ----------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, int]]:
        """(where, step) newest first, decided by rank 0 and shared."""
        mode = self.ck.resume
        found: list[tuple[str, int]] = []
        if self.rank == 0 and mode != "never":
            if mode != "auto":
                found = [("explicit", _explicit_step(mode))]
            else:
                where = "store" if self.store is not None else "local"
                steps = self.store.steps() if self.store is not None else self._local_steps()
                found = [(where, s) for s in resume_order([s for s, ok in steps.items() if ok])]
                newest = max((s for _, s in found), default=-1)
                for step in sorted(s for s, ok in steps.items() if not ok and s > newest):
                    log.warning("checkpoint step %d has no manifest (its save never completed): skipped", step)
        return [tuple(c) for c in gather_json(found, self.group)[0]]

    def _manifest(self, where: str, step: int) -> Manifest:
        text = None
        if self.rank == 0:
            if where == "explicit":
                text = _read_explicit(self.ck.resume)
            elif where == "store":
                text = self.store.get_text(f"{step_dir(step)}/{MANIFEST}")
            else:
                path = self.local_root / step_dir(step) / MANIFEST
                text = path.read_text() if path.exists() else None
        text = gather_json(text, self.group)[0]
        if text is None:
            raise CorruptCheckpoint(f"checkpoint step {step}: manifest missing")
        return Manifest.parse(text, f"checkpoint step {step} manifest")

    def restore(self, state, loader) -> int:
        """Load the newest usable checkpoint into ``state`` and ``loader``; returns its step (0: none)."""
        store = self.store
        if self.ck.resume not in ("auto", "never"):
            store = _explicit_store(self.ck.resume, self.ck)
        candidates = self._candidates()
        for where, step in candidates:
            try:
                manifest = self._manifest(where, step)
                ok, error = True, ""
                try:
                    extras = self._load(manifest, state, store if where != "local" else None)
                except (Exception, CheckpointException) as err:  # noqa: BLE001 - every rank must agree first
                    ok, error, extras = False, _first_line(err), None
                verdicts = gather_json([ok, error], self.group)
                bad = [f"rank {r}: {e}" for r, (fine, e) in enumerate(verdicts) if not fine]
                if bad:
                    raise CorruptCheckpoint("; ".join(bad[:3]))
            except (CorruptCheckpoint, ManifestError) as err:
                if self.rank == 0:
                    log.warning("checkpoint step %d is not usable (%s); trying the one before it", step, err)
                continue
            loader.load_state_dict(extras["loader"])
            state.load_json_state(extras)
            if "rng" in extras:
                restore_rng(extras["rng"])
            if self.rank == 0:
                log.info("resumed from checkpoint step %d of run %s (%s)", step, self.run_id,
                         store.uri if store is not None and where != "local" else self.local_root)
            self._last_save = time.monotonic()
            return step
        if candidates:  # days of training must not restart from zero by accident
            raise CorruptCheckpoint(f"none of the {len(candidates)} complete checkpoint(s) of run {self.run_id} "
                                    "could be loaded (see the warnings above); fix or remove them, or set "
                                    "checkpoint.resume=never to start over")
        return 0

    def _load(self, manifest: Manifest, state, store) -> dict:
        root = self.local_root / step_dir(manifest.step)
        if manifest.backend != self.backend:
            raise CorruptCheckpoint(f"step {manifest.step} was written by the {manifest.backend} backend, "
                                    f"this run uses {self.backend}")
        if state.kind == "deepspeed" and manifest.world_size != self.world_size:
            raise CorruptCheckpoint(f"step {manifest.step} was written by {manifest.world_size} DeepSpeed ranks; "
                                    f"DeepSpeed checkpoints load on the same number of ranks (this run has "
                                    f"{self.world_size}); resharding needs the fsdp backend (DCP)")
        own = f"rank-{self.rank:05d}.json"
        extras_name = own if manifest.world_size == self.world_size else "rank-00000.json"
        extras = json.loads(ensure_member(manifest, extras_name, root, store).read_text())
        if manifest.world_size != self.world_size:
            extras.pop("rng", None)  # another world: RNG streams do not map rank to rank
        if state.kind == "dcp":
            import torch.distributed.checkpoint as dcp

            loaded = state.dcp_state()
            reader = _VerifyingReader(str(root / "dcp"), manifest, root, store)
            dcp.load(loaded, storage_reader=reader, process_group=self.group)
            state.load_dcp(loaded)
        else:
            for name in manifest.member_names():
                if name.startswith("ds/"):
                    ensure_member(manifest, name, root, store)
            state.load_local(root)
        return extras

    def close(self) -> None:
        """Wait for the last upload (its failure is raised) and release the checkpoint group."""
        try:
            self.wait()
        finally:
            for group in (self.group, self.control):
                if group is not None:
                    dist.destroy_process_group(group)
            self.group = self.control = None


def _first_line(err: BaseException) -> str:
    """The useful line of an error (DCP wraps the ranks' failures in a long text)."""
    text = str(err)
    for line in text.splitlines():
        if "CorruptCheckpoint" in line or "does not match" in line or "missing" in line:
            return line.strip()[:500]
    return (text.splitlines() or [type(err).__name__])[0][:500]


def _object_json(obj) -> dict:
    from dataclasses import asdict

    return asdict(obj)


def _node_object(body: dict):
    from .layout import Member, NodeObject

    return NodeObject(key=body["key"], node=int(body["node"]), size=int(body["size"]), sha256=body["sha256"],
                      members=tuple(Member(**m) for m in body["members"]))


def _config_json(config) -> dict:
    from ..config import to_dict
    from ..secrets import is_secret

    body = to_dict(config)
    return {section: {k: ("<redacted>" if is_secret(k) else v) for k, v in values.items()}
            for section, values in body.items()}


def _explicit_step(uri: str) -> int:
    from .layout import parse_step_dir

    step = parse_step_dir(uri.rstrip("/").rsplit("/", 1)[-1])
    if step is None:
        raise ValueError(f"checkpoint.resume={uri!r}: name a checkpoint directory ending in step-NNNNNNNNN")
    return step


def _explicit_store(uri: str, ck):
    """checkpoint.resume=<uri>/<run>/step-N: the store of that run."""
    base, run, _ = uri.rstrip("/").rsplit("/", 2)
    return open_store(base, run, part_size=ck.part_size_mb << 20, concurrency=ck.upload_concurrency)


def _read_explicit(uri: str) -> str | None:
    base, run, step = uri.rstrip("/").rsplit("/", 2)
    store = open_store(base, run)
    return store.get_text(f"{step}/{MANIFEST}")


class _VerifyingReader:
    """DCP's FileSystemReader over the node's step dir: every file is checked against the manifest
    (and fetched with one ranged GET when absent) before DCP opens it, .metadata (a pickle) included."""

    def __new__(cls, path: str, manifest: Manifest, root: Path, store):
        from torch.distributed.checkpoint import FileSystemReader

        class Reader(FileSystemReader):
            def read_metadata(self, *args, **kwargs):
                ensure_member(manifest, "dcp/.metadata", root, store)
                return super().read_metadata(*args, **kwargs)

            def read_data(self, plan, planner):
                for name in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
                    ensure_member(manifest, f"dcp/{name}", root, store)
                return super().read_data(plan, planner)

        os.makedirs(path, exist_ok=True)
        return Reader(path)
