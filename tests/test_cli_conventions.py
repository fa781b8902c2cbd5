"""``weft serve`` as gunicorn and uvicorn users type it (issue 19).

Flags from the settings table with gunicorn's spellings, ``$PORT`` and
``$WEB_CONCURRENCY``, ``--check-config``, exit statuses, logging (zoned times,
JSON lines, ``--log-config``), ``--pid``, ``--user``/``--group`` and ``--reload``.
In-process tests use test_cli's fake Server; the rest run ``python -m weft_core
serve`` for real and read its stderr.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from _serving import REPO, Client, Served, environment, free_port, host_port, weft_serve
from test_cli import _isolated, one_error_line, write_module  # noqa: F401
from test_cli import fake_server as fake_server  # a fixture, used by name

from weft_core._cli import build_parser, main
from weft_core._config import load_config
from weft_core._flags import FLAGS, flag_values, render_flag
from weft_core._logging import JsonFormatter, TextFormatter
from weft_core._settings import SETTINGS
from weft_core._workers import worker_args
from weft_core.testing._support import wait_until

LISTENING = r"weft: listening on (\S+) \(manager (\S+)\)"
#: ISO 8601 to the millisecond, with the zone's offset.
ZONED_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d"


def serve_parser() -> Any:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]


# -- flags ------------------------------------------------------------------------------


def test_every_setting_a_config_file_can_set_is_also_a_flag() -> None:
    options = {o for action in serve_parser()._actions for o in action.option_strings}
    for name, setting in SETTINGS.items():
        if not setting.config or setting.kind.parse is None or name == "handler":
            continue
        if name.startswith("manager_options."):
            assert "-o" in options, name  # -o limit=N
            continue
        assert name in FLAGS, f"setting {name!r} is settable in config but has no flag"
        assert set(FLAGS[name].options) <= options, name


def test_gunicorn_spellings_parse() -> None:
    ns = serve_parser().parse_args(
        ["app:h", "-b", "0.0.0.0:80", "-b", "fd://3", "-w", "3", "-c", "x.toml", "-k", "gevent",
         "--backlog", "10", "--reuse-port", "--certfile", "c.pem", "--keyfile", "k.pem",
         "--ca-certs", "ca.pem", "--trusted-proxies", "10.0.0.0/8", "-p", "app.pid",
         "-u", "nobody", "-g", "nogroup", "--log-config", "log.toml", "--log-format", "json",
         "--reload", "--check-config", "--no-nodelay"]
    )  # fmt: skip
    got = {k: getattr(ns, k) for k in ("bind", "workers", "config", "manager", "backlog",
                                       "reuse_port", "tls.certfile", "tls.keyfile", "tls.cafile",
                                       "trusted_proxies", "pid", "user", "group", "log_config",
                                       "log_format", "reload", "check_config", "nodelay")}  # fmt: skip
    assert got == {
        "bind": ["0.0.0.0:80", "fd://3"], "workers": "3", "config": "x.toml",
        "manager": "gevent", "backlog": "10", "reuse_port": True, "tls.certfile": "c.pem",
        "tls.keyfile": "k.pem", "tls.cafile": "ca.pem", "trusted_proxies": ["10.0.0.0/8"],
        "pid": "app.pid", "user": "nobody", "group": "nogroup", "log_config": "log.toml",
        "log_format": "json", "reload": True, "check_config": True, "nodelay": False,
    }  # fmt: skip


def test_a_list_flag_given_twice_adds_to_the_list() -> None:
    """`--args 1 --args 2` gave ["2"], the first dropped without a word, as argparse keeps
    the last of a flag given twice (the config probe's F15); each one counts, as -b's do."""
    ns = serve_parser().parse_args(
        ["app:h", "--args", "1", "--args", "2,3", "--trusted-proxies", "10.0.0.0/8",
         "--trusted-proxies", "unix"]
    )  # fmt: skip
    values, _ = flag_values(ns)
    assert (values["args"], values["trusted_proxies"]) == ("1,2,3", "10.0.0.0/8,unix")
    config = load_config(values, environ={})
    assert config.get("args") == ("1", "2", "3")
    assert config.get("trusted_proxies") == ["10.0.0.0/8", "unix"]


@pytest.mark.timeout(20)
def test_flags_reach_the_server_as_the_table_reads_them(
    fake_server: dict[str, Any], tmp_path: Path
) -> None:
    fake_server["signal_on_run"] = signal.SIGTERM
    (tmp_path / "c.pem").write_text("")
    (tmp_path / "k.pem").write_text("")
    argv = ["serve", "cli_fake_app:handle", "-b", "unix:///tmp/weft-x.sock", "-b", "fd://3",
            "--backlog", "10", "--reuse-port", "--no-nodelay", "--trusted-proxies",
            "10.0.0.0/8,unix", "--certfile", "c.pem", "--keyfile", "k.pem"]  # fmt: skip
    assert main(argv) == 0
    (server,) = fake_server["made"]
    assert server.kwargs == {
        "manager": "threads",  # named: a Server with none would read config of its own
        "bind": ["unix:/tmp/weft-x.sock", "fd:3"],
        "backlog": 10,
        "reuse_port": True,
        "nodelay": False,
        "trusted_proxies": ["10.0.0.0/8", "unix"],
        "tls": {"certfile": str(tmp_path / "c.pem"), "keyfile": str(tmp_path / "k.pem")},
    }


@pytest.mark.timeout(20)
def test_without_a_bind_weft_serve_listens_on_8000_or_on_port(
    fake_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_server["signal_on_run"] = signal.SIGTERM
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    assert main(["serve", "cli_fake_app:handle"]) == 0
    monkeypatch.setenv("PORT", "5055")
    assert main(["serve", "cli_fake_app:handle"]) == 0
    # A bind from any source replaces the default.
    monkeypatch.setenv("WEFT_BIND", "127.0.0.1:7000")
    assert main(["serve", "cli_fake_app:handle"]) == 0
    made = [s.kwargs for s in fake_server["made"]]
    assert made == [
        {"manager": "threads", "address": "127.0.0.1", "port": 8000},
        {"manager": "threads", "address": "0.0.0.0", "port": 5055},
        {"manager": "threads", "bind": ["127.0.0.1:7000"]},
    ]


@pytest.mark.timeout(20)
def test_an_unusable_port_replaced_by_a_flag_does_not_widen_the_address(
    fake_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PORT=abc`` and ``--port``: the port is the flag's, and the address stays
    weft serve's own 127.0.0.1; it became 0.0.0.0, every interface, unsaid (the
    config check's M7), for a $PORT weft itself found unusable."""
    fake_server["signal_on_run"] = signal.SIGTERM
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.setenv("PORT", "abc")
    assert main(["serve", "cli_fake_app:handle", "--port", "7005"]) == 0
    assert [s.kwargs for s in fake_server["made"]] == [
        {"manager": "threads", "address": "127.0.0.1", "port": 7005}
    ]


@pytest.mark.timeout(20)
def test_a_bind_naming_no_host_listens_where_weft_serve_does_when_nothing_says(
    fake_server: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn's `--bind :$PORT` (Cloud Run's own command) listened on 127.0.0.1
    only, while weft itself listens on 0.0.0.0 when $PORT is set and nothing says
    where: the platform's router could not reach it, and nothing said why (the
    conventions check). A bind with no host takes weft serve's default host: 0.0.0.0
    under $PORT, 127.0.0.1 without it."""
    fake_server["signal_on_run"] = signal.SIGTERM
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    assert main(["serve", "cli_fake_app:handle", "-b", ":7001", "-b", "[::1]:7002"]) == 0
    monkeypatch.setenv("PORT", "7003")
    assert main(["serve", "cli_fake_app:handle", "-b", ":7003"]) == 0
    monkeypatch.setenv("WEFT_BIND", "7004,unix:/tmp/weft-x.sock")
    assert main(["serve", "cli_fake_app:handle"]) == 0
    binds = [s.kwargs["bind"] for s in fake_server["made"]]
    assert binds == [
        ["127.0.0.1:7001", "[::1]:7002"],
        ["0.0.0.0:7003"],
        ["0.0.0.0:7004", "unix:/tmp/weft-x.sock"],
    ]


@pytest.mark.parametrize(
    ("where", "value", "said"),
    [("flag", "exa mple", "'exa mple' is not an IP address or host name"),
     ("env", "exa mple", "'exa mple' is not an IP address or host name"),
     ("flag", "*", "for every interface write 0.0.0.0"),
     ("flag", "[::1]", "without brackets"),
     ("file", "host_name!", "'host_name!' is not an IP address or host name")],
)  # fmt: skip
def test_address_is_checked_as_a_host_in_bind_is(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    where: str,
    value: str,
    said: str,
) -> None:
    """`--address 'exa mple'` passed --check-config, then weft serve failed to boot
    (exit 1), where the same host in --bind is refused (exit 2) with its reason."""
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    argv = ["serve", "checked_app:handle", "--check-config"]
    if where == "flag":
        argv += ["--address", value]
    elif where == "env":
        monkeypatch.setenv("WEFT_ADDRESS", value)
    else:
        (tmp_path / "weft.toml").write_text(f"address = {value!r}\n".replace("'", '"'))
    assert main(argv) == 2
    assert said in capfd.readouterr().err


def test_spaces_around_an_address_are_dropped_as_around_a_bind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`WEFT_ADDRESS='0.0.0.0 '` (a templated variable's trailing space) was kept, and
    weft serve exited 1 at the bind; in WEFT_BIND the space was dropped."""
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.setenv("WEFT_ADDRESS", "0.0.0.0 ")
    assert main(["serve", "checked_app:handle", "--check-config"]) == 0
    assert 'address = "0.0.0.0"  # env WEFT_ADDRESS' in capsys.readouterr().out


