"""``weft serve --reload``: restart the server when its source changes (development only).

A parent process that never imports the handler runs ``weft serve`` (the same
command line, with ``--no-reload``) as a child, watches the handler's source tree
and the config file, and on a change stops the child gracefully (SIGTERM) and starts
a new one, which imports the code as it is now. A child that fails to start (a
syntax error just saved) is waited for: the next change starts it again. SIGTERM or
SIGINT to the parent stops the child gracefully and the parent exits with its status.

It watches with ``watchfiles`` when installed (``pip install weft-core[reload]``),
else by polling ``os.stat`` every :data:`POLL_INTERVAL` seconds. Never on by
default: a service must not restart itself because a file changed.

What does not live here: serving (the child is a plain ``weft serve``).
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ._exits import EXIT_OK
from ._jobcontrol import OWN_PROCESS_GROUP
from ._logsafe import escape_for_log
from ._wakeup import Wakeup

__all__ = [
    "PARENT_ENV",
    "POLL_INTERVAL",
    "Watcher",
    "reload_forever",
    "source_root",
    "watch_parent",
]

log = logging.getLogger("weft.reload")

#: How often the polling watcher looks: quick enough that a saved file serves before
#: the developer has switched windows, cheap enough for a few thousand files.
POLL_INTERVAL = 0.5
#: What is watched: source and config, not bytecode or editors' swap files.
WATCHED_SUFFIXES = frozenset({".py", ".toml", ".json", ".ini", ".cfg", ".pyi"})
#: Directories never walked: caches, virtual environments, version control.
_SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "venv", ".venv"})
#: How long a stopping child gets beyond its graceful timeout before it is killed.
_STOP_MARGIN = 10.0

#: What stops the parent, and the child with it (gracefully; QUIT at once).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
#: The rest of weft serve's signals: HUP restarts the child (a reload, as a change
#: does), USR1 is passed on (reopen the log files); the others mean workers, which a
#: --reload run does not have, and are logged.
_OTHER_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
#: The child's environment variable naming its parent: a child whose parent is gone
#: (killed, say) stops instead of serving on as an orphan holding the port.
PARENT_ENV = "WEFT_RELOAD_PARENT"


def source_root(handler: str, cwd: Path) -> Path:
    """The directory holding the handler's top-level package or module; ``cwd`` if not found.

    Found without importing it: a package's ``__init__`` may have side effects. And
    without putting ``cwd`` on this process's own path, which then found the modules
    it imports next there first: a ``watchfiles.py`` another user left in the
    directory ran in the parent, root's under ``--user``.
    """
    top = handler.partition(":")[0].split(".")[0]
    try:
        spec = importlib.machinery.PathFinder.find_spec(top, [str(cwd), *sys.path])
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return cwd
    # A package's origin is its __init__.py, a module's its file: the parent either way.
    return Path(spec.origin).parent


def _files(roots: Sequence[Path]) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
            continue
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith(".")]
            for name in names:
                if Path(name).suffix in WATCHED_SUFFIXES:
                    yield Path(folder, name)


def _snapshot(roots: Sequence[Path]) -> dict[Path, tuple[int, int]]:
    found = {}
    for path in _files(roots):
        try:
            stat = path.stat()
        except OSError:  # removed while walking
            continue
        found[path] = (stat.st_mtime_ns, stat.st_size)
    return found


class Watcher:
    """Tells when a watched file changed: ``watchfiles`` if installed, else polling."""

    def __init__(self, roots: Sequence[Path], stop: threading.Event) -> None:
        self.roots = list(roots)
        self._stop = stop

    def changes(self) -> Iterator[set[Path]]:
        """Yield the changed paths, once per batch of changes, until ``stop`` is set."""
        try:
            import watchfiles  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            yield from self._poll()
            return
        for batch in watchfiles.watch(
            *self.roots, stop_event=self._stop, watch_filter=self._watched, yield_on_timeout=False
        ):
            yield {Path(path) for _, path in batch}

    @staticmethod
    def _watched(change: object, path: str) -> bool:
        parts = Path(path).parts
        return Path(path).suffix in WATCHED_SUFFIXES and not any(
            p in _SKIPPED_DIRS or p.startswith(".") for p in parts[:-1]
        )

    def _poll(self) -> Iterator[set[Path]]:
        before = _snapshot(self.roots)
        while not self._stop.wait(POLL_INTERVAL):
            now = _snapshot(self.roots)
            changed = {p for p in before.keys() | now.keys() if before.get(p) != now.get(p)}
            before = now
            if changed:
                yield changed


def reload_forever(command: Sequence[str], roots: Sequence[Path], graceful_timeout: float) -> int:
    """Run ``command`` (a ``weft serve`` child) and restart it on changes under ``roots``.

    Returns the child's exit status once SIGTERM or SIGINT stopped it.
    """
    stop = threading.Event()
    restart = threading.Event()

    def watch() -> None:
        try:
            for changed in Watcher(roots, stop).changes():
                # Escaped: a file's name is anyone's who may write to the tree.
                names = ", ".join(sorted(escape_for_log(p) for p in changed)[:3])
                log.info("reloading: %s changed", names + (" ..." if len(changed) > 3 else ""))
                restart.set()
                wakeup.wake()
        except Exception as exc:  # a tree too deep to walk (RecursionError), say
            # Said, where the thread died with a traceback and the parent served on
            # as if it still watched.
            log.error(
                "--reload: watching for changes failed (%s: %s); changes are no longer"
                " seen: restart weft serve",
                type(exc).__name__,
                escape_for_log(exc),
            )

    log.info("watching %s for changes (--reload)", ", ".join(map(escape_for_log, roots)))
    with Wakeup((*_STOP_SIGNALS, *_OTHER_SIGNALS)) as wakeup:
        threading.Thread(target=watch, name="weft reload: watch", daemon=True).start()
        child = _start(command)
        try:
            while True:
                for signum in wakeup.wait(POLL_INTERVAL):
                    if signum in _STOP_SIGNALS:
                        return _stop_child(child, graceful_timeout, signum)
                    name = signal.Signals(signum).name
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP: reloading")
                        restart.set()
                    elif signum == signal.SIGUSR1 and child.poll() is None:
                        child.send_signal(signum)
                    else:
                        log.warning("received %s: ignored under --reload (no workers)", name)
                if restart.is_set():
                    restart.clear()
                    _stop_child(child, graceful_timeout, signal.SIGTERM)
                    child = _start(command)
        finally:
            stop.set()
            if child.poll() is None:
                child.kill()
                child.wait()


def _start(command: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start the child in a process group of its own, knowing its parent.

    Its own group: a terminal's Ctrl-C reaches only the parent, which passes one
    SIGINT on; had the child got the terminal's too, the forwarded one would be its
    second, "quit at once", cutting what it was serving.
    """
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    return subprocess.Popen(command, env=env, **OWN_PROCESS_GROUP)


