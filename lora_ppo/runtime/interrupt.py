"""Ctrl-C and SIGTERM stop a run at the end of the current update, with a checkpoint.

At the first SIGINT or SIGTERM the loop (ppo/loop.py::train, stages/common.py::fit) finishes
the update or step it is in, saves a checkpoint and raises errors.Interrupted; the CLI prints
the exact `--resume latest` command in one line and exits 128 + the signal's number: 130 for
SIGINT, 143 for SIGTERM (the shell's convention for a process ended by that signal). A second
Ctrl-C stops at once (KeyboardInterrupt, exit 130, no checkpoint).

Launchers forward a terminal's Ctrl-C to ranks that the terminal has signalled already: torchrun
(and `accelerate launch --multi_gpu`, torchrun inside) sends SIGINT again, the deepspeed launcher
SIGTERM (deepspeed/launcher/launch.py::sigkill_handler, which also kills the ranks 30 s later),
within milliseconds. So a SIGTERM after the first signal, and a SIGINT less than REPEAT_S after
it, are the same request; only a later SIGINT, a person pressing Ctrl-C again, stops at once.

Every rank must stop after the same update, since a checkpoint is written by all of them:
`requested()` is one all-reduce of two numbers per update, so a signal that reached only some
ranks (or reached them on either side of an update's end) stops every rank at the same place.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

from lora_ppo.runtime.dist import all_sum

REPEAT_S = 0.5  # a launcher's forwarded copy of a Ctrl-C comes within milliseconds
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """While the block runs, the first SIGINT/SIGTERM asks the loop to stop after the current
    update (`requested()`); the previous handlers are restored after. Only the main thread can
    set handlers: elsewhere signals keep their default behaviour (the collective still runs)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._at = 0.0
        self._previous: dict[int, object] = {}
        self.say = os.environ.get("RANK", "0") == "0"  # one line, from rank 0

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._at = signum, now
            if self.say:
                # os.write, not print: the handler may run while the main thread is inside a
                # write to stderr (the progress bar), and a buffered writer refuses re-entry.
                os.write(2, f"lora-ppo: {signal.Signals(signum).name}: stopping after this "
                            "update, with a checkpoint (Ctrl-C again to stop at once)\n".encode())
        elif signum == signal.SIGINT and now - self._at > REPEAT_S:
            raise KeyboardInterrupt

    def requested(self) -> Optional[int]:
        """The signal that stops the run after this update on every rank (SIGINT if any rank got
        one, else SIGTERM if any did), or None; collective: call on every rank."""
        n_int, n_term = all_sum([float(self.signum == signal.SIGINT),
                                 float(self.signum == signal.SIGTERM)])
        return signal.SIGINT if n_int else signal.SIGTERM if n_term else None
