"""Moving checkpoint files: node tars with member offsets, verified fetches, deadlines.

The node tar is plain (no compression) with fixed attributes; each member's data offset is
recorded so a reader fetches exactly that member with one ranged GET and checks its sha256
before anything reads (or unpickles) it.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from pathlib import Path

from ..data.shards import sha256_file
from ..progress import bar
from .layout import Manifest, Member, NodeObject

__all__ = ["CorruptCheckpoint", "TarStream", "ensure_member", "local_members", "run_with_deadline", "sha256_file", "verifying_reader"]


class CorruptCheckpoint(ValueError):
    """A checkpoint file or object does not match its manifest; the message names it."""


class TarStream:
    """A node's files as one uncompressed tar, produced while it is read (no local tar copy).

    ``read(n)`` is what an upload (boto3's multipart ``upload_fileobj``) pulls from; the object's
    sha256, each member's data offset, size and sha256 are known once the stream is exhausted.
    The bytes are those ``tarfile`` would write for the same members (pax format, fixed owner,
    mode and mtime), so any tar reader can open the object.
    """

    def __init__(self, root: Path, names: list[str], progress=None):
        self.root, self.names = root, sorted(names)
        self.progress = progress  # .update(bytes) as the upload pulls them (a progress bar)
        self.digest = hashlib.sha256()
        self.position = 0
        self.members: list[Member] = []
        self._chunks = self._generate()
        self._buffer = b""

    def _generate(self):
        for name in self.names:
            info = tarfile.TarInfo(name)
            path = self.root / name
            info.size, info.mtime, info.mode, info.type = path.stat().st_size, 0, 0o644, tarfile.REGTYPE
            header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
            yield header
            offset, digest = self.position, hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(8 << 20), b""):
                    digest.update(block)
                    yield block
            if info.size % tarfile.BLOCKSIZE:
                yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
            self.members.append(Member(name=name, offset=offset, size=info.size, sha256=digest.hexdigest()))
        end = self.position + 2 * tarfile.BLOCKSIZE
        padding = (-end) % tarfile.RECORDSIZE
        yield b"\0" * (2 * tarfile.BLOCKSIZE + padding)

    def read(self, size: int = -1) -> bytes:
        out = []
        want = size if size is not None and size >= 0 else float("inf")
        got = 0
        while got < want:
            if not self._buffer:
                self._buffer = next(self._chunks, b"")
                if not self._buffer:
                    break
            take = self._buffer[:int(min(want - got, len(self._buffer)))]
            self._buffer = self._buffer[len(take):]
            self.digest.update(take)
            self.position += len(take)
            got += len(take)
            out.append(take)
        if self.progress is not None and got:
            self.progress.update(got)
        return b"".join(out)

    def node_object(self, key: str, node: int) -> NodeObject:
        if next(self._chunks, None) is not None or self._buffer:
            raise RuntimeError("the node tar was not read to its end")
        return NodeObject(key=key, node=node, size=self.position, sha256=self.digest.hexdigest(),
                          members=tuple(self.members))


def local_members(root: Path, names: list[str], key: str, node: int) -> NodeObject:
    """Without tier 2: the node's files as they lie (offsets are virtual, for the checksums)."""
    out, offset = [], 0
    for name in sorted(names):
        size = (root / name).stat().st_size
        out.append(Member(name=name, offset=offset, size=size, sha256=sha256_file(root / name)))
        offset += size
    return NodeObject(key=key, node=node, size=offset, sha256="", members=tuple(out))


def ensure_member(manifest: Manifest, name: str, local_root: Path, store) -> Path:
    """``local_root/name`` verified against the manifest; fetched (one ranged GET) when absent or wrong."""
    try:
        obj, member = manifest.member(name)
    except KeyError:
        raise CorruptCheckpoint(f"step {manifest.step}: {name} is not in the manifest") from None
    path = local_root / name
    if not path.resolve().is_relative_to(local_root.resolve()):
        raise CorruptCheckpoint(f"step {manifest.step}: member name {name!r} leaves the checkpoint directory")
    if path.exists() and path.stat().st_size == member.size and sha256_file(path) == member.sha256:
        return path
    if store is None:
        raise CorruptCheckpoint(f"step {manifest.step}: local {path} is missing or does not match the manifest, "
                                "and there is no checkpoint.uri to fetch it from")
    data = store.get_range(obj.key, member.offset, member.size)
    if hashlib.sha256(data).hexdigest() != member.sha256:
        raise CorruptCheckpoint(f"step {manifest.step}: {name} in {store.uri}/{obj.key} does not match its "
                                "checksum in the manifest")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # ranks of a node may fetch the same member: the last rename wins, same bytes
    return path


def run_with_deadline(fn, timeout_s: float, what: str):
    """``fn()`` in a daemon thread; a TimeoutError names ``what`` when it takes longer (it is left behind)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            result["error"] = err

    worker = threading.Thread(target=target, name=f"deadline:{what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:g}s (checkpoint.upload_timeout_s)")
    if "error" in result:
        raise result["error"]
    return result.get("value")


def verifying_reader(path: str, manifest: Manifest, root: Path, store):
    """DCP's FileSystemReader over the node's step dir: every file is checked against the manifest
    (and fetched with one ranged GET when absent) before DCP opens it, .metadata (a pickle) included."""

    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            ensure_member(manifest, "dcp/.metadata", root, store)
            return super().read_metadata(*args, **kwargs)

        def read_data(self, plan, planner):
            names = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            sizes = [manifest.member(f"dcp/{name}")[1].size for name in names]
            with bar(sum(sizes), f"checkpoint step {manifest.step}: fetch and verify") as shown:
                for name, size in zip(names, sizes):
                    ensure_member(manifest, f"dcp/{name}", root, store)
                    shown.update(size)
            return super().read_data(plan, planner)

    os.makedirs(path, exist_ok=True)
    return Reader(path)
