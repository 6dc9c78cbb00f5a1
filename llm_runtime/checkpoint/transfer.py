"""Moving checkpoint files: node tars with member offsets, verified fetches, JSON over a process group.

The node tar is plain (no compression) with fixed attributes; each member's data offset is
recorded so a reader fetches exactly that member with one ranged GET and checks its sha256
before anything reads (or unpickles) it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from .layout import Manifest, Member, NodeObject

__all__ = ["CorruptCheckpoint", "build_node_tar", "ensure_member", "gather_json", "run_with_deadline", "sha256_file"]


class CorruptCheckpoint(ValueError):
    """A checkpoint file or object does not match its manifest; the message names it."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _Hashing:
    """A file wrapper that hashes what passes through it (one pass for tar, object and members)."""

    def __init__(self, handle):
        self.handle, self.digest, self.position = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.position += len(data)
        return self.handle.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def tell(self) -> int:
        return self.position

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def build_node_tar(root: Path, names: list[str], tar_path: Path, key: str, node: int) -> NodeObject:
    """Pack ``names`` (relative to ``root``) into one tar in a single pass; returns its manifest entry."""
    members = []
    with open(tar_path, "wb") as raw:
        sink = _Hashing(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(names):
                info = tar.gettarinfo(str(root / name), arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
                data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                with open(root / name, "rb") as handle:
                    source = _Hashing(handle)
                    tar.addfile(info, source)
                members.append(Member(name=name, offset=data_offset, size=info.size, sha256=source.hexdigest()))
    return NodeObject(key=key, node=node, size=os.path.getsize(tar_path), sha256=sink.hexdigest(),
                      members=tuple(members))


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


def gather_json(value, group) -> list:
    """Every rank's JSON-able ``value``, in rank order (bytes over the group; no pickles)."""
    payload = json.dumps(value).encode()
    world = dist.get_world_size(group)
    size = torch.tensor([len(payload)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s.item()) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8)
    buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else buffer[:0]
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(buffers, buffer, group=group)
    return [json.loads(b[:int(s.item())].numpy().tobytes()) for b, s in zip(buffers, sizes)]


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
