"""A one-line progress display for prepare (stderr): percent of input bytes, documents, tokens/s.

On a terminal rich draws it as a bar, redrawn in place; otherwise one plain line every 10 s (logs stay
readable).
"""

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar


class Progress:
    def __init__(self, total_bytes: int, enabled: bool = True, done_bytes: int = 0, stream=sys.stderr):
        self.total, self.done, self.enabled, self.stream = max(total_bytes, 1), done_bytes, enabled, stream
        self.t0 = self.last = time.perf_counter()
        self.start_tokens = None
        self.bar = None
        console = Console(file=stream) if enabled else None
        if console is not None and console.is_terminal:
            # Redrawn from update() only: no refresh thread while prepare forks its workers.
            self.bar = Bar(
                TextColumn("prepare"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[counts]}"),
                TimeRemainingColumn(),
                console=console,
                auto_refresh=False,
            )
            self.task = self.bar.add_task("prepare", total=self.total, completed=done_bytes, counts="")
            self.bar.start()

    def update(self, nbytes: int, documents: int, tokens: int) -> None:
        self.done += nbytes
        if self.start_tokens is None:
            self.start_tokens = tokens
        now = time.perf_counter()
        if not self.enabled or now - self.last < (0.5 if self.bar else 10.0):
            return
        self.last = now
        rate = (tokens - self.start_tokens) / max(now - self.t0, 1e-9)
        counts = f"{documents:,} docs  {tokens:,} tokens  {rate / 1e6:.2f}M tokens/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=min(self.done, self.total), counts=counts)
            self.bar.refresh()
            return
        pct = min(100.0, 100.0 * self.done / self.total)
        self.stream.write(f"prepare {pct:5.1f}%  {counts}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
