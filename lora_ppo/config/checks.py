"""The ranges a config field's value must lie in, written beside the field as
`Annotated[type, CHECK]` (sections.py, stages.py) and checked while loading (load.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class Check(NamedTuple):
    ok: Callable[[Any], bool]
    allowed: str  # what the message and the reference say is allowed


POSITIVE = Check(lambda v: v > 0, "a number > 0")
NONNEG = Check(lambda v: v >= 0, "a number >= 0")
UNIT = Check(lambda v: 0 <= v <= 1, "a number in [0, 1]")
PROBABILITY = Check(lambda v: 0 <= v < 1, "a number in [0, 1)")
OPEN_UNIT = Check(lambda v: 0 < v <= 1, "a number in (0, 1]")
