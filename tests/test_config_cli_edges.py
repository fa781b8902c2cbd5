"""Config and the command line at their edges, as an operator types them.

Each test runs ``python -m weft_core serve`` (or ``conformance``) for real, loopback
only and bounded by a subprocess timeout, and asserts a promise of DESIGN.md section
5, the README or docs/deployment.md, or what any serious server does: one clear
line, exit 2 for a mistake in the config and found by ``--check-config`` too, the
source of the mistake named, nothing bound, nothing a user typed echoed raw to a
terminal. From an outside check on 2026-12-05; each failed then.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest
from _serving import OUR_MANAGERS, Served, environment, free_port, handler_for, weft_serve

from weft_core import available_managers

#: Longest path a Unix socket address holds on Linux (sun_path is 108 bytes, NUL included).
SUN_PATH = 108


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full = quiet_environment()
    full.update(env or {})
    return subprocess.run(
        weft_serve(*args),
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def quiet_environment() -> dict[str, str]:
    """environment(), with no control socket: /run/weft/ctl.sock is shared by every
    weft serve run as root on this machine."""
    return {**environment(), "WEFT_CONTROL_SOCKET": "off"}


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.connect(("127.0.0.1", port))
        except OSError:
            return True
    return False


def listens(served: Served) -> bool:
    """Whether ``served`` gets as far as listening; False if its start failed."""
    try:
        served.wait_for(r"listening on", timeout=20)
    except AssertionError:
        return False
    return True


def weft_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "weft" in line]


# -- 1. a Unix socket path too long for sun_path --------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", OUR_MANAGERS)
def test_unix_bind_path_too_long_says_why(tmp_path: Path, manager: str) -> None:
    """A unix: endpoint longer than sun_path must be refused with its reason.

    The control socket path got "the control socket path is too long: N bytes";
    the listening socket path got "[Errno None] cannot listen on unix:...: None",
    exit 1 (boot failure) rather than 2 (a mistake in the config).
    """
    path = tmp_path / ("s" * (SUN_PATH + 20))
    result = run(handler_for(manager), "-k", manager, "-b", f"unix:{path}")
    lines = weft_lines(result.stderr)
    assert lines, result.stderr
    assert "None" not in lines[-1], f"no reason given: {lines[-1]!r}"
    assert "too long" in lines[-1], lines[-1]
    assert result.returncode == 2, (result.returncode, lines[-1])
    assert not path.exists()


# -- 2. the same endpoint twice ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", OUR_MANAGERS)
def test_duplicate_bind_is_a_config_mistake_not_another_process(manager: str) -> None:
    """`-b A -b A` is one operator's typo: exit 2 naming it, and --check-config says so.

    It was: --check-config exited 0, and serving exited 1 with "Address already in
    use; another process is listening there: stop it or pick another port", blaming
    a process that does not exist.
    """
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    check = run(
        handler_for(manager), "-k", manager, "-b", endpoint, "-b", endpoint, "--check-config"
    )
    served = run(handler_for(manager), "-k", manager, "-b", endpoint, "-b", endpoint)
    assert port_is_free(port)
    last = weft_lines(served.stderr)[-1]
    assert "another process" not in last, last
    assert served.returncode == 2, (served.returncode, last)
    assert check.returncode == 2, check.stderr[-400:]


# -- 3. control characters a user typed, echoed raw -------------------------------------------


@pytest.mark.timeout(60)
def test_unix_bind_path_with_escape_is_not_echoed_raw(tmp_path: Path) -> None:
    """Every other bad value is shown with repr() ('\\x1b'); a failing unix: path was not."""
    path = f"{tmp_path}/no\x1b[2J\x1b[31mdir/app.sock"
    result = run("_serving:handle", "-b", f"unix:{path}")
    assert result.returncode != 0
    assert "\x1b" not in result.stderr, repr(weft_lines(result.stderr)[-1])


@pytest.mark.timeout(60)
def test_unknown_weft_variable_name_with_escape_is_not_echoed_raw() -> None:
    """The warning for an unknown WEFT_* variable printed its name raw."""
    result = run("_serving:handle", "--check-config", env={"WEFT_BACK\x1b[2J\x1b[31mLOG": "1"})
    warning = [line for line in result.stderr.splitlines() if "ignoring" in line]
    assert warning, result.stderr[-400:]
    assert "\x1b" not in warning[0], repr(warning[0])


# -- 4. manager options -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["1", "0"])
@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_gevent_patch_takes_the_1_and_0_its_message_offers(
    tmp_path: Path, value: str, source: str
) -> None:
    """gevent's own error says "patch is true or false (or yes/no, on/off, 1/0)", yet
    `-o patch=0` (and WEFT_MANAGER_OPTIONS_PATCH=0, `patch = 0` in weft.toml) is refused
    with exactly that message: the value is read as TOML, an int, and only the
    *string* "0" was taken."""
    args = ["_serving:handle", "-k", "gevent", "--check-config"]
    env: dict[str, str] = {}
    if source == "flag":
        args += ["-o", f"patch={value}"]
    elif source == "env":
        env["WEFT_MANAGER_OPTIONS_PATCH"] = value
    else:
        config = tmp_path / "weft.toml"
        config.write_text(f"[manager_options]\npatch = {value}\n")
        args += ["-c", str(config)]
    result = run(*args, env=env)
    assert result.returncode == 0, weft_lines(result.stderr)[-1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["flag", "file"])
@pytest.mark.parametrize("manager", OUR_MANAGERS)
def test_a_misspelt_manager_option_names_the_closest(
    tmp_path: Path, manager: str, source: str
) -> None:
    """DESIGN 5: an unknown key names the closest valid key. threads, gevent and trio
    say "did you mean 'limit' for 'limt'?"; asyncio said "TypeError:
    AsyncioManager.__init__() got an unexpected keyword argument 'limt'"."""
    args = [handler_for(manager), "-k", manager, "--check-config"]
    if source == "flag":
        args += ["-o", "limt=3"]
    else:
        config = tmp_path / "weft.toml"
        config.write_text("[manager_options]\nlimt = 3\n")
        args += ["-c", str(config)]
    result = run(*args)
    assert result.returncode == 2
    last = weft_lines(result.stderr)[-1]
    assert "did you mean 'limit'" in last, last
    assert "__init__()" not in last, last


