"""Checkpoint names, manifests and policies (pure tables), and the fault-injection spec."""
import json

import pytest

from llm_runtime.checkpoint.layout import (Manifest, ManifestError, Member, NodeObject, due, node_key, resume_order,
                                           retention, steps_in, run_id_for, step_dir, step_of_key)


def test_run_id_is_stable_for_a_uri_and_never_a_timestamp():
    a, b = run_id_for("s3://bucket/ckpt/"), run_id_for("s3://bucket/ckpt")
    assert a == b and a.startswith("run-") and a != run_id_for("s3://bucket/other")
    assert run_id_for("s3://bucket/ckpt", "llama-7b-v2") == "llama-7b-v2"


@pytest.mark.parametrize("bad", ["../x", "a/b", " ", "x" * 129, ".", "a\nb"])
def test_a_run_id_that_could_escape_its_prefix_is_refused(bad):
    with pytest.raises(ValueError, match="checkpoint.run_id"):
        run_id_for("s3://b/p", bad)


@pytest.mark.parametrize("step,node,spread,token,key", [
    (5, 0, 8, "", "s00/step-000000005/node-00000.tar"),
    (5, 9, 8, "", "s01/step-000000005/node-00009.tar"),
    (120, 3, 1, "", "s00/step-000000120/node-00003.tar"),
    (120, 3, 1, "9f3a", "s00/step-000000120/node-00003-9f3a.tar"),  # a save of its own: never overwrites
    (7, 17, 16, "", "s01/step-000000007/node-00017.tar"),
])
def test_node_objects_are_spread_over_key_prefixes_that_come_before_the_step(step, node, spread, token, key):
    # The spread prefix first: every checkpoint's tars reuse the same prefixes S3 has partitioned.
    assert node_key(step, node, spread, token) == key
    assert step_of_key(key) == step


@pytest.mark.parametrize("key,step", [
    ("step-000000005/s00/node-00000.tar", 5),  # the older, step-first layout still reads
    ("step-000000005/manifest.json", 5), ("s03/step-000000009/node-00003.tar", 9),
    ("s03/manifest.json", None), ("sx/step-000000009/node.tar", None), ("other/step-000000001/x", None),
])
def test_the_step_of_a_key_is_read_from_either_layout(key, step):
    assert step_of_key(key) == step


def manifest(**changes):
    body = Manifest(run_id="r", step=5, world_size=4, num_nodes=2, backend="fsdp", objects=[
        NodeObject(key="step-000000005/s00/node-00000.tar", node=0, size=3000, sha256="a" * 64,
                   members=(Member("dcp/__0_0.distcp", 512, 1000, "b" * 64), Member("rank-00000.json", 2048, 10,
                                                                                      "c" * 64)))])
    data = json.loads(body.to_json())
    for path, value in changes.items():
        target = data
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return json.dumps(data)


def test_a_manifest_round_trips_and_finds_members():
    parsed = Manifest.parse(manifest(), "m")
    obj, member = parsed.member("rank-00000.json")
    assert (obj.node, member.offset, member.size) == (0, 2048, 10)
    assert parsed.member_names() == ["dcp/__0_0.distcp", "rank-00000.json"] and parsed.total_bytes() == 3000


@pytest.mark.parametrize("changes,needle", [
    ({"objects.0.key": "../other-run/step-000000005/x.tar"}, "is not under step-000000005/"),
    ({"objects.0.key": "step-000000006/s00/node-00000.tar"}, "is not under step-000000005/"),
    ({"objects.0.key": "s00/step-000000006/node-00000.tar"}, "is not under step-000000005/"),
    ({"objects.0.members.0.name": "../../etc/passwd"}, "is not a plain relative path"),
    ({"objects.0.members.0.name": "/abs"}, "is not a plain relative path"),
    ({"objects.0.members.0.name": "ds/../../../../tmp/evil"}, "is not a plain relative path"),
    ({"objects.0.key": "step-000000005/../../x.tar"}, "is not under step-000000005/"),
    ({"objects.0.members.0.offset": "0"}, "not a valid checkpoint manifest"),
    ({"objects.0.members.1.offset": 2995}, "lies outside"),
    ({"objects.0.members.1.name": "dcp/__0_0.distcp"}, "listed twice"),
    ({"format_version": 9}, "format_version 9"),
    ({"step": "five"}, "not a valid checkpoint manifest"),
])
def test_a_manifest_that_points_outside_its_checkpoint_is_refused(changes, needle):
    with pytest.raises(ManifestError, match=needle):
        Manifest.parse(manifest(**changes), "m")


