"""Progress bar of the benchmark scripts: tqdm on stderr, or one rewritten line without it."""

from __future__ import annotations

import sys
import threading
from typing import Any


class Progress:
    """tqdm on stderr when available, else one rewritten stderr line."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.lock = threading.Lock()
        self.total, self.done, self.name, self.enabled = total, 0, "", enabled
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass

    def phase(self, name: str) -> None:
        self.name = name
        if self.bar is not None:
            self.bar.set_description(name)
        else:
            self._line()

    def tick(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            else:
                self._line()

    def extend(self, n: int) -> None:
        """A phase is measured again: n more units to go."""
        with self.lock:
            self.total += n
            if self.bar is not None:
                self.bar.total += n
                self.bar.refresh()

    def _line(self) -> None:
        if self.enabled:
            print(f"\r{self.name}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
