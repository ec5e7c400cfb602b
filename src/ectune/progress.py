"""Progress of the long steps of `sample`, `eval` and `synth` on stderr.

    with Progress(total=n, desc="sampling", bar=not no_progress) as p:
        p.update(k)                  # k may be fractional (a part of a batch)

With `bar` a tqdm bar (as training shows); without it (`--no-progress`), one plain line each time
another ~10% is done or 30 s have passed, and one at the end, so logs still show where a run is.
`quiet` shows nothing (the other ranks of a torchrun job; library calls that asked for no progress).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: float, desc: str, *, bar: bool = True, unit: str = "img",
                 every_s: float = 30.0, file=None, quiet: bool = False, initial: int = 0):
        self.total, self.desc, self.unit, self.every_s = float(total), desc, unit, every_s
        self.done, self.file, self.quiet = float(initial), file, quiet
        self._bar = None if quiet or not bar else tqdm(total=round(total), initial=initial, desc=desc, unit=unit,
                                                       dynamic_ncols=True, file=file)
        self._shown = initial                # whole units shown by the bar (updates may be fractional)
        self._t0 = self._last = time.monotonic()
        self._next_pct = (int(100 * initial / total) // 10 + 1) * 10 if total else 10

    def update(self, n: float) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            whole = int(self.done + 1e-6)
            self._bar.update(whole - self._shown)
            self._shown = whole
            return
        if self.quiet:
            return
        pct = 100 * self.done / self.total if self.total else 100
        now = time.monotonic()
        if pct >= self._next_pct or now - self._last >= self.every_s:
            self._line(pct, now)
            self._next_pct = (int(pct) // 10 + 1) * 10

    def _line(self, pct: float, now: float) -> None:
        self._last = now
        print(f"{self.desc}: {self.done:.0f}/{self.total:.0f} {self.unit} ({pct:.0f}%, {now - self._t0:.0f} s)",
              file=self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
