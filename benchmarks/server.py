"""One benchmark server in its own process: ``python -m benchmarks.server --backend ...``.

``--backend weft --flavour NAME`` runs ``weft_core.Server`` with manager ``NAME``;
``--backend raw --flavour threads|gevent|trio`` runs the same handler on
``socketserver.ThreadingTCPServer``, ``gevent.server.StreamServer`` or
``trio.serve_tcp``, and ``--flavour asyncio|asyncio-uvloop`` on
``asyncio.start_server`` (on uvloop's loop for the second, against weft's asyncio
manager with ``loop="uvloop"``); ``--backend asyncio`` runs the asyncio reference on
``asyncio.start_server``. The process pins itself to ``--core``, raises its fd limit,
prints ``PORT port fd-limit`` once listening, then obeys stdin: ``stop`` times a graceful
stop and answers ``STOPPED seconds clean``; end of input exits at once.

weft's stop is ``server.stop()``. A raw server's is the one a user of that backend
writes by hand, doing the same work: stop accepting and close the listener, end every
open connection's input (``shutdown(SHUT_RD)``: the handler reads end of input and
returns), and wait until every handler has returned and its socket is closed. Started
with ``--stoppable`` (the stop suite's servers), each raw server tracks its open
connections for that in its handler wrapper (one add and one discard per connection),
as weft does; without it (every other suite), it serves as it always did, untracked. Both are bounded by :data:`STOP_GRACE`; ``clean``
says every handler returned within it.

Every server gets the same settings where the backend has them: backlog 1024,
``TCP_NODELAY`` on each connection (weft's default, trio's and asyncio's own; set
here for ``socketserver`` and ``gevent``), no connection limit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import handlers
from .procs import BACKLOG, pin, raise_nofile, say, stdin_lines

HOST = "127.0.0.1"
#: Graceful part of a timed stop; idle echo handlers end at once when their input ends.
STOP_GRACE = 30.0

#: The raw backend for each known flavour, and its name in the tables.
RAW_BACKENDS = {
    "threads": "socketserver.ThreadingTCPServer",
    "gevent": "gevent.server.StreamServer",
    "trio": "trio.serve_tcp",
    "asyncio": "asyncio.start_server",
    "asyncio-uvloop": "asyncio.start_server on uvloop",
    "gevent-patched": "gevent.server.StreamServer, monkey-patched",
}
#: Benchmark names that run a weft manager with options: ``asyncio-uvloop`` is the
#: asyncio manager on uvloop, measured against ``asyncio.start_server`` on uvloop;
#: ``threads-nocache`` is weft-threads with idle-thread reuse off (a thread per connection);
#: ``gevent-patched`` is the gevent manager in a monkey-patched process, as ``weft serve``
#: runs it by default (and gunicorn's gevent worker), against a patched StreamServer.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio-uvloop": ("asyncio", {"loop": "uvloop"}),
    "threads-nocache": ("threads", {"idle_threads": 0}),
    "gevent-patched": ("gevent", {}),
}
#: Flavours whose server process (weft's and raw's alike) calls ``patch_all()`` first.
PATCHED = {"gevent-patched"}


def weft_manager(name: str) -> tuple[str, dict[str, Any]]:
    """The weft manager and its options behind a benchmark name (a manager or a variant)."""
    return VARIANTS.get(name, (name, {}))


def raw_flavour(manager: str, handler_kind: str) -> str:
    """The raw backend compared with ``manager``: its own, or the closest for its handler kind."""
    if manager in RAW_BACKENDS:
        return manager
    return "trio" if handler_kind == "async" else "threads"


def installed_flavour(manager: str) -> str | None:
    """``raw_flavour`` of an installed manager; None, with a message, if it is not installed."""
    import weft_core

    specs = weft_core.available_managers()
    base = weft_manager(manager)[0]
    if base not in specs:
        print(f"manager {base!r} is not installed ({', '.join(specs)})", file=sys.stderr)
        return None
    return raw_flavour(manager, specs[base].handler_kind)


def handler_table(manager: str, handler_kind: str) -> dict[str, Any]:
    """The handlers a weft manager runs: asyncio's own for asyncio, else by kind."""
    if manager == "asyncio":
        return handlers.ASYNCIO
    return handlers.TRIO if handler_kind == "async" else handlers.SYNC


def announce_port(port: int | str | None) -> None:
    """Tell the parent the port listened on, and this process's fd limit."""
    say(f"PORT {port} {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")


