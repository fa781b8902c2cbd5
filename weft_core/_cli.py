"""The ``weft`` command: ``weft serve``, ``weft managers``, ``weft conformance``.

This module turns command lines into calls on the public API and turns the errors a
user can fix into one line on stderr (``weft: ...``) and an exit status: 0 for a
clean end, 2 for a mistake in the command, the config or the handler, 1 for a
failure at run time (the address is in use, the server died), 4 for a stop that
had to leave tasks running (``EXIT_TASKS_LEFT``). It holds no server logic of its own:
settings come from :mod:`weft_core._config`, managers from the registry, and the
serving from :class:`weft_core.Server`.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import difflib
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, _exits, _registry
from ._config import Config, load_config, parse_option_value, with_source
from ._ctl import ControlSocket, check_control_path
from ._deadline import Deadline
from ._errors import BindError, ConfigError, UnknownManagerError, WeftError
from ._exits import EXIT_RUNTIME, EXIT_TASKS_LEFT, EXIT_USAGE
from ._flags import add_setting_flags, flag_values
from ._listeners import Listener, close_listener
from ._logging import (
    EXIT_FLUSH,
    flush_at_exit_by,
    flush_own_log,
    json_asked_for,
    print_line,
    setup_logging,
    stderr_line,
    whole_lines,
)
from ._logsafe import escape_for_log
from ._osthreads import one_cpu
from ._process import PidFile, bind_first, drop_privileges
from ._sdnotify import Notifier, take_environment
from ._settings import show, tls_context
from ._signals import (
    CONTROL_SIGNALS,
    NO_CONFIG_FLAG,
    STOP_REPEAT_WINDOW,
    STOP_SIGNALS,
    WORKER_FLAG,
    hold_while_starting,
    release_starting_hold,
    reopen_log_files,
)
from ._wakeup import Wakeup, die_by

__all__ = ["build_parser", "import_handler", "main"]

log = logging.getLogger("weft")


#: The longest the main thread sleeps while serving. Signals and the server's end wake
#: it at once through a socket (``_wakeup``); this is only a backstop.
_WAKE_INTERVAL = 1.0
#: What the last-resort exit (_deadline) adds to graceful_timeout + STOP_GRACE.
DEADLINE_MARGIN = 0.5
#: The least time a process whose stop has ended is given to exit (see _bound_the_exit):
#: what the bound leaves when the stop took all of its own.
EXIT_GRACE = DEADLINE_MARGIN
#: How long before that bound the exit stops waiting for stderr to take the log.
EXIT_FLUSH_MARGIN = 0.2


class HandlerImportError(WeftError):
    """The handler named on the command line or in config cannot be imported."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``weft`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # A mistake on the command line is said before the config is read: as JSON if
    # the flag (or WEFT_LOG_FORMAT) asks, as every other mistake is.
    json_asked_for(_flag_in(args, "--log-format"), os.environ)
    parser = build_parser()
    ns, extras = parser.parse_known_args(args)
    if extras:  # said by the command's own parser, with the flag meant, if one is near
        command_parser: argparse.ArgumentParser = getattr(ns, "command_parser", parser)
        command_parser.error(_unrecognized(extras, command_parser))
    ns.argv = args  # for --reload's child
    command: Callable[[argparse.Namespace], int] | None = getattr(ns, "command", None)
    if command is not _serve:
        release_starting_hold()  # held by __main__ for a server's start; this is none
    if command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return command(ns)
    except KeyboardInterrupt:  # Ctrl-C before the server (and its handler) was up
        return 130
    except BrokenPipeError:
        # Its reader went away (`weft ctl status | head -1`): stop quietly, as any
        # Unix tool does, and let nothing flush into the closed pipe at exit.
        _exits.stdout_gone()
        return EXIT_RUNTIME


#: gunicorn's and uvicorn's flags that weft spells otherwise, covers another way, or
#: has no use for: what to write instead.
_USE = "weft's is "
_NONE = "weft has no such flag: "
OTHER_SERVERS_FLAGS = {
    "--access-logfile": _USE + "--access-log (to stderr; --log-config for a file)",
    "--error-logfile": _USE + "--log-config (weft logs to stderr unless told)",
    "--log-file": _USE + "--log-config (weft logs to stderr unless told)",
    "--worker-connections": _USE + "--max-connections",
    "--limit-concurrency": _USE + "--max-connections",
    "--threads": _USE + "-k threads (a thread per connection)",
    "--keep-alive": _USE + "--idle-timeout",
    "--timeout-keep-alive": _USE + "--idle-timeout",
    "--timeout-graceful-shutdown": _USE + "--graceful-timeout",
    "--forwarded-allow-ips": _USE + "--trusted-proxies",
    "--proxy-headers": _USE + "--proxy-protocol with --trusted-proxies (no HTTP headers)",
    "--host": _USE + "--address HOST (or --bind HOST:PORT)",
    "--uds": _USE + "--bind unix:PATH",
    "--loop": _USE + "-k asyncio -o loop=uvloop",
    "--umask": _USE + "--unix-mode for a Unix socket's mode; weft sets no umask",
    "--preload": _NONE + "each worker imports the handler itself",
    "--daemon": _NONE + "run it under a supervisor (systemd, a container)",
    "-D": _NONE + "run it under a supervisor (systemd, a container)",
    "--chdir": _NONE + "cd DIR first (systemd: WorkingDirectory=)",
    "--app-dir": _NONE + "PYTHONPATH=DIR weft serve ...",
    "--env": _NONE + "NAME=VALUE weft serve ... sets the environment",
    "-e": _NONE + "NAME=VALUE weft serve ... sets the environment",
    "--capture-output": _NONE + "weft's log goes to stderr, and print() to stdout, as given",
    "--factory": _NONE + "make the handler when its module is imported",
    "--root-path": _NONE + "weft serves TCP, not HTTP",
    "--no-sendfile": _NONE + "weft serves TCP, not files",
    "--proc-name": _NONE + "weft does not rename its processes",
    "--name": _NONE + "weft does not rename its processes",
    "--no-config": _NONE + "a config file is read from -c FILE, $WEFT_CONFIG, or ./weft.toml"
    " (else ./pyproject.toml's [tool.weft])",
}
#: How near a flag must be spelt to one weft has, to be offered as the one meant.
CLOSE_FLAG = 0.75


