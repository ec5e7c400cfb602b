"""The training methods, one file each; adding a method is its file and one line in METHODS.

Each entry (a `Method`) knows how to draw an iteration's noise levels and compute its loss, where its
network starts, and which of its schedule lengths a run fixes when it is created.
"""

from __future__ import annotations

from ..errors import EctuneError
from .base import Draws, Method
from .cd import CD
from .cmt import CMT
from .ect import ECT
from .edm import EDM
from .ict import ICT
from .scm import SCM
from .sct import SCT
from .tcm import TCM

METHODS: dict[str, Method] = {m.name: m for m in (EDM, ECT, SCT, ICT, CD, TCM, CMT, SCM)}
TUNE_METHODS = tuple(name for name, m in METHODS.items() if m.kind == "tune")


def method(name: str) -> Method:
    """The METHODS entry `name`; EctuneError naming the choices for any other."""
    if name not in METHODS:
        raise EctuneError(f"unknown loss.method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "TUNE_METHODS", "Draws", "Method", "method"]
