"""examples/longpoll.py run as its README says, on gevent, trio and asyncio.

The example runs in a subprocess (``--port 0 --stdin``); the subscribers are
sockets of this process driven by one selector, not a thread each, so ten thousand
of them fit (the slow test) and each process stays under its 20,000 descriptors.
Messages come from a PUB connection and from the example's stdin thread, which
publishes through ``server.submit()``; the stop is a SIGTERM sent as soon as the
last message is queued, before any subscriber has read a byte, so a message lost
at the stop shows up as a missing line before EOF.
"""

from __future__ import annotations

import queue
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from weft_core import available_managers

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "longpoll.py"
MANAGERS = ["gevent", "trio", "asyncio"]
#: Subscribers in the normal tests: enough for many parked tasks, a few seconds each.
FEW = 200
#: The issue's check (slow test): ten thousand parked subscribers.
MANY = 10_000
#: Messages from each source (the PUB connection and the publisher thread).
MESSAGES = 20
#: Messages from each source with ten thousand subscribers: each costs the server
#: 10,000 sends (about 90 µs each on trio, docs/performance.md), so few keep it short.
MANY_MESSAGES = 5
#: For the stop behind full sockets: loopback buffers about 4 MiB for a reader that
#: does not read, so 2 x 1,500 messages of 3,000 bytes (9 MB) leave most of them in
#: the subscriber's queue, behind a blocked send, when the stop comes.
BIG_MESSAGES = 1_500
BIG_PADDING = 3_000
#: Connections opened at once: well inside the example's listen backlog (1024).
BATCH = 500
#: Bound on every wait: a broken example fails instead of hanging.
TIMEOUT = 60.0


def _manager(name: str) -> str:
    if name not in available_managers():
        pytest.skip(f"{name} is not installed")
    return name


class Example:
    """examples/longpoll.py in a subprocess: its port, its stdin thread, its stderr lines."""

    def __init__(self, manager: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--manager", manager, "--port", "0", *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.errors: queue.Queue[bytes] = queue.Queue()
        self.stderr: list[bytes] = []
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()
        line = self.errors.get(timeout=TIMEOUT)
        found = re.search(rb"listening on 127\.0\.0\.1:(\d+) \(manager (\w+)\)", line)
        assert found is not None, f"the example did not say where it listens: {line!r}"
        assert found[2].decode() == manager, line
        self.port = int(found[1])

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.errors.put(line)

    def publish_from_thread(self, texts: list[bytes]) -> list[int]:
        """Write lines to the example's stdin; the counts its thread says it reached."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"".join(t + b"\n" for t in texts))
        self.proc.stdin.flush()
        counts = []
        for _ in texts:
            line = self.proc.stdout.readline()
            assert line.startswith(b"published to "), (line, self.log())
            counts.append(int(line.split()[-1]))
        return counts

    def terminate(self) -> None:
        """SIGTERM: a graceful stop, which ends once subscribers have read their queues."""
        self.proc.send_signal(signal.SIGTERM)

    def exit_status(self) -> int:
        return self.proc.wait(TIMEOUT)

    def log(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self.reader.join(TIMEOUT)  # it ends at the stderr's EOF, the process being gone
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def example(manager: str, *extra: str) -> Iterator[Example]:
    ex = Example(manager, *extra)
    try:
        yield ex
    finally:
        ex.close()


class Subscribers:
    """``count`` connections that sent ``SUB``, read through one selector."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.received: dict[socket.socket, bytearray] = {}
        self.ended: set[socket.socket] = set()
        try:
            for start in range(0, count, BATCH):
                batch = []
                for _ in range(min(BATCH, count - start)):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                    batch.append(sock)
                    self.received[sock] = bytearray()
                    sock.sendall(b"SUB\n")
                    sock.setblocking(False)
                    self.selector.register(sock, selectors.EVENT_READ)
                # Each subscribed before the next batch: the kernel's queue never overflows.
                self.read_until(lambda s: b"\n" in self.received[s], batch)
                for sock in batch:
                    first, _, rest = bytes(self.received[sock]).partition(b"\n")
                    assert first == b"SUBSCRIBED", first
                    self.received[sock] = bytearray(rest)
        except BaseException:
            self.close()
            raise

    def read_until(self, done: object, socks: list[socket.socket] | None = None) -> None:
        """Read whatever arrives until ``done(sock)`` holds for every one of ``socks``."""
        assert callable(done)
        waiting = {s for s in (socks or self.received) if not done(s)}
        deadline = time.monotonic() + TIMEOUT
        while waiting:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(waiting)} subscribers still waiting after {TIMEOUT}s"
            for key, _ in self.selector.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(65536)
                if data:
                    self.received[sock] += data
                else:
                    self.ended.add(sock)
                    self.selector.unregister(sock)
                if done(sock):
                    waiting.discard(sock)

    def read_to_eof(self) -> list[list[bytes]]:
        """Every subscriber's message lines, once the server has ended every connection."""
        self.read_until(lambda s: s in self.ended)
        return [bytes(buf).splitlines() for buf in self.received.values()]

    def close(self) -> None:
        for sock in self.received:
            sock.close()
        self.selector.close()


