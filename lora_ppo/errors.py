"""Errors that the CLI turns into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a config value, a path, a file.

    The message is one line that names the problem and the fix. The CLI prints it without a
    traceback and exits with code 2; nothing the run wrote before is left half-written.
    """
