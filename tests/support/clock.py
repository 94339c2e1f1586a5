"""A settable clock for code that takes an injected `clock: Callable[[], float]`."""

from __future__ import annotations

import calendar

T0 = calendar.timegm((2025, 1, 31, 22, 0, 0))  # 22:00 UTC on the last day of January: a month ends in 2 h


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