def test_switches_and_tls_flags_render_back_for_workers() -> None:
    flags = {"handler": "app:h", "reuse_port": True, "nodelay": False, "tls.certfile": "c.pem",
             "trusted_proxies": "10.0.0.0/8", "bind": ["x"], "workers": "4"}  # fmt: skip
    args = worker_args(flags, "weft.toml")
    assert args == ["app:h", "--config=weft.toml", "--reuse-port", "--no-nodelay",
                    "--certfile=c.pem", "--trusted-proxies=10.0.0.0/8", "--workers=1"]  # fmt: skip
    ns = serve_parser().parse_args(args)
    assert (ns.reuse_port, ns.nodelay, getattr(ns, "tls.certfile")) == (True, False, "c.pem")
    assert render_flag("bind", ["a:1", "b:2"]) == "--bind=a:1,b:2"


# -- --check-config ------------------------------------------------------------------------


def test_check_config_prints_each_setting_with_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    (tmp_path / "weft.toml").write_text("backlog = 64\nidle_timeout = 5\n")
    monkeypatch.setenv("WEFT_MAX_CONNECTIONS", "9")
    monkeypatch.setenv("WEFT_MAX_CONECTIONS", "9")  # a typo: a warning, not a refusal
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.delenv("PORT", raising=False)
    argv = ["serve", "checked_app:handle", "--check-config", "--idle-timeout", "3",
            "--shutdown-port", "0", "--shutdown-secret", "s3cret"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = dict(line.split(" = ", 1) for line in out.splitlines())
    assert lines["backlog"] == f"64  # file {tmp_path / 'weft.toml'}"
    assert lines["idle_timeout"] == "3.0  # flag --idle-timeout"  # the flag beats the file
    assert lines["max_connections"] == "9  # env WEFT_MAX_CONNECTIONS"
    assert lines["workers"] == "3  # env WEB_CONCURRENCY"
    assert lines["port"] == "8000  # default"
    assert lines["address"] == '"127.0.0.1"  # default'
    assert lines["shutdown_secret"] == '"***"  # flag --shutdown-secret'
    assert lines["handler"] == '"checked_app:handle"  # flag HANDLER'
    tables = ("tls", "manager_options")  # listed part by part
    assert set(lines) >= {n for n, s in SETTINGS.items() if s.config and n not in tables}
    assert "did you mean WEFT_MAX_CONNECTIONS?" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backlog", "lots"], "command line --backlog, key 'backlog': expected a positive"),
        (["-b", "127.0.0.1:http2x"], "command line --bind, key 'bind': bad endpoint"),
        (["-u", "no-such-user-here"], "no user named 'no-such-user-here'"),
        (["-k", "no-such-manager"], "no-such-manager"),
    ],
)
def test_check_config_reports_the_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    assert main(["serve", "checked_app:handle", "--check-config", *argv]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_check_config_imports_the_handler(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "missing_app:handle", "--check-config"]) == 2
    assert "cannot import handler 'missing_app:handle'" in capsys.readouterr().err


