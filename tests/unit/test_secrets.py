import pytest

from llm_runtime.secrets import is_secret


@pytest.mark.parametrize("name,secret", [
    ("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", True), ("AWS_ACCESS_KEY_ID", True),
    ("HF_TOKEN", True), ("DB_PASSWORD", True), ("NCCL_SOCKET_IFNAME", False), ("AWS_REGION", False),
    ("FI_PROVIDER", False),
])
def test_credentials_are_recognised_by_name(name, secret):
    assert is_secret(name) is secret
