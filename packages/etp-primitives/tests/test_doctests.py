"""The docstring examples of every etp_primitives module run, here under float64 (x64) as well.

CI also runs ``pytest --doctest-modules`` over the sources in default precision; running them
here with x64 on (conftest) checks that no example depends on the dtype in an array's repr.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import etp_primitives

MODULES = ["etp_primitives"] + sorted(
    name for _, name, _ in pkgutil.walk_packages(etp_primitives.__path__, prefix="etp_primitives.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert failed == 0, f"{failed} of {attempted} docstring examples of {name} failed (run pytest --doctest-modules)"


def test_the_examples_are_there() -> None:
    finder = doctest.DocTestFinder()
    counts = {
        name: sum(len(t.examples) for t in finder.find(importlib.import_module(name)))
        for name in ("etp_primitives.extend", "etp_primitives.ops._elemwise", "etp_primitives._trace")
    }
    assert all(count > 0 for count in counts.values()), counts