# -- exit statuses ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_exit_statuses_tell_a_config_error_from_a_boot_failure(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, status in [(["-b", "127.0.0.1:99999"], 2), (["-b", f"127.0.0.1:{port}"], 1)]:
            with Served(weft_serve("_serving:handle", *args), cwd=tmp_path) as served:
                assert served.finish() == status, served.text


# -- logging --------------------------------------------------------------------------------


def _record(message: str, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("weft.access", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_access_log_fields() -> None:
    extra = {"peer": "203.0.113.9:5123", "duration": 0.25, "bytes_in": 10, "bytes_out": None,
             "how": "closed"}  # fmt: skip
    line = JsonFormatter().format(_record("conn\nfrom \x1b[31mpeer", **extra))
    assert "\n" not in line and "\x1b" not in line  # a peer's bytes cannot forge a line
    parsed = json.loads(line)
    assert parsed.items() >= {**extra, "level": "INFO", "logger": "weft.access",
                              "message": "conn\nfrom \x1b[31mpeer", "pid": os.getpid()}.items()  # fmt: skip
    assert re.fullmatch(ZONED_TIME, parsed["time"])


def test_json_lines_escape_del_and_the_c1_controls() -> None:
    """U+009B is a one-character terminal escape (CSI); JSON itself escapes only C0."""
    message = "a\x9b2J b\x7f c\u2028 d\x85 e\u00e9"
    line = JsonFormatter().format(_record(message))
    assert not any(ch in line for ch in "\x7f\x85\x9b\u2028"), line
    assert "\xe9" in line  # printable non-ASCII stays as it is
    assert json.loads(line)["message"] == message


def test_json_lines_escape_invisible_and_direction_marks_and_untrusted_exceptions() -> None:
    """A bidi override or a zero-width mark a peer sent reorders or hides what a reader
    of the JSON log sees; and a handler's exception there was formatted afresh, its
    peer-made message unescaped, where the text format printed it escaped (the peer
    check's LOW-2)."""
    from weft_core._logsafe import format_untrusted_exception

    message = "user \u202egnp.exe\u202c \u200bx \u2066y\u2069 \ufeffz"
    line = JsonFormatter().format(_record(message))
    assert not any(ch in line for ch in "\u202e\u202c\u200b\u2066\u2069\ufeff"), line
    assert json.loads(line)["message"] == message
    try:
        raise ValueError("bad \u202eevil\nline")
    except ValueError as exc:
        record = _record("handler raised")
        record.exc_info = (type(exc), exc, exc.__traceback__)
        record.exc_text = format_untrusted_exception(exc)
    text = json.loads(JsonFormatter().format(record))["exc_info"]
    assert "\\u202e" in text and "\n" not in text.split("ValueError: ")[-1], text


def test_text_lines_have_zoned_times() -> None:
    line = TextFormatter().format(_record("hello"))
    assert re.fullmatch(rf"{ZONED_TIME} \[\d+\] \[INFO\] weft\.access: hello", line)


@pytest.mark.timeout(60)
def test_e2e_log_format_json_every_line_parses(tmp_path: Path) -> None:
    argv = weft_serve("_serving:handle", "-b", "127.0.0.1:0", "--log-format", "json")
    with Served(argv, cwd=tmp_path) as served:
        served.wait_for(r'"message": "listening on ')
        served.signal(signal.SIGTERM)
        assert served.finish() == 0
        served.wait_closed()
    records = [json.loads(line) for line in served.lines]
    assert [r["message"] for r in records if r["logger"] == "weft"][-1] == "stopped"
    assert all(re.fullmatch(ZONED_TIME, r["time"]) for r in records)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["toml", "toml-delayed", "ini"])
def test_a_check_never_empties_a_log_the_config_opens_afresh(tmp_path: Path, kind: str) -> None:
    """A log config whose file handler writes afresh (``mode = "w"``): ``--check-config``,
    a supervisor's start check and a USR2's check open its files as serve does, to
    refuse one serve could not open, and each emptied the log the running server
    writes (a refused USR2 lost it). A check appends; serve itself still starts the
    file afresh, as the config says. A handler made with ``delay = true`` opens its
    file at its first record: the application's, as the check imports it."""
    log_file = tmp_path / "weft.log"
    (tmp_path / "logs_on_import.py").write_text(
        "import logging\nlogging.getLogger('app').warning('imported')\n"
        "def handle(conn):\n    conn.sendall(b'hi')\n"
    )
    handler = "logs_on_import:handle" if kind == "toml-delayed" else "_serving:handle"
    documents = {
        "toml": f"""
            [handlers.file]
            class = "logging.FileHandler"
            filename = "{log_file}"
            mode = "w"
            [root]
            level = "INFO"
            handlers = ["file"]
        """,
        "toml-delayed": f"""
            [handlers.file]
            class = "logging.FileHandler"
            filename = "{log_file}"
            mode = "w"
            delay = true
            [root]
            level = "INFO"
            handlers = ["file"]
        """,
        "ini": f"""
            [loggers]
            keys = root
            [handlers]
            keys = file
            [formatters]
            keys =
            [logger_root]
            level = INFO
            handlers = file
            [handler_file]
            class = FileHandler
            args = ({str(log_file)!r}, "w")
        """,
    }
    config = tmp_path / f"logging.{kind.partition('-')[0]}"
    config.write_text("\n".join(line.strip() for line in documents[kind].splitlines()))
    log_file.write_text("the live server's lines\n")
    for check in (
        ["--check-config"],
        ["--check-config", "--workers", "2"],
        ["--check-config", "-o", "limt=5"],  # a check that refuses, after the logging
    ):
        subprocess.run(
            weft_serve(handler, "--log-config", str(config), *check),
            cwd=tmp_path, env=environment(), capture_output=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert log_file.read_text().startswith("the live server's lines\n"), check
    # A supervisor's own start check, then its serving: the file is started afresh once.
    argv = weft_serve(handler, "-b", "127.0.0.1:0", "--workers", "2",
                      "--log-config", str(config))  # fmt: skip
    with Served(argv, cwd=tmp_path) as served:
        wait_until(
            lambda: "listening on" in log_file.read_text(),
            what=f"the listening line in {log_file}",
        )
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "the live server's lines" not in log_file.read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["toml", "json", "ini"])
def test_e2e_log_config_file(tmp_path: Path, kind: str) -> None:
    log_file = tmp_path / "weft.log"
    documents = {
        "toml": f"""
            [formatters.plain]
            format = "%(levelname)s|%(name)s|%(message)s"
            [handlers.file]
            class = "logging.FileHandler"
            filename = "{log_file}"
            formatter = "plain"
            [root]
            level = "INFO"
            handlers = ["file"]
        """,
        "json": json.dumps(
            {
                "formatters": {"plain": {"format": "%(levelname)s|%(name)s|%(message)s"}},
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "filename": str(log_file),
                        "formatter": "plain",
                    }
                },
                "root": {"level": "INFO", "handlers": ["file"]},
            }
        ),
        "ini": f"""
            [loggers]
            keys = root
            [handlers]
            keys = file
            [formatters]
            keys = plain
            [logger_root]
            level = INFO
            handlers = file
            [handler_file]
            class = FileHandler
            args = ({str(log_file)!r},)
            formatter = plain
            [formatter_plain]
            format = %(levelname)s|%(name)s|%(message)s
        """,
    }
    config = tmp_path / f"logging.{kind}"
    config.write_text("\n".join(line.strip() for line in documents[kind].splitlines()))
    argv = weft_serve("_serving:handle", "-b", "127.0.0.1:0", "--log-config", str(config))
    with Served(argv, cwd=tmp_path) as served:
        wait_until(
            lambda: log_file.exists() and "|weft|listening on" in log_file.read_text(),
            what=f"the listening line in {log_file}",
        )
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert "INFO|weft|listening on 127.0.0.1:" in log_file.read_text()


