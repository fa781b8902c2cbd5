"""Every distribution's metadata, read from its ``pyproject.toml`` (packaging probe F1-F5).

The core, each plugin under ``plugins/`` and the example plugin under ``examples/`` are
released together: one version (``weft_core.__version__``), each bound to the others'
release series, so that pip never puts a plugin beside a core of another series. Each
carries the MIT licence text, says it runs on Linux only, and names the Python
versions ``requires-python`` admits. Nothing is built or installed: the files are read.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import weft_core

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
PLUGINS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))
EXAMPLES = sorted(p.parent for p in (ROOT / "examples").glob("*/pyproject.toml"))
PROJECTS = [ROOT, *PLUGINS, *EXAMPLES]

VERSION = Version(weft_core.__version__)
LINUX = "Operating System :: POSIX :: Linux"
TYPED = "Typing :: Typed"
AUTHORS = [{"name": "The weft authors"}]
#: The line each README carries near its top.
LINUX_NOTE = (
    'weft runs on Linux only (see "Deliberate limits" in docs/architecture.md in the weft source).'
)
PYTHON_X_Y = re.compile(r"Programming Language :: Python :: 3\.(\d+)$")
#: A Markdown link or image to a relative target: dead where an index shows the README.
RELATIVE_LINK = re.compile(r"\]\((?!https?://|#)([^)\s]+)")


def pyproject(path: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((path / "pyproject.toml").read_text())["project"]
    return project


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) if p != ROOT else "weft-core" for p in paths]


def release_series(version: Version) -> tuple[Version | None, Version]:
    """The last version before ``version``'s release series, and the first after it.

    Before 1.0 a minor release may break the plugins' contract (0.1 -> 0.2); from 1.0
    on, a major one. ``None``: nothing comes before the 0.0 series.
    """
    major, minor = (*version.release, 0)[:2]
    if major == 0:
        before = Version(f"0.{minor - 1}.9999") if minor else None
        return before, Version(f"0.{minor + 1}")
    return Version(f"{major - 1}.9999"), Version(f"{major + 1}")


def assert_pins_the_series(requirement: Requirement, version: Version, where: str) -> None:
    """``requirement`` admits ``version`` and nothing of another release series."""
    before, after = release_series(version)
    spec: SpecifierSet = requirement.specifier
    assert spec.contains(version, prereleases=True), (
        f"{where}: {requirement} does not admit {version}"
    )
    assert not spec.contains(after, prereleases=True), (
        f"{where}: {requirement} admits {after}, of a release series it was not released "
        f"with: bound it below {after}"
    )
    if before is not None:
        assert not spec.contains(before, prereleases=True), (
            f"{where}: {requirement} admits {before}"
        )


def project_package_data(path: Path) -> dict[str, list[str]]:
    config = tomllib.loads((path / "pyproject.toml").read_text())
    data: dict[str, list[str]] = config["tool"]["setuptools"].get("package-data", {})
    return data


def weft_requirements(requirements: list[str]) -> list[Requirement]:
    """The requirements naming a weft distribution (weft-core or a plugin)."""
    parsed = [Requirement(r) for r in requirements]
    return [r for r in parsed if r.name.startswith("weft-")]


def test_every_project_is_found() -> None:
    names = {pyproject(p)["name"] for p in PROJECTS}
    assert {"weft-core", "weft-threads", "weft-pool"} <= names, names
    assert len(names) == len(PROJECTS), "two pyproject.toml files name the same distribution"


@pytest.mark.parametrize("path", PROJECTS, ids=ids(PROJECTS))
def test_every_distribution_has_the_core_version(path: Path) -> None:
    project = pyproject(path)
    assert "version" not in project.get("dynamic", [])
    assert Version(project["version"]) == VERSION, (
        f"{project['name']} is {project['version']}, weft_core.__version__ is {VERSION}"
    )
    # A package that states its version as well (weft_core, weft_pool) states this one.
    for init in sorted(path.glob("weft_*/__init__.py")):
        stated = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.MULTILINE)
        if stated is not None:
            assert Version(stated.group(1)) == VERSION, f"{init.relative_to(ROOT)}: {stated[1]}"


@pytest.mark.parametrize("path", PLUGINS + EXAMPLES, ids=ids(PLUGINS + EXAMPLES))
def test_each_plugin_needs_the_core_of_its_own_release_series(path: Path) -> None:
    project = pyproject(path)
    cores = [r for r in weft_requirements(project["dependencies"]) if r.name == "weft-core"]
    assert len(cores) == 1, f"{project['name']} names weft-core {len(cores)} times"
    (core,) = cores
    assert core.marker is None and not core.extras, f"{project['name']}: {core}"
    assert_pins_the_series(core, VERSION, project["name"])


def test_the_core_extras_name_the_plugins_of_its_own_release_series() -> None:
    extras: dict[str, list[str]] = pyproject(ROOT)["optional-dependencies"]
    versions = {pyproject(p)["name"]: Version(pyproject(p)["version"]) for p in PLUGINS}
    named = set()
    for extra, requirements in extras.items():
        for requirement in weft_requirements(requirements):
            assert requirement.name in versions, (
                f"[{extra}] names {requirement.name}, not a plugin"
            )
            assert_pins_the_series(requirement, versions[requirement.name], f"[{extra}]")
            named.add(requirement.name)
    assert named == set(versions), f"plugins no extra names: {sorted(set(versions) - named)}"


@pytest.mark.parametrize("path", PROJECTS, ids=ids(PROJECTS))
def test_each_distribution_carries_the_licence_text(path: Path) -> None:
    project = pyproject(path)
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (path / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 The weft authors" in text
    assert text == (ROOT / "LICENSE").read_text(), "one licence text, copied into each project"
    # PEP 639: a licence expression and a licence classifier are not both allowed.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    assert project["authors"] == AUTHORS


@pytest.mark.parametrize("path", PROJECTS, ids=ids(PROJECTS))
def test_each_distribution_says_linux_and_its_python_versions(path: Path) -> None:
    project = pyproject(path)
    classifiers: list[str] = project["classifiers"]
    assert len(classifiers) == len(set(classifiers)), "a classifier twice"
    assert LINUX in classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    requires = SpecifierSet(project["requires-python"])
    assert requires == SpecifierSet(pyproject(ROOT)["requires-python"])
    minors = sorted(int(m[1]) for c in classifiers if (m := PYTHON_X_Y.match(c)))
    assert minors, "no Programming Language :: Python :: 3.X classifier"
    assert minors == list(range(minors[0], minors[-1] + 1)), f"3.x classifiers skip: {minors}"
    assert all(requires.contains(f"3.{m}.0") for m in minors), (requires, minors)
    assert not requires.contains(f"3.{minors[0] - 1}.99"), (
        f"requires-python {requires} admits 3.{minors[0] - 1}, which no classifier names"
    )
    core = [c for c in pyproject(ROOT)["classifiers"] if PYTHON_X_Y.match(c)]
    assert [c for c in classifiers if PYTHON_X_Y.match(c)] == core, "not the core's Pythons"


@pytest.mark.parametrize("path", PROJECTS, ids=ids(PROJECTS))
def test_typed_is_said_where_py_typed_is_shipped(path: Path) -> None:
    project = pyproject(path)
    shipped = [
        package
        for package, files in project_package_data(path).items()
        if "py.typed" in files and (path / package / "py.typed").is_file()
    ]
    assert (TYPED in project["classifiers"]) == bool(shipped), (project["name"], shipped)


@pytest.mark.parametrize("path", PROJECTS, ids=ids(PROJECTS))
def test_each_readme_says_linux_and_links_nothing_relative(path: Path) -> None:
    project = pyproject(path)
    text = (path / project["readme"]).read_text()
    top = text.split("\n## ", 1)[0]
    assert LINUX_NOTE in top.splitlines(), f"{project['readme']} of {project['name']}"
    assert not RELATIVE_LINK.findall(text), (
        f"{project['name']}'s README is its index page, where relative links are dead: "
        f"{RELATIVE_LINK.findall(text)}"
    )


@pytest.mark.parametrize("path", PROJECTS, ids=ids(PROJECTS))
def test_each_sdist_carries_the_whole_test_suite(path: Path) -> None:
    """setuptools puts only tests/test*.py in an sdist: conftest.py and helpers need this."""
    if not (path / "tests").is_dir():
        pytest.skip("no tests")
    lines = (path / "MANIFEST.in").read_text().splitlines()
    assert "graft tests" in lines
    assert "global-exclude *.py[cod] __pycache__" in lines
