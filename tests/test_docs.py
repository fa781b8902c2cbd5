"""The docs name only what exists (datasette's ``tests/test_docs.py`` is the model).

Docs drift when code moves: a refactor renames ``_serving.py`` to ``_engine.py`` and
the architecture page goes on citing the old file. These tests read ``README.md`` and
``docs/*.md`` and fail when they cite a file, module or module attribute of weft that
does not exist, or when a hook specification in ``weft_core/hookspecs.py`` has no
section in ``docs/hooks.md`` showing its signature.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from weft_core import hookspecs

ROOT = Path(__file__).parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

#: A repository path to a Python file, as the docs write it: ``weft_core/_engine.py``,
#: ``plugins/weft-trio/weft_trio/_manager.py``, ``tests/test_hooks.py``.
PATH = re.compile(r"\b((?:weft_core|plugins|tests|examples|benchmarks)/[\w./-]*\.py)\b")
#: A private module of weft_core, with an attribute maybe: ``weft_core._logsafe`` or
#: ``weft_core._logsafe.escape_for_log``.
MODULE = re.compile(r"\bweft_core((?:\.\w+)*\._\w+)((?:\.\w+)*)")
#: A bare private module file in backticks (``_engine.py``), as the module tables write it.
BARE = re.compile(r"`(_\w+\.py)`")
#: Where a bare ``_x.py`` may live: weft_core and its suite, the plugins, the examples.
SOURCES = [ROOT / "weft_core", ROOT / "plugins", ROOT / "examples"]


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _hookspecs() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if name.startswith("weft_") and inspect.isfunction(obj) and hasattr(obj, marker)
    )


def _resolve(dotted: str) -> bool:
    """True if ``weft_core<dotted>`` is a module, or a module's attribute chain."""
    parts = f"weft_core{dotted}".split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_docs_are_found() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "architecture.md", "hooks.md", "writing-a-manager.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_cited_files_exist(doc: Path) -> None:
    """Every ``weft_core/….py``, ``plugins/….py`` (and so on) a doc cites is in the repo."""
    missing = sorted({m for m in PATH.findall(doc.read_text()) if not (ROOT / m).is_file()})
    assert not missing, f"{_doc_id(doc)} cites files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_cited_modules_exist(doc: Path) -> None:
    """Every ``weft_core._x`` (and ``weft_core._x.name``) a doc cites can be imported."""
    cited = {m.group(1) + m.group(2) for m in MODULE.finditer(doc.read_text())}
    missing = sorted(f"weft_core{c}" for c in cited if not _resolve(c))
    assert not missing, f"{_doc_id(doc)} cites modules or names that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_cited_module_files_exist(doc: Path) -> None:
    """Every bare ``_x.py`` a doc names (the module tables) is a file of weft's."""
    existing = {p.name for source in SOURCES for p in source.rglob("_*.py")}
    missing = sorted({m for m in BARE.findall(doc.read_text()) if m not in existing})
    assert not missing, f"{_doc_id(doc)} names module files that do not exist: {missing}"


def test_hookspecs_are_found() -> None:
    assert {"weft_managers", "weft_server_started", "weft_handler_error"} <= set(_hookspecs())


@pytest.mark.parametrize("hook", _hookspecs())
def test_hookspec_is_documented_with_its_signature(hook: str) -> None:
    """docs/hooks.md has a section for the hook, whose first example has its parameters."""
    text = (ROOT / "docs" / "hooks.md").read_text()
    section = re.search(rf"^## `{hook}`\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section is not None, (
        f"{hook} (weft_core/hookspecs.py) needs a '## `{hook}`' section in docs/hooks.md"
    )
    shown = re.search(rf"def {hook}\(.*?\)[^:]*:\s*\.\.\.", section.group(1), re.DOTALL)
    assert shown is not None, (
        f"the docs/hooks.md section on {hook} must show `def {hook}(...): ...`"
    )
    function = ast.parse(shown.group(0)).body[0]
    assert isinstance(function, ast.FunctionDef)
    documented = [arg.arg for arg in function.args.args]
    expected = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    assert documented == expected, (
        f"docs/hooks.md shows {hook}({', '.join(documented)}), "
        f"but weft_core/hookspecs.py declares {hook}({', '.join(expected)})"
    )


def _server_names() -> list[str]:
    from weft_core import Server

    keywords = [p for p in inspect.signature(Server.__init__).parameters if p != "self"]
    members = [name for name in vars(Server) if not name.startswith("_")]
    return sorted({*keywords, *members} - {"handler"})


@pytest.mark.parametrize("name", _server_names())
def test_every_server_keyword_and_call_is_in_the_api_page(name: str) -> None:
    """docs/api.md names every keyword of ``Server(...)`` and every public attribute:
    an embedder had only the signature in ``help()`` to go by."""
    text = (ROOT / "docs" / "api.md").read_text()
    assert f"`{name}" in text, f"docs/api.md does not name Server's {name!r}"
