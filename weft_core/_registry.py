"""The plugin registry: loading ``weft`` entry points, finding managers, calling hooks.

Entry points are loaded one by one, each inside its own ``try`` (pluggy's
``load_setuptools_entrypoints`` lets one broken plugin abort start-up, and
records nothing about it). A plugin that fails, at import or in its
``weft_managers`` hook, is kept as a :class:`BrokenPlugin` with its distribution
and a one-line error, and everything else goes on working. Two plugins claiming one
manager name is an error naming both; neither wins.

The core calls hooks only through :class:`Hooks` (``hooks().server_started(...)``),
which calls every plugin separately and logs, never raises, what a plugin raised.

Nothing is loaded at import time: the first call that needs the plugins loads them,
and :func:`reset` forgets them so that the next call loads them again (tests do this
after changing ``WEFT_LOAD_PLUGINS``). Building the server is not done here.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from ._errors import ConfigError, PluginError, UnknownManagerError
from ._logsafe import log_untrusted_exception
from ._spec import ManagerSpec
from ._tasks import is_interruption

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from ._connection import ConnectionInfo
    from ._protocol import TaskManager
    from ._server import Server

__all__ = [
    "DEFAULT_MANAGER",
    "BrokenPlugin",
    "Hooks",
    "available_managers",
    "broken_plugins",
    "create_manager",
    "get_manager_spec",
    "hooks",
    "left_out",
    "plugin_manager",
    "register",
    "reset",
    "unregister",
]

log = logging.getLogger("weft.plugins")

#: The entry-point group plugins register under (DESIGN section 1).
ENTRY_POINT_GROUP = "weft"

#: Comma list of entry-point or distribution names to load; unset: all; empty: none.
#: The switch LLM_LOAD_PLUGINS and DATASETTE_LOAD_PLUGINS provide, for the same reasons:
#: bisecting a broken environment, and running with exactly the plugins a test wants.
LOAD_PLUGINS_ENV = "WEFT_LOAD_PLUGINS"

#: The manager used when neither the Server nor config names one.
DEFAULT_MANAGER = "threads"

#: Managers we publish ourselves, so "not installed" can say exactly what to install.
KNOWN_MANAGERS = {
    "threads": "weft-threads",
    "gevent": "weft-gevent",
    "trio": "weft-trio",
    "asyncio": "weft-asyncio",
}

#: Names people try that are an option of one of our managers, not a manager.
MANAGER_OPTIONS_NAMED = {
    "uvloop": (
        "uvloop is the asyncio manager's loop: --manager asyncio -o loop=uvloop"
        " (pip install 'weft-asyncio[uvloop]')"
    ),
}


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that failed: at import, in its ``weft_managers`` hook, or in a name clash.

    ``name`` is the entry-point name (the name given to :func:`register` for an
    in-process plugin, whose ``distribution`` and ``version`` are then None);
    ``error`` is one line, ``"ExcType: message"``.
    """

    name: str
    distribution: str | None
    version: str | None
    error: str


@dataclass(frozen=True)
class _Source:
    """Where a registered plugin came from."""

    name: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.distribution is None:
            return f"plugin {self.name!r} (registered in-process)"
        return f"plugin {self.name!r} (distribution {self.distribution} {self.version})"


@dataclass
class _State:
    """What loading the entry points produced; dropped by :func:`reset`."""

    pm: pluggy.PluginManager
    #: pluggy plugin name -> where it came from.
    sources: dict[str, _Source] = field(default_factory=dict)
    #: Entry points that failed to load.
    broken: list[BrokenPlugin] = field(default_factory=list)
    #: Entry points WEFT_LOAD_PLUGINS left out.
    skipped: list[_Source] = field(default_factory=list)
    #: The managers, computed on first use and dropped when a plugin (un)registers.
    catalog: _Catalog | None = None


@dataclass(frozen=True)
class _Catalog:
    """The result of calling every plugin's ``weft_managers``."""

    managers: dict[str, ManagerSpec]
    #: Manager name -> why nobody gets it (both claimants named).
    conflicts: dict[str, str]
    #: Plugins whose ``weft_managers`` raised or returned something else than specs.
    failed: list[BrokenPlugin]
    #: One entry per plugin claiming a name another plugin claims too.
    clashes: list[BrokenPlugin]


_lock = threading.RLock()
_state: _State | None = None
_hooks: Hooks | None = None


