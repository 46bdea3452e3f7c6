# Configuration errors. Every error names the file, the 1-based line when known and
# the JSONPath-like location (`$.guards[2].actions.level_2`) when known, so a user can
# go straight to the offending key. A loader that finds several raises ConfigErrors.
from __future__ import annotations

from collections.abc import Iterable


class ConfigError(Exception):
    """One problem in a configuration file.

    Attributes: `message` (what is wrong), `file` (name as given to the loader),
    `line` (1-based, or None when unknown), `path` (e.g. `$.guards[0].min_margin`,
    or None when the problem is the file as a whole).
    `str(err)` is ``"{file}:{line}: {message} - at `{path}`"``; the `:{line}` part is
    omitted when the line is unknown, the ` - at ...` part when there is no path.
    """

    def __init__(
        self,
        message: str,
        file: str = "<string>",
        line: int | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message, file, line, path)
        self.message = message
        self.file = file
        self.line = line
        self.path = path

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """All problems this exception stands for (just itself for a single error)."""
        return (self,)

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        at = "" if self.path is None else f" - at `{self.path}`"
        return f"{where}: {self.message}{at}"


class ConfigErrors(ConfigError):
    """Several problems found in one pass; `errors` holds each, in file order.

    Its own file/line/path/message are those of the first error, so code that only
    reports one error still reports a real one. `str()` is one error per line.
    """

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        found = tuple(errors)
        if not found:
            raise ValueError("ConfigErrors needs at least one error")
        first = found[0]
        Exception.__init__(self, found)
        self.message = first.message
        self.file = first.file
        self.line = first.line
        self.path = first.path
        self._errors = found

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._errors

    def __str__(self) -> str:
        return "\n".join(str(error) for error in self._errors)


def raise_if_any(errors: list[ConfigError]) -> None:
    """Raise nothing for an empty list, the error itself for one, ConfigErrors for more."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)
