"""Progress display of a benchmark run: tqdm's bar when installed, else a
minimal text status line (:class:`TextProgress`)."""

from __future__ import annotations

import sys
import time


class TextProgress:
    """A minimal stand-in for ``tqdm`` when it is not installed.

    On a terminal it rewrites one status line; otherwise it prints a line
    per step. Supports the subset of tqdm's API the harness uses.
    """

    def __init__(self, total: int, stream=None) -> None:
        self.total = total
        self.done = 0
        self.description = ""
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self._on_terminal = getattr(self.stream, "isatty", lambda: False)()

    def set_description(self, description: str) -> None:
        """Show what is being worked on now."""
        self.description = description
        if self._on_terminal:
            self._draw()

    def update(self, steps: int = 1) -> None:
        """Count ``steps`` more steps as done."""
        self.done += steps
        self._draw()

    def close(self) -> None:
        """End the status line."""
        if self._on_terminal:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        elapsed = time.perf_counter() - self.started
        line = f"[{self.done}/{self.total}] {elapsed:5.0f}s {self.description}"
        if self._on_terminal:
            self.stream.write("\r" + line.ljust(78)[:120])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def make_progress(total: int, enabled: bool = True, unit: str = "cell"):
    """A progress bar over ``total`` steps (each a ``unit``): tqdm's if
    installed, else :class:`TextProgress`; ``None`` when disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return TextProgress(total)
    return tqdm(total=total, unit=unit, leave=False, dynamic_ncols=True)
