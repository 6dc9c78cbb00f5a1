"""LLM_RUNTIME_FAULT: the drill language parses strictly and fires only where it says."""
import pytest

from llm_runtime.faults import Fault, FaultError, active, parse_faults, slowdown, wiped_disk


@pytest.mark.parametrize("text,faults", [
    ("", []),
    ("hang:rank=1,step=3", [Fault("hang", 1, 3)]),
    ("kill:step=5", [Fault("kill", None, 5)]),
    ("kill:rank=0;hang:rank=2,step=9", [Fault("kill", 0, None), Fault("hang", 2, 9)]),
    ("hang:rank=1,phase=checkpoint", [Fault("hang", 1, None, "checkpoint")]),
    ("hang:rank=1, step=3, phase=data", [Fault("hang", 1, 3, "data")]),
    ("kill:rank=0,step=5,restart=1", [Fault("kill", 0, 5, "step", 1)]),
    ("slow:rank=1,phase=health;corrupt:rank=0,phase=health",
     [Fault("slow", 1, None, "health"), Fault("corrupt", 0, None, "health")]),
    ("slow:rank=1,factor=3,phase=step", [Fault("slow", 1, None, "step", factor=3.0)]),
    ("slow:rank=2,factor=1.5", [Fault("slow", 2, None, "step", factor=1.5)]),
    ("wipe:rank=1,phase=launch", [Fault("wipe", 1, None, "launch")]),
])
def test_fault_specs_name_a_kind_rank_step_and_phase(text, faults):
    assert parse_faults(text) == faults


@pytest.mark.parametrize("text,needle", [
    ("explode:rank=1", "'explode' is not one of hang, kill, slow, corrupt"),
    ("hang:rank=one", "'rank=one' is not rank=N"),
    ("hang:host=2", "'host=2' is not rank=N"),
    ("hang:phase=lunch", "'phase=lunch' is not"),
    ("slow:rank=1", "slow at phase=step needs factor=F"),
    ("slow:rank=1,phase=data", "slow and corrupt apply to phase=health"),
    ("slow:rank=1,factor=1", "slow at phase=step needs factor=F \\(> 1\\)"),
    ("slow:rank=1,factor=0", "'factor=0' is not rank=N, step=N, restart=N, factor=F"),
    ("slow:rank=1,factor=fast", "'factor=fast' is not"),
    ("hang:rank=1,factor=2", "factor=F applies to slow at phase=step and to spike only"),
    ("slow:rank=1,factor=2,phase=health", "factor=F applies to slow at phase=step and to spike only"),
    ("hang:rank=1,phase=health", "phase=health takes only slow or corrupt"),
    ("wipe:rank=1", "wipe applies to phase=launch only"),
    ("wipe:rank=1,phase=launch,step=3", "wipe applies to phase=launch only, with rank=N"),
    ("wipe:rank=1,phase=checkpoint", "wipe applies to phase=launch only"),
])
def test_a_malformed_fault_spec_is_quoted(text, needle):
    with pytest.raises(FaultError, match=needle):
        parse_faults(text)


def test_a_fault_fires_only_on_its_rank_step_and_phase():
    fault = Fault("hang", 1, 3)
    assert fault.fires(1, 3) and not fault.fires(0, 3) and not fault.fires(1, 4)
    assert not fault.fires(1, 3, "data")
    assert Fault("kill").fires(7, 99)
    assert Fault("hang", 0, None, "checkpoint").fires(0, 12, "checkpoint")


def test_a_fault_fires_in_the_first_attempt_only_unless_told_otherwise():
    env = {"LLM_RUNTIME_FAULT": "kill:rank=0,step=5"}
    assert active(0, 5, "step", env) == [Fault("kill", 0, 5)]
    assert active(0, 5, "step", {**env, "TORCHELASTIC_RESTART_COUNT": "1"}) == []
    env = {"LLM_RUNTIME_FAULT": "kill:rank=0,step=5,restart=1", "TORCHELASTIC_RESTART_COUNT": "1"}
    assert active(0, 5, "step", env) == [Fault("kill", 0, 5, "step", 1)]
    assert active(0, 5, "step", {}) == []


def test_the_slow_drill_gives_its_factor_to_its_rank_only():
    env = {"LLM_RUNTIME_FAULT": "slow:rank=1,factor=3,phase=step"}
    assert slowdown(1, 7, env) == 3.0
    assert slowdown(0, 7, env) == 1.0
    assert slowdown(1, 7, {}) == 1.0
    assert slowdown(1, 7, {"LLM_RUNTIME_FAULT": "slow:rank=1,phase=health"}) == 1.0


def test_the_wipe_drill_takes_only_its_nodes_disk_and_only_in_the_first_attempt():
    env = {"LLM_RUNTIME_FAULT": "wipe:rank=1,phase=launch"}
    assert wiped_disk(1, env) and not wiped_disk(0, env)
    assert not wiped_disk(1, {**env, "TORCHELASTIC_RESTART_COUNT": "1"}) and not wiped_disk(1, {})
    assert wiped_disk(0, {"LLM_RUNTIME_FAULT": "wipe:phase=launch"})  # no rank: every node
