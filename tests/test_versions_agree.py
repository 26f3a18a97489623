"""The four distributions' versions agree with each other, with the packages and with the changelog.

One source for each version: ``[project] version`` in ``packages/<name>/pyproject.toml``. From it
come the installed metadata (``importlib.metadata.version``) and each import package's
``__version__`` (``braintrace`` is shipped by ``etp-nn`` and carries its version). Each sibling
requirement (``etp-nn`` requires ``etp-algorithms>=0.1.0,<0.2``) must admit the sibling's
actual version, so bumping one version without the bounds that depend on it fails here, and
every released version has its section in ``CHANGELOG.md``.

``packaging`` (for the requirement specifiers) is a dependency of pytest.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = ("etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn")
#: Each import package and the distribution that ships it.
IMPORT_PACKAGES = {
    "etp_primitives": "etp-primitives",
    "etp_compiler": "etp-compiler",
    "etp_algorithms": "etp-algorithms",
    "etp_nn": "etp-nn",
    "braintrace": "etp-nn",
}


def load_pyprojects(root: Path = ROOT) -> dict[str, dict[str, Any]]:
    """``{distribution name: parsed pyproject}`` of ``packages/*/pyproject.toml``."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(root.glob("packages/*/pyproject.toml")):
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        found[canonicalize_name(data["project"]["name"])] = data
    return found


def bound_disagreements(pyprojects: dict[str, dict[str, Any]]) -> list[str]:
    """Every sibling requirement that does not admit the sibling's declared version.

    A sibling requirement without an upper bound is reported too: it would admit every future
    (incompatible) release of the sibling.
    """
    versions = {name: Version(data["project"]["version"]) for name, data in pyprojects.items()}
    problems = []
    for name, data in pyprojects.items():
        for text in data["project"].get("dependencies", []):
            req = Requirement(text)
            sibling = canonicalize_name(req.name)
            if sibling not in versions:
                continue
            if not req.specifier.contains(versions[sibling], prereleases=True):
                problems.append(f"{name} requires {text!r}, but {sibling} is version {versions[sibling]}")
            if not any(spec.operator in ("<", "<=", "~=", "==") for spec in req.specifier):
                problems.append(f"{name} requires {text!r}: no upper bound on the sibling {sibling}")
    return problems


PYPROJECTS = load_pyprojects()


def test_the_four_distributions() -> None:
    assert sorted(PYPROJECTS) == sorted(DISTRIBUTIONS)
    assert set(IMPORT_PACKAGES.values()) == set(DISTRIBUTIONS)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_installed_metadata_is_the_pyproject_version(name: str) -> None:
    declared = PYPROJECTS[name]["project"]["version"]
    assert importlib.metadata.version(name) == declared, (
        f"{name}: installed metadata says {importlib.metadata.version(name)}, pyproject says {declared} "
        "(re-sync the environment: uv sync --all-packages)"
    )


@pytest.mark.parametrize("module", sorted(IMPORT_PACKAGES))
def test_dunder_version_is_the_distribution_version(module: str) -> None:
    package = importlib.import_module(module)
    distribution = IMPORT_PACKAGES[module]
    assert package.__version__ == importlib.metadata.version(distribution), (module, distribution)
    assert package.__version__ == PYPROJECTS[distribution]["project"]["version"], (module, distribution)


def test_sibling_bounds_admit_the_siblings_versions() -> None:
    assert bound_disagreements(PYPROJECTS) == []


def test_every_dependent_declares_its_direct_siblings_with_bounds() -> None:
    # the chain the bounds test relies on: a dependent with no sibling requirements checks nothing
    siblings = {
        name: sorted(
            canonicalize_name(Requirement(text).name)
            for text in data["project"].get("dependencies", [])
            if canonicalize_name(Requirement(text).name) in PYPROJECTS
        )
        for name, data in PYPROJECTS.items()
    }
    assert siblings == {
        "etp-primitives": [],
        "etp-compiler": ["etp-primitives"],
        "etp-algorithms": ["etp-compiler", "etp-primitives"],
        "etp-nn": ["etp-algorithms", "etp-compiler", "etp-primitives"],
    }


def test_installed_siblings_satisfy_the_installed_requirements() -> None:
    # the same agreement in the installed metadata (what a resolver sees)
    for name in DISTRIBUTIONS:
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            sibling = canonicalize_name(req.name)
            if sibling in PYPROJECTS:
                version = importlib.metadata.version(sibling)
                assert req.specifier.contains(version, prereleases=True), (name, text, version)


def _changelog_versions() -> set[str]:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    return set(re.findall(r"^## \[(\d[^\]]*)\]", text, re.M))


def test_each_version_has_a_changelog_section() -> None:
    released = _changelog_versions()
    assert released, "CHANGELOG.md has no '## [X.Y.Z] - date' section"
    for name, data in PYPROJECTS.items():
        assert data["project"]["version"] in released, (
            f"{name} {data['project']['version']} has no '## [{data['project']['version']}]' section in CHANGELOG.md"
        )


# ---------------------------------------------------------------------------- the check itself


def _bumped(name: str, version: str) -> dict[str, dict[str, Any]]:
    pyprojects = copy.deepcopy(PYPROJECTS)
    pyprojects[name]["project"]["version"] = version
    return pyprojects


def test_a_bump_past_the_bounds_is_reported() -> None:
    problems = bound_disagreements(_bumped("etp-primitives", "0.2.0"))
    assert problems == [
        f"{name} requires 'etp-primitives>=0.1.0,<0.2', but etp-primitives is version 0.2.0"
        for name in ("etp-algorithms", "etp-compiler", "etp-nn")
    ]
    assert bound_disagreements(_bumped("etp-algorithms", "0.0.9")) == [
        "etp-nn requires 'etp-algorithms>=0.1.0,<0.2', but etp-algorithms is version 0.0.9"
    ]


def test_a_compatible_bump_and_a_bump_with_its_bounds_pass() -> None:
    assert bound_disagreements(_bumped("etp-compiler", "0.1.3")) == []
    pyprojects = _bumped("etp-compiler", "0.2.0")
    for name in ("etp-algorithms", "etp-nn"):
        deps = pyprojects[name]["project"]["dependencies"]
        pyprojects[name]["project"]["dependencies"] = [
            "etp-compiler>=0.2.0,<0.3" if d.startswith("etp-compiler") else d for d in deps
        ]
    assert bound_disagreements(pyprojects) == []


def test_an_unbounded_sibling_is_reported() -> None:
    pyprojects = copy.deepcopy(PYPROJECTS)
    deps = pyprojects["etp-nn"]["project"]["dependencies"]
    pyprojects["etp-nn"]["project"]["dependencies"] = [
        "etp-algorithms>=0.1.0" if d.startswith("etp-algorithms") else d for d in deps
    ]
    assert bound_disagreements(pyprojects) == [
        "etp-nn requires 'etp-algorithms>=0.1.0': no upper bound on the sibling etp-algorithms"
    ]
