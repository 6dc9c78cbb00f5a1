"""The built-in trainer's step loop: the batch, the step, the loss check, metrics, saves, rollbacks.

Each step's local loss stays on the device; every step that logs or saves (and the last) reduces
all of them since the last check in one all-reduce, the one a plain loop does for its logged
loss, and :class:`~llm_runtime.badbatch.LossGuard` judges them on every rank alike. A bad step is
rolled back to the newest clean checkpoint and its batch skipped from then on (badbatch.py); a
save is never taken before its steps passed the check. Skipped steps read their batch and drop
it: no optimizer step, no LR advance.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from .badbatch import BadBatch, BadBatchError, LossGuard, parse_steps
from .faults import inject, loss_drill, loss_factor, slowdown
from .metrics import memory_gb, metrics_for_run
from .stragglers import monitor_for_run, slow_drill

__all__ = ["Loop"]

log = logging.getLogger(__name__)


class Loop:
    """One run of the loop; ``start`` is the step the run resumed from (0: none)."""

    def __init__(self, rt, trainer, loader, accumulation: int, checkpointer, model_config, evaluator=None):
        self.rt, self.trainer, self.loader, self.accumulation, self.ck = rt, trainer, loader, accumulation, checkpointer
        self.evaluator = evaluator
        """evaluation.Evaluator, or None without eval data."""
        self.train = rt.config.train
        self.state = trainer.checkpoint_state() if checkpointer is not None else None
        self.asked = parse_steps(rt.config.data.skip_steps)
        self.guard = LossGuard(self.train.spike_sigma, self.train.spike_window)
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.grad_norm = 0.0
        self.start = 0
        if checkpointer is not None:
            rt.watchdog.beat(0, "checkpoint")
            self.start = checkpointer.restore(self.state, loader)
        run_store = (checkpointer.store or checkpointer.local) if checkpointer is not None else None
        self.window, self.sink = metrics_for_run(rt, model_config, run_store)
        self.stragglers = monitor_for_run(rt)
        self.skipped = self._skips()  # once here and after each rollback, not at every step
        self.metrics: dict = {"loss": float("nan"), "tokens_per_s": 0.0, "grad_norm": 0.0}
        self.stopped = False
        """A launcher's stop request ended the run early (after its save)."""

    def _skips(self) -> set[int]:
        """data.skip_steps and the run's skipped_batches.json (as the last restore read it)."""
        return self.asked | set(self.ck.skips.skipped) if self.ck is not None else self.asked

    def run(self) -> dict:
        step = self.start
        if step == 0 and self.rt.config.eval.at_start:
            self._evaluate(0)
        while step < self.train.steps:
            step += 1
            self._step(step)
            save, stop = self._boundary(step)
            if self.pending and (step % self.train.log_every == 0 or step == self.train.steps or save or stop):
                bad = self._check(step)
                restored = self._roll_back(bad) if bad is not None else None
                if restored is not None:
                    step = restored
                    if stop:  # the stop stands: the next attempt resumes from the restored step, skipping
                        log.info("stop requested by the launcher: stopping at the rolled-back step %d", step)
                        self.stopped = True
                        break
                    continue
            if save or stop:
                self.rt.watchdog.beat(step, "checkpoint")
                self.window.checkpoint_blocked_s += self.ck.save(step, self.state, self.loader).blocked_s
            if stop:
                log.info("stop requested by the launcher: saved step %d, stopping", step)
                self.rt.watchdog.beat(step, "checkpoint")
                self.stopped = True
                break
            if self.evaluator is not None and self.evaluator.due(step):
                self._evaluate(step)
        if not self.stopped and self.start < self.train.steps and self.rt.config.eval.at_end:
            self._evaluate(self.train.steps)  # (not again when the last step's cadence already did)
        return self.metrics

    def _evaluate(self, step: int) -> None:
        if self.evaluator is not None and step not in self.evaluator.done:
            started = time.perf_counter()
            self.evaluator.run(step, self.sink)
            self.window.eval_s += time.perf_counter() - started

    def close(self) -> None:
        self.stragglers.close()
        if self.sink is not None:
            self.sink.close()  # TensorBoard's writer, also when training fails

    # ---- one step ---------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        rt, watchdog, window = self.rt, self.rt.watchdog, self.window
        watchdog.beat(step, "data")
        inject(rt.rank, step, "data")
        waited = time.perf_counter()
        rows = self.loader.next_batch().to(rt.device)
        wait_s = time.perf_counter() - waited
        window.data_wait_s += wait_s
        if step in self.skipped:
            if rt.is_main:
                log.warning("step %d: its batch is skipped (data.skip_steps or skipped_batches.json): no optimizer "
                            "step, the LR schedule does not advance", step)
            return
        watchdog.beat(step, "step")
        inject(rt.rank, step, "step")
        computing, cpu_started = time.perf_counter(), time.thread_time()
        self.stragglers.start()
        with loss_drill(loss_factor(rt.rank, step)):
            local_loss, self.grad_norm = self.trainer.step(rows[:, :-1], rows[:, 1:], self.accumulation)
        factor = slowdown(rt.rank, step)
        if factor > 1:
            slow_drill(factor, cpu_started, computing, rt.device.type == "cuda")
        self.stragglers.stop(step, wait_s)
        window.steps += 1
        window.compute_s += time.perf_counter() - computing
        self.pending.append((step, local_loss))

    def _boundary(self, step: int) -> tuple[bool, bool]:
        if self.ck is None:
            return False, False
        save, stop = self.ck.step_boundary(step, self.train.steps)  # the same on every rank, no collective
        self.window.checkpoint_slowdown_s += self.ck.last_lost
        return save, stop and step < self.train.steps

    # ---- the loss check ---------------------------------------------------------------------
    def _check(self, step: int) -> BadBatch | None:
        """Every pending step's global loss (one all-reduce, as a plain loop's logging does), judged;
        on a log step the metrics line follows."""
        started = time.perf_counter()
        steps = [s for s, _ in self.pending]
        losses = self.trainer.global_losses(torch.stack([loss.reshape(()) for _, loss in self.pending]))
        self.pending.clear()
        bad = self.guard.check(steps, losses)
        self.window.compute_s += time.perf_counter() - started
        if bad is not None and math.isfinite(bad.loss) and self.ck is None:
            log.warning("step %d: %s; no checkpoints to roll back to (checkpoint.every_steps): training on", bad.step,
                        bad.reason)
            bad = None
        if bad is not None or not (step % self.train.log_every == 0 or step == self.train.steps):
            return bad
        self.metrics = self.window.close(step=step, loss=losses[-1], lr=self.trainer.last_lr(),
                                         grad_norm=float(self.grad_norm), memory=memory_gb(self.rt.device))
        named = self.stragglers.latest
        if named is not None:
            self.metrics.update(straggler=named.name, slow_s=named.slow_s)
        if self.sink is not None:
            self.sink.write(self.metrics)
        return None

    def _roll_back(self, bad: BadBatch) -> int | None:
        """Back to the newest clean checkpoint before ``bad``; its step. Without checkpoints, or past
        train.max_rollbacks, a BadBatchError (the failure record says why); a finite spike with no
        checkpoint before it is a warning (None: training goes on)."""
        if self.ck is None:
            raise BadBatchError(f"step {bad.step}: {bad.reason}; there are no checkpoints to roll back to "
                                "(set checkpoint.every_steps)")
        made = self.ck.skips.rollbacks
        if made >= self.train.max_rollbacks:
            raise BadBatchError(f"step {bad.step}: {bad.reason}; this run already rolled back {made} time(s), "
                                f"train.max_rollbacks={self.train.max_rollbacks}")
        self.rt.watchdog.beat(bad.step, "checkpoint")
        try:
            restored = self.ck.roll_back(bad.step, bad.reason, self.state, self.loader)
        except BadBatchError as err:
            if not math.isfinite(bad.loss) or "no clean checkpoint" not in str(err):
                raise
            log.warning("%s: training on", err)  # a spike before the first save: nothing to roll back to
            return None
        self.skipped = self._skips()
        self.guard.forget_after(restored)
        if self.evaluator is not None:  # the replayed steps' weights differ: evaluate them again
            self.evaluator.done = {done for done in self.evaluator.done if done <= restored}
        self.window.reset()
        self.rt.watchdog.pause()
        return restored
