"""What ``weft serve --manager gevent`` does to a process: patching and the blocked-hub report.

Patching
--------
gunicorn's gevent worker calls ``gevent.monkey.patch_all()`` before it loads the
application, and so does ``weft serve`` (through :func:`prepare_process`, the
``ManagerSpec.prepare_process`` of the ``gevent`` manager), in each process that
serves, before the handler's module is imported. Without it a handler that calls
``time.sleep``, ``requests`` or a stdlib database driver blocks every connection of
the hub. ``-o patch=false`` turns it off, for an application that patches itself
(or must not be patched). ``Server(...)`` in a program of your own never patches:
that is the program's call, made first thing.

Blocked-hub report
------------------
A hub that does not switch for ``max_blocking_time`` seconds (default
:data:`DEFAULT_MAX_BLOCKING_TIME`; ``-o max_blocking_time=false`` turns it off) is
reported at ERROR on the logger ``weft.gevent`` with the stack of the greenlet that
blocks it. The watching is gevent's own monitor thread (``gevent.config.monitor_thread``,
which traces greenlet switches), started in whichever hub the tasks run in, the
application's included when it patched itself; gevent's own printing of the report
to stderr is turned off in favour of the log record. Only the hubs weft's tasks run
in are watched.
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from typing import Any

import gevent
import gevent.events
import gevent.monkey

from ._plugin import SERVE_MAX_BLOCKING_TIME

__all__ = [
    "DEFAULT_MAX_BLOCKING_TIME",
    "monitoring",
    "prepare_process",
    "start_monitor",
    "watch_blocking",
]

log = logging.getLogger("weft.gevent")

#: Under ``weft serve``, a hub that has not switched for this long is reported.
DEFAULT_MAX_BLOCKING_TIME = SERVE_MAX_BLOCKING_TIME

#: gevent's report lists every greenlet and thread after this line; the stack of the
#: blocking one comes before it, and is what a reader needs.
_REPORT_END = "Info:"

#: The threshold once watch_blocking was called, and the hubs watched.
_threshold: float | None = None
_watched: weakref.WeakSet[Any] = weakref.WeakSet()


def prepare_process(
    *,
    patch: bool = True,
    max_blocking_time: float | bool | None = DEFAULT_MAX_BLOCKING_TIME,
    **options: Any,
) -> None:
    """Before the handler is imported: monkey-patch, and watch for a blocked hub.

    ``patch=False`` leaves patching to the application; ``max_blocking_time=False``
    turns the report off. ``options``: the manager's other options, not used here.
    """
    if as_flag(patch, "patch") and not gevent.monkey.is_module_patched("socket"):
        gevent.monkey.patch_all()
        log.debug("gevent monkey-patching done (turn it off with -o patch=false)")
    if max_blocking_time is not None and max_blocking_time is not False:
        watch_blocking(float(max_blocking_time))


#: The words weft's own settings take for true and false (``-o patch=no`` as ``false``).
_WORDS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False}  # fmt: skip


def as_flag(value: object, name: str) -> bool:
    """A true-or-false option, given as a bool or as weft's words for one.

    ``-o patch=no`` reaches the manager as the string "no": taken as true, as any
    non-empty string is, it patched the process that asked not to be patched.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # -o patch=1: TOML reads it as a number
        return bool(value)
    word = _WORDS.get(value.strip().lower()) if isinstance(value, str) else None
    if word is None:
        raise ValueError(f"{name} is true or false (or yes/no, on/off, 1/0), got {value!r}")
    return word


def watch_blocking(seconds: float) -> None:
    """Report (log) a hub of weft's that does not switch for ``seconds``, from now on."""
    global _threshold
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"max_blocking_time must be a number of seconds > 0, got {seconds}")
    gevent.config.max_blocking_time = seconds
    gevent.config.print_blocking_reports = False
    if _threshold is None:
        gevent.events.subscribers.append(_on_event)
    _threshold = seconds


def monitoring() -> bool:
    """True if blocked hubs are watched (:func:`watch_blocking` was called)."""
    return _threshold is not None


def start_monitor(hub: Any) -> None:
    """Start gevent's monitor thread for ``hub``; call it in the hub's own thread.

    Only the hubs weft's tasks run in are watched (the manager calls this for each,
    the application's own hub included), not every hub of the process: gevent's
    resolver and threadpool threads have hubs of their own that rightly sit blocked.
    """
    if not monitoring() or hub in _watched:
        return
    _watched.add(hub)
    # gevent starts a monitor only while config.monitor_thread is set; leaving it set
    # would give every later hub of the process one too.
    gevent.config.monitor_thread = True
    try:
        with warnings.catch_warnings():
            # The main hub's monitor also watches memory, with psutil only; weft does not.
            warnings.filterwarnings("ignore", message="Unable to monitor memory usage")
            hub.start_periodic_monitoring_thread()
    finally:
        gevent.config.monitor_thread = False


def _on_event(event: object) -> None:
    if not isinstance(event, gevent.events.EventLoopBlocked) or event.hub not in _watched:
        return
    lines: list[str] = []
    for line in event.info:
        if line.strip() == _REPORT_END:
            break
        if line.strip(" =\n"):  # gevent's rule of '=' and blank lines: not for a log
            lines.append(line.strip("\n"))
    log.error(
        "the gevent hub was blocked for over %ss by greenlet %s, which does not yield"
        " (a blocking call that is not gevent's? monkey-patch, or use gevent's modules):\n%s",
        f"{event.blocking_time:g}",
        event.greenlet,
        "\n".join(lines),
    )
