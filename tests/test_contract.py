"""The manager contract is public and whole: a stranger's manager passes from the shell.

``weft-test-aio`` (``tests/plugins/``) is a manager of a kind weft does not ship,
written only from weft_core's public names and docs/writing-a-manager.md; it
declares what the suite needs in its ManagerSpec, so ``weft conformance aio``
passes with no flags. The rest checks what keeps plugins on the public contract.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _plugin_dists import PluginDists
from _plugin_dists import plugin_dists as plugin_dists  # the session fixture

import weft_core
import weft_core.testing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).parent.parent


def weft_command() -> list[str]:
    """The ``weft`` script installed next to this Python, as a user's shell finds it."""
    script = Path(sys.executable).with_name("weft")
    return [str(script)] if script.exists() else [sys.executable, "-m", "weft_core"]


def run_weft(args: list[str], paths: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEFT_", "PYTHON"))}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    return subprocess.run(
        [*weft_command(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=540
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(sys.version_info < (3, 11), reason="weft-test-aio uses asyncio.timeout (3.11)")
def test_weft_conformance_passes_for_a_new_kind_of_manager(
    plugin_dists: PluginDists, tmp_path: Path
) -> None:
    """`weft conformance aio`, from the shell, in a folder with no config: every test passes."""
    target = plugin_dists.target("weft-test-aio")
    done = run_weft(
        ["conformance", "aio", "-p", "no:cacheprovider", "-W", "error", "-rfEs"],
        [target],
        tmp_path,
    )
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, f"weft conformance aio failed:\n{tail}"
    assert " passed" in done.stdout and "failed" not in done.stdout, tail
    # Nothing skipped for want of a declaration: the spec told the suite all it needs.
    assert "skipped" not in done.stdout.splitlines()[-1], tail


@pytest.mark.timeout(60)
def test_ruff_bans_private_imports_in_plugins(tmp_path: Path) -> None:
    """`ruff check` at the repository root reports a plugin importing a private weft_core module."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    probe = REPO / "plugins" / "weft-threads" / "weft_threads" / "_contract_probe.py"
    probe.write_text(
        '"""Probe."""\n\nfrom weft_core._spec import HandlerKind\n\n__all__ = ["HandlerKind"]\n'
    )
    try:
        done = subprocess.run(
            [ruff, "check", "--no-cache", "--output-format", "concise", str(probe)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
    finally:
        probe.unlink()
    assert "TID251 `weft_core._spec` is banned" in done.stdout, done.stdout + done.stderr


def test_every_private_module_is_banned_for_plugins() -> None:
    """The ruff banned-api list names every private module of weft_core and weft_core.testing."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    banned = set(config["tool"]["ruff"]["lint"]["flake8-tidy-imports"]["banned-api"])
    private = {
        f"{package.__name__}.{info.name}"
        for package in (weft_core, weft_core.testing)
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("_") and info.name != "__main__"
    }
    assert private - banned == set(), (
        "add these to [tool.ruff.lint.flake8-tidy-imports.banned-api]"
    )


def test_every_suite_assertion_names_its_rule() -> None:
    """Each assert in the conformance suite carries a message, so a failure names its rule."""
    folder = Path(weft_core.testing.__file__).parent
    bare = []
    for path in sorted(folder.glob("_suite_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert) and node.msg is None:
                bare.append(f"{path.name}:{node.lineno}")
    assert bare == [], f"asserts without a message: {bare}"


def test_plugin_specs_declare_how_to_read_task_names() -> None:
    """Each shipped plugin declares its task-name reader in its ManagerSpec."""
    for name, spec in weft_core.available_managers().items():
        if spec.distribution in {"weft-threads", "weft-gevent", "weft-trio"}:
            assert spec.conformance.task_name is not None, f"{name} declares no task_name"
