"""The plugin registry: real installed plugins in subprocesses, in-process ones via register()."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest
from _plugin_dists import PluginDists
from _plugin_dists import plugin_dists as plugin_dists  # the session fixture
from _serving import environment

from weft_core import (
    BLOCKING_RUNTIME,
    AsyncRuntime,
    ConfigError,
    ManagerSpec,
    PluginError,
    Server,
    SyncRuntime,
    TaskManager,
    _registry,
    check_runtime,
    hookimpl,
)

GOOD, DUP, BROKEN, BADFACTORY, THREADS = (
    "weft-test-good",
    "weft-test-dup",
    "weft-test-broken",
    "weft-test-badfactory",
    "weft-threads",
)

# The first test to use a distribution installs it with pip; allow for that.
installed = pytest.mark.timeout(180)


# -- installed plugins (each check in a subprocess) ------------------------------


@installed
def test_good_plugin_listed_with_distribution_and_version(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe([GOOD], create=[("dummy", {"limit": 3})])
    assert report["managers"] == {"dummy": [GOOD, "0.1.0", "records tasks"]}
    assert report["broken"] == []
    assert report["create"] == [{"ok": "DummyManager", "limit": 3}]


@installed
def test_importing_weft_core_loads_no_plugin(plugin_dists: PluginDists) -> None:
    code = "import sys, weft_core; print(sorted(m for m in sys.modules if 'test_good' in m))"
    assert plugin_dists.python(["-c", code], [GOOD]).strip() == "[]"


@installed
def test_broken_plugin_is_listed_and_breaks_nothing_else(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe(
        [BROKEN, THREADS, GOOD], get=["broken"], create=[("threads", {"limit": 2})]
    )
    assert report["broken"] == [
        {
            "name": "broken",
            "distribution": BROKEN,
            "version": "0.3.0",
            "error": "ImportError: weft_test_broken needs the 'no_such_runtime' package",
        }
    ]
    assert sorted(report["managers"]) == ["dummy", "threads"]
    assert report["create"] == [{"ok": "ThreadManager", "limit": 2}]
    assert report["get"]["broken"] == {
        "error": "PluginError",
        "message": f"plugin 'broken' (distribution {BROKEN} 0.3.0) failed to load: ImportError: "
        "weft_test_broken needs the 'no_such_runtime' package; fix or uninstall it",
        "cause": None,
    }


@installed
def test_duplicate_name_is_an_error_naming_both(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe([GOOD, DUP], get=["dummy"])
    # Neither claimant wins; the other manager of the clashing plugin still works.
    assert sorted(report["managers"]) == ["dup-only"]
    error = report["get"]["dummy"]
    assert error["error"] == "PluginError"
    assert f"{DUP} 0.2.0" in error["message"]
    assert f"{GOOD} 0.1.0" in error["message"]
    assert sorted(b["distribution"] for b in report["broken"]) == [DUP, GOOD]
    assert all(b["error"] == f"PluginError: {error['message']}" for b in report["broken"])


@installed
def test_same_distribution_twice_on_path_is_loaded_once(
    plugin_dists: PluginDists, tmp_path: Any
) -> None:
    copy = shutil.copytree(plugin_dists.target(GOOD), tmp_path / "again")
    report = plugin_dists.probe([GOOD], extra_paths=[copy])
    assert report["managers"] == {"dummy": [GOOD, "0.1.0", "records tasks"]}
    assert report["broken"] == []


@installed
def test_unknown_name_lists_installed_and_suggests_closest(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe([GOOD, THREADS], get=["dumy", "zzz"])
    dumy, zzz = report["get"]["dumy"], report["get"]["zzz"]
    assert dumy["error"] == zzz["error"] == "UnknownManagerError"
    assert "installed: dummy, threads" in dumy["message"]
    assert "did you mean 'dummy'?" in dumy["message"]
    # A typo is never also told to install its misspelt name, which anyone could publish.
    assert "pip install" not in dumy["message"]
    assert "did you mean" not in zzz["message"]
    assert "pip install weft-zzz" in zzz["message"]


@installed
def test_a_typo_of_a_manager_we_publish_is_not_told_to_install_the_typo(
    plugin_dists: PluginDists,
) -> None:
    """Seen (packaging probe F8): ``-k gevnet`` said "did you mean 'gevent'?" and then
    "pip install weft-gevnet", a name nobody publishes (an open door to typosquatting)."""
    report = plugin_dists.probe([GOOD], get=["gevnet", "thread", "uvloop"])
    for name, meant in (("gevnet", "gevent"), ("thread", "threads")):
        message = report["get"][name]["message"]
        assert message.endswith(f"did you mean {meant!r}?"), message
        assert "pip install" not in message
    uvloop = report["get"]["uvloop"]["message"]
    assert "--manager asyncio -o loop=uvloop" in uvloop
    assert "pip install 'weft-asyncio[uvloop]'" in uvloop
    assert "weft-uvloop" not in uvloop


@installed
def test_known_manager_not_installed_says_what_to_install(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe([GOOD], get=["threads", "gevent", "trio", "asyncio"])
    for name in ("threads", "gevent", "trio", "asyncio"):
        error = report["get"][name]
        assert error["error"] == "UnknownManagerError"
        assert "(installed: dummy)" in error["message"]
        assert error["message"].endswith(f"install it with: pip install weft-{name}")


@installed
@pytest.mark.parametrize("selection", [GOOD, "dummy", f" {GOOD.upper()} ,nothing"])
def test_weft_load_plugins_selects_by_entry_point_or_distribution(
    plugin_dists: PluginDists, selection: str
) -> None:
    report = plugin_dists.probe(
        [GOOD, THREADS, BROKEN], get=["threads"], env={"WEFT_LOAD_PLUGINS": selection}
    )
    assert sorted(report["managers"]) == ["dummy"]
    assert report["broken"] == []
    message = report["get"]["threads"]["message"]
    assert "is installed, but WEFT_LOAD_PLUGINS=" in message
    assert f"distribution {THREADS} 0.1.0" in message


@installed
def test_weft_load_plugins_empty_loads_nothing(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe([GOOD, THREADS, BROKEN], env={"WEFT_LOAD_PLUGINS": ""})
    assert report["managers"] == {}
    assert report["broken"] == []


@installed
def test_factory_raising_is_a_plugin_error(plugin_dists: PluginDists) -> None:
    report = plugin_dists.probe([BADFACTORY], create=[("badfactory", {})])
    assert report["create"] == [
        {
            "error": "PluginError",
            "message": f"task manager 'badfactory' (distribution {BADFACTORY} 0.4.0) failed to "
            "start: RuntimeError: badfactory cannot find its event loop",
            "cause": "RuntimeError",
        }
    ]


# -- in-process plugins ------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The registry with no entry point loaded, forgotten again afterwards."""
    monkeypatch.setenv("WEFT_LOAD_PLUGINS", "")
    _registry.reset()
    yield _registry
    _registry.reset()