def watch_parent(stop: Callable[[], None]) -> None:
    """In a ``--reload`` child: call ``stop()`` once the parent that started it is gone.

    A parent killed outright (SIGKILL, a crash) cannot stop its child; the child,
    re-parented, sees it and stops gracefully rather than serve on as an orphan.
    """
    raw = os.environ.pop(PARENT_ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)

    def gone() -> None:
        log.warning("the --reload parent (pid %d) is gone: stopping", parent)
        stop()

    when_parent_gone(parent, gone, "weft reload: parent")


def when_parent_gone(parent: int, call: Callable[[], object], name: str) -> None:
    """Call ``call()`` from a daemon thread (``name``) once ``parent`` is no longer ours."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_INTERVAL)
        call()

    threading.Thread(target=watch, name=name, daemon=True).start()


def _stop_child(child: subprocess.Popen[bytes], graceful_timeout: float, signum: int) -> int:
    if child.poll() is None:
        child.send_signal(signum)
        try:
            child.wait(graceful_timeout + _STOP_MARGIN)
        except subprocess.TimeoutExpired:
            log.warning("the server did not stop in time: killing it")
            child.kill()
            child.wait()
    code = child.returncode
    return EXIT_OK if code in (-signal.SIGTERM, -signal.SIGINT) else code
