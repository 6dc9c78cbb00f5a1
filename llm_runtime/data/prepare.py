"""``llm-runtime prepare-data``: text files -> token shards, share-nothing and deterministic.

Every input file is one unit of work: a pool of worker processes tokenizes files with no
synchronisation between them; each file's tokens are cut into ``seq_len + 1``-token samples
(the last partial sample of a file is dropped). The samples are then packed into shards in
input-file order, so the result does not depend on the number of workers. On a multi-host
job each host takes every ``num_hosts``-th file (by its host index).
"""
from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..progress import bar
from .shards import INDEX_NAME, ShardIndex, ShardInfo, bytes_per_sample, read_index, token_dtype, write_shard
from ..storage import parse_s3_uri
from .output import ShardOutput, download, list_inputs, shard_name
from .tokenize import TokenizerError, load_tokenizer

__all__ = ["PrepareError", "PrepareSummary", "expand_inputs", "files_for_host", "merge_indexes", "parse_size",
           "partial_index_name", "prepare", "read_documents"]

log = logging.getLogger(__name__)
SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst")


class PrepareError(ValueError):
    """An input or option that preparation cannot use; the message names the file (and line)."""


@dataclass(frozen=True)
class PrepareSummary:
    files: int
    tokens: int
    samples: int
    shards: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (f"prepared files={self.files} tokens={self.tokens} samples={self.samples} shards={self.shards} "
                f"bytes={self.bytes} seconds={self.seconds:.1f}")


def parse_size(text: str) -> int:
    """``256MB``, ``64KiB``, ``1000`` -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    stripped = text.strip().lower()
    number = stripped.rstrip("kmgib")
    unit = stripped[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise PrepareError(f"--shard-size {text!r} is not a size like 256MB or 64MiB") from None
    if value < 1:
        raise PrepareError(f"--shard-size {text!r} must be positive")
    return int(value)


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Local files, globs, directories (recursively) and s3:// prefixes -> a sorted, de-duplicated list."""
    files: set[str] = set()
    for item in inputs:
        if item.startswith("s3://"):
            try:
                found = list_inputs(item, SUFFIXES)
            except (OSError, ValueError) as err:
                raise PrepareError(f"--input {item}: {err}") from None
            if not found:
                raise PrepareError(f"--input {item}: no objects ending in {', '.join(SUFFIXES)} under it")
            files.update(found)
            continue
        if os.path.isdir(item):
            for root, _, names in os.walk(item):
                files.update(os.path.join(root, name) for name in names if name.endswith(SUFFIXES))
            continue
        matches = glob.glob(item) if any(ch in item for ch in "*?[") else [item]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise PrepareError(f"--input {item}: no such file (or the pattern matches nothing)")
        files.update(matches)
    if not files:
        raise PrepareError(f"--input {list(inputs)}: no text files ({', '.join(SUFFIXES)}) found")
    return sorted(files)


def files_for_host(files: Sequence[str], host_index: int, num_hosts: int) -> list[str]:
    """This host's share of the files: every num_hosts-th, starting at its index."""
    if num_hosts < 1 or not 0 <= host_index < num_hosts:
        raise PrepareError(f"host index {host_index} is outside {num_hosts} hosts")
    return list(files[host_index::num_hosts])


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise PrepareError(f"{path}: reading .zst needs the zstandard package") from None
        import io

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")),
                                encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """Plain text is one document; JSON lines give one document per line (their text field)."""
    jsonl = ".jsonl" in path or path.endswith(".json")
    with _open_text(path) as handle:
        if not jsonl:
            yield handle.read()
            return
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PrepareError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise PrepareError(f"{path}:{number}: no string field {text_field!r}")
            yield record[text_field]


