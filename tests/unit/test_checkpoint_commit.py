"""The commit protocol of checkpoint/commit.py on real files: two "nodes" (threads) commit one save
through a shared directory store, the way two hosts do through S3. No workers, no process group."""
from __future__ import annotations

import json
import threading

import pytest

from llm_runtime.checkpoint.commit import (FAILED, SavePlan, abandon_incomplete, commit, commit_failure,
                                           committed_token, marker, pending_steps, store_steps)
from llm_runtime.checkpoint.layout import MANIFEST, Manifest, step_dir
from llm_runtime.checkpoint.transfer import ensure_member
from llm_runtime.storage import open_store


def plan_for(node: int, step: int = 4, token: str = "t1") -> SavePlan:
    return SavePlan(step=step, token=token, run_id="run-x", world_size=4, num_nodes=2, node_rank=node,
                    ranks=[2 * node, 2 * node + 1], backend="fsdp", extra={"config": {}})


def write_node(root, node: int, step: int = 4, token: str = "t1", markers: bool = True):
    directory = root / f"node-{node:05d}" / step_dir(step)
    (directory / "dcp").mkdir(parents=True)
    plan = plan_for(node, step, token)
    for rank in plan.ranks:
        (directory / f"rank-{rank:05d}.json").write_text(json.dumps({"step": step, "rank": rank}))
        (directory / "dcp" / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 5000)
    if node == 0:
        (directory / "dcp" / ".metadata").write_bytes(b"meta")
    plan.write(directory)
    if markers:
        for rank in plan.ranks:
            marker(directory, rank).parent.mkdir(exist_ok=True)
            marker(directory, rank).write_text(token)
    return directory, plan


def commit_both(tmp_path, shared, **kwargs):
    results, errors = {}, {}

    def one(node):
        directory, plan = write_node(tmp_path, node, **kwargs)
        try:
            results[node] = commit(directory, plan, shared, open_store(str(directory.parent)), timeout_s=30)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors[node] = err

    threads = [threading.Thread(target=one, args=(n,)) for n in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results, errors


def test_two_nodes_commit_one_manifest_listing_both_and_each_keeps_a_copy(tmp_path):
    shared = open_store(str(tmp_path / "shared"))
    results, errors = commit_both(tmp_path, shared)
    assert not errors, errors
    assert results[0].to_json() == results[1].to_json()
    manifest = Manifest.parse(shared.read_text(f"{step_dir(4)}/{MANIFEST}"), "m")
    assert [o.node for o in manifest.objects] == [0, 1] and manifest.extra["token"] == "t1"
    assert {m.name for o in manifest.objects for m in o.members} >= {"rank-00003.json", "dcp/.metadata"}
    assert not any(".done" in m.name or ".save" in m.name for o in manifest.objects for m in o.members)
    keys = sorted(k for k, _ in shared.list())
    assert len(keys) == 4 and store_steps(shared) == {4: True}  # 2 x nodes objects
    for node in (0, 1):
        assert committed_token(tmp_path / f"node-{node:05d}" / step_dir(4)) == "t1"
        assert pending_steps(tmp_path / f"node-{node:05d}") == []
    fresh = tmp_path / "fresh"  # a member is fetched from the other node's object and verified
    assert json.loads(ensure_member(manifest, "rank-00002.json", fresh, shared).read_text())["rank"] == 2


def test_saving_a_committed_step_again_replaces_it_only_once_the_new_manifest_is_in(tmp_path):
    shared = open_store(str(tmp_path / "shared"))
    commit_both(tmp_path, shared)
    old = {k for k, _ in shared.list() if k.endswith(".tar")}
    for node in (0, 1):
        (tmp_path / f"node-{node:05d}" / step_dir(4)).rename(tmp_path / f"old-{node}")
    results, errors = commit_both(tmp_path, shared, token="t2")
    assert not errors, errors
    new = {k for k, _ in shared.list() if k.endswith(".tar")}
    assert len(new) == 2 and not (old & new) and all("-t2.tar" in k for k in new)  # the older save's objects went
    assert Manifest.parse(shared.read_text(f"{step_dir(4)}/{MANIFEST}"), "m").extra["token"] == "t2"


def test_a_save_whose_worker_died_before_its_marker_is_abandoned_not_committed(tmp_path):
    directory, plan = write_node(tmp_path, 0, markers=False)
    marker(directory, 0).parent.mkdir()
    marker(directory, 0).write_text("t1")  # rank 1 never finished its write
    assert abandon_incomplete(tmp_path / "node-00000", "exited") == [4]
    assert "ranks [1] exited" in str(commit_failure(directory)) and pending_steps(tmp_path / "node-00000") == []
    with pytest.raises(InterruptedError):  # a committer still waiting for the marker stops
        commit(directory, plan, open_store(str(tmp_path / "shared")), open_store(str(directory.parent)),
               timeout_s=30)


def test_a_commit_past_its_deadline_names_the_missing_nodes_and_writes_no_manifest(tmp_path):
    shared = open_store(str(tmp_path / "shared"))
    directory, plan = write_node(tmp_path, 0)  # node 1 never uploads
    with pytest.raises(TimeoutError, match=r"the uploads of nodes \[1\]"):
        commit(directory, plan, shared, open_store(str(directory.parent)), timeout_s=1)
    assert store_steps(shared) == {4: False} and committed_token(directory) is None


@pytest.mark.parametrize("text,kind", [("timeout\nstep 4 did not finish\n", TimeoutError),
                                       ("error\nPUT failed\n", OSError)])
def test_a_recorded_commit_failure_keeps_its_kind_for_the_workers(tmp_path, text, kind):
    (tmp_path / FAILED).write_text(text)
    assert isinstance(commit_failure(tmp_path), kind)
    assert commit_failure(tmp_path / "nowhere") is None
