"""The import-time check of the dependencies' versions against each distribution's declared range."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import warnings

import pytest

from etp_primitives.versions import (
    UnsupportedVersionWarning,
    check_installed,
    check_version,
    declared_requirements,
    release,
)

RANGE = ">=0.10.2,<0.13"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.12.0.1", (0, 12, 0, 1)), ("0.10.2", (0, 10, 2)), ("0.13.0rc1", (0, 13, 0)), ("1.26.4+local", (1, 26, 4))],
)
def test_release_numbers(text: str, expected: tuple[int, ...]) -> None:
    assert release(text) == expected


def test_release_rejects_a_non_version() -> None:
    with pytest.raises(ValueError, match="not a version: 'dev'"):
        release("dev")


@pytest.mark.parametrize("found", ["0.10.2", "0.11.1", "0.12.0.1", "0.12.9"])
def test_versions_in_range_are_silent(found: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_version("etp-x", "jax", found, RANGE)


@pytest.mark.parametrize("found", ["0.10.1", "0.8.0", "0.4.38"])
def test_a_version_below_the_floor_raises_naming_both(found: str) -> None:
    with pytest.raises(ImportError) as info:
        check_version("etp-x", "jax", found, RANGE)
    message = str(info.value)
    assert f"jax {found} is installed" in message and "etp-x supports jax>=0.10.2,<0.13" in message


@pytest.mark.parametrize("found", ["0.13.0", "0.13.0rc1", "1.0"])
def test_a_version_at_or_above_the_ceiling_warns(found: str) -> None:
    with pytest.warns(UnsupportedVersionWarning, match=rf"tested with jax>=0.10.2,<0.13, but jax {found} is installed"):
        check_version("etp-x", "jax", found, RANGE)


@pytest.mark.parametrize("dist", ["etp-primitives", "etp-compiler", "etp-algorithms", "etp-nn"])
def test_declared_ranges_are_read_from_the_metadata_and_hold_here(dist: str) -> None:
    declared = declared_requirements(dist)
    clauses = set(declared["jax"].split(","))
    floors = [c[2:] for c in clauses if c.startswith(">=")]
    assert len(floors) == 1 and any(c.startswith("<") for c in clauses), declared["jax"]
    assert release(importlib.metadata.version("jax")) >= release(floors[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_installed(dist, ("jax", "brainstate", "saiunit", "numpy"))


def test_an_uninstalled_distribution_declares_nothing() -> None:
    assert declared_requirements("etp-no-such-distribution") == {}
    check_installed("etp-no-such-distribution", ("jax",))


def test_import_fails_clearly_on_an_unsupported_jax() -> None:
    """A fake metadata version for jax (below the floor) makes ``import etp_primitives`` raise."""
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '0.4.0' if name == 'jax' else real(name)\n"
        "import etp_primitives\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "ImportError: etp-primitives supports jax>=" in done.stderr and "jax 0.4.0 is installed" in done.stderr
