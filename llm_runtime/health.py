"""Pre-flight health check (``llm-runtime healthcheck``, ``--health.preflight``): catch a bad node
before a job spends hours on it.

Per device: allocate and fill memory, run a square matmul checked against a float64 reference of a
few rows, and time it. Across ranks: an all-reduce whose exact sum every rank checks, then its bus
bandwidth. Every rank's result is gathered to every rank, so all reach the same verdict: ranks
with a wrong result or a failed allocation are bad (every rank exits ``exitcodes.BAD_NODE``, the
failure record names the bad hosts and ranks), and ranks whose matmul is ``straggler_factor`` x
the median time or slower are named stragglers (a warning, or a failure with
``health.stragglers=fail``). On CPU the same code runs with gloo; the CUDA branches (memory query,
synchronisation, bf16) need a GPU and are exercised only there.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import exitcodes
from .config import HealthConfig
from .faults import active

__all__ = ["RankHealth", "Verdict", "bus_bandwidth", "judge", "matmul_error", "run_healthcheck", "tolerance"]

log = logging.getLogger(__name__)
REFERENCE_ROWS = 16
_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-3, torch.float64: 1e-9}


def tolerance(dtype: torch.dtype) -> float:
    """Largest error of a matmul in ``dtype`` relative to the reference's largest value (TF32 included)."""
    return _TOLERANCE[dtype]


