"""Data loading throughput: local shards vs S3 streaming vs a naive one-GET-per-sample reader.

One run on this machine: a synthetic token dataset is written locally and uploaded to a
local S3 server (moto over HTTP on 127.0.0.1, started here), then read three ways:

* local: the shard loader over the directory (the baseline for speed);
* S3 streaming: the same loader over s3:// (one ranged GET per shard a partition reads);
* naive: one ranged GET per sample (the baseline for request count).

Claims: S3 streaming tokens/s >= 0.8 x local, and >= 100x fewer GETs per 1000 samples than
the naive reader. moto runs on the same 2 cores as the reader, so S3 here is CPU-bound
(KNOWN.md); on AWS the network is the limit instead.

usage: python benchmarks/data_throughput.py [--samples N] [--seq-len L]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record, result_line, start_moto  # noqa: E402
from benchmarks.wire import Wire  # noqa: E402
from llm_runtime.config import Config  # noqa: E402
from llm_runtime.data.build import build_loader  # noqa: E402
from llm_runtime.data.shards import INDEX_NAME, RecordLayout, ShardIndex, write_shard  # noqa: E402


class _Dims:
    dp_size = 1


def _write_dataset(root: Path, samples: int, seq_len: int, per_shard: int) -> ShardIndex:
    rng = np.random.default_rng(0)
    index = ShardIndex(seq_len=seq_len, tokenizer="byte", vocab_size=256, dtype="uint16")
    for number, first in enumerate(range(0, samples, per_shard)):
        rows = rng.integers(0, 256, size=(min(per_shard, samples - first), seq_len + 1), dtype=np.uint16)
        index.shards.append(write_shard(root / f"shard-{number:06d}.tar", list(rows), first_key=first))
    (root / INDEX_NAME).write_text(index.to_json())
    return index


def _loader_rate(uri: str, seq_len: int, batch: int, steps: int) -> tuple[float, dict]:
    config = Config()
    config.train.seq_len, config.train.batch_size = seq_len, batch
    config.data.uri, config.data.num_workers, config.data.num_partitions = uri, 0, 4
    with build_loader(config, _Dims(), dp_rank=0) as loader:
        loader.next_batch()  # first blocks in flight; opening costs are in the request count
        start = time.perf_counter()
        for _ in range(steps):
            loader.next_batch()
        seconds = time.perf_counter() - start
        stats = loader.stats()
    return steps * batch * seq_len / seconds, stats


def _naive_rate(endpoint: str, bucket: str, index: ShardIndex, count: int) -> float:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    layout = RecordLayout.for_index(index)
    size = layout.record_bytes
    rng = np.random.default_rng(1)
    shards = rng.integers(0, len(index.shards), size=count)
    start = time.perf_counter()
    for shard in shards:
        info = index.shards[shard]
        i = int(rng.integers(0, info.samples))
        body = client.get_object(Bucket=bucket, Key=f"tokens/{info.name}",
                                 Range=f"bytes={i * size}-{(i + 1) * size - 1}")["Body"].read()
        layout.decode(body, info.name, i * size)
    return count * index.seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    ns = parser.parse_args()
    proc, endpoint = start_moto()
    try:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        import boto3

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            index = _write_dataset(root, ns.samples, ns.seq_len, per_shard=2000)
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="bench")
            for path in sorted(root.iterdir()):
                client.upload_file(str(path), "bench", f"tokens/{path.name}")
            steps = ns.samples // ns.batch - 2
            local, local_stats = _loader_rate(str(root), ns.seq_len, ns.batch, steps)
            streamed, s3_stats = _loader_rate("s3://bench/tokens", ns.seq_len, ns.batch, steps)
            # The same read again through a counting proxy (in a process of its own): requests on the
            # wire; the speed above is measured without the proxy's extra hop on these 2 cores.
            with Wire(endpoint, root / "wire-stream.json") as wire:
                os.environ["AWS_ENDPOINT_URL_S3"] = wire.endpoint
                _loader_rate("s3://bench/tokens", ns.seq_len, ns.batch, steps)
            stream_gets = wire.counts["methods"].get("GET", 0)
            naive_count = 600
            with Wire(endpoint, root / "wire-naive.json") as wire:
                naive = _naive_rate(wire.endpoint, "bench", index, naive_count)
            naive_gets = 1000 * wire.counts["methods"].get("GET", 0) / naive_count
            os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    samples_read = (steps + 1) * ns.batch
    s3_gets = 1000 * stream_gets / samples_read
    lines = [
        result_line("s3_stream_tokens_per_s_vs_local", streamed, local, ">=0.8"),
        result_line("naive_gets_per_1000_samples_vs_s3_stream", naive_gets, s3_gets, ">=100"),
        result_line("s3_stream_tokens_per_s_vs_naive", streamed, naive, ">=1"),
    ]
    details = [
        f"{ns.samples} samples of {ns.seq_len + 1} tokens in {len(index.shards)} shards of 2000, "
        f"{sum(s.bytes for s in index.shards) / 1e6:.0f} MB; loader: 1 replica, 4 partitions, in-process reader, "
        f"global batch {ns.batch}, {steps} steps timed",
        f"local: {local:,.0f} tokens/s, {local_stats['requests']} opens",
        f"S3 streaming (moto on 127.0.0.1, same cores): {streamed:,.0f} tokens/s, {stream_gets} GETs on the wire "
        f"for {samples_read} samples ({s3_gets:.2f} per 1000; the loader counted {s3_stats['requests']}), "
        f"{s3_stats['retries']} retries",
        f"naive one-GET-per-sample: {naive:,.0f} tokens/s over {naive_count} samples ({naive_gets:.0f} GETs per "
        "1000 samples on the wire)",
    ]
    record("data_throughput", lines, details)


if __name__ == "__main__":
    main()
