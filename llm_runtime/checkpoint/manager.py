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
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from ..faults import inject
from ..workerenv import stop_file
from ..progress import bar
from .layout import MANIFEST, Manifest, ManifestError, NodeObject, due, node_key, parse_resume, resume_order, retention, run_id_for, step_dir
from .state import restore_rng, rng_state
from .store import LocalStore, StoreError, open_store
from ..gather import gather_json
from .transfer import CorruptCheckpoint, TarStream, ensure_member, local_members, run_with_deadline, verifying_reader

__all__ = ["Checkpointer", "ResumeMismatch", "SaveReport"]

log = logging.getLogger(__name__)


class ResumeMismatch(RuntimeError):
    """A checkpoint this run cannot continue (its data order, say): a configuration error, not corruption."""


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
                 backend: str, local_dir: str, on_stall=None):
        ck = config.checkpoint
        self.on_stall = on_stall
        """Called with (reason, phase=, stalled_s=, timeout_s=) when the upload passes its deadline; it
        ends the process (the watchdog's failure record and exit code), where a raise would wait for
        the next step, which may itself wait on this rank in a collective."""
        self.ck, self.config = ck, config
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.node_rank, self.num_nodes, self.backend = node_rank, num_nodes, backend
        self.run_id = run_id_for(ck.uri or os.path.abspath(local_dir), ck.run_id)  # local_dir: JobPaths.checkpoint_dir
        self.local_root = Path(local_dir) / self.run_id / f"node-{node_rank:05d}"
        self.local = LocalStore(str(self.local_root.parent), self.local_root.name)  # tier 1, same layout
        self.store = open_store(ck.uri, self.run_id, part_size=ck.part_size_mb << 20,
                                concurrency=ck.upload_concurrency)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=ck.upload_timeout_s + 300))
        self.nodes = [int(n) for n in gather_json(node_rank, self.group)]  # rank -> node
        # Stop requests are agreed on over a group of their own: the checkpoint group may be busy
        # with a background upload's collectives at any moment.
        self.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=config.comm.train_timeout_s))
        self.stop_file = stop_file()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last_save = time.monotonic()
        self.reports: list[SaveReport] = []

    # ---- saving -------------------------------------------------------------------------
    def step_boundary(self, step: int, last_step: int) -> tuple[bool, bool]:
        """(save now, stop now), agreed by every rank over the control group: a time-based save or
        any launcher's stop request on one rank is everyone's. Raises a failed background save."""
        import torch

        if self._error is not None:  # a stuck upload, say: fail at this step, not at the next save
            self.wait()
        due_here = due(step, last_step, every_steps=self.ck.every_steps, every_minutes=self.ck.every_minutes,
                       minutes_since_save=(time.monotonic() - self._last_save) / 60, at_end=self.ck.at_end)
        stop_here = bool(self.stop_file) and os.path.exists(self.stop_file)
        flags = torch.tensor([int(due_here), int(stop_here)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flags[0]), bool(flags[1])

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
            if self.rank == 0 and self.store is not None and step in self.store.steps():
                self.store.delete_step(step_dir(step))  # an older save of this step: never half-replaced
            dist.barrier(group=self.group)  # every rank's files are written
            started = time.monotonic()
            mine = self._node_report(step) if self.local_rank == 0 else None
            reports = [r for r in gather_json(mine, self.group) if r is not None]
            manifest = Manifest(run_id=self.run_id, step=step, world_size=self.world_size,
                                num_nodes=self.num_nodes, backend=self.backend,
                                objects=[NodeObject.from_json(r["object"])
                                         for r in sorted(reports, key=lambda r: r["node"])],
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
                try:
                    self._apply_retention(step)
                except Exception as err:  # noqa: BLE001 - the checkpoint is committed; cleanup can wait
                    log.warning("checkpoint retention after step %d failed (%s); old checkpoints stay", step,
                                _first_line(err))
            report.upload_s = time.monotonic() - started
            report.bytes = manifest.total_bytes()
            report.requests = sum(r["requests"] for r in reports)
            if self.rank == 0:
                log.info("%s objects=%d", report.line(), len(manifest.objects) + (1 if self.store else 0))
        except BaseException as err:  # noqa: BLE001 - raised in the training thread by wait()
            if isinstance(err, TimeoutError) and self.on_stall is not None:
                self.on_stall(str(err), phase="checkpoint", stalled_s=self.ck.upload_timeout_s,
                              timeout_s=self.ck.upload_timeout_s, frame=sys._getframe())
            self._error = err

    def _node_report(self, step: int) -> dict:
        root = self.local_root / step_dir(step)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
        key = node_key(step, self.node_rank, self.ck.prefix_spread)
        if self.store is None:
            return {"node": self.node_rank, "requests": 0,
                    "object": asdict(local_members(root, names, key, self.node_rank))}
        total = sum((root / name).stat().st_size for name in names)
        with bar(total, f"checkpoint step {step}: upload node {self.node_rank}") as shown:
            stream = TarStream(root, names, progress=shown)  # packed while it uploads: no local tar copy
            before = sum(self.store.stats.counts.values())

            def upload():
                inject(self.rank, step, "checkpoint")  # a drill: a stuck upload
                return self.store.put_stream(key, stream)

            run_with_deadline(upload, self.ck.upload_timeout_s,
                              f"upload of node {self.node_rank}'s checkpoint (step {step})")
        return {"node": self.node_rank, "requests": sum(self.store.stats.counts.values()) - before,
                "object": asdict(stream.node_object(key, self.node_rank))}

    def _apply_retention(self, current: int) -> None:
        for store in ([self.store] if self.rank == 0 and self.store is not None else []) + [self.local]:
            steps = store.steps()
            for old in retention([s for s, ok in steps.items() if ok], list(steps), self.ck.keep, current):
                store.delete_step(step_dir(old))

    # ---- restoring ----------------------------------------------------------------------
    def _rank0(self, fn):
        """Run ``fn`` on rank 0 and share its JSON result; its error is raised on every rank."""
        result = None
        if self.rank == 0:
            try:
                result = [True, fn()]
            except (OSError, ValueError) as err:
                result = [False, str(err)]
        ok, value = gather_json(result, self.group)[0]
        if not ok:
            raise CorruptCheckpoint(value)
        return value

    def _agree(self, ok: bool, error: str) -> None:
        """Every rank's verdict on a phase; any failure fails the phase on all ranks alike."""
        bad = [f"rank {r}: {e}" for r, (fine, e) in enumerate(gather_json([ok, error], self.group)) if not fine]
        if bad:
            raise CorruptCheckpoint("; ".join(bad[:3]))

    def _candidates(self) -> list[tuple[str, int]]:
        """(where, step) newest first, decided by rank 0 and shared. An explicit checkpoint.resume=URI
        is used only while this run has no complete checkpoint of its own (a restart continues)."""
        def find() -> list:
            if self.ck.resume == "never":
                return []
            where = "store" if self.store is not None else "local"
            steps = (self.store or self.local).steps()
            found = [(where, s) for s in resume_order([s for s, ok in steps.items() if ok])]
            newest = max((s for _, s in found), default=-1)
            for step in sorted(s for s, ok in steps.items() if not ok and s > newest):
                log.warning("checkpoint step %d has no manifest (its save never completed): skipped", step)
            if not found and self.ck.resume != "auto":
                found = [("explicit", parse_resume(self.ck.resume).step)]
            return found

        return [tuple(c) for c in self._rank0(find)]

    def _manifest(self, where: str, step: int) -> Manifest:
        def read():
            if where == "explicit":
                return _read_explicit(self.ck.resume)
            if where == "store":
                return self.store.get_text(f"{step_dir(step)}/{MANIFEST}")
            path = self.local_root / step_dir(step) / MANIFEST
            return path.read_text() if path.exists() else None

        text = self._rank0(read)
        if text is None:
            raise CorruptCheckpoint(f"checkpoint step {step}: manifest missing")
        manifest = Manifest.parse(text, f"checkpoint step {step} manifest")
        if manifest.step != step:
            raise CorruptCheckpoint(f"the manifest of step {step} describes step {manifest.step}")
        return manifest

    def restore(self, state, loader) -> int:
        """Load the newest usable checkpoint into ``state`` and ``loader``; returns its step (0: none)."""
        candidates = self._candidates()
        for where, step in candidates:
            store = self.store if where == "store" else None
            if where == "explicit":
                store = _explicit_store(self.ck.resume, self.ck)
            try:
                manifest = self._manifest(where, step)
                extras = self._load(manifest, state, loader, store)
            except (CorruptCheckpoint, ManifestError) as err:
                if self.rank == 0:
                    log.warning("checkpoint step %d is not usable (%s); trying the one before it", step, err)
                continue
            state.load_json_state(extras)
            if "rng" in extras:
                restore_rng(extras["rng"])
            if self.rank == 0:
                log.info("resumed from checkpoint step %d of run %s (%s)", step, self.run_id,
                         store.uri if store is not None else self.local_root)
            self._last_save = time.monotonic()
            return step
        if candidates:  # days of training must not restart from zero by accident
            raise CorruptCheckpoint(f"none of the {len(candidates)} complete checkpoint(s) of run {self.run_id} "
                                    "could be loaded (see the warnings above); fix or remove them, or set "
                                    "checkpoint.resume=never to start over")
        return 0

    def _check_compatible(self, manifest: Manifest) -> None:
        if manifest.backend != self.backend:
            raise CorruptCheckpoint(f"step {manifest.step} was written by the {manifest.backend} backend, "
                                    f"this run uses {self.backend}")
        if self.backend == "deepspeed" and manifest.world_size != self.world_size:
            raise CorruptCheckpoint(f"step {manifest.step} was written by {manifest.world_size} DeepSpeed ranks; "
                                    f"DeepSpeed checkpoints load on the same number of ranks (this run has "
                                    f"{self.world_size}); resharding needs the fsdp backend (DCP)")
        saved = (manifest.extra.get("config") or {}).get("model")
        if saved is not None and saved != _config_json(self.config)["model"]:
            raise CorruptCheckpoint(f"step {manifest.step} holds another model ({saved}); this run's is "
                                    f"{_config_json(self.config)['model']} (set checkpoint.run_id per model)")

    def _load(self, manifest: Manifest, state, loader, store) -> dict:
        """Fetch and verify this rank's files, agree, then load: no rank enters a collective alone."""
        root = self.local_root / step_dir(manifest.step)
        ok, error, extras = True, "", {}
        try:
            self._check_compatible(manifest)
            same_world = manifest.world_size == self.world_size
            name = f"rank-{self.rank:05d}.json" if same_world else "rank-00000.json"
            extras = json.loads(ensure_member(manifest, name, root, store).read_text())
            if not same_world:
                extras.pop("rng", None)  # another world: RNG streams do not map rank to rank
            if state.kind == "dcp":
                ensure_member(manifest, "dcp/.metadata", root, store)  # DCP unpickles it: verified first
            else:
                self._fetch_deepspeed(manifest, root, store)
        except (OSError, ValueError, KeyError) as err:
            ok, error = False, _first_line(err)
        self._agree(ok, error)
        try:  # the data position first: a layout it cannot continue is a clear error, not a fallback
            loader.load_state_dict(extras["loader"])
        except ValueError as err:
            raise ResumeMismatch(f"checkpoint step {manifest.step}: {err}") from None
        ok, error = True, ""
        try:
            if state.kind == "dcp":
                import torch.distributed.checkpoint as dcp

                loaded = state.dcp_state()
                reader = verifying_reader(str(root / "dcp"), manifest, root, store)
                dcp.load(loaded, storage_reader=reader, process_group=self.group)  # errors reach every rank
                state.load_dcp(loaded)
            else:
                state.load_local(root)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - every rank must agree first
            ok, error = False, _first_line(err)
        self._agree(ok, error)
        return extras

    def _fetch_deepspeed(self, manifest: Manifest, root: Path, store) -> None:
        """DeepSpeed reads files by its own names: this node's local rank 0 fetches them all, verified,
        and drops files no manifest lists (a stale layout's), the others wait at the group's barrier."""
        wanted = {n for n in manifest.member_names() if n.startswith("ds/")}
        if self.local_rank == 0:
            with bar(len(wanted), f"checkpoint step {manifest.step}: fetch and verify", unit="file") as shown:
                for name in sorted(wanted):
                    ensure_member(manifest, name, root, store)
                    shown.update(1)
            for path in (root / "ds").rglob("*") if (root / "ds").exists() else ():
                if path.is_file() and str(path.relative_to(root)) not in wanted:
                    path.unlink()

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


def _config_json(config) -> dict:
    from ..config import to_dict
    from ..secrets import is_secret

    body = to_dict(config)
    return {section: {k: ("<redacted>" if is_secret(k) else v) for k, v in values.items()}
            for section, values in body.items()}


def _explicit_store(uri: str, ck):
    """checkpoint.resume=<uri>/<run>/step-N: the store of that run."""
    target = parse_resume(uri)
    return open_store(target.base, target.run_id, part_size=ck.part_size_mb << 20, concurrency=ck.upload_concurrency)


def _read_explicit(uri: str) -> str | None:
    target = parse_resume(uri)
    return open_store(target.base, target.run_id).get_text(f"{target.step_name}/{MANIFEST}")
