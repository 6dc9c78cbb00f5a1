"""Shared by the benchmarks: machine description, RESULT lines, RESULTS.md sections."""
from __future__ import annotations

import datetime
import os
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


def record(title: str, lines: list[str], details: list[str]) -> None:
    """Print the RESULT lines and append a dated section to RESULTS.md."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"## {title} ({stamp})", "", f"Machine: {machine()}", "", *[f"- {d}" for d in details], "",
               "```", *lines, "```", ""]
    with RESULTS.open("a") as sink:
        sink.write("\n".join(section) + "\n")
    for line in lines:
        print(line, flush=True)
