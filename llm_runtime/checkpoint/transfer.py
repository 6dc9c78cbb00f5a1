"""Moving checkpoint files: node tars with member offsets, verified fetches, deadlines.

The node tar is plain (no compression) with fixed attributes; each member's data offset is
recorded so a reader fetches exactly that member with ranged GETs and checks its sha256
before anything reads (or unpickles) it. Fetches and verifies stream: they hash while reading
and hold one block, never a whole member.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..data.shards import sha256_file
from ..progress import bar
from ..storage import ObjectMissing
from .layout import Manifest, Member, NodeObject
from .replica import peer_fetch

__all__ = ["CorruptCheckpoint", "Prefetch", "TarStream", "ensure_member", "fetch_members", "local_members",
           "own_dcp_files", "run_with_deadline", "sha256_file", "verify_object", "verifying_reader"]

BLOCK = 8 << 20  # what a fetch or a verify holds in memory at once
FETCH_THREADS = 4
PART = 8 << 20  # a member larger than this is fetched as parallel ranged GETs of about this size
PART_THREADS = 4


class CorruptCheckpoint(ValueError):
    """A checkpoint file or object does not match its manifest; the message names it."""


class TarStream:
    """A node's files as one uncompressed tar, produced while it is read (no local tar copy).

    ``read(n)`` is what an upload (boto3's multipart ``upload_fileobj``) pulls from; each member's
    data offset, size and sha256, and the object's tree digest (``NodeObject.tree_sha256``), are
    known once the stream is exhausted. Every byte is hashed once: on 2 cores a second sha256 of
    the whole object was a third of the uploader's CPU, taken from training.
    The bytes are those ``tarfile`` would write for the same members (pax format, fixed owner,
    mode and mtime), so any tar reader can open the object.
    """

    def __init__(self, root: Path, names: list[str], progress=None):
        self.root, self.names = root, sorted(names)
        self.progress = progress  # .update(bytes) as the upload pulls them (a progress bar)
        self.tree = hashlib.sha256()  # headers and padding as they are, each member's data as its digest
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
            self.tree.update(header)
            yield header
            offset, digest = self.position, hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(8 << 20), b""):
                    digest.update(block)
                    yield block
            self.tree.update(digest.digest())
            if info.size % tarfile.BLOCKSIZE:
                padding = b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
                self.tree.update(padding)
                yield padding
            self.members.append(Member(name=name, offset=offset, size=info.size, sha256=digest.hexdigest()))
        end = self.position + 2 * tarfile.BLOCKSIZE
        trailer = b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)
        self.tree.update(trailer)
        yield trailer

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
            self.position += len(take)
            got += len(take)
            out.append(take)
        if self.progress is not None and got:
            self.progress.update(got)
        return b"".join(out)

    def node_object(self, key: str, node: int) -> NodeObject:
        if next(self._chunks, None) is not None or self._buffer:
            raise RuntimeError("the node tar was not read to its end")
        return NodeObject(key=key, node=node, size=self.position, sha256="", members=tuple(self.members),
                          tree_sha256=self.tree.hexdigest())


def local_members(root: Path, names: list[str], key: str, node: int) -> NodeObject:
    """Without tier 2: the node's files as they lie (offsets are virtual, for the checksums)."""
    out, offset = [], 0
    for name in sorted(names):
        size = (root / name).stat().st_size
        out.append(Member(name=name, offset=offset, size=size, sha256=sha256_file(root / name)))
        offset += size
    return NodeObject(key=key, node=node, size=offset, sha256="", members=tuple(out))


def ensure_member(manifest: Manifest, name: str, local_root: Path, store) -> Path:
    """``local_root/name`` verified against the manifest; fetched (ranged GETs, hashed as it is
    written) when absent or wrong. A mismatch is CorruptCheckpoint; a store that fails
    (its retries spent) raises its StorageError: transient is not corrupt."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    if manifest.num_nodes > 1 and peer_fetch(manifest, obj, member, path, store):  # the job's network first
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        digest = _fetch(store, obj.key, member.offset, member.size, tmp, manifest.step)
        if digest != member.sha256:
            raise CorruptCheckpoint(f"step {manifest.step}: {name} in {store.url(obj.key)} does not match its "
                                    "checksum in the manifest")
        os.replace(tmp, path)  # ranks of a node may fetch the same member: the last rename wins, same bytes
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fetch(store, key: str, offset: int, size: int, dest: Path, step: int) -> str:
    """Bytes ``[offset, offset + size)`` of ``key`` written to ``dest``; their sha256. A member
    larger than one part is fetched as ``PART``-sized ranged GETs in parallel (one stream runs at
    a fraction of what S3 serves a node), each written at its place while the parts before it are
    hashed in order from the page cache: memory stays at one block per stream."""
    parts = part_ranges(offset, size, PART)
    digest = hashlib.sha256()
    try:
        with open(dest, "wb") as sink:
            sink.truncate(size)
        if len(parts) == 1:
            _fetch_part(store, key, offset, size, dest, 0, digest)
            return digest.hexdigest()
        with ThreadPoolExecutor(max_workers=min(PART_THREADS, len(parts)),
                                thread_name_prefix="checkpoint-part") as pool:
            futures = [pool.submit(_fetch_part, store, key, start, length, dest, start - offset)
                       for start, length in parts]
            try:
                with open(dest, "rb", buffering=0) as written:  # no read-ahead into parts not yet written
                    for future, (start, length) in zip(futures, parts):
                        future.result()
                        for block in _blocks(written, start - offset, length):
                            digest.update(block)
            finally:
                for future in futures:
                    future.cancel()
    except ObjectMissing:
        raise CorruptCheckpoint(f"step {step}: {store.url(key)}, listed in the manifest, does not exist") from None
    return digest.hexdigest()


def _blocks(handle, at: int, length: int):
    """``length`` bytes of ``handle`` from ``at``, a block at a time."""
    handle.seek(at)
    while length > 0:
        block = handle.read(min(BLOCK, length))
        if not block:
            raise OSError(f"{handle.name}: ended {length} bytes early")
        length -= len(block)
        yield block


def part_ranges(offset: int, size: int, part: int) -> list[tuple[int, int]]:
    """(start, length) of the ranged GETs that fetch ``[offset, offset + size)`` (pure); a tail
    shorter than half a part joins the part before it."""
    count = max(1, size // part + (size % part >= part // 2))
    bounds = [offset + size * i // count for i in range(count + 1)]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


def _fetch_part(store, key: str, start: int, length: int, dest: Path, at: int, digest=None) -> None:
    """One ranged GET streamed into ``dest`` at ``at`` (hashed on the way when ``digest`` is given)."""
    stream = store.open_range(key, start, length)
    try:
        with open(dest, "r+b") as sink:
            sink.seek(at)
            for block in iter(lambda: stream.read(BLOCK), b""):
                if digest is not None:
                    digest.update(block)
                sink.write(block)
    finally:
        stream.close()


class _ObjectHasher:
    """Hashes a node object as it streams past: each member, the tree digest (the bytes between
    members as they are, each member as its digest when it ends) and, for objects written before
    the tree digest, the whole object."""

    def __init__(self, obj: NodeObject):
        self.members = sorted(obj.members, key=lambda m: m.offset)
        self.hashers = [hashlib.sha256() for _ in self.members]
        self.tree, self.whole = hashlib.sha256(), hashlib.sha256() if obj.sha256 else None
        self.position, self.current = 0, 0  # bytes seen; the first member not yet complete

    def update(self, block: bytes) -> None:
        if self.whole is not None:
            self.whole.update(block)
        view, start = memoryview(block), self.position
        cursor, end = start, start + len(block)
        while cursor < end or self._member_ends_at(cursor):
            if self.current < len(self.members) and cursor >= self.members[self.current].offset:
                member, hasher = self.members[self.current], self.hashers[self.current]
                stop = min(end, member.offset + member.size)
                hasher.update(view[cursor - start:stop - start])
                if stop == member.offset + member.size:
                    self.tree.update(hasher.digest())
                    self.current += 1
                cursor = stop
            else:
                stop = min(end, self.members[self.current].offset) if self.current < len(self.members) else end
                self.tree.update(view[cursor - start:stop - start])
                cursor = stop
        self.position = end

    def _member_ends_at(self, cursor: int) -> bool:  # an empty member right at the end of a block
        return self.current < len(self.members) and self.members[self.current].offset == cursor and \
            self.members[self.current].size == 0

    def problems(self, obj: NodeObject) -> list[str]:
        whole_ok = self.whole is None or self.whole.hexdigest() == obj.sha256
        tree_ok = not obj.tree_sha256 or self.tree.hexdigest() == obj.tree_sha256
        out = [] if whole_ok and tree_ok else [f"{obj.key}: object checksum does not match the manifest"]
        return out + [f"{obj.key}: member {m.name} does not match the manifest"
                      for m, h in zip(self.members, self.hashers) if h.hexdigest() != m.sha256]


def verify_object(store, obj: NodeObject) -> list[str]:
    """Stream one node object once, hashing it (memory: one block); the problems found, each
    naming the object (a missing object is one)."""
    hasher = _ObjectHasher(obj)
    try:
        stream = store.open_range(obj.key, 0, obj.size)
        try:
            for block in iter(lambda: stream.read(BLOCK), b""):
                hasher.update(block)
        finally:
            stream.close()
    except ObjectMissing:
        return [f"{obj.key}: listed in the manifest, does not exist"]
    return hasher.problems(obj)


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


def fetch_members(manifest: Manifest, names: list[str], root: Path, store) -> None:
    """Several members verified (and fetched when needed) at once, ``FETCH_THREADS`` at a time."""
    sizes = [manifest.member(name)[1].size if name in set(manifest.member_names()) else 0 for name in names]
    with bar(sum(sizes), f"checkpoint step {manifest.step}: fetch and verify") as shown, \
            ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="checkpoint-fetch") as pool:
        for size in pool.map(lambda name: ensure_member(manifest, name, root, store).stat().st_size, names):
            shown.update(size)


def own_dcp_files(names: list[str], rank: int) -> list[str]:
    """The DCP data files rank ``rank`` wrote (FileSystemWriter names them ``__<rank>_<i>.distcp``):
    what the same rank reads back when the layout is unchanged (pure)."""
    return [name for name in names if name.startswith(f"dcp/__{rank}_") and name.endswith(".distcp")]


class Prefetch:
    """Members fetched and verified in the background (``FETCH_THREADS`` at a time) while the ranks
    agree and plan the load; :meth:`take` waits for the ones it holds and returns the others."""

    def __init__(self, manifest: Manifest, names: list[str], root: Path, store):
        self._pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="checkpoint-prefetch")
        self._futures = {name: self._pool.submit(ensure_member, manifest, name, root, store) for name in names}

    def take(self, names: list[str]) -> list[str]:
        """Wait for the prefetched ``names`` (their fetch or checksum error is raised); the rest."""
        for name in names:
            if name in self._futures:
                self._futures[name].result()
        return [name for name in names if name not in self._futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def verifying_reader(path: str, manifest: Manifest, root: Path, store, prefetched: Prefetch | None = None):
    """DCP's FileSystemReader over the node's step dir: every file is checked against the manifest
    (and fetched with ranged GETs when absent) before DCP opens it, .metadata (a pickle) included;
    files ``prefetched`` holds were checked there."""

    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        failure: BaseException | None = None
        """This rank's own fetch or checksum error (DCP hands every rank a wrapped copy of all of them)."""

        def _checked(self, names: list[str]) -> None:
            try:
                if prefetched is not None:
                    names = prefetched.take(names)
                fetch_members(manifest, names, root, store)
            except BaseException as err:
                self.failure = err
                raise

        def read_metadata(self, *args, **kwargs):
            self._checked(["dcp/.metadata"])
            return super().read_metadata(*args, **kwargs)

        def read_data(self, plan, planner):
            names = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
            self._checked([f"dcp/{name}" for name in names])
            return super().read_data(plan, planner)

    os.makedirs(path, exist_ok=True)
    return Reader(path)
