"""A gevent-patched server's bookkeeping under OS locks: what may switch never holds one.

The engine's and the task table's locks are OS locks even in a monkey-patched process
(`weft serve --manager gevent` patches by default): gevent's own lock costs a Python
call per take, and they are taken several times per connection. That is safe only
while nothing done under them can switch greenlets; a hook, a log line or an I/O call
moved under one would let a second greenlet of the same hub block the whole thread
on it, for ever. This test serves hundreds of clients at once in a patched child
process whose hooks switch greenlets at every call, while other greenlets and a
real OS thread read ``stats()`` and ``connections()`` and change the limit: every
client must be served, and the stop must end in its bound.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _serving import environment

from weft_core import available_managers

CLIENTS = 300

CHILD = r"""
import gevent.monkey

gevent.monkey.patch_all()

import json, socket, sys, threading, time

import gevent
from gevent.monkey import get_original

from weft_core import Server, _registry, hookimpl

clients = int(sys.argv[1])


class Yielding:
    # Every hook the server calls per connection switches greenlets, as a plugin
    # that writes to a socket or a file through gevent does.
    @hookimpl
    def weft_connection_opened(self, server, connection):
        gevent.sleep(0)

    @hookimpl
    def weft_connection_closed(self, server, connection, duration, bytes_in, bytes_out, how):
        gevent.sleep(0.001)


def echo(conn):
    while data := conn.recv(65536):
        conn.sendall(data)


_registry.register(Yielding(), "yielding")
server = Server(echo, manager="gevent", max_connections=clients + 10, access_log=True)
server.run()
done = False


def reader():
    while not done:
        server.stats()
        server.connections()
        gevent.sleep(0)


def limiter():
    n = 0
    while not done:
        n += 1
        server.max_connections = clients + 10 + n % 2
        gevent.sleep(0.002)


def os_thread():
    # A real thread of the OS, not a greenlet: contends for the same locks.
    while not done:
        server.stats()
        time.sleep(0.0005)


def client(i):
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(b"ping %d" % i)
        got = b""
        while len(got) < len(b"ping %d" % i):
            part = s.recv(64)
            if not part:
                break
            got += part
        return got == b"ping %d" % i


start, _ = get_original("_thread", ["start_new_thread", "allocate_lock"])
start(os_thread, ())
helpers = [gevent.spawn(reader), gevent.spawn(limiter)]
jobs = [gevent.spawn(client, i) for i in range(clients)]
gevent.joinall(jobs, timeout=15)
served = sum(1 for j in jobs if j.successful() and j.value)
done = True
gevent.joinall(helpers, timeout=5)
began = time.monotonic()
clean = server.stop(timeout=5)
took = time.monotonic() - began
print(json.dumps({"served": served, "accepted": server.stats()["accepted"], "clean": clean,
                  "took": took}), flush=True)
"""


@pytest.mark.timeout(60)
def test_a_patched_gevent_server_whose_hooks_switch_serves_everyone() -> None:
    if "gevent" not in available_managers():
        pytest.skip("weft-gevent is not installed")
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(CLIENTS)],
            capture_output=True,
            text=True,
            timeout=30,  # about 1 s when nothing under a lock switches
            env=environment(),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the patched server hung: a greenlet switched while holding an OS lock")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["served"] == CLIENTS, (result, done.stderr[-3000:])
    assert result["accepted"] == CLIENTS, result
    assert result["clean"] is True and result["took"] < 5 + 2, result