class Manager:
    """Enough of a manager for the registry to make and check one; it runs nothing."""

    runtime: Any = BLOCKING_RUNTIME

    def __init__(self, *, limit: int | None = None) -> None:
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        self.limit = limit

    def add_task(self, thunk: Callable[[], Any]) -> Hashable:
        return 1

    def remove_task(self, task_id: Hashable) -> bool:
        return False

    def stop_task(self, task_id: Hashable, timeout: float | None = None) -> bool:
        return True

    def all_tasks(self) -> list[Hashable]:
        return []


def managers_plugin(*names: str) -> object:
    class Plugin:
        @hookimpl
        def weft_managers(self) -> list[ManagerSpec]:
            return [ManagerSpec(name=n, factory=Manager, description=n) for n in names]

    return Plugin()


def returning(value: object) -> object:
    class Plugin:
        @hookimpl
        def weft_managers(self) -> object:
            if isinstance(value, Exception):
                raise value
            return value

    return Plugin()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (KeyError("boom"), "KeyError: 'boom'"),
        (None, "TypeError: weft_managers returned None; expected an iterable of ManagerSpec"),
        ("x", "TypeError: weft_managers returned 'x'; expected an iterable of ManagerSpec"),
        ([42], "TypeError: weft_managers returned 42 among its managers; expected ManagerSpec"),
        (
            ManagerSpec(name="one", factory=Manager, description=""),
            "TypeError: weft_managers returned a single ManagerSpec ('one'); "
            "return a list of them or yield each one",
        ),
    ],
)
def test_bad_weft_managers_is_broken_and_isolated(
    registry: Any, value: object, error: str
) -> None:
    registry.register(managers_plugin("good"), name="good")
    registry.register(returning(value), name="bad")
    assert list(registry.available_managers()) == ["good"]
    assert registry.broken_plugins() == [registry.BrokenPlugin("bad", None, None, error)]
    with pytest.raises(
        PluginError, match=r"plugin 'bad' \(registered in-process\) failed to load"
    ):
        registry.get_manager_spec("bad")


