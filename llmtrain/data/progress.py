"""A one-line progress display for prepare (stderr): percent of input bytes, documents, tokens/s.

Redrawn in place on a terminal; one line every 10 s otherwise (logs stay readable).
"""

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, enabled: bool = True, done_bytes: int = 0, stream=sys.stderr):
        self.total, self.done, self.enabled, self.stream = max(total_bytes, 1), done_bytes, enabled, stream
        self.tty = enabled and stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.start_tokens = None

    def update(self, nbytes: int, documents: int, tokens: int) -> None:
        self.done += nbytes
        if self.start_tokens is None:
            self.start_tokens = tokens
        now = time.perf_counter()
        if not self.enabled or now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = (tokens - self.start_tokens) / max(now - self.t0, 1e-9)
        pct = min(100.0, 100.0 * self.done / self.total)
        line = f"prepare {pct:5.1f}%  {documents:,} docs  {tokens:,} tokens  {rate / 1e6:.2f}M tokens/s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