def test_a_broken_log_config_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    (tmp_path / "log.json").write_text('{"handlers": {"h": {"class": "no.such.Handler"}}}')
    assert main(["serve", "checked_app:handle", "--log-config", "log.json"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("weft: log config log.json, key 'log_config': cannot use it: ")
    assert "Unable to configure handler 'h': Cannot resolve 'no.such.Handler'" in line


# -- pid file, privileges -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_e2e_pid_file_written_once_listening_and_removed_at_exit(tmp_path: Path) -> None:
    pid_file = tmp_path / "weft.pid"
    argv = weft_serve("_serving:handle", "-b", "127.0.0.1:0", "-p", str(pid_file))
    with Served(argv, cwd=tmp_path) as served:
        served.wait_for(LISTENING)
        wait_until(pid_file.exists, what=f"{pid_file} to be written")
        assert pid_file.read_text() == f"{served.proc.pid}\n"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert not pid_file.exists()


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\t(\d+)\t(\d+)", status, re.M)
    assert match is not None
    return int(match.group(2))  # the effective uid


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_e2e_user_dropped_after_binding(tmp_path: Path, workers: str) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    # Whoever serves the connection (the process, or a worker) runs as nobody.
    port = free_port() if workers == "2" else 0
    argv = weft_serve("_serving:handle", "-b", f"127.0.0.1:{port}", "-u", "nobody", "-w", workers)
    with Served(argv, cwd=REPO) as served:
        ((address, _),) = [m.groups() for m in served.wait_for(LISTENING)]
        client = Client(host_port(address))  # the first line is the serving process's pid
        try:
            assert _uid_of(client.pid) == nobody
            if workers == "2":
                assert client.pid != served.proc.pid
                assert _uid_of(served.proc.pid) == 0  # the supervisor stays root
        finally:
            client.sock.close()
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text


# -- --reload ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_e2e_reload_restarts_on_an_edit_and_stops_on_sigterm(tmp_path: Path) -> None:
    app = tmp_path / "reloaded_app.py"
    app.write_text("def handle(conn):\n    conn.sendall(b'version one')\n")
    port = free_port()
    env = environment()
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "weft_core", "serve", "reloaded_app:handle", "-b",
            f"127.0.0.1:{port}", "--reload"]  # fmt: skip
    with Served(argv, cwd=tmp_path, env=env) as served:
        served.wait_for(LISTENING)
        assert _ask(port) == b"version one"
        app.write_text("def handle(conn):\n    conn.sendall(b'version two!')\n")
        served.wait_for(r"reloading: .*reloaded_app\.py changed")
        served.wait_for(LISTENING, count=2)
        assert _ask(port) == b"version two!"
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
        served.wait_closed()  # the child is gone too: it held stderr
    assert served.text.count("weft: stopped") == 2
    # The parent's pid, which it hands its child in WEFT_RELOAD_PARENT, is weft's own
    # variable: no "no weft setting has that name" for a typo the user never made.
    assert "ignoring WEFT_" not in served.text, served.text


def _ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        return b"".join(iter(lambda: client.recv(100), b""))


def _reloading(folder: Path) -> Served:
    """``weft serve reloaded_app:handle --reload`` in ``folder``, which gets the handler."""
    (folder / "reloaded_app.py").write_text("def handle(conn):\n    conn.sendall(b'one')\n")
    env = environment()
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "weft_core", "serve", "reloaded_app:handle", "-b",
            "127.0.0.1:0", "--reload"]  # fmt: skip
    return Served(argv, cwd=folder, env=env)