# -- 5. --user given as a number with no passwd entry ------------------------------------------


def _unknown_uid() -> str:
    import pwd

    taken = {entry.pw_uid for entry in pwd.getpwall()}
    return str(next(uid for uid in range(42420, 42520) if uid not in taken))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", OUR_MANAGERS)
def test_numeric_user_without_passwd_entry_is_not_a_traceback(
    tmp_path: Path, manager: str
) -> None:
    """`-u 42420` (a uid with no passwd entry, common in containers) passes the
    settings table (names were looked up there, numbers were not), so it passed
    --check-config, the socket was bound, and then drop_privileges' pwd.getpwuid()
    raised KeyError: a Python traceback, exit 1, and the unix socket file left
    behind. Now: a one-line error, exit 2, before anything is bound (weft takes the
    groups to switch to from the passwd entry)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    sock = tmp_path / "app.sock"
    with Served(
        weft_serve(
            handler_for(manager), "-k", manager, "-b", f"unix:{sock}", "-u", _unknown_uid()
        ),
        cwd=tmp_path,
        env=quiet_environment(),
    ) as served:
        if not listens(served):
            status = served.finish(10)
            assert "Traceback" not in served.text, served.text[-600:]
            assert status == 2, (status, served.text[-400:])
            assert not sock.exists(), "a failed start left its unix socket file behind"
            return
        served.signal(signal.SIGTERM)
        assert served.finish(20) == 0


@pytest.mark.timeout(60)
def test_numeric_user_without_passwd_entry_under_workers_does_not_crash_loop(
    tmp_path: Path,
) -> None:
    """Under --workers the same `-u 42420` made each worker die at once with a
    traceback (exit 1), and the supervisor replaced them for ever ("worker N exited
    with 1 after 0.4s; starting another"): the config mistake never stopped."""
    import os

    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    port = free_port()
    with Served(
        weft_serve("_serving:handle", "-w", "2", "-b", f"127.0.0.1:{port}", "-u", _unknown_uid()),
        cwd=tmp_path,
        env=quiet_environment(),
    ) as served:
        try:
            served.wait_for(r"worker ready on", count=2, timeout=20)
        except AssertionError:
            # Its stderr closed: it exits (waited for, not polled: it may not have yet).
            status = served.finish(10)
            assert "Traceback" not in served.text, served.text[-600:]
            assert "starting another" not in served.text, served.text[-600:]
            assert status == 2, f"exit {status}: {served.text[-600:]}"
            return
        served.signal(signal.SIGTERM)
        assert served.finish(40) == 0


# -- 6. --check-config passes what serve refuses; a mistake that does not name its source ----

TOO_MANY = "1000000"  # a million workers: beyond the memory of any test machine


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["flag", "env", "WEB_CONCURRENCY", "file"])
def test_too_many_workers_is_refused_by_check_config_too_and_names_its_source(
    tmp_path: Path, source: str
) -> None:
    """docs/deployment.md: exit 2 is "a mistake in the command, the config ...
    (--check-config exits 2 for the same mistakes)". Serving with a million workers
    exits 2 with "key 'workers': 1,000,000 workers need about ... MiB"; --check-config
    exited 0 for it, and serve's message named no file, variable or flag."""
    args = ["_serving:handle", "-b", "127.0.0.1:0"]
    env: dict[str, str] = {}
    if source == "flag":
        args += ["-w", TOO_MANY]
        named = "command line --workers"  # not the advice "use --workers 986 or fewer"
    elif source == "env":
        env["WEFT_WORKERS"] = TOO_MANY
        named = "WEFT_WORKERS"
    elif source == "WEB_CONCURRENCY":
        env["WEB_CONCURRENCY"] = TOO_MANY
        named = "WEB_CONCURRENCY"
    else:
        config = tmp_path / "weft.toml"
        config.write_text(f"workers = {TOO_MANY}\n")
        args += ["-c", str(config)]
        named = str(config)
    served = run(*args, env=env, cwd=tmp_path)
    assert served.returncode == 2, served.stderr[-400:]
    last = weft_lines(served.stderr)[-1]
    assert named in last, last
    checked = run(*args, "--check-config", env=env, cwd=tmp_path)
    assert checked.returncode == 2, "--check-config passed what serve refuses"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["file", "env", "flag"])
