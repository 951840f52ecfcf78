"""What a release carries: the license the package declares, a changelog, one version, and a --version that names
the libraries a bug report needs."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from injector import __version__
from injector.cli import version_text

ROOT = Path(__file__).resolve().parents[2]


def test_the_license_file_is_the_license_the_package_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_the_version_lives_in_one_place():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert version("rucio-injector") == __version__
    assert "## Unreleased" in (ROOT / "CHANGELOG.md").read_text()


def test_version_names_the_rucio_client_and_broker_libraries():
    text = version_text()
    assert text.startswith(f"rucio-injector {__version__} (")
    for library in ("rucio-clients", "kombu", "amqp", "stomp.py", "pydantic"):
        assert f"{library} {version(library)}" in text
