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


class Interrupted(KeyboardInterrupt):
    """A run stopped at SIGINT or SIGTERM after saving a checkpoint (runtime/interrupt.py):
    `code` is the exit status, 128 + the signal's number (130, 143), `step` the update (or step)
    it stopped after, `checkpoint` the directory to resume from. A KeyboardInterrupt, so an
    in-process caller that stops on Ctrl-C stops here too."""

    def __init__(self, signum: int, step: int, checkpoint, unit: str = "update"):
        import signal

        self.signame, self.code = signal.Signals(signum).name, 128 + int(signum)
        self.step, self.checkpoint, self.unit = step, checkpoint, unit
        super().__init__(f"stopped by {self.signame} after {unit} {step}, checkpoint "
                         f"{checkpoint}; continue the run with resume='latest' "
                         "(`--resume latest`)")
