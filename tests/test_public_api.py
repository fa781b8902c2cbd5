"""The public surface DESIGN.md fixes, and what importing weft_core must not do."""

from __future__ import annotations

import subprocess
import sys

import pytest

import weft_core

#: Names DESIGN.md sections 2-4 promise, plus the manager-author API.
DESIGN_NAMES = {
    "Server",
    "TaskManager",
    "ManagerFullError",
    "TaskShutdown",
    "shutdown_requested",
    "detach",
    "current_connection",
    "available_managers",
    "create_manager",
}
MANAGER_AUTHOR_NAMES = {
    "ManagerSpec",
    "hookimpl",
    "Runtime",
    "SyncRuntime",
    "AsyncRuntime",
    "SpawnsSoon",
    "SyncSlots",
    "AsyncSlots",
    "HandlerKind",
    "Conformance",
    "check_runtime",
    "BLOCKING_RUNTIME",
    "BlockingRuntime",
    "TaskState",
    "TaskTable",
    "current_task",
    "run_task",
    "run_async_task",
    "INTERRUPT_GRACE",
}
#: A program's or a test's own hooks, registered without an entry point (hooks.md).
PLUGIN_NAMES = {"register_plugin", "unregister_plugin"}
ERRORS = {
    "WeftError",
    "ConfigError",
    "BindError",
    "HandlerKindError",
    "PluginError",
    "ServerError",
    "UnknownManagerError",
}


def test_public_names_are_exported() -> None:
    assert set(weft_core.__all__) >= DESIGN_NAMES
    # connections()'s items are ConnectionInfo with its age and byte counts: a name to
    # annotate them by (a list[ConnectionInfo] loses .age to mypy).
    shown = {"ConnectionInfo", "ConnectionSnapshot"}
    promised = DESIGN_NAMES | MANAGER_AUTHOR_NAMES | PLUGIN_NAMES | ERRORS | shown
    assert set(weft_core.__all__) == promised
    for name in weft_core.__all__:
        assert getattr(weft_core, name) is not None


def test_errors_share_a_base() -> None:
    for name in ERRORS - {"WeftError"}:
        assert issubclass(getattr(weft_core, name), weft_core.WeftError)
    assert weft_core.ManagerFullError.__mro__[1] is weft_core.WeftError
    # TaskShutdown must not be swallowed by a handler's `except Exception`.
    assert not issubclass(weft_core.TaskShutdown, Exception)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )


def test_import_is_light() -> None:
    """import weft_core pulls in no runtime, no ssl, no concurrent.futures, no pytest, no plugin."""
    result = _python(
        "import sys, weft_core\n"
        "heavy = [m for m in ('gevent', 'trio', 'ssl', 'concurrent.futures', 'weft_threads',"
        " 'pytest', 'weft_core.testing')"
        " if m in sys.modules]\n"
        "print(heavy)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_gevent_monkey_patch_after_import_is_silent() -> None:
    """Monkey-patching after `import weft_core` gives no warning (nothing was imported too early)."""
    pytest.importorskip("gevent")
    result = _python(
        "import weft_core\n"
        "import gevent.monkey\n"
        "gevent.monkey.patch_all()\n"
        "import weft_core.testing\n"
        "print('ok')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "MonkeyPatchWarning" not in result.stderr


def test_runtime_protocols_declare_every_member_with_a_docstring() -> None:
    """Each member a runtime must provide is declared on its protocol, methods documented."""
    from weft_core._protocol import protocol_members

    sync = set(protocol_members(weft_core.SyncRuntime))
    assert {"run_in_loop", "adopt_listener", "wake_listener", "close", "slots", "sleep"} <= sync
    assert {"wrap_connection", "wrap_tls", "kind", "conn_is_stream"} <= sync
    assert set(protocol_members(weft_core.AsyncRuntime)) == sync | {
        "aclose",
        "within",
        "tls_errors",
    }
    for protocol in (weft_core.SyncRuntime, weft_core.AsyncRuntime, weft_core.TaskManager):
        for name in protocol_members(protocol):
            member = getattr(protocol, name, None)
            if callable(member):
                assert member.__doc__, f"{protocol.__name__}.{name} has no docstring"


def test_register_plugin_adds_hooks_until_unregistered() -> None:
    """A program's own hooks, without an entry point: called by every Server until removed."""
    started: list[object] = []

    class Watcher:
        @weft_core.hookimpl
        def weft_server_started(self, server: object, addresses: object) -> None:
            started.append(server)

    class Misspelt:
        @weft_core.hookimpl
        def weft_server_begun(self, server: object) -> None:  # no such hook
            pass

    watcher = Watcher()
    name = weft_core.register_plugin(watcher, name="test-watcher")
    try:
        assert name == "test-watcher"
        with pytest.raises(weft_core.PluginError, match="test-watcher"):
            weft_core.register_plugin(Watcher(), name="test-watcher")  # the name is taken
        with pytest.raises(weft_core.PluginError, match="weft_server_begun"):
            weft_core.register_plugin(Misspelt(), name="test-misspelt")
        with weft_core.Server(lambda conn: None) as server:
            pass
        assert started == [server]
    finally:
        assert weft_core.unregister_plugin(watcher) is watcher
    with weft_core.Server(lambda conn: None):
        pass
    assert len(started) == 1
    assert weft_core.unregister_plugin(watcher) is None


def test_importing_weft_elsewhere_than_linux_says_so_in_one_line() -> None:
    """Seen (packaging probe F4): on Windows ``import weft_core`` failed on ``fcntl``,
    and on macOS the threads manager's ``run()`` on a missing ``os.pipe2``: weft is
    Linux's, and says so when imported elsewhere."""
    import subprocess
    import sys

    for platform in ("darwin", "win32", "freebsd14"):
        done = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.platform = {platform!r}; import weft_core"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        last = done.stderr.strip().splitlines()[-1]
        assert last == (
            "ImportError: weft runs on Linux only (it uses pipe2, memfd, TCP_INFO, "
            f"SO_REUSEPORT as Linux has them); this is {platform!r}"
        ), done.stderr
