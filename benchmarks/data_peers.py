"""Data loading side by side with the libraries users would pick instead: tokens/s and GETs per 1000
samples, on local disk and on S3, the same tokens, machine and S3 server (moto on 127.0.0.1) in one run.

Each reader uses its native format, written here from the same token rows:
* llm_runtime: its webdataset tar shards + index.json, read by its loader (one sequential GET per
  shard a partition reads, records decoded in blocks);
* mosaicml-streaming: MDS shards (MDSWriter, an ``ndarray:uint16`` column), StreamingDataset;
* litdata: its chunks (``litdata.optimize``), StreamingDataset;
* webdataset: the same tar shards as llm_runtime (they are webdataset's format), its own
  WebDataset pipeline; on S3 through ``pipe:s5cmd cat`` (webdataset has no S3 client of its own);
* s3torchconnector: S3IterableDataset over the same tar shards, each streamed through tarfile (it
  reads objects, not a sample format; S3 only).

Every reader runs in a process of its own, in that process (no DataLoader workers), reading every
sample once in order; GETs are counted on the wire by a proxy in another process (benchmarks/wire.py).
Peers are benchmark dependencies: benchmarks/install_peers.sh.

Claims: llm_runtime's tokens/s >= the best peer's, on local disk and on S3 (target >= 1.0), and its
GETs per 1000 samples on S3 at most the fewest a peer needs.
usage: python benchmarks/data_peers.py [--samples N] [--seq-len L] [--no-record]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record, result_line, start_moto  # noqa: E402
from benchmarks.wire import Wire  # noqa: E402

METADATA = ("json", "list")  # index reads and LISTs: once per run, not per sample
PEERS = ("llm_runtime", "mosaicml-streaming", "litdata", "webdataset", "s3torchconnector")
PER_SHARD = 2000
NOTES = ['peers as installed by benchmarks/install_peers.sh: mosaicml-streaming 0.13.0 (with --no-deps: it pins numpy<2.2 and transformers<5; its image datasets, which need torchvision, are not imported), litdata 0.2.76 (its obstore client refuses plain http, BadScheme, and has no option for it: the benchmark adds allow_http to its client options), webdataset 1.0.2 (on S3 through `pipe:s5cmd cat`), s3torchconnector 1.5.0 (CRT client, force_path_style; S3 only)', "GETs: llm_runtime reads index.json (which is also its storage probe) and its 12 shards, and is told the run's last step, so it prefetches nothing past the epoch (before 2026-12-02 it prefetched the next epoch's first block: 12 + 2); webdataset is given the shard list and reads no index (12), mosaicml-streaming 12 + its index, s3torchconnector LISTs the prefix"]
BUCKET = "bench"


def _rows(samples: int, seq_len: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50000, size=(samples, seq_len + 1), dtype=np.uint16)


def _litdata_sample(i: int, rows_path: str = "") -> dict:
    rows = np.load(rows_path or os.environ["DATA_PEERS_ROWS"], mmap_mode="r")
    return {"tokens": np.array(rows[i])}


def write_formats(root: Path, rows: np.ndarray) -> None:
    """Every reader's native format of the same rows, under root/<format>."""
    from llm_runtime.data.shards import INDEX_NAME, ShardIndex, write_shard

    ours = root / "ours"
    ours.mkdir(parents=True)
    index = ShardIndex(seq_len=rows.shape[1] - 1, tokenizer="byte", vocab_size=65536, dtype="uint16")
    for number, first in enumerate(range(0, len(rows), PER_SHARD)):
        index.shards.append(write_shard(ours / f"shard-{number:06d}.tar", list(rows[first:first + PER_SHARD]),
                                        first_key=first))
    (ours / INDEX_NAME).write_text(index.to_json())
    _skip_streaming_vision()
    from streaming import MDSWriter

    with MDSWriter(out=str(root / "mds"), columns={"tokens": "ndarray:uint16"},
                   size_limit=PER_SHARD * rows.shape[1] * 2 + 65536) as writer:
        for row in rows:
            writer.write({"tokens": row})
    import litdata

    np.save(root / "rows.npy", rows)
    os.environ["DATA_PEERS_ROWS"] = str(root / "rows.npy")
    litdata.optimize(fn=_litdata_sample, inputs=list(range(len(rows))), output_dir=str(root / "litdata"),
                     chunk_bytes=PER_SHARD * rows.shape[1] * 2 + 65536, num_workers=1, mode="overwrite")


def _skip_streaming_vision() -> None:
    # streaming/__init__ imports its image datasets, which need torchvision (a CUDA build here);
    # the MDS reader and writer do not.
    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))