# -- loading -------------------------------------------------------------------


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager with weft's hook specs and every plugin loaded (built on first use)."""
    return _loaded().pm


def reset() -> None:
    """Forget the loaded plugins (and in-process registrations); the next use loads again."""
    global _state
    with _lock:
        _state = None
    _hook_errors.forget_all()


def _loaded() -> _State:
    global _state
    with _lock:
        if _state is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            state = _State(pm)
            _load_entry_points(state)
            _state = state
        return _state


def _normalize(name: str) -> str:
    """PEP 503 name normalisation, so ``weft_threads`` matches ``weft-threads``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _selection() -> set[str] | None:
    """The names WEFT_LOAD_PLUGINS selects (normalised), or None to load every plugin."""
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {_normalize(part.strip()) for part in value.split(",") if part.strip()}


def _load_entry_points(state: _State) -> None:
    from importlib.metadata import entry_points

    selected = _selection()
    matched: set[str] = set()
    seen: set[tuple[str, str, str]] = set()
    names: set[str] = set()  # what WEFT_LOAD_PLUGINS could have named
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        names.update({_normalize(ep.name), _normalize(dist or "")} - {""})
        # The same distribution found twice on sys.path yields the same entry point
        # twice; load it once (the first one, the one imports would find).
        key = (_normalize(dist or ""), ep.name, ep.value)
        if key in seen:
            continue
        seen.add(key)
        source = _Source(ep.name, dist, version)
        if selected is not None:
            chosen = {_normalize(ep.name), _normalize(dist or "")} & selected
            if not chosen:
                state.skipped.append(source)
                continue
            matched |= chosen
        _load_one(state, ep, source)
    for name in sorted((selected or set()) - matched):
        installed = sorted(names)
        close = difflib.get_close_matches(name, installed, n=1)
        log.warning(
            "weft: %s names %r, which matches no installed plugin%s",
            LOAD_PLUGINS_ENV,
            name,
            f"; did you mean {close[0]!r}?" if close else f" (installed: {', '.join(installed)})",
        )


def _load_one(state: _State, ep: EntryPoint, source: _Source) -> None:
    try:
        plugin = ep.load()
    except Exception as exc:  # anything a plugin raises at import: record it, go on
        log.debug("plugin %r failed to load", ep.name, exc_info=True)
        state.broken.append(
            BrokenPlugin(ep.name, source.distribution, source.version, _one_line(exc))
        )
        return
    if state.pm.is_registered(plugin):
        # Two entry points naming one module (aliases): it is loaded already.
        log.debug("plugin %r is %r again; not registered twice", ep.name, ep.value)
        return
    name = ep.name
    if state.pm.get_plugin(name) is not None:
        # Another distribution uses the same entry-point name. Keep both: if they
        # claim the same manager, the catalog reports the clash with both named.
        name = f"{ep.name}@{source.distribution}"
    try:
        _register_checked(state, plugin, name, source)
    except PluginError as exc:
        state.broken.append(
            BrokenPlugin(ep.name, source.distribution, source.version, _one_line(exc))
        )


def _register_checked(state: _State, plugin: object, name: str, source: _Source) -> str:
    """Register ``plugin`` with pluggy, refusing hooks weft does not have and wrappers."""
    pm = state.pm
    if pm.is_registered(plugin):
        raise PluginError(
            f"{source.describe()} cannot be registered: this object is registered already "
            f"(as {pm.get_name(plugin)!r}); unregister it first"
        )
    if pm.has_plugin(name):
        raise PluginError(
            f"{source.describe()} cannot be registered: the name {name!r} is taken; "
            "unregister that plugin first, or register this one under another name"
        )
    try:
        registered = pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        # pluggy says which hook on the first line and why on the last (an argument
        # the hookspec lacks): one line, all of it.
        why = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise PluginError(
            f"{source.describe()} cannot be registered: {why or type(exc).__name__}"
        ) from exc
    if registered is None:
        raise PluginError(f"{source.describe()} is blocked")
    problems: list[str] = []
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            if caller.spec is None and not impl.optionalhook:
                problems.append(_unknown_hook(caller.name))
            elif impl.wrapper or impl.hookwrapper:
                # Hooks are called plugin by plugin so that one failure stays isolated
                # (see Hooks); a wrapper around the others has no meaning there.
                problems.append(f"hook {caller.name!r} is a wrapper, which weft does not support")
    if problems:
        pm.unregister(plugin)
        raise PluginError(f"{source.describe()}: {'; '.join(problems)}")
    state.sources[registered] = source
    state.catalog = None
    return registered


def _unknown_hook(name: str) -> str:
    import difflib

    known = [n for n in hookspecs.__all__ if n.startswith("weft_")]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"weft has no hook {name!r} (its hooks: {', '.join(known)}){hint}"


def register(plugin: object, name: str | None = None) -> str:
    """Register an in-process plugin (a module, class or object of hook implementations).

    Public as ``weft_core.register_plugin``: for a program or a test that has its
    hooks in hand; a published plugin uses its entry point. Every ``Server`` of the
    process calls the plugin's hooks from then on, as an installed one's. Returns
    the name it was registered under. Raises :class:`~weft_core.PluginError`
    if the name is taken or the plugin implements a hook weft does not have.
    """
    with _lock:
        state = _loaded()
        label = name or getattr(plugin, "__name__", None) or repr(plugin)
        return _register_checked(state, plugin, label, _Source(label))


def unregister(plugin: object | None = None, name: str | None = None) -> object | None:
    """Unregister a plugin given by object or by name; returns it (None if it was not there)."""
    with _lock:
        state = _loaded()
        if name is None:
            if plugin is None:
                raise TypeError("unregister() needs a plugin or a name")
            name = state.pm.get_name(plugin)
        if name is None or state.pm.get_plugin(name) is None:
            return None
        removed: object | None = state.pm.unregister(plugin, name=name)
        state.sources.pop(name, None)
        state.catalog = None
        _hook_errors.forget(name)  # a plugin registered again under it starts afresh
        return removed


# -- managers ------------------------------------------------------------------


def _catalog() -> tuple[_State, _Catalog]:
    with _lock:
        state = _loaded()
        if state.catalog is None:
            state.catalog = _build_catalog(state)
        return state, state.catalog


def _build_catalog(state: _State) -> _Catalog:
    claims: dict[str, list[tuple[_Source, ManagerSpec]]] = {}
    failed: list[BrokenPlugin] = []
    # Each plugin's hook is called on its own (not pm.hook.weft_managers()), so that
    # one plugin raising loses only its own managers. Order: pluggy's call order.
    for impl in reversed(state.pm.hook.weft_managers.get_hookimpls()):
        source = state.sources.get(impl.plugin_name, _Source(impl.plugin_name))
        try:
            specs = _specs_from(impl.function())
        except Exception as exc:  # a plugin's bug: record it, go on
            log.debug("weft_managers of %s raised", source.describe(), exc_info=True)
            failed.append(
                BrokenPlugin(source.name, source.distribution, source.version, _one_line(exc))
            )
            continue
        for spec in specs:
            spec = replace(spec, distribution=source.distribution, version=source.version)
            claims.setdefault(spec.name, []).append((source, spec))

    managers: dict[str, ManagerSpec] = {}
    conflicts: dict[str, str] = {}
    clashes: list[BrokenPlugin] = []
    for name in sorted(claims):
        claimants = sorted(claims[name], key=lambda c: (c[0].distribution or "", c[0].name))
        if len(claimants) == 1:
            managers[name] = claimants[0][1]
            continue
        # Never let the first registration win: nobody gets the name.
        conflicts[name] = _conflict_message(name, [s for s, _ in claimants])
        error = f"PluginError: {conflicts[name]}"
        clashes.extend(
            BrokenPlugin(s.name, s.distribution, s.version, error) for s, _ in claimants
        )
    return _Catalog(managers, conflicts, failed, clashes)


def _specs_from(result: object) -> list[ManagerSpec]:
    """Check what a ``weft_managers`` hook returned: an iterable of ManagerSpec."""
    if isinstance(result, ManagerSpec):
        raise TypeError(
            f"weft_managers returned a single ManagerSpec ({result.name!r}); "
            "return a list of them or yield each one"
        )
    if result is None or isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
        raise TypeError(f"weft_managers returned {result!r}; expected an iterable of ManagerSpec")
    specs = list(result)
    for item in specs:
        if not isinstance(item, ManagerSpec):
            raise TypeError(
                f"weft_managers returned {item!r} among its managers; expected ManagerSpec"
            )
    return specs


def _conflict_message(name: str, claimants: list[_Source]) -> str:
    who = ", ".join(
        f"{s.distribution} {s.version}" if s.distribution else s.describe() for s in claimants
    )
    return (
        f"task manager {name!r} is claimed by more than one distribution: {who}; "
        "uninstall all but one of them"
    )


def available_managers() -> dict[str, ManagerSpec]:
    """Installed managers by name, sorted, each with its distribution and version filled in.

    A name two plugins claim is left out (see :func:`broken_plugins`).
    """
    return dict(_catalog()[1].managers)


def broken_plugins() -> list[BrokenPlugin]:
    """Plugins that failed to load, whose ``weft_managers`` failed, or that claim a taken name."""
    state, catalog = _catalog()
    return [*state.broken, *catalog.failed, *catalog.clashes]


def left_out() -> list[str]:
    """The installed plugins ``WEFT_LOAD_PLUGINS`` leaves out, described; [] when unset."""
    state, _ = _catalog()
    return [source.describe() for source in state.skipped]


def get_manager_spec(name: str) -> ManagerSpec:
    """The spec of the manager called ``name``.

    Error handling: an unknown name raises :class:`~weft_core.UnknownManagerError`
    naming the installed managers and what to install; a name two distributions
    claim, or one whose plugin is broken, raises :class:`~weft_core.PluginError`.
    """
    key = name.strip().lower()
    state, catalog = _catalog()
    if key in catalog.managers:
        return catalog.managers[key]
    if key in catalog.conflicts:
        raise PluginError(catalog.conflicts[key])
    dist_name = _normalize(f"weft-{key}")
    for broken in [*state.broken, *catalog.failed]:
        if broken.name == key or _normalize(broken.distribution or "") == dist_name:
            where = _Source(broken.name, broken.distribution, broken.version).describe()
            raise PluginError(f"{where} failed to load: {broken.error}; fix or uninstall it")
    raise UnknownManagerError(_unknown_message(key, state, catalog))


#: gunicorn's worker classes (``-k``), as a migrating user types them: weft's manager
#: for each.
GUNICORN_WORKERS = {
    "sync": "threads",
    "gthread": "threads",
    "eventlet": "gevent",
    "tornado": "asyncio",
}


def _unknown_message(name: str, state: _State, catalog: _Catalog) -> str:
    installed = ", ".join(catalog.managers) or "none"
    message = f"no task manager named {name!r} is installed (installed: {installed})"
    dist_name = _normalize(f"weft-{name}")
    for skipped in state.skipped:
        if skipped.name == name or _normalize(skipped.distribution or "") == dist_name:
            value = os.environ.get(LOAD_PLUGINS_ENV, "")
            return (
                f"task manager {name!r} is not loaded: {skipped.describe()} is installed, "
                f"but {LOAD_PLUGINS_ENV}={value!r} leaves it out; add {skipped.name!r} "
                f"to {LOAD_PLUGINS_ENV} or unset it (loaded: {installed})"
            )
    if name in KNOWN_MANAGERS:
        return f"{message}; install it with: pip install {KNOWN_MANAGERS[name]}"
    if name in MANAGER_OPTIONS_NAMED:
        return f"{message}; {MANAGER_OPTIONS_NAMED[name]}"
    if name in GUNICORN_WORKERS:  # -k sync came up 'asyncio' by its letters
        return f"{message}; gunicorn's {name!r} worker is weft's {GUNICORN_WORKERS[name]!r}"
    import difflib

    close = difflib.get_close_matches(name, [*catalog.managers, *KNOWN_MANAGERS], n=1)
    if close:
        # A typo: never also suggest installing the misspelt name, which anyone
        # could publish.
        return f"{message}; did you mean {close[0]!r}?"
    # Only a convention for third-party plugins, so said as one: never tell a user to
    # pip install a name we made up without saying so.
    return (
        f"{message}; if {name!r} is a third-party manager, install its plugin "
        f"(conventionally: pip install weft-{name})"
    )


def install_hint() -> str:
    """What to install for a first manager: our managers' distributions, the default first."""
    first, *rest = KNOWN_MANAGERS.values()
    return f"pip install {first} (or {', '.join(rest)})"


