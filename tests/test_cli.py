"""The ``weft`` command: serve, managers, conformance, and one-line errors for user mistakes.

Most tests call ``main()`` in-process with a fake Server, so that signals, fatal
errors and exit statuses are checked without sockets. The end-to-end tests at the
bottom (``test_e2e_*``) run ``python -m weft_core serve`` against the real Server.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _serving import Served, environment, weft_serve

import weft_core
from weft_core import BindError, PluginError, ServerError, UnknownManagerError, _registry
from weft_core._cli import HandlerImportError, import_handler, main
from weft_core._spec import ManagerSpec
from weft_core.testing._support import wait_until

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Run in an empty directory with no WEFT_* variables, no patching; undo logging/sys.path."""
    for name in list(os.environ):
        if name.startswith("WEFT_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # main() in-process must not monkey-patch the test process (gevent's patch_all).
    monkeypatch.setattr("weft_core._cli._prepare_process", lambda config: None)
    weft_log = logging.getLogger("weft")
    level = weft_log.level
    yield
    weft_log.setLevel(level)


def write_module(tmp_path: Path, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))


def one_error_line(err: str) -> str:
    """The whole of stderr, which must be a single 'weft: ...' line with no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("weft: "), err
    return lines[0]


# -- top level ------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"weft {weft_core.__version__}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_serve_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--manager", "--bind", "--fd", "--max-connections",
                 "--graceful-timeout", "--workers", "--proxy-protocol", "--log-level",
                 "--idle-timeout", "--on-full", "--full-wait", "--manager-option"):  # fmt: skip
        assert flag in out


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weft_core", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"weft {weft_core.__version__}"


# -- serve: mistakes before anything runs --------------------------------------------------------


def test_bad_flag_value_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "x:y", "--max-connections", "0"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        "weft: command line --max-connections, key 'max_connections': "
        "expected a positive integer, or false for no limit, got 0"
    )  # the text is read as a number first, so the message is Server(max_connections=0)'s


def test_bad_bind_names_the_forms(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "x:y", "--bind", "::1:80"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "command line --bind" in line
    assert "as in [::1]:80" in line


def test_config_file_error_names_file_and_closest_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "weft.toml").write_text("max_conections = 5\n")
    assert main(["serve", "x:y"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "weft.toml") in line
    assert "did you mean 'max_connections'?" in line


def test_unknown_env_var_is_a_warning_naming_the_closest(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Environments are shared: an unknown WEFT_* name is warned about, and weft goes on
    # (here as far as importing the handler, which does not exist).
    monkeypatch.setenv("WEFT_MANAGR", "threads")
    with caplog.at_level(logging.WARNING, logger="weft"):
        assert main(["serve", "x:y"]) == 2
    assert "cannot import handler 'x:y'" in one_error_line(capsys.readouterr().err)
    assert "ignoring WEFT_MANAGR: no weft setting has that name; did you mean WEFT_MANAGER?" in (
        caplog.text
    )


def test_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "x:y", "--config", "nope.toml"]) == 2
    assert "config file not found" in one_error_line(capsys.readouterr().err)


def test_no_handler(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    assert "no handler" in one_error_line(capsys.readouterr().err)


def test_handler_in_wrong_form(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "examples.echo"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("weft: command line HANDLER, key 'handler': expected a handler as")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-o", "no-equals"], "weft: command line -o/--manager-option: expected KEY=VALUE, such as limit=100, got 'no-equals'"),
        (["-o", "=3"], "weft: command line -o/--manager-option: expected KEY=VALUE, such as limit=100, got '=3'"),
        (["--fd", "x"], "weft: command line --fd: expected a file descriptor number, got 'x'"),
        (["--fd", "3\x1b[2J"], "weft: command line --fd: expected a file descriptor number, got '3\\x1b[2J'"),
    ],
)  # fmt: skip
def test_a_bad_manager_option_or_fd_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    """One line naming the flag, as for every other flag, not argparse's usage; exit 2."""
    assert main(["serve", "x:y", *argv]) == 2
    assert one_error_line(capsys.readouterr().err) == expected


# -- handler import ---------------------------------------------------------------------------