@pytest.mark.timeout(60)
def test_reload_names_a_changed_file_escaped(tmp_path: Path) -> None:
    """A file name is anyone's who may write to the watched tree: one holding a line
    break forged a line in the --reload parent's log (local-attacker check 2, F6)."""
    with _reloading(tmp_path) as served:
        served.wait_for(LISTENING)
        (tmp_path / "z\nFORGED [CRITICAL] weft: all is well.py").write_text("")
        served.wait_for(r"reloading: .*changed")
        served.signal(signal.SIGTERM)
        assert served.finish() == 0, served.text
    assert r"z\nFORGED [CRITICAL]" in served.text, served.text
    assert not any(line.startswith("FORGED") for line in served.text.splitlines())


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="os.walk stopped recursing in 3.12")
@pytest.mark.skipif(
    importlib.util.find_spec("watchfiles") is not None, reason="the polling watcher's case"
)
@pytest.mark.timeout(60)
def test_reload_says_when_it_can_no_longer_watch() -> None:
    """A tree too deep for os.walk (RecursionError, 1,100 directories down, which anyone
    who may write to it can make): the watching thread died with a traceback and the
    parent served on as if it still watched (local-attacker check 2, F6)."""
    # Not under pytest's own temporary directory, whose later clean-up (shutil.rmtree,
    # recursive too) a tree this deep would crash, in this run or a later one.
    folder = Path(tempfile.mkdtemp(prefix="weft-deep-"))
    deepest = folder
    try:
        for _ in range(1100):  # one by one: os.makedirs recurses too
            deepest = deepest / "d"
            deepest.mkdir()
        with _reloading(folder) as served:
            served.wait_for(LISTENING)
            served.wait_for(r"--reload: watching for changes failed \(RecursionError")
            served.signal(signal.SIGTERM)
            assert served.finish() == 0, served.text
        assert "Traceback" not in served.text
    finally:
        while deepest != folder:
            deepest.rmdir()
            deepest = deepest.parent
        shutil.rmtree(folder, ignore_errors=True)


