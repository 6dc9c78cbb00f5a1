"""Secret values never reach a log line, whatever logs them."""
import io
import logging

import pytest

from llm_runtime.secrets import RedactingFilter, is_secret, redact

ENV = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY", "AWS_SESSION_TOKEN": "FQoGZXIvYXdzEFAKETOKEN",
       "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE1234", "LLM_RUNTIME_TRAIN_STEPS": "123456789", "HF_TOKEN": "x"}


@pytest.mark.parametrize("text,expected", [
    ("key wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEY in a message", "key <redacted> in a message"),
    ("token=FQoGZXIvYXdzEFAKETOKEN&x=1", "token=<redacted>&x=1"),
    ("id AKIAFAKEFAKEFAKE1234.", "id <redacted>."),
    ("id ASIAZZZZZZZZZZZZZZZZ from elsewhere", "id <redacted> from elsewhere"),
    ('{"SessionToken": "unrelated-but-named-token"}', '{"SessionToken": "<redacted>"}'),
    ("X-Amz-Security-Token: abcdefgh12345678", "X-Amz-Security-Token: <redacted>"),
    ("step=5 tokens_per_s=123456789 max_tokens=100000", "step=5 tokens_per_s=123456789 max_tokens=100000"),
    ("HF_TOKEN is x", "HF_TOKEN is x"),  # too short to be worth masking everywhere
    ("WANDB_API_KEY=abcdef0123456789", "WANDB_API_KEY=<redacted>"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.abc", "Authorization: <redacted>"),
    ("curl -H 'x: Bearer eyJhbGciOiJIUzI1NiJ9'", "curl -H 'x: Bearer <redacted>'"),
    ("password: hunter2", "password: <redacted>"),
    ("using hf_abcdefghijklmnopqrstuvwxyz0123", "using <redacted>"),
    ("Credential=AKIDEXAMPLE/20250101/us-east-1/s3/aws4_request", "Credential=<redacted>"),
    ("pad_token=128001234 eos_token: <|end_of_text|>", "pad_token=128001234 eos_token: <|end_of_text|>"),
    ("where=secrets.py:61:redact", "where=secrets.py:61:redact"),
])
def test_secret_values_and_credential_shapes_are_redacted(text, expected):
    assert redact(text, ENV) == expected


@pytest.mark.parametrize("name,secret", [("AWS_SECRET_ACCESS_KEY", True), ("AWS_SESSION_TOKEN", True),
                                         ("WANDB_API_KEY", True), ("AWS_ACCESS_KEY_ID", True),
                                         ("AWS_REGION", False), ("NCCL_SOCKET_IFNAME", False)])
def test_variable_names_that_hold_credentials_are_recognised(name, secret):
    assert is_secret(name) is secret


def test_a_logger_with_the_filter_never_prints_a_secret_in_args_or_tracebacks(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_secrets_filter")
    logger.addHandler(handler)
    try:
        logger.warning("creds %s and %r", ENV["AWS_SECRET_ACCESS_KEY"], {"t": ENV["AWS_SESSION_TOKEN"]})
        try:
            raise RuntimeError(f"boto failed with {ENV['AWS_SESSION_TOKEN']}")
        except RuntimeError:
            logger.exception("upload failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "creds <redacted>" in out and "upload failed" in out and "RuntimeError: boto failed with <redacted>" in out
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        assert ENV[name] not in out


def test_an_uncaught_cli_error_prints_its_traceback_redacted(tmp_path):
    import subprocess
    import sys

    script = ("import sys\nfrom llm_runtime import cli\ncli.COMMANDS['boom'] = lambda a: "
              "(_ for _ in ()).throw(RuntimeError('failed with ' + __import__('os').environ['AWS_SESSION_TOKEN']))\n"
              "sys.exit(cli.main(['boom']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, **ENV})
    assert proc.returncode == 1 and "RuntimeError: failed with <redacted>" in proc.stderr
    assert ENV["AWS_SESSION_TOKEN"] not in proc.stderr + proc.stdout
