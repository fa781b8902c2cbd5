"""Wake a main thread that waits for signals, with no wake-up lost.

Waiting on a ``threading.Event`` with a timeout misses a signal that lands after
the interpreter last checked for signals and before the thread blocks (or one the
kernel hands to another thread): the handler runs only once the whole timeout has
passed. Seen as a SIGTERM answered a full second late.

The cure is the self-pipe that trio and asyncio use: ``signal.set_wakeup_fd`` makes
the C-level handler write each signal's number into a socket, from whichever
thread caught it, and a byte in a socket stays readable until it is read, so a
``select()`` entered late still returns at once. Other threads wake the waiter
with a zero byte (no signal is numbered 0).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import socket
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from types import FrameType, TracebackType
from typing import Any, ClassVar

__all__ = [
    "EXEC_SIGNALS_ENV",
    "Wakeup",
    "carry_signals_across_exec",
    "die_by",
    "raise_carried_signals",
]

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the signal's number is read from the socket instead."""


class Wakeup:
    """A socket pair that ``signals`` (and :meth:`wake`) make readable.

    A context manager: entering installs a handler for each of ``signals`` (replacing
    their default action) and the wakeup fd; leaving restores both, except that a
    signal in ``on_exit`` is given the handler named there. With no
    ``signals`` it touches neither, so it also works outside the main thread.

    ``on_signal(signum)``, if given, is called by the Python-level handler itself: it
    runs even while the main thread is stuck in a blocking call (which returns EINTR
    and is retried after the handler), where nothing reading the socket would run.

    Entered inside another (a single ``weft serve`` becoming a supervisor on HUP),
    it takes over the signals the outer one caught but nobody read yet: the outer
    loop is not coming back to them, and a TERM that landed in between was lost.
    """

    #: The Wakeups entered with signals, innermost last: one stack per process, as
    #: signal handlers and the wakeup fd are.
    _active: ClassVar[list[Wakeup]] = []

    def __init__(
        self,
        signals: Iterable[int] = (),
        on_signal: Callable[[int], object] | None = None,
        on_exit: Mapping[int, _Handler] | None = None,
    ) -> None:
        self._signals = tuple(signals)
        self._on_signal = on_signal
        #: What leaving gives these signals instead of what they had before.
        self._on_exit = dict(on_exit or {})
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous: dict[int, _Handler] = {}
        self._previous_fd = -1

    def __enter__(self) -> Wakeup:
        if self._signals:
            handler = _ignore if self._on_signal is None else self._call_on_signal
            # The socket first, then the handlers: a signal caught by a handler of
            # ours before its number could reach the socket was lost (a worker given
            # SIGTERM as it started ran on_signal, armed its deadline, and served on
            # until the deadline killed it, exit 4). One that comes before the
            # handlers meets what was there (SIGTERM's default action, for a worker
            # that has accepted nobody yet).
            self._previous_fd = signal.set_wakeup_fd(
                self._writer.fileno(), warn_on_full_buffer=False
            )
            self._previous = {sig: signal.signal(sig, handler) for sig in self._signals}
            if Wakeup._active:
                self._take_unread(Wakeup._active[-1])
            Wakeup._active.append(self)
            # Blocked until now in a supervisor re-executed on USR2 (see
            # _supervise._reexec) or starting (_supervise.supervise); with the
            # handlers in place they may arrive.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
        return self

    def _take_unread(self, outer: Wakeup) -> None:
        """Move the signals ``outer`` caught and nobody read to this Wakeup's socket.

        Called once this one's fd is the wakeup fd: nothing reaches ``outer`` after.
        """
        unread = bytes(signum for signum in outer._drain() if signum in self._signals)
        if unread:
            with contextlib.suppress(OSError):  # full: a wake-up is pending anyway
                self._writer.send(unread)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._signals:
            with contextlib.suppress(ValueError):
                Wakeup._active.remove(self)
            signal.set_wakeup_fd(self._previous_fd)
            for sig, handler in self._previous.items():
                handler = self._on_exit.get(sig, handler)
                # None: a handler not set from Python, which cannot be put back as such.
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._reader.close()
        self._writer.close()

    def _call_on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._on_signal is not None:
            self._on_signal(signum)

    def wake(self) -> None:
        """Make :meth:`wait` return; safe from any thread."""
        try:
            self._writer.send(b"\0")
        except OSError:  # full (a wake-up is already pending) or closed
            pass

    def wait(self, timeout: float | None, also: Sequence[socket.socket | int] = ()) -> list[int]:
        """Block until a signal, a :meth:`wake`, ``timeout`` or one of ``also`` (sockets, descriptors) is readable.

        Returns the signals received since last time (reading ``also`` is the caller's).
        """
        # poll(), not select(): a supervisor's links may have descriptors past 1024.
        poller = select.poll()
        for sock in (self._reader, *also):
            poller.register(sock, select.POLLIN)
        poller.poll(None if timeout is None else math.ceil(timeout * 1000))
        return [signum for signum in self._drain() if signum]

    def _drain(self) -> bytes:
        """Everything written to the socket so far (signal numbers, and zeros from wake())."""
        return _read_all(self._reader.fileno())

    @staticmethod
    def default(signals: Iterable[int]) -> None:
        """Give ``signals`` their default action again, so the next one quits at once.

        As PID 1 (a container's), whose default actions the kernel ignores, a
        handler that exits as the default action would (:func:`die_by`) instead.
        """
        for sig in signals:
            signal.signal(sig, _die_by_handler if os.getpid() == 1 else signal.SIG_DFL)