def test_reload_finds_the_handlers_directory_without_changing_its_own_path(
    tmp_path: Path,
) -> None:
    """The --reload parent put the working directory first on its own sys.path to find
    the handler's directory, and a watchfiles.py another user left there was then
    imported by it, as root under --user (local-attacker check 2, F5)."""
    from weft_core._reload import source_root

    (tmp_path / "planted_app.py").write_text("")
    before = list(sys.path)
    assert source_root("planted_app:handle", tmp_path) == tmp_path
    assert sys.path == before


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("unix:///run/app.sock", "unix:/run/app.sock"),
        ("unix://app.sock", "unix:app.sock"),
        ("fd://3", "fd:3"),
        ("tcp://0.0.0.0:80", "0.0.0.0:80"),
    ],
)
def test_gunicorn_endpoint_urls(text: str, endpoint: str) -> None:
    from weft_core._endpoints import parse_endpoint

    assert str(parse_endpoint(text)) == endpoint


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "eighty", "environment variable PORT, key 'port': "),
        ("WEB_CONCURRENCY", "0", "environment variable WEB_CONCURRENCY, key 'workers': "),
    ],
)
def test_a_bad_platform_variable_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.setenv(name, value)
    assert main(["serve", "x:y", "--check-config"]) == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_a_port_that_replaces_a_bind_from_a_lower_source_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """weft.toml's bind = ["0.0.0.0:P"] and `--port Q`: the port alone replaced the
    bind, host and all, and weft listened on 127.0.0.1:Q without a word."""
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PORT", raising=False)
    (tmp_path / "weft.toml").write_text('bind = ["0.0.0.0:47240"]\n')
    assert main(["serve", "checked_app:handle", "--port", "47241", "--check-config"]) == 0
    err = capfd.readouterr().err
    assert 'command line --port replaces bind = ["0.0.0.0:47240"] from ' in err, err
    assert "to keep the bind's host, change the bind instead" in err