def test_a_misspelt_manager_names_where_it_was_set(tmp_path: Path, source: str) -> None:
    """Every other bad value reads "weft: FILE, key 'KEY': ..."; `manager = "thread"`
    read "weft: no task manager named 'thread' is installed ..." with no file, no
    variable, no flag, no key (UnknownManagerError is not a ConfigError, and
    _cli._sourced passed it through)."""
    args = ["_serving:handle", "--check-config"]
    env: dict[str, str] = {}
    if source == "file":
        config = tmp_path / "weft.toml"
        config.write_text('manager = "thread"\n')
        args += ["-c", str(config)]
        named = str(config)
    elif source == "env":
        env["WEFT_MANAGER"] = "thread"
        named = "WEFT_MANAGER"
    else:
        args += ["-k", "thread"]
        named = "--manager"
    result = run(*args, env=env, cwd=tmp_path)
    assert result.returncode == 2
    last = weft_lines(result.stderr)[-1]
    assert named in last and "key 'manager'" in last, last


@pytest.mark.timeout(60)
def test_conformance_with_a_misspelt_manager_suggests_the_closest() -> None:
    """`weft serve -k thread` says "did you mean 'threads'?"; `weft conformance thread`,
    the same mistake, did not."""
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "weft_core", "conformance", "thread"],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "did you mean 'threads'" in result.stderr, result.stderr[-300:]


# -- 7. hints that do not help ----------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:5000,127.0.0.1:5001", "localhost:5000:", "http://127.0.0.1:5000"]
)
def test_a_bind_hint_suggests_an_endpoint_the_parser_accepts(endpoint: str) -> None:
    """Any endpoint with two colons got "put an IPv6 address in brackets, as in
    [127.0.0.1:5000,127.0.0.1]:5001", and the suggestion was itself refused ("... in
    brackets is not an IPv6 address"). WEFT_BIND takes the comma list that -b refuses."""
    import re

    first = run("_serving:handle", "-b", endpoint, "--check-config")
    assert first.returncode == 2
    hint = re.search(r"as in (\S+);", weft_lines(first.stderr)[-1])
    if hint is None:
        return  # no suggestion: nothing misleading
    second = run("_serving:handle", "-b", hint.group(1), "--check-config")
    assert second.returncode == 0, (
        f"suggested {hint.group(1)!r}, which is refused: {weft_lines(second.stderr)[-1]}"
    )