def check_options_fit(name: str, options: dict[str, Any]) -> tuple[ManagerSpec, dict[str, Any]]:
    """Manager ``name``'s spec and ``options`` checked, if they fit its factory; nothing is made.

    The errors of :func:`create_manager` but those its factory raises: for ``weft
    serve``, which says a misspelt option before it imports the application.
    """
    spec = get_manager_spec(name)
    from ._settings import check_manager_options

    options = check_manager_options(options, source=f"task manager {spec.name!r}")
    unexpected = _check_options(spec.factory, options)
    if unexpected:
        given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
        raise ConfigError(
            f"task manager {spec.name!r}: {unexpected} (options given: {given})",
            key="manager_options",
        )
    return spec, options


def create_manager(name: str, **options: Any) -> TaskManager:
    """Make the manager called ``name`` with ``options`` (``create_manager("threads", limit=2)``).

    Error handling: besides :func:`get_manager_spec`'s errors, options the factory
    does not take, or values it rejects (TypeError, ValueError), raise
    :class:`~weft_core.ConfigError`; anything else the factory raises is re-raised as
    :class:`~weft_core.PluginError` with the original chained. A manager that lacks a
    member of :class:`~weft_core.TaskManager`, or whose runtime lacks one of its
    protocol's (:func:`~weft_core.check_runtime`), is a PluginError naming them.
    """
    spec, options = check_options_fit(name, options)
    where = (
        f"distribution {spec.distribution} {spec.version}"
        if spec.distribution
        else "registered in-process"
    )
    try:
        manager = spec.create(**options)
    except (TypeError, ValueError) as exc:
        raise options_rejected(spec.name, options, exc) from exc
    except Exception as exc:
        raise PluginError(
            f"task manager {spec.name!r} ({where}) failed to start: {_one_line(exc)}"
        ) from exc
    _check_made(spec, manager, where)
    return manager


