"""What a storage failure is (transient, missing, changed, permanent) and what its message says,
for the errors botocore, urllib3 and the socket layer really raise."""
import pytest
from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, IncompleteReadError,
                                 NoCredentialsError, ReadTimeoutError, ResponseStreamingError)

from llm_runtime.storage import ObjectChanged, ObjectMissing, StorageError, describe, kind_of
from llm_runtime.storage.errors import ShortBody, wrap
from llm_runtime.storage.retry import retrying


def client_error(code: str, message: str = "msg") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, "GetObject")


@pytest.mark.parametrize("err,kind", [
    (client_error("SlowDown"), "transient"),
    (client_error("InternalError"), "transient"),
    (client_error("503"), "transient"),
    (client_error("NoSuchKey"), "missing"),
    (client_error("404"), "missing"),
    (client_error("PreconditionFailed"), "changed"),
    (client_error("NoSuchBucket"), "permanent"),
    (client_error("AccessDenied"), "permanent"),
    (ResponseStreamingError(error=ConnectionResetError()), "transient"),  # its response is None
    (IncompleteReadError(actual_bytes=1, expected_bytes=2), "transient"),
    (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), "transient"),
    (ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), "transient"),
    (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "transient"),
    (ConnectionResetError(), "transient"),
    (ShortBody("cut"), "transient"),
    (NoCredentialsError(), "permanent"),
    (ValueError("bad"), "permanent"),
    (ObjectMissing("x"), "missing"),
])
def test_every_failure_has_a_kind(err, kind):
    assert kind_of(err) == kind


def test_a_message_names_the_object_and_the_attempts_and_nothing_secret():
    err = wrap(client_error("SlowDown", "Please reduce your request rate."), "GET", "s3://b/k", attempts=8)
    assert str(err) == "GET s3://b/k failed after 8 attempts: SlowDown (Please reduce your request rate.)"
    assert err.kind == "transient" and isinstance(err, OSError)
    assert isinstance(wrap(client_error("NoSuchKey"), "GET", "s3://b/k"), ObjectMissing)
    assert isinstance(wrap(client_error("PreconditionFailed"), "GET", "s3://b/k"), ObjectChanged)
    assert str(wrap(NoCredentialsError(), "PUT", "s3://b/k")) == "PUT s3://b/k failed: NoCredentialsError"
    assert describe(ResponseStreamingError(error=ConnectionResetError())) == "ResponseStreamingError"


def test_the_retry_policy_retries_bodies_a_bounded_number_of_times_and_nothing_else():
    calls = []

    def cut():
        calls.append(1)
        raise ShortBody("cut")

    with pytest.raises(ShortBody):
        retrying(3)(cut)
    assert len(calls) == 3
    calls.clear()

    def final():  # botocore already retried this one: not again
        calls.append(1)
        raise StorageError("GET s3://b/k failed after 8 attempts: SlowDown")

    with pytest.raises(StorageError):
        retrying(3)(final)
    assert len(calls) == 1
    flaky = iter([ShortBody("cut"), ShortBody("cut"), None])

    def recovers():
        err = next(flaky)
        if err:
            raise err
        return "ok"

    assert retrying(3)(recovers) == "ok"


@pytest.mark.parametrize("header, attempt", [
    (None, 1), ("", 1), ("attempt=1; max=5", 1), ("attempt=3; max=5", 3), (b"attempt=2; max=5", 2),
    ("ttl=20261201T000000Z; attempt=4; max=8", 4), ("attempt=x", 1)])
def test_a_request_counts_as_a_retry_from_its_attempt_header(header, attempt):
    from llm_runtime.storage.s3 import _attempt
    assert _attempt(header) == attempt
