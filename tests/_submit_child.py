"""Run by tests/test_submit_edges.py in a child process (a crash must not take pytest).

    python tests/_submit_child.py MANAGER LOOP MODE EXC

Serves an echo server on MANAGER (LOOP: "uvloop" or "-"), then makes something
raise EXC (SystemExit, KeyboardInterrupt, TaskShutdown): MODE "submit" raises it
in a function given to ``server.submit()``, MODE "handler" in the handler of a
first connection. Then it checks that a new client is still echoed, and prints one
JSON line: how the submit's Future ended and whether the server still served.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from weft_core import Server, TaskShutdown
from weft_core._registry import get_manager_spec

WAIT = 5.0
EXCEPTIONS: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
    "TaskShutdown": TaskShutdown,
}


def main() -> None:
    manager, loop, mode, exc_name = sys.argv[1:5]
    exc = EXCEPTIONS[exc_name]
    is_async = get_manager_spec(manager).handler_kind == "async"
    raised_once = threading.Event()

    def echo(conn: Any) -> None:
        if mode == "handler" and not raised_once.is_set():
            raised_once.set()
            raise exc("raised by the handler")
        while data := conn.recv(65536):
            conn.sendall(data)

    async def aecho(stream: Any) -> None:
        if mode == "handler" and not raised_once.is_set():
            raised_once.set()
            raise exc("raised by the handler")
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    def boom() -> None:
        raise exc("raised by a submitted function")

    async def aboom() -> None:
        raise exc("raised by a submitted function")

    options = {"loop": "uvloop"} if loop == "uvloop" else {}
    server = Server(aecho if is_async else echo, manager=manager, manager_options=options)
    server.run()
    result: dict[str, Any] = {}
    if mode == "submit":
        future = server.submit(aboom if is_async else boom)
        try:
            future.result(WAIT)
            result["future"] = "result"
        except FutureTimeout:
            result["future"] = "pending"
        except CancelledError:
            result["future"] = "cancelled"
        except BaseException as caught:
            result["future"] = f"{type(caught).__name__}: {caught}"
    else:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as first:
            first.sendall(b"x")
            try:
                result["first"] = first.recv(10)
            except OSError as err:
                result["first"] = repr(err)
            result["first"] = repr(result["first"])
    # Is anybody still served? A new client, and an echo within WAIT.
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as client:
            client.sendall(b"ping")
            result["echo"] = client.recv(10).decode()
    except OSError as err:
        result["echo"] = f"{type(err).__name__}: {err}"
    print(json.dumps(result), flush=True)
    stopper = threading.Thread(target=server.stop, args=(1,), daemon=True)
    stopper.start()
    stopper.join(WAIT)


if __name__ == "__main__":
    main()