def options_rejected(name: str, options: dict[str, Any], exc: Exception) -> ConfigError:
    """The error for a manager (or its ``prepare_process``) refusing its options' values."""
    given = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
    return ConfigError(
        f"task manager {name!r} rejected its options ({given}): {_one_line(exc)}",
        key="manager_options",
    )


def _check_made(spec: ManagerSpec, manager: object, where: str) -> None:
    """Fail now, naming what is missing, if the factory made no whole manager."""
    from ._protocol import manager_problem

    problem = manager_problem(manager)
    if problem is None:
        kind = manager.runtime.kind  # type: ignore[attr-defined]
        if kind != spec.handler_kind:
            problem = (
                f"its runtime runs {kind} handlers, but its ManagerSpec declares "
                f"handler_kind={spec.handler_kind!r}"
            )
    if problem is not None:
        raise PluginError(
            f"task manager {spec.name!r} ({where}): {problem}; "
            "this is a bug in the plugin, report it to its authors"
        )


def _check_options(factory: Callable[..., object], options: dict[str, Any]) -> str | None:
    """Why ``options`` do not fit ``factory``'s signature, or None if they do (or it's unknown)."""
    import inspect

    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return None  # no signature to check against: the call will tell
    try:
        signature.bind(**options)
    except TypeError as exc:
        import difflib

        takes = _keyword_names(signature)
        from ._settings import SETTINGS

        hints = [
            f"{key!r} is a setting of its own, not a manager option: in weft.toml, put it"
            " above [manager_options]"
            if key in SETTINGS
            else f"did you mean {close[0]!r} for {key!r}?"
            for key in options
            if key not in takes
            and (key in SETTINGS or (close := difflib.get_close_matches(key, takes, n=1)))
        ]
        return "; ".join([f"{exc}; it takes: {', '.join(takes) or 'no options'}", *hints])
    return None