def _unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """The 'unrecognized arguments' line, with the flag meant when one is near."""
    message = f"unrecognized arguments: {' '.join(escape_for_log(arg) for arg in extras)}"
    flags = [arg.partition("=")[0] for arg in extras if arg.startswith("-")]
    if not flags:
        return message
    # Flags for weft's own use (a worker's) are never offered.
    known = [
        o
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for o in action.option_strings
    ]
    hint = OTHER_SERVERS_FLAGS.get(flags[0])
    if hint is not None:
        return f"{message}; {hint}"
    close = difflib.get_close_matches(flags[0], known, n=1, cutoff=CLOSE_FLAG)
    return f"{message}; did you mean {close[0]}?" if close else message


def _flag_in(args: list[str], flag: str) -> str | None:
    """The value given to ``flag`` in ``args`` (the last one), before they are parsed."""
    value = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(f"{flag}="):
            value = arg.partition("=")[2]
    return value


class _Parser(argparse.ArgumentParser):
    """argparse's parser with weft's manners: whole flags only, a mistake in one line.

    An abbreviation would take ``--no-config`` for a worker's own hidden flag, and
    silently do something else; a mistake is said in one line (JSON under
    ``--log-format json``), as a mistake in the config is, not in argparse's usage
    block of twenty.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = f"{self.prog} --help lists the flags"
        flags = _ON_OFF.match(message)
        if flags is not None:
            # --keepalive=yes: a switch takes no value (WEFT_KEEPALIVE=yes does).
            hint = f"a switch takes no value: write {flags[1]} or {flags[2]}"
        print_line(stderr_line(f"{self.prog}: {message} ({hint})"))
        sys.exit(EXIT_USAGE)


#: argparse's refusal of a value given to an on/off switch (``--keepalive=yes``).
_ON_OFF = re.compile(r"argument (--[\w-]+)/(--no-[\w-]+): ignored explicit argument")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``weft`` command."""
    parser = _Parser(
        prog="weft",
        description="A TCP server framework with pluggable concurrency.",
    )
    parser.add_argument("--version", action="version", version=f"weft {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve a handler",
        description="Serve HANDLER (module:attribute) until SIGINT or SIGTERM. Settings come "
        "from weft.toml (or [tool.weft] in pyproject.toml), then WEFT_* environment "
        "variables, then these flags. With no bind it listens on 127.0.0.1:8000, or on "
        "0.0.0.0:$PORT when $PORT is set; $WEB_CONCURRENCY sets the default workers. "
        "Exit status: 0 stopped, 1 failed to boot or died, 2 a mistake in the command, "
        "config or handler, 4 stopped leaving tasks behind.",
    )
    serve.set_defaults(command=_serve, command_parser=serve)
    serve.add_argument(
        "handler",
        nargs="?",
        metavar="HANDLER",
        help="the handler, e.g. examples.echo:handle (or 'handler' in config)",
    )
    serve.add_argument("-c", "--config", metavar="FILE", help="config file (default: ./weft.toml)")
    serve.add_argument(
        "--check-config",
        "--print-config",
        action="store_true",
        help="print each effective setting and where it came from, check the handler and "
        "the manager, then exit: 0 if all is well, 2 and the error if not",
    )
    # --fd and -o are read in _serve, so that a mistake in them is one line, as in any
    # other flag, rather than argparse's usage and error.
    serve.add_argument(
        "--fd",
        action="append",
        metavar="N",
        help="listen on inherited, already bound socket N (same as --bind fd:N)",
    )
    serve.add_argument(
        "-o",
        "--manager-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option for the task manager (VALUE read as TOML, else text), such as "
        "limit=100, or patch=false for gevent",
    )
    # Set by `weft serve --workers N` for each worker it starts (see _workers).
    serve.add_argument(WORKER_FLAG, type=int, help=argparse.SUPPRESS)
    # A worker of a supervisor that read no config file looks for none either: it
    # starts as root under --user, and would have read one another user put in the
    # working directory since (its log_config's factories run as root).
    serve.add_argument(NO_CONFIG_FLAG, action="store_true", help=argparse.SUPPRESS)
    add_setting_flags(serve)

    managers = commands.add_parser("managers", help="list the installed task managers")
    managers.set_defaults(command=_managers)

    conformance = commands.add_parser(
        "conformance",
        help="run the conformance suite against an installed manager",
        description="Run weft's conformance suite (pytest) against manager NAME; "
        "any further arguments go to pytest.",
        epilog="Useful pytest arguments: -k EXPR runs the tests whose names match "
        "(a failed run ends by printing the -k that reruns what failed); -x stops at the "
        "first failure; --maxfail N after N; -v lists each test; --timeout SECONDS "
        "fails a test that runs longer (default 120 s, with pytest-timeout); "
        "-p no:randomly if pytest-randomly is installed. The run takes no pytest "
        "configuration (pytest.ini, pyproject.toml, conftest.py) from the directory it "
        "is started in, so it runs the same anywhere. Exit status: pytest's (0 all "
        "passed, 1 some failed, 2 interrupted, 4 a pytest usage error, 5 none "
        "selected); 2 too, before pytest runs, for a missing, unknown or broken manager.",
    )
    conformance.set_defaults(command=_conformance)
    # Optional to argparse, so that its absence gets a message of its own: argparse
    # calls a REMAINDER required too, and named both.
    conformance.add_argument(
        "name", metavar="NAME", nargs="?", help="the installed manager to test (weft managers)"
    )
    conformance.add_argument(
        "pytest_args",
        nargs=argparse.REMAINDER,
        metavar="PYTEST_ARGS",
        help="optional: arguments for pytest, such as -x or -k EXPR",
    )

    from ._ctl_cli import add_parser as add_ctl_parser

    add_ctl_parser(commands)
    return parser


def _fd_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(
            f"expected a file descriptor number, got {show(text)}", source="command line --fd"
        )
    return int(text)


def _manager_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise ConfigError(
            f"expected KEY=VALUE, such as limit=100, got {show(text)}",
            source="command line -o/--manager-option",
        )
    name = key.strip()
    return name, parse_option_value(value, name)


def _fail(message: object, status: int) -> int:
    """Say why in one line (a JSON one once ``--log-format json`` is set up); ``status``."""
    print_line(stderr_line(str(message)))
    return status


# -- weft serve -----------------------------------------------------------------------


