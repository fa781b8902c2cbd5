"""One benchmark server in its own process: ``python -m benchmarks.server --backend ...``.

``--backend weft --flavour NAME`` runs ``weft_core.Server`` with manager ``NAME``;
``--backend raw --flavour threads|gevent|trio`` runs the same handler on
``socketserver.ThreadingTCPServer``, ``gevent.server.StreamServer`` or
``trio.serve_tcp``, and ``--flavour asyncio|asyncio-uvloop`` on
``asyncio.start_server`` (on uvloop's loop for the second, against weft's asyncio
manager with ``loop="uvloop"``); ``--backend asyncio`` runs the asyncio reference on
``asyncio.start_server``. The process pins itself to ``--core``, raises its fd limit,
prints ``PORT port fd-limit`` once listening, then obeys stdin: ``stop`` (weft only) times
``server.stop()`` and answers ``STOPPED seconds clean``; end of input exits at once.

Every server gets the same settings where the backend has them: backlog 1024,
``TCP_NODELAY`` on each connection (weft's default, trio's and asyncio's own; set
here for ``socketserver`` and ``gevent``), no connection limit.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from collections.abc import Callable
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
}
#: Benchmark names that run a weft manager with options: ``asyncio-uvloop`` is the
#: asyncio manager on uvloop, measured against ``asyncio.start_server`` on uvloop;
#: ``threads-nocache`` is weft-threads with idle-thread reuse off (a thread per connection).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "asyncio-uvloop": ("asyncio", {"loop": "uvloop"}),
    "threads-nocache": ("threads", {"idle_threads": 0}),
}


def weft_manager(name: str) -> tuple[str, dict[str, Any]]:
    """The weft manager and its options behind a benchmark name (a manager or a variant)."""
    return VARIANTS.get(name, (name, {}))


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
    for line in stdin_lines(wait):
        if line == "stop":
            started = time.perf_counter()
            clean = server.stop(timeout=STOP_GRACE)
            say(f"STOPPED {time.perf_counter() - started:.6f} {int(clean)}")
    _exit()


# -- raw backends ------------------------------------------------------------------------


def serve_raw_threads(handler_name: str) -> None:
    import socketserver
    import threading

    handler = handlers.SYNC[handler_name]

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            _nodelay(self.request)
            handler(self.request)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        block_on_close = False
        allow_reuse_address = True
        request_queue_size = BACKLOG

    server = Server((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, name="serve_forever", daemon=True).start()
    announce_port(server.server_address[1])
    for _ in stdin_lines():
        pass
    _exit()


def serve_raw_gevent(handler_name: str) -> None:
    from gevent.server import StreamServer
    from gevent.socket import wait_read

    handler = handlers.SYNC[handler_name]

    def handle(sock: Any, _addr: Any) -> None:
        _nodelay(sock)
        handler(sock)

    server = StreamServer((HOST, 0), handle, backlog=BACKLOG)
    server.start()
    announce_port(server.server_port)
    for _ in stdin_lines(wait_read):
        pass
    _exit()


def serve_raw_trio(handler_name: str) -> None:
    import functools

    import trio

    handler = handlers.TRIO[handler_name]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host=HOST, backlog=BACKLOG)
            )
            announce_port(listeners[0].socket.getsockname()[1])
            while await trio.to_thread.run_sync(sys.stdin.readline):
                pass
            _exit()

    trio.run(main)


def serve_asyncio(handler_name: str, uvloop: bool = False) -> None:
    """``asyncio.start_server`` with the asyncio handler (on uvloop's loop if asked)."""
    import asyncio

    handler = handlers.ASYNCIO[handler_name]

    async def main() -> None:
        server = await asyncio.start_server(handler, HOST, 0, backlog=BACKLOG)
        announce_port(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, sys.stdin.readline):
            pass
        _exit()

    if uvloop:
        import uvloop as uv

        uv.run(main())
    else:
        asyncio.run(main())


RAW: dict[str, Callable[[str], None]] = {
    "threads": serve_raw_threads,
    "gevent": serve_raw_gevent,
    "trio": serve_raw_trio,
    "asyncio": serve_asyncio,
    "asyncio-uvloop": lambda handler_name: serve_asyncio(handler_name, uvloop=True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server")
    parser.add_argument("--backend", choices=["weft", "raw", "asyncio"], required=True)
    parser.add_argument("--flavour", default="threads", help="weft manager, or raw backend")
    parser.add_argument("--handler", choices=["http", "echo"], required=True)
    parser.add_argument("--core", type=int, default=0)
    args = parser.parse_args(argv)
    pin(args.core)
    raise_nofile()
    if args.backend == "weft":
        serve_weft(args.flavour, args.handler)
    elif args.backend == "raw":
        RAW[args.flavour](args.handler)
    else:
        serve_asyncio(args.handler)


if __name__ == "__main__":
    main()
