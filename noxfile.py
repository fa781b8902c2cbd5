"""weft's test sessions: ``python -m nox`` runs them all (what CI runs).

Plugins are discovered under ``plugins/`` rather than listed (hydra's pattern):
``nox -s "plugin(weft-gevent)"`` runs one plugin's own tests, and ``tests`` reruns
the core tests, including the conformance suite, with every plugin installed.
Nothing is installed when this file is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nox
import nox.project
from packaging.requirements import Requirement

ROOT = Path(__file__).parent
PLUGINS = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
#: Plugins that register no manager but watch servers through the hooks: their tests
#: run real servers, so their session installs every manager plugin as well.
WATCHERS = {"weft-prometheus"}
# pip and setuptools: tests install tiny plugin distributions with pip --target.
TEST_DEPS = [
    "pytest>=8",
    "pytest-timeout",
    "pytest-xdist",  # the core tests run on every core: most of their time is waiting
    "hypothesis",
    "trustme",
    "pip",
    "setuptools>=77",  # the SPDX string form of project.license (PEP 639)
    "wheel",
    "ruff",  # tests/test_contract.py checks that ruff bans private imports in plugins
    "uvloop; sys_platform != 'win32'",  # weft-asyncio's loop="uvloop" (its tests skip without)
]

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["lint", "types", "tests", "plugin", "lowest", "example_plugin"]
nox.options.reuse_existing_virtualenvs = True


def install_weft(session: nox.Session, *plugins: str, pins: Sequence[str] = ()) -> None:
    """Core and the given plugins from this checkout, plus test tools (and ``pins``)."""
    session.install("-e", ".", *[f"-e./plugins/{p}" for p in plugins], *TEST_DEPS, *pins)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def types(session: nox.Session) -> None:
    """mypy --strict on weft_core, every plugin, the example plugin, the benchmarks, and
    tests/typing: a user's script typed against the public API."""
    install_weft(session, *PLUGINS)
    session.install("mypy", "types-gevent", "uvloop")  # uvloop: the benchmarks import it
    packages = [f"plugins/{p}/{p.replace('-', '_')}" for p in PLUGINS]
    session.run(
        "mypy",
        "weft_core",
        *packages,
        "examples/weft-pool/weft_pool",
        "benchmarks",
        "tests/typing",
    )


def _pytest_workers() -> int:
    """Two pytest workers per core (pytest-xdist), the idle workers taking tests from
    the busy ones' queues: most tests wait on real processes, clients and timeouts
    (with one worker per core, two cores stood 60-90 % idle, and the core tests took
    12 min against 8 with two per core). At most 4: a container may see more cores
    than it may use, and the tests' bounds hold with 4 workers on 2 cores, not with 64."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    return min(4, 2 * cores)


@nox.session
def tests(session: nox.Session) -> None:
    """The core tests and the conformance suite, against every installed manager."""
    install_weft(session, *PLUGINS)
    for plugin in PLUGINS:  # smoke-import each plugin after install
        session.run("python", "-c", f"import {plugin.replace('-', '_')}")
    # ``nox -s tests -- -n 0`` runs them in one process. Tests marked ``serial`` pin
    # workers to a core and measure their shares of it: they run first, alone, on a
    # quiet machine, where a serial run always had them (right after the parallel
    # part a gevent burst came out 68:32 once, the cause not known).
    workers = _pytest_workers()
    selected = [0, 5]  # 5: none selected (a -k that picks only the other part)
    session.run("pytest", "tests", "-m", "serial", *session.posargs, success_codes=selected)
    session.run("pytest", "tests", "-n", str(workers), "--dist", "worksteal",
                "-m", "not serial", *session.posargs, success_codes=selected)  # fmt: skip


@nox.session
@nox.parametrize("plugin", PLUGINS)
def plugin(session: nox.Session, plugin: str) -> None:
    """One plugin's own tests, with only that plugin installed (a watcher: and every manager)."""
    managers = [p for p in PLUGINS if p not in WATCHERS] if plugin in WATCHERS else []
    install_weft(session, plugin, *managers)
    session.run("pytest", f"plugins/{plugin}/tests", "-n", str(_pytest_workers()),
                "--dist", "worksteal", *session.posargs)  # fmt: skip


def _declared_floors() -> list[str]:
    """``name==V`` for each ``name>=V`` the distributions need at run time or by an
    extra: weft's own distributions come from this checkout, and the ``testing``
    extra's pytest from the tests' own needs (xdist, pytest 8)."""
    floors = []
    for pyproject in [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]:
        project = nox.project.load_toml(pyproject)["project"]
        extras = [r for name, r in project.get("optional-dependencies", {}).items()
                  if name != "testing"]  # fmt: skip
        for text in [*project.get("dependencies", []), *(r for extra in extras for r in extra)]:
            requirement = Requirement(text)
            if requirement.name.startswith("weft-") or not (
                requirement.marker is None or requirement.marker.evaluate()
            ):
                continue
            lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            floors += [f"{requirement.name}=={v}" for v in lowest]
    return floors


@nox.session
def lowest(session: nox.Session) -> None:
    """The conformance suite on every manager and each plugin's own tests, on the
    lowest versions the metadata admits (pluggy, gevent, trio, uvloop, ...). The other
    sessions install the newest, and weft-gevent admitted a gevent (23.9 to 26.7) that
    failed the suite: a slot released from another thread woke no waiter."""
    install_weft(session, *PLUGINS, pins=_declared_floors())
    session.run("python", "-m", "pip", "list", silent=False)  # which versions, on record
    workers = ["-n", str(_pytest_workers()), "--dist", "worksteal"]
    for manager in ("threads", "gevent", "trio"):  # asyncio's: in its plugin's tests
        session.run("weft", "conformance", manager, "-q", *workers)
    session.run("pytest", *[f"plugins/{p}/tests" for p in PLUGINS], *workers, *session.posargs)


@nox.session
def example_plugin(session: nox.Session) -> None:
    """Build examples/weft-pool as a wheel, install it as a stranger would, run the suite."""
    wheels = session.create_tmp()
    session.install("build", "pytest>=8", "pytest-timeout", "trustme")
    session.install(".")
    session.run("python", "-m", "build", "--wheel", "--outdir", wheels, "examples/weft-pool")
    wheel = next(Path(wheels).glob("weft_pool-*.whl"))
    session.install(str(wheel))
    session.run("weft", "managers")
    session.run("weft", "conformance", "pool")
    session.run("pytest", "examples/weft-pool/tests/test_pool.py")  # the example's own
