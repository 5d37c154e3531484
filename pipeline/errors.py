"""User-facing errors.

A :class:`PipelineError` is a mistake the user can fix (bad config value, missing file,
malformed data line, offline hub lookup...). The entry points catch it and print one
clear message, exit non-zero, and show no traceback. Everything else is a bug and keeps
its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """An error caused by the user's inputs or configuration.

    ``where`` names the config key, file or ``file:line``; ``fix`` says what to do.
    """

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: {self.message}")
        else:
            parts.append(self.message)
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        return "\n".join(parts)


class ConfigError(PipelineError):
    """A configuration value is invalid (names the key)."""


class DataError(PipelineError):
    """A dataset is missing, malformed or has the wrong columns (names the file/line/column)."""


class TrainingError(PipelineError):
    """Training diverged (NaN/inf loss) or could not proceed."""


class StopRun(Exception):
    """Raised by a run's hook to end the run early on purpose (a population-based training segment
    ends): the runner logs it as information, not as a failure; nothing unfinished is published."""


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGTERM, SIGINT / Ctrl-C).

    A ``BaseException`` (like ``KeyboardInterrupt``), so code that records failures with
    ``except Exception`` (a tuner trial, a retry loop) does not mistake it for a failed run
    and carry on: it unwinds to the entry point, which reports it and exits 143 / 130."""

    #: shell convention: 128 + signal number
    EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        self.message = f"interrupted by {signal_name}; nothing of the unfinished stage was published"
        self.where = None
        self.fix = "rerun the same command: finished stages are reused from the cache"
        super().__init__(self.render())

    render = PipelineError.render

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signal_name, 2)
