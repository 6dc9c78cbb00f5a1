"""What a checkpoint holds for each backend, and this rank's small JSON state.

torch backend: model parts and their optimizers through torch.distributed.checkpoint with
canonical parameter names (a pipeline stage keeps the unsplit model's names), so DCP can
reshard to another layout. DeepSpeed: the engine's own checkpoint files. Both: the step,
the data loader position, the LR schedulers and the RNG states, as JSON (never a pickle).
"""
from __future__ import annotations

import base64
from pathlib import Path

import torch

__all__ = ["DeepSpeedState", "TorchState", "restore_rng", "rng_state"]


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng(state: dict) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def _scheduler_state(scheduler) -> dict:
    """LambdaLR's numbers (its lambdas are code, rebuilt by the trainer)."""
    return {"last_epoch": scheduler.last_epoch, "base_lrs": list(scheduler.base_lrs),
            "_step_count": scheduler._step_count, "_last_lr": list(scheduler._last_lr)}


class TorchState:
    kind = "dcp"

    def __init__(self, parts, optimizers, schedulers):
        self.parts, self.optimizers, self.schedulers = list(parts), list(optimizers), list(schedulers)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model, optim = {}, {}
        for part, optimizer in zip(self.parts, self.optimizers):
            model.update(get_model_state_dict(part))
            optim.update(get_optimizer_state_dict(part, optimizer, options=self._options()))
        return {"model": model, "optim": optim}

    def load_dcp(self, loaded: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        for part, optimizer in zip(self.parts, self.optimizers):
            names = set(part.state_dict().keys())
            set_model_state_dict(part, {k: v for k, v in loaded["model"].items() if k in names})
            keys = get_optimizer_state_dict(part, optimizer, options=self._options()).keys()
            set_optimizer_state_dict(part, optimizer, {k: loaded["optim"][k] for k in keys}, options=self._options())

    def json_state(self) -> dict:
        return {"schedulers": [_scheduler_state(s) for s in self.schedulers]}

    def load_json_state(self, state: dict) -> None:
        saved = list(state.get("schedulers", ()))
        for index, scheduler in enumerate(self.schedulers):  # another part count: every part at the first's step
            if saved:
                scheduler.load_state_dict({**scheduler.state_dict(), **saved[min(index, len(saved) - 1)]})


class DeepSpeedState:
    """DeepSpeed's engine writes and reads its own files (torch.load of pickles: the runtime
    verifies every file against the manifest first)."""
    kind = "deepspeed"
    tag = "state"

    def __init__(self, engine):
        self.engine = engine

    def save_local(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "ds"), tag=self.tag, save_latest=False)

    def load_local(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory / "ds"), tag=self.tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory / 'ds'}")

    def json_state(self) -> dict:
        return {}

    def load_json_state(self, state: dict) -> None:
        pass
