"""The one error type for bad data: it names the file, the line (1-based) and the field."""


class RecordError(ValueError):
    """A problem with one record, before we know where the record came from."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.field = field


class DataError(ValueError):
    """A bad record or source, with its location; the CLI prints it as one line."""

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        reason: str = "error",
    ):
        self.file = file
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(format_location(file, line, field) + message)


def format_location(file: str | None, line: int | None, field: str | None) -> str:
    """`file:line: field 'x': ` prefix for an error message (empty parts left out)."""
    where = ""
    if file is not None:
        where = f"{file}:{line}: " if line is not None else f"{file}: "
    if field is not None:
        where += f"field '{field}': "
    return where
