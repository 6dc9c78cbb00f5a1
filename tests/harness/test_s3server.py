"""The test harness's own S3 (tests/s3server.py), not the runtime: moto behind a fault-injecting
proxy, reached with boto3 and s5cmd. Other tests trust these faults to be what they say."""
from __future__ import annotations

import http.client
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from botocore.exceptions import ClientError

from tests.procs import clean_env, run
from tests.s3server import make_client, s5cmd_argv


DATA = bytes(range(256)) * 4  # 1 KiB, every byte value


def presigned_path(s3, key: str, operation: str = "get_object") -> str:
    """Path and query of a presigned request: moto answers an unsigned one 403 AccessDenied."""
    url = s3.client.generate_presigned_url(operation, Params={"Bucket": s3.bucket, "Key": key})
    return url.removeprefix(s3.endpoint)


def raw_get(endpoint: str, path: str, headers: dict[str, str] | None = None):
    """One GET with http.client on a fresh connection: status, headers, body."""
    conn = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()  # headers: case-insensitive
    finally:
        conn.close()


def test_s3_fixture_points_clients_at_an_empty_moto_bucket(s3, moto_server):
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3.endpoint == moto_server.endpoint
    assert s3.endpoint.startswith("http://127.0.0.1:")
    assert s3.env() == {"AWS_ENDPOINT_URL_S3": s3.endpoint, "AWS_ENDPOINT_URL": s3.endpoint}
    assert s3.client.list_objects_v2(Bucket=s3.bucket)["KeyCount"] == 0
    s3.client.put_object(Bucket=s3.bucket, Key="left-over", Body=b"x")
    moto_server.reset()  # what the next test's s3 fixture does
    assert s3.client.list_buckets()["Buckets"] == []


def test_put_and_get_through_the_proxy_round_trip_and_are_counted(s3, s3_proxy):
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_proxy.endpoint
    client = make_client(s3_proxy.endpoint)
    client.put_object(Bucket=s3.bucket, Key="a/b.bin", Body=DATA)
    assert client.get_object(Bucket=s3.bucket, Key="a/b.bin")["Body"].read() == DATA
    assert client.head_object(Bucket=s3.bucket, Key="a/b.bin")["ContentLength"] == len(DATA)
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/b.bin"]
    client.delete_object(Bucket=s3.bucket, Key="a/b.bin")
    assert s3_proxy.requests == 5
    assert s3_proxy.methods == {"PUT": 1, "GET": 2, "HEAD": 1, "DELETE": 1}
    assert s3_proxy.bytes_out >= len(DATA)
    assert sum(s3_proxy.faults_injected.values()) == 0
    s3_proxy.reset_counts()
    assert (s3_proxy.requests, s3_proxy.methods, s3_proxy.bytes_out) == (0, {}, 0)


def test_slowdown_fault_reaches_a_client_without_retries_as_a_slowdown_error(s3, s3_proxy):
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    s3_proxy.fault_rate, s3_proxy.faults = 1.0, ("slowdown",)
    client = make_client(s3_proxy.endpoint, attempts=1)
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket=s3.bucket, Key="k")
    assert err.value.response["Error"]["Code"] == "SlowDown"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert s3_proxy.faults_injected["slowdown"] == 1


def test_only_methods_limits_faults_to_those_methods(s3, s3_proxy):
    s3_proxy.fault_rate, s3_proxy.faults, s3_proxy.only_methods = 1.0, ("internal",), {"GET"}
    client = make_client(s3_proxy.endpoint, attempts=1)
    client.put_object(Bucket=s3.bucket, Key="k", Body=DATA)  # PUT passes untouched
    with pytest.raises(ClientError, match="InternalError"):
        client.get_object(Bucket=s3.bucket, Key="k")
    assert s3_proxy.faults_injected["internal"] == 1


