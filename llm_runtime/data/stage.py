"""``data.mode=stage``: copy the shards once per host to local disk, verified, before training.

Local rank 0 of each host copies (s5cmd for S3, a plain copy for a POSIX path), checks every
shard's sha256 against index.json and then writes a marker; the host's other ranks wait for
the marker (or the failure marker) with a timeout. A verified copy is reused by later runs
on the same disk: the directory is named after the index's fingerprint.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..progress import bar
from ..workerenv import launch_tag
from .shards import ShardIndex, sha256_file
from ..storage.bulk import download_many

__all__ = ["StageError", "stage"]

log = logging.getLogger(__name__)
DONE, FAILED = ".staged", ".staging-failed"
WAIT_MARGIN_S = 30.0


class StageError(OSError):
    """The staging copy failed or did not arrive in time; the message names the host's copy."""


def default_stage_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "llm_runtime", "data")


def _copy_and_verify(uri: str, index: ShardIndex, dest: Path, timeout_s: float) -> None:
    """Copy, then verify, all within ``timeout_s`` (checked between files for the local copy)."""
    deadline = time.monotonic() + timeout_s

    def check_deadline(what: str) -> None:
        if time.monotonic() > deadline:
            raise StageError(f"staging {uri} took longer than data.stage_timeout_s={timeout_s:g}s ({what})")

    names = [shard.name for shard in index.shards]
    dest.mkdir(parents=True, exist_ok=True)
    if uri.startswith("s3://"):
        download_many(uri, [(name, dest / name) for name in names], timeout_s, workdir=dest)
    else:
        with bar(sum(s.bytes for s in index.shards), f"staging {len(names)} shards: copy") as shown:
            for shard, name in zip(index.shards, names):
                check_deadline("copying")
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(os.path.join(uri, name), dest / name)
                shown.update(shard.bytes)

    def digest(name: str) -> str:
        check_deadline("verifying checksums")
        value = sha256_file(dest / name)
        shown.update((dest / name).stat().st_size)
        return value

    with ThreadPoolExecutor(max_workers=4) as pool, \
            bar(sum(s.bytes for s in index.shards), f"staging {len(names)} shards: verify") as shown:
        digests = list(pool.map(digest, names))
    for shard, digest in zip(index.shards, digests):
        if digest != shard.sha256:
            raise StageError(f"staged copy of shard {shard.name} from {uri} does not match index.json "
                             f"(sha256 {digest[:12]}..., expected {shard.sha256[:12]}...)")
    (dest / "index.json").write_text(index.to_json())


def stage(uri: str, index: ShardIndex, fingerprint: str, *, stage_dir: str, local_rank: int,
          timeout_s: float) -> str:
    """Return the local directory holding a verified copy of the shards at ``uri``."""
    dest = Path(stage_dir or default_stage_dir()) / fingerprint
    done, failed = dest / DONE, dest / FAILED
    tag = launch_tag()
    if local_rank == 0:
        if done.exists():
            log.info("data: reusing the verified copy of %s at %s", uri, dest)
            return str(dest)
        failed.unlink(missing_ok=True)
        started = time.monotonic()
        try:
            _copy_and_verify(uri, index, dest, timeout_s)
        except Exception as err:
            dest.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{tag}\n{err}")
            raise StageError(f"staging {uri} to {dest}: {err}") from None
        done.write_text(fingerprint)
        log.info("data: staged %d shards (%d bytes) from %s to %s in %.1fs, checksums verified",
                 len(index.shards), sum(s.bytes for s in index.shards), uri, dest, time.monotonic() - started)
        return str(dest)
    started_wall = time.time()
    margin = min(WAIT_MARGIN_S, timeout_s)
    deadline = time.monotonic() + timeout_s + margin  # local rank 0's own deadline, plus a margin
    while time.monotonic() < deadline:
        if done.exists():
            return str(dest)
        if failed.exists():
            owner, _, message = failed.read_text().partition("\n")
            # This launch's failure (same launcher run and restart), or a fresh one without a launcher.
            if (tag and owner == tag) or (not tag and failed.stat().st_mtime >= started_wall - 60):
                raise StageError(f"local rank 0 failed to stage {uri}: {message}")
        time.sleep(0.2)
    raise StageError(f"local rank {local_rank} waited {timeout_s + margin:g}s (data.stage_timeout_s plus "
                     f"{margin:g}s) for local rank 0 to stage {uri} to {dest}")


