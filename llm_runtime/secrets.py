"""Names of variables whose values must never be printed, logged or reported."""
from __future__ import annotations

import re

__all__ = ["is_secret"]

_SECRET = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|SESSION)", re.I)


def is_secret(name: str) -> bool:
    """AWS keys, session tokens and anything named like a credential."""
    return bool(_SECRET.search(name))