def _tokenize_file(task: tuple[str, int, str, str]) -> tuple[str, int, int]:
    """Worker: one file -> a .npy of [n, seq_len + 1] samples in the scratch dir; (path, samples, tokens)."""
    path, seq_len, scratch, text_field, tokenizer_spec = task
    tokenizer = load_tokenizer(tokenizer_spec)
    local = path
    if path.startswith("s3://"):  # this worker's own copy, removed once tokenized
        local = os.path.join(scratch, f"input-{os.getpid()}-{os.path.basename(path)}")
        try:
            download(path, local)
        except OSError as err:  # a StorageError names the object and what went wrong
            raise PrepareError(f"--input {path}: download failed: {err}") from None
    try:
        pieces = [tokenizer.encode_document(document) for document in read_documents(local, text_field)]
    finally:
        if local != path:
            os.unlink(local)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    width = seq_len + 1
    count = len(tokens) // width
    samples = tokens[:count * width].reshape(count, width).astype(token_dtype(tokenizer.vocab_size))
    out = os.path.join(scratch, f"{abs(hash(path))}-{os.getpid()}.npy")
    np.save(out, samples, allow_pickle=False)
    return out, count, len(tokens)


DEFAULT_PREFIXES = 16
"""``prepare-data --prefixes``: shards spread over p00/..p15/, so 1,024 hosts x 8 ranks opening
their data at once stay under half of S3's per-prefix GET rate (benchmarks/s3_scale.py)."""


def prepare(inputs: Sequence[str], output: str, *, seq_len: int, shard_size: int = 256 * 10**6, workers: int = 0,
            tokenizer: str = "byte", host_index: int = 0, num_hosts: int = 1, text_field: str = "text",
            prefixes: int = 1, merge_timeout_s: float = 3600.0, progress: bool | None = None) -> PrepareSummary:
    """Tokenize ``inputs`` into shards under ``output`` (a directory or s3://) and write index.json.

    With several hosts each takes its share of the files and writes a partial index; host 0
    then waits (``merge_timeout_s``) for every host's and writes the merged index.json, so the
    output must be shared (S3, FSx). The shards are byte-identical for the same inputs and hosts.
    """
    started = time.monotonic()
    if importlib.util.find_spec("webdataset") is None:  # the shard writer
        raise PrepareError("prepare-data needs webdataset: pip install 'llm-runtime[data]'")
    if seq_len < 1:
        raise PrepareError(f"--seq-len must be >= 1, got {seq_len}")
    try:
        load_tokenizer(tokenizer)  # fails here, before any worker starts
    except TokenizerError as err:
        raise PrepareError(str(err)) from None
    if not 1 <= prefixes <= 100:
        raise PrepareError(f"--prefixes must be between 1 and 100, got {prefixes}")
    if output.startswith("s3://"):
        try:
            parse_s3_uri(output)
        except ValueError as err:
            raise PrepareError(f"--output: {err}") from None
    all_files = expand_inputs(inputs)
    files = files_for_host(all_files, host_index, num_hosts)
    run = hashlib.sha256(json.dumps([all_files, seq_len, load_tokenizer(tokenizer).name, shard_size, num_hosts,
                                     prefixes]).encode()).hexdigest()[:12]
    out = ShardOutput(output)
    try:
        if host_index == 0:
            out.delete(INDEX_NAME)  # no reader may pair an old index with the shards being rewritten
        index, tokens_total = _write_shards(files, out, seq_len=seq_len, shard_size=shard_size, workers=workers,
                                            tokenizer=tokenizer, text_field=text_field, host=host_index,
                                            num_hosts=num_hosts, prefixes=prefixes, progress=progress)
        out.wait()
        if num_hosts == 1:
            out.write_text(INDEX_NAME, index.to_json())
        else:
            out.write_text(partial_index_name(host_index, num_hosts, run), index.to_json())
            if host_index == 0:
                merged = _merge(out, num_hosts, run, merge_timeout_s)
                out.write_text(INDEX_NAME, merged.to_json())
                for host in range(num_hosts):
                    out.delete(partial_index_name(host, num_hosts, run))
    finally:
        out.close()
    return PrepareSummary(files=len(files), tokens=tokens_total, samples=index.total_samples,
                          shards=len(index.shards), bytes=sum(s.bytes for s in index.shards),
                          seconds=time.monotonic() - started)


