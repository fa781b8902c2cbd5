"""What ``weft serve`` does to its own process for a service manager: pid file, privileges.

- ``--pid FILE``: the process id, written once the server listens (so a tool that
  waits for the file may connect at once) and removed at exit. Under ``--workers``
  it is the supervisor's id.
- ``--user``/``--group``: bind as root (ports below 1024, sockets in /run), then
  switch to an unprivileged account: the group first (the supplementary groups set
  to the user's), then the user, as gunicorn and nginx do. Without ``--group`` the
  user's own group is taken. The handler's module is imported and the TLS key read
  as root; then the sockets are bound (:func:`bind_first`: the server gets them as
  ``fd:N``), the process switches, and only then does it accept a connection. Under
  ``--workers`` the supervisor binds and stays root (as gunicorn's master does) and
  each worker switches before it serves.

What does not live here: when these run (``_cli``), checking that the account
exists (the settings table does, before anything binds).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ._config import Config
from ._endpoints import listen_endpoints
from ._errors import ConfigError
from ._files import replace_file
from ._listeners import Listener, open_listeners
from ._logsafe import escape_for_log
from ._settings import SETTINGS

__all__ = ["PidFile", "bind_first", "drop_privileges"]

log = logging.getLogger("weft")


class PidFile:
    """A pid file: :meth:`write` once listening, :meth:`remove` at exit."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._written = False

    def check(self) -> None:
        """Raise ConfigError, naming the file, if its directory cannot take it.

        Before binding: a wrong ``--pid`` is a usage error said up front, not a
        failure after the server has said it listens.
        """
        directory = self.path.parent
        if not directory.is_dir():
            raise ConfigError(
                f"cannot write the pid file {escape_for_log(self.path)}: its directory"
                f" {escape_for_log(directory)} does not exist; create it or give another path",
                key="pid",
            )
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(
                f"cannot write the pid file {escape_for_log(self.path)}: this user may not"
                f" write to {escape_for_log(directory)}; give a path it may write to",
                key="pid",
            )
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(
                f"cannot write the pid file {escape_for_log(self.path)}: it is a directory or"
                " another kind of file, not a regular one; give a file's path",
                key="pid",
            )
        other = self._running_owner()
        if other is not None:
            raise ConfigError(
                f"the pid file {escape_for_log(self.path)} names process {other}, which is"
                " running: another server uses it; stop that one first, or give another path",
                key="pid",
            )

    def _running_owner(self) -> int | None:
        """The live process, other than this one, that the file names; None if none.

        As gunicorn refuses to start then: taking the file over, and removing it at
        exit, would leave the first server running with no pid file. A file naming a
        process that has gone (a crash, a reboot) is stale and is replaced.
        """
        try:
            pid = int(self.path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or pid == os.getpid():  # re-executed by USR2: the same process
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            return pid
        return pid

    def write(self) -> None:
        """Write this process's id atomically (a reader never sees half a number).

        Mode 0644 whatever the umask, and through no link another user planted.
        """
        try:
            replace_file(self.path, f"{os.getpid()}\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot write the pid file {escape_for_log(self.path)}:"
                f" {exc.strerror or exc}; give a path in a directory this user may write to",
                key="pid",
            ) from None
        self._written = True

    def keep(self) -> None:
        """After a USR2 re-exec: the PID is the same, so the file is left as it is.

        Rewritten only if it no longer names this process, and a failure to is a
        warning: the upgraded supervisor exited 2 on a full disk rewriting its own,
        unchanged PID, and its workers with it, the service gone.
        """
        try:
            if self.path.read_text(encoding="ascii").strip() == str(os.getpid()):
                self._written = True
                return
        except OSError:
            pass
        try:
            self.write()
        except ConfigError as exc:
            log.warning("%s; serving on", exc)

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


def bind_first(config: Config) -> tuple[list[Listener], dict[str, Any]]:
    """Bind where ``config`` says, before switching user; the sockets and Server keywords.

    The keywords listen on the sockets bound here (``bind = ["fd:N", ...]``) in place
    of the configured places. Raises BindError naming the address.
    """
    values = config.values
    listeners = open_listeners(
        listen_endpoints(
            values.get("bind"),
            values.get("address", SETTINGS["address"].default),
            values.get("port", SETTINGS["port"].default),
        ),
        family=values.get("family", SETTINGS["family"].default),
        backlog=values.get("backlog", SETTINGS["backlog"].default),
        reuse_port=values.get("reuse_port", False),
        unix_mode=values.get("unix_mode"),
    )
    made_here = ("address", "port", "unix_mode")  # unix_mode: applied by open_listeners
    kwargs = {k: v for k, v in config.server_kwargs().items() if k not in made_here}
    kwargs["bind"] = [f"fd:{listener.sock.fileno()}" for listener in listeners]
    return listeners, kwargs