@pytest.mark.parametrize(
    ("name", "said"),
    [("WEFT_WORKER_CLASS", "ignoring WEFT_WORKER_CLASS: no weft setting has that name; did"
      " you mean WEFT_MANAGER?"),
     ("WEFT_HOST", "did you mean WEFT_ADDRESS (or WEFT_BIND)?"),
     ("WEFT_CMD_ARGS", "weft takes no command line from the environment"),
     ("GUNICORN_CMD_ARGS", "ignoring GUNICORN_CMD_ARGS: weft reads no other server's variables"),
     ("UVICORN_PORT", "ignoring UVICORN_PORT: weft reads no other server's variables")],
)  # fmt: skip
def test_another_servers_variables_are_named_for_what_they_mean(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    name: str,
    said: str,
) -> None:
    """WEFT_WORKER_CLASS was offered WEFT_WORKERS, WEFT_HOST WEFT_PORT, and
    WEFT_CMD_ARGS WEFT_ARGS (which passes the text to the handler): by spelling, not
    meaning; GUNICORN_CMD_ARGS and UVICORN_* were ignored without a word."""
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, "--workers 3")
    assert main(["serve", "checked_app:handle", "--check-config"]) == 0
    assert said in capfd.readouterr().err


def test_a_python_config_file_is_refused_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`-c gunicorn.conf.py` whose lines happened to parse as TOML was used silently."""
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gunicorn.conf.py").write_text('bind = "0.0.0.0:8000"\nworkers = 2\n')
    assert main(["serve", "checked_app:handle", "-c", "gunicorn.conf.py", "--check-config"]) == 2
    assert "weft's config file is TOML (weft.toml), not Python" in capfd.readouterr().err


def test_check_config_shows_what_weft_serve_uses_where_the_table_has_no_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """--check-config printed `manager = null`, `control_socket = null` and gevent's
    `max_blocking_time = null` where weft serve uses threads, a control socket path
    and 1 s; and log flags beside --log-config as in effect, though the file replaces
    them (the conventions check)."""
    from weft_core._ctl import default_path

    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "log.toml").write_text("version = 1\n[root]\nlevel = 'INFO'\nhandlers = []\n")
    argv = ["serve", "checked_app:handle", "--check-config", "--log-config", "log.toml",
            "--log-level", "warning"]  # fmt: skip
    assert main(argv) == 0
    out, err = capfd.readouterr()
    lines = dict(line.split(" = ", 1) for line in out.splitlines())
    assert lines["manager"] == '"threads"  # default'
    assert lines["control_socket"] == f'"{default_path()}"  # default'
    assert lines["log_level"].endswith("; not used: log_config says how to log")
    assert lines["log_format"].endswith("; not used: log_config says how to log")
    assert "log_level from command line --log-level is not used" in err


@pytest.mark.skipif(importlib.util.find_spec("weft_gevent") is None, reason="needs weft-gevent")
def test_check_config_lists_gevents_serve_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """weft serve reports a hub blocked for 1 s and patches (the plugin's README);
    --check-config said max_blocking_time = null."""
    write_module(tmp_path, "checked_app", "def handle(conn): pass\n")
    monkeypatch.chdir(tmp_path)
    code = subprocess_check_config(tmp_path, "--manager", "gevent")
    assert "manager_options.max_blocking_time = 1.0  # default (gevent, weft serve)" in code
    assert "manager_options.patch = true  # default (gevent, weft serve)" in code


def subprocess_check_config(folder: Path, *args: str) -> str:
    """``weft serve checked_app:handle --check-config ARGS`` in a process of its own
    (gevent's preparation patches the process); its standard output."""
    import subprocess

    result = subprocess.run(
        weft_serve("checked_app:handle", "--check-config", *args),
        cwd=folder,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