def matmul_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """max |result - reference| / max |reference| (NaN or inf count as infinitely wrong)."""
    result = result.double()
    if not torch.isfinite(result).all():
        return float("inf")
    return float((result - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def bus_bandwidth(nbytes: int, seconds: float, world_size: int) -> float:
    """All-reduce bus bandwidth in bytes/s (the nccl-tests convention: algbw x 2(n-1)/n)."""
    if seconds <= 0 or world_size < 2:
        return 0.0
    return nbytes / seconds * 2 * (world_size - 1) / world_size


@dataclass
class RankHealth:
    rank: int
    host: str
    errors: list[str] = field(default_factory=list)
    matmul_s: float = 0.0
    tflops: float = 0.0
    allreduce_s: float = 0.0


@dataclass
class Verdict:
    bad: list[RankHealth]
    stragglers: list[tuple[RankHealth, float]]
    """(rank, its matmul time over the median)."""
    median_matmul_s: float

    def failed(self, stragglers_fail: bool) -> bool:
        return bool(self.bad) or (stragglers_fail and bool(self.stragglers))

    def blamed(self, stragglers_fail: bool) -> str:
        ranks = list(self.bad) + ([r for r, _ in self.stragglers] if stragglers_fail else [])
        hosts = sorted({r.host for r in ranks})
        causes = "; ".join(f"rank {r.rank} ({r.host}): {', '.join(r.errors)}" for r in self.bad)
        slow = "; ".join(f"rank {r.rank} ({r.host}) matmul {ratio:.1f}x the median" for r, ratio in self.stragglers)
        return (f"bad hosts {','.join(hosts)}" + (f"; {causes}" if causes else "")
                + (f"; stragglers: {slow}" if slow and stragglers_fail else ""))


def judge(results: list[RankHealth], straggler_factor: float) -> Verdict:
    """Which ranks are bad (any error) and which are stragglers (matmul time >= factor x the median
    of the healthy ranks; the lower median, so one slow rank of two still stands out)."""
    bad = [r for r in results if r.errors]
    times = sorted(r.matmul_s for r in results if not r.errors and r.matmul_s > 0)
    median = times[(len(times) - 1) // 2] if times else 0.0
    stragglers = [(r, r.matmul_s / median) for r in results
                  if not r.errors and median > 0 and r.matmul_s >= straggler_factor * median]
    return Verdict(bad, stragglers, median)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_memory(cfg: HealthConfig, device: torch.device) -> list[str]:
    if cfg.alloc_mb:
        nbytes = cfg.alloc_mb << 20
    elif device.type == "cuda":
        nbytes = int(torch.cuda.mem_get_info(device)[0] * 0.8)
    else:
        nbytes = 256 << 20
    try:
        block = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        block.fill_(1.0)
        sample = block[:: max(1, block.numel() // 4096)]  # touch it all, read some back
        total, expected = float(sample.sum()), float(sample.numel())
        del block, sample
        if total != expected:
            return [f"memory filled with 1.0 read back a sum of {total:g}, not {expected:g}"]
    except (RuntimeError, MemoryError) as err:
        return [f"cannot allocate {nbytes >> 20} MB: {str(err).splitlines()[0]}"]
    return []


def _check_matmul(cfg: HealthConfig, device: torch.device, rank: int) -> tuple[list[str], float, float]:
    gpu = device.type == "cuda"
    n = cfg.matmul_size or (8192 if gpu else 384)
    dtype = torch.bfloat16 if gpu else torch.float32
    generator = torch.Generator().manual_seed(1234)
    a_cpu = torch.rand(n, n, generator=generator, dtype=torch.float32) * 2 - 1
    b_cpu = torch.rand(n, n, generator=generator, dtype=torch.float32) * 2 - 1
    a, b = a_cpu.to(device, dtype), b_cpu.to(device, dtype)
    faults = {f.kind for f in active(rank, None, "health")}
    result = a @ b  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(max(1, cfg.iters)):
        result = a @ b
    _sync(device)
    seconds = (time.perf_counter() - started) / max(1, cfg.iters)
    if "slow" in faults:  # a drill: a degraded device
        time.sleep(9 * seconds * max(1, cfg.iters))
        seconds *= 10
    if "corrupt" in faults:  # a drill: a device that computes wrong results
        result = result.clone()
        result[0, 0] += 1000
    reference = a[:REFERENCE_ROWS].double().cpu() @ b.double().cpu()
    error = matmul_error(result[:REFERENCE_ROWS].cpu(), reference)
    errors = []
    if not error <= tolerance(dtype):
        errors.append(f"matmul {n}x{n} {str(dtype).removeprefix('torch.')} off by {error:.3g} of the reference "
                      f"(tolerance {tolerance(dtype):g})")
    return errors, seconds, 2 * n**3 / seconds / 1e12


def _check_allreduce(cfg: HealthConfig, device: torch.device, rank: int, world: int) -> tuple[list[str], float, int]:
    """Exact sums: every element is rank + 1 (small integers, exact in float32)."""
    mb = cfg.allreduce_mb or (256 if device.type == "cuda" else 4)
    numel = max(1, int(mb * (1 << 20)) // 4)
    buffer = torch.full((numel,), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(buffer)
    expected = world * (world + 1) / 2
    wrong = int((buffer != expected).sum())
    errors = [f"all-reduce returned {wrong} wrong elements of {numel} (expected {expected:g})"] if wrong else []
    _sync(device)
    started = time.perf_counter()
    for _ in range(max(1, cfg.iters)):
        dist.all_reduce(buffer)
    _sync(device)
    return errors, (time.perf_counter() - started) / max(1, cfg.iters), numel * 4


def _guarded(what: str, check) -> list[str]:
    try:
        return check()
    except (RuntimeError, MemoryError, ValueError) as err:  # CUDA errors are RuntimeErrors
        return [f"{what} check failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"]


def run_healthcheck(rt) -> int:
    """Run the check on this worker (a collective: every rank calls it); returns the exit code."""
    from .gather import gather_json
    from .failures import FailureRecord

    cfg = rt.config.health
    rt.watchdog.beat(0, "health", timeout_s=cfg.timeout_s)
    mine = RankHealth(rank=rt.rank, host=rt.cluster.current_host or "localhost")
    mine.errors += _guarded("memory", lambda: _check_memory(cfg, rt.device))
    measured = {}

    def matmul() -> list[str]:
        errors, measured["matmul_s"], measured["tflops"] = _check_matmul(cfg, rt.device, rt.rank)
        return errors

    mine.errors += _guarded("matmul", matmul)  # a device error is this node's verdict, not a hang
    mine.matmul_s, mine.tflops = measured.get("matmul_s", 0.0), measured.get("tflops", 0.0)
    nbytes = 0
    if rt.world_size > 1:  # every rank takes part, even one whose device failed above
        errors, mine.allreduce_s, nbytes = _check_allreduce(cfg, rt.device, rt.rank, rt.world_size)
        mine.errors += errors
    results = [RankHealth(**r) for r in gather_json(asdict(mine), None)] if rt.world_size > 1 else [mine]
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()  # the memory test's blocks go back to the device, not the cache
    rt.watchdog.pause()
    verdict = judge(results, cfg.straggler_factor)
    fail = verdict.failed(cfg.stragglers == "fail")
    busbw = bus_bandwidth(nbytes, max(r.allreduce_s for r in results), rt.world_size)
    if rt.is_main:
        hosts = len({r.host for r in results})
        log.info("health: %d ranks on %d hosts, %d bad; matmul median %.3f ms (%.2f TFLOP/s per device); "
                 "all-reduce %.1f MB bus bandwidth %.2f GB/s", len(results), hosts, len(verdict.bad),
                 verdict.median_matmul_s * 1e3, sorted(r.tflops for r in results)[len(results) // 2],
                 nbytes / 2**20, busbw / 1e9)
        for rank, ratio in verdict.stragglers:
            log.warning("health: straggler rank %d on %s: matmul %.1fx the median", rank.rank, rank.host, ratio)
        for rank in verdict.bad:
            log.error("health: bad rank %d on %s: %s", rank.rank, rank.host, "; ".join(rank.errors))
        _write_report(rt, results, verdict, busbw, fail)
    if not fail:
        return exitcodes.OK
    blamed = verdict.blamed(cfg.stragglers == "fail")
    blamed_ranks = verdict.bad + ([r for r, _ in verdict.stragglers] if cfg.stragglers == "fail" else [])
    bad_here = any(r.host == mine.host for r in blamed_ranks)
    record = FailureRecord("bad-node", mine.host, rt.rank, 0, "health",
                           ("this node failed the health check: " if bad_here else "") + blamed)
    rt.watchdog.write_record(record)
    log.error("%s", record.line())
    return exitcodes.BAD_NODE


def _write_report(rt, results: list[RankHealth], verdict: Verdict, busbw: float, fail: bool) -> None:
    directory = rt.watchdog.output_dir  # where this run's failure records go too
    if not directory:
        return
    report = {"ok": not fail, "ranks": [asdict(r) for r in results], "bad": [r.rank for r in verdict.bad],
              "stragglers": [{"rank": r.rank, "host": r.host, "ratio": ratio} for r, ratio in verdict.stragglers],
              "median_matmul_s": verdict.median_matmul_s, "allreduce_busbw_bytes_per_s": busbw}
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "health.json").write_text(json.dumps(report, indent=1) + "\n")
    except OSError as err:
        log.warning("could not write the health report under %s: %s", directory, err)
