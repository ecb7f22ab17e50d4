"""The one exception type a user should ever see from gradindex."""


class GradIndexError(Exception):
    """A problem with the user's input or artifacts, explained in one line.

    The CLI prints these without a traceback and exits non-zero; anything else is a bug.
    """


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (libraries' messages run long)."""
    return f"{type(e).__name__}: {e}".splitlines()[0]
