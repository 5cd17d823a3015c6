"""Progress of long work (conversions, HF exports, loading weights): count, rate and ETA.

On a terminal a tqdm bar; otherwise (a log file, a platform's job log) a plain line every
`every_s` seconds and one at the end, so logs stay readable. Both go to stderr.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO


def human_bytes(nbytes: float) -> str:
    """`1.52 GB` / `3.4 MB`."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


class Progress:
    """`update(n, nbytes)` after each unit of `total`; `write(line)` prints to stdout without breaking a bar."""

    def __init__(self, desc: str, total: int, unit: str = "tensor", file: Optional[TextIO] = None,
                 every_s: float = 10.0, tty: Optional[bool] = None) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.file = file or sys.stderr
        self.done, self.nbytes = 0, 0
        self.t0 = self.t_line = time.monotonic()
        isatty = getattr(self.file, "isatty", lambda: False)
        self._bar: Any = None
        if isatty() if tty is None else tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}s", file=self.file, dynamic_ncols=True)

    def update(self, n: int = 1, nbytes: int = 0) -> None:
        self.done += n
        self.nbytes += nbytes
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix_str(human_bytes(self.nbytes), refresh=False)
        elif time.monotonic() - self.t_line >= self.every_s and self.done < self.total:
            self._line()

    def _line(self) -> None:
        self.t_line = now = time.monotonic()
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), {human_bytes(self.nbytes)}, "
              f"{rate:.1f} {self.unit}s/s, {human_bytes(self.nbytes / elapsed)}/s, ETA {eta:.0f} s",
              file=self.file, flush=True)

    def write(self, line: str) -> None:
        """A line of the command's own output (stdout), printed around the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        elapsed = time.monotonic() - self.t0
        print(f"{self.desc}: {self.done} {self.unit}s, {human_bytes(self.nbytes)} in {elapsed:.1f} s", file=self.file,
              flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CountedSource:
    """A checkpoint Source (checkpoint/sources.py) whose every `get` counts as one unit of `progress`."""

    def __init__(self, source: Any, progress: Progress) -> None:
        self._source, self._progress = source, progress

    def get(self, name: str):
        tensor = self._source.get(name)
        self._progress.update(1, tensor.numel() * tensor.element_size())
        return tensor

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._source, attr)