def partial_index_name(host: int, num_hosts: int, run: str) -> str:
    """A host's partial index; ``run`` digests the inputs and options, so a rerun never merges stale parts."""
    return f"index.host-{host:03d}-of-{num_hosts:03d}.{run}.json"


def merge_indexes(parts: Sequence[ShardIndex]) -> ShardIndex:
    """Host partial indexes, in host order -> one index (they must agree on the format)."""
    first = parts[0]
    for number, part in enumerate(parts):
        if (part.seq_len, part.tokenizer, part.dtype) != (first.seq_len, first.tokenizer, first.dtype):
            raise PrepareError(f"host {number}'s shards were made with seq_len={part.seq_len}, "
                               f"tokenizer={part.tokenizer}; host 0's with seq_len={first.seq_len}, "
                               f"tokenizer={first.tokenizer}")
    return ShardIndex(seq_len=first.seq_len, tokenizer=first.tokenizer, vocab_size=first.vocab_size,
                      dtype=first.dtype, shards=[shard for part in parts for shard in part.shards])


def _merge(out, num_hosts: int, run: str, timeout_s: float) -> ShardIndex:
    deadline = time.monotonic() + timeout_s
    parts: dict[int, ShardIndex] = {}
    while len(parts) < num_hosts:
        for host in range(num_hosts):
            if host not in parts:
                name = partial_index_name(host, num_hosts, run)
                text = out.read_text(name)
                if text is not None:
                    parts[host] = read_index(text, f"{out.uri}/{name}")
        if len(parts) < num_hosts:
            if time.monotonic() > deadline:
                missing = sorted(set(range(num_hosts)) - set(parts))
                raise PrepareError(f"host 0 waited {timeout_s:.0f}s for the partial indexes of hosts {missing} "
                                   f"under {out.uri} (run {run}); every host must write to the same (shared) "
                                   "output with the same inputs and options")
            time.sleep(0.5)
    return merge_indexes([parts[host] for host in range(num_hosts)])


def _ordered(pool: ProcessPoolExecutor, tasks: list, ahead: int) -> Iterator:
    """pool.map in input order, with at most ``ahead`` files tokenized and not yet packed (bounded scratch)."""
    queue = collections.deque()
    for task in tasks:
        queue.append(pool.submit(_tokenize_file, task))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _write_shards(files, out, *, seq_len, shard_size, workers, tokenizer, text_field, host, num_hosts, prefixes,
                  progress) -> tuple[ShardIndex, int]:
    vocab = load_tokenizer(tokenizer).vocab_size
    index = ShardIndex(seq_len=seq_len, tokenizer=load_tokenizer(tokenizer).name, vocab_size=vocab,
                       dtype=token_dtype(vocab).name)
    per_shard = max(1, shard_size // bytes_per_sample(seq_len, token_dtype(vocab)))
    tokens_total = 0

    def flush(samples: list[np.ndarray]) -> None:
        name = shard_name(len(index.shards), host=host, num_hosts=num_hosts, prefixes=prefixes)
        local = out.scratch_dir() / name.rsplit("/", 1)[-1]
        info = write_shard(local, samples, first_key=index.total_samples)
        index.shards.append(ShardInfo(name=name, samples=info.samples, bytes=info.bytes, sha256=info.sha256))
        out.put(name, local)

    with tempfile.TemporaryDirectory(dir=out.scratch_dir(), prefix=".scratch-") as scratch:
        tasks = [(path, seq_len, scratch, text_field, tokenizer) for path in files]
        workers = workers or min(len(files), os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool, \
                bar(len(files), "prepare-data", unit="file", enabled=progress) as shown:
            results = _ordered(pool, tasks, ahead=2 * max(1, workers))  # input order: packing is deterministic
            pending: list[np.ndarray] = []
            for scratch_file, _, tokens in results:
                tokens_total += tokens
                pending.extend(np.load(scratch_file))
                os.unlink(scratch_file)
                while len(pending) >= per_shard:
                    flush(pending[:per_shard])
                    del pending[:per_shard]
                shown.update(1)
            if pending:
                flush(pending)
    return index, tokens_total
