"""The one retry policy for what botocore does not retry itself: bodies that break off mid-read.

botocore's standard mode retries a failed *request* (503 SlowDown, 500, resets, connect errors)
with its own backoff. A response body that ends early or times out while it streams is the
caller's to retry; this module does it with tenacity: exponential backoff with full jitter,
a bounded number of attempts in a row without progress, then the last error is raised.
"""
from __future__ import annotations

from collections.abc import Callable

from .errors import StorageError, kind_of

__all__ = ["BACKOFF_BASE_S", "BACKOFF_MAX_S", "retrying"]

BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 10.0


def retrying(attempts: int, *, give_up: Callable[[], bool] = lambda: False,
             on_retry: Callable[[BaseException], None] = lambda err: None):
    """A tenacity ``Retrying``: ``for attempt in retrying(n): with attempt: ...`` or ``retrying(n)(fn)``.

    Transient errors (not a StorageError, which botocore's retries already produced) are retried
    up to ``attempts`` tries in all, unless ``give_up()`` says the reader was stopped; anything
    else is raised at once.
    """
    import tenacity

    def retry_if(state: tenacity.RetryCallState) -> bool:
        err = state.outcome.exception() if state.outcome is not None else None
        # A StorageError is final: botocore already retried that request.
        return (err is not None and not isinstance(err, StorageError) and kind_of(err) == "transient"
                and not give_up())

    def before_sleep(state: tenacity.RetryCallState) -> None:
        on_retry(state.outcome.exception())

    return tenacity.Retrying(stop=tenacity.stop_after_attempt(max(1, attempts)),
                             wait=tenacity.wait_random_exponential(multiplier=BACKOFF_BASE_S, max=BACKOFF_MAX_S),
                             retry=retry_if, before_sleep=before_sleep, reraise=True)
