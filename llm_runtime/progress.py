"""Progress bars for long transfers, shown only on a terminal (tqdm on stderr); a no-op elsewhere,
so job logs (CloudWatch, files) never fill with carriage returns."""
from __future__ import annotations

import sys

__all__ = ["bar"]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def bar(total: int, desc: str, unit: str = "B", enabled: bool | None = None):
    """A progress bar over ``total`` units (bytes by default); ``enabled`` None = only if stderr is a TTY."""
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        return _Silent()
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                file=sys.stderr, dynamic_ncols=True, leave=True)
