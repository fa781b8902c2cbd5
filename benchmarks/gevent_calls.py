"""Calls per connection in the gevent hub's thread, weft against ``StreamServer``; a check by hand.

``python -m benchmarks.gevent_calls {weft,raw} [CONNECTIONS]`` serves one short
HTTP reply per connection, unpatched, in a hub thread; a client in the main
thread makes 200 connections to warm up, then ``CONNECTIONS`` (2,000) more, one
at a time, while a profile function (``sys.setprofile``, in the hub's thread)
counts every Python function entered and every C function called. It prints the
calls per connection, most frequent first: what ``performance.md`` lists as the
calls weft makes that raw does not. gevent's compiled ``Greenlet`` makes no call
a profile sees.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import gevent
import gevent.server

from .handlers import RESPONSE

WARMUP = 200
Key = tuple[str, str]


def _profiler(counts: collections.Counter[Key]) -> Callable[[Any, str, Any], None]:
    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            where = code.co_filename.split("/site-packages/")[-1]
            counts[(where, code.co_name)] += 1
        elif event == "c_call":
            counts[("C", getattr(arg, "__qualname__", repr(arg)))] += 1

    return profile


def _weft() -> tuple[int, Callable[[Callable[[], None]], None], Callable[[], None]]:
    from weft_core import Server

    def handle(conn: Any) -> None:
        conn.recv(4096)
        conn.sendall(RESPONSE)

    server = Server(handle, manager="gevent", port=0)
    server.run()
    runtime = server.task_manager.runtime

    def in_hub(fn: Callable[[], None]) -> None:
        if not runtime.run_in_loop(fn, timeout=10):  # in the hub's thread, the tasks'
            raise RuntimeError("the hub did not run the call")

    def stop() -> None:
        server.stop(1)

    return int(server.port), in_hub, stop


def _raw() -> tuple[int, Callable[[Callable[[], None]], None], Callable[[], None]]:
    ready = threading.Event()
    box: dict[str, Any] = {}

    def handle(sock: Any, address: Any) -> None:
        sock.recv(4096)
        sock.sendall(RESPONSE)
        sock.close()

    def hub_thread() -> None:
        server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
        server.start()
        box["port"], box["hub"] = server.address[1], gevent.get_hub()
        ready.set()
        gevent.sleep(10**6)

    threading.Thread(target=hub_thread, daemon=True).start()
    ready.wait()

    def in_hub(fn: Callable[[], None]) -> None:
        done = threading.Event()

        def call() -> None:
            fn()
            done.set()

        box["hub"].loop.run_callback_threadsafe(call)
        done.wait()

    return box["port"], in_hub, lambda: None


def _connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        while client.recv(4096):
            pass


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("weft", "raw"):
        print("usage: python -m benchmarks.gevent_calls {weft,raw} [CONNECTIONS]")
        return 2
    n = int(argv[1]) if len(argv) > 1 else 2000
    port, in_hub, stop = _weft() if argv[0] == "weft" else _raw()
    for _ in range(WARMUP):
        _connect(port)
    counts: collections.Counter[Key] = collections.Counter()
    in_hub(lambda: sys.setprofile(_profiler(counts)))
    for _ in range(n):
        _connect(port)
    in_hub(lambda: sys.setprofile(None))
    stop()
    print(f"{argv[0]}: {sum(counts.values()) / n:.1f} calls per connection")
    for (where, name), count in counts.most_common():
        if count >= n // 2:
            print(f"{count / n:7.2f}  {where}:{name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
