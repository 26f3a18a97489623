"""The README's "Supported versions" table is what the pins declare, the lock resolves and CI runs."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jax", "brainstate", "saiunit")
DISTRIBUTIONS = ("etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn")


def _table() -> dict[str, dict[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header == ["stack", "Python", *PACKAGES], header
    out = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    assert set(out) == {"oldest", "newest", "declared range"}, set(out)
    return out


def _clauses(specifier: str) -> set[str]:
    return {clause.strip() for clause in specifier.split(",") if clause.strip()}


def _pyproject(dist: str) -> dict:
    return tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_declared_range_row_is_every_distributions_pins(dist: str) -> None:
    declared = _table()["declared range"]
    project = _pyproject(dist)
    assert _clauses(project["requires-python"]) == _clauses(declared["Python"])
    pins = {}
    for requirement in project["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        pins[name] = spec
    for package in PACKAGES:
        if package in pins:
            assert _clauses(pins[package]) == _clauses(declared[package]), (dist, package, pins[package])
    classifiers = {
        c.rsplit(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")
    }
    assert classifiers == {"3.11", "3.12", "3.13"}, classifiers


def test_lock_resolves_the_oldest_stack_for_311_and_the_newest_for_312_and_later() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    table = _table()
    for package in PACKAGES:
        entries = [p for p in lock["package"] if p["name"] == package]
        by_fork = {}
        for entry in entries:
            markers = entry.get("resolution-markers", [])
            old = bool(markers) and all("< '3.12'" in m or "< '3.11.5'" in m for m in markers)
            by_fork["oldest" if old else "newest"] = entry["version"]
        assert by_fork == {"oldest": table["oldest"][package], "newest": table["newest"][package]}, (package, by_fork)


def test_this_environment_is_the_row_of_its_python() -> None:
    table = _table()
    row = "oldest" if sys.version_info < (3, 12) else "newest"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert python in [v.strip() for v in table[row]["Python"].split(",")], (python, table[row]["Python"])
    for package in PACKAGES:
        assert importlib.metadata.version(package) == table[row][package], package
