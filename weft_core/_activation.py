"""Inherited listening sockets: systemd socket activation (``LISTEN_FDS``).

systemd, ``systemd-socket-activate`` and compatible launchers bind the listening
sockets themselves and start the service with them open as descriptors 3, 4, ...,
announced in the environment:

``LISTEN_PID``
    the process the sockets are meant for; any other process must ignore them
``LISTEN_FDS``
    how many there are: descriptors 3 to 3 + LISTEN_FDS - 1
``LISTEN_FDNAMES``
    optional, colon-separated names (``FileDescriptorName=`` in the socket unit)

:func:`listen_fds` reads them as ``sd_listen_fds(unset_environment=1)`` does, so a
child process (a worker, or anything a handler starts) never mistakes them for its
own. ``weft serve`` uses the sockets it finds when no ``--bind``/``--fd`` is given.

This module reads the environment and marks the descriptors close-on-exec, nothing
more: adopting a descriptor as a listener is the ``fd:N`` endpoint's job
(``weft_core._listeners``).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ._errors import ConfigError

__all__ = [
    "SD_LISTEN_FDS_START",
    "InheritedSocket",
    "listen_fds",
    "log_inherited",
    "parse_listen_env",
]

log = logging.getLogger("weft")

#: The first inherited descriptor, after stdin, stdout and stderr (sd-daemon.h).
SD_LISTEN_FDS_START = 3

#: The variables of the protocol. All three are removed once read, whoever they were
#: for, as sd_listen_fds(1) does: they describe this process's descriptors only.
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

#: The name systemd gives a descriptor when the unit sets no FileDescriptorName=.
UNNAMED = "unknown"

# LISTEN_FDS ends up in descriptor numbers, which are C ints.
_MAX_FDS = 2**31 - 1 - SD_LISTEN_FDS_START


@dataclass(frozen=True)
class InheritedSocket:
    """A descriptor passed by socket activation, with its ``LISTEN_FDNAMES`` name."""

    fd: int
    name: str = UNNAMED

    @property
    def endpoint(self) -> str:
        """The endpoint string that adopts it: ``fd:N``."""
        return f"fd:{self.fd}"


def parse_listen_env(environ: Mapping[str, str], pid: int) -> list[InheritedSocket]:
    """The sockets ``environ`` announces for process ``pid``; touches no descriptor.

    Returns ``[]`` when there are none, or when they are meant for another process.
    Names are used when ``LISTEN_FDNAMES`` has one per descriptor; otherwise every
    descriptor is ``"unknown"``, systemd's own default (sd_listen_fds_with_names would
    fail instead; a name is a label here, so a missing one is no reason to stop).

    Raises ConfigError for a malformed ``LISTEN_PID`` or ``LISTEN_FDS``.
    """
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return []
    if not _is_number(pid_text):
        raise _bad("LISTEN_PID", pid_text, "a process id")
    if int(pid_text) != pid:
        return []  # for the process that started us, which did not unset them
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        return []
    if not _is_number(count_text) or not 0 < int(count_text) <= _MAX_FDS:
        raise _bad("LISTEN_FDS", count_text, "a positive number of descriptors")
    count = int(count_text)
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count or not all(names):
        names = [UNNAMED] * count
    return [InheritedSocket(SD_LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = True
) -> list[InheritedSocket]:
    """The listening sockets systemd passed to this process (``sd_listen_fds``).

    Each descriptor is made close-on-exec, so that processes started later do not
    inherit it by accident (a worker gets its sockets explicitly). With
    ``unset_environment`` (the default) the three ``LISTEN_*`` variables are removed
    from ``environ`` (default ``os.environ``) whatever they said.

    Resource handling: the descriptors are left open; adopt them with ``fd:N``
    endpoints. Error handling: raises ConfigError naming the variable for a malformed
    one, or the descriptor for one that is not open.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    try:
        sockets = parse_listen_env(env, os.getpid())
        for sock in sockets:
            try:
                flags = fcntl.fcntl(sock.fd, fcntl.F_GETFD)
                if not flags & fcntl.FD_CLOEXEC:
                    fcntl.fcntl(sock.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
            except OSError as exc:
                raise ConfigError(
                    f"LISTEN_FDS={env['LISTEN_FDS']} announces descriptor {sock.fd}, "
                    f"but it is not usable: {exc.strerror}",
                    source="socket activation",
                ) from None
        return sockets
    finally:
        if unset_environment:
            for name in LISTEN_ENV:
                env.pop(name, None)


def log_inherited(sockets: list[InheritedSocket], *, used: bool) -> None:
    """Say which inherited sockets weft serve listens on, or that it ignores them."""
    described = ", ".join(f"fd {s.fd} ({s.name})" for s in sockets)
    if used:
        log.info("using %d socket(s) from socket activation: %s", len(sockets), described)
    else:
        log.warning(
            "ignoring %d socket(s) from socket activation (%s): --bind/--fd was given",
            len(sockets),
            described,
        )


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 10


def _bad(name: str, value: str, expected: str) -> ConfigError:
    return ConfigError(
        f"{name}={value!r} is not {expected} (systemd socket activation)",
        source="environment",
    )
