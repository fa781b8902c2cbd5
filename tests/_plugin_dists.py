"""Real plugin distributions for the registry tests, installed once per session.

Each folder under ``tests/plugins/`` is a tiny distribution. :class:`PluginDists`
installs one with pip into a target folder of its own (at most once per session)
and runs Python in a subprocess that sees exactly the chosen distributions, so the
registry of the test process itself is never touched.

The subprocess runs with ``-S`` (no site-packages): its ``sys.path`` holds the
chosen targets plus ``weft_core`` and ``pluggy`` (weft-core's only dependency), so
whatever else is installed here (weft-gevent, weft-trio) does not leak in, and
"weft-threads is not installed" can be tested for real.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy
import pytest

import weft_core

PLUGINS = Path(__file__).parent / "plugins"
REPO = Path(__file__).parent.parent

#: Where each installable distribution's source lives; weft-threads is the real one.
SOURCES = {
    **{p.name: p for p in sorted(PLUGINS.iterdir()) if (p / "pyproject.toml").is_file()},
    "weft-threads": REPO / "plugins" / "weft-threads",
}

#: Prints what the registry sees, as JSON, for the request given in argv[1]:
#: {"get": [names], "create": [[name, options], ...]}.
PROBE = """
import dataclasses, json, sys
from weft_core import _registry

def attempt(fn, *args, **kwargs):
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        cause = exc.__cause__
        return {"error": type(exc).__name__, "message": str(exc),
                "cause": type(cause).__name__ if cause else None}
    return {"ok": type(value).__name__, "limit": getattr(value, "limit", None)}

request = json.loads(sys.argv[1])
print(json.dumps({
    "managers": {name: [s.distribution, s.version, s.description]
                 for name, s in _registry.available_managers().items()},
    "broken": [dataclasses.asdict(b) for b in _registry.broken_plugins()],
    "get": {name: attempt(_registry.get_manager_spec, name) for name in request.get("get", [])},
    "create": [attempt(_registry.create_manager, name, **options)
               for name, options in request.get("create", [])],
}))
"""


class PluginDists:
    """Installs test distributions on demand and runs Python that sees only the chosen ones."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._targets: dict[str, Path] = {}
        # weft_core and pluggy, linked into one folder so -S Python can import them.
        self.base = root / "_base"
        self.base.mkdir()
        for module in (weft_core, pluggy):
            assert module.__file__ is not None
            (self.base / module.__name__).symlink_to(Path(module.__file__).parent)

    def target(self, dist: str) -> Path:
        """The folder ``dist`` is installed in, installing it on first use."""
        if dist not in self._targets:
            # Build from a copy: setuptools writes build/ and *.egg-info next to the source.
            source = shutil.copytree(
                SOURCES[dist],
                self.root / "_src" / dist,
                ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"),
            )
            target = self.root / dist
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
            cmd += ["--no-index", "--disable-pip-version-check", "--quiet"]
            cmd += ["--target", str(target), str(source)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"installing {dist} failed:\n{done.stderr}"
            self._targets[dist] = target
        return self._targets[dist]

    def python(
        self,
        args: list[str],
        dists: list[str],
        env: Mapping[str, str] | None = None,
        extra_paths: Sequence[Path] = (),
    ) -> str:
        """Run ``python -S *args`` seeing only ``dists``; return stdout, failing on an error."""
        paths = [*(self.target(d) for d in dists), *extra_paths, self.base]
        run_env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "PYTHON"))}
        run_env.update(env or {})
        run_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        done = subprocess.run(
            [sys.executable, "-S", *args], capture_output=True, text=True, env=run_env, timeout=60
        )
        assert done.returncode == 0, f"subprocess failed:\n{done.stderr}"
        return done.stdout

    def probe(
        self,
        dists: list[str],
        *,
        get: Sequence[str] = (),
        create: Sequence[tuple[str, dict[str, Any]]] = (),
        env: Mapping[str, str] | None = None,
        extra_paths: Sequence[Path] = (),
    ) -> dict[str, Any]:
        """Run :data:`PROBE` seeing only ``dists``; return its report."""
        request = json.dumps({"get": list(get), "create": [list(c) for c in create]})
        out = self.python(["-c", PROBE, request], dists, env, extra_paths)
        report: dict[str, Any] = json.loads(out.splitlines()[-1])
        return report


@pytest.fixture(scope="session")
def plugin_dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginDists]:
    """Session-wide :class:`PluginDists`; each distribution is installed at most once."""
    yield PluginDists(tmp_path_factory.mktemp("weft-plugin-dists"))
