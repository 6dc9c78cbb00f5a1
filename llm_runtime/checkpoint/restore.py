"""Resuming: finish what a lost worker left, find the newest usable checkpoint, verify, load.

Part of :class:`.manager.Checkpointer`. ``restore()`` first settles pending commits: it waits
(bounded) for those the launch agent is committing, and commits a save whose files and markers
are complete on every node but whose manifest never got written (its workers died, with or
without their host). Then it tries the complete checkpoints newest first, fetching and
verifying only what this node's ranks read.

Transient is not corrupt: a store that fails past its retries fails the job with one line naming
the object; only a mismatch (size, checksum, manifest) makes a checkpoint corrupt, which falls
back to the one before it, logged as an error; newer steps are kept (see ``layout.retention``).
"""
from __future__ import annotations

import json
import logging
import os
import time

from torch.distributed.checkpoint.api import CheckpointException

from ..badbatch import BadBatchError
from ..gather import gather_json
from ..storage import StorageError
from .commit import (CLAIM, SavePlan, abandon_incomplete, commit_with_deadline, markers_missing, open_run_store,
                     pending_steps, store_steps)
from .layout import MANIFEST, Manifest, ManifestError, resume_order, step_dir
from .skips import SKIPS, Skips, read_skips, rollback_target, with_rollback, write_skips
from .state import restore_rng
from .transfer import CorruptCheckpoint, ensure_member
from .universal import UniversalError, resume_mode

__all__ = ["CheckpointLoadError", "Restorer", "ResumeMismatch", "config_json", "first_line"]

log = logging.getLogger(__name__)


class ResumeMismatch(RuntimeError):
    """A checkpoint this run cannot continue (its data order, say): a configuration error, not corruption."""


class CheckpointLoadError(RuntimeError):
    """Loading failed for a reason that is neither corruption nor storage (the message says which)."""


def verdict(err: BaseException | None) -> str:
    """``ok``, ``corrupt`` (a mismatch: fall back), ``storage`` (the store failed: stop) or ``error``."""
    if err is None:
        return "ok"
    if isinstance(err, (CorruptCheckpoint, ManifestError, json.JSONDecodeError, KeyError)):
        return "corrupt"
    return "storage" if isinstance(err, StorageError) else "error"