def test_truncated_get_ends_before_its_content_length(s3, s3_proxy):
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    s3_proxy.fault_rate, s3_proxy.faults, s3_proxy.seed = 1.0, ("truncate",), 7
    conn = http.client.HTTPConnection(s3_proxy.endpoint.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", presigned_path(s3, "k"))
        resp = conn.getresponse()
        assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(DATA)
        with pytest.raises(http.client.IncompleteRead) as err:
            resp.read()
    finally:
        conn.close()
    assert 0 < len(err.value.partial) < len(DATA)
    assert err.value.partial == DATA[: len(err.value.partial)]
    assert s3_proxy.faults_injected["truncate"] == 1


def test_seeded_faults_repeat_the_same_sequence(s3, s3_proxy):
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    s3_proxy.fault_rate, s3_proxy.faults = 0.5, ("slowdown", "internal")
    path = presigned_path(s3, "k")

    def statuses():
        s3_proxy.seed = 1234
        return [raw_get(s3_proxy.endpoint, path)[0] for _ in range(20)]

    first = statuses()
    assert first == statuses()
    assert {200, 500, 503} == set(first)


def test_one_kept_alive_connection_serves_faults_heads_and_chunked_uploads(s3, s3_proxy):
    conn = http.client.HTTPConnection(s3_proxy.endpoint.removeprefix("http://"), timeout=10)
    try:
        def request(method, path, body=None, **kwargs):
            conn.request(method, path, body, **kwargs)
            with conn.getresponse() as resp:
                return resp.status, resp.read()

        chunks = (DATA[i:i + 100] for i in range(0, len(DATA), 100))
        assert request("PUT", presigned_path(s3, "k", "put_object"), chunks, encode_chunked=True)[0] == 200
        sock = conn.sock
        s3_proxy.fault_rate = 1.0
        status, body = request("GET", presigned_path(s3, "k"))
        assert status == 503 and b"<Code>SlowDown</Code>" in body
        s3_proxy.fault_rate = 0.0
        assert request("HEAD", presigned_path(s3, "k", "head_object")) == (200, b"")
        assert request("GET", presigned_path(s3, "k")) == (200, DATA)
        assert conn.sock is sock  # the same connection throughout: every length was right
    finally:
        conn.close()
    assert s3.client.get_object(Bucket=s3.bucket, Key="k")["Body"].read() == DATA


def test_ranged_get_through_the_proxy_returns_exactly_that_range(s3, s3_proxy):
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    status, headers, body = raw_get(s3_proxy.endpoint, presigned_path(s3, "k"), {"Range": "bytes=10-19"})
    assert (status, body) == (206, DATA[10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
    got = make_client(s3_proxy.endpoint).get_object(Bucket=s3.bucket, Key="k", Range="bytes=10-19")
    assert got["Body"].read() == DATA[10:20]


def test_boto3_standard_retries_complete_every_get_despite_30_percent_faults(s3, s3_proxy):
    keys = [f"obj/{i}" for i in range(5)]
    for key in keys:
        s3.client.put_object(Bucket=s3.bucket, Key=key, Body=key.encode() * 50)
    s3_proxy.fault_rate, s3_proxy.faults = 0.3, ("slowdown", "internal")
    client = make_client(s3_proxy.endpoint, attempts=10)

    def get(i: int) -> bool:
        key = keys[i % len(keys)]
        return client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == key.encode() * 50

    # Concurrent, as retries back off up to 1-2 s each: 50 GETs in a row would take ~10 s.
    with ThreadPoolExecutor(10) as pool:
        assert all(pool.map(get, range(50)))
    assert s3_proxy.faults_injected["slowdown"] + s3_proxy.faults_injected["internal"] > 0
    assert s3_proxy.methods["GET"] == 50 + sum(s3_proxy.faults_injected.values())


def test_s5cmd_copies_a_file_up_and_cats_it_back(s3, tmp_path):
    text = "".join(f"line {i}\n" for i in range(200))
    local = tmp_path / "up.txt"
    local.write_text(text)
    env = clean_env(**s3.env())
    run(s5cmd_argv(s3.endpoint, "cp", str(local), s3.url("dir/up.txt")), timeout=60, env=env)
    assert s3.client.get_object(Bucket=s3.bucket, Key="dir/up.txt")["Body"].read() == text.encode()
    assert run(s5cmd_argv(s3.endpoint, "cat", s3.url("dir/up.txt")), timeout=60, env=env).stdout == text


def test_s5cmd_cp_retries_truncated_downloads_and_writes_the_whole_file(s3, s3_proxy, tmp_path):
    s3.client.put_object(Bucket=s3.bucket, Key="k", Body=DATA)
    # Seed 1 cuts the first two GETs short. (s5cmd 2.3.0's *cat* does not survive this: it
    # retries but prints only what the first attempt delivered, and exits 0.)
    s3_proxy.fault_rate, s3_proxy.faults, s3_proxy.only_methods, s3_proxy.seed = 0.5, ("truncate",), {"GET"}, 1
    run(s5cmd_argv(s3_proxy.endpoint, "cp", s3.url("k"), str(tmp_path / "k")), timeout=60, env=clean_env())
    assert (tmp_path / "k").read_bytes() == DATA
    assert s3_proxy.faults_injected["truncate"] == 2
