"""Node tars and verified member fetches, on local files and a LocalStore (a shared directory)."""
import hashlib
import os
import tarfile

import pytest

from llm_runtime.checkpoint.layout import Manifest
from llm_runtime.storage import open_store
from llm_runtime.checkpoint.layout import NodeObject
from llm_runtime.checkpoint.transfer import CorruptCheckpoint, TarStream, ensure_member, verify_object

NAMES = ["dcp/.metadata", "dcp/__0_0.distcp", "rank-00000.json"]


def build_node_tar(root, names, tar_path, key: str, node: int) -> NodeObject:
    """The node tar the uploader streams, saved to a file (the runtime never writes one locally)."""
    stream = TarStream(root, names)
    with open(tar_path, "wb") as sink:
        for block in iter(lambda: stream.read(8 << 20), b""):
            sink.write(block)
    return stream.node_object(key, node)


@pytest.fixture
def node(tmp_path):
    root = tmp_path / "node"
    (root / "dcp").mkdir(parents=True)
    (root / "dcp" / "__0_0.distcp").write_bytes(os.urandom(70000))
    (root / "dcp" / ".metadata").write_bytes(os.urandom(999))
    (root / "rank-00000.json").write_text('{"step": 5}')
    return root


def tree_digest(raw: bytes, members) -> str:
    """The reference: the tar's bytes with each member's data replaced by its raw sha256."""
    out, position = hashlib.sha256(), 0
    for member in sorted(members, key=lambda m: m.offset):
        out.update(raw[position:member.offset])
        out.update(hashlib.sha256(raw[member.offset:member.offset + member.size]).digest())
        position = member.offset + member.size
    out.update(raw[position:])
    return out.hexdigest()


def test_a_node_tar_records_where_each_member_lies_and_its_checksum(node, tmp_path):
    obj = build_node_tar(node, NAMES, tmp_path / "node.tar", "step-000000005/s00/node-00000.tar", 0)
    raw = (tmp_path / "node.tar").read_bytes()
    assert obj.tree_sha256 == tree_digest(raw, obj.members) and obj.size == len(raw) and obj.sha256 == ""
    with tarfile.open(tmp_path / "node.tar") as tar:  # what a tar reader sees agrees with the manifest
        assert [(m.name, m.offset_data, m.size) for m in tar.getmembers()] == \
            [(m.name, m.offset, m.size) for m in obj.members]
    for member in obj.members:
        assert raw[member.offset:member.offset + member.size] == (node / member.name).read_bytes()
        assert member.sha256 == hashlib.sha256((node / member.name).read_bytes()).hexdigest()


@pytest.fixture
def uploaded(node, tmp_path):
    store = open_store(str(tmp_path / "shared" / "run-x"))
    obj = build_node_tar(node, NAMES, tmp_path / "node.tar", "step-000000005/s00/node-00000.tar", 0)
    store.write_file(obj.key, tmp_path / "node.tar")
    manifest = Manifest(run_id="run-x", step=5, world_size=1, num_nodes=1, backend="fsdp", objects=[obj])
    return store, Manifest.parse(manifest.to_json(), "m")


def test_a_missing_member_is_fetched_with_one_ranged_read_and_verified(uploaded, tmp_path):
    store, manifest = uploaded
    path = ensure_member(manifest, "rank-00000.json", tmp_path / "fresh", store)
    assert path.read_text() == '{"step": 5}' and store.stats.counts["GET"] == 1


def test_a_local_copy_that_matches_is_used_and_one_that_does_not_is_replaced(uploaded, node):
    store, manifest = uploaded
    ensure_member(manifest, "dcp/.metadata", node, store)
    assert "GET" not in store.stats.counts
    (node / "dcp" / ".metadata").write_bytes(b"tampered")
    ensure_member(manifest, "dcp/.metadata", node, store)
    assert store.stats.counts["GET"] == 1 and len((node / "dcp" / ".metadata").read_bytes()) == 999


def test_a_corrupt_object_is_named_and_nothing_is_written(uploaded, tmp_path):
    store, manifest = uploaded
    obj = manifest.objects[0]
    member = [m for m in obj.members if m.name == "dcp/__0_0.distcp"][0]
    path = store.root / obj.key
    raw = bytearray(path.read_bytes())
    raw[member.offset + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="dcp/__0_0.distcp in .* does not match its checksum"):
        ensure_member(manifest, "dcp/__0_0.distcp", tmp_path / "fresh", store)
    assert not (tmp_path / "fresh" / "dcp" / "__0_0.distcp").exists()


def test_without_a_store_a_missing_local_file_is_an_error_naming_it(uploaded, tmp_path):
    _, manifest = uploaded
    with pytest.raises(CorruptCheckpoint, match="rank-00000.json is missing .* no checkpoint.uri"):
        ensure_member(manifest, "rank-00000.json", tmp_path / "fresh", None)


def test_a_node_tar_streams_to_s3_in_parts_without_a_local_copy(node, s3, tmp_path):
    from llm_runtime.checkpoint.transfer import TarStream

    (node / "dcp" / "__1_0.distcp").write_bytes(os.urandom(11 << 20))  # > 2 parts of 5 MiB
    store = open_store("s3://test-bucket/ck/run-x", part_size=5 << 20, concurrency=2)
    stream = TarStream(node, NAMES + ["dcp/__1_0.distcp"])
    store.write_stream("step-000000001/s00/node-00000.tar", stream)
    obj = stream.node_object("step-000000001/s00/node-00000.tar", 0)
    body = s3.client.get_object(Bucket="test-bucket", Key="ck/run-x/step-000000001/s00/node-00000.tar")["Body"].read()
    assert tree_digest(body, obj.members) == obj.tree_sha256 and len(body) == obj.size
    assert store.stats.counts == {"POST": 2, "PUT": 3}  # create, 3 parts, complete (counted on the wire)
    for member in obj.members:
        assert body[member.offset:member.offset + member.size] == (node / member.name).read_bytes()