def die_by(signum: int) -> None:
    """End this process as ``signum``'s default action would, at once.

    By the signal itself, raised in this OS thread (``raise()``: delivered before
    it returns); as PID 1 of a PID namespace, where the kernel applies no default
    action, with status 128 + ``signum`` (what a shell reports for a death by that
    signal). Not ``pthread_kill(threading.get_ident())``: under gevent's patching
    that ident names a greenlet, and the call failed with ESRCH.
    """
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    os._exit(128 + signum)  # still here: PID 1, which its default action spares


def _die_by_handler(signum: int, frame: FrameType | None) -> None:
    die_by(signum)


#: Set in the environment of an image re-executed on USR2: the descriptor of a pipe
#: holding the numbers of the signals the old image caught and did not act on.
EXEC_SIGNALS_ENV = "_WEFT_EXEC_SIGNALS"


def carry_signals_across_exec() -> tuple[dict[str, str], Callable[[], None]]:
    """Before an ``execve``: keep every signal caught from now on for the new image.

    The caller has blocked the signals in its own thread, and the mask survives the
    exec, but a process-directed signal may still go to another thread, whose
    handler writes its number to the wakeup fd and which the exec then throws away
    with the socket (a SIGTERM during an upgrade, lost: the process served on). So
    the wakeup fd becomes an inheritable pipe, and what the active :class:`Wakeup`
    caught and nobody read moves there. The new image raises it all again
    (:func:`raise_carried_signals`). Returns the environment entry naming the pipe,
    and what undoes it all if the exec fails. Main thread only.
    """
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    previous = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    active = Wakeup._active[-1] if Wakeup._active else None
    unread = b"" if active is None else bytes(s for s in active._drain() if s)
    if unread:
        with contextlib.suppress(OSError):
            os.write(writer, unread)
    os.set_inheritable(reader, True)

    def undo() -> None:
        signal.set_wakeup_fd(previous, warn_on_full_buffer=False)
        os.set_blocking(reader, False)
        caught = _read_all(reader)
        os.close(reader)
        os.close(writer)
        if active is not None and caught:  # back where the serving loop reads them
            with contextlib.suppress(OSError):
                active._writer.send(caught)

    return {EXEC_SIGNALS_ENV: str(reader)}, undo


def raise_carried_signals(environ: MutableMapping[str, str]) -> list[int]:
    """In an image re-executed on USR2: raise again what the old one caught and left.

    Sent to this thread, where those still blocked since the exec stay pending until
    their handlers are in. Returns their numbers; removes the entry from ``environ``.
    """
    text = environ.pop(EXEC_SIGNALS_ENV, None)
    if not text:
        return []
    try:
        fd = int(text)
        os.set_blocking(fd, False)
    except (ValueError, OSError):
        return []
    try:
        caught = _read_all(fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    signums = sorted(set(caught) - {0})
    for signum in signums:
        # raise() goes to this OS thread whatever gevent's patching makes of
        # threading.get_ident(); one still blocked stays pending here.
        signal.raise_signal(signum)
    return signums


def _read_all(fd: int) -> bytes:
    """What a non-blocking descriptor holds now, up to its end."""
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 512)
        except (BlockingIOError, InterruptedError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