@pytest.mark.timeout(10)
def test_in_process_duplicate_is_an_error(registry: Any) -> None:
    registry.register(managers_plugin("same"), name="one")
    registry.register(managers_plugin("same"), name="two")
    assert registry.available_managers() == {}
    with pytest.raises(PluginError, match="'same' is claimed by more than one") as info:
        registry.get_manager_spec("same")
    assert "plugin 'one' (registered in-process)" in str(info.value)
    assert "plugin 'two' (registered in-process)" in str(info.value)


@pytest.mark.timeout(10)
def test_unregister_forgets_managers(registry: Any) -> None:
    plugin = managers_plugin("gone")
    registry.register(plugin, name="p")
    assert list(registry.available_managers()) == ["gone"]
    assert registry.unregister(plugin) is plugin
    assert registry.available_managers() == {}
    assert registry.unregister(name="p") is None


@pytest.mark.timeout(10)
def test_create_manager_passes_options_and_normalises_name(registry: Any) -> None:
    registry.register(managers_plugin("mine"))
    manager = registry.create_manager(" Mine ", limit=4)
    assert isinstance(manager, Manager)
    assert manager.limit == 4


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"limt": 2},
            r"'mine'.*unexpected keyword argument 'limt'.*did you mean 'limit'.*"
            r"options given: limt=2",
        ),
        # limit is checked by the settings table before the factory sees it
        (
            {"limit": -1},
            r"^task manager 'mine', key 'manager_options.limit': expected a positive integer, "
            r"or false for no limit, got -1$",
        ),
    ],
)
def test_bad_option_is_a_config_error(
    registry: Any, options: dict[str, Any], expected: str
) -> None:
    registry.register(managers_plugin("mine"))
    with pytest.raises(ConfigError, match=expected):
        registry.create_manager("mine", **options)


@pytest.mark.timeout(10)
def test_unknown_hook_and_wrappers_are_refused(registry: Any) -> None:
    class Typo:
        @hookimpl
        def weft_manager(self) -> list[ManagerSpec]:
            return []

    class Wrapper:
        @hookimpl(wrapper=True)
        def weft_server_started(self, server: object, addresses: list[str]) -> Any:
            return (yield)

    with pytest.raises(PluginError, match="did you mean 'weft_managers'"):
        registry.register(Typo(), name="typo")
    with pytest.raises(PluginError, match="is a wrapper"):
        registry.register(Wrapper(), name="wrapper")
    assert registry.plugin_manager().get_plugins() == set()


@pytest.mark.timeout(10)
def test_a_hook_with_an_argument_its_spec_lacks_is_refused_saying_which(registry: Any) -> None:
    """pluggy's reason is on its last line; only the first ("Plugin ... for hook ...") was kept."""

    class Misnamed:
        @hookimpl
        def weft_managers(self, limit: int) -> list[ManagerSpec]:
            return []

    with pytest.raises(PluginError) as info:
        registry.register(Misnamed(), name="misnamed")
    message = str(info.value)
    assert "for hook 'weft_managers'" in message
    assert "{'limit'} are declared in the hookimpl but can not be found in the hookspec" in message
    assert "\n" not in message, "one line"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def weft_server_started(self, server: Any, addresses: list[str]) -> None:
        self.calls.append(f"started {server} {addresses}")

    @hookimpl
    def weft_server_stopped(self, server: Any, stats: dict[str, Any]) -> None:
        self.calls.append(f"stopped {server} {stats}")

    @hookimpl
    def weft_connection_refused(self, server: Any, peer: str, reason: str) -> None:
        self.calls.append(f"refused {server} {peer} {reason}")

    @hookimpl
    def weft_handler_error(self, server: Any, connection: Any, exception: BaseException) -> None:
        self.calls.append(f"error {server} {connection} {exception!r}")


class Raiser:
    @hookimpl
    def weft_server_started(self) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def weft_server_stopped(self) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def weft_connection_refused(self) -> None:
        raise RuntimeError("plugin bug")

    @hookimpl
    def weft_handler_error(self) -> None:
        raise RuntimeError("plugin bug")


HOOK_CALLS: list[tuple[str, Callable[[Any], None], str]] = [
    (
        "weft_server_started",
        lambda h: h.server_started("srv", ["127.0.0.1:1"]),
        "started srv ['127.0.0.1:1']",
    ),
    (
        "weft_server_stopped",
        lambda h: h.server_stopped("srv", {"accepted": 0}),
        "stopped srv {'accepted': 0}",
    ),
    (
        "weft_connection_refused",
        lambda h: h.connection_refused("srv", "127.0.0.1:2", "full"),
        "refused srv 127.0.0.1:2 full",
    ),
    (
        "weft_handler_error",
        lambda h: h.handler_error("srv", "conn", ValueError("x")),
        "error srv conn ValueError('x')",
    ),
]


