"""The token-shard format: webdataset-style tar files of fixed-length token sequences + index.json.

Each sample is ``seq_len + 1`` tokens (inputs and the shifted targets of one sequence) stored
as a ``.tokens.npy`` member; shards are written with a fixed mtime, owner and order, so the
same inputs always give byte-identical files. ``index.json`` lists every shard with its sample
count, size and sha256, which is how readers verify staged copies.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "INDEX_NAME", "RecordLayout", "check_member_name", "sha256_file", "ShardIndex", "ShardInfo", "bytes_per_sample", "read_index", "read_shard",
           "token_dtype", "write_shard"]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
_MEMBER = re.compile(r"^[A-Za-z0-9._\-]+(/[A-Za-z0-9._\-]+)*$")


def check_member_name(name: str, where: str) -> str:
    """A shard or member name from an index: a relative path of plain characters, no '.' or '..' parts
    (nothing that could leave the data directory or mean something to a shell, s5cmd or a glob)."""
    if not _MEMBER.match(name) or any(p in (".", "..") for p in name.split("/")):
        raise ValueError(f"{where}: name {name!r} is not a plain relative path")
    return name


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardIndex:
    seq_len: int
    tokenizer: str
    vocab_size: int
    dtype: str
    shards: list[ShardInfo] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def total_samples(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def to_json(self) -> str:
        body = asdict(self)
        body["total_samples"] = self.total_samples
        body["total_tokens"] = self.total_samples * (self.seq_len + 1)
        return json.dumps(body, indent=1, sort_keys=True) + "\n"


def read_index(text: str, source: str) -> ShardIndex:
    """Parse index.json; a ValueError names the source and what is wrong."""
    try:
        body = json.loads(text)
        if body.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {body.get('format_version')!r}, this reader knows {FORMAT_VERSION}")
        shards = [ShardInfo(**entry) for entry in body["shards"]]
        return ShardIndex(seq_len=int(body["seq_len"]), tokenizer=str(body["tokenizer"]),
                          vocab_size=int(body["vocab_size"]), dtype=str(body["dtype"]), shards=shards)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source} is not a valid shard index: {err}") from None


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def bytes_per_sample(seq_len: int, dtype: np.dtype) -> int:
    """How many bytes one sample adds to a shard, tar header and padding included (measured)."""
    import tarfile

    from webdataset import TarWriter

    buffer = io.BytesIO()
    with TarWriter(buffer, mtime=0.0) as tar:
        for key in range(2):
            tar.write({"__key__": f"{key:012d}", "tokens.npy": _npy_bytes(np.zeros(seq_len + 1, dtype))})
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        members = tar.getmembers()
    return members[-1].offset - members[0].offset


def sha256_file(path: Path) -> str:
    """A file's sha256, read in blocks (shards and checkpoint files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, samples: Iterable[np.ndarray], first_key: int) -> ShardInfo:
    """Write one tar shard deterministically; returns its index entry."""
    from webdataset import TarWriter

    count = 0
    with open(path, "wb") as sink, TarWriter(sink, mtime=0.0, user="llm_runtime", group="llm_runtime") as tar:
        for offset, sample in enumerate(samples):
            tar.write({"__key__": f"{first_key + offset:012d}", "tokens.npy": _npy_bytes(sample)})
            count += 1
    data = path.read_bytes()
    return ShardInfo(name=path.name, samples=count, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def read_shard(path: Path) -> Iterator[np.ndarray]:
    """The samples of one local shard in order; a damaged shard names itself and the offset."""
    import tarfile

    offset = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                offset = member.offset
                if member.name.startswith("/") or ".." in member.name.split("/"):
                    raise ValueError(f"member name {member.name!r} is absolute or leaves its directory")
                if not member.name.endswith(".tokens.npy"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    raise ValueError(f"member {member.name} is not a file")
                yield np.load(io.BytesIO(handle.read()), allow_pickle=False)
    except (tarfile.TarError, ValueError, EOFError, OSError) as err:
        raise ValueError(f"shard {path} is corrupt or truncated at byte offset {offset} ({err})") from None


@dataclass(frozen=True)
class RecordLayout:
    """Where things sit in one fixed-size sample record of a shard (every record has the same size).

    Derived once from a reference record written by :func:`write_shard`'s own writer, so the
    reader never hard-codes the tar writer's choices (pax headers, padding). Records are then
    decoded straight from bytes: checked for their tar and npy headers, never unpickled.
    """
    seq_len: int
    dtype: str
    record_bytes: int
    data_offset: int
    header_offsets: tuple[int, ...]
    npy_header: bytes

    @classmethod
    def for_index(cls, index: "ShardIndex") -> "RecordLayout":
        return _layout(index.seq_len, index.dtype)

    def decode(self, buffer: bytes, shard: str, first_offset: int) -> np.ndarray:
        """``buffer`` holds whole records -> [n, seq_len + 1] tokens; a bad record names shard and offset."""
        size = self.record_bytes
        if len(buffer) % size:
            raise ValueError(f"shard {shard} is truncated at byte offset {first_offset + len(buffer) // size * size}")
        rows = np.frombuffer(buffer, dtype=np.uint8).reshape(-1, size)
        good = np.ones(len(rows), dtype=bool)
        for offset in self.header_offsets:  # every tar header: its magic and its checksum
            good &= (rows[:, offset + 257:offset + 262] == np.frombuffer(b"ustar", np.uint8)).all(axis=1)
            block = rows[:, offset:offset + 512].astype(np.int64)
            digits = block[:, 148:154] - ord("0")
            stored = digits @ (8 ** np.arange(5, -1, -1))
            computed = block.sum(axis=1) - block[:, 148:156].sum(axis=1) + 8 * ord(" ")
            good &= ((digits >= 0) & (digits < 8)).all(axis=1) & (stored == computed)
        for offset in self.header_offsets:  # member names: never absolute, never a '..'
            name = rows[:, offset:offset + 100]
            good &= (name[:, 0] != ord("/")) & ~((name[:, :-1] == ord(".")) & (name[:, 1:] == ord("."))).any(axis=1)
        header = np.frombuffer(self.npy_header, np.uint8)
        start = self.data_offset - len(header)
        good &= (rows[:, start:self.data_offset] == header).all(axis=1)
        if not good.all():
            bad = int(np.argmin(good))
            raise ValueError(f"shard {shard} is corrupt at byte offset {first_offset + bad * size} "
                             "(not a token record of this index's seq_len and dtype, or a member name that is "
                             "absolute or contains '..')")
        width = (self.seq_len + 1) * np.dtype(self.dtype).itemsize
        data = np.ascontiguousarray(rows[:, self.data_offset:self.data_offset + width])
        return data.view(self.dtype).reshape(len(rows), self.seq_len + 1)


@functools.lru_cache(maxsize=16)
def _layout(seq_len: int, dtype_name: str) -> RecordLayout:
    import tarfile

    from webdataset import TarWriter

    if dtype_name not in ("uint16", "uint32"):
        raise ValueError(f"token dtype {dtype_name!r} is not one this format writes (uint16, uint32)")
    dtype = np.dtype(dtype_name)
    sample = np.full(seq_len + 1, np.iinfo(dtype).max, dtype)
    buffer = io.BytesIO()
    with TarWriter(buffer, mtime=0.0, user="llm_runtime", group="llm_runtime") as tar:
        for key in range(2):
            tar.write({"__key__": f"{key:012d}", "tokens.npy": _npy_bytes(sample)})
    raw = buffer.getvalue()
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        members = tar.getmembers()
    record = members[1].offset - members[0].offset
    npy = _npy_bytes(sample)
    data_offset = members[0].offset_data - members[0].offset + (len(npy) - sample.nbytes)
    headers = tuple(h for h in range(0, members[0].offset_data, 512) if raw[h + 257:h + 262] == b"ustar")
    if members[0].offset != 0 or raw[record:2 * record] [data_offset:data_offset + sample.nbytes] != sample.tobytes():
        raise RuntimeError("the shard writer's record layout is not fixed-size; this reader cannot decode it")
    return RecordLayout(seq_len=seq_len, dtype=dtype.name, record_bytes=record, data_offset=data_offset,
                        header_offsets=headers, npy_header=npy[:len(npy) - sample.nbytes])
