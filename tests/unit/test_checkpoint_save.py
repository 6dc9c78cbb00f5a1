"""Checkpointer.save on one real gloo rank: what happens before DCP's write starts (the blocked part)."""
import torch
import torch.distributed as dist

from llm_runtime.checkpoint import manager
from llm_runtime.checkpoint.manager import Checkpointer, save_token
from llm_runtime.checkpoint.state import TorchState
from llm_runtime.config import load_config


class _Position:
    def state_dict(self):
        return {"step": 0}


def test_save_tokens_are_the_same_on_every_rank_and_differ_per_launch_step_and_save():
    token = save_token("ab12cd34", 10, 0)
    assert token == save_token("ab12cd34", 10, 0) and len(token) == 8
    assert len({token, save_token("ab12cd35", 10, 0), save_token("ab12cd34", 11, 0),
                save_token("ab12cd34", 10, 1)}) == 4


def test_a_leftover_of_an_unfinished_save_is_cleared_first_and_other_saves_gather_nothing(tmp_path, monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = load_config(cli=[("checkpoint.local_dir", str(tmp_path)), ("checkpoint.keep", "10"),
                                  ("train.steps", "100")])
        probe = Checkpointer(config, rank=0, world_size=1, local_rank=0, node_rank=0, num_nodes=1,
                             backend="fsdp", local_dir=str(tmp_path))
        probe.close()
        leftover = probe.local_root / "step-000000005"
        leftover.mkdir(parents=True)
        (leftover / "stale.bin").write_bytes(b"from a save that never finished")
        checkpointer = Checkpointer(config, rank=0, world_size=1, local_rank=0, node_rank=0, num_nodes=1,
                                    backend="fsdp", local_dir=str(tmp_path))
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters())
        state = TorchState([model], [optimizer], [torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)])
        gathers = []
        real = manager.gather_json
        monkeypatch.setattr(manager, "gather_json", lambda *a, **k: gathers.append(a) or real(*a, **k))
        checkpointer.save(5, state, _Position())
        checkpointer.wait()
        assert len(gathers) == 1 and not (leftover / "stale.bin").exists()  # every rank waited for the cleanup
        gathers.clear()
        checkpointer.save(6, state, _Position())
        assert gathers == []  # the token needs no collective
        checkpointer.close()
        assert (leftover / "manifest.json").exists() and (probe.local_root / "step-000000006" / "manifest.json").exists()
        assert checkpointer.reports[0].step == 5 and checkpointer.reports[1].step == 6
    finally:
        dist.destroy_process_group()
