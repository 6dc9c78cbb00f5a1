"""Secrets never reach a log, report, error or failure record: names to hide, values to redact."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

__all__ = ["RedactingFilter", "RedactingStream", "install_excepthook", "is_secret", "redact", "secret_values"]

_SECRET = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|SESSION|API_KEY)", re.I)
# Values that look like AWS credentials wherever they come from (a URI, an exception, a config file).
_PATTERNS = (
    re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[0-9A-Z]{16}\b"),  # access key ids
    # key=value / "key": "value" / "key: value" where the key names a credential (aws_secret_access_key,
    # session_token, x-amz-security-token, api_key, password, signature); not tokens_per_s, pad_token
    re.compile(r"(?i)((?<![\w.-])(?:[\w-]*(?:secret|password|passwd|credential|api[_-]?key|access[_-]?key|"
               r"private[_-]?key|signature)[\w-]*|(?:[\w-]*(?:session|security|access|auth|refresh|api|bearer)[_-]?)?"
               r"token|authorization)[\"']?\s*[=:]\s*[\"']?)(?:bearer\s+|basic\s+)?([^\s\"'&,;]{4,})"),
    re.compile(r"(?i)\b(bearer\s+)([A-Za-z0-9._~+/-]{8,}=*)"),  # Authorization: Bearer <token>
    re.compile(r"\b()(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9-]{10,})\b"),
)
MASK = "<redacted>"
_MIN_LEN = 6  # shorter values ("1", "true") are not worth hiding and would mangle every line


def is_secret(name: str) -> bool:
    """AWS keys, session tokens and anything named like a credential."""
    return bool(_SECRET.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of secret-named variables, longest first."""
    env = os.environ if env is None else env
    return sorted({value for name, value in env.items() if is_secret(name) and len(value) >= _MIN_LEN},
                  key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every secret variable's value and every credential-looking token masked."""
    for value in secret_values(env):
        text = text.replace(value, MASK)
    text = _PATTERNS[0].sub(MASK, text)
    for pattern in _PATTERNS[1:]:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """Formats the record's message and redacts it (on a handler: every record it writes)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


class RedactingStream:
    """A text stream that redacts what is written to it (the CLI's stdout and stderr: prints, warnings,
    tracebacks). Writes that go straight to the file descriptor (C++ logs) bypass it."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def install_excepthook() -> None:
    """Uncaught exceptions (the main thread's and other threads') print their traceback redacted."""
    import sys
    import threading
    import traceback

    def main_hook(kind, value, tb):
        sys.__stderr__.write(redact("".join(traceback.format_exception(kind, value, tb))))

    def thread_hook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        sys.__stderr__.write(f"Exception in thread {name}:\n" + redact(
            "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))))

    sys.excepthook = main_hook
    threading.excepthook = thread_hook