@pytest.mark.timeout(60)
def test_a_directory_given_as_config_is_not_called_missing(tmp_path: Path) -> None:
    """`-c DIR` said "config file not found: 'DIR'" of a directory that is there."""
    folder = tmp_path / "conf"
    folder.mkdir()
    result = run("_serving:handle", "-c", str(folder), "--check-config")
    assert result.returncode == 2
    last = weft_lines(result.stderr)[-1]
    assert "not found" not in last, last
    assert "a directory, not a file" in last, last


# -- 8. gevent's max_blocking_time at its edges -------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_gevent_max_blocking_time_refuses_nan_and_inf(value: str) -> None:
    """`-o max_blocking_time=-1` is refused ("must be > 0 seconds"), but nan and inf
    passed --check-config (`seconds <= 0` is False for NaN) and, served, gevent's monitor
    thread died at start with a traceback on stderr ("ValueError: Invalid value NaN",
    "OverflowError: timestamp out of range"): blocked hubs then go unreported."""
    result = run(
        "_serving:handle", "-k", "gevent", "-o", f"max_blocking_time={value}", "--check-config"
    )
    assert result.returncode == 2, "accepted: " + "".join(
        line for line in result.stdout.splitlines(True) if "max_blocking_time" in line
    )
    assert "max_blocking_time" in weft_lines(result.stderr)[-1]


@pytest.mark.timeout(60)
def test_gevent_max_blocking_time_nan_served_prints_no_traceback(tmp_path: Path) -> None:
    """The same, served: no traceback from gevent's monitor thread before "listening"."""
    with Served(
        weft_serve(
            "_serving:handle", "-k", "gevent", "-b", "127.0.0.1:0", "-o", "max_blocking_time=nan"
        ),
        cwd=tmp_path,
        env=quiet_environment(),
    ) as served:
        if not listens(served):
            assert served.finish(10) == 2, served.text[-400:]
            assert "Traceback" not in served.text, served.text[-600:]
            return
        served.signal(signal.SIGTERM)
        assert served.finish(40) == 0
        served.wait_closed(10)
        assert "Traceback" not in served.text, served.text[-800:]


@pytest.mark.timeout(60)
def test_check_config_imports_the_handler_in_the_process_serve_prepares(tmp_path: Path) -> None:
    """A module that cannot be imported monkey-patched: serve refuses it (gevent patches
    before the import), so --check-config must too. It imported the handler unpatched,
    and passed what then failed to start (the docs check's D6)."""
    if "gevent" not in available_managers():
        pytest.skip("weft-gevent is not installed")
    (tmp_path / "needs_plain.py").write_text(
        "import gevent.monkey\n\n"
        "if gevent.monkey.is_module_patched('socket'):\n"
        "    raise ImportError('this module cannot run monkey-patched')\n\n\n"
        "def handle(conn):\n    pass\n"
    )
    args = ["needs_plain:handle", "-k", "gevent", "-b", "127.0.0.1:0"]
    checked = run(*args, "--check-config", cwd=tmp_path)
    assert checked.returncode == 2, checked.stdout
    assert "this module cannot run monkey-patched" in checked.stderr
    unpatched = run(*args, "-o", "patch=false", "--check-config", cwd=tmp_path)
    assert unpatched.returncode == 0, unpatched.stderr


