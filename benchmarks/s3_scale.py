"""The S3 scale model, on paper: peak requests per second per key prefix, 128 to 1,024 nodes.

S3 serves at least 3,500 PUT/COPY/POST/DELETE (LIST counted here too) and 5,500 GET/HEAD requests
per second per *partitioned* prefix; a prefix S3 has not yet split shares one partition, and a
burst above it gets 503 SlowDown. Nothing here can be measured at that scale, so this is a model:

* Per-node rates are AWS's stated figures (network bandwidth) plus two stated assumptions: the
  NVMe read rate (AWS lists instance-store sizes, not rates) and ~90 MB/s per S3 connection
  (S3's performance guidelines size concurrency at 85-90 MB/s per request).
* The object layout is the runtime's own, read from its code and config defaults: one multipart
  tar per node per checkpoint (create + parts of ``checkpoint.part_size_mb`` + complete), a report
  per node but node 0, one manifest; node ``i``'s tar under spread prefix ``i % prefix_spread``.
  The data loader's requests per rank at start: the storage probe (one LIST) and index.json
  (one GET) unless the launcher's copy is used, then one shard GET per partition; then one GET
  per shard it moves on to.
* Time: each node's upload starts within ``CKPT_JITTER_S`` of the others (the save is agreed on
  one step) and spreads its parts evenly over its upload; ranks open their data within
  ``START_JITTER_S``. The peak is the largest count in any 1-second window.

Layout matters: with ``step-N/sK/`` (the spread after the step), every checkpoint lands under a
prefix S3 has never seen, so all of a step's uploads share one unsplit partition. With the spread
first (``sK/step-N/``), the same K prefixes receive every checkpoint and S3 keeps them split.

Target: no prefix above 50% of its limit at 1,024 nodes with the default settings.
usage: python benchmarks/s3_scale.py [--no-record]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record  # noqa: E402
from llm_runtime.config import Config  # noqa: E402

PUT_LIMIT, GET_LIMIT = 3500.0, 5500.0
PER_CONNECTION_BPS = 90e6  # S3 performance guidelines: 85-90 MB/s per request
CKPT_JITTER_S, START_JITTER_S = 0.5, 1.0
BYTES_PER_PARAM = 12  # fp32 weights + Adam's two moments (DCP saves model and optimizer)
BIN_S = 0.05


@dataclass(frozen=True)
class Instance:
    name: str
    gpus: int
    network_gbps: float  # AWS's instance page
    nvme: str  # AWS's instance page: the instance store
    nvme_read_gbs: float  # assumed: drives x an assumed per-drive read rate

    def upload_bps(self, concurrency: int) -> float:
        return min(self.network_gbps * 1e9 / 8, self.nvme_read_gbs * 1e9, concurrency * PER_CONNECTION_BPS)


INSTANCES = (Instance("p4d.24xlarge", 8, 400, "8 x 1000 GB NVMe", 8 * 2.0),
             Instance("p5.48xlarge", 8, 3200, "8 x 3840 GB NVMe", 8 * 3.0))


def peak_per_second(events: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """The largest number of requests in any 1-second window: ``events`` are (times, counts)."""
    if not events:
        return 0.0
    times = np.concatenate([t for t, _ in events])
    counts = np.concatenate([c for _, c in events])
    bins = np.bincount(np.floor(times / BIN_S).astype(np.int64), weights=counts)
    window = int(round(1.0 / BIN_S))
    if len(bins) <= window:
        return float(bins.sum())
    sums = np.convolve(bins, np.ones(window), mode="valid")
    return float(sums.max())


def checkpoint_peaks(nodes: int, params: float, inst: Instance, *, part_mb: int, concurrency: int, spread: int,
                     spread_first: bool, seed: int = 0) -> float:
    """Peak PUT-class requests/s on the busiest prefix S3 has partitioned, for one checkpoint."""
    rng = np.random.default_rng(seed)
    per_node = params * BYTES_PER_PARAM / nodes
    rate = inst.upload_bps(concurrency)
    duration = per_node / rate
    parts = max(1, math.ceil(per_node / (part_mb * 2**20)))
    starts = rng.uniform(0, CKPT_JITTER_S, nodes)
    prefixes = max(1, spread) if spread_first else 1  # step-first: one unsplit prefix per step
    by_prefix: dict[int, list] = {}
    for node, start in enumerate(starts):
        part_times = start + (np.arange(parts) + 0.5) * duration / parts
        times = np.concatenate([[start], part_times, [start + duration], [start + duration] * (node != 0)])
        by_prefix.setdefault(node % prefixes, []).append((times, np.ones(len(times))))
    manifest_prefix = 0  # the manifest (node 0, last) sits beside node 0's tar
    by_prefix[manifest_prefix].append((np.array([starts.max() + duration]), np.ones(1)))
    return max(peak_per_second(events) for events in by_prefix.values())


def data_start_peaks(nodes: int, inst: Instance, *, workers: int, prefixes: int, index_per_rank: bool,
                     seed: int = 0) -> tuple[float, float]:
    """(LIST peak, GET peak) per prefix when every rank opens its data: the index and probe at the
    data root, one shard GET per partition over the shard prefixes (the root itself when 1)."""
    rng = np.random.default_rng(seed)
    ranks = nodes * inst.gpus
    readers = ranks if index_per_rank else nodes
    root_times = rng.uniform(0, START_JITTER_S, readers)
    shard_times = rng.uniform(0, START_JITTER_S, ranks * max(1, workers))
    shard_prefix = np.arange(len(shard_times)) % max(1, prefixes)
    lists = peak_per_second([(root_times, np.ones(readers))])
    gets = []
    for prefix in range(max(1, prefixes)):
        events = [(shard_times[shard_prefix == prefix], np.ones(int((shard_prefix == prefix).sum())))]
        if prefix == 0 and prefixes <= 1:
            events.append((root_times, np.ones(readers)))  # index.json beside the shards
        gets.append(peak_per_second(events))
    index_peak = peak_per_second([(root_times, np.ones(readers))])
    return lists, max(max(gets), index_peak)


def data_steady_gets(nodes: int, inst: Instance, *, tokens_per_s_per_gpu: float, seq_len: int, shard_mb: int,
                     token_bytes: int, prefixes: int) -> float:
    """GETs/s per prefix in steady state: ranks move to a new shard every samples-per-shard samples."""
    samples_per_s = nodes * inst.gpus * tokens_per_s_per_gpu / seq_len
    samples_per_shard = shard_mb * 2**20 / ((seq_len + 1) * token_bytes)
    return samples_per_s / samples_per_shard / max(1, prefixes)


def rows(defaults: Config, *, index_per_rank: bool, data_prefixes: int, spread_first: bool):
    ck, data = defaults.checkpoint, defaults.data
    for inst in INSTANCES:
        for nodes in (128, 256, 512, 1024):
            for params in (8e9, 70e9, 405e9):
                put = checkpoint_peaks(nodes, params, inst, part_mb=ck.part_size_mb, concurrency=ck.upload_concurrency,
                                       spread=ck.prefix_spread, spread_first=spread_first)
                yield ("checkpoint", inst.name, nodes, f"{params / 1e9:.0f}B", put / PUT_LIMIT)
            lists, gets = data_start_peaks(nodes, inst, workers=max(1, data.num_workers), prefixes=data_prefixes,
                                           index_per_rank=index_per_rank)
            yield ("data start (LIST)", inst.name, nodes, "", lists / PUT_LIMIT)
            yield ("data start (GET)", inst.name, nodes, "", gets / GET_LIMIT)
            steady = data_steady_gets(nodes, inst, tokens_per_s_per_gpu=60_000, seq_len=4096, shard_mb=256,
                                      token_bytes=4, prefixes=data_prefixes)
            yield ("data steady (GET)", inst.name, nodes, "", steady / GET_LIMIT)


def worst_at(table, nodes: int) -> float:
    return max(frac for _, _, n, _, frac in table if n == nodes)


def compare(defaults: Config | None = None):
    """(before, now): the table for the old defaults (step-first keys, index read per rank, one data
    prefix, prefix_spread 8) and for the current ones (the launcher reads the index once per host)."""
    from llm_runtime.data.prepare import DEFAULT_PREFIXES

    defaults = defaults or Config()
    old = Config()
    old.checkpoint.prefix_spread = 8
    before = list(rows(old, index_per_rank=True, data_prefixes=1, spread_first=False))
    now = list(rows(defaults, index_per_rank=False, data_prefixes=DEFAULT_PREFIXES, spread_first=True))
    return before, now


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-record", action="store_true", help="print only; RESULTS.md is left alone")
    args = parser.parse_args()
    from llm_runtime.data.prepare import DEFAULT_PREFIXES

    defaults = Config()
    before, now = compare(defaults)
    ck = defaults.checkpoint
    table = ["| requests | instance | nodes | model | busiest prefix before | now |", "|---|---|---|---|---|---|"]
    for (claim, inst, nodes, model, was), (*_, is_now) in zip(before, now):
        if nodes in (128, 1024):
            table.append(f"| {claim} | {inst} | {nodes} | {model} | {was:.0%} | {is_now:.0%} |")
    fast = checkpoint_peaks(1024, 70e9, INSTANCES[1], part_mb=ck.part_size_mb, concurrency=64,
                            spread=ck.prefix_spread, spread_first=True) / PUT_LIMIT
    details = [f"instances: {', '.join(f'{i.name} {i.network_gbps:g} Gbps, {i.nvme} (read assumed {i.nvme_read_gbs:g} GB/s)' for i in INSTANCES)}; "
               f"S3 ~{PER_CONNECTION_BPS / 1e6:.0f} MB/s per connection; checkpoints {BYTES_PER_PARAM} B/param; "
               f"data: 60k tokens/s per GPU, seq 4096, 256 MB shards",
               f"defaults now: part_size_mb={ck.part_size_mb}, upload_concurrency={ck.upload_concurrency}, "
               f"prefix_spread={ck.prefix_spread} (spread first), data.num_workers={defaults.data.num_workers}, "
               f"prepare-data --prefixes={DEFAULT_PREFIXES}, index.json read once per host by its launcher",
               "before: step-N/sK/ keys (one new, unsplit prefix per checkpoint), prefix_spread=8, one data "
               "prefix, a LIST and an index GET per rank",
               f"sensitivity: upload_concurrency=64 on p5, 1,024 nodes, 70B: busiest prefix {fast:.0%} (the "
               f"uploads are bound by S3 connections at the default, by NVMe above ~{INSTANCES[1].nvme_read_gbs * 1e9 / PER_CONNECTION_BPS:.0f})",
               "busiest prefix as a fraction of its limit (PUT class 3,500/s incl. LIST; GET 5,500/s):",
               *[f"  {row}" for row in table]]
    value, was = worst_at(now, 1024), worst_at(before, 1024)
    lines = [f"RESULT s3_busiest_prefix_fraction_at_1024_nodes value={value:.4g} baseline=1 ratio={value:.4g} "
             f"target=<=0.5",
             f"RESULT s3_busiest_prefix_fraction_at_1024_nodes_before value={was:.4g} baseline=1 ratio={was:.4g} "
             f"target=report"]
    if args.no_record:
        print("\n".join(details + lines))
        return
    record("s3_scale (a model, not a measurement)", lines, details)


if __name__ == "__main__":
    main()
