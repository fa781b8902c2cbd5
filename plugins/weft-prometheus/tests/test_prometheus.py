"""weft-prometheus against real servers: real clients, real scrapes, parsed.

Each test runs ``weft serve`` in its own process with the plugin loaded through its
entry point, as an installed plugin is, and checks the scraped counts against what
the test's own clients did.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from _prom_serving import BOOM
from _prom_support import (
    LISTENING,
    WAIT,
    WEFT,
    Client,
    Served,
    environment,
    free_port,
    host_port,
    scrape,
    scrape_until,
    total,
    weft_serve,
)

from weft_core import available_managers
from weft_prometheus import ADDRESS_ENV, parse_address
from weft_prometheus._exporter import RENDER_INTERVAL
from weft_prometheus._metrics import DURATION_BUCKETS, HOWS, REASONS

MANAGERS = ["threads", "gevent", "trio", "asyncio"]


@pytest.fixture(params=MANAGERS)
def manager(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name not in available_managers():
        pytest.skip(f"weft-{name} is not installed")
    return name


def test_counts_equal_what_was_served(manager: str) -> None:
    """Every count, byte and duration of what the clients did, labelled by manager and address."""
    metrics = f"127.0.0.1:{free_port()}"
    served, address = weft_serve(manager, metrics)
    with served:
        labels = {"manager": manager, "address": address}
        # Before any connection the server's series exist, at zero.
        assert total(scrape(metrics), "weft_connections_opened_total", **labels) == 0
        clients = []
        for size in (1, 10, 1000, 70_000):
            with Client(address) as client:
                client.echo(b"x" * size)
            clients.append(client)
        with Client(address) as failing:
            failing.send(BOOM)
            assert failing.file.read() == b""  # the handler raised: closed
        clients.append(failing)
        with Client(address) as held:
            samples = scrape_until(metrics, "weft_connections_open", 1, **labels)
        clients.append(held)

        n = len(clients)
        samples = scrape_until(metrics, "weft_connections_closed_total", n, **labels)
        assert total(samples, "weft_connections_opened_total", **labels) == n
        assert total(samples, "weft_connections_open", **labels) == 0
        assert total(samples, "weft_connections_closed_total", how="closed", **labels) == n - 1
        assert total(samples, "weft_connections_closed_total", how="error", **labels) == 1
        assert total(samples, "weft_handler_errors_total", **labels) == 1
        assert total(samples, "weft_received_bytes_total", **labels) == sum(
            c.sent for c in clients
        )
        assert total(samples, "weft_sent_bytes_total", **labels) == sum(
            c.received for c in clients
        )
        assert total(samples, "weft_connection_duration_seconds_count", **labels) == n
        assert total(samples, "weft_connection_duration_seconds_bucket", le="+Inf", **labels) == n
        buckets = {dict(lab)["le"] for (name, lab) in samples if name.endswith("_bucket")}
        assert buckets == {*(str(b) for b in DURATION_BUCKETS), "+Inf"}
        # No series is ever labelled by peer: only server-level labels and how/reason/le.
        allowed = {"manager", "address", "how", "reason", "le"}
        assert all(dict(lab).keys() <= allowed for (_, lab) in samples)
        assert served.stop() == 0, served.text
    # The one traceback is the failing handler's; no hook of the plugin raised.
    assert served.text.count("Traceback") == 1, served.text
    assert "weft.plugins" not in served.text, served.text


def test_refusals_counted_by_reason() -> None:
    """A connection refused at max_connections counts under reason="full"."""
    metrics = f"127.0.0.1:{free_port()}"
    served, address = weft_serve("threads", metrics, "--max-connections", "1")
    with served, Client(address):
        refused = socket.create_connection(host_port(address), timeout=WAIT)
        with refused:
            assert refused.recv(10) == b""  # closed unserved
        samples = scrape_until(metrics, "weft_connections_refused_total", 1, reason="full")
        assert total(samples, "weft_connections_opened_total") == 1


def _for_workers(tmp_path: Path) -> tuple[str, Path]:
    """A metrics address, and an XDG_RUNTIME_DIR of the test's own: the workers' shared
    directory goes there, where the test can see it. Skips without weft-threads."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    return f"127.0.0.1:{free_port()}", runtime


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_how_and_reason_is_scraped_as_0_before_it_first_counts(
    tmp_path: Path, workers: str
) -> None:
    """docs/hooks.md: a server's labelled series exist from its start, at 0. The closed
    and refused counters, labelled by ``how`` and ``reason``, appeared only at their
    first close or refusal (a bare ``# TYPE`` line, or nothing under --workers): an
    alert on the rate of refusals had no series to read until then (the docs check's
    D10)."""
    metrics, runtime = _for_workers(tmp_path)
    served, address = weft_serve(
        "threads", metrics, "--workers", workers, env={"XDG_RUNTIME_DIR": str(runtime)}
    )
    with served:
        if workers != "1":
            served.wait_for(r"worker ready on", count=int(workers))
        labels = {("manager", "threads"), ("address", address)}
        deadline = time.monotonic() + WAIT
        while True:  # a worker binds its series as its server starts
            samples = scrape(metrics)
            found = {
                (name, dict(lab).get("how") or dict(lab).get("reason"))
                for (name, lab), value in samples.items()
                if labels <= lab and value == 0
            }
            wanted = {("weft_connections_closed_total", how) for how in HOWS}
            wanted |= {("weft_connections_refused_total", why) for why in REASONS}
            if wanted <= found or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert wanted <= found, f"missing at 0: {sorted(wanted - found)}"
        assert served.stop() == 0, served.text


