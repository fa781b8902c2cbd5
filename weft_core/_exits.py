"""The exit statuses of ``weft serve`` (and of the supervisor under ``--workers``).

In one place, so that the CLI and the supervisor, which both exit with them, need
not import each other. Documented in docs/deployment.md. And whether this process
exits once weft's command returns (:data:`EXITS_AFTER`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

__all__ = [
    "EXITS_AFTER",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_TASKS_LEFT",
    "EXIT_USAGE",
    "late_signals_ignored",
    "stdout_gone",
]

EXIT_OK = 0
#: A failure while running: the address is in use, the server died.
EXIT_RUNTIME = 1
#: A mistake the user can fix in the command, the config or the handler (argparse,
#: too, exits 2 for a bad command line).
EXIT_USAGE = 2
#: A graceful stop that had to leave tasks running past --graceful-timeout plus the
#: stop's grace (handlers that ignored shutdown and interruption alike): the process
#: exits anyway, and says so to its service manager. 3 is left for gunicorn's
#: "worker failed to boot".
EXIT_TASKS_LEFT = 4

#: True in ``python -m weft_core`` and the ``weft`` command (set by ``__main__.main``):
#: the process exits once the command returns, so ``weft serve`` bounds that exit and
#: ignores late control signals. False where the command's ``main()`` is called by a
#: process that goes on (a test), whose state it leaves as it found it.
EXITS_AFTER = False


def late_signals_ignored(signals: tuple[int, ...]) -> dict[int, signal.Handlers]:
    """For ``Wakeup(on_exit=...)``: what a process about to exit ignores, not dies of.

    Once its handlers are gone a HUP, USR1 or USR2 would kill it by default: a
    logrotate's USR1 in the last milliseconds turned a clean stop into a death by
    signal (systemd: failed), and cut the last log lines. QUIT, too: there is no stop
    left to cut short. Only in a process that exits (:data:`EXITS_AFTER`).
    """
    late = set(signals) - {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
    if not EXITS_AFTER:
        late &= {signal.SIGQUIT}
    return dict.fromkeys(late, signal.SIG_IGN)


def stdout_gone() -> None:
    """Point standard output at /dev/null: what is left in its buffer goes nowhere.

    For a command whose output cannot be written (its reader went away, a full
    disk): the exit's own flush would fail again, with a traceback of its own.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
