"""Shared by the benchmarks: machine description, RESULT lines, RESULTS.md sections."""
from __future__ import annotations

import datetime
import os
import re
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def result_line(claim: str, value: float, baseline: float, target: str) -> str:
    return f"RESULT {claim} value={value:.4g} baseline={baseline:.4g} ratio={value / baseline:.4g} target={target}"


#: Student's t at 97.5% for 1..12 degrees of freedom (two-sided 95% interval).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95% interval (Student's t; 12 or more samples use 12's t)."""
    import statistics

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("inf")
    return mean, _T975[min(len(values), 13) - 2] * statistics.stdev(values) / len(values) ** 0.5


def section(title: str, lines: list[str], details: list[str], machine_line: str) -> str:
    """A dated RESULTS.md section: the machine, the details, then the RESULT lines."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([f"## {title} ({stamp})", "", f"Machine: {machine_line}", "", *[f"- {d}" for d in details], "",
                      "```", *lines, "```", ""])


def record(title: str, lines: list[str], details: list[str]) -> None:
    """Print the RESULT lines, append a dated section to RESULTS.md and refresh its current table."""
    with RESULTS.open("a") as sink:
        sink.write(section(title, lines, details, machine()) + "\n")
    refresh_current(RESULTS)
    for line in lines:
        print(line, flush=True)


_CURRENT_START, _CURRENT_END = "<!-- current: generated from the sections below -->", "<!-- end of current -->"
_RESULT = re.compile(r"^RESULT (\S+) value=(\S+) baseline=(\S+) ratio=(\S+) target=(\S+)(.*)$")


def met(ratio: str, target: str) -> str:
    """Whether ``ratio`` meets ``target`` (``>=X``, ``<=X``, ``<X``, ``>X``), or ``-`` where the target
    is a report or a formula of the value (the section says)."""
    match = re.match(r"^(>=|<=|<|>)([0-9.eE+-]+)$", target)
    if not match:
        return "-"
    try:
        value, bound = float(ratio), float(match.group(2))
    except ValueError:
        return "no"
    ok = {">=": value >= bound, "<=": value <= bound, "<": value < bound, ">": value > bound}[match.group(1)]
    return "yes" if ok else "no"


def current_table(text: str) -> list[str]:
    """The newest RESULT of each claim, with its target, whether it is met and the section it came from."""
    latest: dict[str, tuple] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        match = _RESULT.match(line.strip())
        if match:
            latest[match.group(1)] = (*match.groups()[1:5], heading)
    rows = ["| claim | value | baseline | ratio | target | met | measured in |", "|---|---|---|---|---|---|---|"]
    for claim in sorted(latest):
        value, baseline, ratio, target, where = latest[claim]
        rows.append(f"| {claim} | {value} | {baseline} | {ratio} | {target} | {met(ratio, target)} | {where} |")
    return rows


def refresh_current(path: Path) -> None:
    """Rewrite the current table at the top of RESULTS.md; the dated history below stays as it is."""
    text = path.read_text()
    if _CURRENT_START in text:
        head, rest = text.split(_CURRENT_START, 1)
        history = rest.split(_CURRENT_END, 1)[1].lstrip("\n")
    else:
        first = text.find("\n## ")
        head, history = (text[:first + 1], text[first + 1:]) if first >= 0 else (text, "")
    block = [_CURRENT_START, "## Current: the latest value of each claim", "", *current_table(history), "",
             _CURRENT_END, ""]
    path.write_text(head.rstrip("\n") + "\n\n" + "\n".join(block) + "\n" + history)


def timed_loop(train_step, *, steps: int, warmup: int, batch: int, seq: int, device) -> None:
    """Run a baseline worker's loop on the trainer's own data order and print STEPS_PER_S (rank 0).

    ``train_step(inputs, targets) -> loss`` is the hand-written step being measured; the
    global loss is all-reduced every 10 steps, as the trainer's logging does.
    """
    import time

    import torch
    import torch.distributed as dist

    from llm_runtime.models import ByteTokenizer, bundled_text
    from llm_runtime.train import global_batch_starts

    rank, world = dist.get_rank(), dist.get_world_size()
    tokens = torch.from_numpy(ByteTokenizer().encode_array(bundled_text()).astype("int64"))
    offsets = torch.arange(seq + 1)
    per_rank = batch // world
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if step == warmup + 1:
            dist.barrier()
            start = time.perf_counter()
        starts = torch.from_numpy(global_batch_starts(1234, step, batch, len(tokens), seq))
        rows = tokens[starts[rank * per_rank:(rank + 1) * per_rank, None] + offsets].to(device)
        loss = train_step(rows[:, :-1], rows[:, 1:])
        if step % 10 == 0:
            reported = loss.detach().clone()
            dist.all_reduce(reported)
    dist.barrier()
    if rank == 0:
        print(f"STEPS_PER_S {(steps - warmup) / (time.perf_counter() - start):.6f}", flush=True)


def start_moto():
    """A moto S3 server on a free 127.0.0.1 port: (process, endpoint). Fake credentials are set."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    for name, value in (("AWS_ACCESS_KEY_ID", "benchmark"), ("AWS_SECRET_ACCESS_KEY", "benchmark"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ.setdefault(name, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto_server did not start within 30 s")
