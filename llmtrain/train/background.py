"""One background job (a thread) whose exception is kept for the caller to raise at a step boundary."""

import threading
from collections.abc import Callable


class BackgroundJob:
    """Runs `fn` in a non-daemon thread: the interpreter never exits with it half done unless killed.

    `fn=None` is a job that is already finished (a rank with nothing to write)."""

    def __init__(self, fn: Callable[[], None] | None, name: str):
        self.error: BaseException | None = None
        self._thread = None
        if fn is not None:
            self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=False)
            self._thread.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # kept, raised on the training thread
            self.error = e

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
