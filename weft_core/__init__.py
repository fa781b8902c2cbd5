"""weft: a TCP server framework with pluggable concurrency.

The server owns listening, accepting, limits, socket options and the lifecycle;
a task manager, chosen by name from the installed plugins, owns concurrency.
This module re-exports the public names and nothing else.
"""

from __future__ import annotations

import sys

if not sys.platform.startswith("linux"):  # said here, not by a failed import of fcntl
    raise ImportError(
        f"weft runs on Linux only (it uses pipe2, memfd, TCP_INFO, SO_REUSEPORT as Linux "
        f"has them); this is {sys.platform!r}"
    )

from ._blocking import BLOCKING_RUNTIME, BlockingRuntime
from ._connection import ConnectionInfo, current_connection, detach
from ._control import ConnectionSnapshot
from ._errors import (
    BindError,
    ConfigError,
    HandlerKindError,
    ManagerFullError,
    PluginError,
    ServerError,
    TaskShutdown,
    UnknownManagerError,
    WeftError,
)
from ._protocol import (
    AsyncRuntime,
    AsyncSlots,
    Runtime,
    SpawnsSoon,
    SyncRuntime,
    SyncSlots,
    TaskManager,
    check_runtime,
)
from ._registry import available_managers, create_manager
from ._registry import register as register_plugin
from ._registry import unregister as unregister_plugin
from ._server import Server
from ._spec import Conformance, HandlerKind, ManagerSpec
from ._tasks import (
    INTERRUPT_GRACE,
    TaskState,
    TaskTable,
    current_task,
    run_async_task,
    run_task,
    shutdown_requested,
)
from .hookspecs import hookimpl

__all__ = [
    "BLOCKING_RUNTIME",
    "INTERRUPT_GRACE",
    "AsyncRuntime",
    "AsyncSlots",
    "BindError",
    "BlockingRuntime",
    "ConfigError",
    "Conformance",
    "ConnectionInfo",
    "ConnectionSnapshot",
    "HandlerKind",
    "HandlerKindError",
    "ManagerFullError",
    "ManagerSpec",
    "PluginError",
    "Runtime",
    "Server",
    "ServerError",
    "SpawnsSoon",
    "SyncRuntime",
    "SyncSlots",
    "TaskManager",
    "TaskShutdown",
    "TaskState",
    "TaskTable",
    "UnknownManagerError",
    "WeftError",
    "available_managers",
    "check_runtime",
    "create_manager",
    "current_connection",
    "current_task",
    "detach",
    "hookimpl",
    "register_plugin",
    "run_async_task",
    "run_task",
    "shutdown_requested",
    "unregister_plugin",
]

__version__ = "0.1.0"
