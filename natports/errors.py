"""The two kinds of failure, which map to the CLI's exit codes."""

from __future__ import annotations


class NatportsError(Exception):
    """A runtime failure (exit 1): the input was fine, the machine was not."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InputError(Exception):
    """Bad input (exit 2). Carries every problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
