"""A hostile peer on every installed manager: what it can and cannot make weft do.

Issue 14, items 1, 2, 8 and 9 (see docs/reliability.md, "Hostile peers"):

- a PROXY header over a Unix listener is honoured only when ``trusted_proxies``
  lists ``"unix"`` (the issue's socat reproduction, and the opposite case);
- a client that binds its Unix socket to a path, or an abstract name, holding a
  forged log line and terminal escapes gets them logged escaped: in caplog and in
  a real ``weft serve``'s stderr, no extra line and no ESC byte;
- certificate and key files that do not go together, or are not PEM, are a
  one-line ``ConfigError`` naming the files, from ``Server(...)`` and ``weft serve``;
- a Unix listener's stop removes only the socket file it made, and a dangling
  symbolic link at its path is named as such.

Each case serves honest clients alongside and checks they get every byte.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _serving import LISTENING, REPO, Served, environment, handler_for, weft_serve
from hypothesis import given
from hypothesis import strategies as st

from weft_core import BindError, ConfigError, Server, available_managers, current_connection
from weft_core._config import load_config
from weft_core._connection import format_address
from weft_core._logsafe import MESSAGE_LIMIT, escape_for_log, escape_message, json_safe
from weft_core._proxy import V2_SIGNATURE, ProxyPolicy, build_v1
from weft_core._registry import get_manager_spec
from weft_core.testing._support import wait_until

pytestmark = pytest.mark.timeout(90)

#: The longest a client or a log line is waited for; all normally take milliseconds.
WAIT = 20.0
SOCAT = shutil.which("socat")
needs_socat = pytest.mark.skipif(SOCAT is None, reason="socat is not installed")

#: A whole log line in weft's own format, then "clear the screen": what a hostile
#: client binds its socket to, in the hope that weft writes it out raw.
FORGED = "\n2026-12-03 00:00:00,000 [1] [INFO] weft: stopped\n\x1b[2J"
#: The same as it must appear in the log: one line, printable ASCII.
ESCAPED = r"\n2026-12-03 00:00:00,000 [1] [INFO] weft: stopped\n\x1b[2J"
#: Where the forged line would start if it got through.
FORGED_LINE = re.compile(r"^2026-12-03 00:00:00,000 \[1\]", re.MULTILINE)
#: An honest client's request: big enough to take several reads, so none is lost quietly.
HONEST = b"honest " + b"x" * 100_000 + b"\n"


# -- handlers ---------------------------------------------------------------------------------


def reply_peer(conn: Any) -> None:
    """Read a line; ``boom`` raises, anything else is answered ``<peer_str> <line>``."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    if data == b"boom\n":
        raise RuntimeError("the client asked for an error")
    conn.sendall(current_connection().peer_str.encode() + b" " + data)


async def areply_peer(stream: Any) -> None:
    """The trio flavour of :func:`reply_peer`."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        data += chunk
    if data == b"boom\n":
        raise RuntimeError("the client asked for an error")
    await stream.send_all(current_connection().peer_str.encode() + b" " + data)


# -- fixtures and clients ---------------------------------------------------------------------


@pytest.fixture(params=sorted(available_managers()))
def manager(request: pytest.FixtureRequest) -> str:
    """Each installed manager's name."""
    name: str = request.param
    return name


