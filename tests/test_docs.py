"""The documentation covers the public API, and the wheel carries the package's types.

Every name in a public package's ``__all__`` must be listed in that package's API page
(``docs/api/``), so a new public name without documentation fails here. The pages themselves are
rendered by ``make docs`` (``mkdocs build --strict``), which CI runs after the tests.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import captum_effattn

ROOT = Path(__file__).parents[1]
API = ROOT / "docs" / "api"
DIRECTIVE = re.compile(r"^::: ([\w.]+)[ \t]*$")
LIST_ITEM = re.compile(r"^\s+- (\w+)\s*$")


@dataclass
class Directive:
    """One ``::: identifier`` block of a page, with its explicit ``members:`` list if any."""

    identifier: str
    members: list[str] | None = None
    lines: list[str] = field(default_factory=list)


def public_packages() -> list[str]:
    """The package and every public subpackage or module that declares a public API
    (``__all__``)."""
    names = ["captum_effattn"]
    for info in pkgutil.iter_modules(captum_effattn.__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"captum_effattn.{info.name}")
            if hasattr(module, "__all__"):
                names.append(module.__name__)
    return names


def page_of(package: str) -> Path:
    return API / f"{package.rpartition('.')[2] or package}.md"


def directives(page: Path) -> list[Directive]:
    """The mkdocstrings blocks of a page: the identifier and the indented options under it."""
    found: list[Directive] = []
    current: Directive | None = None
    for line in page.read_text().splitlines():
        match = DIRECTIVE.match(line)
        if match:
            current = Directive(match[1])
            found.append(current)
        elif current is not None and (line.startswith("    ") or not line.strip()):
            current.lines.append(line)
        else:  # prose ends the block
            current = None
    for directive in found:
        directive.members = members_option(directive.lines)
    return found


def members_option(lines: list[str]) -> list[str] | None:
    """The names under ``members:`` in a directive's options (None when it has no such list)."""
    for start, line in enumerate(lines):
        if line.strip() == "members:":
            names = []
            for item in lines[start + 1 :]:
                match = LIST_ITEM.match(item)
                if not match:
                    break
                names.append(match[1])
            return names
    return None


def resolve(identifier: str) -> object:
    """Import the object an mkdocstrings identifier names (a module, or an attribute of one)."""
    module_name, _, attribute = identifier.rpartition(".")
    try:
        return importlib.import_module(identifier)
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module_name), attribute)


def documented_names(package: str) -> set[str]:
    """Names of ``package`` that its API page documents, by member list or by own directive."""
    module = importlib.import_module(package)
    names: set[str] = set()
    for directive in directives(page_of(package)):
        if directive.identifier == package:
            names.update(directive.members or ())
            continue
        name = directive.identifier.rpartition(".")[2]
        if name in module.__all__ and resolve(directive.identifier) is getattr(module, name):
            names.add(name)
    return names


def test_public_packages_are_found():
    assert {"captum_effattn", "captum_effattn.attr", "captum_effattn.projection"} <= set(
        public_packages()
    )


@pytest.mark.parametrize("package", public_packages())
def test_every_public_package_has_an_api_page_in_the_nav(package):
    page = page_of(package)
    assert page.is_file(), f"{package} has no API page: add {page.relative_to(ROOT)}"
    nav = (ROOT / "mkdocs.yml").read_text()
    assert f"api/{page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.mark.parametrize("package", public_packages())
def test_every_public_name_is_documented(package):
    public = set(importlib.import_module(package).__all__)
    missing = public - documented_names(package)
    assert not missing, (
        f"{package}.__all__ names without documentation: {sorted(missing)}; list them under "
        f"`members:` of `::: {package}` in {page_of(package).relative_to(ROOT)}"
    )


@pytest.mark.parametrize("package", public_packages())
def test_api_page_lists_only_public_names(package):
    """A listed member that is not exported would be dropped silently by mkdocstrings."""
    (own,) = [d for d in directives(page_of(package)) if d.identifier == package]
    assert own.members is not None, f"`::: {package}` must list its members explicitly"
    public = importlib.import_module(package).__all__
    assert sorted(set(own.members) - set(public)) == []
    assert len(own.members) == len(set(own.members))


def test_page_parser_sees_a_missing_name(tmp_path, monkeypatch):
    """The coverage check can fail: a page listing one member fewer misses exactly that name."""
    page = page_of("captum_effattn.attr")
    text = page.read_text()
    dropped = importlib.import_module("captum_effattn.attr").__all__[0]
    assert f"        - {dropped}\n" in text
    (tmp_path / page.name).write_text(text.replace(f"        - {dropped}\n", ""))
    monkeypatch.setattr(sys.modules[__name__], "API", tmp_path)
    assert dropped not in documented_names("captum_effattn.attr")


def test_docs_pages_exist_and_nothing_is_loaded_from_the_network():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)\s*$", config, re.M):
        assert (ROOT / "docs" / page).is_file(), page
    assert "extra_javascript" not in config
    assert "font: false" in config  # no web fonts fetched by the theme
    for snippet in re.findall(r'--8<-- "([^"]+)"', "".join(_all_pages())):
        assert (ROOT / snippet).is_file(), snippet


def _all_pages() -> list[str]:
    return [page.read_text() for page in (ROOT / "docs").rglob("*.md")]


def test_method_page_is_cited():
    method = (ROOT / "docs" / "method.md").read_text()
    for citation in ("Naim", "Asher", "2410.18541", "Brunner", "ICLR 2020"):
        assert citation in method


def test_py_typed_is_package_data():
    marker = ROOT / "captum_effattn" / "py.typed"
    assert marker.is_file()
    assert marker.read_text() == ""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["captum_effattn"]


def test_wheel_contains_py_typed(tmp_path):
    """Build the wheel from a copy of the sources (offline, with the installed setuptools)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 69:
        pytest.skip("the build needs setuptools >= 69 (pyproject's build-system)")
    source = tmp_path / "src"
    skip = shutil.ignore_patterns(
        ".*", "__pycache__", "*.egg-info", "build", "dist", "site", "demo_output", "*.nbi", "*.nbc"
    )
    shutil.copytree(ROOT, source, ignore=skip)
    out = tmp_path / "wheel"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "-q", "--no-index", "-w", str(out), str(source)], check=True)
    (wheel,) = out.glob("*.whl")
    assert "captum_effattn/py.typed" in zipfile.ZipFile(wheel).namelist()
