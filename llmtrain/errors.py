"""User-facing errors: printed as one line, exit code 2, never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad override, missing file, impossible layout).

    The message must name the problem and the fix in one line.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key has a bad value. Formats as `key=value: problem (allowed: ...)`."""

    def __init__(self, key: str, value, problem: str, allowed=None):
        self.key, self.value, self.problem, self.allowed = key, value, problem, allowed
        msg = f"{key}={value!r}: {problem}"
        if allowed is not None:
            allowed_txt = ", ".join(map(str, allowed)) if isinstance(allowed, list | tuple) else str(allowed)
            msg += f" (allowed: {allowed_txt})"
        super().__init__(msg)


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss diverged); the message says what was kept and what to try."""

    exit_code = 3