@pytest.mark.parametrize("step,last,steps,minutes,since,at_end,expected", [
    (5, 10, 5, 0, 0, True, True),
    (6, 10, 5, 0, 0, True, False),
    (10, 10, 0, 0, 0, True, True),
    (10, 10, 0, 0, 0, False, False),
    (3, 10, 0, 60, 61, False, True),
    (3, 10, 0, 60, 59, False, False),
    (3, 10, 0, 0, 1e9, False, False),
])
def test_saves_happen_every_n_steps_every_t_minutes_and_at_the_end(step, last, steps, minutes, since, at_end,
                                                                   expected):
    assert due(step, last, every_steps=steps, every_minutes=minutes, minutes_since_save=since,
               at_end=at_end) is expected


@pytest.mark.parametrize("complete,present,keep,current,deleted", [
    ([2, 4, 6, 8], [2, 4, 6, 8], 2, None, [2, 4]),
    ([2, 4, 6, 8], [2, 4, 5, 6, 8], 2, None, [2, 4, 5]),      # 5: a save that never completed
    ([8], [8], 1, None, []),
    ([], [3, 4], 2, None, []),                                 # nothing complete: delete nothing
    ([2, 4], [2, 4], 0, None, [2]),                            # keep=0 still keeps the newest complete
    ([100, 150, 200], [100, 150, 200], 1, 150, [100]),         # fell back to 100, saved 150: 200 stays
    ([100, 150, 200], [100, 150, 200, 250], 2, 150, []),
])
def test_retention_keeps_the_newest_checkpoints_and_never_a_newer_one(complete, present, keep, current, deleted):
    assert retention(complete, present, keep, current) == deleted


@pytest.mark.parametrize("complete,present,keep,current,deleted", [
    ([100, 150, 200], [100, 150, 200], 1, 150, [100, 200]),    # the user named the line to continue
    ([100, 150, 200], [100, 150, 200, 250], 2, 150, [200, 250]),
])
def test_retention_drops_newer_steps_only_once_the_user_names_the_checkpoint_to_continue(complete, present, keep,
                                                                                        current, deleted):
    assert retention(complete, present, keep, current, abandon_later=True) == deleted


def test_steps_are_complete_only_with_their_manifest():
    keys = ["step-000000002/s00/node-00000-ab.tar", "step-000000002/manifest.json", "step-000000004/s00/x.tar",
            "step-000000004/nodes/manifest.json", "other/manifest.json", "s01/step-000000006/node-00001.tar",
            "s00/step-000000006/manifest.json", "step-000000008/manifest.json", "s00/step-000000008/node-00000.tar"]
    assert steps_in(keys) == {2: True, 4: False, 6: False, 8: True}


def test_resume_tries_newest_first_and_can_stop_at_a_step():
    assert resume_order([3, 9, 6]) == [9, 6, 3]
    assert resume_order([3, 9, 6], not_after=6) == [6, 3]
    assert step_dir(42) == "step-000000042"


@pytest.mark.parametrize("saved_fingerprint, ours, refused", [
    ("", "", False), ("aaaa", "aaaa", False), ("aaaa", "bbbb", True), ("", "bbbb", True)])
