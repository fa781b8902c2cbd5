"""Job control: what a terminal's process groups mean for weft's processes.

A terminal sends its Ctrl-C to its foreground process group, and stops a background
group's process that reads from it (SIGTTIN) or, under ``stty tostop``, writes to it
(SIGTTOU). weft's children (a worker, a ``--reload`` child) run in process groups of
their own, so that the parent alone gets the Ctrl-C and passes one signal on; a
worker, which shares the supervisor's session (its CPU autogroup), also leaves the
terminal. Nothing here imports the rest of weft: the log writer uses it too.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import termios
from typing import Any

__all__ = ["JOB_STOPS", "OWN_PROCESS_GROUP", "leave_terminal"]

#: What the kernel sends a process in a background process group that reads from
#: (TTIN) or, under ``stty tostop``, writes to (TTOU) its controlling terminal. A
#: write is let through only where TTOU is ignored or blocked; with a handler in, it
#: is refused and retried for ever. A worker is started with both blocked and leaves
#: the terminal at its first line (``_signals.hold_while_starting``); the log writer
#: blocks them in its own thread (``_logging``).
JOB_STOPS = frozenset({signal.SIGTTIN, signal.SIGTTOU})
#: ``subprocess.Popen`` keywords that start a child in a process group of its own (a
#: worker, a ``--reload`` child), so that a terminal's Ctrl-C, sent to the foreground
#: group, reaches the parent alone, which passes one signal on. ``process_group`` is
#: Python 3.11's; 3.10 calls ``setpgrp`` in the child.
OWN_PROCESS_GROUP: dict[str, Any] = (
    {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
)


def leave_terminal() -> None:
    """Give up the controlling terminal, staying in its session (a worker's first act).

    A worker runs in the supervisor's session (its CPU group) in a process group of
    its own, so it shares the supervisor's terminal from the background. There the
    kernel's job control would apply to it and to whatever its handler starts: a
    child that sets TTOU back to its default stops on its first write under ``stty
    tostop``, and one asking for a passphrase on ``/dev/tty`` gets SIGTTIN for ever,
    with the operator's echo off. ``TIOCNOTTY`` from a process that does not lead its
    session detaches that process alone: none of that applies any more, as when each
    worker led a session of its own. Nothing to do without a terminal.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: no controlling terminal
        return
    try:
        fcntl.ioctl(tty, termios.TIOCNOTTY)
    except OSError:
        pass
    finally:
        os.close(tty)
