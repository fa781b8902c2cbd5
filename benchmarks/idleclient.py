"""A process holding many idle connections: ``python -m benchmarks.idleclient --port P``.

It pins itself to the client core, raises its fd limit (one process may hold up to
its hard limit, 20,000 here, minus a few) and connects from ``--source`` (a
127.0.0.x address), so several such processes reach more connections than one
could. Commands on stdin, one answer line each:

- ``open N``: connect until N connections are held, in batches; each new connection
  sends one byte and waits for its echo, so the server has really accepted it and
  started its handler before the next batch. Answers ``OPEN held error`` (``-``
  for none; a connection that got no echo is closed and not counted).
- ``echo``: one round trip on every connection; answers ``ECHO ok failed``.
- ``eof T``: wait up to T seconds for every connection to end (the server stops);
  answers ``EOF eof reset timeout``.
- end of input: close everything and exit.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time

from .procs import CLIENT_CORE, pin, raise_nofile, say, stdin_lines

BATCH = 500
#: Linux's IP_BIND_ADDRESS_NO_PORT: with a source address bound, pick the port at connect().
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Pool:
    def __init__(self, port: int, source: str, timeout: float) -> None:
        self.port = port
        self.source = source
        self.timeout = timeout
        self.socks: list[socket.socket] = []

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.settimeout(self.timeout)
            sock.connect(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def open(self, total: int) -> str:
        """Hold ``total`` connections; '-', or the error that stopped it short.

        Connections made before an error are kept if they answer their ping, so the
        count held is what the server really took (its fd limit, for instance).
        """
        while len(self.socks) < total:
            batch: list[socket.socket] = []
            error: OSError | None = None
            try:
                for _ in range(min(BATCH, total - len(self.socks))):
                    batch.append(self._connect())
            except OSError as exc:
                error = exc
            pinged = []
            for sock in batch:
                try:
                    sock.sendall(b"p")
                    pinged.append(sock)
                except OSError as exc:
                    error = error or exc
                    sock.close()
            deadline = time.monotonic() + self.timeout  # for the whole batch
            for sock in pinged:
                try:
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    if sock.recv(1) == b"p":
                        sock.settimeout(self.timeout)
                        self.socks.append(sock)
                        continue
                    error = error or ConnectionError("the server closed the connection")
                except OSError as exc:
                    error = error or exc
                sock.close()
            if error is not None:
                return f"{error.__class__.__name__}:{error}".replace(" ", "_")
        return "-"

    def echo(self) -> tuple[int, int]:
        ok = failed = 0
        alive = []
        for sock in self.socks:
            try:
                sock.sendall(b"e")
                alive.append(sock)
            except OSError:
                failed += 1
        for sock in alive:
            try:
                if sock.recv(1) == b"e":
                    ok += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
        return ok, failed

    def wait_eof(self, seconds: float) -> tuple[int, int, int]:
        deadline = time.monotonic() + seconds
        eof = reset = timeout = 0
        for sock in self.socks:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = sock.recv(1)
            except TimeoutError:
                timeout += 1
            except OSError:
                reset += 1
            else:
                if data:
                    timeout += 1  # not an end: it should have been idle
                else:
                    eof += 1
        return eof, reset, timeout

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.close()
        self.socks.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idleclient")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    pin(CLIENT_CORE)
    raise_nofile()
    pool = Pool(args.port, args.source, args.timeout)
    for line in stdin_lines():
        command, *rest = line.split()
        if command == "open":
            error = pool.open(int(rest[0]))
            say(f"OPEN {len(pool.socks)} {error}")
        elif command == "echo":
            say("ECHO {} {}".format(*pool.echo()))
        elif command == "eof":
            say("EOF {} {} {}".format(*pool.wait_eof(float(rest[0]))))
        else:
            say(f"ERROR unknown command {command!r}")
    pool.close()


if __name__ == "__main__":
    main()