@pytest.mark.timeout(10)
def test_a_hook_that_keeps_raising_is_logged_once_per_interval_with_the_repeats_counted(
    registry: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(registry._hook_errors, "clock", lambda: clock[0])
    registry.register(Raiser(), name="raiser")
    with caplog.at_level(logging.ERROR, logger="weft.plugins"):
        for _ in range(50):  # a per-connection hook, once per client
            registry.hooks().connection_refused("srv", "127.0.0.1:2", "full")
            clock[0] += 0.1  # 5 s in all: within one interval
        clock[0] += registry.HOOK_ERROR_INTERVAL
        registry.hooks().connection_refused("srv", "127.0.0.1:2", "full")
    first, second = (r.getMessage() for r in caplog.records)
    assert first == (
        "plugin 'raiser' raised RuntimeError in weft_connection_refused; ignored"
        " (logged at most every 10s)"
    )
    assert second == (
        "plugin 'raiser' raised RuntimeError in weft_connection_refused (49 more time(s)"
        " since the last one logged, 15s ago); ignored (logged at most every 10s)"
    )
    assert all(r.exc_info for r in caplog.records)  # each with its traceback


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("hook", "call", "seen"), HOOK_CALLS, ids=[c[0] for c in HOOK_CALLS])
def test_lifecycle_hook_error_is_logged_and_swallowed(
    registry: Any,
    caplog: pytest.LogCaptureFixture,
    hook: str,
    call: Callable[[Any], None],
    seen: str,
) -> None:
    recorder = Recorder()
    registry.register(recorder, name="recorder")
    # pluggy calls the last registered first: the raising plugin runs before the other.
    registry.register(Raiser(), name="raiser")
    with caplog.at_level(logging.ERROR, logger="weft.plugins"):
        call(registry.hooks())
    assert recorder.calls == [seen]
    [record] = caplog.records
    assert record.name == "weft.plugins"
    assert record.getMessage() == (
        f"plugin 'raiser' raised RuntimeError in {hook}; ignored (logged at most every 10s)"
    )
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


@pytest.mark.timeout(10)
def test_hooks_is_a_singleton(registry: Any) -> None:
    assert registry.hooks() is registry.hooks()
    assert isinstance(registry.hooks(), registry.Hooks)


# -- the runtime contract, checked when a manager is made -------------------------------


class HalfAsyncRuntime:
    """An async runtime written without reading the whole contract: it lacks two members."""

    kind = "async"
    conn_is_stream = True
    tls_errors = ()

    def adopt_listener(self, sock: Any) -> Any: ...
    def wake_listener(self, listener: Any) -> None: ...
    def close(self) -> None: ...
    def slots(self, n: int) -> Any: ...
    async def sleep(self, seconds: float) -> None: ...
    def wrap_connection(self, sock: Any, idle_timeout: float | None = None) -> Any: ...
    async def within(self, seconds: float, fn: Any) -> Any: ...
    async def aclose(self, conn: Any) -> None: ...


class HalfAsyncManager(Manager):
    runtime = HalfAsyncRuntime()


@pytest.mark.timeout(10)
def test_check_runtime_names_what_is_missing_and_the_protocol() -> None:
    with pytest.raises(
        TypeError, match=r"lacks run_in_loop, wrap_tls \(see weft_core.AsyncRuntime\)"
    ):
        check_runtime(HalfAsyncRuntime())
    check_runtime(BLOCKING_RUNTIME)


@pytest.mark.timeout(10)
def test_a_runtimes_cancellations_are_optional_and_checked() -> None:
    """``cancellations`` may be left out (a runtime written before it: by name), or
    must be a tuple of exception classes: one thing else failed only as a handler
    raised, deep in the connection's task."""

    class NoneSaid(HalfAsyncRuntime):  # no cancellations: as a runtime written before them
        def run_in_loop(self, fn: Any, timeout: float | None = None) -> bool:
            return True

        def wrap_tls(self, stream: Any, context: Any) -> Any: ...

    check_runtime(NoneSaid())
    for wrong in (ValueError, [ValueError], ("CancelledError",)):

        class Odd(type(BLOCKING_RUNTIME)):  # type: ignore[misc]
            cancellations = wrong

        with pytest.raises(
            TypeError, match=r"has cancellations=.*expected a tuple of exception classes"
        ):
            check_runtime(Odd())


