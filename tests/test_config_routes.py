"""One value, every route: weft.toml, ``WEFT_*``, ``weft serve`` flags and ``Server(...)``.

DESIGN 5: a setting is checked by one validator whichever way it comes in, and a
mistake is one line naming the setting (exit 2 from the CLI, a ``ConfigError``
from Python), with nothing a variable or a flag carries echoed raw. Each test
here is a case where a differential check of the four routes (2,836 values over
38 settings) found them disagreeing, or a refusal that broke that rule.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from _serving import environment, weft_serve

from weft_core import ConfigError, Server

pytestmark = pytest.mark.timeout(60)

#: A bare word holding an escape sequence, a C1 CSI (U+009B, a one-character
#: terminal escape), a bidi override and a line break that would start a forged line.
HOSTILE = "a\x1b[31mRED\u009b\u202eb\nweft forged line"


def check_config(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``weft serve _serving:handle --check-config ARGS`` in ``tmp_path``."""
    return subprocess.run(
        weft_serve("_serving:handle", "--check-config", *args),
        cwd=tmp_path,
        env={**environment(), "WEFT_CONTROL_SOCKET": "off", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``weft:`` line of a refusal (exit 2, no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, lines[-30:])
    assert lines[0].startswith("weft: "), lines
    return lines[0]


def by_route(
    tmp_path: Path, route: str, key: str, value: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``--check-config`` given ``key`` as ``value`` by one route: the file (a TOML
    string), the ``WEFT_*`` variable or the flag."""
    if route == "file":
        (tmp_path / "weft.toml").write_text(f"{key} = {json.dumps(value)}\n")
        return check_config(tmp_path, env=env)
    if route == "env":
        return check_config(tmp_path, env={**(env or {}), f"WEFT_{key.upper()}": value})
    return check_config(tmp_path, f"--{key.replace('_', '-')}={value}", env=env)


def shown(done: subprocess.CompletedProcess[str], key: str) -> str:
    """The value ``--check-config`` lists for ``key`` (its line, less the source)."""
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        if line.startswith(f"{key} = "):
            return line[len(key) + 3 :].split("  # ")[0]
    raise AssertionError(f"no {key} in {done.stdout!r}")


def inert(text: str) -> bool:
    return not any(c in text for c in "\x1b\u009b\u202e\n")


@pytest.mark.parametrize("route", ["flag", "env", "file"])
def test_a_bare_bind_word_is_refused_in_one_escaped_line(tmp_path: Path, route: str) -> None:
    """A ``bind`` item with no colon was put raw into the hint ("for a host, write
    X:PORT"): ESC, C1 and bidi bytes reached the terminal, and a line break split the
    refusal into two lines, the second one the peer's (every route)."""
    line = refusal(by_route(tmp_path, route, "bind", HOSTILE))
    assert "neither a port number nor a service name" in line and inert(line), line


def test_a_bare_bind_word_from_python_is_one_escaped_line() -> None:
    with pytest.raises(ConfigError) as caught:
        Server(lambda conn: None, bind=[HOSTILE])
    assert inert(str(caught.value)), str(caught.value)


def test_a_seconds_value_past_a_float_s_range_is_too_big_not_a_crash(tmp_path: Path) -> None:
    """``full_wait = 10**400`` raised OverflowError (formatting it with ``:g``): a
    traceback and exit 1 from weft.toml, where a flag's refusal was one line."""
    with pytest.raises(ConfigError, match="more than the most it can be"):
        Server(lambda conn: None, full_wait=10**400)
    (tmp_path / "weft.toml").write_text(f"full_wait = {10**400}\n")
    assert "more than the most it can be" in refusal(check_config(tmp_path))


@pytest.mark.parametrize("route", ["env", "flag"])
def test_an_integer_too_big_is_said_so_from_text_too(tmp_path: Path, route: str) -> None:
    """31 digits or more were read as text, refused as "got '1000…0'" with no bound,
    where Python and TOML said "more than the most it can be (2147483647)"."""
    done = by_route(tmp_path, route, "backlog", str(10**30))
    assert "more than the most it can be (2147483647)" in refusal(done)


@pytest.mark.parametrize(
    "table", ['[tls]\n# certfile = "cert.pem"\n', "tls = {}\n"], ids=["commented-out", "inline"]
)
def test_an_empty_tls_table_is_refused_not_read_as_plain_tcp(tmp_path: Path, table: str) -> None:
    """weft.toml's empty ``[tls]`` was accepted, exit 0, and would have served plain
    TCP, where ``Server(tls={})`` refuses it: TLS meant, and none said how."""
    (tmp_path / "weft.toml").write_text(table)
    line = refusal(check_config(tmp_path))
    assert "key 'tls'" in line and "TLS needs certfile" in line, line
    with pytest.raises(ConfigError, match="TLS needs certfile"):
        Server(lambda conn: None, tls={})


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("weft.toml", '"unix_mode" = 440\n'),
        ("weft.toml", "'unix_mode' = 440\n"),
        ("weft.toml", "unix_mode = +440\n"),
        ("pyproject.toml", "[tool]\nweft.unix_mode = 440\n"),
        ("pyproject.toml", "[tool]\nweft = { bind = [], unix_mode = 440 }\n"),
    ],
    ids=["double-quoted", "single-quoted", "signed", "dotted", "inline-table"],
)
def test_a_decimal_unix_mode_is_refused_however_the_key_is_spelt(
    tmp_path: Path, name: str, text: str
) -> None:
    """``unix_mode = 440`` is the mode 0o670 in TOML, refused; quoted, signed or dotted it
    was taken (group-writable, where ``WEFT_UNIX_MODE=440`` gives 0o440)."""
    (tmp_path / name).write_text(text)
    line = refusal(check_config(tmp_path))
    assert "is a decimal number in TOML" in line and "unix_mode = 0o440" in line, line


def test_an_octal_unix_mode_beside_a_commented_decimal_one_is_taken(tmp_path: Path) -> None:
    """``0o670`` is 440: a commented-out ``unix_mode = 440`` beside it must not be read."""
    (tmp_path / "weft.toml").write_text("# unix_mode = 440\nunix_mode = 0o670\n")
    assert shown(check_config(tmp_path), "unix_mode") == str(0o670)


def test_a_decimal_unix_mode_in_a_file_with_windows_line_ends_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weft.toml").write_bytes(b"unix_mode = 440\r\n")
    assert "is a decimal number in TOML" in refusal(check_config(tmp_path))


@pytest.mark.parametrize("word", ["false", "no", "off", "none"])
@pytest.mark.parametrize("route", ["env", "flag", "file"])
def test_every_off_word_turns_the_control_socket_off(
    tmp_path: Path, route: str, word: str
) -> None:
    """``control_socket = false`` in TOML is off; the text ``false`` (or ``no``) from a
    variable or a flag made a socket file named ``false`` in the working directory."""
    done = by_route(tmp_path, route, "control_socket", word, env={"WEFT_CONTROL_SOCKET": ""})
    assert shown(done, "control_socket") == '"off"'


def test_a_config_file_s_relative_paths_are_the_file_s_whatever_their_name(
    tmp_path: Path,
) -> None:
    """A path named ``off`` or ``none`` (not the control socket's off) was left relative
    to the working directory, where every other relative path in a config file is
    the file's directory's; a blank path was joined into a name and taken."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "weft.toml").write_text('pid = "off"\n')
    assert shown(check_config(tmp_path, "-c", "conf/weft.toml"), "pid") == f'"{conf / "off"}"'
    (conf / "weft.toml").write_text('pid = " "\n')
    assert "key 'pid'" in refusal(check_config(tmp_path, "-c", "conf/weft.toml"))


@pytest.mark.parametrize("route", ["env", "flag"])
def test_check_config_lists_c1_controls_and_bidi_marks_escaped(tmp_path: Path, route: str) -> None:
    """The listing escaped only what JSON does (C0): a C1 CSI and a bidi override from a
    variable or a flag reached the terminal, where their error line escaped them."""
    done = by_route(tmp_path, route, "pid", "/tmp/x\u009b31m\u202ey.pid")
    assert shown(done, "pid") == '"/tmp/x\\u009b31m\\u202ey.pid"'


def test_unix_mode_false_from_python_is_no_mode_and_warns_of_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``unix_mode=False`` is no mode, as TOML's ``false`` is; it warned that a mode
    ``0o0`` was not used."""
    with caplog.at_level("WARNING", logger="weft"):
        Server(lambda conn: None, unix_mode=False)
    assert not [r for r in caplog.records if "unix_mode" in r.getMessage()], caplog.text


@pytest.mark.parametrize("value", ["true", '"cert.pem"'])
def test_tls_given_a_scalar_in_a_file_asks_for_the_table(tmp_path: Path, value: str) -> None:
    """``tls = true`` in weft.toml was told to give "an ssl.SSLContext", which no file can
    hold: the message for a file asks for the ``[tls]`` table (or false for none)."""
    (tmp_path / "weft.toml").write_text(f"tls = {value}\n")
    line = refusal(check_config(tmp_path))
    assert "expected a table with certfile and keyfile, got" in line, line
    assert "write them under [tls], or tls = false for none" in line, line
    assert "SSLContext" not in line, line


def test_a_value_given_to_a_switch_says_how_to_write_it(tmp_path: Path) -> None:
    """``--keepalive=yes`` (``WEFT_KEEPALIVE=yes`` is taken) was refused with only
    "weft serve --help lists the flags": the line now says to write the switch."""
    line = refusal(check_config(tmp_path, "--keepalive=yes"))
    assert "a switch takes no value: write --keepalive or --no-keepalive" in line, line