@pytest.mark.timeout(120)
def test_two_workers_one_scrape_sums_both(tmp_path: Path) -> None:
    """Under --workers 2, a scrape during load reports the sum over both workers."""
    metrics, runtime = _for_workers(tmp_path)
    # A supervisor that is gone (a pid beyond Linux's largest pid_max): swept.
    ended = runtime / f"weft-prometheus-{os.getuid()}-{2**22 + 1}-1"
    ended.mkdir()
    served, address = weft_serve(
        "threads", metrics, "--workers", "2", env={"XDG_RUNTIME_DIR": str(runtime)}
    )
    with served:
        served.wait_for(r"worker ready on", count=2)
        done: list[Client] = []
        lock = threading.Lock()

        def load(count: int) -> None:
            for i in range(count):
                with Client(address) as client:
                    client.echo(b"y" * (1 + i % 50))
                with lock:
                    done.append(client)

        # Connections held open across the scrape: the gauge is summed over the workers.
        held = [Client(address) for _ in range(6)]
        try:
            threads = [threading.Thread(target=load, args=(25,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            during = scrape(metrics)  # a scrape while the load runs
            for thread in threads:
                thread.join(WAIT * 2)
            assert total(during, "weft_connections_opened_total") >= len(held)
            samples = scrape_until(metrics, "weft_connections_closed_total", len(done))
            assert total(samples, "weft_connections_open") == len(held)
        finally:
            for client in held:
                client.close()
        clients = done + held
        by_worker = Counter(c.pid for c in clients)
        assert len(by_worker) == 2, f"one worker served everything: {by_worker}"
        scrape_until(metrics, "weft_connections_closed_total", len(clients))
        # Each worker renders for itself, and a rendering answers the scrapes of the
        # next RENDER_INTERVAL: once it has passed, any rendering is newer than the counts.
        time.sleep(RENDER_INTERVAL)
        for _ in range(8):  # each scrape is answered by one worker or the other: all sum
            samples = scrape(metrics)
            assert total(samples, "weft_connections_opened_total") == len(clients)
            assert total(samples, "weft_connections_open") == 0
            assert total(samples, "weft_received_bytes_total") == sum(c.sent for c in clients)
            assert total(samples, "weft_sent_bytes_total") == sum(c.received for c in clients)
        assert "cannot serve metrics" not in served.text
        # The old one swept; one for this supervisor (weft ctl's socket lives here too).
        (shared,) = runtime.glob("weft-prometheus-*")
        assert shared.name.startswith(f"weft-prometheus-{os.getuid()}-{served.proc.pid}-")
        assert {p.name for p in shared.glob("gauge_livesum_*.db")} == {
            f"gauge_livesum_{pid}.db" for pid in by_worker
        }
        assert served.stop() == 0, served.text
    assert "Traceback" not in served.text, served.text
    # Workers that ended cleanly took their live gauges out; their counters stay.
    assert not list(shared.glob("gauge_livesum_*.db"))
    assert {p.name for p in shared.glob("counter_*.db")} == {
        f"counter_{pid}.db" for pid in by_worker
    }


def test_a_draining_worker_killed_after_a_reload_stops_counting_as_open(tmp_path: Path) -> None:
    """--workers 2, connections held on the old workers, HUP, then the old workers are
    killed outright as they drain (the OOM killer, a control-group kill): no worker
    starts after them to sweep their live gauges, and ``weft_connections_open``
    counted their connections for good. A rendering sweeps them first now."""
    metrics, runtime = _for_workers(tmp_path)
    served, address = weft_serve(
        "threads", metrics, "--workers", "2", "--graceful-timeout", "60",
        env={"XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip
    with served:
        served.wait_for(r"worker ready on", count=2)
        held = [Client(address) for _ in range(4)]
        try:
            old = {client.pid for client in held}
            scrape_until(metrics, "weft_connections_open", len(held))
            served.proc.send_signal(signal.SIGHUP)
            served.wait_for(r"reload done")
            for pid in old:
                os.kill(pid, signal.SIGKILL)
            served.wait_for(r"exited with SIGKILL", count=len(old))
        finally:
            for client in held:
                client.close()
        # No worker starts now: a scrape alone must let go of the dead workers' gauges
        # (a rendering less than RENDER_INTERVAL old may answer first).
        deadline = time.monotonic() + WAIT
        while (now := total(scrape(metrics), "weft_connections_open")) != 0:
            assert time.monotonic() < deadline, f"weft_connections_open stays at {now}"
            time.sleep(0.1)  # polling a scrape: the gauge is the event waited for
    assert "Traceback" not in served.text, served.text


def test_workers_are_scraped_while_they_drain(tmp_path: Path) -> None:
    """--workers 2, a client held by a handler that lingers after its end of input,
    SIGTERM: while its worker drains, scrapes are answered and show the connection
    open. Each worker let go of the address as soon as its server stopped accepting,
    so a stop's drain (a rolling deploy's) was never scraped: every scrape was
    refused for up to the graceful timeout."""
    metrics, runtime = _for_workers(tmp_path)
    served = Served(
        [*WEFT, "serve", "_prom_serving:linger", "--workers", "2", "--bind", "127.0.0.1:0",
         "--graceful-timeout", "30"],
        {**environment(metrics), "XDG_RUNTIME_DIR": str(runtime)},
    )  # fmt: skip
    with served:
        ((address, _),) = (m.groups() for m in served.wait_for(LISTENING))
        served.wait_for(r"worker ready on", count=2)
        with Client(address):
            scrape_until(metrics, "weft_connections_open", 1)
            served.proc.send_signal(signal.SIGTERM)
            # The idle worker ends at once; a scrape in the instant its listener closes
            # may be refused, as any listener's closing refuses what is queued at it.
            served.wait_for(r"worker \d+ exited with 0")
            for _ in range(4):  # within LINGER: the other worker drains
                try:
                    samples = scrape(metrics)
                except OSError as exc:
                    raise AssertionError(f"{exc}; the log:\n{served.text}") from None
                assert total(samples, "weft_connections_open") == 1
        assert served.proc.wait(WAIT) == 0, served.text  # the stop under way ends it


def test_bind_failure_is_one_line_and_the_server_serves_on() -> None:
    """A metrics address in use: one clear log line, and the server goes on serving."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        served, address = weft_serve("threads", metrics)
        with served:
            line = served.wait_for(r".*cannot serve metrics.*")[0].group(0)
            with Client(address) as client:
                client.echo(b"still serving")
            assert served.stop() == 0
    assert f"on {metrics} ({ADDRESS_ENV}): Address already in use" in line
    assert len(re.findall("weft-prometheus", served.text)) == 1, served.text
    assert "Traceback" not in served.text


#: Run in a process of its own: a server with the plugin installed, the variable
#: unset (or wrong); reports what the plugin module holds and what got imported.
_UNSET = """
import json, socket, sys
from weft_core import Server
import _prom_serving
server = Server(_prom_serving.handle, manager="threads")
server.run()
with socket.create_connection(("127.0.0.1", server.port)) as client:
    client.recv(100)
server.stop()
plugin = sys.modules.get("weft_prometheus._plugin")
print(json.dumps({
    "loaded": plugin is not None,
    "hooks": sorted(n for n in dir(plugin) if n.startswith("weft_")),
    "prometheus_client": "prometheus_client" in sys.modules,
}))
"""


@pytest.mark.parametrize("value", [None, "", "no-port-here"])
def test_unset_or_wrong_registers_no_hook(value: str | None) -> None:
    """Unset, empty or not HOST:PORT: the plugin loads, implements no hook, imports nothing."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    env = environment(value)
    done = subprocess.run(
        [sys.executable, "-c", _UNSET], env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"loaded": True, "hooks": [], "prometheus_client": False}
    if value == "no-port-here":
        assert f"{ADDRESS_ENV}='no-port-here' is not HOST:PORT" in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    else:
        assert done.stderr == ""


def test_a_misspelt_variable_is_said(tmp_path: Path) -> None:
    """``WEFT_PROMETHEUS_ADRESS``: no metrics and no word (the config check's M3); a
    WEFT_PROMETHEUS_* variable the plugin does not read is now a warning naming its one."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    env = environment(None)
    env["WEFT_PROMETHEUS_ADRESS"] = "127.0.0.1:0"
    done = subprocess.run(
        [sys.executable, "-c", _UNSET], env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    assert f"'WEFT_PROMETHEUS_ADRESS' is not read: the one setting is {ADDRESS_ENV}" in (
        done.stderr
    ), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(
    "fake",
    [
        "raise ModuleNotFoundError(\"No module named 'prometheus_client'\")",
        "# too old: none of what the hooks import",
    ],
)
def test_a_prometheus_client_that_cannot_be_imported_is_one_line(
    tmp_path: Path, fake: str
) -> None:
    """The address set, prometheus-client missing or too old: one error line that says
    so and what to install, and the server serves on with no hook. Nothing was said
    at all (only ``weft managers`` listed the plugin as broken): the operator asked
    for metrics and got silence."""
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")
    shadow = tmp_path / "prometheus_client"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(fake + "\n")
    env = environment("127.0.0.1:0")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    done = subprocess.run(
        [sys.executable, "-c", _UNSET], env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loaded"] is True and report["hooks"] == [], report
    assert f"{ADDRESS_ENV} is set, but prometheus-client cannot be imported" in done.stderr
    assert "pip install 'prometheus-client>=0.20'" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9100", ("127.0.0.1", 9100)), ("[::1]:9100", ("::1", 9100)),
     ("localhost:0", ("localhost", 0))],
)  # fmt: skip
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["9100", ":9100", "host:", "host:99999", "::1:9100", "h:x", "h:\u00b2", "h:\u0669"]
)
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape("is not HOST:PORT; expected e.g. 127.0.0.1:9100")
    ):
        parse_address(text)


_GEVENT_PATCHED = """
from gevent import monkey
monkey.patch_all()
import select, sys
from weft_core import Server
import _prom_serving
server = Server(_prom_serving.handle, manager="gevent")
server.run()
print(server.port, flush=True)
select.select([sys.stdin], [], [])  # patched: yields to the hub until the test closes it
server.stop(timeout=5)
"""


def test_under_gevent_monkey_patching() -> None:
    """With gevent's monkey-patching the endpoint (a greenlet then) answers scrapes."""
    if "gevent" not in available_managers():
        pytest.skip("weft-gevent is not installed")
    metrics = f"127.0.0.1:{free_port()}"
    served = Served([sys.executable, "-c", _GEVENT_PATCHED], environment(metrics))
    with served:
        port = served.wait_for(r"(?m)^(\d+)\n")[0].group(1)
        with Client(f"127.0.0.1:{port}") as client:
            client.echo(b"patched")
        samples = scrape_until(metrics, "weft_connections_closed_total", 1, manager="gevent")
        assert total(samples, "weft_received_bytes_total") == client.sent
        assert served.proc.stdin is not None
        served.proc.stdin.close()
        assert served.proc.wait(WAIT) == 0, served.text
    assert "Traceback" not in served.text, served.text


def test_the_histogram_has_the_bounds_of_the_servers_own_durations() -> None:
    """``stats()["durations"]`` (and ``weft ctl status``) and the scrape bucket the same
    bounds: the core had 15 and the plugin 17 (900 s and 1800 s), both documented as
    "DURATION_BUCKETS, 5 ms to an hour" (an outside check of the traffic views)."""
    from weft_core import Server

    keys = list(Server(lambda conn: None).stats()["durations"])
    assert keys == [f"{bound:g}" for bound in DURATION_BUCKETS] + ["+Inf"]
