"""Errors that the CLI turns into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a config value, a path, a file.

    The message is one line that names the problem and the fix. The CLI prints it without a
    traceback and exits with code 2; nothing the run wrote before is left half-written.
    """


def first_line(e: BaseException) -> str:
    """The first non-blank line of a library's error message, or its type when it has none
    (an error with an empty message must still give a readable line)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__
