"""llm_runtime.storage against a real S3 (moto over HTTP on 127.0.0.1, through the fault proxy) and
a real directory. Nothing is mocked: requests are counted at the proxy, on the wire."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from llm_runtime.storage import ObjectChanged, ObjectMissing, StorageError, open_store
from tests.procs import free_port


@pytest.fixture(params=["s3", "files"])
def store(request, tmp_path):
    if request.param == "files":
        return open_store(str(tmp_path / "store"))
    s3 = request.getfixturevalue("s3")
    return open_store(s3.url("root/prefix"), part_size=5 << 20, concurrency=2)


def test_both_backends_read_write_list_and_delete_the_same_way(store, tmp_path):
    assert store.read_text("missing.json") is None
    store.write_text("a/one.json", '{"x": 1}')
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    store.write_file("a/two.bin", tmp_path / "big.bin")
    with open(tmp_path / "big.bin", "rb") as handle:
        store.write_stream("b/three.bin", handle)
    store.write_text("ab/sibling.json", "{}")
    assert store.read_text("a/one.json") == '{"x": 1}'
    assert sorted(store.list("a/")) == [("a/one.json", 8), ("a/two.bin", 3 << 20)]
    assert store.read_bytes("b/three.bin", 1000, 24) == (tmp_path / "big.bin").read_bytes()[1000:1024]
    assert store.child("a").read_text("one.json") == '{"x": 1}'
    store.delete(["a/two.bin", "a/one.json"], first=["a/one.json"])
    assert list(store.list("a/")) == [] and store.read_text("ab/sibling.json") == "{}"
    with pytest.raises(ObjectMissing, match="a/one.json"):
        store.read_bytes("a/one.json")


def test_a_body_cut_again_and_again_is_resumed_from_the_byte_reached(s3, s3_proxy):
    body = os.urandom(4 << 20)
    s3.client.put_object(Bucket=s3.bucket, Key="obj.bin", Body=body)
    s3_proxy.faults, s3_proxy.fault_rate, s3_proxy.seed = ("truncate", "slowdown"), 0.5, 3
    store = open_store(s3.url(), max_attempts=12)
    stream = store.open_range("obj.bin", 100, len(body) - 200)
    got = b"".join(iter(lambda: stream.read(1 << 20), b""))
    assert hashlib.sha256(got).digest() == hashlib.sha256(body[100:-100]).digest()
    assert s3_proxy.faults_injected["truncate"] > 0 and store.stats.retries >= s3_proxy.faults_injected["truncate"]
    assert store.stats.requests == s3_proxy.requests  # every attempt counted, as the proxy saw them
    assert store.read_bytes("obj.bin") == body  # a whole object in one GET, retried whole when cut


def test_an_object_replaced_while_it_is_read_is_reported_as_changed(s3):
    s3.client.put_object(Bucket=s3.bucket, Key="obj.bin", Body=b"a" * 100_000)
    store = open_store(s3.url())
    stream = store.open_range("obj.bin", 0, 100_000)
    assert stream.read(10) == b"a" * 10
    stream.close()  # as if the connection broke: the next read resumes with If-Match
    s3.client.put_object(Bucket=s3.bucket, Key="obj.bin", Body=b"b" * 100_000)
    with pytest.raises(ObjectChanged, match="obj.bin"):
        stream.read(10)


def test_an_object_that_keeps_failing_is_named_with_its_attempts(s3, s3_proxy):
    s3.client.put_object(Bucket=s3.bucket, Key="data/obj.bin", Body=b"x" * 1000)
    s3_proxy.faults, s3_proxy.fault_rate = ("slowdown",), 1.0
    store = open_store(s3.url("data"), max_attempts=3)
    with pytest.raises(StorageError, match=r"s3://test-bucket/data/obj.bin failed after 3 attempts: SlowDown") as err:
        store.read_bytes("obj.bin", 0, 1000)
    assert err.value.kind == "transient"
    assert s3_proxy.requests == 3


def test_a_batch_delete_sends_the_first_keys_in_a_request_of_their_own(s3, s3_proxy):
    store = open_store(s3.url("run"))
    names = [f"step/n{i:04d}.tar" for i in range(1200)] + ["step/manifest.json"]
    for name in names[:3] + names[-1:]:
        s3.client.put_object(Bucket=s3.bucket, Key=f"run/{name}", Body=b"x")
    sent = []
    store.client.meta.events.register("provide-client-params.s3.DeleteObjects",
                                      lambda params, **_: sent.append([o["Key"] for o in params["Delete"]["Objects"]]))
    s3_proxy.reset_counts()
    store.delete(names, first=["step/manifest.json"])
    assert sent[0] == ["run/step/manifest.json"] and [len(batch) for batch in sent] == [1, 1000, 200]
    assert s3_proxy.methods == {"POST": 3}  # DeleteObjects, not one DELETE per key
    assert list(store.list()) == []


def test_a_missing_bucket_is_named_in_one_line(s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist") as err:
        open_store("s3://no-such-bucket/x").probe()
    assert "\n" not in str(err.value)


def test_a_probe_that_reads_an_object_names_the_same_problems_and_returns_its_text(s3, monkeypatch):
    # The data loader's probe is its index.json GET: one request, the same one-line errors.
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/x").probe(read="index.json")
    s3.client.put_object(Bucket=s3.bucket, Key="d/index.json", Body=b'{"x": 1}')
    assert open_store(s3.url("d")).probe(read="index.json") == '{"x": 1}'
    assert open_store(s3.url("d")).probe(read="nothing.json") is None  # the caller says it is missing
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}"):
        open_store("s3://some-bucket/x").probe(read="index.json")


def test_an_unreachable_endpoint_is_named_after_a_few_quick_attempts(monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}"):
        open_store("s3://some-bucket/x").probe()
    print(f"probe gave up after {time.monotonic() - started:.1f}s")  # seconds, not minutes (not asserted)


def test_missing_credentials_say_the_credential_chain_found_none(s3, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="the credential chain .* found none"):
        open_store(s3.url("x")).probe()


def test_a_multipart_stream_upload_is_counted_request_by_request(s3, s3_proxy, tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(12 << 20))
    store = open_store(s3.url("up"), part_size=5 << 20, concurrency=2)
    with open(tmp_path / "big.bin", "rb") as handle:
        store.write_stream("big.bin", handle)
    assert s3_proxy.methods == {"POST": 2, "PUT": 3}  # create, 3 parts, complete
    assert store.stats.counts == s3_proxy.methods and store.stats.bytes_written == 12 << 20
    assert s3.client.head_object(Bucket=s3.bucket, Key="up/big.bin")["ContentLength"] == 12 << 20