def test_import_handler_finds_modules_in_the_cwd(tmp_path: Path) -> None:
    write_module(tmp_path, "cli_app_ok", "class Box:\n    def handle(self, conn): pass\n"
                 "box = Box()\n")  # fmt: skip
    assert sys.path.count(str(tmp_path)) == 0
    handler = import_handler("cli_app_ok:box.handle")
    assert handler.__name__ == "handle"
    assert sys.path[0] == str(tmp_path)


@pytest.mark.parametrize(
    ("module", "spec", "expected"),
    [
        (None, "cli_no_such_module:handle",
         "weft: cannot import handler 'cli_no_such_module:handle': ModuleNotFoundError: "
         "No module named 'cli_no_such_module'"),
        ("def handle(conn): pass\n", "cli_app_attr:hndle",
         "weft: cannot import handler 'cli_app_attr:hndle': AttributeError: module "
         "'cli_app_attr' has no attribute 'hndle'; did you mean 'handle'?"),
        ("handle = 5\n", "cli_app_value:handle",
         "weft: handler 'cli_app_value:handle' is a int, not a function or other callable"),
        ("raise RuntimeError('boom at import')\n", "cli_app_raises:handle",
         "weft: cannot import handler 'cli_app_raises:handle': RuntimeError: boom at import"),
        ("import cli_missing_dependency\n", "cli_app_dep:handle",
         "weft: cannot import handler 'cli_app_dep:handle': ModuleNotFoundError: "
         "No module named 'cli_missing_dependency'"),
        # A line break in the module's own message split the one line in two (the
        # systemd check's F9: under journald, two entries).
        ("raise RuntimeError('broken\\nsecond line [ERROR] injected')\n", "cli_app_lines:handle",
         "weft: cannot import handler 'cli_app_lines:handle': RuntimeError: "
         "broken\\nsecond line [ERROR] injected"),
    ],
)  # fmt: skip
def test_handler_import_errors_are_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    module: str | None,
    spec: str,
    expected: str,
) -> None:
    if module is not None:
        write_module(tmp_path, spec.partition(":")[0], module)
    assert main(["serve", spec]) == 2
    assert one_error_line(capsys.readouterr().err) == expected


def test_handler_syntax_error_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_module(tmp_path, "cli_app_syntax", "def handle(conn):\n    return (\n")
    with pytest.raises(HandlerImportError, match=r"SyntaxError: .*cli_app_syntax\.py"):
        import_handler("cli_app_syntax:handle")


# -- serve: running, with a fake Server -------------------------------------------------------