class Restorer:
    """The restore half of Checkpointer (which sets store, local, local_root, group, ranks, ck)."""

    def _agree(self, err: BaseException | None, peer_failed: bool = False) -> None:
        """Every rank's verdict; a store failure or another error stops the job on every rank alike,
        a mismatch anywhere makes the checkpoint corrupt. ``peer_failed``: this rank only saw
        another rank's failure (DCP hands every rank a copy), so its own verdict does not count."""
        mine = "peer" if peer_failed and verdict(err) != "ok" else verdict(err)
        votes = gather_json([mine, first_line(err) if err is not None else ""], self.group)
        for kind, cls in (("storage", StorageError), ("error", CheckpointLoadError), ("corrupt", CorruptCheckpoint)):
            bad = [f"rank {r}: {text}" for r, (v, text) in enumerate(votes) if v == kind]
            if bad:
                raise cls("; ".join(bad[:3]))
        if any(v == "peer" for v, _ in votes):
            raise CheckpointLoadError("; ".join(f"rank {r}: {t}" for r, (v, t) in enumerate(votes) if v != "ok")[:500])

    def _rank0(self, fn):
        """Run ``fn`` on rank 0 and share its JSON result; its failure is raised on every rank."""
        value, error = None, None
        if self.rank == 0:
            try:
                value = fn()
            except (OSError, ValueError) as err:
                error = err
        self._agree(error)
        return gather_json(value if self.rank == 0 else None, self.group)[0]

    # ---- pending commits ----------------------------------------------------------------
    def _settle_pending(self) -> None:
        """Wait for the agent's commits in flight, then commit saves complete on every node."""
        mine = []
        if self.local_rank == 0:
            for step in abandon_incomplete(self.local_root, "of an earlier attempt exited"):
                log.warning("checkpoint step %d was not written by every rank of the earlier attempt: not used", step)
            deadline = time.monotonic() + self.ck.upload_timeout_s
            while self.agent and any(_claimed_by_launcher(d) for d in pending_steps(self.local_root)):
                if time.monotonic() > deadline:
                    log.warning("checkpoint: the launch agent's commit did not finish within "
                                "checkpoint.upload_timeout_s; resuming from what is committed")
                    break
                time.sleep(0.2)
            for directory in pending_steps(self.local_root):
                plan = SavePlan.read(directory)
                if plan.num_nodes == self.num_nodes and not markers_missing(directory, plan):
                    mine.append([plan.step, plan.token])
        nodes = [set(map(tuple, found)) for r, found in enumerate(gather_json(mine, self.group))
                 if self._is_first_of_node(r)]
        everywhere = sorted(set.intersection(*nodes)) if nodes else []
        if self.store is None and self.num_nodes > 1:
            everywhere = []  # without a shared store, nodes cannot agree on a manifest
        ok = None
        if self.local_rank == 0:
            for step, token in everywhere:
                log.warning("checkpoint step %d was saved on every node but never committed: committing it now",
                            step)
                directory = self.local_root / step_dir(step)
                try:
                    commit_with_deadline(directory, SavePlan.read(directory), self.store, self.local,
                                         self.ck.upload_timeout_s)
                except (OSError, TimeoutError) as err:
                    ok = err
                    break
        if ok is not None:
            log.warning("checkpoint: committing a pending save failed (%s); resuming from what is committed",
                        first_line(ok))
        gather_json(None, self.group)  # every node's commit is done before anyone lists

    def _is_first_of_node(self, rank: int) -> bool:
        return self.nodes.index(self.nodes[rank]) == rank

    # ---- choosing -----------------------------------------------------------------------
    def _candidates(self) -> list[tuple[str, int]]:
        """(where, step) newest first, decided by rank 0 and shared. An explicit checkpoint.resume=URI
        is used only while this run has no complete checkpoint of its own (a restart continues)."""
        def find() -> list:
            if self.ck.resume == "never":
                return []
            where = "store" if self.store is not None else "local"
            steps = store_steps(self.store or self.local)
            poisoned = set(self.skips.poisoned)
            found = [(where, s) for s in resume_order([s for s, ok in steps.items() if ok and s not in poisoned])]
            newest = max((s for _, s in found), default=-1)
            for step in sorted(s for s, ok in steps.items() if not ok and s > newest):
                log.warning("checkpoint step %d has no manifest (its save never completed): skipped", step)
            if not found and self.resume is not None:
                found = [("explicit", self.resume.step)]
            return found

        return [tuple(c) for c in self._rank0(find)]

    def _manifest(self, where: str, step: int, store) -> Manifest:
        def read():
            if where == "local":
                path = self.local_root / step_dir(step) / MANIFEST
                return path.read_text() if path.exists() else None
            name = self.resume.step_name if where == "explicit" else step_dir(step)
            return store.read_text(f"{name}/{MANIFEST}")

        text = self._rank0(read)
        if text is None:
            raise CorruptCheckpoint(f"checkpoint step {step}: manifest missing")
        manifest = Manifest.parse(text, f"checkpoint step {step} manifest")
        if manifest.step != step:
            raise CorruptCheckpoint(f"the manifest of step {step} describes step {manifest.step}")
        return manifest

    def load_skips(self) -> Skips:
        """The run's ``skipped_batches.json`` (rank 0 reads it, every rank gets it)."""
        text = self._rank0(lambda: read_skips(self.store or self.local).to_json())
        return Skips.parse(text, SKIPS)

    def roll_back(self, bad_step: int, reason: str, state, loader) -> int:
        """Record bad step ``bad_step`` in skipped_batches.json (skipped from now on; checkpoints at or
        after it poisoned), then restore the newest clean checkpoint before it; returns its step."""
        self.wait()  # a save in flight (of a clean step) commits first

        def record() -> dict:
            store = self.store or self.local
            skips = read_skips(store)
            committed = [s for s, ok in store_steps(store).items() if ok]
            target = rollback_target(skips, bad_step, committed)
            if target:
                write_skips(store, with_rollback(skips, bad_step, reason, committed))
            return {"target": target, "url": store.url(SKIPS)}

        recorded = self._rank0(record)
        target = recorded["target"]
        if not target:
            raise BadBatchError(f"step {bad_step}: {reason}; there is no clean checkpoint before it to roll back to "
                                "(save more often: checkpoint.every_steps)")
        if self.rank == 0:
            log.warning("step %d: %s: rolling back to checkpoint step %d and skipping that batch from now on "
                        "(recorded in %s)", bad_step, reason, target, recorded["url"])
        restored = self.restore(state, loader, only=target)  # whatever checkpoint.resume says
        if restored != target:
            raise BadBatchError(f"step {bad_step}: {reason}; the rollback to checkpoint step {target} failed")
        return restored

    def restore(self, state, loader, only: int | None = None) -> int:
        """Load the newest usable checkpoint into ``state`` and ``loader``; returns its step (0: none).
        Checkpoints poisoned by a bad batch are passed over; ``self.skips`` holds the run's skips.
        ``only``: that step of this run (a rollback), whatever checkpoint.resume says."""
        self._settle_pending()
        self.skips = self.load_skips()
        candidates = [("store" if self.store is not None else "local", only)] if only else self._candidates()
        for where, step in candidates:
            store = self.store if where == "store" else None
            if where == "explicit":
                store = open_run_store(self.resume.base, self.resume.run_id, self.ck)
            try:
                manifest = self._manifest(where, step, store)
                extras = self._load(manifest, state, loader, store)
            except (CorruptCheckpoint, ManifestError) as err:
                if self.rank == 0:
                    log.error("checkpoint step %d is corrupt (%s): falling back to the one before it. Newer "
                              "checkpoints are kept; set checkpoint.resume to the one to continue from to drop them",
                              step, err)
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
                                    "could be loaded (see the errors above); fix or remove them, or set "
                                    "checkpoint.resume=never to start over")
        return 0

    def _check_compatible(self, manifest: Manifest) -> None:
        if manifest.backend != self.backend:
            raise CorruptCheckpoint(f"step {manifest.step} was written by the {manifest.backend} backend, "
                                    f"this run uses {self.backend}")
        saved_config, our_config = manifest.extra.get("config") or {}, config_json(self.config, self.model_fingerprint)
        if self.backend == "deepspeed":  # another world size: a universal checkpoint, where DeepSpeed has one
            try:
                resume_mode(saved_config.get("parallel") or {}, our_config["parallel"], manifest.world_size,
                            self.world_size, manifest.step)
            except UniversalError as err:
                raise ResumeMismatch(str(err)) from None
        saved, ours = saved_config.get("model"), our_config["model"]
        if saved is not None and saved != ours:
            raise CorruptCheckpoint(f"step {manifest.step} holds another model ({saved}); this run's is "
                                    f"{ours} (set checkpoint.run_id per model)")

    def _load(self, manifest: Manifest, state, loader, store) -> dict:
        """Fetch and verify this rank's files, agree, then load: no rank enters a collective alone."""
        root = self.local_root / step_dir(manifest.step)
        error, extras = None, {}
        try:
            self._check_compatible(manifest)
            state.prefetch(manifest, root, store, self.local_rank)  # the big files first, in the background
            same_world = manifest.world_size == self.world_size
            name = f"rank-{self.rank:05d}.json" if same_world else "rank-00000.json"
            extras = json.loads(ensure_member(manifest, name, root, store).read_text())
            if not same_world:
                extras.pop("rng", None)  # another world: RNG streams do not map rank to rank
            extras["loader"]  # noqa: B018 - a verified state without it is corrupt
        except Exception as err:  # noqa: BLE001 - sorted by verdict(); every rank must agree first
            error = err
        try:
            self._agree(error)
            try:  # the data position first: a layout it cannot continue is a clear error, not a fallback
                loader.load_state_dict(extras["loader"])
            except ValueError as err:
                raise ResumeMismatch(f"checkpoint step {manifest.step}: {err}") from None
        except BaseException:
            state.discard_prefetch()  # no load follows: stop what prefetch() started
            raise
        error = None
        try:
            state.load(manifest, root, store, self.group)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - every rank must agree first
            error = state.failure or err
        self._agree(error, peer_failed=error is not None and state.failure is None)
        return extras


def _claimed_by_launcher(directory) -> bool:
    """This worker's launch agent is committing that step (a claim left by a dead agent is not)."""
    try:
        return int((directory / CLAIM).read_text().strip() or 0) == os.getppid()
    except (OSError, ValueError):
        return False


def first_line(err: BaseException) -> str:
    """The useful line of an error (DCP wraps the ranks' failures in a long text)."""
    text = str(err)
    for line in text.splitlines():
        if "CorruptCheckpoint" in line or "does not match" in line or "missing" in line:
            return line.strip()[:500]
    return (text.splitlines() or [type(err).__name__])[0][:500]


def config_json(config, model_fingerprint: str = "") -> dict:
    """The job's config as a manifest records it (secrets redacted); ``model_fingerprint`` (a hash of
    model.hf_path's config.json) joins the model section, which a resume must match."""
    from ..config import to_dict
    from ..secrets import is_secret

    body = to_dict(config)
    out = {section: {k: ("<redacted>" if is_secret(k) else v) for k, v in values.items()}
           for section, values in body.items()}
    if model_fingerprint:
        out["model"]["hf_config_sha256"] = model_fingerprint
    return out
