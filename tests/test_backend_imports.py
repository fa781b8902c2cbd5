"""A server loads its own manager's backend and no other's.

weft imports every installed plugin to find its managers: a plugin's registration
must not import its backend (trio, gevent, asyncio), or a threads server carries
all three (14 MiB more RSS in each process here, and gevent's, trio's and
asyncio's objects in every garbage collection). Checked through ``weft serve``, in
a real process, on each manager we ship, and through the Python API.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest
from _serving import (
    BACKENDS,
    LISTENING,
    OUR_MANAGERS,
    REPO,
    Served,
    environment,
    host_port,
    weft_serve,
)

from weft_core import available_managers

INSTALLED = [m for m in OUR_MANAGERS if m in available_managers()]


def _others(manager: str) -> set[str]:
    """The backends of every manager but ``manager``."""
    return {mod for name, mods in BACKENDS.items() if name != manager for mod in mods}


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter, as a program importing weft would."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("manager", INSTALLED)
def test_weft_serve_imports_no_other_managers_backend(manager: str) -> None:
    kind = available_managers()[manager].handler_kind
    handler = "_serving:report_backends" + ("_async" if kind == "async" else "")
    argv = weft_serve(handler, "-k", manager, "-b", "127.0.0.1:0")
    with Served(argv, cwd=REPO) as served:
        address = served.wait_for(LISTENING)[0].group(1)
        with socket.create_connection(host_port(address), timeout=20) as client:
            reply = client.makefile("rb").readline()
        loaded = set(json.loads(reply))
    assert not loaded & _others(manager), (
        f"the {manager} server imported {sorted(loaded & _others(manager))}"
    )
    assert set(BACKENDS.get(manager, ())) <= loaded  # it does import its own


@pytest.mark.timeout(60)
def test_listing_the_managers_imports_no_backend() -> None:
    """``available_managers()`` (what ``weft managers`` and every lookup call) loads none."""
    backends = sorted(_others(""))
    code = textwrap.dedent(
        f"""
        import json, sys
        import weft_core
        weft_core.available_managers()
        print(json.dumps(sorted(m for m in {backends!r} if m in sys.modules)))
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@pytest.mark.timeout(60)
def test_the_plugins_names_are_there_on_first_use() -> None:
    """The packages' names still import as before, each from its own module."""
    code = textwrap.dedent(
        """
        import weft_asyncio, weft_gevent, weft_trio
        from weft_trio import TrioManager, TrioRuntime
        from weft_gevent import GeventSocket
        from weft_asyncio import AsyncioStream
        assert TrioManager.__module__ == "weft_trio._manager", TrioManager.__module__
        assert "TrioListener" in dir(weft_trio)
        try:
            weft_trio.Nothing
        except AttributeError as exc:
            print(exc)
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module 'weft_trio' has no attribute 'Nothing'"