# ---- one reader, in a process of its own: yields token rows --------------------------------------
def read_llm_runtime(uri: str, endpoint: str, cache: Path, seq_len: int):
    from llm_runtime.config import Config
    from llm_runtime.data.build import build_loader, plan_data

    config = Config()
    config.train.seq_len, config.train.batch_size = seq_len, 64
    config.data.uri, config.data.num_workers = uri, 0  # its defaults otherwise: one partition, blocks of 1024

    class Dims:
        dp_size = 1

    plan = plan_data(config, 1)
    # one epoch, as the other readers are asked for: the run's last step, so nothing past it is read
    with build_loader(config, Dims(), dp_rank=0, plan=plan, last_step=plan.order.steps_per_epoch - 1) as loader:
        while True:
            try:
                batch = loader.next_batch()
            except StopIteration:
                return
            yield from batch.numpy()


def read_streaming(uri: str, endpoint: str, cache: Path, seq_len: int):
    _skip_streaming_vision()
    from streaming import StreamingDataset

    if uri.startswith("s3://"):
        os.environ["S3_ENDPOINT_URL"] = endpoint
        dataset = StreamingDataset(remote=uri, local=str(cache), shuffle=False, batch_size=64)
    else:
        dataset = StreamingDataset(local=uri, shuffle=False, batch_size=64)
    for sample in dataset:
        yield sample["tokens"]