@pytest.mark.parametrize("where", ["a header", "member data", "the end-of-archive padding"])
def test_verify_names_an_object_changed_anywhere_even_outside_its_members(uploaded, where):
    store, manifest = uploaded
    obj = manifest.objects[0]
    assert verify_object(store, obj) == []
    data = sorted(obj.members, key=lambda m: m.offset)[1]
    at = {"a header": data.offset - 100, "member data": data.offset + 10, "the end-of-archive padding": obj.size - 1}
    path = store.root / obj.key
    raw = bytearray(path.read_bytes())
    raw[at[where]] ^= 0xFF
    path.write_bytes(bytes(raw))
    problems = verify_object(store, obj)
    assert f"{obj.key}: object checksum does not match the manifest" in problems
    assert (f"{obj.key}: member {data.name} does not match the manifest" in problems) == (where == "member data")


def test_an_object_recorded_with_a_whole_object_sha256_still_verifies(uploaded, tmp_path):
    # manifests written before the tree digest carry the whole object's sha256 instead
    import dataclasses

    store, manifest = uploaded
    obj = manifest.objects[0]
    raw = (store.root / obj.key).read_bytes()
    old = dataclasses.replace(obj, sha256=hashlib.sha256(raw).hexdigest(), tree_sha256="")
    assert verify_object(store, old) == []
    assert verify_object(store, dataclasses.replace(old, sha256="0" * 64)) == \
        [f"{obj.key}: object checksum does not match the manifest"]


def test_verify_reads_an_object_in_blocks_that_split_members_and_empty_ones(tmp_path, monkeypatch):
    import llm_runtime.checkpoint.transfer as transfer

    root = tmp_path / "n"
    root.mkdir()
    (root / "a").write_bytes(os.urandom(1500))
    (root / "empty").write_bytes(b"")
    (root / "z").write_bytes(os.urandom(5000))
    obj = build_node_tar(root, ["a", "empty", "z"], tmp_path / "n.tar", "k.tar", 0)
    store = open_store(str(tmp_path / "store"))
    store.write_file("k.tar", tmp_path / "n.tar")
    for block in (1, 7, 512, 1536, 4096):
        monkeypatch.setattr(transfer, "BLOCK", block)
        assert verify_object(store, obj) == [], block


def test_a_rank_prefetches_only_the_dcp_files_it_wrote():
    from llm_runtime.checkpoint.transfer import own_dcp_files

    names = ["dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/__1_1.distcp", "dcp/__10_0.distcp",
             "rank-00001.json"]
    assert own_dcp_files(names, 1) == ["dcp/__1_0.distcp", "dcp/__1_1.distcp"]
    assert own_dcp_files(names, 10) == ["dcp/__10_0.distcp"] and own_dcp_files(names, 3) == []


def test_prefetched_members_are_fetched_once_verified_and_a_bad_one_is_raised_where_it_is_taken(uploaded, tmp_path):
    from llm_runtime.checkpoint.transfer import Prefetch

    store, manifest = uploaded
    prefetch = Prefetch(manifest, ["dcp/__0_0.distcp"], tmp_path / "fresh", store)
    assert prefetch.take(["dcp/.metadata", "dcp/__0_0.distcp"]) == ["dcp/.metadata"]
    prefetch.close()
    assert (tmp_path / "fresh" / "dcp" / "__0_0.distcp").stat().st_size == 70000
    assert store.stats.counts["GET"] == 1
    obj = manifest.objects[0]
    raw = bytearray((store.root / obj.key).read_bytes())
    raw[manifest.member("rank-00000.json")[1].offset] ^= 0xFF
    (store.root / obj.key).write_bytes(bytes(raw))
    prefetch = Prefetch(manifest, ["rank-00000.json"], tmp_path / "other", store)
    with pytest.raises(CorruptCheckpoint, match="rank-00000.json"):
        prefetch.take(["rank-00000.json"])
    prefetch.close()


def test_a_member_larger_than_a_part_is_fetched_as_parallel_ranged_gets_and_verified(s3, tmp_path):
    from llm_runtime.checkpoint import transfer

    data = os.urandom(3 * transfer.PART + 12345)
    store = open_store("s3://test-bucket/ck")
    (tmp_path / "obj").write_bytes(b"h" * 512 + data + b"t" * 100)
    store.write_file("obj", tmp_path / "obj")
    digest = transfer._fetch(store, "obj", 512, len(data), tmp_path / "out", 7)
    assert digest == hashlib.sha256(data).hexdigest() and (tmp_path / "out").read_bytes() == data
    assert store.stats.counts["GET"] == len(transfer.part_ranges(512, len(data), transfer.PART)) == 3


@pytest.mark.parametrize("size,part,expected", [
    (0, 8, [(100, 0)]), (5, 8, [(100, 5)]), (11, 8, [(100, 11)]), (12, 8, [(100, 6), (106, 6)]),
    (24, 8, [(100, 8), (108, 8), (116, 8)])])
def test_part_ranges_cover_the_member_exactly_with_no_short_tail(size, part, expected):
    from llm_runtime.checkpoint.transfer import part_ranges

    assert part_ranges(100, size, part) == expected