def _check(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """``weft serve _serving:handle --check-config ARGS``: its last line of stderr."""
    done = subprocess.run(
        weft_serve("_serving:handle", "--check-config", *args),
        cwd=tmp_path, env={**environment(), **(env or {})}, capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr)
    return done.stderr.strip().splitlines()[-1]


def test_a_tls_file_s_error_names_the_source_of_that_part(tmp_path: Path) -> None:
    """A certfile that is no PEM named no source, or the source of the table's last
    part (the config check's M1): it names the variable that gave the certfile."""
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    line = _check(tmp_path, env={"WEFT_TLS_CERTFILE": "bad.pem", "WEFT_TLS_KEYFILE": "key.pem"})
    assert (
        line.startswith("weft: environment variable WEFT_TLS_CERTFILE, key 'tls.certfile':")
        and "bad.pem is not a PEM certificate" in line
    ), line


def test_options_from_two_sources_say_which_came_from_where(tmp_path: Path) -> None:
    """A file's [manager_options] and -o: the manager's refusal was blamed on -o alone,
    the bad option being the file's (M1). Each option's source is listed."""
    (tmp_path / "weft.toml").write_text("[manager_options]\nidle_threads = -1\n")
    line = _check(tmp_path, "-o", "idle_expiry=5", "--manager", "threads")
    assert "idle_threads must be 0 or more" in line, line
    assert f"idle_threads from {tmp_path / 'weft.toml'}" in line, line
    assert "idle_expiry from command line -o/--manager-option" in line, line


def test_paths_and_arguments_with_escapes_are_not_echoed_raw(tmp_path: Path) -> None:
    """A config file's path, a TLS file's and an unknown argument reached the terminal
    with their escape bytes (L5): each is escaped as values are."""
    config = tmp_path / "e\x1b[31mred.toml"
    config.write_text("bogus = 1\n")
    assert "e\\x1b[31mred.toml, key 'bogus'" in _check(tmp_path, "-c", str(config))
    pem = tmp_path / "c\x1b[31mred.pem"
    pem.write_text("not a certificate\n")
    line = _check(tmp_path, "--certfile", str(pem), "--keyfile", str(pem))
    assert "c\\x1b[31mred.pem is not a PEM certificate" in line and "\x1b" not in line, line
    line = _check(tmp_path, "x\x1b[31mRED")
    assert "x\\x1b[31mRED" in line and "\x1b" not in line, line


@pytest.mark.parametrize("check", [True, False], ids=["check-config", "serve"])
@pytest.mark.parametrize(
    ("given", "said"),
    [
        (["-k", "nope"], "no task manager named 'nope' is installed"),
        (["-o", "limt=5"], "got an unexpected keyword argument 'limt'"),
        (["-k", "threads", "-o", "limt=5"], "did you mean 'limit' for 'limt'?"),
    ],
    ids=["unknown-manager", "default-managers-option", "named-managers-option"],
)
def test_an_unknown_manager_is_said_before_the_application_is_imported(
    tmp_path: Path, check: bool, given: list[str], said: str
) -> None:
    """The manager's name is looked up first, as a supervisor does: the application's
    import (its side effects, gevent's patching first) ran before the one line (L10).
    The same for an option its factory does not take (a misspelt ``-o limt=5``)."""
    if given[0] == "-o" or "threads" in given:
        _need_threads()
    (tmp_path / "marked.py").write_text(
        "import pathlib\npathlib.Path('imported').write_text('')\ndef handle(conn): pass\n"
    )
    args = ["--check-config"] if check else ["-b", "127.0.0.1:0"]
    done = subprocess.run(
        weft_serve("marked:handle", *given, *args),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert said in done.stderr, done.stderr
    assert not (tmp_path / "imported").exists(), "the application was imported first"


def _need_threads() -> None:
    if "threads" not in available_managers():
        pytest.skip("weft-threads is not installed")


def test_a_manager_chosen_over_the_file_s_says_whose_options_it_got(tmp_path: Path) -> None:
    """``-k gevent`` over a file's asyncio and its [manager_options]: the refusal
    blamed the file alone, with no word of the override (the config check's L11)."""
    (tmp_path / "weft.toml").write_text(
        'manager = "asyncio"\n[manager_options]\nloop = "asyncio"\n'
    )
    if not {"gevent", "asyncio"} <= set(available_managers()):
        pytest.skip("needs weft-gevent and weft-asyncio")
    line = _check(tmp_path, "-k", "gevent")
    assert "unexpected keyword argument 'loop'" in line, line
    assert line.endswith(
        f"the manager was chosen by command line --manager, the options by {tmp_path / 'weft.toml'}"
    ), line
