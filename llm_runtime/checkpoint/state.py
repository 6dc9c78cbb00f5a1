"""What a checkpoint holds for each backend, and this rank's small JSON state.

torch backend: model parts and their optimizers through torch.distributed.checkpoint with
canonical parameter names (a pipeline stage keeps the unsplit model's names), so DCP can
reshard to another layout. DeepSpeed: the engine's own checkpoint files. Both: the step,
the data loader position, the LR schedulers and the RNG states, as JSON (never a pickle).

Both states offer one protocol to the manager:

- ``save(directory, group)``: write this rank's files; a future when the write finishes later;
- ``prefetch(manifest, root, store, local_rank)``: verify (and fetch) what must be checked
  before anything is read, the files a pickle loader opens included;
- ``discard_prefetch()``: stop what ``prefetch`` started in the background when no load follows;
- ``load(manifest, root, store, group)``: read the state back; ``failure`` keeps this rank's
  own storage or checksum error (DCP wraps every rank's errors into one on all ranks);
- ``json_state()`` / ``load_json_state(state)``.
"""
from __future__ import annotations

import base64
import logging
import os
import shutil
from pathlib import Path

import torch

from .transfer import Prefetch, fetch_members, own_dcp_files, verifying_reader

__all__ = ["DeepSpeedState", "TorchState", "restore_rng", "rng_state"]

log = logging.getLogger(__name__)


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _scheduler_state(scheduler) -> dict:
    """LambdaLR's numbers (its lambdas are code, rebuilt by the trainer)."""
    return {"last_epoch": scheduler.last_epoch, "base_lrs": list(scheduler.base_lrs),
            "_step_count": scheduler._step_count, "_last_lr": list(scheduler._last_lr)}