@pytest.fixture
def folder() -> Iterator[str]:
    """A short directory (Unix socket paths are limited to 107 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix="weft-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(manager: str) -> Iterator[Any]:
    """``serve(**kw)``: a running :func:`reply_peer` Server on ``manager``, stopped afterwards."""
    servers: list[Server] = []

    def make(**kw: Any) -> Server:
        async_ = get_manager_spec(manager).handler_kind == "async"
        server = Server(areply_peer if async_ else reply_peer, manager=manager, **kw)
        servers.append(server)
        server.run()
        return server

    yield make
    for server in servers:
        server.stop(timeout=1)


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data``, then read until the server closes."""
    with sock:
        sock.settimeout(WAIT)
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def refused(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; True if the server closes without a byte.

    A reset counts (data unread), and so does a broken pipe: a server that refuses
    at once may have closed before the data is even sent (on a Unix socket, EPIPE).
    """
    try:
        return exchange(sock, data) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def unix_client(path: str, bind: str | bytes | None = None) -> socket.socket:
    """A Unix client of ``path``, bound first to ``bind`` (a path or an abstract name)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if bind is not None:
        sock.bind(bind)
    sock.connect(path)
    return sock


def tcp_client(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)


def abstract_name() -> bytes:
    """A fresh abstract name carrying the forged line (the namespace is machine-wide)."""
    return b"\0" + uuid.uuid4().hex[:8].encode() + FORGED.encode()


def assert_not_forged(text: str) -> None:
    """No forged line, no ESC byte, and the hostile name there in its escaped form."""
    assert "\x1b" not in text, text
    assert not FORGED_LINE.search(text), text
    assert ESCAPED in text, text


# -- escape_for_log ------------------------------------------------------------------------------


@given(st.text().filter(lambda s: not any(c in s for c in "'\"") and not _surrogates(s)))
def test_escape_for_log_is_repr_without_quotes(text: str) -> None:
    """Without quotes (which repr escapes its own way), the result is ascii()'s, unquoted."""
    assert escape_for_log(text) == ascii(text)[1:-1]


def _surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


@given(st.one_of(st.text(), st.binary()))
def test_escape_for_log_gives_one_printable_ascii_line(value: str | bytes) -> None:
    """Whatever a peer sends: printable ASCII, so no line break and no terminal control."""
    out = escape_for_log(value)
    assert out.isascii() and out.isprintable()


def test_escape_for_log_shows_bytes_and_undecodable_path_bytes_as_bytes() -> None:
    assert escape_for_log(b"a\x00\xff\\") == r"a\x00\xff\\"
    assert escape_for_log(os.fsdecode(b"/tmp/\xff")) == r"/tmp/\xff"
    assert escape_for_log(ValueError("two\nlines")) == r"two\nlines"


@given(st.text(min_size=MESSAGE_LIMIT - 2, max_size=MESSAGE_LIMIT + 50))
def test_escape_message_cuts_at_the_limit_and_counts_the_rest(text: str) -> None:
    """An exception's message in a log line: escaped, and at most MESSAGE_LIMIT of it."""
    out = escape_message(text)
    assert out.isascii() and out.isprintable()
    if len(text) <= MESSAGE_LIMIT:
        assert out == escape_for_log(text)
    else:
        kept = escape_for_log(text[:MESSAGE_LIMIT])
        assert out == f"{kept} [{len(text) - MESSAGE_LIMIT} more characters not logged]"


def test_escape_message_of_an_exception_whose_str_fails_says_so() -> None:
    """Called where logging's own lazy formatting would have caught the failure."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert escape_message(Unprintable()) == "<Unprintable whose str() failed>"


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (("127.0.0.1", 80), "127.0.0.1:80"),
        (("::1", 80, 0, 0), "[::1]:80"),
        ("", "unix:(unnamed)"),
        ("/run/app.sock", "unix:/run/app.sock"),
        (f"/tmp/{FORGED}", f"unix:/tmp/{ESCAPED}"),
        (b"\0" + FORGED.encode(), f"unix:@{ESCAPED}"),
        ("\0" + FORGED, f"unix:@{ESCAPED}"),
        (b"\0caf\xc3\xa9\xff", r"unix:@caf\xe9\xff"),
    ],
)
def test_format_address_escapes_what_the_peer_chose(address: Any, shown: str) -> None:
    assert format_address(address) == shown


# -- item 1: PROXY trust is explicit for Unix listeners --------------------------------------------


def test_a_unix_peer_is_trusted_only_when_listed() -> None:
    default = ProxyPolicy.from_settings(["127.0.0.0/8", "::1/128"], 5)
    listed = ProxyPolicy.from_settings(["10.0.0.5/32", " unix "], 5)
    for peer in ("", "/tmp/client", b"\0abstract"):
        assert not default.trusts(peer)
        assert listed.trusts(peer)
    assert default.trusts(("127.0.0.1", 1)) and not listed.trusts(("127.0.0.1", 1))
    assert listed.trusts(("10.0.0.5", 1)) and listed.trusts(("::ffff:10.0.0.5", 1, 0, 0))
    assert not default.trusts(None) and not default.trusts(())
    with pytest.raises(ValueError, match="'unix' to trust the clients of Unix listeners"):
        ProxyPolicy.from_settings(["unix:/path"], 5)


def test_a_trusted_network_written_ipv4_mapped_matches_its_clients() -> None:
    """``::ffff:127.0.0.0/104`` was taken by the config and never matched: a mapped peer
    is compared as its IPv4 address, and the balancer was refused as untrusted."""
    mapped = ProxyPolicy.from_settings(["::ffff:127.0.0.0/104"], 5)
    assert mapped.trusts(("::ffff:127.0.0.1", 1, 0, 0))
    assert mapped.trusts(("127.0.0.1", 1))
    assert not mapped.trusts(("::ffff:10.0.0.1", 1, 0, 0))
    assert not mapped.trusts(("::1", 1, 0, 0))


def test_config_accepts_unix_in_trusted_proxies(tmp_path: Path) -> None:
    (tmp_path / "weft.toml").write_text('trusted_proxies = ["unix", "10.0.0.5"]\n')
    config = load_config(config_file=tmp_path / "weft.toml", environ={}, cwd=tmp_path)
    assert config.values["trusted_proxies"] == ["unix", "10.0.0.5/32"]
    with pytest.raises(ConfigError, match="or 'unix' for Unix listeners"):
        load_config({"trusted_proxies": ["unix:/x"]}, environ={}, cwd=tmp_path)


@needs_socat
def test_socat_proxy_header_over_unix_is_refused_unless_listed(serve: Any, folder: str) -> None:
    """The issue's reproduction: trusted_proxies = ["10.0.0.5/32"] does not trust a Unix client."""
    assert SOCAT is not None
    path = os.path.join(folder, "s.sock")
    server = serve(
        bind=[f"unix:{path}", "127.0.0.1:0"],
        proxy_protocol=True,
        trusted_proxies=["10.0.0.5/32", "127.0.0.1/32"],
    )
    forged = b"PROXY TCP4 8.8.8.8 127.0.0.1 1234 80\r\nhello\n"
    result = subprocess.run(
        [SOCAT, "-t", str(WAIT), "-", f"UNIX-CONNECT:{path}"],
        input=forged,
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert result.stdout == b"", "closed unserved: the handler never saw it"
    wait_until(lambda: server.stats()["proxy_errors"] == 1, WAIT, "the refusal's count")
    # An honest balancer on a trusted TCP address is served in full meanwhile.
    header = build_v1(("203.0.113.7", 4242), ("127.0.0.1", server.port))
    assert exchange(tcp_client(server.port), header + HONEST) == b"203.0.113.7:4242 " + HONEST
    assert server.stats()["proxy_errors"] == 1


@needs_socat
def test_socat_proxy_header_over_unix_is_honoured_when_listed(serve: Any, folder: str) -> None:
    """With "unix" listed (and no network), Unix clients may announce, loopback may not."""
    assert SOCAT is not None
    path = os.path.join(folder, "s.sock")
    server = serve(bind=[f"unix:{path}", "127.0.0.1:0"], proxy_protocol=True,
                   trusted_proxies=["unix"])  # fmt: skip
    result = subprocess.run(
        [SOCAT, "-t", str(WAIT), "-", f"UNIX-CONNECT:{path}"],
        input=b"PROXY TCP4 8.8.8.8 127.0.0.1 1234 80\r\n" + HONEST,
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert result.stdout == b"8.8.8.8:1234 " + HONEST
    header = build_v1(("203.0.113.7", 4242), ("127.0.0.1", server.port))
    assert refused(tcp_client(server.port), header + b"hello\n")
    wait_until(lambda: server.stats()["proxy_errors"] == 1, WAIT, "the loopback refusal")


# -- item 2: log injection ----------------------------------------------------------------------


def test_hostile_unix_names_are_logged_escaped(
    serve: Any, folder: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A path and an abstract name holding a forged line: each ERROR record shows it escaped."""
    caplog.set_level(logging.INFO, logger="weft")
    path = os.path.join(folder, "s.sock")
    server = serve(address=f"unix:{path}")
    hostile: list[str | bytes] = [os.path.join(folder, FORGED), abstract_name()]
    for name in hostile:
        assert exchange(unix_client(path, bind=name), b"boom\n") == b""
        assert exchange(unix_client(path), HONEST) == b"unix:(unnamed) " + HONEST
    wait_until(lambda: server.stats()["handler_errors"] == 2, WAIT, "both handler errors")
    wait_until(lambda: len(_raised(caplog)) == 2, WAIT, "both ERROR records")
    messages = [r.getMessage() for r in _raised(caplog)]
    assert f"handler for unix:{os.path.join(folder, ESCAPED)} raised RuntimeError" in messages
    assert any(m.startswith("handler for unix:@") for m in messages)
    for message in messages:
        assert_not_forged(message)
    assert_not_forged(caplog.text)


def _raised(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("handler for unix:")]


def test_a_proxy_header_cannot_put_a_line_in_the_log(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither a malformed header carrying the line, nor a v2 header announcing it as a path."""
    caplog.set_level(logging.INFO, logger="weft")
    server = serve(proxy_protocol=True)
    malformed = b"PROXY TCP4 " + FORGED.encode() + b"\r\n"
    assert refused(tcp_client(server.port), malformed + b"hello\n")
    wait_until(lambda: server.stats()["proxy_errors"] == 1, WAIT, "the malformed header")
    # v2, AF_UNIX: source and destination are 108-byte sun_path blocks.
    src = FORGED.encode().ljust(108, b"\0")
    v2 = V2_SIGNATURE + bytes([0x21, 0x31]) + (216).to_bytes(2, "big") + src + src
    reply = exchange(tcp_client(server.port), v2 + b"boom\n")
    assert reply == b""
    wait_until(lambda: server.stats()["handler_errors"] == 1, WAIT, "the handler error")
    header = build_v1(("203.0.113.7", 4242), ("127.0.0.1", server.port))
    assert exchange(tcp_client(server.port), header + HONEST) == b"203.0.113.7:4242 " + HONEST
    wait_until(lambda: "raised RuntimeError" in caplog.text, WAIT, "the ERROR record")
    assert "\x1b" not in caplog.text and not FORGED_LINE.search(caplog.text), caplog.text
    assert "weft: stopped" not in caplog.text, "an announced path is not the peer"


def test_a_balancers_local_health_check_is_served_whatever_its_block(serve: Any) -> None:
    """A v2 LOCAL header is served with the balancer as peer, its block discarded unread
    as the spec says (an unknown family or a TCP4 family with no addresses was refused,
    and the balancer's health check failed)."""
    server = serve(proxy_protocol=True)
    for fam, block in ((0x11, b""), (0xFF, b"junk"), (0x00, b"\x01\x00\x09ab")):
        local = V2_SIGNATURE + bytes([0x20, fam]) + len(block).to_bytes(2, "big") + block
        reply = exchange(tcp_client(server.port), local + HONEST)
        assert reply.startswith(b"127.0.0.1:") and reply.endswith(b" " + HONEST), reply
    assert server.stats()["proxy_errors"] == 0


def test_weft_serve_stderr_shows_hostile_names_escaped(manager: str, folder: str) -> None:
    """A real ``weft serve``: silent hostile clients hit idle_timeout, logged at INFO, escaped."""
    path = os.path.join(folder, "s.sock")
    argv = weft_serve(handler_for(manager), "--manager", manager, "--bind", f"unix:{path}",
                      "--idle-timeout", "1.5")  # fmt: skip
    with Served(argv, cwd=REPO) as served:
        served.wait_for(LISTENING)
        hostile = [unix_client(path, bind=os.path.join(folder, FORGED)),
                   unix_client(path, bind=abstract_name())]  # fmt: skip
        try:
            with unix_client(path) as honest:
                honest.settimeout(WAIT)
                assert _serving_echo(honest, HONEST) == HONEST
            served.wait_for(r"closed unix:.*weft: stopped.*idle_timeout", count=2)
        finally:
            for sock in hostile:
                sock.close()
        served.signal(2)
        assert served.finish() == 0
        served.wait_closed()
        assert_not_forged(served.text)
        assert served.text.count(ESCAPED) == 2


def _serving_echo(sock: socket.socket, data: bytes) -> bytes:
    """Talk to ``_serving:handle``: skip its pid line, send ``data``, read as much back."""
    buffer = b""
    while b"\n" not in buffer:
        buffer += sock.recv(65536)
    buffer = buffer.partition(b"\n")[2]
    sock.sendall(data)
    while len(buffer) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return buffer


def test_weft_serve_refuses_a_proxy_header_over_unix_and_logs_the_path_escaped(
    manager: str, folder: str
) -> None:
    """``--proxy-protocol`` with trusted_proxies = ["10.0.0.5/32"]: the Unix client is refused."""
    path = os.path.join(folder, "s.sock")
    env = environment() | {"WEFT_TRUSTED_PROXIES": "10.0.0.5/32,127.0.0.1/32"}
    argv = weft_serve(handler_for(manager), "--manager", manager, "--bind", f"unix:{path}",
                      "--bind", "127.0.0.1:0", "--proxy-protocol")  # fmt: skip
    with Served(argv, cwd=REPO, env=env) as served:
        tcp = served.wait_for(LISTENING, count=2)[1].group(1)
        port = int(tcp.rpartition(":")[2])
        hostile = unix_client(path, bind=os.path.join(folder, FORGED))
        assert refused(hostile, b"PROXY TCP4 8.8.8.8 127.0.0.1 1234 80\r\nhello\n")
        served.wait_for(r"closed connection from unix:.* unserved: PROXY header: not a trusted")
        with tcp_client(port) as honest:
            honest.sendall(build_v1(("203.0.113.7", 4242), ("127.0.0.1", port)))
            assert _serving_echo(honest, HONEST) == HONEST
        served.signal(2)
        assert served.finish() == 0
        served.wait_closed()
        assert_not_forged(served.text)


# -- item 8: TLS files that cannot be used ----------------------------------------------------------


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A certificate, its key, another key, a DER copy and a text file that is not PEM."""
    trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme")
    ca = trustme.CA()
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("other.example")
    folder = tmp_path_factory.mktemp("pems")
    paths = {name: str(folder / f"{name}.pem") for name in ("cert", "key", "other_key", "text")}
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    other.private_key_pem.write_to_path(paths["other_key"])
    Path(paths["text"]).write_text("this is not a certificate\n")
    import ssl

    paths["der"] = str(folder / "cert.der")
    Path(paths["der"]).write_bytes(
        ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    )
    return paths


TLS_CASES = [
    ("cert", "other_key", "tls.keyfile", "the private key in {other_key} does not match the certificate in {cert}"),
    ("text", "key", "tls.certfile", "{text} is not a PEM certificate (it has no -----BEGIN"),
    ("der", "key", "tls.certfile", "{der} is not a PEM certificate (it looks like DER"),
    ("cert", "text", "tls.keyfile", "{text} is not a PEM private key"),
    ("key", "key", "tls.certfile", "{key} is not a PEM certificate (it holds PEM blocks of other kinds"),
]  # fmt: skip


@pytest.mark.parametrize(("certfile", "keyfile", "key", "message"), TLS_CASES)
def test_unusable_tls_files_are_named_when_the_server_is_made(
    manager: str, pems: dict[str, str], certfile: str, keyfile: str, key: str, message: str
) -> None:
    handler = areply_peer if get_manager_spec(manager).handler_kind == "async" else reply_peer
    tls = {"certfile": pems[certfile], "keyfile": pems[keyfile]}
    with pytest.raises(ConfigError) as caught:
        Server(handler, manager=manager, tls=tls)
    assert caught.value.key == key
    assert message.format(**pems) in str(caught.value)
    assert "\n" not in str(caught.value) and "PEM lib" not in str(caught.value)


@pytest.mark.parametrize(("certfile", "keyfile", "key", "message"), TLS_CASES[:2])
def test_weft_serve_prints_one_line_for_unusable_tls_files(
    manager: str, pems: dict[str, str], certfile: str, keyfile: str, key: str, message: str
) -> None:
    env = environment() | {"WEFT_TLS_CERTFILE": pems[certfile], "WEFT_TLS_KEYFILE": pems[keyfile]}
    result = subprocess.run(
        weft_serve(handler_for(manager), "--manager", manager),
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    # Named by the variable that gave that part (the config check's M1: no source).
    source = f"environment variable WEFT_{key.upper().replace('.', '_')}"
    expected = f"weft: {source}, key {key!r}: {message.format(**pems)}"
    assert result.stderr.startswith(expected), result.stderr
    assert result.stderr.count("\n") == 1, "one line, no traceback"


# -- item 9: Unix socket files ------------------------------------------------------------------------


def test_stop_leaves_another_servers_socket_file_alone(serve: Any, folder: str) -> None:
    """The path was taken over (file removed, a new server bound): the old stop() keeps off it."""
    path = os.path.join(folder, "s.sock")
    old = serve(address=f"unix:{path}")
    os.unlink(path)  # what a deploy script or an admin does before starting the new one
    new = serve(address=f"unix:{path}")
    with unix_client(path) as client:  # connected to the new server, and kept open
        old.stop(timeout=1)
        assert os.path.exists(path), "the old server removed the new one's socket file"
        assert exchange(client, HONEST) == b"unix:(unnamed) " + HONEST
    assert exchange(unix_client(path), HONEST) == b"unix:(unnamed) " + HONEST
    new.stop(timeout=1)
    assert not os.path.exists(path), "a server still removes its own file"


def test_a_relative_socket_path_is_removed_after_a_chdir(
    serve: Any, folder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unix:rel.sock``, then the application changes directory: the stop still
    removes the file it made (it looked for ``rel.sock`` in the new directory, and
    left the real one behind, stale: an outside check)."""
    monkeypatch.chdir(folder)
    server = serve(address="unix:rel.sock")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel.sock").write_text("another file of the same name, not ours")
    server.stop(timeout=1)
    assert not os.path.exists(os.path.join(folder, "rel.sock"))
    assert (tmp_path / "rel.sock").read_text() == "another file of the same name, not ours"


def test_a_dangling_symlink_at_the_path_is_named(serve: Any, folder: str) -> None:
    """Not "Address already in use": the link and where it points; the link is left alone."""
    path = os.path.join(folder, "s.sock")
    target = os.path.join(folder, "gone.sock")
    os.symlink(target, path)
    with pytest.raises(BindError) as caught:
        serve(address=f"unix:{path}")
    message = str(caught.value)
    assert f"a symbolic link to {target}, which does not exist, is there" in message
    assert "already in use" not in message
    assert os.path.islink(path)
    # Listening on the path the link names is the cure, and serves.
    serve(address=f"unix:{target}")
    assert exchange(unix_client(path), HONEST) == b"unix:(unnamed) " + HONEST


def test_a_symlink_to_a_stale_socket_is_not_replaced(serve: Any, folder: str) -> None:
    """A link is never followed to a socket file nor replaced: the path is refused, named."""
    path, target = os.path.join(folder, "s.sock"), os.path.join(folder, "real.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(target)  # a stale socket file, as a killed server leaves
    os.symlink(target, path)
    with pytest.raises(BindError, match=f"a symbolic link to {re.escape(target)} is there"):
        serve(address=f"unix:{path}")
    assert os.path.islink(path)
    # The stale file itself is still replaced, as before.
    serve(address=f"unix:{target}")
    assert exchange(unix_client(target), HONEST) == b"unix:(unnamed) " + HONEST


def test_json_safe_escapes_every_format_character_and_line_break() -> None:
    """JSON log lines and --check-config's listing: no character that reorders or hides
    text (Unicode's Cf: bidi marks, zero widths, tags), no line break, no C1 control
    reaches the reader raw. U+061C, U+E0001 and other Cf characters passed."""
    import sys
    import unicodedata

    raw = [
        f"U+{code:04X}"
        for code in range(0x7F, sys.maxunicode + 1)
        if unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp")
        and json_safe(chr(code)) == chr(code)
    ]
    assert raw == [], raw
