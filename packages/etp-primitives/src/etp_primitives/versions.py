"""Checks, at import, that JAX, brainstate and saiunit are within the versions ETP supports.

Each ETP distribution declares the versions of its dependencies it is tested with (its
``Requires-Dist`` metadata, e.g. ``jax>=0.10.2,<0.13``). A resolver installs only those,
but an environment can still end up outside the range (``pip install --no-deps``, an
upgrade of JAX afterwards, a source checkout on ``PYTHONPATH``). Then:

- a version **below** the declared floor raises :class:`ImportError` at import, naming the
  version found and the supported range: older JAX/brainstate lack APIs ETP calls, and the
  failure would otherwise surface later as an obscure internal error;
- a version **at or above** the declared ceiling emits :class:`UnsupportedVersionWarning`:
  it may work, but it is untested.

Examples
--------
>>> from etp_primitives.versions import check_version
>>> check_version("etp-example", "jax", "0.12.0", ">=0.10.2,<0.13")  # in range: silent
>>> check_version("etp-example", "jax", "0.9.0", ">=0.10.2,<0.13")
Traceback (most recent call last):
    ...
ImportError: etp-example supports jax>=0.10.2,<0.13, but jax 0.9.0 is installed; install a supported version (pip install 'jax>=0.10.2,<0.13')
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from collections.abc import Sequence

__all__ = ["UnsupportedVersionWarning", "check_installed", "check_version", "declared_requirements", "release"]


class UnsupportedVersionWarning(UserWarning):
    """A dependency is newer than the versions this ETP distribution is tested with."""


_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*)(;.*)?$")


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version string: ``"0.12.0.1"`` -> ``(0, 12, 0, 1)``.

    Pre-release and local suffixes are dropped (``"0.13.0rc1"`` -> ``(0, 13, 0)``).
    """
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def declared_requirements(distribution: str) -> dict[str, str]:
    """``name -> specifier`` of the unconditional requirements ``distribution`` declares.

    Empty when the distribution is not installed (a source tree on ``sys.path``).
    """
    try:
        requires = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    out: dict[str, str] = {}
    for line in requires:
        match = _REQUIREMENT.match(line)
        if match is None or match.group(4):  # extras and environment markers are not checked
            continue
        clauses = match.group(3).replace(" ", "").split(",")
        # metadata writers order clauses as they like; floor first reads as a range
        clauses.sort(key=lambda clause: not clause.startswith(">"))
        out[match.group(1).lower().replace("_", "-")] = ",".join(clauses)
    return out


def check_version(distribution: str, name: str, found: str, specifier: str) -> None:
    """Raise or warn when ``found`` (a version of ``name``) is outside ``specifier``.

    Only ``>=`` (floor) and ``<`` (ceiling) clauses are checked; they are the ones ETP declares.

    Raises
    ------
    ImportError
        If ``found`` is below a ``>=`` floor.

    Warns
    -----
    UnsupportedVersionWarning
        If ``found`` is at or above a ``<`` ceiling.
    """
    have = release(found)
    for clause in filter(None, specifier.split(",")):
        if clause.startswith(">=") and have < release(clause[2:]):
            raise ImportError(
                f"{distribution} supports {name}{specifier}, but {name} {found} is installed; "
                f"install a supported version (pip install '{name}{specifier}')"
            )
        if clause.startswith("<") and not clause.startswith("<=") and have >= release(clause[1:]):
            warnings.warn(
                f"{distribution} is tested with {name}{specifier}, but {name} {found} is installed; "
                "it may work, but results are not verified on it",
                UnsupportedVersionWarning,
                stacklevel=3,
            )


def check_installed(distribution: str, names: Sequence[str]) -> None:
    """:func:`check_version` for each of ``names`` that ``distribution`` declares and that is installed."""
    declared = declared_requirements(distribution)
    for name in names:
        specifier = declared.get(name)
        if not specifier:
            continue
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # the import of the package itself reports this
        check_version(distribution, name, found, specifier)
