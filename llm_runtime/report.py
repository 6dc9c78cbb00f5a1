"""``llm-runtime report METRICS.jsonl --out report.png``: loss, throughput and checkpoint stalls
against step, in one image (matplotlib, the ``report`` extra)."""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["ReportError", "load_metrics", "latest_per_step", "plot"]


class ReportError(ValueError):
    """The metrics file cannot be read; the message names the file and line."""


def load_metrics(path: str | Path) -> list[dict]:
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ReportError(f"cannot read {path}: {err.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(f"{path}:{number}: a metrics record needs an integer 'step'")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: no metrics records")
    return records


def latest_per_step(records: list[dict]) -> list[dict]:
    """One record per step, in step order; a step logged again after a restart keeps its last record."""
    by_step = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot(records: list[dict], out: str | Path, title: str = "") -> Path:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("llm-runtime report needs matplotlib: pip install 'llm-runtime[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = latest_per_step([r for r in records if "eval_loss" in r])  # evaluation.py's rows
    records = latest_per_step([r for r in records if "eval_loss" not in r]) or evals
    fig, (loss_ax, speed_ax, ckpt_ax) = plt.subplots(3, 1, sharex=True, figsize=(9, 8.5), constrained_layout=True)
    steps, loss = _series(records, "loss")
    loss_ax.plot(steps, loss, color="tab:blue", lw=1.6, label="train")
    loss_ax.set_ylabel("loss")
    title = f"loss {loss[0]:.3f} -> {loss[-1]:.3f}" if loss else ""
    steps, held_out = _series(evals, "eval_loss")
    if held_out:
        loss_ax.plot(steps, held_out, color="tab:orange", lw=1.6, marker="o", ms=3, label="eval")
        loss_ax.legend(loc="upper right", fontsize=8)
        title += f"{', ' if title else ''}eval {held_out[-1]:.3f} (ppl {math.exp(min(held_out[-1], 700)):.2f})"
    if title:
        loss_ax.set_title(title, loc="right", fontsize=9)
    steps, speed = _series(records, "tokens_per_s")
    speed_ax.plot(steps, speed, color="tab:green", lw=1.6)
    speed_ax.set_ylabel("tokens / s")
    scale = [100 * r["mfu"] / r["tokens_per_s"] for r in records
             if isinstance(r.get("mfu"), (int, float)) and math.isfinite(r["mfu"]) and r.get("tokens_per_s")]
    if scale:  # MFU is proportional to tokens/s: the same curve, read on a second scale
        twin = speed_ax.twinx()
        low, high = speed_ax.get_ylim()
        twin.set_ylim(low * scale[0], high * scale[0])
        twin.set_ylabel("MFU %")
    steps, blocked = _series(records, "checkpoint_blocked_s")
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    ckpt_ax.bar(steps, blocked, color="tab:red", width=0.8 * (min(gaps) if gaps else 1))
    ckpt_ax.set_ylabel("checkpoint blocked\ns per step")
    ckpt_ax.set_xlabel("step")
    for ax in (loss_ax, speed_ax, ckpt_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{len(records)} logged steps, last step {records[-1]['step']}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