def read_litdata(uri: str, endpoint: str, cache: Path, seq_len: int):
    import litdata

    options = {"endpoint_url": endpoint} if uri.startswith("s3://") else None
    if options:  # litdata's obstore client refuses plain http (BadScheme) and has no option for it
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS = {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"}
    dataset = litdata.StreamingDataset(uri, cache_dir=str(cache) if options else None, storage_options=options)
    for sample in dataset:
        yield sample["tokens"]


def read_webdataset(uri: str, endpoint: str, cache: Path, seq_len: int):
    import webdataset as wds

    names = [s["name"] for s in json.loads(Path(cache.parent / "ours-index.json").read_text())["shards"]]
    if uri.startswith("s3://"):
        s5cmd = Path(sys.executable).with_name("s5cmd")
        urls = [f"pipe:{s5cmd} --endpoint-url {endpoint} cat {uri}/{name}" for name in names]
    else:
        urls = [f"{uri}/{name}" for name in names]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        yield sample["tokens.npy"]


def read_s3torchconnector(uri: str, endpoint: str, cache: Path, seq_len: int):
    import tarfile

    from s3torchconnector import S3ClientConfig, S3IterableDataset

    dataset = S3IterableDataset.from_prefix(uri + "/", region="us-east-1", endpoint=endpoint,
                                            s3client_config=S3ClientConfig(force_path_style=True))
    for reader in dataset:
        if not reader.key.endswith(".tar"):
            continue
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if member.name.endswith(".npy"):
                    yield np.load(io.BytesIO(tar.extractfile(member).read()))


READERS = {"llm_runtime": read_llm_runtime, "mosaicml-streaming": read_streaming, "litdata": read_litdata,
           "webdataset": read_webdataset, "s3torchconnector": read_s3torchconnector}
FORMAT = {"llm_runtime": "ours", "mosaicml-streaming": "mds", "litdata": "litdata", "webdataset": "ours",
          "s3torchconnector": "ours"}


def one(peer: str, uri: str, endpoint: str, cache: str, seq_len: int, expected: int) -> dict:
    """The child's side: read every sample once; tokens/s and a checksum of what was read."""
    start, count, total = time.perf_counter(), 0, 0
    for row in READERS[peer](uri, endpoint, Path(cache), seq_len):
        count += 1
        total += int(np.asarray(row, dtype=np.int64).sum())
        if count == expected:
            break
    seconds = time.perf_counter() - start
    return {"samples": count, "seconds": seconds, "tokens_per_s": count * (seq_len + 1) / seconds, "sum": total}


def measure(peer: str, where: str, root: Path, moto: str, seq_len: int, samples: int) -> dict:
    cache = root / "cache" / f"{peer}-{where}"
    cache.mkdir(parents=True, exist_ok=True)
    fmt = FORMAT[peer]
    uri = f"s3://{BUCKET}/{fmt}" if where == "s3" else str(root / fmt)

    def child(endpoint: str) -> dict:
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint}
        cmd = [sys.executable, __file__, "--one", peer, uri, endpoint, str(cache), str(seq_len), str(samples)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            if os.environ.get("DATA_PEERS_DEBUG"):
                print(proc.stderr[-4000:], file=sys.stderr)
            errors = [line for line in proc.stderr.splitlines() if "Error" in line or "Exception" in line]
            return {"error": (errors or proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    if where == "local":
        return child(moto)
    with Wire(moto, root / f"wire-{peer}.json") as wire:
        result = child(wire.endpoint)
    if "error" not in result:
        by_suffix = wire.counts["gets_by_suffix"]
        gets = sum(by_suffix.values())
        metadata = sum(n for suffix, n in by_suffix.items() if suffix in METADATA)
        result.update(by_suffix=by_suffix, gets=gets, gets_per_1000=1000 * gets / max(1, result["samples"]),
                      data_gets_per_1000=1000 * (gets - metadata) / max(1, result["samples"]), metadata=metadata,
                      lists=by_suffix.get("list", 0), requests=wire.counts["requests"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset (llm_runtime always runs)")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.samples % 64:
        parser.error("--samples must be a multiple of 64 (the loader's global batch; a partial last batch is dropped)")
    if ns.one:
        peer, uri, endpoint, cache, seq_len, expected = ns.one
        print(json.dumps(one(peer, uri, endpoint, cache, int(seq_len), int(expected))), flush=True)
        return
    proc, moto = start_moto()
    results: dict[tuple[str, str], dict] = {}
    try:
        import boto3

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            rows = _rows(ns.samples, ns.seq_len)
            expected_sum = int(rows.astype(np.int64).sum())
            write_formats(root, rows)
            (root / "cache").mkdir()
            (root / "cache" / "ours-index.json").write_text((root / "ours" / "index.json").read_text())
            client = boto3.client("s3", endpoint_url=moto)
            client.create_bucket(Bucket=BUCKET)
            for fmt in ("ours", "mds", "litdata"):
                for path in sorted((root / fmt).rglob("*")):
                    if path.is_file():
                        client.upload_file(str(path), BUCKET, f"{fmt}/{path.relative_to(root / fmt)}")
            for where in ("local", "s3"):
                for peer in PEERS:
                    if (peer == "s3torchconnector" and where == "local") or \
                            (peer != "llm_runtime" and peer not in ns.peers.split(",")):
                        continue
                    results[(peer, where)] = res = measure(peer, where, root, moto, ns.seq_len, ns.samples)
                    if "error" not in res and (res["samples"] != ns.samples or res["sum"] != expected_sum):
                        res["error"] = f"read {res['samples']} samples (sum {res['sum']}), not the {ns.samples} written"
                    print(peer, where, res, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(results, ns)


def report(results: dict, ns) -> None:
    lines, details = [], [f"{ns.samples} samples of {ns.seq_len + 1} uint16 tokens "
                          f"({ns.samples * (ns.seq_len + 1) * 2 / 1e6:.0f} MB), shards/chunks of {PER_SHARD} "
                          "samples; each reader in its own process, no DataLoader workers, every sample once in "
                          "order (checked by sum); S3 = moto on 127.0.0.1 on the same 2 cores (CPU-bound, "
                          "KNOWN.md), GETs counted on the wire",
                          *NOTES]
    for where in ("local", "s3"):
        ok = {p: r for (p, w), r in results.items() if w == where and "error" not in r}
        for (peer, w), res in results.items():
            if w != where:
                continue
            if "error" in res:
                details.append(f"{where}: {peer}: could not run here: {res['error']}")
            else:
                gets = f", {res['gets']} GETs ({res['gets_per_1000']:.2f} per 1000 samples, {res['lists']} LIST, " \
                    f"{res['metadata']} of them index/LIST: {res['data_gets_per_1000']:.2f} data GETs per 1000)" \
                    if where == "s3" else ""
                details.append(f"{where}: {peer}: {res['tokens_per_s']:,.0f} tokens/s{gets}")
        peers = {p: r for p, r in ok.items() if p != "llm_runtime"}
        if "llm_runtime" in ok and peers:
            best = max(peers, key=lambda p: peers[p]["tokens_per_s"])
            lines.append(result_line(f"data_tokens_per_s_{where}_vs_best_peer", ok["llm_runtime"]["tokens_per_s"],
                                     peers[best]["tokens_per_s"], ">=1.0") + f" (best peer: {best})")
            if where == "s3":
                fewest = min(peers, key=lambda p: peers[p]["gets_per_1000"])
                lines.append(result_line("data_s3_gets_per_1000_samples_vs_fewest_peer",
                                         ok["llm_runtime"]["gets_per_1000"], peers[fewest]["gets_per_1000"],
                                         "<=1.0") + f" (fewest: {fewest}; index reads and LISTs included)")
                fewest = min(peers, key=lambda p: peers[p]["data_gets_per_1000"])
                lines.append(result_line("data_s3_data_gets_per_1000_samples_vs_fewest_peer",
                                         ok["llm_runtime"]["data_gets_per_1000"],
                                         peers[fewest]["data_gets_per_1000"], "<=1.0") + f" (fewest: {fewest})")
    if ns.no_record:
        print("\n".join(details + lines))
        return
    record("data_peers", lines, details)


if __name__ == "__main__":
    main()