def option_names(spec: ManagerSpec) -> set[str]:
    """The options manager ``spec`` takes by name, read from its signatures.

    Its factory's and its ``prepare_process``'s keyword parameters, and ``limit``
    (weft's own, for every manager).
    """
    import inspect

    names = {"limit"}
    for fn in (spec.factory, spec.prepare_process):
        if fn is None:
            continue
        try:
            names.update(_keyword_names(inspect.signature(fn)))
        except (TypeError, ValueError):
            continue  # no signature to read
    return names


def _keyword_names(signature: Any) -> list[str]:
    """The parameters of ``signature`` (an ``inspect.Signature``) a keyword can give."""
    return [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


# -- lifecycle hooks -----------------------------------------------------------


class Hooks:
    """Typed calls of weft's lifecycle hooks; the core calls hooks only through these.

    Error handling: each plugin's implementation is called on its own; an exception
    it raises is logged (logger ``weft.plugins``, with traceback) and swallowed, so a
    plugin never stops a server or keeps other plugins from being called.
    """

    def server_started(self, server: Server, addresses: list[str]) -> None:
        """Call ``weft_server_started`` once ``server`` listens on ``addresses``."""
        _call_each("weft_server_started", server=server, addresses=addresses)

    def server_stopped(self, server: Server, stats: dict[str, Any]) -> None:
        """Call ``weft_server_stopped`` once ``server`` has stopped, with its final stats."""
        _call_each("weft_server_stopped", server=server, stats=stats)

    def connection_refused(self, server: Server, peer: str, reason: str) -> None:
        """Call ``weft_connection_refused`` for a connection closed unserved."""
        _call_each("weft_connection_refused", server=server, peer=peer, reason=reason)

    def handler_error(
        self, server: Server, connection: ConnectionInfo, exception: BaseException
    ) -> None:
        """Call ``weft_handler_error`` with the handler's own exception."""
        _call_each("weft_handler_error", server=server, connection=connection, exception=exception)

    def connection_opened(self, server: Server, connection: ConnectionInfo) -> None:
        """Call ``weft_connection_opened`` as a connection's task begins."""
        _call_each("weft_connection_opened", server=server, connection=connection)

    def connection_closed(
        self,
        server: Server,
        connection: ConnectionInfo,
        duration: float,
        bytes_in: int | None,
        bytes_out: int | None,
        how: str,
    ) -> None:
        """Call ``weft_connection_closed`` once a connection has ended."""
        _call_each(
            "weft_connection_closed",
            server=server,
            connection=connection,
            duration=duration,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            how=how,
        )

    def implemented(self, hook: str) -> bool:
        """True if some plugin implements ``hook`` now.

        For per-connection hooks: the server asks once per run and skips the call
        (and the work of preparing its arguments) when nobody listens.
        """
        caller: pluggy.HookCaller = getattr(plugin_manager().hook, hook)
        return bool(caller.get_hookimpls())


#: A plugin's hook that keeps raising is logged with its traceback at most once per
#: this many seconds (per plugin and hook); the repeats in between are counted in
#: the next. Per-connection hooks run once per client: unlimited, any client could
#: fill the log.
HOOK_ERROR_INTERVAL = 10.0


class _HookErrors:
    """When each (plugin, hook) last logged its error, and how many it has not since."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        #: What tells the time (a test's fake clock can stand in).
        self.clock: Callable[[], float] = time.monotonic

    def forget_all(self) -> None:
        with self._lock:
            self._last.clear()

    def forget(self, plugin: str) -> None:
        with self._lock:
            for key in [key for key in self._last if key[0] == plugin]:
                del self._last[key]

    def report(self, plugin: str, hook: str, exc: BaseException) -> None:
        now = self.clock()
        with self._lock:
            last, unlogged = self._last.get((plugin, hook), (-HOOK_ERROR_INTERVAL, 0))
            if now - last < HOOK_ERROR_INTERVAL:
                self._last[plugin, hook] = (last, unlogged + 1)
                return
            self._last[plugin, hook] = (now, 0)
        more = (
            f" ({unlogged} more time(s) since the last one logged, {now - last:.0f}s ago)"
            if unlogged
            else ""
        )
        # A hook is given what peers sent (a handler's exception, a connection's
        # addresses), and its exception may carry it: escaped, as the server's own.
        log_untrusted_exception(
            log,
            logging.ERROR,
            exc,
            "plugin %r raised %s in %s%s; ignored (logged at most every %gs)",
            plugin,
            type(exc).__name__,
            hook,
            more,
            HOOK_ERROR_INTERVAL,
        )


_hook_errors = _HookErrors()


def _call_each(hook: str, **kwargs: Any) -> None:
    caller: pluggy.HookCaller = getattr(plugin_manager().hook, hook)
    for impl in reversed(caller.get_hookimpls()):  # pluggy's own call order
        try:
            impl.function(*[kwargs[arg] for arg in impl.argnames])
        except BaseException as exc:  # any: a hook ends nothing but itself
            if is_interruption(exc):  # its task's own kill, landing in the hook
                raise
            _hook_errors.report(impl.plugin_name, hook, exc)


def hooks() -> Hooks:
    """The :class:`Hooks` the core calls."""
    global _hooks
    if _hooks is None:
        _hooks = Hooks()
    return _hooks
