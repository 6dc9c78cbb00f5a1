"""Node tars and verified member fetches, on local files and a LocalStore (a shared directory)."""
import hashlib
import os
import tarfile

import pytest

from llm_runtime.checkpoint.layout import Manifest
from llm_runtime.storage import open_store
from llm_runtime.checkpoint.layout import NodeObject
from llm_runtime.checkpoint.transfer import CorruptCheckpoint, TarStream, ensure_member

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


def test_a_node_tar_records_where_each_member_lies_and_its_checksum(node, tmp_path):
    obj = build_node_tar(node, NAMES, tmp_path / "node.tar", "step-000000005/s00/node-00000.tar", 0)
    raw = (tmp_path / "node.tar").read_bytes()
    assert obj.sha256 == hashlib.sha256(raw).hexdigest() and obj.size == len(raw)
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
    assert hashlib.sha256(body).hexdigest() == obj.sha256 and len(body) == obj.size
    assert store.stats.counts == {"POST": 2, "PUT": 3}  # create, 3 parts, complete (counted on the wire)
    for member in obj.members:
        assert body[member.offset:member.offset + member.size] == (node / member.name).read_bytes()