def _exit() -> None:
    sys.stdout.flush()
    os._exit(0)  # do not wait for handler threads or loops: the orchestrator is done


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _end_input(sock: Any) -> None:
    """``shutdown(SHUT_RD)``, quietly: the connection may have closed meanwhile."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)


def _obey(lines: Iterable[str], stop: Callable[[], bool]) -> None:
    """Answer each ``stop`` line with ``STOPPED seconds clean``; exit at end of input."""
    for line in lines:
        if line == "stop":
            started = time.perf_counter()
            clean = stop()
            _stopped(time.perf_counter() - started, clean)
    _exit()


def _stopped(seconds: float, clean: bool) -> None:
    say(f"STOPPED {seconds:.6f} {int(clean)}")


# -- weft --------------------------------------------------------------------------------


def start_weft(name: str, handler: Any) -> Any:
    """A running weft Server for ``name`` (a manager or a variant) serving ``handler``.

    On loopback, on a free port it announces (``PORT``), with the backlog of every
    benchmark server and no connection limit.
    """
    import weft_core

    manager, options = weft_manager(name)
    server = weft_core.Server(
        handler,
        address=HOST,
        port=0,
        manager=manager,
        manager_options=options or None,
        max_connections=None,
        backlog=BACKLOG,
    )
    server.run()
    announce_port(server.port)
    return server


def serve_weft(name: str, handler_name: str) -> None:
    import weft_core

    manager = weft_manager(name)[0]
    spec = weft_core.available_managers().get(manager)
    if spec is None:
        raise SystemExit(f"weft manager {manager!r} is not installed")
    server = start_weft(name, handler_table(manager, spec.handler_kind)[handler_name])
    wait = None
    if manager == "gevent":  # read stdin cooperatively, whichever thread runs the hub
        from gevent.socket import wait_read

        wait = wait_read
    _obey(stdin_lines(wait), lambda: bool(server.stop(timeout=STOP_GRACE)))


# -- raw backends ------------------------------------------------------------------------
#
# With ``stoppable``, each tracks its open connections in its handler wrapper and stops
# as described at the top: the graceful stop a user of that backend writes by hand.

#: How often socketserver's serve_forever looks at its stop flag while no connection
#: arrives (``shutdown()`` waits for that look). Its default, 0.5 s, would weigh more in
#: a raw stop's time than the stop's own work, where weft's acceptor wakes at once.
POLL_INTERVAL = 0.01


def serve_raw_threads(handler_name: str, stoppable: bool = False) -> None:
    import socketserver
    import threading

    handler = handlers.SYNC[handler_name]
    conns: set[socket.socket] = set()
    changed = threading.Condition()  # guards conns; notified when the last one closes

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            _nodelay(self.request)
            handler(self.request)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        block_on_close = False
        allow_reuse_address = True
        request_queue_size = BACKLOG

    class Tracked(Server):
        """The server as a user with a graceful stop writes it: each connection tracked."""

        def process_request(self, request: Any, client_address: Any) -> None:
            with changed:  # in the accepting thread, before the handler's thread starts
                conns.add(request)
            super().process_request(request, client_address)

        def shutdown_request(self, request: Any) -> None:
            super().shutdown_request(request)  # the handler returned; this closes its socket
            with changed:
                conns.discard(request)
                if not conns:
                    changed.notify_all()

    server = (Tracked if stoppable else Server)((HOST, 0), Handler)
    threading.Thread(
        target=server.serve_forever,
        args=(POLL_INTERVAL if stoppable else 0.5,),  # 0.5: socketserver's default
        name="serve_forever",
        daemon=True,
    ).start()
    announce_port(server.server_address[1])

    def stop() -> bool:
        server.shutdown()
        server.server_close()
        with changed:
            open_now = list(conns)
        for sock in open_now:
            _end_input(sock)
        with changed:
            return changed.wait_for(lambda: not conns, STOP_GRACE)

    _obey(stdin_lines(), stop)


def serve_raw_gevent(handler_name: str, stoppable: bool = False) -> None:
    from gevent.event import Event
    from gevent.server import StreamServer
    from gevent.socket import wait_read

    handler = handlers.SYNC[handler_name]
    conns: set[Any] = set()
    done = Event()  # set when the last connection ends during a stop
    stopping = False

    def handle(sock: Any, _addr: Any) -> None:
        _nodelay(sock)
        handler(sock)

    def tracked(sock: Any, _addr: Any) -> None:
        conns.add(sock)
        try:
            _nodelay(sock)
            handler(sock)
        finally:
            # StreamServer closes the socket right after, before any greenlet switch,
            # so the stop (woken through the hub) sees it closed.
            conns.discard(sock)
            if stopping and not conns:
                done.set()

    server = StreamServer((HOST, 0), tracked if stoppable else handle, backlog=BACKLOG)
    server.start()
    announce_port(server.server_port)

    def stop() -> bool:
        nonlocal stopping
        stopping = True
        server.close()
        for sock in list(conns):
            # The real socket's shutdown: gevent's own would raise cancel_wait_ex into
            # the greenlet waiting in recv (a traceback) instead of its reading b"".
            _end_input(sock._sock)
        return not conns or done.wait(STOP_GRACE)

    _obey(stdin_lines(wait_read), stop)


def serve_raw_trio(handler_name: str, stoppable: bool = False) -> None:
    import trio

    handler = handlers.TRIO[handler_name]

    async def main() -> None:
        conns: set[Any] = set()
        done = trio.Event()  # set when the last connection ends during a stop
        stopping = False

        async def tracked(stream: Any) -> None:
            conns.add(stream)
            try:
                await handler(stream)
            finally:
                # serve_tcp closes the stream right after, before the stop can run.
                conns.discard(stream)
                if stopping and not conns:
                    done.set()

        async with trio.open_nursery() as nursery:
            accepting = trio.CancelScope()  # serve_tcp's listeners only, not its handlers

            async def accept(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
                with accepting:
                    await trio.serve_tcp(
                        tracked if stoppable else handler,
                        0,
                        host=HOST,
                        backlog=BACKLOG,
                        handler_nursery=nursery,
                        task_status=task_status,
                    )

            listeners = await nursery.start(accept)
            announce_port(listeners[0].socket.getsockname()[1])
            while line := await trio.to_thread.run_sync(sys.stdin.readline):
                if line.strip() != "stop":
                    continue
                started = time.perf_counter()
                stopping = True
                accepting.cancel()  # its listeners close as their tasks unwind
                for stream in list(conns):
                    _end_input(stream.socket)
                with trio.move_on_after(STOP_GRACE):
                    if conns:
                        await done.wait()
                _stopped(time.perf_counter() - started, not conns)
            _exit()

    trio.run(main)


def _end_transport_input(transport_socket: Any) -> None:
    """``shutdown(SHUT_RD)`` on a uvloop transport's socket, which refuses ``shutdown()``.

    Through a socket object on the same descriptor, detached after: the descriptor
    stays the transport's.
    """
    sock = socket.socket(
        transport_socket.family,
        transport_socket.type,
        transport_socket.proto,
        fileno=transport_socket.fileno(),
    )
    try:
        _end_input(sock)
    finally:
        sock.detach()


def serve_asyncio(handler_name: str, uvloop: bool = False, stoppable: bool = False) -> None:
    """``asyncio.start_server`` with the asyncio handler (on uvloop's loop if asked)."""
    import asyncio

    handler = handlers.ASYNCIO[handler_name]
    end_input = _end_transport_input if uvloop else _end_input

    async def main() -> None:
        conns: set[asyncio.StreamWriter] = set()
        done = asyncio.Event()  # set when the last connection ends during a stop
        stopping = False

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conns.add(writer)
            try:
                await handler(reader, writer)
            finally:
                conns.discard(writer)
                if stopping and not conns:
                    done.set()

        async def ended(writers: list[asyncio.StreamWriter]) -> None:
            """Every handler returned, and every transport closed its socket."""
            if conns:
                await done.wait()
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)

        server = await asyncio.start_server(
            tracked if stoppable else handler, HOST, 0, backlog=BACKLOG
        )
        announce_port(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() != "stop":
                continue
            started = time.perf_counter()
            stopping = True
            server.close()
            writers = list(conns)
            for writer in writers:
                end_input(writer.get_extra_info("socket"))
            try:
                await asyncio.wait_for(ended(writers), STOP_GRACE)
            except asyncio.TimeoutError:
                clean = False
            else:
                clean = True
            _stopped(time.perf_counter() - started, clean)
        _exit()

    if uvloop:
        import uvloop as uv

        uv.run(main())
    else:
        asyncio.run(main())


RAW: dict[str, Callable[[str, bool], None]] = {
    "threads": serve_raw_threads,
    "gevent": serve_raw_gevent,
    "trio": serve_raw_trio,
    "asyncio": lambda handler_name, stoppable: serve_asyncio(handler_name, False, stoppable),
    "asyncio-uvloop": lambda handler_name, stoppable: serve_asyncio(handler_name, True, stoppable),
    "gevent-patched": serve_raw_gevent,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server")
    parser.add_argument("--backend", choices=["weft", "raw", "asyncio"], required=True)
    parser.add_argument("--flavour", default="threads", help="weft manager, or raw backend")
    parser.add_argument("--handler", choices=["http", "echo"], required=True)
    parser.add_argument("--core", type=int, default=0)
    parser.add_argument(
        "--stoppable",
        action="store_true",
        help="raw backends: track connections for a graceful stop (the stop suite's servers)",
    )
    args = parser.parse_args(argv)
    if args.flavour in PATCHED:
        import gevent.monkey

        gevent.monkey.patch_all()
    pin(args.core)
    raise_nofile()
    if args.backend == "weft":
        serve_weft(args.flavour, args.handler)
    elif args.backend == "raw":
        RAW[args.flavour](args.handler, args.stoppable)
    else:
        serve_asyncio(args.handler)


if __name__ == "__main__":
    main()
