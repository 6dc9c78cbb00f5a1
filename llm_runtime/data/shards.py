"""The token-shard format: webdataset-style tar files of fixed-length token sequences + index.json.

Each sample is ``seq_len + 1`` tokens (inputs and the shifted targets of one sequence) stored
as a ``.tokens.npy`` member; shards are written with a fixed mtime, owner and order, so the
same inputs always give byte-identical files. ``index.json`` lists every shard with its sample
count, size and sha256, which is how readers verify staged copies.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "INDEX_NAME", "ShardIndex", "ShardInfo", "bytes_per_sample", "read_index", "read_shard",
           "token_dtype", "write_shard"]

FORMAT_VERSION = 1
INDEX_NAME = "index.json"


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
                if not member.name.endswith(".tokens.npy"):
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    raise ValueError(f"member {member.name} is not a file")
                yield np.load(io.BytesIO(handle.read()), allow_pickle=False)
    except (tarfile.TarError, ValueError, EOFError, OSError) as err:
        raise ValueError(f"shard {path} is corrupt or truncated at byte offset {offset} ({err})") from None