def test_a_checkpoint_of_another_hf_config_is_refused_on_resume(saved_fingerprint, ours, refused):
    from types import SimpleNamespace

    from llm_runtime.checkpoint.restore import Restorer, config_json
    from llm_runtime.checkpoint.transfer import CorruptCheckpoint
    from llm_runtime.config import Config

    config = Config()
    config.model.hf_path = "/models/tiny"
    manifest = Manifest(run_id="r", step=3, world_size=2, num_nodes=1, backend="fsdp",
                        extra={"config": config_json(config, saved_fingerprint)})
    restorer = SimpleNamespace(backend="fsdp", world_size=2, config=config, model_fingerprint=ours)
    if refused:
        with pytest.raises(CorruptCheckpoint, match="step 3 holds another model"):
            Restorer._check_compatible(restorer, manifest)
    else:
        Restorer._check_compatible(restorer, manifest)


# ---- DeepSpeed on another number of ranks (checkpoint/universal.py) --------------------------
@pytest.mark.parametrize("saved,ours,saved_world,world,mode", [
    ({"zero_stage": 2}, {"zero_stage": 2}, 2, 2, "same"),
    ({"zero_stage": 2}, {"zero_stage": 2}, 2, 4, "universal"),
    ({"zero_stage": -1}, {"zero_stage": 3}, 4, 2, "universal"),  # -1 is ZeRO-3 without a pipeline
    ({"zero_stage": 1}, {"zero_stage": 1}, 4, 1, "universal"),
    ({"zero_stage": 0}, {"zero_stage": 0}, 2, 4, "same"),  # every rank holds the whole optimizer state
    ({"zero_stage": 1, "pp": 2}, {"zero_stage": 1, "pp": 2}, 4, 4, "same"),
])
def test_a_deepspeed_checkpoint_on_another_world_size_is_converted_to_a_universal_one(saved, ours, saved_world,
                                                                                      world, mode):
    from llm_runtime.checkpoint.universal import resume_mode

    assert resume_mode(saved, ours, saved_world, world, step=5) == mode


@pytest.mark.parametrize("saved,ours,needle", [
    ({"zero_stage": 1, "pp": 2}, {"zero_stage": 1, "pp": 2}, "pipeline checkpoint (parallel.pp=2)"),
    ({"zero_stage": 1}, {"zero_stage": 1, "pp": 2}, "this run: parallel.pp=2"),
    ({"zero_stage": 2}, {"zero_stage": 3}, "saved with parallel.zero_stage=2, this run uses 3"),
    ({"zero_stage": 3, "shard_group_size": 2}, {"zero_stage": 3, "shard_group_size": 2}, "hpZ/MiCS"),
])
def test_a_deepspeed_checkpoint_no_conversion_serves_is_refused_naming_the_key(saved, ours, needle):
    from llm_runtime.checkpoint.universal import UniversalError, resume_mode

    with pytest.raises(UniversalError, match="checkpoint step 5 was written by 4 DeepSpeed ranks, this run has 2") as err:
        resume_mode(saved, ours, 4, 2, step=5)
    assert needle in str(err.value)


def test_a_conversion_the_disk_cannot_hold_is_refused_with_both_sizes_and_the_directory(tmp_path):
    from llm_runtime.checkpoint.universal import UniversalError, check_space

    check_space(2_000_000_000, 2_000_000_000, tmp_path, step=5)  # exactly enough
    with pytest.raises(UniversalError) as err:
        check_space(3_000_000_000, 1_250_000_000, tmp_path, step=5)
    assert all(s in str(err.value) for s in ("step 5", "3.00 GB", "1.25 GB", str(tmp_path), "checkpoint.local_dir"))


def test_a_failed_conversion_names_deepspeeds_tool_and_its_last_line(tmp_path):
    from llm_runtime.checkpoint.universal import UniversalError, convert

    with pytest.raises(UniversalError, match=r"ds_to_universal failed on .*missing \(exit [1-9]"):
        convert(tmp_path / "missing", tmp_path / "out", timeout_s=120)
