"""Error classes by cause.

- `RecipeError`: the user's recipe or input data is wrong. Short message naming the file,
  line and key, exit code 2, never a traceback.
- `StageFailed`: a stage's own code failed while running. Traceback to the stage log, exit 1.
- `CacheError`: the store could not be read or written (disk full, permissions).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with a recipe: where it is, what is wrong, what to do."""

    message: str
    file: str | None = None
    line: int | None = None
    key: str | None = None
    hint: str | None = None

    def format(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        head = ": ".join(p for p in (where, self.key) if p)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f" {self.hint}"
        return text


@dataclass
class RecipeError(Exception):
    """A user error: every problem found, reported together."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.format())

    @classmethod
    def single(cls, message: str, **where) -> RecipeError:
        return cls([Problem(message, **where)])

    def format(self) -> str:
        if len(self.problems) == 1:
            return "error: " + self.problems[0].format()
        lines = [f"error: {len(self.problems)} problems in the recipe:"]
        lines += ["  - " + p.format() for p in self.problems]
        return "\n".join(lines)

    def __str__(self) -> str:  # dataclass would otherwise print the field list
        return self.format()


class DataError(RecipeError):
    """Input data that cannot be loaded or is unusable (a kind of user error, exit 2)."""


class StageFailed(Exception):
    """A stage raised while running; the traceback is in `log_path`."""

    def __init__(self, stage: str, cause: str, log_path: str) -> None:
        self.stage, self.cause, self.log_path = stage, cause, log_path
        super().__init__(f"stage '{stage}' failed: {cause}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's kill, `kill PID`): handled like Ctrl-C, committed work kept; exit 143."""


class CacheError(Exception):
    """The store could not be read or written."""


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """ "Did you mean 'x'?" when one of `options` is close to a misspelt `word` (difflib's ratio of
    0.6 or more), else "". The one did-you-mean of every error message."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'?" if close else ""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when the message is empty), cut
    to `limit` characters: the cause an error message quotes."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