class TorchState:
    def __init__(self, parts, optimizers, schedulers):
        self.parts, self.optimizers, self.schedulers = list(parts), list(optimizers), list(schedulers)
        self.failure: BaseException | None = None
        self._stager = None
        self._prefetch: Prefetch | None = None

    def save(self, directory: Path, group):
        """DCP's async save (its own gloo group, so training never shares a collective with it),
        staged by DCP's DefaultStager, kept for the run: it copies each tensor's local shard into a
        CPU buffer it reuses at the next save (pinned on GPU). FileSystemWriter's own staging
        deep-copies every DTensor, 3-4x slower while training waits (benchmarks/checkpoint_peers.py)."""
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(self.dcp_state(), storage_writer=dcp.FileSystemWriter(str(directory / "dcp")),
                              process_group=group, async_stager=self.stager())

    def stager(self):
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            pinned = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=pinned, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        return self._stager

    def prefetch(self, manifest, root: Path, store, local_rank: int) -> None:
        """Start fetching, in the background, .metadata and (on the layout that saved it) this rank's
        own data files, so the download overlaps the rank state, the agreement and DCP's planning;
        the reader waits for each (and its checksum) before DCP opens it."""
        self.discard_prefetch()
        import torch.distributed as dist

        own = own_dcp_files(manifest.member_names(), dist.get_rank()) \
            if manifest.world_size == dist.get_world_size() else []
        self._prefetch = Prefetch(manifest, ["dcp/.metadata", *own], root, store)

    def discard_prefetch(self) -> None:
        """Stop (and wait for) the background fetches of :meth:`prefetch` when no load follows."""
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def load(self, manifest, root: Path, store, group) -> None:
        import torch.distributed.checkpoint as dcp

        self.failure = None
        loaded = self.dcp_state()
        reader = verifying_reader(str(root / "dcp"), manifest, root, store, self._prefetch)
        try:
            dcp.load(loaded, storage_reader=reader, process_group=group)  # errors reach every rank
        finally:
            self.failure = reader.failure
            self.discard_prefetch()
        self.load_dcp(loaded)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model, optim = {}, {}
        for part, optimizer in zip(self.parts, self.optimizers):
            model.update(get_model_state_dict(part))
            optim.update(get_optimizer_state_dict(part, optimizer, options=self._options()))
        return {"model": model, "optim": optim}

    def load_dcp(self, loaded: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        for part, optimizer in zip(self.parts, self.optimizers):
            # The names DCP saved under (a replicated part's own state_dict() spells them otherwise).
            names = set(get_model_state_dict(part).keys())
            set_model_state_dict(part, {k: v for k, v in loaded["model"].items() if k in names})
            keys = get_optimizer_state_dict(part, optimizer, options=self._options()).keys()
            set_optimizer_state_dict(part, optimizer, {k: loaded["optim"][k] for k in keys}, options=self._options())

    def json_state(self) -> dict:
        return {"schedulers": [_scheduler_state(s) for s in self.schedulers]}

    def load_json_state(self, state: dict) -> None:
        saved = list(state.get("schedulers", ()))
        for index, scheduler in enumerate(self.schedulers):  # another part count: every part at the first's step
            if saved:
                scheduler.load_state_dict({**scheduler.state_dict(), **saved[min(index, len(saved) - 1)]})


class DeepSpeedState:
    """DeepSpeed's engine writes and reads its own files (torch.load of pickles: the runtime
    verifies every file against the manifest first). A ZeRO checkpoint of another world size is
    converted to DeepSpeed's universal checkpoint first (see ``universal.py``)."""
    tag = "state"

    def __init__(self, engine, timeout_s: float = 3600.0):
        self.engine, self.timeout_s = engine, timeout_s
        self.failure: BaseException | None = None

    def save(self, directory: Path, group) -> None:
        """Synchronous (the engine's own writer); the upload is still in the background."""
        self.engine.save_checkpoint(str(directory / "ds"), tag=self.tag, save_latest=False)

    def _universal(self, manifest) -> bool:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        return manifest.world_size != world and self.engine.zero_optimization_stage() > 0

    def discard_prefetch(self) -> None:
        pass  # prefetch() runs in the foreground here

    def prefetch(self, manifest, root: Path, store, local_rank: int) -> None:
        """DeepSpeed reads files by its own names: local rank 0 fetches them all, verified, and drops
        files no manifest lists (a stale layout's); the node's other ranks wait for it afterwards."""
        if local_rank != 0:
            return
        wanted = sorted(n for n in manifest.member_names() if n.startswith("ds/"))
        fetch_members(manifest, wanted, root, store)
        for path in (root / "ds").rglob("*") if (root / "ds").exists() else ():
            if path.is_file() and str(path.relative_to(root)) not in set(wanted):
                path.unlink()
        if self._universal(manifest):
            self._convert(manifest, root, sum(manifest.member(n)[1].size for n in wanted))

    def _convert(self, manifest, root: Path, ds_bytes: int) -> None:
        from .universal import SPACE_FACTOR, check_space, convert

        target = root / "ds-universal"
        shutil.rmtree(target, ignore_errors=True)  # an interrupted conversion's
        check_space(int(ds_bytes * SPACE_FACTOR), shutil.disk_usage(root).free, root, manifest.step)
        seconds = convert(root / "ds" / self.tag, target / self.tag, self.timeout_s)
        log.warning(
            "checkpoint step %d: converted from %d DeepSpeed ranks to a universal checkpoint in %.1fs "
            "(%.1f MB of DeepSpeed files)", manifest.step, manifest.world_size, seconds, ds_bytes / 1e6)

    def load(self, manifest, root: Path, store, group) -> None:
        universal = self._universal(manifest)
        source = root / ("ds-universal" if universal else "ds")
        self.engine._config.load_universal_checkpoint = universal  # the engine reads it at load time
        try:
            path, _ = self.engine.load_checkpoint(str(source), tag=self.tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {source}")
        if universal:  # every rank of the node has read it: the converted copy goes
            import torch.distributed as dist

            dist.barrier(group=group)
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                shutil.rmtree(source, ignore_errors=True)

    def json_state(self) -> dict:
        return {}

    def load_json_state(self, state: dict) -> None:
        pass
