"""The exit statuses of ``weft serve`` (and of the supervisor under ``--workers``).

In one place, so that the CLI and the supervisor, which both exit with them, need
not import each other. Documented in docs/deployment.md.
"""

from __future__ import annotations

__all__ = ["EXIT_OK", "EXIT_RUNTIME", "EXIT_TASKS_LEFT", "EXIT_USAGE"]

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
