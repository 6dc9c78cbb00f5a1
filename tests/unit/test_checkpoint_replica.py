"""Peer replicas of tier 1: a real replica server on 127.0.0.1, pushes and pulls over HTTP, checked
against the manifest's sha256; records in a real store (a directory)."""
import hashlib
import json
import logging

from llm_runtime.checkpoint.layout import Manifest, Member, NodeObject, step_dir
from llm_runtime.checkpoint import replica
from llm_runtime.checkpoint.replica import ReplicaServer, holder_of, peer_fetch, push, server_record
from llm_runtime.storage import open_store


def node_files(directory, step, node=1, files=None):
    files = files or {"dcp/__2_0.distcp": b"x" * 300_000, "rank-00002.json": b'{"loader": {}}'}
    members, offset = [], 0
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
        members.append(Member(name, offset, len(data), hashlib.sha256(data).hexdigest()))
        offset += len(data)
    obj = NodeObject(key=f"s0/{step_dir(step)}/node-1.tar", node=node, size=offset, sha256="", members=tuple(members))
    return Manifest(run_id="r", step=step, world_size=4, num_nodes=2, backend="fsdp", objects=[obj], extra={})


def record(store, holder_url, holder=0):
    replica._SERVERS.clear()  # a cache per process: each test has its own servers
    store.write_text(server_record(holder), json.dumps({"node": holder, "url": holder_url}))


def pull(manifest, node, root, store):
    """Every member of ``node`` as a restoring rank gets it from the peers; how many came."""
    obj = manifest.objects[0]
    return sum(peer_fetch(manifest, obj, m, root / m.name, store) for m in obj.members)


def test_the_holder_of_node_i_is_the_next_node_round_the_ring():
    assert [holder_of(i, 3) for i in range(3)] == [1, 2, 0] and holder_of(0, 2) == 1


def test_a_pushed_replica_comes_back_to_a_wiped_node_byte_for_byte(tmp_path):
    server = ReplicaServer(tmp_path / "holder", "127.0.0.1", keep=2, min_free_mb=0)
    try:
        source = tmp_path / "node1" / step_dir(6)
        manifest = node_files(source, 6)
        assert push(source, manifest, 1, server.url, deadline=float("inf"))
        store = open_store(str(tmp_path / "store"))
        record(store, server.url)  # node 1's own server is gone with its host: no record of it
        wiped = tmp_path / "replaced" / step_dir(6)
        assert pull(manifest, 1, wiped, store) == 2
        for member in manifest.objects[0].members:
            assert (wiped / member.name).read_bytes() == (source / member.name).read_bytes()
    finally:
        server.close()


def test_a_peer_with_a_short_disk_refuses_cleanly_and_the_push_reports_it(tmp_path, caplog):
    server = ReplicaServer(tmp_path / "holder", "127.0.0.1", keep=2, min_free_mb=1 << 30)  # 1 PB kept free
    try:
        source = tmp_path / "node1" / step_dir(3)
        manifest = node_files(source, 3)
        with caplog.at_level(logging.WARNING):
            assert not push(source, manifest, 1, server.url, deadline=float("inf"))
        assert "refused: the peer's disk is short" in caplog.text
        assert not list((tmp_path / "holder").rglob("*.distcp"))
    finally:
        server.close()


def test_a_replica_that_does_not_match_the_manifest_is_not_used(tmp_path, caplog):
    server = ReplicaServer(tmp_path / "holder", "127.0.0.1", keep=2, min_free_mb=0)
    try:
        source = tmp_path / "node1" / step_dir(6)
        manifest = node_files(source, 6)
        assert push(source, manifest, 1, server.url, deadline=float("inf"))
        held = tmp_path / "holder" / "node-00001" / step_dir(6) / "rank-00002.json"
        held.write_bytes(b'{"loader": {"tampered": 1}}')
        store = open_store(str(tmp_path / "store"))
        record(store, server.url)
        wiped = tmp_path / "replaced" / step_dir(6)
        with caplog.at_level(logging.INFO):
            assert pull(manifest, 1, wiped, store) == 1  # the untouched file only
        assert "rank-00002.json is on no peer" in caplog.text and "does not match its sha256" in caplog.text
        assert not (wiped / "rank-00002.json").exists()
    finally:
        server.close()


def test_a_node_serves_its_own_committed_files_to_the_others_and_nothing_uncommitted(tmp_path):
    own = tmp_path / "node-00001"
    manifest = node_files(own / step_dir(6), 6)
    server = ReplicaServer(tmp_path / "replicas", "127.0.0.1", keep=2, min_free_mb=0, own_node=1, own_dir=own)
    try:
        store = open_store(str(tmp_path / "store"))
        record(store, server.url, holder=1)
        assert pull(manifest, 1, tmp_path / "reader", store) == 0  # no manifest.json yet: not committed
        (own / step_dir(6) / "manifest.json").write_text("{}")
        assert pull(manifest, 1, tmp_path / "reader", store) == 2
    finally:
        server.close()


def test_the_holder_prunes_each_peers_steps_by_keep_and_refuses_paths_outside_its_root(tmp_path):
    import urllib.error
    import urllib.request

    server = ReplicaServer(tmp_path / "holder", "127.0.0.1", keep=2, min_free_mb=0)
    try:
        for step in (3, 6, 9):
            source = tmp_path / "node1" / step_dir(step)
            assert push(source, node_files(source, step), 1, server.url, deadline=float("inf"))
        held = sorted(p.name for p in (tmp_path / "holder" / "node-00001").iterdir())
        assert held == [step_dir(6), step_dir(9)]
        request = urllib.request.Request(f"{server.url}/r/1/9/../../../../etc/passwd", method="GET")
        try:
            urllib.request.urlopen(request, timeout=10)
            raise AssertionError("a path outside the root was served")
        except urllib.error.HTTPError as err:
            assert err.code in (400, 404)
    finally:
        server.close()


def test_a_request_without_the_jobs_token_is_refused(tmp_path):
    import urllib.error
    import urllib.request

    server = ReplicaServer(tmp_path / "holder", "127.0.0.1", keep=2, min_free_mb=0)
    try:
        bare = server.url.rsplit("/", 1)[0]  # the address without the token from the job's store
        try:
            urllib.request.urlopen(f"{bare}/r/1/6/rank-00002.json", timeout=10)
            raise AssertionError("served without the token")
        except urllib.error.HTTPError as err:
            assert err.code == 403
    finally:
        server.close()
