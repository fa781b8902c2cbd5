"""weft's exception types, in one place so every module raises the same ones."""

from __future__ import annotations

from ._logsafe import escape_for_log

__all__ = [
    "BindError",
    "ConfigError",
    "HandlerKindError",
    "ManagerFullError",
    "PluginError",
    "ServerError",
    "TaskShutdown",
    "UnknownManagerError",
    "WeftError",
]


class WeftError(Exception):
    """Base class of every error weft raises on purpose."""


class ManagerFullError(WeftError):
    """A task manager is at its limit and cannot take another task (Weft's manager-full-error)."""


class TaskShutdown(BaseException):
    """Raised inside a task to end it at once; the task manager swallows it.

    It derives from BaseException, as GreenletExit and trio.Cancelled do, so that a
    handler's ``except Exception`` does not swallow a shutdown by accident.
    """


class ConfigError(WeftError, ValueError):
    """Configuration that cannot be used: names the source, the key and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        self.message = message
        # A source may be a path (a config file's): shown escaped, as the values are.
        shown = None if source is None else escape_for_log(source)
        where = ", ".join(p for p in (shown, f"key {key!r}" if key else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class UnknownManagerError(WeftError, LookupError):
    """No installed plugin provides the task manager that was asked for."""


class PluginError(WeftError):
    """A plugin is broken, or two plugins claim the same manager name."""


class HandlerKindError(WeftError, TypeError):
    """The handler's kind (plain or ``async def``) does not match the task manager's."""


class ServerError(WeftError):
    """The server stopped because of an error it could not survive (for example EBADF on accept)."""


class BindError(WeftError, OSError):
    """The server could not listen on the address and port it was given.

    Its text is its message alone (``cannot listen on fd:9: Bad file descriptor``):
    the message says what the kernel did; ``errno`` keeps the number.
    """

    def __str__(self) -> str:
        return self.strerror if isinstance(self.strerror, str) else super().__str__()


#: What a handler or a submitted call may raise that ends only its own task, as an
#: error does: left to the runtime, SystemExit or KeyboardInterrupt raised in an
#: asyncio task is raised again out of the whole loop, ending every connection.
EXITS: tuple[type[BaseException], ...] = (SystemExit, KeyboardInterrupt)
#: What ends a handler as its failure (logged, counted), not as the runtime's doing.
FAILURES: tuple[type[BaseException], ...] = (Exception, *EXITS)

#: The classes runtimes cancel a task with, known by name (the core imports none of
#: those libraries): trio's ``Cancelled``, asyncio's and concurrent.futures'
#: ``CancelledError``, greenlet's ``GreenletExit``.
_CANCELLATIONS = frozenset({"Cancelled", "CancelledError", "GreenletExit"})


def is_cancellation(
    exc: BaseException, own: tuple[type[BaseException], ...] | None = None
) -> bool:
    """True if ``exc`` is ``TaskShutdown``, a runtime's cancellation, or a group of only those.

    ``own`` is the runtime's ``cancellations``: only those count, so that a handler
    raising another runtime's (asyncio's ``CancelledError`` on threads) fails as
    any other exception would. None (a runtime that names none) counts every class
    named as trio's, asyncio's and greenlet's are. Any other exception a handler
    raises is its failure, whatever its base: a custom ``BaseException``,
    ``GeneratorExit`` or a ``BaseExceptionGroup`` went past the handler's error path
    (uncounted, no hook, no ``exception_handler``) to the manager's last resort,
    which logged its message unescaped.
    """
    if isinstance(exc, TaskShutdown):
        return True
    inner = getattr(exc, "exceptions", None)  # an exception group (duck-typed for 3.10)
    if isinstance(inner, tuple) and inner:
        return all(isinstance(e, BaseException) and is_cancellation(e, own) for e in inner)
    if own is not None:
        return isinstance(exc, own)
    return any(cls.__name__ in _CANCELLATIONS for cls in type(exc).__mro__)


def only_task_shutdown(exc: BaseException) -> bool:
    """True for ``TaskShutdown`` and for exception groups made only of it."""
    if isinstance(exc, TaskShutdown):
        return True
    inner = getattr(exc, "exceptions", None)
    return (
        isinstance(inner, tuple)
        and bool(inner)
        and all(isinstance(e, BaseException) and only_task_shutdown(e) for e in inner)
    )
