"""Registers the ``gevent`` manager with weft (entry point ``weft: gevent``).

weft imports this module whenever it looks for managers (a trio server, ``weft
ctl``): it imports gevent only when a manager is made, a process is prepared for
it, or a task's name is read.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from weft_core import Conformance, ManagerSpec, TaskManager, hookimpl

log = logging.getLogger("weft.gevent")


def _create(
    *,
    limit: int | None = None,
    patch: bool = True,
    max_blocking_time: float | bool | None = None,
) -> TaskManager:
    """``GeventManager(...)``; its options named, so a misspelt one is named back."""
    from ._manager import GeventManager

    return GeventManager(limit=limit, patch=patch, max_blocking_time=max_blocking_time)


#: Under ``weft serve``, a hub that has not switched for this long is reported. A
#: second: well above a slow DNS lookup or a GC pause on a loaded two-core host (gevent's
#: own default, 0.1 s, reports those), well below what a client notices as a hang.
SERVE_MAX_BLOCKING_TIME = 1.0


def _prepare_process(
    *,
    patch: bool = True,
    max_blocking_time: float | bool | None = SERVE_MAX_BLOCKING_TIME,
    **options: Any,
) -> None:
    """:func:`weft_gevent._serve.prepare_process`: monkey-patching, before the handler's import.

    Its options named with weft serve's defaults, which ``--check-config`` lists.
    """
    from ._serve import prepare_process

    _warn_unread(os.environ)
    prepare_process(patch=patch, max_blocking_time=max_blocking_time, **options)


def _warn_unread(environ: Mapping[str, str]) -> None:
    """Warn of each WEFT_GEVENT_* variable that names no option: this plugin reads none.

    One that names an option (``WEFT_GEVENT_PATCH=false``, which left the process
    monkey-patched, unsaid) weft's config warns of itself, with the variable to set.
    """
    options = {
        parameter.name
        for fn in (_create, _prepare_process)
        for parameter in inspect.signature(fn).parameters.values()
        if parameter.kind is parameter.KEYWORD_ONLY
    }
    for name in sorted(environ):
        if name.startswith("WEFT_GEVENT_") and name[len("WEFT_GEVENT_") :].lower() not in options:
            log.warning(
                "weft-gevent: %r is not read: this plugin reads no variable of its own; its"
                " options are manager options (WEFT_MANAGER_OPTIONS_<NAME>, or -o name=...)",
                name,
            )


def _task_name() -> str:
    """The running task's name: its greenlet's (a task greenlet has ``name``, as gevent's own)."""
    import gevent

    return str(getattr(gevent.getcurrent(), "name", ""))


@hookimpl
def weft_managers() -> Iterator[ManagerSpec]:
    """Provide the ``gevent`` manager."""
    yield ManagerSpec(
        name="gevent",
        factory=_create,
        description="a greenlet per connection",
        handler_kind="sync",
        conformance=Conformance(task_name=_task_name),
        prepare_process=_prepare_process,
    )