def publish_and_stop(
    manager: str, subscribers: int, messages: int = MESSAGES, padding: int = 0
) -> None:
    """Messages from a PUB connection and the submit() thread, then SIGTERM: none lost."""
    pad = b" " + b"x" * padding if padding else b""
    with example(_manager(manager), "--stdin") as ex:
        subs = Subscribers(ex.port, subscribers)
        try:
            pub_texts = [b"pub %d%s" % (i, pad) for i in range(messages)]
            thread_texts = [b"thread %d%s" % (i, pad) for i in range(messages)]
            with socket.create_connection(("127.0.0.1", ex.port), timeout=TIMEOUT) as pub:
                # The two sources publish at once; each one's messages keep their order.
                pub.sendall(b"".join(b"PUB " + t + b"\n" for t in pub_texts))
                counts = ex.publish_from_thread(thread_texts)
                with pub.makefile("rb") as replies:
                    acks = [replies.readline() for _ in pub_texts]
                    assert acks == [b"OK %d\n" % subscribers] * messages, acks
                    assert counts == [subscribers] * messages, counts
                    # Everything is queued, and no subscriber has read a byte of it: stop.
                    ex.terminate()
                    # The PUB connection ends in phase 2, in the same batch of the loop
                    # that runs every subscriber's shutdown callback: from here on, the
                    # end markers are queued, behind whatever the subscribers have not
                    # been sent yet.
                    assert replies.read() == b"", "the PUB connection did not end at the stop"
            received = subs.read_to_eof()
            assert ex.exit_status() == 0, ex.log()
        finally:
            subs.close()
    first = received[0]
    assert len(first) == 2 * messages, f"{len(first)} of {2 * messages} messages arrived"
    assert [m for m in first if m.startswith(b"pub ")] == pub_texts, "PUB messages out of order"
    assert [m for m in first if m.startswith(b"thread ")] == thread_texts, "submit() ones too"
    differing = sum(lines != first for lines in received)
    assert differing == 0, f"{differing} of {subscribers} subscribers saw another sequence"


@pytest.mark.parametrize("manager", MANAGERS)
def test_every_subscriber_gets_every_message_and_nothing_is_lost_at_stop(manager: str) -> None:
    publish_and_stop(manager, FEW)


@pytest.mark.parametrize("manager", MANAGERS)
def test_messages_queued_behind_a_full_socket_survive_the_stop(manager: str) -> None:
    publish_and_stop(manager, 2, BIG_MESSAGES, BIG_PADDING)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("manager", MANAGERS)
def test_ten_thousand_parked_subscribers(manager: str) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < MANY + 100:
        pytest.skip(f"needs {MANY + 100} descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    publish_and_stop(manager, MANY, MANY_MESSAGES)


@pytest.mark.parametrize("manager", MANAGERS)
def test_tick_thread_publishes_in_order(manager: str) -> None:
    with example(_manager(manager), "--tick", "0.05") as ex:
        subs = Subscribers(ex.port, 2)
        try:
            subs.read_until(lambda s: subs.received[s].count(b"\n") >= 3)
            ex.terminate()
            received = subs.read_to_eof()
            assert ex.exit_status() == 0, ex.log()
        finally:
            subs.close()
    for lines in received:
        numbers = [int(line.split()[1]) for line in lines]
        assert all(line.startswith(b"tick ") for line in lines), lines
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), numbers


@pytest.mark.parametrize("manager", MANAGERS)
def test_bad_request_is_answered_and_closed(manager: str) -> None:
    with example(_manager(manager)) as ex:
        with socket.create_connection(("127.0.0.1", ex.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"HELLO\n")
            with sock.makefile("rb") as reply:
                assert reply.read() == b"ERR expected SUB or PUB text\n"
        ex.terminate()
        assert ex.exit_status() == 0, ex.log()
