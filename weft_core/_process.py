"""What ``weft serve`` does to its own process for a service manager: pid file, privileges.

- ``--pid FILE``: the process id, written once the server listens (so a tool that
  waits for the file may connect at once) and removed at exit. Under ``--workers``
  it is the supervisor's id.
- ``--user``/``--group``: bind as root (ports below 1024, sockets in /run), then
  switch to an unprivileged account: the group first (the supplementary groups set
  to the user's), then the user, as gunicorn and nginx do. Without ``--group`` the
  user's own group is taken. A single process switches once it listens; under
  ``--workers`` the supervisor stays root and each worker switches before it imports
  the handler.

What does not live here: when these run (``_cli``), checking that the account
exists (the settings table does, before anything binds).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["PidFile", "drop_privileges"]

log = logging.getLogger("weft")


class PidFile:
    """A pid file: :meth:`write` once listening, :meth:`remove` at exit."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._written = False

    def write(self) -> None:
        """Write this process's id (atomically: a reader never sees half a number)."""
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        partial.write_text(f"{os.getpid()}\n", encoding="ascii")
        os.replace(partial, self.path)
        self._written = True

    def remove(self) -> None:
        """Remove the file if this process wrote it and it still names this process."""
        if not self._written:
            return
        try:
            if self.path.read_text(encoding="ascii").strip() == str(os.getpid()):
                self.path.unlink()
        except OSError as exc:  # e.g. privileges dropped, and the directory is root's
            log.warning("could not remove the pid file %s: %s", self.path, exc.strerror or exc)


def drop_privileges(user: str | None, group: str | None) -> None:
    """Switch this process to ``user`` and ``group`` (names or numbers); OSError if denied."""
    import grp
    import pwd

    entry = None
    if user is not None:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    if group is not None:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    elif entry is not None:
        gid = entry.pw_gid
    else:
        gid = None
    if gid is not None and os.getgid() != gid:
        if entry is not None:
            os.initgroups(entry.pw_name, gid)
        else:
            os.setgroups([gid])
        os.setgid(gid)
    if entry is not None and os.getuid() != entry.pw_uid:
        os.setuid(entry.pw_uid)
    log.info(
        "running as user %s, group %s",
        entry.pw_name if entry else os.getuid(),
        gid if gid is not None else os.getgid(),
    )
