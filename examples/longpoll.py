"""Long-poll publish/subscribe: replies sent later, from elsewhere (issue 20).

    python examples/longpoll.py --manager trio --port 5001 --tick 1

The same small server on ``gevent`` (the default), ``trio`` or ``asyncio``. Clients
speak in lines:

- ``SUB`` parks the connection: the server answers ``SUBSCRIBED`` and from then on
  sends every message published, one line each, until the server stops (then the
  connection ends, after everything queued for it has been sent).
- ``PUB some text`` sends ``some text`` to every subscriber and answers ``OK N``,
  N being how many subscribers it was queued for. A connection may publish many;
  its last line may end with the end of its input instead of a newline (on every
  manager).

A parked subscriber holds no thread: its handler waits on a queue of the runtime
(``gevent.queue.Queue``, a trio memory channel, ``asyncio.Queue``). Publishers
outside the runtime go through ``server.submit()``: ``--tick SECONDS`` starts a
thread publishing the time, and ``--stdin`` one publishing each line typed on
standard input (printing ``published to N`` once it is queued). Ctrl-C or SIGTERM
stops the server gracefully: each subscriber's shutdown callback queues an end
marker *after* what is already queued, so nothing published before the stop is lost
(and, taking the subscriber out of the set, leaves nothing queued behind it: a publish
during the stop counts only those still to receive it).

What it leaves out, being small: a subscriber is not read while parked, so one that
vanishes is noticed (and its connection slot freed) only when a message sent to it
fails: for one reset, the next message; for one that closed, the second (the kernel
takes the first, and the client's reset comes back); and inboxes are unbounded, so one that stops reading keeps everything published
for it in memory. A real service bounds each inbox and drops a subscriber that falls
that far behind.

Only public ``weft_core`` names are used; see docs/managers.md, "Replying later".
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import CancelledError
from typing import Any

from weft_core import Server, ServerError, WeftError, current_task

#: Queued after a subscriber's last message by its shutdown callback: "send what is
#: queued, then end".
END = None
#: Request lines must be shorter than this (newline included, this many bytes at
#: most); a client sending a longer one is told so and dropped.
MAX_LINE = 4096
#: A long-poll server holds a connection per subscriber, far more than weft's
#: default of 1024; this stays below the usual fd limit of 20,000.
MAX_CONNECTIONS = 16_000
#: Seconds a stop waits for subscribers to flush what is queued before it interrupts.
GRACEFUL_TIMEOUT = 30.0

SUBSCRIBED = b"SUBSCRIBED\n"
BAD_REQUEST = b"ERR expected SUB or PUB text\n"
TOO_LONG = b"ERR request line longer than %d bytes\n" % MAX_LINE


def parse(line: bytes) -> tuple[str, bytes]:
    """A request line: ("SUB", b""), ("PUB", message line) or ("ERR", b"")."""
    verb, _, text = line.rstrip(b"\r\n").partition(b" ")
    if verb == b"SUB" and not text:
        return "SUB", b""
    if verb == b"PUB":
        return "PUB", text + b"\n"
    return "ERR", b""


def when_stopping(callback: Callable[[], object]) -> None:
    """Call ``callback`` when this connection is asked to stop (phase 2 of ``stop()``).

    It runs in the runtime's loop, so it may fill the runtime's queues.
    """
    task = current_task()
    assert task is not None, "a handler always runs as a weft task"
    task.on_shutdown(callback)


# -- gevent: a greenlet per connection, parked on a gevent.queue.Queue ---------------------


def gevent_app() -> tuple[Callable[..., Any], Callable[[bytes], int]]:
    """The gevent handler and ``broadcast`` (a plain function, run in the hub)."""
    import gevent.queue

    subscribers: set[gevent.queue.Queue[bytes | None]] = set()

    def broadcast(message: bytes) -> int:
        # No switch happens in this loop: every subscriber gets messages in one order.
        for inbox in subscribers:
            inbox.put(message)
        return len(subscribers)

    def subscribe(conn: Any) -> None:
        inbox: gevent.queue.Queue[bytes | None] = gevent.queue.Queue()
        subscribers.add(inbox)

        def last() -> None:  # stop(): phase 2. Nothing is queued behind the end.
            subscribers.discard(inbox)
            inbox.put(END)

        when_stopping(last)
        try:
            conn.sendall(SUBSCRIBED)
            while (message := inbox.get()) is not END:
                conn.sendall(message)
        except TimeoutError:
            raise  # it stopped reading (idle_timeout): weft counts and logs that
        except OSError:
            pass  # the subscriber went away
        finally:
            subscribers.discard(inbox)

    def handle(conn: Any) -> None:
        with conn.makefile("rb") as requests:
            while line := requests.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    conn.sendall(TOO_LONG)
                    return None
                verb, message = parse(line)
                if verb == "SUB":
                    return subscribe(conn)
                if verb == "PUB":
                    conn.sendall(b"OK %d\n" % broadcast(message))
                else:
                    conn.sendall(BAD_REQUEST)
                    return None
        return None

    return handle, broadcast


# -- trio and asyncio: a task per connection, parked on a channel or a queue ---------------


async def lines(stream: Any) -> AsyncIterator[bytes | None]:
    """Request lines from a trio.SocketStream (or weft's AsyncioStream, which has its API).

    None, then the end, for a line of ``MAX_LINE`` bytes or more before its newline.
    A last line ended by the end of input rather than a newline is a line too, as
    gevent's ``readline`` gives it.
    """
    buffer = b""
    while data := await stream.receive_some(MAX_LINE):
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            if end >= MAX_LINE:
                yield None
                return
            line, buffer = buffer[:end], buffer[end + 1 :]
            yield line
        if len(buffer) >= MAX_LINE:
            yield None
            return
    if buffer:
        yield buffer


def async_handler(
    subscribe: Callable[[Any], Awaitable[None]],
    deliver: Callable[[bytes], int],
    gone: tuple[type[BaseException], ...],
) -> Callable[[Any], Awaitable[None]]:
    """The handler trio and asyncio share: SUB parks the connection, PUB delivers a line.

    ``gone`` are the runtime's exceptions for a client that went away.
    """

    async def handle(stream: Any) -> None:
        try:
            async for line in lines(stream):
                if line is None:
                    await stream.send_all(TOO_LONG)
                    return None
                verb, message = parse(line)
                if verb == "SUB":
                    return await subscribe(stream)
                if verb == "PUB":
                    await stream.send_all(b"OK %d\n" % deliver(message))
                else:
                    await stream.send_all(BAD_REQUEST)
                    return None
        except gone:
            pass
        return None

    return handle


def trio_app() -> tuple[Callable[..., Any], Callable[[bytes], Any]]:
    """The trio handler and ``broadcast`` (an ``async def``, as submit() asks on trio)."""
    import trio

    subscribers: set[trio.MemorySendChannel[bytes | None]] = set()

    def deliver(message: bytes) -> int:
        for inbox in subscribers:
            inbox.send_nowait(message)  # unbounded channels: never blocks
        return len(subscribers)

    async def broadcast(message: bytes) -> int:
        return deliver(message)

    async def subscribe(stream: Any) -> None:
        inbox, messages = trio.open_memory_channel[bytes | None](math.inf)
        subscribers.add(inbox)

        def last() -> None:  # stop(): phase 2. Nothing is queued behind the end.
            subscribers.discard(inbox)
            inbox.send_nowait(END)

        when_stopping(last)
        try:
            await stream.send_all(SUBSCRIBED)
            async for message in messages:
                if message is END:
                    break
                await stream.send_all(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            subscribers.discard(inbox)

    gone = (trio.BrokenResourceError, trio.ClosedResourceError)
    return async_handler(subscribe, deliver, gone), broadcast


def asyncio_app() -> tuple[Callable[..., Any], Callable[[bytes], Any]]:
    """The asyncio handler and ``broadcast`` (an ``async def``)."""
    import asyncio

    subscribers: set[asyncio.Queue[bytes | None]] = set()

    def deliver(message: bytes) -> int:
        for inbox in subscribers:
            inbox.put_nowait(message)
        return len(subscribers)

    async def broadcast(message: bytes) -> int:
        return deliver(message)

    async def subscribe(stream: Any) -> None:
        inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        subscribers.add(inbox)

        def last() -> None:  # stop(): phase 2. Nothing is queued behind the end.
            subscribers.discard(inbox)
            inbox.put_nowait(END)

        when_stopping(last)
        try:
            await stream.send_all(SUBSCRIBED)
            while (message := await inbox.get()) is not END:
                await stream.send_all(message)
        except ConnectionError:
            pass
        finally:
            subscribers.discard(inbox)

    return async_handler(subscribe, deliver, (ConnectionError,)), broadcast


APPS = {"gevent": gevent_app, "trio": trio_app, "asyncio": asyncio_app}


# -- publishers outside the runtime: threads that go through server.submit() ----------------


def publish(server: Server, broadcast: Callable[[bytes], Any], message: bytes) -> int | None:
    """From any thread: queue ``message`` for every subscriber; how many it reached.

    Waiting for each call's result keeps one thread's messages in order (separate
    submit() calls are not ordered among themselves). None once the server has
    stopped: a call it never started is cancelled, a later one refused.
    """
    try:
        count: int = server.submit(broadcast, message).result()
    except (ServerError, CancelledError):
        return None
    return count


def tick(server: Server, broadcast: Callable[[bytes], Any], seconds: float) -> None:
    """Publish the time every ``seconds`` until the server stops."""
    number = 0
    while not server.wait(seconds):
        number += 1
        now = time.strftime("%H:%M:%S").encode()
        if publish(server, broadcast, b"tick %d %s\n" % (number, now)) is None:
            return


def relay_stdin(server: Server, broadcast: Callable[[bytes], Any]) -> None:
    """Publish each line of standard input; say on stdout once it is queued."""
    # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader's
    # lock makes the interpreter abort at exit.
    pending = b""
    while chunk := os.read(sys.stdin.fileno(), MAX_LINE):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            count = publish(server, broadcast, line.rstrip(b"\r") + b"\n")
            if count is None:
                return
            print(f"published to {count}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manager", choices=sorted(APPS), default="gevent")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001, help="0: any free port")
    parser.add_argument("--tick", type=float, metavar="SECONDS", help="publish the time")
    parser.add_argument("--stdin", action="store_true", help="publish each line of stdin")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    args = parser.parse_args(argv)
    if args.tick is not None and not args.tick > 0:  # NaN too
        print(
            f"longpoll.py: --tick must be a number of seconds above 0, such as --tick 1"
            f" (not {args.tick:g})",
            file=sys.stderr,
        )
        sys.exit(2)

    handle, broadcast = APPS[args.manager]()
    try:
        server = Server(
            handler=handle,
            address=args.host,
            port=args.port,
            manager=args.manager,
            max_connections=args.max_connections,
        )
        server.run()
    except WeftError as exc:  # "address in use" and the like: one line, no traceback
        print(f"longpoll.py: {exc}", file=sys.stderr)
        sys.exit(1)

    def stop_gracefully(signum: int, frame: object) -> None:
        # SIGTERM and Ctrl-C: a graceful stop, in a thread (a signal handler must not
        # wait). Installed before "listening" is announced: a signal right after it
        # stops the server rather than raising into whatever main() was doing.
        threading.Thread(target=server.stop, args=(GRACEFUL_TIMEOUT,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop_gracefully)
    signal.signal(signal.SIGINT, stop_gracefully)
    print(f"listening on {args.host}:{server.port} (manager {args.manager})", file=sys.stderr)
    sys.stderr.flush()
    if args.tick:
        threading.Thread(target=tick, args=(server, broadcast, args.tick), daemon=True).start()
    if args.stdin:
        threading.Thread(target=relay_stdin, args=(server, broadcast), daemon=True).start()
    server.wait()
    if server.error is not None:
        raise server.error


if __name__ == "__main__":
    main()
