"""The handlers every server runs: a minimal HTTP/1.1 keep-alive responder and echo.

Each is written once per handler kind: a plain function taking a socket (weft's
``threads`` and ``gevent`` managers, ``socketserver``, ``gevent.server``) and an
``async def`` taking a ``trio.SocketStream`` (weft's ``trio`` manager,
``trio.serve_tcp``), and one for asyncio taking ``(reader, writer)`` from
``asyncio.start_server`` or weft's ``AsyncioStream`` alone (it reads and writes).
None of them imports weft: the weft and raw servers run exactly the same code.

A peer that resets its connection (wrk does, at the end of a run) ends the handler
quietly on every server alike: ``trio.serve_tcp`` would otherwise crash on it, and
``socketserver`` and ``gevent`` print a traceback.

The HTTP responder reads until a blank line and answers every request with a fixed
``200 OK`` whose body is ``ok``; a request carrying ``Connection: close`` gets the
same answer with ``Connection: close`` and the connection ends (the churn test).
"""

from __future__ import annotations

from typing import Any

try:
    import trio
except ImportError:  # a gevent- or threads-only installation
    TRIO_PEER_ERRORS: tuple[type[BaseException], ...] = (ConnectionError,)
else:
    TRIO_PEER_ERRORS = (ConnectionError, trio.BrokenResourceError, trio.ClosedResourceError)

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
RESPONSE_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
END_OF_HEAD = b"\r\n\r\n"
BUFSIZE = 65536


def answer(buf: bytes) -> tuple[bytes, bytes, bool]:
    """Answer every complete request in ``buf``: ``(reply, rest of buf, close after reply)``."""
    replies: list[bytes] = []
    while True:
        end = buf.find(END_OF_HEAD)
        if end < 0:
            return b"".join(replies), buf, False
        head, buf = buf[:end], buf[end + 4 :]
        if b"connection: close" in head.lower():
            replies.append(RESPONSE_CLOSE)
            return b"".join(replies), b"", True
        replies.append(RESPONSE)


# -- sync: a socket (stdlib or gevent) ------------------------------------------------


def http_sync(conn: Any) -> None:
    buf = b""
    try:
        while True:
            data = conn.recv(BUFSIZE)
            if not data:
                return
            reply, buf, close = answer(buf + data)
            if reply:
                conn.sendall(reply)
            if close:
                return
    except ConnectionError:
        pass


def echo_sync(conn: Any) -> None:
    try:
        while True:
            data = conn.recv(BUFSIZE)
            if not data:
                return
            conn.sendall(data)
    except ConnectionError:
        pass


# -- async: a trio.SocketStream ------------------------------------------------------


async def http_trio(stream: Any) -> None:
    buf = b""
    try:
        while True:
            data = await stream.receive_some(BUFSIZE)
            if not data:
                return
            reply, buf, close = answer(buf + data)
            if reply:
                await stream.send_all(reply)
            if close:
                return
    except TRIO_PEER_ERRORS:
        pass


async def echo_trio(stream: Any) -> None:
    try:
        while True:
            data = await stream.receive_some(BUFSIZE)
            if not data:
                return
            await stream.send_all(data)
    except TRIO_PEER_ERRORS:
        pass


# -- asyncio: StreamReader / StreamWriter, or weft's AsyncioStream (both in one) -------
#
# The same code serves asyncio.start_server, which passes (reader, writer), and weft's
# asyncio manager, which passes one AsyncioStream that reads and writes (writer=None).


async def http_asyncio(reader: Any, writer: Any = None) -> None:
    writer = writer or reader
    buf = b""
    try:
        while True:
            data = await reader.read(BUFSIZE)
            if not data:
                return
            reply, buf, close = answer(buf + data)
            if reply:
                writer.write(reply)
                await writer.drain()
            if close:
                return
    except ConnectionError:
        pass
    finally:
        writer.close()


async def echo_asyncio(reader: Any, writer: Any = None) -> None:
    writer = writer or reader
    try:
        while True:
            data = await reader.read(BUFSIZE)
            if not data:
                return
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


SYNC = {"http": http_sync, "echo": echo_sync}
TRIO = {"http": http_trio, "echo": echo_trio}
ASYNCIO = {"http": http_asyncio, "echo": echo_asyncio}
