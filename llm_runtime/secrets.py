"""Names of variables whose values must never be printed, logged or reported."""
from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["is_secret", "redact"]

_SECRET = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|SESSION)", re.I)


def is_secret(name: str) -> bool:
    """AWS keys, session tokens and anything named like a credential."""
    return bool(_SECRET.search(name))


def redact(values: Mapping[str, str]) -> dict[str, str]:
    """A copy with every secret value replaced by ``***``."""
    return {name: ("***" if is_secret(name) else value) for name, value in values.items()}
