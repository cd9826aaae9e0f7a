"""prepare's progress display: a plain line every 10 s in a log, a bar redrawn in place on a terminal."""

import io
import re

from llmtrain.data import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_plain_line_every_10_seconds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = io.StringIO()
    p = progress.Progress(1000, stream=out)
    for t in (1, 5, 11, 15, 22):
        clock.now = t
        p.update(100, documents=t, tokens=1000 * t)
    p.close()
    assert out.getvalue().splitlines() == [
        "prepare  30.0%  11 docs  11,000 tokens  0.00M tokens/s",
        "prepare  50.0%  22 docs  22,000 tokens  0.00M tokens/s",
    ]


def test_a_terminal_gets_a_bar_with_percent_and_counts(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    out = Terminal()
    p = progress.Progress(1000, stream=out, done_bytes=200)
    clock.now = 1.0
    p.update(300, documents=7, tokens=2_000_000)
    clock.now = 2.0
    p.update(0, documents=9, tokens=4_000_000)
    p.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # cursor and colour codes
    assert "\r" in text  # redrawn in place
    last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("prepare") and "50%" in last
    assert "9 docs  4,000,000 tokens  1.00M tokens/s" in last


def test_disabled_writes_nothing():
    out = Terminal()
    p = progress.Progress(10, enabled=False, stream=out)
    p.update(5, 1, 1)
    p.close()
    assert out.getvalue() == ""