def _serve(ns: argparse.Namespace) -> int:
    starting = hold_while_starting()  # until _run's (or the supervisor's) handlers go in
    flags, names = flag_values(ns)
    json_asked_for(flags.get("log_format"), os.environ)  # the config's own errors too
    flags["handler"] = ns.handler
    names.update(handler="HANDLER", manager_options="-o/--manager-option")
    try:
        fds = [_fd_number(text) for text in ns.fd or ()]
        options = [_manager_option(text) for text in ns.manager_option or ()]
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE)
    binds = [*(ns.bind or ()), *(f"fd:{n}" for n in fds)]
    flags["bind"] = binds or None
    if fds:
        names["bind"] = "-b/--bind/--fd"
    if options:
        flags["manager_options"] = dict(options)
    from . import _activation, _supervise, _worker_link, _workers

    link: _worker_link.WorkerLink | None = None
    try:
        if ns.supervisor_fd is not None:
            whole_lines()
            link = _worker_link.become_worker(ns.supervisor_fd)
        # Read (and unset) always, as sd_listen_fds(1) does; used when nothing is bound.
        inherited = _activation.listen_fds()
        if inherited and not binds:
            flags["bind"] = [s.endpoint for s in inherited]
            names["bind"] = "LISTEN_FDS"
        config = load_config(
            flags,
            config_file=ns.config,
            flag_names=names,
            serve_defaults=True,
            discover=not (link is not None and ns.no_config_file),
        )
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE)
    if _supervise.UPGRADE_CHECK_ENV in os.environ:
        _as_a_check(lambda: _upgrade_check(config))
    if _supervise.START_CHECK_ENV in os.environ:
        _as_a_check(lambda: _check_config(config, quiet=True))
    if ns.check_config:
        return _check_config(config)
    try:
        setup_logging(config.log_level, config.get("log_format"), config.get("log_config"))
    except ConfigError as exc:
        return _fail(exc, EXIT_USAGE)
    worker = link is not None
    if not worker:  # the supervisor said it once for all
        for warning in config.warnings:
            log.warning("%s", warning)
    if inherited:
        _activation.log_inherited(inherited, used=not binds)
    if config.handler is None:
        return _fail(NO_HANDLER, EXIT_USAGE)
    if config.get("reload") and not worker:
        return _reload(ns.argv, config)
    if not worker:
        from ._reload import watch_parent

        # A --reload child: stop, as on SIGTERM, if the parent that ran it is gone.
        watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    pid = None if worker else config.get("pid")
    upgraded = _supervise.ADOPT_ENV in os.environ  # a supervisor re-executed on USR2
    # A supervisor re-executed on USR2 keeps what the image before it checked and
    # made: its pid file names it already (PidFile.keep), its control socket is
    # inherited. Checked again, a pid file another user had rewritten, or one in
    # root's /run that a one-process server switched to --user may no longer
    # write, ended the upgrade with exit 2, and the service with it.
    if not worker and not upgraded:
        try:
            _check_paths(config)
        except ConfigError as exc:
            return _fail(with_source(exc, config.where), EXIT_USAGE)
    # The watchdog and recycling replace a process, so even one worker needs a
    # supervisor; and a supervisor re-executed on USR2 stays one.
    if not worker and (
        config.workers > 1
        or config.get("timeout") is not None
        or config.get("max_requests") is not None
        or upgraded
    ):
        try:
            _check_manager(config)
        except WeftError as exc:
            return _fail(with_source(exc, config.where), EXIT_USAGE)
        # Not for a USR2's new image (its adopted workers serve), nor with the
        # sockets systemd passed as the binds: the check would not have them.
        if not upgraded and not (inherited and not binds):
            refused = _start_check(ns.argv)
            if refused:
                return refused
        supervisor_pid = None if pid is None else PidFile(pid)
        keep_pid: Callable[[], object] | None = None
        if supervisor_pid is not None:  # re-executed on USR2: the same PID, kept
            keep_pid = supervisor_pid.keep if upgraded else supervisor_pid.write

        def supervisor_listening() -> None:
            # As one process says them (listening(), below): held, never acted on. A
            # USR2's new image listened all along (the sockets are inherited): what it
            # held came while it loaded, before its handlers were in.
            when = "while re-executing" if upgraded else "while starting, before anything listened"
            for name in starting:
                log.info("%s arrived %s: ignored", name, when)
            if keep_pid is not None:
                keep_pid()

        try:
            return _supervise.supervise(
                config,
                flags,
                on_listening=supervisor_listening,
                argv=getattr(ns, "argv", None),
            )
        except ConfigError as exc:  # too many workers, a shutdown port without a secret
            return _fail(with_source(exc, config.where), EXIT_USAGE)
        except (WeftError, OSError) as exc:
            return _fail(exc, EXIT_RUNTIME)
        finally:
            if supervisor_pid is not None:
                supervisor_pid.remove()  # the object that wrote it: it knows it did
    take_environment()  # NOTIFY_SOCKET is weft's, not the handler's import's
    try:
        _check_manager(config)  # an unknown name before the application's import
        _prepare_process(config)
    except WeftError as exc:  # an unknown manager, a broken plugin
        return _fail(with_source(exc, config.where), EXIT_USAGE)

    from ._server import Server  # here, so `weft managers` and `--help` stay light

    kwargs = config.server_kwargs()
    account = (config.get("user"), config.get("group"))
    switch = account != (None, None)
    bound: list[Listener] = []
    try:
        if switch and not worker:  # a worker's sockets are bound already, by the supervisor
            bound, kwargs = bind_first(config)
    except (WeftError, OSError) as exc:  # BindError: the address is in use, or privileged
        return _fail(exc, EXIT_RUNTIME)
    if worker:  # a worker: the supervisor owns the shutdown port
        kwargs = _workers.worker_kwargs(kwargs)
    from ._ctl_commands import open_control, server_commands

    drain = DrainRequest()
    control: ControlSocket | None = None
    # The control socket's commands and the console's names, filled in once the
    # server is made: with --user the socket is opened before, as root.
    commands: dict[str, Any] = {}
    namespace: dict[str, Any] = {}

    def open_control_socket() -> None:
        nonlocal control
        control = open_control(config, commands, namespace=namespace, worker=worker)

    pid_file = None if pid is None else PidFile(pid)
    try:
        if switch:
            # What needs root comes first: the sockets (bound already, by bind_first or
            # the supervisor), the TLS key, the control socket where the operator's
            # weft ctl looks, the pid file in a root-only directory (/run). Then the
            # switch, and only then the application's code is imported, as the user
            # (gunicorn's order): imported as root, code the user may write (or a
            # config it planted) ran as root in every worker, which the user can have
            # started again at will by killing its own.
            kwargs = {**kwargs, "tls": tls_context(kwargs.get("tls"))}  # the key read
            open_control_socket()
            if pid_file is not None:
                pid_file.write()
            drop_privileges(*account)
        handler = import_handler(config.handler)
        server = Server(handler, **_named_manager(kwargs))
        commands.update(server_commands(server, drain))
        namespace["server"] = server
        if control is not None:  # opened before the switch: it copied no command yet
            control.commands.update(commands)
    except (WeftError, OSError) as exc:
        for listener in bound:
            close_listener(listener)
        if control is not None:
            control.close()
        if pid_file is not None:
            pid_file.remove()
        if isinstance(exc, BindError):  # the control socket's path is taken
            return _fail(exc, EXIT_RUNTIME)
        if isinstance(exc, WeftError):  # unknown manager, wrong handler kind, bad value
            return _fail(with_source(exc, config.where), EXIT_USAGE)
        return _fail(
            f"cannot switch to user {account[0]}, group {account[1]}: {exc}", EXIT_RUNTIME
        )
    for listener in bound:  # its descriptor is the server's now (fd:N), not this object's
        listener.sock.detach()

    def listening() -> None:
        for name in starting:
            log.info("%s arrived while starting, before anything listened: ignored", name)
        # Once the server listens: a port in use fails before the control socket says a word.
        if not switch:
            open_control_socket()
        if control is not None:
            control.start()
        if pid_file is not None and not switch:  # with --user, written before the switch
            pid_file.write()
        if link is not None:
            limit = _worker_link.max_requests_for(config)
            link.ready(server, config.graceful_timeout, config.get("timeout"), limit)

    try:
        if link is not None:
            if not link.begin_serving():  # retired as it started: it ends, unserved
                return 0
            return _run(
                server,
                config.graceful_timeout,
                listening,
                drain=drain,
                stopping=link.stopping,
                stopped=link.stopped,
            )

        def hand_over(signum: int, notifier: Notifier) -> int:
            return _supervise.hand_over(
                server,
                config,
                flags,
                signum,
                notifier,
                control=control,
                argv=getattr(ns, "argv", None),
            )

        return _run(server, config.graceful_timeout, listening, hand_over=hand_over, drain=drain)
    finally:
        if control is not None:
            control.close()
        if pid_file is not None:
            pid_file.remove()


