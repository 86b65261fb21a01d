"""What a PyPI user trusts: the license file, typing marker, and dependency bounds that agree."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_file_matches_the_declared_license(project):
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License")
    assert "captum_effattn developers" in text
    assert "Neither the name of the copyright holder" in text


def test_package_is_typed():
    assert (ROOT / "captum_effattn" / "py.typed").is_file()


def test_classifiers_name_the_tested_python_and_the_status(project):
    classifiers = project["classifiers"]
    assert "Development Status :: 3 - Alpha" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(item.startswith("Topic :: ") for item in classifiers)


def test_extras_name_ray_and_the_offline_assets(project):
    extras = project["optional-dependencies"]
    assert any(item.startswith("ray[data]>=2.") for item in extras["ray"])
    assets = {line.split("==")[0] for line in extras["assets"]}
    pinned = (ROOT / "requirements-offline-assets.txt").read_text().splitlines()
    assert assets == {line.split("==")[0] for line in pinned if line and not line.startswith("#")}
    assert any(item.startswith("pyarrow") for item in project["dependencies"])


def test_triton_range_fits_the_torch_range(project):
    # torch 2.4 is the first release pinning a Triton 3 (3.0.0), which the kernels need.
    torch = next(item for item in project["dependencies"] if item.startswith("torch"))
    assert torch == "torch>=2.4"
    (triton,) = project["optional-dependencies"]["gpu"]
    assert triton.startswith("triton>=3.0,<4")