@dataclass
class FakeServer:
    """Stands in for weft_core.Server: records calls; behaviour set per test."""

    handler: Any
    kwargs: dict[str, Any]
    signal_on_run: int | None = None
    signal_in_thread: int | None = None
    run_error: BaseException | None = None
    fatal: ServerError | None = None
    clean_stop: bool = True
    left_behind: int = 0
    stopped_with: float | None = None
    ended: threading.Event = field(default_factory=threading.Event)

    addresses = ["127.0.0.1:5000", "[::1]:5000"]
    manager_name = "fake"

    @property
    def error(self) -> ServerError | None:
        return self.fatal

    def run(self) -> None:
        if self.run_error is not None:
            raise self.run_error
        if self.signal_on_run is not None:
            # The CLI installs its handlers before run(), so this is caught, not fatal.
            os.kill(os.getpid(), self.signal_on_run)
        if self.signal_in_thread is not None:
            threading.Thread(target=self._signal_in_thread, args=(self.signal_in_thread,)).start()

    @staticmethod
    def _signal_in_thread(signum: int) -> None:
        """Once the main thread sleeps in the CLI's wait, catch ``signum`` in this thread."""
        main_thread = threading.main_thread().ident
        assert main_thread is not None

        def main_waits() -> bool:
            frame = sys._current_frames().get(main_thread)
            return frame is not None and frame.f_code.co_name in ("wait", "select")

        wait_until(main_waits)
        # This thread's sleep lets the main thread run on, from the Python frame seen
        # into the blocking call itself, where a signal caught here can no longer reach it.
        time.sleep(0.1)
        signal.pthread_kill(threading.get_ident(), signum)

    def wait(self, timeout: float | None = None) -> bool:
        # Without a fatal error, serving ends only when stop() is called (on a signal).
        return self.fatal is not None or self.ended.wait(timeout)

    def stop(self, timeout: float | None = None) -> bool:
        self.stopped_with = timeout
        self.ended.set()
        return self.clean_stop

    def stats(self) -> dict[str, int]:
        return {"left_behind": self.left_behind}


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """Replace Server with FakeServer; the dict sets its behaviour and collects instances."""
    behaviour: dict[str, Any] = {"made": []}
    write_module(tmp_path, "cli_fake_app", "def handle(conn): pass\n")

    def make(handler: Any, **kwargs: Any) -> FakeServer:
        if "error" in behaviour:
            raise behaviour["error"]
        server = FakeServer(handler, kwargs, **{k: v for k, v in behaviour.items()
                                                if k not in ("made", "error")})  # fmt: skip
        behaviour["made"].append(server)
        return server

    monkeypatch.setattr("weft_core._server.Server", make)
    return behaviour


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "control", [signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN], ids=["HUP", "USR2", "TTIN"]
)
def test_a_stop_wins_over_a_control_signal_read_with_it(
    fake_server: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    control: int,
) -> None:
    """A HUP and a TERM in one batch of the wakeup, the HUP first (Python runs pending
    handlers in signal number order): the stop is taken and no hand-over begins. The
    HUP was acted on first, and the hand-over made the TERM's batch the old loop's,
    unread: the process served on as a supervisor. The signals' own timing hits that
    order about once in ten (an outside check of the tests), so the batch is placed."""
    from weft_core import _supervise
    from weft_core._wakeup import Wakeup

    handed: list[int] = []
    monkeypatch.setattr(_supervise, "hand_over", lambda _s, _c, _f, signum, *_a, **_k:
                        handed.append(signum) or 99)  # fmt: skip
    real_wait = Wakeup.wait
    batches = [[control, signal.SIGTERM]]

    def wait(self: Wakeup, timeout: float | None, also: Any = ()) -> list[int]:
        return batches.pop() if batches else real_wait(self, timeout, also)

    monkeypatch.setattr(Wakeup, "wait", wait)
    caplog.set_level(logging.INFO, logger="weft")
    assert main(["serve", "cli_fake_app:handle", "--graceful-timeout", "7"]) == 0
    assert handed == []
    (server,) = fake_server["made"]
    assert server.stopped_with == 7.0
    messages = [r.getMessage() for r in caplog.records if r.name == "weft"]
    assert any(m.startswith("received SIGTERM: stopping") for m in messages), messages


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_and_exits_0(
    fake_server: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    signum: int,
) -> None:
    fake_server["signal_on_run"] = signum
    caplog.set_level(logging.INFO, logger="weft")
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert main(["serve", "cli_fake_app:handle", "--graceful-timeout", "7"]) == 0
    (server,) = fake_server["made"]
    assert server.stopped_with == 7.0
    messages = [r.getMessage() for r in caplog.records if r.name == "weft"]
    assert messages[:2] == [
        "listening on 127.0.0.1:5000 (manager fake)",
        "listening on [::1]:5000 (manager fake)",
    ]
    assert messages[2].startswith(f"received {signal.Signals(signum).name}: stopping")
    assert messages[3] == "stopped"
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.timeout(20)
def test_signal_caught_by_another_thread_stops_at_once(
    fake_server: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel may hand SIGTERM to any thread; the sleeping main thread still wakes.

    With the backstop wake-up an hour away, only the wakeup socket can end the wait.
    """
    monkeypatch.setattr("weft_core._cli._WAKE_INTERVAL", 3600.0)
    fake_server["signal_in_thread"] = signal.SIGTERM
    caplog.set_level(logging.INFO, logger="weft")
    assert main(["serve", "cli_fake_app:handle"]) == 0
    assert fake_server["made"][0].stopped_with == 30.0
    assert "received SIGTERM: stopping" in caplog.text


@pytest.mark.timeout(20)
def test_cut_off_connections_are_reported(
    fake_server: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    fake_server.update(signal_on_run=signal.SIGTERM, clean_stop=False)
    caplog.set_level(logging.INFO, logger="weft")
    assert main(["serve", "cli_fake_app:handle"]) == 0
    assert fake_server["made"][0].stopped_with == 30.0
    assert "connections still open after 30s had to be cut off" in caplog.text


def test_tasks_left_behind_exit_4(
    fake_server: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    fake_server.update(signal_on_run=signal.SIGTERM, clean_stop=False, left_behind=3)
    caplog.set_level(logging.INFO, logger="weft")
    assert main(["serve", "cli_fake_app:handle"]) == 4
    assert "3 task(s) ignored it and are abandoned (exit status 4)" in caplog.text


@pytest.mark.timeout(20)
def test_fatal_server_error_exits_1(
    fake_server: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server["fatal"] = ServerError("accepting on 127.0.0.1:5000 failed: Bad file descriptor")
    assert main(["serve", "cli_fake_app:handle"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "weft: server stopped: accepting on 127.0.0.1:5000 failed: Bad file descriptor"
    )


def test_bind_error_from_run_exits_1(
    fake_server: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_server["run_error"] = BindError(98, "cannot listen on 127.0.0.1:80: Address in use")
    assert main(["serve", "cli_fake_app:handle"]) == 1
    assert "cannot listen on 127.0.0.1:80" in one_error_line(capsys.readouterr().err)


def test_server_refusing_its_settings_exits_2(
    fake_server: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # An installed name: an unknown one is refused before the Server is made (and the
    # application imported); a Server may still refuse it (a plugin broken since).
    fake_server["error"] = UnknownManagerError("no task manager named 'nope' is installed")
    assert main(["serve", "cli_fake_app:handle", "--manager", "threads"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "weft: command line --manager, key 'manager': no task manager named 'nope' is installed"
    )


@pytest.mark.timeout(20)
def test_flags_reach_the_server(fake_server: dict[str, Any], tmp_path: Path) -> None:
    fake_server["signal_on_run"] = signal.SIGTERM
    (tmp_path / "weft.toml").write_text('manager = "threads"\nbacklog = 64\n')
    argv = ["serve", "cli_fake_app:handle", "--manager", "gevent", "--bind", "[::1]:0",
            "--fd", "3", "--max-connections", "none", "--proxy-protocol", "-o", "limit=5",
            "-o", "patch=false", "--idle-timeout", "9", "--on-full", "backlog"]  # fmt: skip
    assert main(argv) == 0
    (server,) = fake_server["made"]
    assert server.handler.__name__ == "handle"
    assert server.kwargs == {
        "manager": "gevent",
        "backlog": 64,
        "bind": ["[::1]:0", "fd:3"],
        "max_connections": None,
        "proxy_protocol": True,
        "manager_options": {"limit": 5, "patch": False},
        "idle_timeout": 9.0,
        "on_full": "backlog",
    }


# -- managers -----------------------------------------------------------------------------------


@dataclass
class FakeBroken:
    name: str
    distribution: str | None
    version: str | None
    error: str


def _never_made(**options: Any) -> Any:
    raise AssertionError("the CLI must not make managers to list them")


def _spec(name: str, kind: Any, dist: str | None) -> ManagerSpec:
    spec = ManagerSpec(name, _never_made, f"the {name} manager", kind)
    object.__setattr__(spec, "distribution", dist)
    object.__setattr__(spec, "version", "1.2" if dist else None)
    return spec


def test_managers_prints_a_table_then_broken_plugins(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = {"zeta": _spec("zeta", "async", "weft-zeta"), "alpha": _spec("alpha", "sync", None)}
    broken = [FakeBroken("bad", "weft-bad", "0.1", "ImportError: no module named bad_impl")]
    monkeypatch.setattr(_registry, "available_managers", lambda: specs)
    monkeypatch.setattr(_registry, "broken_plugins", lambda: broken)
    assert main(["managers"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "NAME   DISTRIBUTION  VERSION  KIND   DESCRIPTION",
        "alpha  -             -        sync   the alpha manager",
        "zeta   weft-zeta     1.2      async  the zeta manager",
        "",
        "broken plugins (not loaded):",
        "  bad (weft-bad 0.1): ImportError: no module named bad_impl",
    ]


@pytest.mark.parametrize("selection", ["", "threads"])
def test_managers_says_what_weft_load_plugins_leaves_out(selection: str) -> None:
    """``WEFT_LOAD_PLUGINS=`` (empty) loads no plugin: ``weft managers`` said "no task
    managers installed: pip install weft-threads ...", with all four installed (the docs
    check's D13). It now names the variable and what it leaves out."""
    if "threads" not in weft_core.available_managers():
        pytest.skip("weft-threads is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "weft_core", "managers"],
        env={**environment(), "WEFT_LOAD_PLUGINS": selection},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "installed" not in done.stdout
    assert f"WEFT_LOAD_PLUGINS={selection!r} leaves out " in done.stdout
    left = done.stdout.split("leaves out", 1)[1]
    assert ("plugin 'threads'" in left) is (selection == ""), done.stdout
    if selection:
        assert done.stdout.startswith("NAME ")
        assert "\nthreads " in done.stdout
    else:
        assert done.stdout.startswith("no task managers loaded: ")


def test_managers_escapes_a_broken_plugins_own_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken plugin's import error is its author's text: an ESC sequence or a line
    break in it must not reach the terminal raw (seen: a raw ESC byte)."""
    hostile = "ImportError: \x1b[2J\nalpha  -  -  sync  a fake row"
    monkeypatch.setattr(_registry, "available_managers", dict)
    monkeypatch.setattr(
        _registry, "broken_plugins", lambda: [FakeBroken("bad", None, None, hostile)]
    )
    assert main(["managers"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\nalpha" not in out, out
    assert "bad: ImportError: \\x1b[2J\\nalpha" in out, out


def test_managers_with_nothing_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_registry, "available_managers", dict)
    monkeypatch.setattr(_registry, "broken_plugins", list)
    assert main(["managers"]) == 0
    out = capsys.readouterr().out
    assert "pip install weft-threads (or weft-gevent, weft-trio, weft-asyncio)" in out


def test_managers_registry_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def clash() -> dict[str, ManagerSpec]:
        raise PluginError("manager 'x' is claimed by weft-a and weft-b")

    monkeypatch.setattr(_registry, "available_managers", clash)
    assert main(["managers"]) == 1
    assert "claimed by weft-a and weft-b" in one_error_line(capsys.readouterr().err)


def test_managers_lists_the_installed_threads_manager(capsys: pytest.CaptureFixture[str]) -> None:
    if "threads" not in _registry.available_managers():
        pytest.skip("weft-threads is not installed")
    assert main(["managers"]) == 0
    assert re.search(r"^threads\s+weft-threads\s", capsys.readouterr().out, re.MULTILINE)


# -- conformance ---------------------------------------------------------------------------------


def test_conformance_runs_the_suite_with_extra_pytest_args(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(_registry, "get_manager_spec", lambda name: _spec("mine", "sync", None))

    def fake_pytest_main(args: list[str]) -> int:
        calls.append(args)
        return 3

    monkeypatch.setattr(pytest, "main", fake_pytest_main)
    assert main(["conformance", "mine", "-x", "-k", "stop"]) == 3
    ((config, home, cut, suite),) = [(a[1], a[3], a[5], a[10]) for a in calls]
    suite_dir = Path(weft_core.__file__).parent / "testing"
    # The run's own empty config, in a directory of its own: none of the caller's.
    assert Path(config).name == "pytest.ini" and Path(config).parent == Path(home)
    assert cut == str(suite_dir) and suite == str(suite_dir / "suite.py")
    # A leaked socket fails; skip reasons are listed; the caller's arguments come last,
    # so that a -W of theirs wins over ours.
    assert calls == [["-c", config, "--rootdir", home, "--confcutdir", cut,
                      "-p", "no:cacheprovider", "-p", "weft_core.testing.plugin", suite,
                      "--weft-manager", "mine",
                      "-W", "error::ResourceWarning",
                      "-W", "error::pytest.PytestUnraisableExceptionWarning",
                      "-rs", "-x", "-k", "stop"]]  # fmt: skip


def test_conformance_runs_alike_in_a_project_with_its_own_pytest_config(tmp_path: Path) -> None:
    """Seen (packaging probe F7): typed inside a project whose pytest config adds
    options the run lacks (``addopts = "-n auto"``), or inside weft's own checkout,
    ``weft conformance threads`` ran no test (exit 4); elsewhere it passed. Neither
    that config nor the project's conftest.py reaches the run now, and it caches
    nothing there."""
    if "threads" not in _registry.available_managers():
        pytest.skip("weft-threads is not installed")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\naddopts = "-n auto --no-such-flag"\n'
    )
    (tmp_path / "conftest.py").write_text('raise RuntimeError("the project conftest ran")\n')
    done = subprocess.run(
        [sys.executable, "-m", "weft_core", "conformance", "threads", "-q",
         "-p", "no:randomly", "-k", "test_ids_are_unique"],
        cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conftest.py", "pyproject.toml"]


def test_conformance_without_a_name_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    """Seen (F9): "the following arguments are required: NAME, PYTEST_ARGS", the
    pytest arguments being optional."""
    assert main(["conformance"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "name the installed manager to test" in line
    assert "required" not in line


def test_conformance_unknown_manager(capsys: pytest.CaptureFixture[str]) -> None:
    """The registry's own message: what is installed, a near name (not the typo to install)."""
    assert main(["conformance", "thread"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("weft: no task manager named 'thread' is installed (installed: ")
    assert "did you mean 'threads'?" in line
    assert "pip install" not in line
    assert line.endswith("; see `weft managers`")


def test_conformance_takes_a_managers_name_as_serve_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``weft conformance THREADS`` runs the suite on ``threads``, as ``--manager THREADS`` serves."""
    calls: list[list[str]] = []
    monkeypatch.setattr(pytest, "main", lambda args: calls.append(args) or 0)
    assert main(["conformance", "THREADS"]) == 0
    assert calls[0][calls[0].index("--weft-manager") + 1] == "threads"


def test_conformance_without_pytest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "pytest" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert main(["conformance", "threads"]) == 2
    assert "pip install 'weft-core[testing]'" in one_error_line(capsys.readouterr().err)


def test_conformance_without_pytest_timeout_warns_that_a_hang_hangs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seen (F6): without pytest-timeout the run had no per-test timeout, silently."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "pytest_timeout" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(_registry, "get_manager_spec", lambda name: _spec("mine", "sync", None))
    monkeypatch.setattr(pytest, "main", lambda args: 0)
    assert main(["conformance", "mine"]) == 0
    err = capsys.readouterr().err
    assert "pytest-timeout is not installed" in err
    assert "pip install 'weft-core[testing]'" in err


# -- end to end: `python -m weft_core serve` against the real Server ------------------------------
# These need the lead's weft_core.Server, examples/echo.py and the threads manager; each
# waits for the "listening on" line on stderr, never on a sleep.

LISTENING = re.compile(r"listening on (\S+) \(manager (\S+)\)")


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEFT_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def e2e() -> None:
    if not callable(getattr(weft_core.Server, "run", None)):
        pytest.skip("weft_core.Server is not written yet")
    if not (REPO / "examples" / "echo.py").exists():
        pytest.skip("examples/echo.py is not written yet")
    if "threads" not in _registry.available_managers():
        pytest.skip("weft-threads is not installed")


def serve(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "weft_core", "serve", *args],
        cwd=cwd,
        env=_subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_listening(proc: subprocess.Popen[str], count: int = 1) -> list[tuple[str, str]]:
    """Read stderr up to the `count`-th listening line; (address, manager) of each."""
    assert proc.stderr is not None
    found: list[tuple[str, str]] = []
    seen: list[str] = []
    while len(found) < count:
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            pytest.fail(
                f"weft serve exited ({proc.returncode}) before listening:\n{''.join(seen)}"
            )
        seen.append(line)
        if match := LISTENING.search(line):
            found.append((match.group(1), match.group(2)))
    return found


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_e2e_serve_echo_then_stop_on_signal(e2e: None, tmp_path: Path, signum: int) -> None:
    proc = serve("examples.echo:handle", "--bind", "127.0.0.1:0", cwd=tmp_path)
    try:
        ((address, manager),) = wait_listening(proc)
        assert manager == "threads"
        with socket.create_connection(host_port(address), timeout=10) as client:
            client.sendall(b"hello weft\n")
            received = b""
            while len(received) < 11:
                chunk = client.recv(100)
                assert chunk, "the server closed the connection before echoing"
                received += chunk
            assert received == b"hello weft\n"
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"received {signal.Signals(signum).name}: stopping" in err
    assert "Traceback" not in err


@pytest.mark.timeout(60)
def test_e2e_ipv6_address_is_logged_in_brackets(e2e: None, tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not available")
    proc = serve("examples.echo:handle", "--bind", "[::1]:0", "--bind", "127.0.0.1:0",
                 cwd=tmp_path)  # fmt: skip
    try:
        addresses = sorted(a for a, _ in wait_listening(proc, 2))
        assert re.fullmatch(r"127\.0\.0\.1:\d+", addresses[0])
        assert re.fullmatch(r"\[::1\]:\d+", addresses[1])
        with socket.create_connection(host_port(addresses[1]), timeout=10) as client:
            client.sendall(b"v6")
            assert client.recv(10) == b"v6"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0


@pytest.mark.timeout(60)
def test_e2e_bind_error_is_one_line_exit_1(e2e: None, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "weft_core", "serve", "examples.echo:handle",
             "--bind", f"127.0.0.1:{port}"],
            cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"127.0.0.1:{port}" in line


@pytest.mark.timeout(60)
def test_e2e_handler_import_error_exit_2(e2e: None, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weft_core", "serve", "examples.echo:nope"],
        cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        "weft: cannot import handler 'examples.echo:nope': AttributeError: "
        "module 'examples.echo' has no attribute 'nope'"
    )


@pytest.mark.timeout(60)
def test_e2e_handler_that_cannot_take_the_args_exit_2(e2e: None, tmp_path: Path) -> None:
    """weft.toml's args given to a handler that takes none: exit 2 before anything binds."""
    (tmp_path / "weft.toml").write_text('args = ["hello"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "weft_core", "serve", "examples.echo:handle", "--bind", "127.0.0.1:0"],
        cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "key 'args'" in line and "with args=('hello',)" in line, line
    assert "listening" not in result.stderr


def test_a_command_that_does_not_serve_gives_the_held_signals_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m weft_core`` holds HUP, USR1 ... before loading weft (for ``serve``'s start);
    ``weft managers`` (any command that does not serve) gives them their defaults back,
    so that a HUP ends it as it ends any command. A second hold keeps the first's list.
    """
    import signal

    from weft_core._signals import STARTING_HELD, hold_while_starting

    held = (*STARTING_HELD, signal.SIGQUIT)
    before = {signum: signal.getsignal(signum) for signum in held}
    try:
        arrived = hold_while_starting()
        assert hold_while_starting() is arrived
        assert main(["managers"]) == 0
        capsys.readouterr()
        assert {signal.getsignal(signum) for signum in held} == {signal.SIG_DFL}
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args",
    [["serve", "examples.echo:handle", "--check-config"], ["managers"],
     ["ctl", "--socket", "SOCKET", "status"]],
    ids=["check-config", "managers", "ctl-status"],
)  # fmt: skip
def test_a_command_whose_reader_went_away_stops_quietly(tmp_path: Path, args: list[str]) -> None:
    """``weft ctl status | head -c 100``, ``weft managers | head -1``: the pipe's reader
    is gone when the command prints. No BrokenPipeError traceback (there was one, and
    exit 1 as for a refusal): one quiet exit, 1, as a tool killed by SIGPIPE fails."""
    import signal

    control = tmp_path / "ctl.sock"
    argv = [str(control) if a == "SOCKET" else a for a in args]
    served = None
    if args[0] == "ctl":
        served = Served(
            weft_serve("examples.echo:handle", "-b", "127.0.0.1:0", "--control-socket",
                       str(control)),
            cwd=REPO,
        )  # fmt: skip
        served.wait_for(r"listening on", timeout=30)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head) has gone
    try:
        result = subprocess.run(
            [sys.executable, "-m", "weft_core", *argv], cwd=REPO, env=environment(),
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30,
        )  # fmt: skip
    finally:
        os.close(write_end)
        if served is not None:
            served.signal(signal.SIGTERM)
            assert served.finish(30) == 0
            served.kill()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == "", result.stderr
    assert result.returncode == 1


# -- a migrating user's first mistakes (the config probe, session 24) ------------------------


@pytest.mark.parametrize(
    ("args", "meant"),
    [(["--access-logfile", "-"], "weft's is --access-log"),
     (["--max-conections", "5"], "did you mean --max-connections?"),
     (["--worker-connections=100"], "weft's is --max-connections"),
     # gunicorn's and uvicorn's own flags, which their spelling put near another of
     # weft's: --preload was offered --reload (a development auto-restart), --host
     # was offered --port, --loop --help, --umask --user.
     (["--preload"], "weft has no such flag: each worker imports the handler itself"),
     (["--host", "0.0.0.0"], "weft's is --address HOST (or --bind HOST:PORT)"),
     (["--loop", "uvloop"], "weft's is -k asyncio -o loop=uvloop"),
     (["--umask", "022"], "weft's is --unix-mode"),
     (["--limit-concurrency", "10"], "weft's is --max-connections"),
     (["-D"], "weft has no such flag: run it under a supervisor")],
)  # fmt: skip
def test_an_unknown_serve_flag_names_the_flag_meant(
    capfd: pytest.CaptureFixture[str], args: list[str], meant: str
) -> None:
    """argparse printed weft's top-level usage and 'unrecognized arguments'; now one line."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "app:handle", *args])
    assert exited.value.code == 2
    [line] = capfd.readouterr().err.strip().splitlines()
    assert line.startswith("weft: weft serve: unrecognized arguments:"), line
    assert meant in line
    assert "did you mean --reload" not in line and "did you mean --port" not in line


@pytest.mark.parametrize("flag", ["--no-config", "--no-conf", "--supervisor"])
def test_a_prefix_of_a_workers_own_flag_is_refused(
    capfd: pytest.CaptureFixture[str], flag: str
) -> None:
    """argparse took any prefix of a flag: `--no-config` was the hidden worker flag
    `--no-config-file`, accepted without a word, and ./weft.toml still read."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "app:handle", flag, "--check-config"])
    assert exited.value.code == 2
    [line] = capfd.readouterr().err.strip().splitlines()
    assert "unrecognized arguments" in line and "config-file" not in line, line
    assert "supervisor-fd" not in line, line


def test_a_command_line_mistake_is_one_json_line_under_log_format_json(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """deployment.md: under --log-format json every line weft writes is one JSON
    object. A mistake on the command line was argparse's usage block, in text."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "app:handle", "--log-format", "json", "--keepalive=yes"])
    assert exited.value.code == 2
    [line] = capfd.readouterr().err.strip().splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert "--keepalive" in record["message"], record


def test_gunicorns_sync_worker_points_at_threads() -> None:
    """`-k sync` (gunicorn's default) suggested 'asyncio', by its letters."""
    from weft_core import create_manager

    with pytest.raises(UnknownManagerError, match="gunicorn's 'sync' worker is weft's 'threads'"):
        create_manager("sync")


def test_a_bind_given_twice_is_not_blamed_on_another_process() -> None:
    """`-b 127.0.0.1:P -b localhost:P` said another process listened there: it was the
    server's own first bind. And the line began with '[Errno 98]' where the docs show
    'cannot listen on ...'."""
    from weft_core import BindError, Server

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = Server(lambda conn: None, bind=[f"127.0.0.1:{port}", f"localhost:{port}"])
    with pytest.raises(BindError) as info:
        server.run()
    text = str(info.value)
    assert text.startswith(f"cannot listen on 127.0.0.1:{port}: Address already in use"), text
    assert "another of this server's binds already listens there" in text
    assert info.value.errno == errno.EADDRINUSE


@pytest.mark.parametrize(
    ("flag", "made", "said"),
    [("--certfile", "directory", "a directory, not a file"),
     ("--certfile", "fifo", "not a regular file (a pipe or a device?)"),
     ("--log-config", "lc.yaml", "YAML is not read"),
     ("--log-config", "lc.ini", "File contains no section headers. file:")],
)  # fmt: skip
def test_a_wrong_file_is_one_line_saying_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, made: str, said: str
) -> None:
    """A certfile that was a directory said 'no such file'; a YAML log config was read as
    INI, its error three lines long (the config probe's F14)."""
    path = tmp_path / made
    if made == "directory":
        path.mkdir()
    elif made == "fifo":  # it was "no such file" (a FIFO, /dev/zero: the TLS probe's F5)
        os.mkfifo(path)
    else:
        path.write_text("version: 1\nroot:\n  level: INFO\n")
    extra = ["--keyfile", str(path)] if flag == "--certfile" else []
    assert main(["serve", "app:handle", flag, str(path), *extra, "--control-socket", "off"]) == 2
    assert said in one_error_line(capsys.readouterr().err)