class DrainRequest:
    """A request from another thread, carried out by the serve loop.

    ``weft ctl drain [SECONDS]`` (from a control thread), and an approved
    shutdown-port request (from its thread), which stops as SIGTERM does.
    """

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.timeout: float | None = None
        #: The deadline a later request set that is earlier than the first's (monotonic).
        self.until: float | None = None
        self.wake: Callable[[], None] = lambda: None

    def __call__(self, timeout: float | None) -> None:
        """Ask for it, given ``timeout``; asked again, an earlier deadline brings it forward."""
        if self.asked.is_set():
            until = None if timeout is None else time.monotonic() + timeout
            if until is not None and (self.until is None or until < self.until):
                self.until = until
        else:
            self.timeout = timeout
        self.asked.set()
        self.wake()


def _named_manager(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` for ``Server(...)`` naming the manager, the default one if unset.

    The config read is this command's (``--config``, its sources): ``Server`` with no
    manager would read one of its own, the current directory's.
    """
    return {"manager": _registry.DEFAULT_MANAGER, **kwargs}


def _check_manager(config: Config) -> None:
    """Look the manager's name up, and its options' names, as a supervisor must before it binds.

    Its workers make the manager, after the supervisor has bound and started them;
    an unknown or broken one, or an option its factory does not take (``-o limt=5``),
    is found here instead: exit 2 with nothing bound, as without a supervisor, and
    before the application's import (whose side effects, gevent's patching among
    them, ran first). The options' values are still the manager's to refuse.
    """
    name = config.get("manager")
    options = dict(config.get("manager_options") or {})
    if name is None and options and _registry.DEFAULT_MANAGER in _registry.available_managers():
        name = _registry.DEFAULT_MANAGER  # none installed: the Server says so, as before
    if isinstance(name, str):
        _registry.check_options_fit(name, options)


def _upgrade_check(config: Config) -> int:
    """Status 0 if a USR2's new image would start; else say why in one line (status 2).

    The old supervisor runs it before its exec, in a fresh interpreter with the new
    image's command line, environment and directory: the config loads (its file,
    ``WEFT_*``, the flags), the logging it names is set up, a handler is named and
    the manager is installed, its options ones it takes. Nothing is bound and the application is not imported:
    that is the new workers' to do, and a reload whose code is broken is abandoned,
    the old workers serving on.
    """
    if config.handler is None:
        return _fail(NO_HANDLER, EXIT_USAGE)
    try:
        setup_logging(
            config.log_level, config.get("log_format"), config.get("log_config"), check=True
        )
        _check_manager(config)
    except WeftError as exc:
        return _fail(with_source(exc, config.where), EXIT_USAGE)
    return 0


def _prepare_process(config: Config) -> None:
    """Run the manager's ``prepare_process`` (gevent: monkey-patch) before the handler's import.

    An unknown manager is left for ``Server(...)`` to report, with the names installed.
    """
    name = config.get("manager")
    if not isinstance(name, str):
        name = _registry.DEFAULT_MANAGER
    spec = _registry.available_managers().get(name)
    if spec is not None and spec.prepare_process is not None:
        options = config.values.get("manager_options", {})
        try:
            spec.prepare_process(**options)
        except (TypeError, ValueError) as exc:  # as create_manager says of its options
            raise _registry.options_rejected(name, options, exc) from exc


def _check_paths(config: Config) -> None:
    """Refuse, before anything binds, a pid file or control socket path that cannot work.

    ConfigError for a pid file whose directory is missing or not writable, that is
    not a regular file, or that names a running server, and for a control socket
    path too long for a Unix socket (with what its workers' sockets add), in a
    directory that is missing or not writable, or naming something not a socket.
    ``weft serve`` and ``--check-config`` both run it.
    """
    pid = config.get("pid")
    if pid is not None:
        PidFile(pid).check()
    if config.control_socket is not None:
        check_control_path(config.control_socket)


#: How long a supervisor's start check may take: an application slower to import is
#: started unchecked, as before the check, rather than kept from binding for longer.
START_CHECK_TIMEOUT = 5.0


def _start_check(argv: Sequence[str]) -> int:
    """A supervisor's check, before it binds, that its command would start: 0 if so.

    The same command runs as ``--check-config`` does, quietly, in a fresh interpreter
    (:data:`~weft_core._supervise.START_CHECK_ENV`): the handler imported (as the
    service's user, under ``--user``), the Server made. A supervisor makes neither
    itself (its workers load the code on disk, and a reload loads it again); without
    this a mistake only a Server finds (an option the manager refuses, a TLS file
    that is no PEM, a sync handler on trio, a shutdown secret without its port) was
    found by the first worker, after the supervisor had bound and said it listened,
    or was dropped unsaid. Only a mistake (status 2) is refused, with the check's
    own line: a crash or a failure a restart may cure is left to the workers and
    their back-off, and an import slower than :data:`START_CHECK_TIMEOUT` starts
    unchecked.
    """
    from . import _supervise

    result = _supervise.run_check(
        [*_supervise.PYTHON_M_WEFT, *argv], _supervise.START_CHECK_ENV, START_CHECK_TIMEOUT
    )
    if result is None:
        log.info(
            "the start check took more than %gs (a slow import): starting unchecked",
            START_CHECK_TIMEOUT,
        )
        return 0
    status, line = result
    if status != EXIT_USAGE:
        return 0
    # Its one-line error (a JSON line under --log-format json), said again.
    print_line(line or stderr_line("the start check found a mistake"))
    return EXIT_USAGE


def _as_a_check(check: Callable[[], int]) -> NoReturn:
    """Run one of weft's checks in this process and end it with the check's status.

    At once (``os._exit``), with no wait for a thread or an ``atexit`` the
    application's import left, whose output would also have replaced the check's
    one line; and at once if the process that runs the check ends meanwhile.
    """
    from ._reload import when_parent_gone

    when_parent_gone(os.getppid(), lambda: os._exit(EXIT_RUNTIME), "weft check: parent")
    status = check()
    flush_own_log(EXIT_FLUSH)  # its one line, if logging was set up (the log's writer)
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)


def _check_config(config: Config, *, quiet: bool = False) -> int:
    """``weft serve --check-config``: print every setting and its origin, check the handler.

    The process is prepared (the manager's ``prepare_process``), the handler
    imported and the Server made (its manager, options, TLS context and the checks
    between settings), as ``weft serve`` does, so status 0 means the same command
    without --check-config gets as far as binding; nothing is bound. With ``user``
    or ``group`` set, run as root, it switches to them after reading the TLS key
    and before the import, as serve does. ``quiet``: print only a failure (a
    supervisor's :func:`_start_check`).
    """
    from ._ctl import default_path

    if not quiet:
        # What weft serve uses where the table has no default: its manager and the
        # control socket's path (the manager's own options are listed at the end).
        serve_defaults = {"manager": _registry.DEFAULT_MANAGER, "control_socket": default_path()}
        for line in config.describe(serve_defaults):
            print(line)
        for warning in config.warnings:
            print_line(stderr_line(f"warning: {warning}", logging.WARNING))
    if config.handler is None:
        return _fail(NO_HANDLER, EXIT_USAGE)
    try:
        from ._server import Server

        if config.get("log_config") is not None:
            # Applied as serve applies it (its handlers' files opened): a file that
            # serve would refuse is refused here; none is emptied (a live server's).
            setup_logging(
                config.log_level, config.get("log_format"), config.get("log_config"), check=True
            )
        _check_paths(config)
        _check_manager(config)  # an unknown name before the application's import
        if config.workers > 1:  # as the supervisor checks it, before it binds
            from ._workers import check_capacity

            check_capacity(config.workers)
        kwargs = config.server_kwargs()
        account = (config.get("user"), config.get("group"))
        # What the module prints as it is imported goes to stderr: stdout is the
        # settings, for a reader to parse. The process is prepared first, as serve
        # prepares it (gevent: monkey-patched): a module that imports differently so
        # passed the check and failed to start.
        with contextlib.redirect_stdout(sys.stderr):
            _prepare_process(config)
            if account != (None, None) and os.geteuid() == 0:
                # As serve: the key read as root, the application imported as the user.
                kwargs = {**kwargs, "tls": tls_context(kwargs.get("tls"))}
                try:
                    drop_privileges(*account)
                except OSError as exc:
                    return _fail(
                        f"cannot switch to user {account[0]}, group {account[1]}: {exc}",
                        EXIT_RUNTIME,
                    )
            handler = import_handler(config.handler)
        server = Server(handler, **_named_manager(kwargs))
    except WeftError as exc:
        return _fail(with_source(exc, config.where), EXIT_USAGE)
    if not quiet:
        for line in _manager_defaults(server, config):
            print(line)
    return 0


def _manager_defaults(server: Any, config: Config) -> list[str]:
    """The manager's own options that no source set, with the defaults it takes.

    What is in effect (asyncio's ``loop``, threads' ``idle_threads``) is otherwise
    nowhere in the listing: the settings table knows only ``limit``. Read from the
    factory's signature, or the manager's class when the factory takes ``**options``.
    """
    import inspect

    from ._config import json_value

    name = server.manager_name
    given = set(config.values.get("manager_options", {})) | {"limit"}
    try:
        spec = _registry.get_manager_spec(name)
        signature = inspect.signature(spec.factory)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            signature = inspect.signature(type(server.task_manager))
        # weft serve's own defaults, where its prepare_process has them (gevent's
        # patch, and its max_blocking_time of 1 s where the manager's is none).
        prepared = {} if spec.prepare_process is None else _defaults(spec.prepare_process)
    except (TypeError, ValueError, WeftError):
        return []
    found = {**_defaults(signature), **prepared}
    return [
        f"manager_options.{key} = {json_value(value)}  # default ({name}"
        + (", weft serve)" if key in prepared else ")")
        for key, value in found.items()
        if key not in given
    ]


def _defaults(callable_or_signature: Any) -> dict[str, Any]:
    """The keyword parameters that have a default, and their defaults."""
    import inspect

    signature = (
        callable_or_signature
        if isinstance(callable_or_signature, inspect.Signature)
        else inspect.signature(callable_or_signature)
    )
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    }


def _reload(argv: Sequence[str], config: Config) -> int:
    from . import _supervise
    from ._reload import reload_forever, source_root

    roots = [source_root(str(config.handler), Path.cwd())]
    if config.file is not None:
        roots.append(config.file)
    command = [*_supervise.PYTHON_M_WEFT, *argv, "--no-reload"]
    return reload_forever(command, roots, config.graceful_timeout)


def _run(
    server: Any,
    graceful_timeout: float,
    ready: Callable[[], None] | None = None,
    hand_over: Callable[[int, Notifier], int] | None = None,
    drain: DrainRequest | None = None,
    stopping: Callable[[], None] | None = None,
    stopped: Callable[[], None] | None = None,
) -> int:
    """Run ``server`` until a signal, a drain request or a fatal error; the exit status.

    ``ready()``, if given, is called once the server listens (a worker tells its
    supervisor). ``hand_over(signum, notifier)``, if given, is what HUP, USR2 and
    TTIN do: this process becomes a supervisor (``_supervise.hand_over``) and its
    status is returned. ``stopping()``, if given, is called as a TERM or INT begins a
    graceful stop, and ``stopped()`` once the server has stopped, while this
    function's signal handlers are still in (a worker tells its supervisor of both).
    Signals: see ``_signals``.
    """
    from ._engine import STOP_GRACE  # here, so `weft managers` and `--help` stay light

    in_main = threading.current_thread() is threading.main_thread()
    notifier = Notifier()
    deadline = Deadline()

    #: When the TERM or INT that began the stop came: the next one quits at once.
    stop_began: list[float] = []

    def on_signal(signum: int) -> None:
        # In the handler itself: the stop's bound holds even if the main thread is stuck.
        if signum in STOP_SIGNALS or signum == signal.SIGQUIT:
            if signum in STOP_SIGNALS:
                # Counted, not read off the armed deadline: a QUIT arms it too, and
                # Python runs pending handlers in signal-number order, so a TERM and
                # a QUIT pending together (a supervisor's TERM, then its QUIT cutting
                # the stop short) ran QUIT first, and the TERM killed the worker.
                now = time.monotonic()
                if stop_began:
                    if now - stop_began[0] < STOP_REPEAT_WINDOW:
                        return  # the same request, sent twice (timeout(1) does)
                    die_by(signum)  # the second: quit at once (as PID 1 too)
                stop_began.append(now)
                if stopping is not None:
                    stopping()
            if deadline.armed:  # QUIT during a graceful stop: cut it short, as asked
                # Not threading.Thread(...).start(), which waits for the thread to begin:
                # monkey-patched by gevent, that is a wait on the hub, and this handler
                # may run in the hub itself (BlockingSwitchOutError, the QUIT lost).
                # start_new_thread returns at once: an OS thread, or gevent's greenlet.
                _thread.start_new_thread(server.stop, (0.0,))
            wait = 0.0 if signum == signal.SIGQUIT else graceful_timeout
            deadline.arm(
                wait + STOP_GRACE + DEADLINE_MARGIN,
                f"received {signal.Signals(signum).name} and the stop did not end within "
                f"{wait:g}s plus {STOP_GRACE + DEADLINE_MARGIN:g}s: a handler blocks the main "
                f"thread (the stacks below name it); tasks left behind are abandoned "
                f"(exit status {EXIT_TASKS_LEFT})",
            )

    # An approved shutdown-port request stops as SIGTERM does: bounded by the graceful
    # timeout, with the same last resort and exit status (not Server.stop()'s default,
    # which waits for every connection).
    shutdown = DrainRequest()

    def shutdown_requested() -> None:
        deadline.arm(
            graceful_timeout + STOP_GRACE + DEADLINE_MARGIN,
            f"the shutdown port asked for a stop, which did not end within "
            f"{graceful_timeout:g}s plus {STOP_GRACE + DEADLINE_MARGIN:g}s: a handler blocks "
            f"the main thread (the stacks below name it); tasks left behind are abandoned "
            f"(exit status {EXIT_TASKS_LEFT})",
        )
        shutdown(None)

    server._on_shutdown_request = shutdown_requested
    # Handlers go in before run(), so a signal arriving as the server starts still stops it.
    signals = (*STOP_SIGNALS, *CONTROL_SIGNALS) if in_main else ()
    # Once the stop has ended, a QUIT has nothing left to cut short (a supervisor's
    # QUIT cutting its workers' stops short reaches some as they exit), and a HUP,
    # USR1 or USR2 nothing left to act on: ignored, they neither dump core nor turn a
    # clean exit into a death by signal.
    after: dict[int, Any] = _exits.late_signals_ignored(signals)
    with Wakeup(signals, on_signal=on_signal, on_exit=after) as wakeup:
        try:
            return _serve_until_stopped(
                server,
                graceful_timeout,
                wakeup,
                notifier,
                ready,
                hand_over,
                drain or DrainRequest(),
                shutdown,
                stop_began,
            )
        finally:
            if _exits.EXITS_AFTER:
                _bound_the_exit(deadline, STOP_GRACE)
            else:
                deadline.disarm()
            if stopped is not None:
                stopped()


def _bound_the_exit(deadline: Deadline, grace: float) -> None:
    """The stop has ended and the process exits next: keep the stop's bound through it.

    Python's exit waits for every thread that is not a daemon: a call still running
    in an executor (``asyncio.to_thread``'s: ``concurrent.futures`` joins its threads
    at exit), a thread a handler started. One that does not end held ``weft serve``
    past its bound, for good, and exiting 0. The deadline a stop signal armed stays,
    with what it has left (at least ``EXIT_GRACE``); with none armed, one of
    ``grace`` plus the margin is. Past it the process exits with status 4, the
    threads' stacks written, as a stop that left tasks behind does.
    """
    left = deadline.remaining()
    deadline.disarm()
    seconds = grace + DEADLINE_MARGIN if left is None else max(left, EXIT_GRACE)
    # The exit's flush of a stalled stderr ends first: racing the deadline's thread
    # into the interpreter's finalization, where that thread can no longer run, it
    # left the process exiting by faulthandler's backstop, or not at all.
    flush_at_exit_by(time.monotonic() + seconds - EXIT_FLUSH_MARGIN)
    deadline.arm(
        seconds,
        "the stop ended, but the process did not exit within its bound: a thread that "
        "is not a daemon still runs (a call in an executor, such as asyncio.to_thread's, "
        "or a thread a handler started: the stacks below name it); it is abandoned "
        f"(exit status {EXIT_TASKS_LEFT})",
    )


def _serve_until_stopped(
    server: Any,
    graceful_timeout: float,
    wakeup: Wakeup,
    notifier: Notifier,
    ready: Callable[[], None] | None,
    hand_over: Callable[[int, Notifier], int] | None,
    drain: DrainRequest,
    shutdown: DrainRequest,
    stop_began: list[float],
) -> int:
    """The body of :func:`_run`, inside its signal handling."""
    drain.wake = shutdown.wake = wakeup.wake
    try:
        server.run()
    except (WeftError, OSError) as exc:
        return _fail(exc, EXIT_RUNTIME)
    if ready is not None:  # before the log line, which tests and tools wait for
        try:
            ready()
        except (WeftError, OSError) as exc:  # the control socket's configured path is taken
            server.stop(timeout=0.0)
            return _fail(exc, EXIT_RUNTIME)
    for address in server.addresses:
        log.info("listening on %s (manager %s)", address, server.manager_name)
    notifier.ready("serving on " + ", ".join(server.addresses))

    ended = threading.Event()

    def watch() -> None:
        server.wait()
        ended.set()
        wakeup.wake()

    threading.Thread(target=watch, name="weft serve: wait", daemon=True).start()
    if notifier.watchdog is not None:
        _keep_alive(server, notifier, notifier.watchdog, ended)
    stop: int | None = None
    while stop is None and not ended.is_set() and not drain.asked.is_set():
        if shutdown.asked.is_set():
            stop = signal.SIGTERM  # the shutdown port's request: stop as on SIGTERM
            break
        received = wakeup.wait(_WAKE_INTERVAL)
        # A stop wins over what came with it: Python runs pending handlers in signal
        # number order, so a HUP (1) sent just after a TERM (15) was acted on first,
        # and the hand-over it began made the TERM's batch the old loop's, unread:
        # the process served on as a supervisor.
        stop = next((s for s in received if s in STOP_SIGNALS or s == signal.SIGQUIT), None)
        for signum in () if stop is not None else received:
            name = signal.Signals(signum).name
            if signum == signal.SIGUSR1:
                log.info("received SIGUSR1: reopened %d log file(s)", reopen_log_files())
            elif hand_over is None:  # a worker: the supervisor's signals
                log.warning("received %s: ignored by a worker; signal the supervisor", name)
            elif signum == signal.SIGTTOU:
                log.warning("received SIGTTOU: one process is the fewest; nothing to do")
            else:
                return hand_over(signum, notifier)
    if stop is None and drain.asked.is_set():
        # The process ends once drained: systemd is told, as on TERM (and as a
        # supervisor's drain tells it), where one process said nothing. Told even
        # if the server has ended already (nothing was open, and this thread came
        # late, under load): it was not told then, a fresh-clone run found.
        notifier.stopping("draining")
        if not ended.is_set():
            timeout = graceful_timeout if drain.timeout is None else drain.timeout
            stop = _drain(server, timeout, wakeup, shutdown, drain)
            if stop is None:
                return _drained(server)
    if stop is not None:
        status = _stop_for(server, stop, graceful_timeout, shutdown, notifier, stop_began)
        _ignored_while_stopping(wakeup)
        if status is not None:
            return status
    if server.error is not None:
        return _fail(f"server stopped: {server.error}", EXIT_RUNTIME)
    # Stopped by itself: a worker retired by its supervisor (a reload, a recycle).
    return _drained(server) if server.stats().get("left_behind", 0) else 0


def _ignored_while_stopping(wakeup: Wakeup) -> None:
    """Say which signals the stop that has just ended left unanswered, as a supervisor does.

    A HUP, USR2, TTIN or TTOU during a stop has nothing left to act on; it went
    without a line on one process. USR1 still reopens the log files.
    """
    for signum in dict.fromkeys(wakeup.wait(0)):
        if signum == signal.SIGUSR1:
            log.info("received SIGUSR1: reopened %d log file(s)", reopen_log_files())
        elif signum in CONTROL_SIGNALS:
            log.info("received %s while stopping: ignored", signal.Signals(signum).name)


def _stop_for(
    server: Any,
    stop: int,
    graceful_timeout: float,
    shutdown: DrainRequest,
    notifier: Notifier,
    stop_began: list[float],
) -> int | None:
    """Stop ``server`` for signal ``stop`` (QUIT: at once); an exit status, or None for 0.

    ``stop_began`` holds when the TERM or INT that began the stop came, if one did.
    """
    notifier.stopping("stopping")
    quick = stop == signal.SIGQUIT
    if stop_began:
        # A repeat of the request sent within its window is ignored (on_signal); after
        # it the signals get their default action back, below.
        time.sleep(max(0.0, stop_began[0] + STOP_REPEAT_WINDOW - time.monotonic()))
    # A second SIGINT/SIGTERM while stopping gracefully quits at once, by the signal's
    # default action: it works even with a handler blocking the main thread.
    Wakeup.default(STOP_SIGNALS)
    if quick:
        log.info("received SIGQUIT: stopping at once")
    elif shutdown.asked.is_set():
        log.info(
            "shutdown port: stopping (graceful timeout %ss; SIGTERM quits at once)",
            f"{graceful_timeout:g}",
        )
    else:
        log.info(
            "received %s: stopping (graceful timeout %ss; send it again to quit at once)",
            signal.Signals(stop).name,
            f"{graceful_timeout:g}",
        )
    _ends_with_the_stop()
    if server.stop(timeout=0.0 if quick else graceful_timeout):
        log.info("stopped")
        return None
    left = server.stats().get("left_behind", 0)
    log.warning(
        "stopped: connections still open after %ss had to be cut off%s",
        f"{0.0 if quick else graceful_timeout:g}",
        f"; {left} task(s) ignored it and are abandoned (exit status {EXIT_TASKS_LEFT})"
        if left
        else "",
    )
    return EXIT_TASKS_LEFT if left else None


def _drain(
    server: Any, timeout: float, wakeup: Wakeup, shutdown: DrainRequest, drain: DrainRequest
) -> int | None:
    """``weft ctl drain``: stop accepting, wait until idle or ``timeout`` (then cut).

    Stop requests still count meanwhile, as they mean the same with one process as
    with ``--workers``: returns the signal to stop for (SIGTERM, SIGINT, SIGQUIT;
    SIGTERM for the shutdown port's), or None once drained. A later drain with an
    earlier deadline (``drain.until``) brings the cut forward.
    """
    log.info("draining: no new connections; exiting when idle, or in %ss", f"{timeout:g}")
    # The listeners were closed by the request itself (weft ctl's thread, before it
    # answers); closing them here too, racing it, could let its answer go first.
    until = time.monotonic() + timeout
    while not server.wait(0):
        if shutdown.asked.is_set():
            return signal.SIGTERM
        if drain.until is not None:
            until = min(until, drain.until)
        left = until - time.monotonic()
        if left <= 0:
            _ends_with_the_stop()
            server.stop(timeout=0.0)
            break
        for signum in wakeup.wait(min(left, _WAKE_INTERVAL)):
            if signum in STOP_SIGNALS or signum == signal.SIGQUIT:
                return signum
            if signum == signal.SIGUSR1:
                log.info("received SIGUSR1: reopened %d log file(s)", reopen_log_files())
            else:
                log.warning("received %s while draining: ignored", signal.Signals(signum).name)
    return None


def _ends_with_the_stop() -> None:
    """This process exits once the stop that follows ends.

    If the stop must interrupt, it moves every thread onto one CPU
    (``_osthreads.OneCpu``); they stay there, so a task spinning through its
    interruption cannot hold the exit, or its last resort, in a GIL convoy. Only
    for a final stop: a process that goes on (a hand-over's drain, which re-executes
    into a supervisor) would pass the one CPU on to every worker it forks.
    """
    one_cpu.stay = True


def _drained(server: Any) -> int:
    left = server.stats().get("left_behind", 0)
    if left:
        log.warning("drained: %d task(s) ignored the stop and are abandoned", left)
        return EXIT_TASKS_LEFT
    log.info("drained")
    return 0


def _keep_alive(server: Any, notifier: Notifier, interval: float, ended: threading.Event) -> None:
    """Send systemd WATCHDOG=1 every ``interval`` while the runtime's loop answers.

    The probe runs in the loop (``run_in_loop``): a blocked gevent hub or trio loop
    stops the pings, and systemd's WatchdogSec= then restarts the service.
    """
    runtime = server.task_manager.runtime

    def ping() -> None:
        while not ended.wait(interval):
            if runtime.run_in_loop(_nothing, interval):
                notifier.alive()

    threading.Thread(target=ping, name="weft serve: watchdog", daemon=True).start()


def _nothing() -> None:
    """Run in the runtime's loop by the watchdog: getting there is the test."""


#: What ``weft serve`` and ``--check-config`` say when no handler is given.
NO_HANDLER = "no handler: give one as `weft serve module:attribute`, or set handler in weft.toml"


def import_handler(spec: str) -> Callable[..., Any]:
    """Import ``module:attribute`` (attribute may be dotted), as gunicorn does.

    The current directory is put on ``sys.path`` first, so ``weft serve app:handle``
    finds ``./app.py``. Raises HandlerImportError with a one-line reason.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise HandlerImportError(f"handler {spec!r} must be written 'module:attribute'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the module's own errors too: one line, no traceback
        # The module's own text, escaped: a line break in it split the one line in two.
        raise HandlerImportError(
            f"cannot import handler {spec!r}: {type(exc).__name__}: {escape_for_log(exc)}"
        ) from exc
    except SystemExit as exc:  # its status passed through as weft's, unexplained
        raise HandlerImportError(
            f"cannot import handler {spec!r}: the module called sys.exit({exc.code!r}) as it"
            " was imported (code meant to run only as a script needs an"
            " `if __name__ == '__main__':` guard)"
        ) from None
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            close = difflib.get_close_matches(part, [n for n in dir(obj) if n[:1] != "_"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise HandlerImportError(
                f"cannot import handler {spec!r}: AttributeError: {escape_for_log(exc)}{hint}"
            ) from exc
    if not callable(obj):
        raise HandlerImportError(
            f"handler {spec!r} is a {type(obj).__name__}, not a function or other callable"
        )
    result: Callable[..., Any] = obj
    return result


# -- weft managers ----------------------------------------------------------------------


def _managers(ns: argparse.Namespace) -> int:
    try:
        specs = _registry.available_managers()
        broken = _registry.broken_plugins()
    except WeftError as exc:  # e.g. two distributions claim one name
        return _fail(exc, EXIT_RUNTIME)
    if specs:
        rows = [("NAME", "DISTRIBUTION", "VERSION", "KIND", "DESCRIPTION")]
        rows += [
            (s.name, s.distribution or "-", s.version or "-", s.handler_kind, s.description)
            for s in sorted(specs.values(), key=lambda s: s.name)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
            print("  ".join([*cells, row[4]]).rstrip())
    skipped = _registry.left_out()
    if skipped:
        # WEFT_LOAD_PLUGINS= (empty) loads none: "none installed" misled.
        env = _registry.LOAD_PLUGINS_ENV
        note = (
            f"{env}={os.environ.get(env, '')!r} leaves out "
            + ", ".join(escape_for_log(s) for s in skipped)
            + f"; name them in {env}, or unset it to load every plugin"
        )
        print(f"no task managers loaded: {note}" if not specs else f"\n{note}")
    elif not specs:
        print(f"no task managers installed: {_registry.install_hint()}")
    if broken:
        print("\nbroken plugins (not loaded):")
        for b in broken:
            dist = " ".join(p for p in (b.distribution, b.version) if p)
            # A plugin's own text (its import error): escaped, so it cannot drive the
            # terminal (an ESC sequence) or fake a line of the listing.
            line = f"{b.name}" + (f" ({dist})" if dist else "") + f": {b.error}"
            print("  " + escape_for_log(line))
    return 0


# -- weft conformance ---------------------------------------------------------------------


#: What the conformance suite needs beyond weft-core: pytest, pytest-timeout, trustme.
TESTING_EXTRA = "pip install 'weft-core[testing]'"


def _conformance(ns: argparse.Namespace) -> int:
    if not ns.name:
        return _fail(
            "name the installed manager to test: weft conformance NAME [PYTEST_ARGS ...]"
            " (see `weft managers`)",
            EXIT_USAGE,
        )
    if importlib.util.find_spec("pytest") is None:
        return _fail(f"the conformance suite runs on pytest: {TESTING_EXTRA}", EXIT_USAGE)
    try:
        spec = _registry.get_manager_spec(ns.name)
    except UnknownManagerError as exc:  # what is installed, what to install, a near name
        return _fail(f"{exc}; see `weft managers`", EXIT_USAGE)
    except WeftError as exc:  # installed but broken (an import error, a name taken)
        return _fail(exc, EXIT_USAGE)
    if importlib.util.find_spec("pytest_timeout") is None:
        print_line(
            stderr_line(
                "warning: pytest-timeout is not installed, so a test that hangs hangs "
                f"this run instead of failing: {TESTING_EXTRA}",
                logging.WARNING,
            )
        )
    import tempfile

    import pytest

    # pytest's configuration and conftest.py files come from the directory it starts
    # in; typed inside a manager author's project (its addopts "-n auto", its
    # conftest), the suite failed to start there and passed elsewhere. An empty
    # config in a directory of its own is the run's whole configuration, no
    # conftest.py above the suite's own directory is read, and nothing is cached.
    # The working directory stays: relative paths in the caller's arguments
    # (--junitxml=out.xml) mean what they say.
    # Found, not imported: the suite's modules must first be imported inside pytest,
    # which rewrites their asserts.
    suite = Path(__file__).with_name("testing") / "suite.py"
    with tempfile.TemporaryDirectory(prefix="weft-conformance-") as home:
        config = Path(home, "pytest.ini")
        config.write_text("[pytest]\n")
        args = [
            "-c",
            str(config),
            "--rootdir",
            home,
            "--confcutdir",
            str(suite.parent),
            "-p",
            "no:cacheprovider",
            "-p",
            "weft_core.testing.plugin",
            # The suite's file, not --pyargs and a module name: given no path that
            # exists, pytest loads the conftest.py of the directory it started in.
            str(suite),
            "--weft-manager",
            spec.name,
            # A socket or descriptor the manager leaks is a failure, not a warning nobody
            # reads; and why a test skipped (no trustme: the TLS tests) is said at the end.
            "-W",
            "error::ResourceWarning",
            "-W",
            "error::pytest.PytestUnraisableExceptionWarning",
            "-rs",
            *ns.pytest_args,  # after ours: the caller's -W filters win
        ]
        return int(pytest.main(args))