@pytest.mark.timeout(10)
def test_subclassing_the_protocol_gives_the_default_run_in_loop() -> None:
    class Complete(HalfAsyncRuntime, AsyncRuntime):  # type: ignore[misc]
        def wrap_tls(self, stream: Any, context: Any) -> Any: ...

    check_runtime(Complete())
    ran: list[str] = []
    Complete().run_in_loop(lambda: ran.append("here"))
    assert ran == ["here"]


@pytest.mark.timeout(10)
def test_a_method_only_inherited_from_the_protocol_counts_as_missing() -> None:
    """A runtime that subclasses the protocol, as the docs say to, inherits each
    method's ``...``: ``hasattr`` found it, and check_runtime passed a runtime with no
    ``slots``, whose None then meant no connection limit at all (a stranger's plugin,
    the docs audit's first finding). Only ``run_in_loop`` has a body to inherit."""

    class Bare(SyncRuntime):
        kind = "sync"
        conn_is_stream = False

    with pytest.raises(
        TypeError,
        match=r"lacks adopt_listener, close, sleep, slots, wake_listener, wrap_connection, "
        r"wrap_tls \(see weft_core.SyncRuntime\)",
    ):
        check_runtime(Bare())

    class AllButSlots(Bare):
        def adopt_listener(self, sock: Any) -> Any: ...
        def wake_listener(self, listener: Any) -> None: ...
        def close(self) -> None: ...
        def sleep(self, seconds: float) -> None: ...
        def wrap_connection(self, sock: Any) -> Any: ...
        def wrap_tls(self, sock: Any, context: Any) -> Any: ...

    with pytest.raises(TypeError, match=r"lacks slots \(see weft_core.SyncRuntime\)"):
        check_runtime(AllButSlots())

    class Whole(AllButSlots):
        def slots(self, n: int) -> Any: ...

    check_runtime(Whole())  # run_in_loop is inherited, and that is enough

    class SlotsOnTheInstance(AllButSlots):
        def __init__(self) -> None:
            self.slots = lambda n: None  # an attribute of its own counts

    check_runtime(SlotsOnTheInstance())
    check_runtime(BLOCKING_RUNTIME)  # weft's own subclass, which defines them all

    class StubManager(TaskManager):
        def __init__(self) -> None:
            self.limit = None

        @property
        def runtime(self) -> Any:
            return Whole()

        def add_task(self, thunk: Any) -> Any: ...

    with pytest.raises(
        ConfigError, match=r"lacks all_tasks, remove_task, stop_task \(see weft_core.TaskManager\)"
    ):
        Server(lambda conn: None, manager=StubManager())


@pytest.mark.timeout(10)
def test_create_manager_refuses_a_runtime_missing_members(registry: Any) -> None:
    class Plugin:
        @hookimpl
        def weft_managers(self) -> list[ManagerSpec]:
            return [
                ManagerSpec("half", HalfAsyncManager, "half a runtime", "async"),
                ManagerSpec("nothing", lambda **_: object(), "no manager at all"),
                ManagerSpec("wrongkind", Manager, "sync runtime, async spec", "async"),
            ]

    registry.register(Plugin(), name="plugin")
    with pytest.raises(
        PluginError,
        match=r"task manager 'half' \(registered in-process\): its runtime lacks "
        r"run_in_loop, wrap_tls \(see weft_core.AsyncRuntime\)",
    ):
        registry.create_manager("half")
    with pytest.raises(
        PluginError, match=r"'nothing'.*lacks add_task, all_tasks, limit, remove_task, runtime"
    ):
        registry.create_manager("nothing")
    with pytest.raises(PluginError, match=r"runs sync handlers, but its ManagerSpec declares"):
        registry.create_manager("wrongkind")


@pytest.mark.timeout(10)
def test_server_refuses_a_manager_instance_whose_runtime_misses_members() -> None:
    async def handle(stream: Any) -> None: ...

    with pytest.raises(
        ConfigError, match=r"lacks run_in_loop, wrap_tls \(see weft_core.AsyncRuntime\)"
    ):
        Server(handle, manager=HalfAsyncManager())


def test_weft_load_plugins_naming_nothing_installed_says_what_is() -> None:
    """A typo in WEFT_LOAD_PLUGINS was a bare line, without ``weft:`` or the name meant
    (the config check's L13)."""
    if "threads" not in _registry.available_managers():
        pytest.skip("weft-threads is not installed")
    done = subprocess.run(
        [sys.executable, "-c", "import weft_core; weft_core.available_managers()"],
        env={**environment(), "WEFT_LOAD_PLUGINS": "threadz"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (
        "weft: WEFT_LOAD_PLUGINS names 'threadz', which matches no installed plugin;"
        " did you mean 'threads'?"
    ) in done.stderr, done.stderr
